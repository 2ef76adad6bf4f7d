"""The batch editor (`diffusionclip_pipeline.batch`, issue 33): inputs, mirrored outputs, the manifest, resuming,
refusals, per-image failures, and the CLI's ``edit --input-dir / --input-list``."""

import json
import os

import PIL.Image
import pytest
import torch
from conftest import add_random_adapter, make_pipeline, random_images

from diffusionclip_pipeline.batch import edit_images, find_inputs, item_seed, read_manifest
from diffusionclip_pipeline.batch.manifest import ManifestShard
from diffusionclip_pipeline.commands.main import main
from diffusionclip_pipeline.image_processing import postprocess_image

EDIT = dict(t0=50, num_inversion_steps=2, num_inference_steps=2)
CLI_EDIT = ["--t0", "50", "--num-inversion-steps", "2", "--num-inference-steps", "2", "--quiet"]


@pytest.fixture
def pipe():
    pipe = make_pipeline()
    add_random_adapter(pipe, "blue")
    return pipe


def write_inputs(folder, names, seed=1):
    """A PNG at each relative path of ``names`` (random 16 px images)."""
    for name, image in zip(names, postprocess_image(random_images(len(names), seed=seed))):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)


NAMES = ["a.png", "sub/b.png", "sub/deeper/c.png", "d.png", "e.jpg"]


def pixels(path) -> bytes:
    with PIL.Image.open(path) as image:
        return image.convert("RGB").tobytes()


def done_counts(output_dir) -> dict:
    counts = {}
    for entry in read_manifest(str(output_dir)):
        if entry.get("status") == "done":
            counts[entry["input"]] = counts.get(entry["input"], 0) + 1
    return counts


def test_a_folder_is_edited_into_mirrored_paths_batch_by_batch(tmp_path, pipe):
    write_inputs(tmp_path / "in", NAMES)
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    result = edit_images(pipe, str(tmp_path / "in"), str(tmp_path / "out"), batch_size=2, show_progress=False, **EDIT)
    relatives = sorted(NAMES)  # the fixed order: by relative path
    outputs = [os.path.splitext(r)[0] + ".png" for r in relatives]
    assert (result.num_inputs, result.num_done, result.num_skipped, result.failures) == (5, 5, 0, [])
    assert sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*.png")) == sorted(outputs)
    # each output is the pipeline's own edit of its batch (the inputs' order cut into batches of 2)
    for k in range(0, 5, 2):
        batch = [PIL.Image.open(tmp_path / "in" / r).convert("RGB") for r in relatives[k : k + 2]]
        seeds = [item_seed(0, r) for r in relatives[k : k + 2]]
        generator = [torch.Generator().manual_seed(s) for s in seeds]
        expected = pipe(batch, generator=generator, **EDIT).images
        for out, image in zip(outputs[k : k + 2], expected):
            assert pixels(tmp_path / "out" / out) == image.tobytes()
    assert done_counts(tmp_path / "out") == {r: 1 for r in relatives}
    entry = next(e for e in read_manifest(str(tmp_path / "out")) if e.get("input") == "sub/b.png")
    assert entry["output"] == "sub/b.png" and entry["seconds"] >= 0 and entry["adapter"] != "none"
    run = read_manifest(str(tmp_path / "out"))[0]  # the run's line: every edit setting, defaults included
    assert run["run"] and run["settings_id"] == entry["settings_id"] and entry["rank"] == run["rank"] == 0
    assert run["settings"]["t0"] == 50 and run["settings"]["encoding"] == "ddim" and run["settings"]["seed"] == 0


def test_a_restart_skips_what_is_done_and_refuses_other_settings_or_adapters(tmp_path, pipe):
    write_inputs(tmp_path / "in", NAMES)
    source, out = str(tmp_path / "in"), str(tmp_path / "out")
    edit_images(pipe, source, out, batch_size=2, show_progress=False, **EDIT)
    times = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*.png")}
    again = edit_images(pipe, source, out, batch_size=3, show_progress=False, **EDIT)  # the batch size may change
    assert (again.num_done, again.num_skipped) == (0, 5)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*.png")} == times  # nothing rewritten
    with pytest.raises(ValueError, match=r"other settings \(t0: 50 -> 60\).*overwrite=True"):
        edit_images(pipe, source, out, show_progress=False, **{**EDIT, "t0": 60})
    with pytest.raises(ValueError, match="other settings.*seed"):
        edit_images(pipe, source, out, seed=3, show_progress=False, **EDIT)
    pipe.set_adapters(["blue"], [0.5])
    with pytest.raises(ValueError, match="another adapter"):
        edit_images(pipe, source, out, show_progress=False, **EDIT)
    # overwrite: everything redone with the new settings, and only their manifest lines are left
    redone = edit_images(pipe, source, out, overwrite=True, show_progress=False, **{**EDIT, "t0": 60})
    assert (redone.num_done, redone.num_skipped) == (5, 0)
    assert [e["settings"]["t0"] for e in read_manifest(out) if "run" in e] == [60]


def test_a_default_passed_or_left_out_is_the_same_setting(tmp_path, pipe):
    write_inputs(tmp_path / "in", ["a.png"])
    edit_images(pipe, str(tmp_path / "in"), str(tmp_path / "out"), show_progress=False, **EDIT)
    same = edit_images(pipe, str(tmp_path / "in"), str(tmp_path / "out"), show_progress=False, encoding="ddim",
                       edit_strength=1.0, eta=0.0, **EDIT)  # fmt: skip
    assert same.num_skipped == 1
    with pytest.raises(ValueError, match="other settings .eta: 0.0 -> 0.5"):
        edit_images(pipe, str(tmp_path / "in"), str(tmp_path / "out"), show_progress=False, eta=0.5, **EDIT)


def test_an_unreadable_image_is_recorded_and_the_run_goes_on(tmp_path, pipe):
    write_inputs(tmp_path / "in", ["a.png", "b.png", "c.png"])
    (tmp_path / "in" / "b.png").write_bytes(b"not a png")
    result = edit_images(pipe, str(tmp_path / "in"), str(tmp_path / "out"), batch_size=3, show_progress=False, **EDIT)
    assert result.num_done == 2 and [f["input"] for f in result.failures] == ["b.png"]
    assert "cannot read image" in result.failures[0]["error"]
    assert sorted(os.listdir(tmp_path / "out")) == ["a.png", "c.png", "manifest.rank0.jsonl"]
    statuses = {e["input"]: e["status"] for e in read_manifest(str(tmp_path / "out")) if "input" in e}
    assert statuses == {"a.png": "done", "b.png": "failed", "c.png": "done"}
    # a failed input is tried again by the next run (here it is still broken)
    again = edit_images(pipe, str(tmp_path / "in"), str(tmp_path / "out"), show_progress=False, **EDIT)
    assert (again.num_done, again.num_skipped, len(again.failures)) == (0, 2, 1)


def test_an_image_the_pipeline_refuses_fails_alone(tmp_path, pipe, monkeypatch):
    write_inputs(tmp_path / "in", ["a.png", "c.png"])
    PIL.Image.new("RGB", (16, 16)).save(tmp_path / "in" / "b.png")
    calls, edit = [], type(pipe).__call__

    def refusing_black_images(self, image, **kwargs):  # a stand-in for an input the pipeline raises on
        calls.append(len(image))
        if any(not im.getbbox() for im in image):
            raise ValueError("a black image")
        return edit(self, image, **kwargs)

    monkeypatch.setattr(type(pipe), "__call__", refusing_black_images)
    result = edit_images(pipe, str(tmp_path / "in"), str(tmp_path / "out"), batch_size=3, show_progress=False, **EDIT)
    assert calls == [3, 1, 1, 1]  # the batch, then each image alone
    assert result.num_done == 2 and result.failures == [{"input": "b.png", "error": "ValueError: a black image"}]


def test_noise_encoding_seeds_each_image_from_its_path(tmp_path, pipe):
    write_inputs(tmp_path / "in", ["x.png", "y/z.png"])
    edit_images(pipe, str(tmp_path / "in"), str(tmp_path / "out"), batch_size=1, seed=7, show_progress=False,
                encoding="noise", **EDIT)  # fmt: skip
    for relative in ("x.png", "y/z.png"):
        image = PIL.Image.open(tmp_path / "in" / relative).convert("RGB")
        generator = [torch.Generator().manual_seed(item_seed(7, relative))]
        expected = pipe([image], generator=generator, encoding="noise", **EDIT).images[0]
        assert pixels(tmp_path / "out" / relative) == expected.tobytes()
    assert item_seed(7, "x.png") == item_seed(7, "x.png") != item_seed(7, "y/z.png") != item_seed(8, "y/z.png")
    assert 0 <= item_seed(2**40, "a") < 2**63


def test_an_input_is_never_overwritten(tmp_path, pipe):
    write_inputs(tmp_path / "in", ["a.png", "b.jpg"])
    before = {p.name: p.read_bytes() for p in (tmp_path / "in").iterdir()}
    for overwrite in (False, True):
        with pytest.raises(ValueError, match="would be written to the input file"):
            edit_images(pipe, str(tmp_path / "in"), str(tmp_path / "in"), overwrite=overwrite, show_progress=False)
    assert {p.name: p.read_bytes() for p in (tmp_path / "in").iterdir()} == before
    # an output folder inside the input folder is not read as input, on the first run or the next
    out = str(tmp_path / "in" / "edited")
    assert edit_images(pipe, str(tmp_path / "in"), out, show_progress=False, **EDIT).num_done == 2
    assert edit_images(pipe, str(tmp_path / "in"), out, show_progress=False, **EDIT).num_inputs == 2


def test_files_that_no_manifest_accounts_for_are_refused(tmp_path, pipe):
    write_inputs(tmp_path / "in", ["a.png"])
    (tmp_path / "out").mkdir()
    PIL.Image.new("RGB", (4, 4)).save(tmp_path / "out" / "a.png")
    with pytest.raises(ValueError, match=r"1 output\(s\) exist already \(e.g. a.png\)"):
        edit_images(pipe, str(tmp_path / "in"), str(tmp_path / "out"), show_progress=False, **EDIT)
    assert edit_images(pipe, str(tmp_path / "in"), str(tmp_path / "out"), overwrite=True, show_progress=False,
                       **EDIT).num_done == 1  # fmt: skip


def test_a_torn_manifest_line_is_skipped_and_the_next_append_stays_readable(tmp_path):
    shard = ManifestShard(str(tmp_path), 0)
    shard.append([{"input": "a.png", "status": "done"}])
    with open(shard.path, "a", encoding="utf-8") as handle:
        handle.write('{"input": "b.png", "stat')  # a process killed while appending
    shard.append([{"input": "c.png", "status": "done"}])
    assert [e["input"] for e in read_manifest(str(tmp_path))] == ["a.png", "c.png"]


def test_glob_and_list_file(tmp_path, pipe):
    write_inputs(tmp_path / "in", NAMES)
    assert [i.relative for i in find_inputs(str(tmp_path / "in"), pattern="*.jpg")] == ["e.jpg"]
    assert [i.relative for i in find_inputs(str(tmp_path / "in"), pattern="sub/*")] == ["sub/b.png"]  # one level
    assert [i.relative for i in find_inputs(str(tmp_path / "in"), pattern="sub/**")] == [
        "sub/b.png",
        "sub/deeper/c.png",
    ]
    assert [i.relative for i in find_inputs(str(tmp_path / "in"), pattern="**/[!a-b]*.png")] == [
        "d.png",
        "sub/deeper/c.png",
    ]
    (tmp_path / "in" / "list.txt").write_text("# chosen\nsub/deeper/c.png\n\na.png\n")
    items = find_inputs(input_list=str(tmp_path / "in" / "list.txt"))
    assert [(i.relative, i.output) for i in items] == [("sub/deeper/c.png", "sub/deeper/c.png"), ("a.png", "a.png")]
    result = edit_images(pipe, items, str(tmp_path / "out"), show_progress=False, **EDIT)
    assert result.num_done == 2 and (tmp_path / "out" / "sub" / "deeper" / "c.png").is_file()
    # two inputs that would meet in one output keep their suffix
    write_inputs(tmp_path / "two", ["x.png", "x.jpg"])
    assert [i.output for i in find_inputs(str(tmp_path / "two"))] == ["x.jpg.png", "x.png"]


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda p, d: edit_images(p, d, d + "/o", batch_size=0), "`batch_size` must be a positive integer"),
        (lambda p, d: edit_images(p, d, d + "/o", seed=-1), "`seed` must be an integer >= 0"),
        (lambda p, d: edit_images(p, d, d + "/o", output_type="pt"), r"sets \['output_type'\] itself"),
        (lambda p, d: edit_images(p, d + "/none", d + "/o"), "no such folder"),
        (lambda p, d: edit_images(p, [], d + "/o"), "`inputs` must be a folder or a non-empty list"),
        (lambda p, d: find_inputs(), "Give one of `input_dir` and `input_list`"),
        (lambda p, d: find_inputs(d, d + "/l.txt"), "Give one of `input_dir` and `input_list`"),
        (lambda p, d: find_inputs(d, pattern="*.gif"), "No input images"),
        (lambda p, d: find_inputs(input_list=d + "/out.txt"), "outside the list file's folder"),
        (lambda p, d: find_inputs(input_list=d + "/twice.txt"), "listed twice"),
    ],
)
def test_bad_arguments_are_refused_before_any_work(tmp_path, pipe, call, message):
    write_inputs(tmp_path, ["a.png"])
    (tmp_path / "out.txt").write_text("../a.png\n")
    (tmp_path / "twice.txt").write_text("a.png\n./a.png\n")
    with pytest.raises((ValueError, TypeError, FileNotFoundError), match=message):
        call(pipe, str(tmp_path))
    assert not (tmp_path / "o").exists()


def test_progress_lines_say_images_per_second(tmp_path, pipe, capsys):
    write_inputs(tmp_path / "in", ["a.png", "b.png"])
    edit_images(pipe, str(tmp_path / "in"), str(tmp_path / "out"), batch_size=1, **EDIT)
    err = capsys.readouterr().err  # not a terminal: log lines
    assert "editing:  50% 1/2" in err and "editing: 100% 2/2" in err and "images/s=" in err


# ---- the command line ---------------------------------------------------------------------------------------------


def test_cli_input_dir_and_input_list(setup, capsys):
    write_inputs(setup / "tree", ["p.png", "q/r.png", "q/s.jpg"])
    model = ["edit", "--model", str(setup / "pipe"), *CLI_EDIT]
    argv = [*model, "--output", str(setup / "out"), "--input-dir", str(setup / "tree"), "--glob", "*.png"]
    assert main([*argv, "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "edited 2 images" in out and "0 of 2 were done already" in out
    assert sorted(os.listdir(setup / "out")) == ["manifest.rank0.jsonl", "p.png", "q"]  # no grid in this mode
    assert main(argv) == 0  # resumed: nothing left to do
    assert "2 of 2 were done already" in capsys.readouterr().out
    assert main([*argv, "--t0", "60"]) == 2
    err = capsys.readouterr().err
    assert "holds edits made with other settings (t0: 50 -> 60)" in err and "--overwrite" in err
    assert main([*argv, "--t0", "60", "--overwrite"]) == 0
    (setup / "tree" / "list.txt").write_text("q/s.jpg\n")
    assert main([*model, "--output", str(setup / "out2"), "--input-list", str(setup / "tree" / "list.txt")]) == 0
    assert (setup / "out2" / "q" / "s.png").is_file()
    entries = [json.loads(line) for line in (setup / "out2" / "manifest.rank0.jsonl").read_text().splitlines()]
    assert [e["input"] for e in entries if "input" in e] == ["q/s.jpg"]


def test_cli_interrupted_batch_run_names_its_files_and_resumes(setup, capsys, monkeypatch):
    from diffusionclip_pipeline import DiffusionCLIPPipeline

    write_inputs(setup / "tree", ["a.png", "b.png", "c.png"])
    edit, calls = DiffusionCLIPPipeline.__call__, []

    def interrupted_at_the_second_batch(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return edit(self, *args, **kwargs)

    monkeypatch.setattr(DiffusionCLIPPipeline, "__call__", interrupted_at_the_second_batch)
    argv = ["edit", "--model", str(setup / "pipe"), *CLI_EDIT, "--input-dir", str(setup / "tree"), "--output",
            str(setup / "out"), "--batch-size", "1"]  # fmt: skip
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert f"interrupted; 1 complete file(s) had been written: {setup / 'out' / 'a.png'}" in err
    assert main(argv) == 0
    assert "edited 2 images" in (out := capsys.readouterr().out) and "1 of 3 were done already" in out
    assert done_counts(setup / "out") == {"a.png": 1, "b.png": 1, "c.png": 1}


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--images", "{imgs}", "--glob", "*.png"], "--glob applies to --input-dir, not to --images"),
        (["--input-list", "{imgs}/none.txt", "--glob", "*.png"], "--glob applies to --input-dir"),
        (["--input-dir", "{tmp}/nowhere"], "--input-dir {tmp}/nowhere: no such folder"),
        (["--input-list", "{tmp}/none.txt"], "no such file"),
        (["--video", "{tmp}/none.gif"], "--video {tmp}/none.gif: no such file or folder"),
        (["--input-dir", "{imgs}", "--lora", "{tmp}/none"], "no such adapter file"),
    ],
)
def test_cli_batch_errors_are_one_line_before_loading(setup, capsys, extra, message):
    extra = [a.format(imgs=setup / "imgs", tmp=setup) for a in extra]
    argv = ["edit", "--model", str(setup / "pipe"), "--output", str(setup / "o"), *CLI_EDIT, *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message.format(tmp=setup) in err and "Traceback" not in err
    assert not (setup / "o").exists()


def test_cli_inputs_are_one_of_images_input_dir_input_list_video(setup, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["edit", "--model", "m", "--output", "o", "--images", "a", "--input-dir", "b"])
    assert exit_info.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["edit", "--model", "m", "--output", "o"])
    assert "one of the arguments --images --input-dir --input-list --video is required" in capsys.readouterr().err


def test_cli_images_are_decoded_batch_by_batch(setup, monkeypatch):
    from diffusionclip_pipeline import DiffusionCLIPPipeline, image_io

    read, reads, batches = image_io.read_image, [], []
    monkeypatch.setattr(image_io, "read_image", lambda path, *a, **k: reads.append(path) or read(path, *a, **k))
    edit = DiffusionCLIPPipeline.edit

    def recording(self, image, **kwargs):
        batches.append(len(reads))  # images decoded when this batch is edited
        return edit(self, image, **kwargs)

    monkeypatch.setattr(DiffusionCLIPPipeline, "edit", recording)
    argv = ["edit", "--model", str(setup / "pipe"), "--images", str(setup / "imgs"), "--output", str(setup / "out"),
            "--batch-size", "1", *CLI_EDIT]  # fmt: skip
    assert main(argv) == 0
    assert batches == [1, 2, 3]  # not all three before the first edit

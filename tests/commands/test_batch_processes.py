"""The batch editor across processes and after a kill (issue 33), in real subprocesses: two processes under
``torchrun`` (CPU, gloo) edit every input exactly once, with outputs identical to one process's; a run killed with
SIGKILL and started again skips what is done and redoes nothing half written. Slow: each launch starts Python, torch
and (for torchrun) a process group."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import PIL.Image
import pytest
from conftest import add_random_adapter, make_pipeline, random_images

from diffusionclip_pipeline.batch import read_manifest
from diffusionclip_pipeline.image_processing import postprocess_image

pytestmark = pytest.mark.slow

WORKER = textwrap.dedent(
    """
    import sys
    from diffusionclip_pipeline import DiffusionCLIPPipeline
    from diffusionclip_pipeline.batch import edit_images

    model, source, out = sys.argv[1:4]
    pipe = DiffusionCLIPPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    steps = dict(t0=50, num_inversion_steps=2, num_inference_steps=2)
    for encoding in ("ddim", "noise"):
        result = edit_images(pipe, source, f"{out}/{encoding}", batch_size=2, seed=5, encoding=encoding,
                             show_progress=False, **steps)
        print(f"rank {result.process_index} of {result.num_processes}: {result.num_done} done")
    """
)


def environment() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture
def adapted(tmp_path):
    """A saved tiny pipeline with an active adapter, and 7 inputs in nested folders."""
    pipe = make_pipeline()
    add_random_adapter(pipe, "blue")
    pipe.save_pretrained(tmp_path / "pipe")
    for i, image in enumerate(postprocess_image(random_images(7, seed=2))):
        folder = tmp_path / "in" / ("a/b" if i % 3 == 0 else "a" if i % 3 == 1 else "")
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"img{i}.png")
    return tmp_path


def outputs(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.png"))}


def done_counts(folder) -> dict:
    counts = {}
    for entry in read_manifest(str(folder)):
        if entry.get("status") == "done":
            counts[entry["input"]] = counts.get(entry["input"], 0) + 1
    return counts


def torchrun(*args) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(command, capture_output=True, text=True, env=environment(), timeout=600)


def test_two_processes_edit_each_input_once_as_one_process_does(adapted):
    (adapted / "worker.py").write_text(WORKER)
    args = [str(adapted / "worker.py"), str(adapted / "pipe"), str(adapted / "in")]
    single = subprocess.run([sys.executable, *args, str(adapted / "one")], capture_output=True, text=True,
                            env=environment(), timeout=600)  # fmt: skip
    assert single.returncode == 0, single.stderr
    launched = torchrun(*args, str(adapted / "two"))
    assert launched.returncode == 0, launched.stderr
    assert "rank 0 of 2: 4 done" in launched.stdout and "rank 1 of 2: 3 done" in launched.stdout  # 4 batches: 2 + 2
    inputs = {str(p.relative_to(adapted / "in")) for p in (adapted / "in").rglob("*.png")}
    for encoding in ("ddim", "noise"):
        two = adapted / "two" / encoding
        assert sorted(os.listdir(two))[:2] == ["a", "img2.png"] and (two / "manifest.rank1.jsonl").is_file()
        assert done_counts(two) == {name: 1 for name in inputs}  # exactly once, over both shards
        assert {e["rank"] for e in read_manifest(str(two)) if "input" in e} == {0, 1}
        assert outputs(two) == outputs(adapted / "one" / encoding)  # identical files
    assert outputs(adapted / "two" / "ddim") != outputs(adapted / "two" / "noise")
    # the command line under torchrun, into the two-process folder: nothing left to do, on either process
    cli = torchrun("-m", "diffusionclip_pipeline.commands.main", "edit", "--model", str(adapted / "pipe"),
                   "--input-dir", str(adapted / "in"), "--output", str(adapted / "two" / "ddim"), "--t0", "50",
                   "--num-inversion-steps", "2", "--num-inference-steps", "2", "--seed", "5", "--quiet")  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    assert "process 0 of 2: edited 0 images" in cli.stdout and "7 of 7 were done already" in cli.stdout


def cli_edit(model, source, out) -> list[str]:
    return [sys.executable, "-m", "diffusionclip_pipeline.commands.main", "edit", "--model", model, "--input-dir",
            source, "--output", out, "--batch-size", "1", "--t0", "300", "--num-inversion-steps", "12",
            "--num-inference-steps", "12", "--quiet"]  # fmt: skip


def test_a_killed_run_resumes_without_redoing_work(adapted):
    for i, image in enumerate(postprocess_image(random_images(9, seed=3))):  # 16 inputs in all
        image.save(adapted / "in" / f"more{i}.png")
    model, source, out = str(adapted / "pipe"), str(adapted / "in"), adapted / "out"
    process = subprocess.Popen(cli_edit(model, source, str(out)), env=environment(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if out.is_dir() and sum(done_counts(out).values()) >= 3:
            break
        time.sleep(0.02)
    if process.poll() is not None:
        pytest.fail(f"the run ended before it could be killed: {process.stderr.read().decode()[-500:]}")
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_before = done_counts(out)
    assert len(done_before) >= 3 and set(done_before.values()) == {1}
    for name in done_before:  # a manifest line names a complete file
        with PIL.Image.open(out / name) as image:
            image.load()
    resumed = subprocess.run(cli_edit(model, source, str(out)), capture_output=True, text=True, env=environment(),
                             timeout=600)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert f"edited {16 - len(done_before)} images" in resumed.stdout
    assert f"{len(done_before)} of 16 were done already" in resumed.stdout
    assert done_counts(out) == {name: 1 for name in outputs(adapted / "in")}  # each input done once, in all
    assert not [p for p in out.rglob(".*")]  # no temporary file of the killed write is left
    fresh = subprocess.run(cli_edit(model, source, str(adapted / "fresh")), capture_output=True, env=environment(),
                           timeout=600)  # fmt: skip
    assert fresh.returncode == 0
    assert outputs(out) == outputs(adapted / "fresh")  # the same files as a run that was never killed

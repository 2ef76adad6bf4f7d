"""The CLI never shows a traceback: every failure is one line naming the file or option, Ctrl-C exits with 130, and
nothing is left half-written."""

import errno
import os
import subprocess
import sys
import zlib
from struct import pack

import PIL.Image
import pytest
import torch
from conftest import make_pipeline, random_images

from diffusionclip_pipeline import DiffusionCLIPPipeline
from diffusionclip_pipeline.commands.main import main
from diffusionclip_pipeline.image_io import unique_stems
from diffusionclip_pipeline.training import NonFiniteLossError, trainer

FAST_EDIT = ["--t0", "50", "--num-inversion-steps", "2", "--num-inference-steps", "2"]
FAST_FINETUNE = ["--t0", "50", "--num-inversion-steps", "2", "--num-train-steps", "1", "--num-epochs", "1"]


def edit_argv(setup, *extra):
    return ["edit", "--model", str(setup / "pipe"), "--images", str(setup / "imgs"), "--output", str(setup / "out"),
            *FAST_EDIT, *extra]  # fmt: skip


def finetune_argv(setup, *extra):
    return ["finetune", "--model", str(setup / "pipe"), "--src", "red circle", "--tar", "blue circle", "--images",
            str(setup / "imgs"), "--output", str(setup / "ada"), *FAST_FINETUNE, *extra]  # fmt: skip


def one_error(err: str, command: str = "edit") -> str:
    """The one error line of ``err``; no traceback."""
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith(f"diffusionclip {command}: ") and "error" in line]
    assert len(errors) == 1, err
    return errors[0]


def no_temporary_files(folder) -> bool:
    return not [f for f in os.listdir(folder) if f.endswith(".tmp") or f.startswith(".")]


def png_header_only(path, width: int, height: int) -> None:
    """A PNG whose header claims ``width`` x ``height`` pixels, with almost no data (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return pack(">I", len(data)) + kind + data + pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = chunk(b"IHDR", pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def test_decompression_bomb_is_one_line(setup, capsys, monkeypatch):
    png_header_only(setup / "bomb.png", 30000, 30000)  # 9e8 pixels: over twice PIL's limit, an error in PIL
    argv = ["edit", "--model", str(setup / "pipe"), "--images", str(setup / "bomb.png"), "--output", str(setup / "o")]
    assert main(argv) == 2
    line = one_error(capsys.readouterr().err)
    assert "bomb.png" in line and "decompression bomb" in line
    assert not (setup / "o").exists()
    # between 1x and 2x the limit PIL only warns; the CLI refuses those too
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 200)
    PIL.Image.new("RGB", (16, 16)).save(setup / "warn.png")  # 256 pixels
    assert main([*argv[:4], str(setup / "warn.png"), *argv[5:]]) == 2
    assert "warn.png: refused as a possible decompression bomb" in one_error(capsys.readouterr().err)


def test_truncated_image_names_the_file(setup, capsys):
    data = (setup / "imgs" / "img0.png").read_bytes()
    (setup / "imgs" / "img0.png").write_bytes(data[: len(data) // 2])
    assert main(edit_argv(setup)) == 2
    assert "cannot read image " + str(setup / "imgs" / "img0.png") in one_error(capsys.readouterr().err)


def test_adapter_for_another_unet(setup, capsys):
    assert main(finetune_argv(setup)) == 0
    make_pipeline(sample_size=8).save_pretrained(setup / "other")  # another UNet config
    argv = ["edit", "--model", str(setup / "other"), "--images", str(setup / "imgs"), "--lora", str(setup / "ada"),
            "--output", str(setup / "out"), *FAST_EDIT]  # fmt: skip
    assert main(argv) == 2
    line = one_error(capsys.readouterr().err)
    assert f"--lora {setup / 'ada'}:" in line and "another UNet" in line
    assert not (setup / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA")
def test_device_cuda_on_a_cpu_torch(setup, capsys):
    assert main(edit_argv(setup, "--device", "cuda")) == 2
    assert "--device cuda: this torch build has no CUDA" in one_error(capsys.readouterr().err)


def test_unknown_device(setup, capsys):
    assert main(edit_argv(setup, "--device", "foo")) == 2
    assert "unknown device 'foo'" in one_error(capsys.readouterr().err)
    assert main(edit_argv(setup, "--device", "meta")) == 2
    assert "the meta device holds no data" in one_error(capsys.readouterr().err)
    assert not (setup / "out").exists()


def test_malformed_adapters_json(setup, capsys):
    pipe = make_pipeline()
    pipe.finetune("red circle", "blue circle", images=random_images(2), t0=50, num_inversion_steps=2,
                  num_train_steps=1, num_epochs=1)  # fmt: skip
    pipe.save_pretrained(setup / "adapted")
    (setup / "adapted" / "lora" / "adapters.json").write_text("{not json")
    argv = ["edit", "--model", str(setup / "adapted"), "--images", str(setup / "imgs"), "--output", str(setup / "o")]
    assert main(argv) == 2
    line = one_error(capsys.readouterr().err)
    assert f"cannot load --model {setup / 'adapted'}" in line and "adapters.json" in line


def test_full_disk_while_writing_edits(setup, capsys, monkeypatch):
    def no_space(self, fp, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(PIL.Image.Image, "save", no_space)
    assert main(edit_argv(setup)) == 2
    line = one_error(capsys.readouterr().err)
    assert f"cannot write {setup / 'out' / 'img0_edited.png'}: No space left on device" in line
    assert os.listdir(setup / "out") == []  # no partial or temporary file


def test_full_disk_while_writing_the_adapter(setup, capsys, monkeypatch):
    from diffusionclip_pipeline.loaders import lora_file
    from diffusionclip_pipeline.utils.io import atomic_write

    def full_disk_write(path, write):  # the disk fills up half-way through the adapter's bytes
        def partial(tmp):
            with open(tmp, "wb") as handle:
                handle.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        atomic_write(path, partial)

    monkeypatch.setattr(lora_file, "atomic_write", full_disk_write)
    assert main(finetune_argv(setup)) == 2
    line = one_error(capsys.readouterr().err, "finetune")
    assert f"cannot write the adapter to {setup / 'ada'}: No space left on device" in line
    assert not (setup / "ada").exists() and no_temporary_files(setup)  # the adapter folder is written as a whole


def test_interrupted_finetune_writes_nothing(setup, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "fit", interrupted)  # Ctrl-C in the middle of training
    assert main(finetune_argv(setup)) == 130
    assert capsys.readouterr().err.splitlines()[-1] == "diffusionclip finetune: interrupted; nothing was written"
    assert not (setup / "ada").exists()


def test_interrupted_edit_leaves_only_complete_files(setup, capsys, monkeypatch):
    edit, calls = DiffusionCLIPPipeline.edit, []

    def interrupted_at_the_second_batch(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return edit(self, *args, **kwargs)

    monkeypatch.setattr(DiffusionCLIPPipeline, "edit", interrupted_at_the_second_batch)
    assert main(edit_argv(setup, "--batch-size", "1")) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines()[-1] == (
        f"diffusionclip edit: interrupted; 1 complete file(s) had been written: {setup / 'out' / 'img0_edited.png'}"
    )
    assert os.listdir(setup / "out") == ["img0_edited.png"]  # no grid, no temporary file
    PIL.Image.open(setup / "out" / "img0_edited.png").load()  # complete


def test_batch_size_zero_is_refused_while_parsing(setup, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(edit_argv(setup, "--batch-size", "0"))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "diffusionclip edit: error: `--batch-size` must be a positive integer, got 0.\n"


def test_outputs_are_unique_across_input_folders(setup, capsys):
    for folder in ("a", "b"):
        (setup / folder).mkdir()
        PIL.Image.open(setup / "imgs" / f"img{'ab'.index(folder)}.png").save(setup / folder / "x.png")
    argv = ["edit", "--model", str(setup / "pipe"), "--images", str(setup / "a"), str(setup / "b"), "--output",
            str(setup / "out"), *FAST_EDIT]  # fmt: skip
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert sorted(os.listdir(setup / "out")) == ["grid.png", "x-1_edited.png", "x_edited.png"]
    assert f"{setup / 'b' / 'x.png'} -> x-1_edited.png" in captured.err
    assert "wrote 2 reconstructed images" in captured.out
    assert unique_stems(["a/x.png", "b/x.png", "c/x-1.png", "d/x.jpg"]) == ["x", "x-2", "x-1", "x-3"]


def test_internal_error_is_one_line(setup, capsys, monkeypatch):
    def broken(self, *args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(DiffusionCLIPPipeline, "edit", broken)
    assert main(edit_argv(setup)) == 1
    assert one_error(capsys.readouterr().err) == (
        "diffusionclip edit: internal error: RuntimeError: boom second line (run with DIFFUSIONCLIP_DEBUG=1 for the "
        "traceback)"
    )
    monkeypatch.setenv("DIFFUSIONCLIP_DEBUG", "1")
    with pytest.raises(RuntimeError, match="boom"):
        main(edit_argv(setup))


def test_diverged_training_is_one_line(setup, capsys, monkeypatch):
    def diverged(*args, **kwargs):
        raise NonFiniteLossError("the loss is nan at epoch 0, batch 0")

    monkeypatch.setattr(trainer, "fit", diverged)
    assert main(finetune_argv(setup)) == 2
    assert "training diverged: the loss is nan" in one_error(capsys.readouterr().err, "finetune")


def test_a_real_process_prints_one_line(setup):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    argv = [sys.executable, "-m", "diffusionclip_pipeline.cli", *edit_argv(setup, "--device", "foo")]
    result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == ["diffusionclip edit: error: unknown device 'foo' (--device): use "
                                                  "e.g. cpu, cuda, cuda:1 or mps"]  # fmt: skip

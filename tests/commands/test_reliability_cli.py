"""The CLI never loses data (docs/reliability.md, "Files on disk"): `edit`, `sweep` and `translate` never overwrite
an input, and refuse existing outputs unless ``--overwrite``; both checked before any work."""

from __future__ import annotations

import os

import pytest

from diffusionclip_pipeline.commands.main import main

FAST_EDIT = ["--t0", "50", "--num-inversion-steps", "2", "--num-inference-steps", "2"]


def snapshot(folder) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def argv(command: str, setup, output, *extra) -> list[str]:
    base = [command, "--model", str(setup / "pipe"), "--images", str(setup / "imgs"), "--output", str(output)]
    if command == "sweep":
        base += ["--src", "red circle", "--tar", "blue circle", "--t0", "50", "--edit-strength", "1",
                 "--num-inversion-steps", "2", "--num-inference-steps", "2"]  # fmt: skip
    elif command == "translate":
        base += ["--t0", "50", "--n-iter", "1"]
    else:
        base += FAST_EDIT
    return base + list(extra)


@pytest.mark.parametrize(
    ("command", "clash"),
    [("edit", "grid.png"), ("edit", "img0_edited.png"), ("sweep", "grid.png"),
     ("translate", "img1_translated.png")],
)  # fmt: skip
def test_an_input_is_never_overwritten_even_with_overwrite(setup, capsys, command, clash):
    """``--output`` is the input folder, which holds an input named like an output: refused, inputs unchanged."""
    (setup / "imgs" / clash).write_bytes((setup / "imgs" / "img2.png").read_bytes())  # an input of that name
    before = snapshot(setup / "imgs")
    for extra in ([], ["--overwrite"]):
        assert main(argv(command, setup, setup / "imgs", *extra)) == 2
        err = capsys.readouterr().err
        assert "would overwrite the input" in err and clash in err, err
        assert snapshot(setup / "imgs") == before


def test_existing_outputs_are_refused_unless_overwrite(setup, capsys):
    out = setup / "out"
    assert main(argv("edit", setup, out)) == 0
    first = snapshot(out)
    (out / "grid.png").write_bytes(b"kept")
    assert main(argv("edit", setup, out)) == 2
    err = capsys.readouterr().err
    assert "exist already" in err and "--overwrite" in err, err
    assert (out / "grid.png").read_bytes() == b"kept"
    assert main(argv("edit", setup, out, "--overwrite")) == 0
    assert snapshot(out) == first  # the same run again, replaced


@pytest.mark.parametrize("command", ["edit", "sweep"])
def test_t0_beyond_a_folders_schedule_is_refused_before_the_model_loads(setup, capsys, monkeypatch, command):
    from diffusionclip_pipeline.commands import loading

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(loading, "load_pipeline", no_loading)
    argv = [command, "--model", str(setup / "pipe"), "--images", str(setup / "imgs"), "--output", str(setup / "out"),
            "--t0", "1000"]  # fmt: skip
    if command == "sweep":
        argv += ["--src", "a", "--tar", "b"]
    assert main(argv) == 2
    assert "--t0 must be an integer in [1, 999]" in capsys.readouterr().err

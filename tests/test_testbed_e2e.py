"""End to end on the shipped test-bed: the method must clearly edit, and a reconstruction must clearly not."""

import json
import os

import pytest
import torch
from safetensors import safe_open

from diffusionclip_pipeline.commands.main import main
from diffusionclip_pipeline.testbed import (
    RECOMMENDED_EDIT,
    RECOMMENDED_FINETUNE,
    WEIGHTS_DIR,
    edit_success,
    load_pipeline,
)
from diffusionclip_pipeline.testbed.demo import run_demo, run_edit_experiment
from diffusionclip_pipeline.training import FinetuneConfig


def test_shipped_weights_are_small_and_load_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(WEIGHTS_DIR) for f in fs)
    assert total <= 10 * 1024**2
    for path in (("unet", "diffusion_pytorch_model.safetensors"), ("clip_2", "model.safetensors")):
        with safe_open(os.path.join(WEIGHTS_DIR, *path), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    pipe = load_pipeline()
    assert pipe.unet.dtype == torch.float32 and pipe.unet.config.sample_size == 32
    # two CLIPs, computing in float32; `second_clip=False` leaves the second one out
    assert [model.dtype for model, _ in pipe.clip_models] == [torch.float32, torch.float32]
    assert len(load_pipeline(second_clip=False).clip_models) == 1
    assert not pipe.scheduler.config.clip_sample
    FinetuneConfig.from_kwargs(**RECOMMENDED_FINETUNE)  # the recommended settings are valid
    pipe.check_inputs(image=torch.zeros(1, 3, 32, 32), **RECOMMENDED_EDIT)


@pytest.mark.slow
def test_colour_edit_beats_reconstruction():
    """Fine-tune red -> blue on 16 rendered circles, edit 16 others; the same edit without the adapter is the
    reconstruction, which keeps red and so must fail every colour criterion.

    The bar, 0.4, is under half the 94 % measured on 64 held-out images at data seed 0 and the 88 % mean over six
    seeds (README, both shipped CLIPs, the recommended settings), and well under the 75 % (12 of 16) measured at this
    test's seed 3, where 7 of 16 pass it; the reconstruction scores 0.
    """
    pipe = load_pipeline()
    result = run_edit_experiment(pipe, "red", "blue", num_train=16, num_test=16, seed=3)
    pipe.disable_lora()
    reconstructed = pipe.edit(result["sources"], **RECOMMENDED_EDIT).images
    baseline = [edit_success(s, r, target_colour="blue")["success"] for s, r in zip(result["sources"], reconstructed)]
    assert sum(baseline) == 0
    assert result["success_rate"] >= 0.4, json.dumps(result["criteria"])


@pytest.mark.slow
def test_demo_command_writes_grid_and_adapter(tmp_path, capsys):
    assert main(["demo", "--output", str(tmp_path), "--num-test", "2"]) == 0
    assert (tmp_path / "before_after.png").is_file() and (tmp_path / "pytorch_lora_weights.safetensors").is_file()
    assert "success rate:" in capsys.readouterr().out


def test_demo_bad_arguments(capsys):
    with pytest.raises(SystemExit) as exit_info:  # refused while parsing
        main(["demo", "--source", "purple"])
    assert exit_info.value.code == 2 and "`--source` must be one of" in capsys.readouterr().err
    assert main(["demo", "--target", "red"]) == 2
    assert "`--source` and `--target` are the same colour ('red')" in capsys.readouterr().err
    with pytest.raises(ValueError, match="`num_test` must be a positive integer"):
        run_demo(num_test=0)

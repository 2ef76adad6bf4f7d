"""No silent wrong results (issue 28, item 4 and the pipeline's part of item 11): a non-finite edit is an error naming
the likely cause, never an image; a model folder with NaN or missing weights, an invalid schedule or crafted sizes is
refused when it loads."""

import contextlib
import json
import os

import pytest
import torch
from conftest import add_random_adapter, make_pipeline, random_images
from safetensors.torch import load_file, save_file

from diffusionclip_pipeline import DiffusionCLIPPipeline, NonFiniteResultError
from diffusionclip_pipeline.scheduling_ddim_grid import ddim_timesteps

EDIT = {"t0": 200, "num_inversion_steps": 3, "num_inference_steps": 3, "output_type": "pt"}


@pytest.fixture
def adapted():
    pipe = make_pipeline(with_clip=False)
    add_random_adapter(pipe, "a")
    return pipe


@pytest.mark.parametrize(
    "kwargs, cause",
    [
        ({"edit_strength": 1e30}, "`edit_strength`=1e+30"),
        ({"eta": 1e30}, "`eta`=1e+30"),
    ],
)
def test_huge_finite_settings_raise_instead_of_a_black_image(adapted, kwargs, cause):
    with pytest.warns(UserWarning) if "edit_strength" in kwargs else contextlib.nullcontext():
        with pytest.raises(NonFiniteResultError, match=cause.replace("+", r"\+")):
            adapted.edit(random_images(1), generator=torch.Generator().manual_seed(0), **{**EDIT, **kwargs})


def test_huge_adapter_weights_and_latents_raise(adapted):
    latents = adapted.invert(random_images(1), t0=200, num_inversion_steps=3).x_t0
    adapted.set_adapters("a", 1e30)
    with pytest.raises(NonFiniteResultError, match="adapters' weights"):
        adapted.edit(latents=latents, **{k: v for k, v in EDIT.items() if k != "num_inversion_steps"})
    adapted.set_adapters("a", 1.0)
    with pytest.raises(NonFiniteResultError, match="`latents`"):
        adapted.edit(latents=latents * 1e38, **{k: v for k, v in EDIT.items() if k != "num_inversion_steps"})


def _saved(tmp_path):
    folder = tmp_path / "pipe"
    make_pipeline(with_clip=False).save_pretrained(folder)
    return folder


def test_nan_weights_are_refused_at_load(tmp_path):
    folder = _saved(tmp_path)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    key = sorted(tensors)[0]
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, weights)
    with pytest.raises(ValueError, match=f"`unet`'s weight `{key}` holds NaN"):
        DiffusionCLIPPipeline.from_pretrained(folder)


def test_missing_weights_are_refused_at_load(tmp_path):
    folder = _saved(tmp_path)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    save_file({k: v for i, (k, v) in enumerate(sorted(tensors.items())) if i % 2}, weights)  # half of them
    with pytest.raises((ValueError, OSError), match="weights|missing|Missing"):
        DiffusionCLIPPipeline.from_pretrained(folder)


def _edit_config(folder, name, **values):
    path = os.path.join(folder, name)
    with open(path) as f:
        config = json.load(f)
    config.update(values)
    with open(path, "w") as f:
        json.dump(config, f)


def test_an_invalid_noise_schedule_is_refused_at_load(tmp_path):
    folder = _saved(tmp_path)
    _edit_config(folder, "scheduler/scheduler_config.json", beta_start=-0.5, beta_end=0.02)
    with pytest.raises(ValueError, match=r"betas must lie in \(0, 1\)"):
        DiffusionCLIPPipeline.from_pretrained(folder)


@pytest.mark.parametrize(
    "name, key, value",
    [
        ("scheduler/scheduler_config.json", "num_train_timesteps", 10**9),
        ("unet/config.json", "sample_size", 10**6),
        ("unet/config.json", "sample_size", [16, 10**6]),
        ("scheduler/scheduler_config.json", "num_train_timesteps", 1.5),
    ],
)
def test_crafted_sizes_are_refused_before_anything_is_allocated(tmp_path, name, key, value):
    folder = _saved(tmp_path)
    _edit_config(folder, name, **{key: value})
    with pytest.raises(ValueError, match=f"sets `{key}`"):  # before the scheduler allocates 10**9 betas (8 GB)
        DiffusionCLIPPipeline.from_pretrained(folder)


def test_a_huge_step_count_gives_the_full_grid_without_allocating_it():
    with pytest.warns(UserWarning, match="using the 501 distinct integer timesteps"):
        assert ddim_timesteps(500, 10**9) == list(range(501))

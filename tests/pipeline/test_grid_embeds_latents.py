"""Arguments diffusers users pass (issue 29, item 7): a custom ``timesteps`` grid (and ``sigmas``, refused),
precomputed ``prompt_embeds`` / ``pooled_prompt_embeds`` / negative ones, and image latents as ``image``."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    adapted_pixel_pipeline,
    make_flux_components,
    make_sd3_components,
    make_sd_components,
    make_sdxl_components,
    random_images,
)

from diffusionclip_pipeline import DiffusionCLIPPipeline

PT = dict(output_type="pt")
# the SD / SD3 pipelines here have no adapter: these tests compare conditionings and grids, not edits
pytestmark = pytest.mark.filterwarnings("ignore::diffusionclip_pipeline.NoAdapterWarning")


def pixel_pipe():
    return adapted_pixel_pipeline("smile")


def built(components):
    pipe = DiffusionCLIPPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---- timesteps ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", [1, -1])
def test_custom_timesteps_equal_the_grid_t0_and_the_step_counts_build(order):
    pipe, x = pixel_pipe(), random_images(2)
    grid = [0, 100, 200, 300]  # DiffusionCLIP's int(linspace(0, 1, 4) * 300)
    custom = pipe.edit(x, timesteps=grid[::order], **PT)
    default = pipe.edit(x, t0=300, num_inversion_steps=4, num_inference_steps=4, **PT)
    torch.testing.assert_close(custom.images, default.images, rtol=0, atol=0)
    assert custom.timesteps == [300, 200, 100, 0]


def test_a_custom_inversion_grid_is_ddim_eq_12_on_that_grid():
    """An independent DDIM inversion (eq. 12, the original model at the source level) on a non-uniform grid."""
    pipe, x = pixel_pipe(), random_images(1)
    grid = [0, 40, 300]
    x_t0 = pipe.invert(x, timesteps=grid).x_t0
    alphas = pipe.scheduler.alphas_cumprod.double()
    unet = pipe.unet
    sample = pipe.prepare_image(x).double()
    levels = [(None, 0)] + list(zip(grid, grid[1:]))  # (source, target); None: the clean image (alpha 1)
    with torch.no_grad(), pipe._original_model():
        for source, target in levels:
            a_s = torch.tensor(1.0, dtype=torch.float64) if source is None else alphas[source]
            eps = unet(sample.float(), 0 if source is None else source).sample.double()
            x0_pred = (sample - (1 - a_s).sqrt() * eps) / a_s.sqrt()
            sample = alphas[target].sqrt() * x0_pred + (1 - alphas[target]).sqrt() * eps
    torch.testing.assert_close(x_t0.double(), sample, rtol=0, atol=1e-5)


def test_a_flow_model_takes_a_custom_grid_without_zero():
    pipe, x = built(make_sd3_components(0)), random_images(1)
    custom = pipe.edit(x, timesteps=[600, 300, 100], **PT)
    default = pipe.edit(x, t0=600, num_inversion_steps=3, num_inference_steps=3, **PT)  # flow_timesteps: 200, 400, 600
    assert custom.timesteps == [600, 300, 100] and default.timesteps == [600, 400, 200]
    assert torch.isfinite(custom.images).all()
    with pytest.raises(ValueError, match=r"`timesteps` must lie in \[1, 999\]"):
        pipe.edit(x, timesteps=[0, 300], **PT)


@pytest.mark.parametrize(
    "timesteps, error, match",
    [
        ([100, 100, 300], ValueError, "strictly increasing"),
        ([0, 300, 1000], ValueError, r"must lie in \[0, 999\]"),
        ([], ValueError, "must not be empty"),
        ([0, 1.5], TypeError, "timesteps"),
        ("0,300", TypeError, "list of integers"),
    ],
)
def test_timesteps_errors(timesteps, error, match):
    pipe, x = pixel_pipe(), random_images(1)
    with pytest.raises(error, match=match):
        pipe.edit(x, timesteps=timesteps, **PT)


def test_sigmas_are_refused_with_the_way_out():
    pipe = built(make_sd3_components(0))
    with pytest.raises(ValueError, match="`sigmas` is not supported.*`timesteps`"):
        pipe.edit(random_images(1), sigmas=[1.0, 0.5], **PT)


# ---- prompt_embeds ----------------------------------------------------------------------------------------------


def test_prompt_embeds_equal_the_prompt_stable_diffusion():
    pipe, x = built(make_sd_components(0)), random_images(2)
    embeds = pipe.encode_prompt("a cat", 1)
    by_embeds = pipe.edit(x, prompt_embeds=embeds, t0=300, num_inversion_steps=3, num_inference_steps=3, **PT)
    by_prompt = pipe.edit(x, prompt="a cat", t0=300, num_inversion_steps=3, num_inference_steps=3, **PT)
    torch.testing.assert_close(by_embeds.images, by_prompt.images, rtol=0, atol=0)
    inverted = pipe.invert(x, prompt_embeds=embeds.expand(2, -1, -1), t0=300, num_inversion_steps=3)
    torch.testing.assert_close(inverted.x_t0, by_prompt.x_t0, rtol=0, atol=0)


@pytest.mark.parametrize(
    "make", [make_sdxl_components, make_sd3_components, make_flux_components], ids=["sdxl", "sd3", "flux"]
)
def test_prompt_and_pooled_embeds_equal_the_prompt(make):
    pipe, x = built(make(0)), random_images(1)
    condition = pipe.encode_prompt("a dog", 1)
    pooled_key = "text_embeds" if "text_embeds" in condition else "pooled_projections"
    kwargs = dict(t0=300, num_inversion_steps=3, num_inference_steps=3, **PT)
    by_embeds = pipe.edit(
        x, prompt_embeds=condition["encoder_hidden_states"], pooled_prompt_embeds=condition[pooled_key], **kwargs
    )
    torch.testing.assert_close(by_embeds.images, pipe.edit(x, prompt="a dog", **kwargs).images, rtol=0, atol=0)
    with pytest.raises(ValueError, match="needs `pooled_prompt_embeds`"):
        pipe.edit(x, prompt_embeds=condition["encoder_hidden_states"], **kwargs)
    with pytest.raises(ValueError, match="needs `negative_pooled_prompt_embeds` with `negative_prompt_embeds`"):
        pipe.edit(x, prompt="a dog", guidance_scale=2.0, negative_prompt_embeds=condition["encoder_hidden_states"],
                  **kwargs)  # fmt: skip


def test_negative_prompt_embeds_equal_the_negative_prompt():
    pipe, x = built(make_sd_components(0)), random_images(1)
    kwargs = dict(prompt="a cat", guidance_scale=3.0, t0=300, num_inversion_steps=3, num_inference_steps=3, **PT)
    negative = pipe.encode_prompt("blurry", 1)
    by_embeds = pipe.edit(x, negative_prompt_embeds=negative, **kwargs).images
    by_prompt = pipe.edit(x, negative_prompt="blurry", **kwargs).images
    torch.testing.assert_close(by_embeds, by_prompt, rtol=0, atol=0)
    assert float((by_prompt - pipe.edit(x, **kwargs).images).abs().max()) > 1e-4  # the negative side matters


def test_prompt_embeds_errors():
    sd, x = built(make_sd_components(0)), random_images(2)
    embeds = sd.encode_prompt("a cat", 1)
    with pytest.raises(ValueError, match="`prompt` or `prompt_embeds`, not both"):
        sd.edit(x, prompt="a cat", prompt_embeds=embeds)
    with pytest.raises(ValueError, match="`pooled_prompt_embeds` needs `prompt_embeds`"):
        sd.edit(x, pooled_prompt_embeds=embeds[:, 0])
    with pytest.raises(ValueError, match="not used by a"):
        sd.edit(x, prompt_embeds=embeds, pooled_prompt_embeds=embeds[:, 0])
    with pytest.raises(ValueError, match=r"`prompt_embeds` must have shape \('batch', 'tokens', 32\)"):
        sd.edit(x, prompt_embeds=torch.zeros(1, 4, 5))
    with pytest.raises(ValueError, match="batch 3 for 2 images"):
        sd.edit(x, prompt_embeds=embeds.expand(3, -1, -1))
    with pytest.raises(TypeError, match="`prompt_embeds` must be a tensor"):
        sd.edit(x, prompt_embeds=[[0.0]])
    with pytest.raises(ValueError, match="NaN"):
        sd.edit(x, prompt_embeds=torch.full_like(embeds, float("nan")))
    with pytest.raises(ValueError, match="needs `guidance_scale` > 1"):
        sd.edit(x, negative_prompt_embeds=embeds)
    with pytest.raises(ValueError, match="unconditional"):
        pixel_pipe().edit(random_images(1), prompt_embeds=embeds)


# ---- image latents as `image` -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make", [make_sd_components, make_sd3_components, make_flux_components], ids=["sd", "sd3", "flux"]
)
def test_image_latents_as_image_equal_the_image(make):
    pipe, x = built(make(0)), random_images(2)
    latents = pipe.encode_image(pipe.prepare_image(x))
    kwargs = dict(t0=300, num_inversion_steps=3, num_inference_steps=3)
    from_latents = pipe.edit(latents, **kwargs, **PT)
    torch.testing.assert_close(from_latents.images, pipe.edit(x, **kwargs, **PT).images, rtol=0, atol=0)
    inverted = pipe.invert(latents, **{k: v for k, v in kwargs.items() if k != "num_inference_steps"})
    torch.testing.assert_close(inverted.image, pipe.decode_latents(latents).clamp(-1, 1), rtol=0, atol=0)
    noisy = pipe.edit(latents, encoding="noise", num_images_per_prompt=2, generator=torch.Generator().manual_seed(0),
                      **kwargs, **PT)  # fmt: skip
    assert noisy.images.shape == (4, 3, *x.shape[-2:])


def test_what_reads_as_latents():
    sd, ldm_like = built(make_sd_components(0)), pixel_pipe()
    assert sd.image_latents(torch.zeros(1, 4, 8, 8)) is not None
    assert sd.image_latents(torch.zeros(1, 3, 8, 8)) is None  # a small image
    assert sd.image_latents(torch.zeros(1, 4, 16, 16)) is None  # an RGBA image at the working size
    assert ldm_like.image_latents(torch.zeros(1, 3, 16, 16)) is None  # pixel space: always an image
    with pytest.raises(ValueError, match="NaN"):
        sd.edit(torch.full((1, 4, 8, 8), float("nan")))

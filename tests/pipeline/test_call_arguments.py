"""Arguments diffusers users pass to a pipeline call (issue 29, items 2 and 7): the LoRA scale through
``cross_attention_kwargs`` (and diffusers' other names for it), one prompt per image, and ``negative_prompt``."""

from __future__ import annotations

import pytest
import torch
from conftest import adapted_pixel_pipeline, make_sd_components, random_images

from diffusionclip_pipeline import DiffusionCLIPPipeline
from diffusionclip_pipeline.loaders import lora_state

KWARGS = dict(t0=400, num_inversion_steps=3, num_inference_steps=3, output_type="pt")


def pixel_pipe():
    return adapted_pixel_pipeline("smile")


def sd_pipe():
    pipe = DiffusionCLIPPipeline(**make_sd_components(0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("name", ["cross_attention_kwargs", "attention_kwargs", "joint_attention_kwargs"])
def test_the_lora_scale_equals_scaled_adapter_weights(name):
    pipe, x = pixel_pipe(), random_images(2)
    scaled = pipe.edit(x, **KWARGS, **{name: {"scale": 0.5}}).images
    assert lora_state.adapter_weights(pipe.unet) == {"smile": 1.0}  # restored after the call
    pipe.set_adapters(["smile"], [0.5])
    torch.testing.assert_close(scaled, pipe.edit(x, **KWARGS).images, rtol=0, atol=1e-6)
    pipe.set_adapters(["smile"], [1.0])
    assert float((scaled - pipe.edit(x, **KWARGS).images).abs().max()) > 1e-4


def test_a_lora_scale_of_zero_is_the_reconstruction():
    pipe, x = pixel_pipe(), random_images(1)
    zero = pipe.edit(x, **KWARGS, cross_attention_kwargs={"scale": 0.0}).images
    pipe.disable_lora()
    torch.testing.assert_close(zero, pipe.edit(x, **KWARGS).images, rtol=0, atol=0)


def test_lora_scale_errors():
    pipe, x = pixel_pipe(), random_images(1)
    with pytest.raises(ValueError, match="only 'scale'"):
        pipe.edit(x, **KWARGS, cross_attention_kwargs={"scale": 1.0, "ip_adapter_masks": None})
    with pytest.raises(TypeError, match="must be a dict"):
        pipe.edit(x, **KWARGS, cross_attention_kwargs=0.5)
    with pytest.raises(TypeError, match="the same argument"):
        pipe.edit(x, **KWARGS, cross_attention_kwargs={"scale": 1}, attention_kwargs={"scale": 1})
    with pytest.raises(ValueError, match="scale"):
        pipe.edit(x, **KWARGS, cross_attention_kwargs={"scale": float("nan")})
    pipe.fuse_lora()
    with pytest.raises(ValueError, match="fused adapters"):
        pipe.edit(latents=torch.zeros(1, 3, 16, 16), **KWARGS, cross_attention_kwargs={"scale": 0.5})


def test_one_prompt_per_image_equals_editing_each_alone():
    pipe, x = sd_pipe(), random_images(2)
    both = pipe.edit(x, **KWARGS, prompt=["a red circle", "a blue square"]).images
    first = pipe.edit(x[:1], **KWARGS, prompt="a red circle").images
    second = pipe.edit(x[1:], **KWARGS, prompt="a blue square").images
    torch.testing.assert_close(both, torch.cat([first, second]), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="list of 3 prompts for 2 images"):
        pipe.edit(x, **KWARGS, prompt=["a", "b", "c"])


def test_prompts_follow_num_images_per_prompt():
    pipe, x = sd_pipe(), random_images(2)
    kwargs = dict(KWARGS, encoding="noise", num_images_per_prompt=2)
    out = pipe.edit(x, **kwargs, prompt=["a red circle", "a blue square"], generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (4, 3, 16, 16)


def test_negative_prompt_is_the_unconditional_side_of_guidance():
    pipe, x = sd_pipe(), random_images(1)
    kwargs = dict(KWARGS, prompt="a red circle", guidance_scale=3.0)
    default = pipe.edit(x, **kwargs).images
    torch.testing.assert_close(pipe.edit(x, **kwargs, negative_prompt="").images, default, rtol=0, atol=0)
    assert float((pipe.edit(x, **kwargs, negative_prompt="blue").images - default).abs().max()) > 1e-5
    with pytest.raises(ValueError, match="needs `guidance_scale` > 1"):
        pipe.edit(x, **KWARGS, negative_prompt="blue")

"""diffusers' generic pipeline contracts (issue 29): construction does not change the caller's objects and
`from_pipe` works both ways; the call is the implementation (its signature is visible); step callbacks, including
diffusers' own `SDCFGCutoffCallback`, `num_timesteps`, `guidance_scale` and `interrupt`."""

import inspect

import pytest
import torch
from conftest import add_random_adapter, make_pipeline, make_scheduler, make_sd_components, make_unet, random_images
from diffusers import DDPMPipeline, UNet2DModel
from diffusers.callbacks import SDCFGCutoffCallback

from diffusionclip_pipeline import DiffusionCLIPPipeline

EDIT = {"t0": 200, "num_inversion_steps": 3, "num_inference_steps": 3, "output_type": "pt"}


def test_from_pipe_leaves_the_stock_pipeline_as_it_was_and_works_both_ways():
    ddpm = DDPMPipeline(unet=make_unet(), scheduler=make_scheduler())
    ddpm.set_progress_bar_config(disable=True)
    before = ddpm(batch_size=1, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np")
    ours = DiffusionCLIPPipeline.from_pipe(ddpm)
    add_random_adapter(ours, "a")
    assert type(ddpm.unet) is UNet2DModel and not hasattr(ddpm.unet, "peft_config")
    after = ddpm(batch_size=1, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np")
    assert (before.images == after.images).all()  # the adapter lives in our view of the UNet only
    assert ours.unet.conv_in.weight.data_ptr() == ddpm.unet.conv_in.weight.data_ptr()  # shared weights, no copy
    back = DDPMPipeline.from_pipe(DiffusionCLIPPipeline.from_pipe(ddpm))
    back.set_progress_bar_config(disable=True)
    assert back(batch_size=1, num_inference_steps=2, output_type="np").images.shape == (1, 16, 16, 3)


def test_construction_does_not_change_the_given_unet():
    unet = make_unet()
    DiffusionCLIPPipeline(unet=unet, scheduler=make_scheduler())
    assert type(unet) is UNet2DModel


def test_the_call_is_the_implementation_with_a_visible_signature():
    parameters = inspect.signature(DiffusionCLIPPipeline.__call__).parameters
    assert list(parameters)[1:4] == ["image", "t0", "num_inversion_steps"]
    assert DiffusionCLIPPipeline.edit is DiffusionCLIPPipeline.__call__
    assert "callback_on_step_end" in parameters and "Examples:" in DiffusionCLIPPipeline.__call__.__doc__


def test_step_callbacks_see_the_declared_tensors_and_the_step_count():
    pipe = make_pipeline(with_clip=False)
    seen = []

    def callback(p, i, t, kwargs):
        seen.append((i, t, sorted(kwargs), p.num_timesteps))
        return kwargs

    pipe(random_images(1), callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents"], **EDIT)
    assert [s[:3] for s in seen] == [(0, 200, ["latents"]), (1, 100, ["latents"]), (2, 0, ["latents"])]
    assert {s[3] for s in seen} == {3} and DiffusionCLIPPipeline._callback_tensor_inputs[0] == "latents"
    with pytest.raises(ValueError, match="`callback_on_step_end_tensor_inputs` may hold"):
        pipe(random_images(1), callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["noise"], **EDIT)


def test_interrupt_skips_the_remaining_steps():
    pipe = make_pipeline(with_clip=False)
    add_random_adapter(pipe, "a")
    first = {}

    def stop(p, i, t, kwargs):
        first["latents"] = kwargs["latents"].clone()
        p._interrupt = True
        return kwargs

    out = pipe(random_images(1), callback_on_step_end=stop, **EDIT)
    torch.testing.assert_close(out.images, (first["latents"] / 2 + 0.5).clamp(0, 1))
    assert pipe.interrupt  # until the next call resets it
    pipe(random_images(1), **EDIT)
    assert not pipe.interrupt


def test_diffusers_cfg_cutoff_callback_turns_guidance_off_after_its_step():
    pipe = DiffusionCLIPPipeline(**make_sd_components())
    pipe.set_progress_bar_config(disable=True)
    add_random_adapter(pipe, "a")
    x = random_images(1, size=16, seed=2)
    latents = pipe.invert(x, t0=200, num_inversion_steps=3, prompt="red circle").x_t0
    settings = dict(latents=latents, t0=200, num_inference_steps=3, prompt="red circle", output_type="pt")
    guided = pipe(guidance_scale=3.0, **settings).images
    plain = pipe(guidance_scale=1.0, **settings).images
    # cut off after the last step: nothing changes; after the first: between the two
    last = pipe(
        guidance_scale=3.0,
        callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=2),
        **settings,
    ).images
    torch.testing.assert_close(last, guided, atol=0, rtol=0)
    early = pipe(
        guidance_scale=3.0,
        callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=0),
        **settings,
    ).images
    assert pipe.guidance_scale == 0.0
    assert not torch.equal(early, guided) and not torch.equal(early, plain)


@pytest.mark.parametrize("offload", ["model", "group"])
def test_cpu_offloading_gives_the_same_edit(offload):
    """Model and group offload (accelerate / diffusers hooks; on CPU both devices are the CPU, which still runs the
    hooks and the device handling). Sequential offload fails inside accelerate for transformers 5's CLIP text
    encoder, for the stock StableDiffusionPipeline too (docs/design.md)."""
    pipe = DiffusionCLIPPipeline(**make_sd_components())
    pipe.set_progress_bar_config(disable=True)
    add_random_adapter(pipe, "a")
    x = random_images(1, size=16, seed=4)
    settings = dict(prompt="red circle", t0=100, num_inversion_steps=2, num_inference_steps=2, output_type="pt")
    reference = pipe(x, **settings).images
    if offload == "model":
        pipe.enable_model_cpu_offload(device="cpu")
    else:
        cpu = torch.device("cpu")
        pipe.enable_group_offload(onload_device=cpu, offload_device=cpu, offload_type="leaf_level")
    torch.testing.assert_close(pipe(x, **settings).images, reference, atol=0, rtol=0)


def test_output_type_latent_returns_the_undecoded_result():
    pipe = DiffusionCLIPPipeline(**make_sd_components())
    pipe.set_progress_bar_config(disable=True)
    x = random_images(1, size=16, seed=5)
    last = {}

    def grab(p, i, t, kwargs):
        last["latents"] = kwargs["latents"]
        return kwargs

    latents = pipe(x, callback_on_step_end=grab, **{**EDIT, "output_type": "latent"}).images
    assert latents.shape == (1, 4, 8, 8)
    torch.testing.assert_close(latents, last["latents"], atol=0, rtol=0)
    decoded = pipe(x, **EDIT).images
    torch.testing.assert_close(decoded, (pipe.decode_latents(latents) / 2 + 0.5).clamp(0, 1), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="`output_type`='latent' is for the edit's call"):
        pipe.translate(x, t0=100, n_iter=1, num_denoise_steps=1, output_type="latent")


def test_several_edits_per_image_where_the_edit_is_stochastic():
    pipe = make_pipeline(with_clip=False)
    add_random_adapter(pipe, "a")
    x = random_images(2, seed=6)
    settings = {**EDIT, "encoding": "noise", "num_images_per_prompt": 3}
    out = pipe(x, generator=torch.Generator().manual_seed(0), **settings).images
    assert out.shape == (6, 3, 16, 16)
    assert not torch.equal(out[0], out[1])  # other noise, another edit
    again = pipe(x, generator=torch.Generator().manual_seed(0), **settings).images
    torch.testing.assert_close(out, again, atol=0, rtol=0)  # reproducible under a seed
    with pytest.raises(ValueError, match="`num_images_per_prompt`=2 would give 2 identical edits"):
        pipe(x, num_images_per_prompt=2, **EDIT)
    with pytest.raises(ValueError, match="`num_images_per_prompt` must be a positive integer"):
        pipe(x, num_images_per_prompt=0, **EDIT)

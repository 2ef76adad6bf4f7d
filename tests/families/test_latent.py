"""Latent models: LDM (`vqvae`) and Stable Diffusion (`vae` + text encoder) layouts, saved by the stock pipelines."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import (
    add_random_adapter,
    make_clip,
    make_conditional_unet,
    make_ldm_components,
    make_sd_components,
    make_text_encoder,
    make_tokenizer,
    make_unet,
    make_vae,
    random_images,
)
from diffusers import DDIMInverseScheduler, DDIMScheduler, LDMPipeline, StableDiffusionPipeline
from safetensors.torch import save_file

from diffusionclip_pipeline import DiffusionCLIPPipeline
from diffusionclip_pipeline.loaders import lora_state
from diffusionclip_pipeline.scheduling_ddim_grid import GridDDIMInverseScheduler, GridDDIMScheduler

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/, where conftest.py is
EDIT = dict(t0=100, num_inversion_steps=3, num_inference_steps=3, output_type="pt")


def clip_kwargs():
    tokenizer = make_tokenizer()
    return dict(clip_model=make_clip(tokenizer, image_size=16), clip_tokenizer=tokenizer)


def stock_sd(tmp_path, **kwargs):
    sd = StableDiffusionPipeline(
        **make_sd_components(**kwargs), safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    sd.save_pretrained(tmp_path / "sd")
    return tmp_path / "sd"


def stock_ldm(tmp_path):
    LDMPipeline(**make_ldm_components()).save_pretrained(tmp_path / "ldm")
    return tmp_path / "ldm"


def load(path):
    pipe = DiffusionCLIPPipeline.from_pretrained(path, **clip_kwargs())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def final_latents(pipe, **kwargs):
    """The generation loop's last latents (before decoding), through the step callback."""
    captured = {}

    def grab(p, i, t, kw):
        captured["x"] = kw["latents"]

    pipe.edit(callback_on_step_end=grab, **kwargs)
    return captured["x"]


@pytest.mark.parametrize("layout", ["ldm", "sd"])
def test_stock_folders_load_and_edit_in_latent_space(tmp_path, layout):
    pipe = load(stock_ldm(tmp_path) if layout == "ldm" else stock_sd(tmp_path))
    assert (pipe.vqvae is not None) == (layout == "ldm") and (pipe.vae is not None) == (layout == "sd")
    assert pipe.vae_scale_factor == 2 and pipe.resolution == 16
    x = random_images(2, size=16, seed=1)
    out = pipe.edit(x, **EDIT)
    channels = 3 if layout == "ldm" else 4
    assert out.images.shape == (2, 3, 16, 16) and out.x_t0.shape == (2, channels, 8, 8)
    assert torch.isfinite(out.images).all()
    # a 64 px input is centre-cropped and resized to the pipeline's 16 px, as for pixel models
    assert pipe.edit(random_images(1, size=64), **EDIT).images.shape == (1, 3, 16, 16)


@pytest.mark.parametrize("layout", ["ldm", "sd"])
def test_latent_round_trip_is_exact_with_fixed_point_inversion(tmp_path, layout):
    """The DDIM round trip in latent space (invert, regenerate with the same 40-step grid, before decoding).

    These random tiny models' latents are small (mean |z| 0.07 LDM, 0.04 SD) against eps ~ 1, so plain inversion is
    far off (measured mean |error| 0.099 / 0.116 at 40 steps); with 4 fixed-point iterations per step it was
    1.9e-4 / 8.3e-4. Tolerance: 2e-3.
    """
    pipe = load(stock_ldm(tmp_path) if layout == "ldm" else stock_sd(tmp_path))
    x = random_images(2, size=16, seed=2)
    with torch.no_grad():
        z0 = pipe.encode_image(pipe.prepare_image(x))
    errors = []
    for k in (0, 4):
        x_t0 = pipe.invert(x, t0=500, num_inversion_steps=40, num_fixed_point_iterations=k).x_t0
        z = final_latents(pipe, latents=x_t0, t0=500, num_inference_steps=40, output_type="pt")
        errors.append((z - z0).abs().mean().item())
    assert errors[1] < 2e-3 and errors[0] > 10 * errors[1]


def test_autoencoder_encoding_is_the_scaled_posterior_mean(tmp_path):
    pipe = load(stock_sd(tmp_path))
    x = random_images(1, size=16, seed=3)
    with torch.no_grad():
        expected = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
        torch.testing.assert_close(pipe.encode_image(x), expected, atol=0, rtol=0)
        torch.testing.assert_close(pipe.decode_latents(expected), pipe.vae.decode(expected / 0.18215).sample)
    ldm = load(stock_ldm(tmp_path))
    with torch.no_grad():
        z = ldm.encode_image(x)
        expected = ldm.vqvae.encode(x).latents * ldm.vqvae.config.scaling_factor
        torch.testing.assert_close(z, expected, atol=0, rtol=0)
        # decoding as LDMPipeline does: divide by the scaling factor, quantise, decode
        torch.testing.assert_close(ldm.decode_latents(z), ldm.vqvae.decode(z / ldm.vqvae.config.scaling_factor).sample)


def test_prompt_conditions_the_sd_unet_and_guidance_is_checked(tmp_path):
    pipe = load(stock_sd(tmp_path))
    x = random_images(1, size=16, seed=4)
    empty = pipe.edit(x, **EDIT).images
    assert torch.equal(empty, pipe.edit(x, prompt="", **EDIT).images)
    prompted = pipe.edit(x, prompt="red circle", **EDIT).images
    assert not torch.equal(empty, prompted)
    guided = pipe.edit(x, prompt="red circle", guidance_scale=3.0, **EDIT).images
    assert not torch.equal(guided, prompted) and torch.isfinite(guided).all()
    with pytest.raises(ValueError, match="`guidance_scale`"):
        pipe.edit(x, guidance_scale=3.0, **EDIT)
    with pytest.raises(ValueError, match="`guidance_scale`"):
        pipe.edit(x, prompt="red circle", guidance_scale=0.5, **EDIT)
    with pytest.raises(TypeError, match="`prompt`"):
        pipe.edit(x, prompt=3, **EDIT)
    ldm = load(stock_ldm(tmp_path))
    with pytest.raises(ValueError, match="`prompt` needs a text-conditioned UNet"):
        ldm.edit(x, prompt="red circle", **EDIT)


def test_from_pipe_and_save_pretrained_round_trip(tmp_path):
    components = make_sd_components()
    sd = StableDiffusionPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe = DiffusionCLIPPipeline.from_pipe(sd, **clip_kwargs())
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet is sd.unet and pipe.vae is sd.vae and pipe.text_encoder is sd.text_encoder
    add_random_adapter(pipe, "a", targets=("to_q", "to_v", "conv1"))
    x = random_images(1, size=16, seed=5)
    edited = pipe.edit(x, **EDIT).images
    pipe.save_pretrained(tmp_path / "ours")
    index = json.loads((tmp_path / "ours" / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"] and index["vae"] == ["diffusers", "AutoencoderKL"]
    loaded = load(tmp_path / "ours")
    assert loaded.lora_adapters == ["a"] and torch.equal(loaded.edit(x, **EDIT).images, edited)
    ldm = DiffusionCLIPPipeline.from_pipe(LDMPipeline(**make_ldm_components()), **clip_kwargs())
    assert ldm.vqvae is not None


def test_sd_adapter_loads_in_the_stock_pipeline_with_identical_unet_outputs(tmp_path):
    folder = stock_sd(tmp_path)
    pipe = load(folder)
    add_random_adapter(pipe, "smile", rank=2, alpha=4.0, targets=("to_q", "to_k", "to_v", "to_out.0", "conv1"))
    pipe.save_lora_weights(tmp_path / "smile")
    stock = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    stock.load_lora_weights(tmp_path / "smile", adapter_name="smile")
    assert stock.unet.peft_config["smile"].lora_alpha == 4.0  # the metadata restored alpha (not alpha = r)
    sample = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    hidden = pipe.encode_prompt("red circle", 2)
    with torch.no_grad():
        ours = pipe.unet(sample, torch.tensor(50), encoder_hidden_states=hidden).sample
        theirs = stock.unet(sample, torch.tensor(50), encoder_hidden_states=hidden).sample
        base = stock.unet(sample, torch.tensor(50), encoder_hidden_states=hidden)
    assert (ours - theirs).abs().max() <= 1e-6
    stock.disable_lora()
    with torch.no_grad():
        base = stock.unet(sample, torch.tensor(50), encoder_hidden_states=hidden).sample
    assert (ours - base).abs().max() > 1e-3  # the adapter does something


def test_sd_adapter_reproduces_edits_in_a_fresh_process(tmp_path):
    folder = stock_sd(tmp_path)
    pipe = load(folder)
    add_random_adapter(pipe, "a", targets=("to_q", "to_v", "conv1"))
    x = random_images(1, size=16, seed=6)
    edited = pipe.edit(x, prompt="red circle", **EDIT).images
    pipe.save_lora_weights(tmp_path / "a")
    save_file({"x": x, "edited": edited}, str(tmp_path / "expected.safetensors"))
    script = f"""
import sys, torch
sys.path[:0] = [{TESTS!r}, {os.path.join(TESTS, "families")!r}]
torch.set_num_threads(1)
from test_latent import load, EDIT
from safetensors.torch import load_file
expected = load_file({str(tmp_path / "expected.safetensors")!r})
pipe = load({str(folder)!r})
pipe.load_lora_weights({str(tmp_path / "a")!r})
out = pipe.edit(expected["x"], prompt="red circle", **EDIT).images
print("IDENTICAL" if torch.equal(out, expected["edited"]) else "DIFFERENT")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "IDENTICAL" in result.stdout


def test_components_that_cannot_work_together_are_refused(tmp_path):
    components = make_sd_components()
    scheduler = components["scheduler"]
    with pytest.raises(ValueError, match="`vae` makes 3-channel latents"):
        DiffusionCLIPPipeline(unet=components["unet"], scheduler=scheduler, vae=make_vae(latent_channels=3),
                              text_encoder=components["text_encoder"], tokenizer=components["tokenizer"])  # fmt: skip
    with pytest.raises(ValueError, match="pass its `text_encoder` and `tokenizer`"):
        DiffusionCLIPPipeline(unet=components["unet"], scheduler=scheduler, vae=components["vae"])
    with pytest.raises(ValueError, match="attends to"):
        DiffusionCLIPPipeline(
            unet=make_conditional_unet(cross_attention_dim=16), scheduler=scheduler, vae=components["vae"],
            text_encoder=components["text_encoder"], tokenizer=components["tokenizer"],
        )  # fmt: skip
    with pytest.raises(ValueError, match="at most one autoencoder"):
        DiffusionCLIPPipeline(
            unet=make_unet(8), scheduler=scheduler, vae=make_vae(), vqvae=make_ldm_components()["vqvae"]
        )
    with pytest.raises(ValueError, match="need a text-conditioned"):
        DiffusionCLIPPipeline(unet=make_unet(8), scheduler=scheduler, text_encoder=make_text_encoder(make_tokenizer()))
    with pytest.raises(TypeError, match="`vae` must be one of `AutoencoderKL`"):
        DiffusionCLIPPipeline(unet=make_unet(8), scheduler=scheduler, vae=make_ldm_components()["vqvae"])


def test_a_repository_of_an_unsupported_pipeline_is_refused_before_loading(tmp_path):
    """Kandinsky is not a family (SDXL, SD3 and Flux are: tests/families/test_sdxl.py, test_sd3.py, test_flux.py)."""
    folder = stock_sd(tmp_path)
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "KandinskyPipeline"
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="is a KandinskyPipeline repository"):
        DiffusionCLIPPipeline.from_pretrained(folder, **clip_kwargs())


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_our_step_math_matches_the_schedulers_for_every_prediction_type(prediction_type):
    generation = DDIMScheduler(clip_sample=False, prediction_type=prediction_type)
    inverse = DDIMInverseScheduler(clip_sample=False, prediction_type=prediction_type)
    ours, ours_inverse = (
        GridDDIMScheduler.from_config(generation.config),
        GridDDIMInverseScheduler.from_config(inverse.config),
    )
    for s in (generation, inverse):
        s.set_timesteps(20)
    ours.set_timesteps(timesteps=list(range(0, 1000, 50)))
    ours_inverse.set_timesteps(timesteps=list(range(0, 1000, 50)))
    g = torch.Generator().manual_seed(0)
    x, model_output = torch.randn(1, 3, 4, 4, generator=g), torch.randn(1, 3, 4, 4, generator=g)
    for t in generation.timesteps:
        stock, mine = generation.step(model_output, t, x), ours.step(model_output, t, x)
        assert torch.equal(stock.prev_sample, mine.prev_sample)
        assert torch.equal(stock.pred_original_sample, mine.pred_original_sample)
    for k, t in enumerate(inverse.timesteps):
        mine = ours_inverse.step(model_output, t, x).prev_sample
        assert torch.isfinite(mine).all()
        if k > 0 or prediction_type != "sample":  # diffusers divides by zero there (diffusers#10920); we do not
            assert torch.equal(inverse.step(model_output, t, x).prev_sample, mine)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_sd_pipeline_inverts_and_edits_with_other_prediction_types(tmp_path, prediction_type):
    pipe = load(stock_sd(tmp_path, prediction_type=prediction_type))
    assert pipe.scheduler.config.prediction_type == prediction_type
    x = random_images(1, size=16, seed=7)
    out = pipe.edit(x, num_fixed_point_iterations=2, **EDIT)
    assert torch.isfinite(out.images).all() and torch.isfinite(out.x_t0).all()


def test_latent_pipeline_edits_with_an_adapter(tmp_path):
    pipe = load(stock_ldm(tmp_path))
    x = random_images(1, size=16, seed=8)
    base = pipe.edit(x, **EDIT).images
    add_random_adapter(pipe, "a")
    assert lora_state.adapter_names(pipe.unet) == ["a"]
    assert not torch.equal(pipe.edit(x, **EDIT).images, base)
    assert torch.equal(pipe.edit(x, edit_strength=0.0, **EDIT).images, base)


# ---- fine-tuning through the decoder -------------------------------------------------------------------------

TINY = dict(t0=100, num_inversion_steps=2, num_train_steps=2, num_epochs=1, batch_size=2, learning_rate=1e-2)


def make_tiny_decoder(seed: int = 0):
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    return AutoencoderTiny(
        encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1),
        num_decoder_blocks=(1, 1), latent_channels=4,
    ).eval()  # fmt: skip


@pytest.mark.parametrize("layout", ["ldm", "sd"])
@pytest.mark.parametrize("scheme", ["efficient", "full_chain", "one_step"])
def test_one_fine_tuning_step_per_scheme_on_latent_models(tmp_path, layout, scheme):
    pipe = load(stock_ldm(tmp_path) if layout == "ldm" else stock_sd(tmp_path))
    autoencoder = pipe.autoencoder
    before = {k: v.clone() for k, v in autoencoder.state_dict().items()}
    flags = [p.requires_grad for p in autoencoder.parameters()]
    x = random_images(2, size=16, seed=9)
    base = pipe.edit(x, **EDIT).images
    out = pipe.finetune("red circle", "blue circle", images=x, scheme=scheme, **TINY)
    assert all(torch.isfinite(torch.tensor(out.loss_history)))
    assert not torch.equal(pipe.edit(x, **EDIT).images, base)
    # the autoencoder is a frozen part of the loss: unchanged, and its requires_grad flags as before
    assert all(torch.equal(before[k], v) for k, v in autoencoder.state_dict().items())
    assert [p.requires_grad for p in autoencoder.parameters()] == flags
    assert all(p.grad is None for p in autoencoder.parameters())


def get_adapter(pipe, name="default"):
    from peft.utils import get_peft_model_state_dict

    return {k: v.clone() for k, v in get_peft_model_state_dict(pipe.unet, adapter_name=name).items()}


def test_latent_l1_spaces_tiny_decoder_prompt_and_decoder_checkpointing(tmp_path):
    folder = stock_sd(tmp_path)
    images = random_images(2, size=16, seed=10)

    def adapter_after(**kwargs):
        pipe = load(folder)
        pipe.finetune("red circle", "blue circle", images=images, **TINY, **kwargs)
        return get_adapter(pipe)

    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in a)

    pixel = adapter_after()
    assert same(pixel, adapter_after(decoder_gradient_checkpointing=True))  # recomputation, same gradients
    assert not same(pixel, adapter_after(l1_space="latent"))
    assert not same(pixel, adapter_after(conditioning_prompt="red circle"))
    assert not same(pixel, adapter_after(loss_vae=make_tiny_decoder()))
    ldm = load(stock_ldm(tmp_path))
    with pytest.raises(ValueError, match="`conditioning_prompt` needs a text-conditioned UNet"):
        ldm.finetune("red circle", "blue circle", images=images, conditioning_prompt="red circle", **TINY)
    with pytest.raises(ValueError, match="`l1_space`"):
        ldm.finetune("red circle", "blue circle", images=images, l1_space="both", **TINY)
    assert ldm.lora_adapters == []

"""SDXL: folders saved by the stock `StableDiffusionXLPipeline` load, invert, edit and fine-tune through the family
protocol; the conditioning is the stock pipeline's; adapters load in the stock pipeline with identical UNet outputs."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import add_random_adapter, make_clip, make_sd_components, make_sdxl_components, make_tokenizer
from diffusers import StableDiffusionXLPipeline

from diffusionclip_pipeline import DiffusionCLIPPipeline
from diffusionclip_pipeline.families import StableDiffusionXLFamily

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EDIT = dict(t0=100, num_inversion_steps=3, num_inference_steps=3, output_type="pt")
TINY = dict(num_epochs=1, t0=100, num_inversion_steps=2, num_train_steps=2, batch_size=2)


def stock_sdxl(tmp_path, **components):
    stock = StableDiffusionXLPipeline(**{**make_sdxl_components(), **components})
    stock.save_pretrained(tmp_path / "sdxl")
    return tmp_path / "sdxl"


def load(path, **kwargs):
    tokenizer = make_tokenizer()
    pipe = DiffusionCLIPPipeline.from_pretrained(
        path, clip_model=make_clip(tokenizer, image_size=16), clip_tokenizer=tokenizer, **kwargs
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def images(n=2, seed=0):
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_a_stock_sdxl_folder_loads_edits_and_saves(tmp_path):
    pipe = load(stock_sdxl(tmp_path))
    assert type(pipe.family) is StableDiffusionXLFamily and pipe.resolution == 16
    assert pipe.config.force_zeros_for_empty_prompt is True
    out = pipe.edit(images(), **EDIT)
    assert out.images.shape == (2, 3, 16, 16) and out.x_t0.shape == (2, 4, 8, 8)
    pipe.save_pretrained(tmp_path / "ours")
    again = load(tmp_path / "ours")
    assert type(again.family) is StableDiffusionXLFamily
    torch.testing.assert_close(again.edit(images(), **EDIT).images, out.images, atol=0, rtol=0)


def test_from_pipe_takes_a_stock_sdxl_pipeline():
    stock = StableDiffusionXLPipeline(**make_sdxl_components())
    pipe = DiffusionCLIPPipeline.from_pipe(stock)
    assert type(pipe.family) is StableDiffusionXLFamily and pipe.text_encoder_2 is stock.text_encoder_2


def test_conditioning_is_the_stock_pipelines():
    components = make_sdxl_components()
    stock = StableDiffusionXLPipeline(**components)
    pipe = DiffusionCLIPPipeline(**components)
    embeds, _, pooled, _ = stock.encode_prompt("a red circle", device="cpu", do_classifier_free_guidance=False)
    condition = pipe.encode_prompt("a red circle", 2, original_size=(32, 24), crops_coords_top_left=(4, 0))
    torch.testing.assert_close(condition["encoder_hidden_states"], embeds.expand(2, -1, -1))
    torch.testing.assert_close(condition["text_embeds"], pooled.expand(2, -1))
    projection = components["text_encoder_2"].config.projection_dim
    time_ids = stock._get_add_time_ids(
        (32, 24), (4, 0), (16, 16), torch.float32, text_encoder_projection_dim=projection
    )
    torch.testing.assert_close(condition["time_ids"], time_ids.expand(2, -1))
    # the unconditional input of guidance: zeros with force_zeros_for_empty_prompt, as the stock pipeline's
    negative = pipe.family.encode_negative(1)
    assert not negative["encoder_hidden_states"].any() and not negative["text_embeds"].any()
    kept = DiffusionCLIPPipeline(**components, force_zeros_for_empty_prompt=False).family.encode_negative(1)
    torch.testing.assert_close(kept["encoder_hidden_states"], pipe.encode_prompt("", 1)["encoder_hidden_states"])


def test_inversion_and_regeneration_against_an_independent_ddim_loop():
    """DDIM eq. (12) both ways, written out here with the stock UNet call and conditioning."""
    components = make_sdxl_components()
    pipe = DiffusionCLIPPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    x = images(1, seed=3)
    unet, alphas = components["unet"], pipe.scheduler.alphas_cumprod
    condition = pipe.encode_prompt(None, 1)
    added = {"text_embeds": condition["text_embeds"], "time_ids": condition["time_ids"]}

    def eps(z, t):
        return unet(z, torch.tensor(t), encoder_hidden_states=condition["encoder_hidden_states"],
                    added_cond_kwargs=added).sample  # fmt: skip

    def ddim(z, e, a_from, a_to):
        return a_to.sqrt() * (z - (1 - a_from).sqrt() * e) / a_from.sqrt() + (1 - a_to).sqrt() * e

    grid = [0, 100, 200]  # int(linspace(0, 200, 3))
    with torch.no_grad():
        vae = components["vae"]
        z = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
        levels = [torch.tensor(1.0), *[alphas[t] for t in grid]]  # the clean image, then the grid
        for k, source in enumerate([0, *grid[:-1]]):  # the UNet at the source level (the clean image: t = 0)
            z = ddim(z, eps(z, source), levels[k], levels[k + 1])
        x_t0 = pipe.invert(x, t0=200, num_inversion_steps=3).x_t0
        torch.testing.assert_close(x_t0, z, atol=1e-5, rtol=1e-4)
        for k in reversed(range(len(grid))):  # generation: the UNet at the upper level
            z = ddim(z, eps(z, grid[k]), levels[k + 1], levels[k])
        expected = vae.decode(z / vae.config.scaling_factor).sample
    edited = pipe.edit(latents=x_t0, t0=200, num_inference_steps=3, output_type="pt").images
    torch.testing.assert_close(edited, (expected / 2 + 0.5).clamp(0, 1), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("scheme", ["efficient", "full_chain", "one_step"])
def test_one_fine_tuning_step_per_scheme(tmp_path, scheme):
    pipe = load(stock_sdxl(tmp_path))
    x = images(2, seed=4)
    base = pipe.edit(x, **EDIT).images
    out = pipe.finetune("red circle", "blue circle", images=x, scheme=scheme, **TINY)
    assert all(torch.isfinite(torch.tensor(out.loss_history)))
    assert not torch.equal(pipe.edit(x, **EDIT).images, base)


def test_an_adapter_loads_in_the_stock_sdxl_pipeline_with_identical_unet_outputs(tmp_path):
    folder = stock_sdxl(tmp_path)
    pipe = load(folder)
    add_random_adapter(pipe, "smile", rank=2, alpha=4.0, targets=("to_q", "to_k", "to_v", "to_out.0", "conv1"))
    pipe.save_lora_weights(tmp_path / "smile")
    stock = StableDiffusionXLPipeline.from_pretrained(folder)
    stock.load_lora_weights(tmp_path / "smile", adapter_name="smile")
    assert stock.unet.peft_config["smile"].lora_alpha == 4.0
    condition = pipe.encode_prompt("red circle", 2)
    sample = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = pipe.family.predict(pipe.unet, sample, 50, condition)
        theirs = pipe.family.predict(stock.unet, sample, 50, condition)
        stock.disable_lora()
        base = pipe.family.predict(stock.unet, sample, 50, condition)
    assert (ours - theirs).abs().max() <= 1e-5
    assert (ours - base).abs().max() > 1e-3  # the adapter does something


def test_an_sdxl_lora_saved_by_diffusers_loads_into_ours(tmp_path):
    """As diffusers' SDXL LoRA training script saves one: `save_lora_weights(dir, unet_lora_layers=...)` with the
    adapter's LoraConfig as metadata."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    folder = stock_sdxl(tmp_path)
    stock = StableDiffusionXLPipeline.from_pretrained(folder)
    config = LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"], init_lora_weights="gaussian")
    torch.manual_seed(0)
    stock.unet.add_adapter(config)
    layers = get_peft_model_state_dict(stock.unet)
    StableDiffusionXLPipeline.save_lora_weights(
        tmp_path / "trained", unet_lora_layers=layers, unet_lora_adapter_metadata=config.to_dict()
    )
    pipe = load(folder)
    name = pipe.load_lora_weights(tmp_path / "trained")
    condition = pipe.encode_prompt(None, 1)
    sample = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = pipe.family.predict(pipe.unet, sample, 30, condition)
        theirs = pipe.family.predict(stock.unet, sample, 30, condition)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert pipe.get_active_adapters() == [name]


def test_a_saved_adapter_reproduces_edits_bit_for_bit_in_a_fresh_process(tmp_path):
    folder = stock_sdxl(tmp_path)
    pipe = load(folder)
    add_random_adapter(pipe, "a", targets=("to_q", "to_k", "conv1"))
    edited = pipe.edit(images(1, seed=5), **EDIT).images
    pipe.save_lora_weights(tmp_path / "a")
    torch.save(edited, tmp_path / "expected.pt")
    script = f"""
import sys, torch
sys.path[:0] = [{TESTS!r}, {os.path.join(TESTS, "families")!r}]
torch.set_num_threads(1)
from test_sdxl import load, images, EDIT
pipe = load({str(folder)!r})
pipe.load_lora_weights({str(tmp_path / "a")!r})
again = pipe.edit(images(1, seed=5), **EDIT).images
print("same" if torch.equal(again, torch.load({str(tmp_path / "expected.pt")!r})) else "different")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.stdout.strip().endswith("same"), done.stdout + done.stderr[-2000:]


# ---- errors ----------------------------------------------------------------------------------------------------


def test_an_sdxl_unet_without_its_second_encoder_is_refused():
    components = make_sdxl_components()
    del components["text_encoder_2"], components["tokenizer_2"]
    with pytest.raises(ValueError, match="pass `text_encoder_2`, `tokenizer_2`"):
        DiffusionCLIPPipeline(**components)


def test_mismatched_encoder_widths_are_refused():
    components = make_sdxl_components()
    components["text_encoder_2"] = make_sd_components()["text_encoder"]  # no projection, a 32-wide stand-in
    components["unet"].register_to_config(cross_attention_dim=96)
    with pytest.raises(ValueError, match="give 64-wide hidden states together, but `unet` attends to 96"):
        DiffusionCLIPPipeline(**components)


def test_the_refiner_is_refused_before_loading(tmp_path):
    folder = stock_sdxl(tmp_path)
    index = json.loads((folder / "model_index.json").read_text())
    index.update(_class_name="StableDiffusionXLImg2ImgPipeline", requires_aesthetics_score=True)
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="SDXL refiner"):
        DiffusionCLIPPipeline.from_pretrained(folder)


def test_size_conditioning_is_checked_and_refused_where_it_does_not_apply():
    pipe = DiffusionCLIPPipeline(**make_sdxl_components())
    with pytest.raises(ValueError, match="`original_size` must be a pair of integers"):
        pipe.edit(images(1), original_size=(16,), **EDIT)
    sd = DiffusionCLIPPipeline(**make_sd_components())
    with pytest.raises(ValueError, match="`target_size`: SDXL's size conditioning; this is a sd model"):
        sd.edit(images(1), target_size=(16, 16), **EDIT)


def test_a_turbo_style_checkpoint_gets_the_trailing_grid(tmp_path):
    """SDXL-Turbo ships an EulerAncestralDiscreteScheduler with timestep_spacing="trailing": its config is honoured
    (converted to deterministic DDIM) and the grid ends at t0 without visiting t = 0, as Turbo's own grid does."""
    from diffusers import EulerAncestralDiscreteScheduler

    components = make_sdxl_components()
    components["scheduler"] = EulerAncestralDiscreteScheduler.from_config(
        components["scheduler"].config, timestep_spacing="trailing"
    )
    pipe = load(stock_sdxl(tmp_path, scheduler=components["scheduler"]))
    assert pipe.scheduler.config.timestep_spacing == "trailing"
    assert pipe.family.timesteps(999, 4) == [249, 499, 749, 999]  # diffusers' own trailing 4-step grid
    assert pipe.family.timesteps(500, 1) == [500]
    out = pipe(images(1), t0=999, num_inversion_steps=4, num_inference_steps=4, output_type="pt")
    assert out.timesteps == [999, 749, 499, 249] and torch.isfinite(out.images).all()


def test_an_fp16_vae_with_force_upcast_encodes_and_decodes_in_fp32():
    components = make_sdxl_components()
    reference = DiffusionCLIPPipeline(**components)
    vae16 = make_sdxl_components()["vae"].to(torch.float16)
    assert vae16.config.force_upcast
    pipe = DiffusionCLIPPipeline(**{**make_sdxl_components(), "vae": vae16})
    x = images(1, seed=7)
    with torch.no_grad():
        z = pipe.encode_image(x)
        decoded = pipe.decode_latents(z)
    assert z.dtype == torch.float32 and decoded.dtype == torch.float32 and vae16.dtype == torch.float16
    with torch.no_grad():  # the same as an fp32 VAE holding the fp16-rounded weights
        fp32 = make_sdxl_components()["vae"].to(torch.float16).to(torch.float32)
        expected = fp32.encode(x).latent_dist.mean * fp32.config.scaling_factor
    torch.testing.assert_close(z, expected, atol=0, rtol=0)
    assert reference.family.encode(x).dtype == torch.float32

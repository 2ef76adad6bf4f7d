"""The Flux family (issue 31): tiny Flux components built from configs as diffusers' own Flux tests build them
(offline), loaded from folders the stock `FluxPipeline` saves, inverted and edited by Euler steps on the dynamically
shifted sigma grid with 2x2-packed tokens, fine-tuned with every scheme, and adapters exchanged with the stock
pipeline."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import add_random_adapter, make_clip, make_flux_components
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from peft.utils import get_peft_model_state_dict
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from diffusionclip_pipeline import DiffusionCLIPPipeline
from diffusionclip_pipeline.families import FluxFamily

# Flux's dynamic shift for the 16 tokens of 8x8 latents: diffusers' `calculate_shift` line through (256, 0.5) and
# (4096, 1.15), written out here
MU = 16 * (1.15 - 0.5) / (4096 - 256) + 0.5 - 256 * (1.15 - 0.5) / (4096 - 256)
STOCK_NAMES = ("transformer", "scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")


def make_pipe(seed: int = 0, with_clip: bool = False, **kwargs) -> DiffusionCLIPPipeline:
    components = make_flux_components(seed, **kwargs)
    if with_clip:
        components.update(clip_model=make_clip(components["tokenizer"], 16), clip_tokenizer=components["tokenizer"])
    pipe = DiffusionCLIPPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def stock_pipe(pipe: DiffusionCLIPPipeline) -> FluxPipeline:
    stock = FluxPipeline(**{n: getattr(pipe, n) for n in STOCK_NAMES})
    stock.set_progress_bar_config(disable=True)
    return stock


def images(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def sigma(t: int) -> float:  # exponential time shift of s = t / 1000 by MU, written out independently
    s = t / 1000
    return math.exp(MU) / (math.exp(MU) + 1 / s - 1) if t > 0 else 0.0


def pack(x: torch.Tensor) -> torch.Tensor:  # 2x2 patches as tokens, channel order (c, row, col): pixel_unshuffle's
    return F.pixel_unshuffle(x, 2).flatten(2).transpose(1, 2)


def unpack(tokens: torch.Tensor, size: int) -> torch.Tensor:
    return F.pixel_shuffle(tokens.transpose(1, 2).unflatten(2, (size // 2, size // 2)), 2)


def stock_velocity(pipe, transformer, x, t: int, guidance=1.0, prompt: str = "") -> torch.Tensor:
    """The stock pipeline's transformer call (FluxPipeline.__call__) on packed latents, unpacked."""
    embeds, pooled, text_ids = stock_pipe(pipe).encode_prompt(prompt, None)
    n = x.shape[0]
    g = None if guidance is None else torch.full((n,), guidance, dtype=torch.float32)
    out = transformer(
        hidden_states=pack(x), timestep=torch.full((n,), sigma(t) * 1000, dtype=torch.float32) / 1000, guidance=g,
        pooled_projections=pooled.expand(n, -1), encoder_hidden_states=embeds.expand(n, -1, -1), txt_ids=text_ids,
        img_ids=FluxPipeline._prepare_latent_image_ids(n, 4, 4, x.device, x.dtype), return_dict=False,
    )[0]  # fmt: skip
    return unpack(out, x.shape[-1])


# ---- components and conditioning -----------------------------------------------------------------------------


def test_family_and_conditioning_match_the_stock_pipeline():
    pipe = make_pipe()
    assert isinstance(pipe.family, FluxFamily) and pipe.family.name == "flux"
    assert pipe.denoiser is pipe.transformer and pipe.unet is None and pipe.inverse_scheduler is None
    # the VAE's sample size (16 px) sets the working size; 4 latent channels, packed into the transformer's 16
    assert pipe.resolution == 16 and pipe.family.sample_size == 8 and pipe.family.latent_channels == 4
    # mu of the packed token count: 16 tokens at the working size, 256 (diffusers' base_shift 0.5) for 32 x 32 latents
    assert pipe.family.shift_mu() == pytest.approx(MU)
    assert pipe.family.shift_mu(torch.zeros(1, 4, 32, 32)) == pytest.approx(0.5)
    for prompt in ("a red circle", None):
        with torch.no_grad():  # ours runs under no_grad (autograd changes the T5's float rounding, ~1e-5)
            embeds, pooled, _ = stock_pipe(pipe).encode_prompt(prompt or "", None)
        assert embeds.shape == (1, 512, 32) and pooled.shape == (1, 16)
        ours = pipe.encode_prompt(prompt, batch_size=2)
        assert torch.equal(ours["encoder_hidden_states"], embeds.expand(2, -1, -1))
        assert torch.equal(ours["pooled_projections"], pooled.expand(2, -1))


def test_packing_matches_the_stock_pipeline_and_round_trips():
    from diffusionclip_pipeline.families.flux import latent_image_ids, pack_latents, unpack_latents

    x = torch.randn(2, 4, 8, 6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(pack_latents(x), FluxPipeline._pack_latents(x, 2, 4, 8, 6))
    assert torch.equal(pack_latents(x), F.pixel_unshuffle(x, 2).flatten(2).transpose(1, 2))
    assert torch.equal(unpack_latents(pack_latents(x), 8, 6), x)
    assert torch.equal(latent_image_ids(8, 6, "cpu"), FluxPipeline._prepare_latent_image_ids(2, 4, 3, "cpu", x.dtype))


def test_encode_and_decode_use_the_vae_shift_factor():
    pipe = make_pipe()
    x = images(1)
    vae = pipe.vae
    expected = (vae.encode(x).latent_dist.mean - 0.1159) * 0.3611
    torch.testing.assert_close(pipe.encode_image(x), expected)
    assert expected.shape == (1, 4, 8, 8)  # unpacked
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(pipe.decode_latents(z), vae.decode(z / 0.3611 + 0.1159).sample)


@torch.no_grad()
@pytest.mark.parametrize("guidance_embeds", [True, False])
def test_predict_is_the_stock_transformer_call_on_packed_latents(guidance_embeds):
    pipe = make_pipe(guidance_embeds=guidance_embeds)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    ours = pipe.family.predict(pipe.transformer, x, 700, pipe.encode_prompt("a red circle", 2))
    expected = stock_velocity(pipe, pipe.transformer, x, 700, 1.0 if guidance_embeds else None, "a red circle")
    assert ours.shape == x.shape
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
    if guidance_embeds:  # the guidance value reaches the model: the stock default 3.5 gives another velocity
        other = stock_velocity(pipe, pipe.transformer, x, 700, 3.5, "a red circle")
        assert float((other - ours).abs().max()) > 1e-4


# ---- inversion and regeneration --------------------------------------------------------------------------------


def reference_inversion(pipe, x0, t0: int, steps: int) -> torch.Tensor:
    """Euler up the grid floor(k t0 / S), k = 1..S, from the clean latent (sigma 0), the velocity taken at the
    source point by the stock transformer call on packed latents."""
    x = pipe.vae.encode(x0).latent_dist.mean
    x = (x - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
    grid = [0] + [k * t0 // steps for k in range(1, steps + 1)]
    for low, high in zip(grid[:-1], grid[1:]):
        x = x + (sigma(high) - sigma(low)) * stock_velocity(pipe, pipe.transformer, x, low)
    return x


@torch.no_grad()
def test_inversion_matches_an_independent_euler_loop():
    pipe = make_pipe()
    x0 = images(2)
    out = pipe.invert(x0, t0=600, num_inversion_steps=6)
    assert out.timesteps == [100, 200, 300, 400, 500, 600]
    torch.testing.assert_close(out.x_t0, reference_inversion(pipe, x0, 600, 6), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_round_trip_error_falls_as_the_step_count_grows():
    pipe = make_pipe()
    x0 = images(2)
    z0 = pipe.encode_image(pipe.prepare_image(x0))
    errors = []
    for steps in (2, 8, 32):
        edit = pipe.edit(x0, t0=600, num_inversion_steps=steps, num_inference_steps=steps, output_type="latent")
        errors.append(float((edit.images - z0).abs().mean()))
    assert errors[0] > errors[1] > errors[2], errors


def test_noise_encoding_is_the_stock_scale_noise():
    pipe = make_pipe()
    x0 = images(1)
    z0 = pipe.encode_image(pipe.prepare_image(x0))
    x_t0 = pipe.invert(x0, t0=400, encoding="noise", generator=torch.Generator().manual_seed(3)).x_t0
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(3))
    stock = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    stock.set_timesteps(sigmas=[0.4], mu=MU)  # the stock shift of s = 0.4 at this image's mu
    expected = stock.scale_noise(z0, stock.timesteps[:1], noise)
    torch.testing.assert_close(x_t0, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x_t0, (1 - sigma(400)) * z0 + sigma(400) * noise, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_edit_is_deterministic_and_batch_equals_singles():
    pipe = make_pipe()
    x0 = images(2)
    kwargs = dict(t0=500, num_inversion_steps=3, num_inference_steps=3, output_type="pt")
    batch = pipe.edit(x0, **kwargs).images
    assert batch.shape == (2, 3, 16, 16) and bool(torch.isfinite(batch).all())
    torch.testing.assert_close(pipe.edit(x0, **kwargs).images, batch, rtol=0, atol=0)
    singles = torch.cat([pipe.edit(x0[i : i + 1], **kwargs).images for i in range(2)])
    torch.testing.assert_close(singles, batch, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_bfloat16_edit_with_true_cfg_runs():
    pipe = make_pipe().to(torch.bfloat16)
    kwargs = dict(t0=500, num_inversion_steps=2, num_inference_steps=2, output_type="pt", prompt="a red circle")
    plain = pipe.edit(images(1), **kwargs).images
    guided = pipe.edit(images(1), guidance_scale=3.0, **kwargs).images
    assert plain.shape == guided.shape == (1, 3, 16, 16)
    assert bool(torch.isfinite(guided).all()) and float((guided - plain).abs().max()) > 0


# ---- fine-tuning -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["efficient", "one_step", "full_chain"])
def test_one_fine_tuning_step_per_scheme_trains_only_the_adapter(scheme):
    pipe = make_pipe(with_clip=True)
    base = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    out = pipe.finetune(
        "red circle", "blue circle", images=images(2), num_epochs=1, t0=400, num_train_steps=2,
        num_inversion_steps=2, scheme=scheme, batch_size=2, learning_rate=1e-2,
    )  # fmt: skip
    assert len(out.loss_history) >= 1 and all(torch.isfinite(torch.tensor(out.loss_history)))
    assert out.config.lora_target_modules == ("to_q", "to_k", "to_v", "to_out.0")
    lora = get_peft_model_state_dict(pipe.transformer, adapter_name="default")
    # both block kinds carry adapters (the single-stream blocks have no to_out: their output is proj_out)
    assert any(k.startswith("transformer_blocks.0.attn.to_out.0.") for k in lora)
    assert any(k.startswith("single_transformer_blocks.0.attn.to_q.") for k in lora)
    assert any(float(v.abs().max()) > 0 for k, v in lora.items() if "lora_B" in k)
    after = {k.replace(".base_layer", ""): v for k, v in pipe.transformer.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(after[k], v) for k, v in base.items())


# ---- adapters: interop with the stock pipeline ------------------------------------------------------------------


def add_adapter(pipe, name="smile", seed=0):
    add_random_adapter(pipe, name, seed=seed, targets=("to_q", "to_v"))  # the joint attention's projections
    pipe.set_adapters([name])


@torch.no_grad()
def velocity(pipe, model, x, condition):
    return pipe.family.predict(model, x, 500, condition)


@torch.no_grad()
def test_our_adapter_loads_in_the_stock_pipeline_with_identical_outputs(tmp_path):
    pipe = make_pipe()
    add_adapter(pipe)
    pipe.save_lora_weights(tmp_path / "smile", adapter_name="smile")
    stock = FluxPipeline(**make_flux_components(0))
    stock.load_lora_weights(tmp_path / "smile")
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    condition = pipe.encode_prompt(None, 2)
    ours, theirs = velocity(pipe, pipe.transformer, x, condition), velocity(pipe, stock.transformer, x, condition)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    with pipe._original_model():
        assert float((velocity(pipe, pipe.transformer, x, condition) - ours).abs().max()) > 1e-3


# the target modules of diffusers' train_dreambooth_lora_flux.py (`--lora_layers` unset), plus the single blocks' MLP
DREAMBOOTH_TARGETS = (
    "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj",
    "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
    "proj_mlp", "proj_out",
)  # fmt: skip


@torch.no_grad()
@pytest.mark.parametrize("targets", [None, DREAMBOOTH_TARGETS])
def test_a_stock_saved_flux_lora_loads_into_ours(tmp_path, targets):
    source = make_pipe()
    if targets is None:
        add_adapter(source, "stock")
    else:  # as the training script adds it: peft on the stock transformer, random B so that it is not a no-op
        from peft import LoraConfig

        source.transformer.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=list(targets)), "stock")
        generator = torch.Generator().manual_seed(0)
        for key, p in source.transformer.named_parameters():
            if "lora_B" in key:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    layers = get_peft_model_state_dict(source.transformer, adapter_name="stock")
    FluxPipeline.save_lora_weights(
        tmp_path / "stock",
        transformer_lora_layers=layers,
        transformer_lora_adapter_metadata=source.transformer.peft_config["stock"].to_dict(),
    )
    pipe = make_pipe()
    pipe.load_lora_weights(tmp_path / "stock", adapter_name="stock")
    assert pipe.get_list_adapters() == {"transformer": ["stock"]}
    assert get_peft_model_state_dict(pipe.transformer, adapter_name="stock").keys() == layers.keys()
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    condition = pipe.encode_prompt(None)
    ours = velocity(pipe, pipe.transformer, x, condition)
    torch.testing.assert_close(ours, velocity(pipe, source.transformer, x, condition), rtol=0, atol=1e-6)
    with pipe._original_model():
        assert float((velocity(pipe, pipe.transformer, x, condition) - ours).abs().max()) > 1e-3


# ---- folders ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_a_stock_flux_folder_loads_edits_and_round_trips(tmp_path):
    FluxPipeline(**make_flux_components(0)).save_pretrained(tmp_path / "stock")
    pipe = DiffusionCLIPPipeline.from_pretrained(tmp_path / "stock")
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.family, FluxFamily)
    kwargs = dict(t0=500, num_inversion_steps=3, num_inference_steps=3, output_type="pt")
    expected = make_pipe().edit(images(1), **kwargs).images
    torch.testing.assert_close(pipe.edit(images(1), **kwargs).images, expected, rtol=0, atol=1e-6)
    add_adapter(pipe)
    edited = pipe.edit(images(1), **kwargs).images
    pipe.save_pretrained(tmp_path / "ours")
    again = DiffusionCLIPPipeline.from_pretrained(tmp_path / "ours")
    again.set_progress_bar_config(disable=True)
    assert again.get_list_adapters() == {"transformer": ["smile"]}
    torch.testing.assert_close(again.edit(images(1), **kwargs).images, edited, rtol=0, atol=0)
    stock = FluxPipeline.from_pretrained(tmp_path / "ours")  # base weights, in the stock layout
    assert not any("lora_" in k for k in stock.transformer.state_dict())


@pytest.mark.slow
def test_fresh_process_reload_gives_the_same_edit(tmp_path):
    """Within float rounding (in one process the reload is bit for bit, see
    `test_a_stock_flux_folder_loads_edits_and_round_trips`)."""
    pipe = make_pipe()
    add_adapter(pipe)
    pipe.save_pretrained(tmp_path / "ours")
    kwargs = dict(t0=500, num_inversion_steps=3, num_inference_steps=3, output_type="pt")
    torch.save(pipe.edit(images(1), **kwargs).images, tmp_path / "expected.pt")
    code = (
        "import torch, sys; from diffusionclip_pipeline import DiffusionCLIPPipeline as P;"
        f"p = P.from_pretrained({str(tmp_path / 'ours')!r}); p.set_progress_bar_config(disable=True);"
        "assert type(p.family).__name__ == 'FluxFamily';"
        "x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1;"
        "out = p.edit(x, t0=500, num_inversion_steps=3, num_inference_steps=3, output_type='pt').images;"
        f"d = (out - torch.load({str(tmp_path / 'expected.pt')!r})).abs().max(); print(float(d), file=sys.stderr);"
        "sys.exit(0 if d <= 1e-5 else 1)"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", code], env=env, timeout=300, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_from_pipe_shares_the_stock_pipelines_components():
    stock = FluxPipeline(**make_flux_components(0))
    pipe = DiffusionCLIPPipeline.from_pipe(stock)
    assert isinstance(pipe.family, FluxFamily)
    assert all(getattr(pipe, name) is getattr(stock, name) for name in STOCK_NAMES)


# ---- errors ----------------------------------------------------------------------------------------------------


def test_component_errors_name_the_component():
    c = make_flux_components(0)
    for name in ("text_encoder_2", "tokenizer_2", "text_encoder", "vae"):
        with pytest.raises(ValueError, match=f"needs .*`{name}`"):
            DiffusionCLIPPipeline(**{**c, name: None})
    with pytest.raises(ValueError, match="`text_encoder_3`.*must be None for a Flux"):
        DiffusionCLIPPipeline(**c, text_encoder_3=c["text_encoder_2"], tokenizer_3=c["tokenizer_2"])
    projection = CLIPTextModelWithProjection(CLIPTextConfig(**{**c["text_encoder"].config.to_dict()}))
    with pytest.raises(TypeError, match="`text_encoder` must be a `CLIPTextModel`"):
        DiffusionCLIPPipeline(**{**c, "text_encoder": projection})
    with pytest.raises(TypeError, match="`text_encoder_2` must be a `T5EncoderModel`, got CLIPTextModel"):
        DiffusionCLIPPipeline(**{**c, "text_encoder_2": c["text_encoder"]})
    t5 = T5EncoderModel(T5Config(vocab_size=len(c["tokenizer"]), d_model=16, d_ff=8, num_layers=1, num_heads=2))
    with pytest.raises(ValueError, match="`text_encoder_2` \\(T5\\) is 16 wide.*joint_attention_dim is 32"):
        DiffusionCLIPPipeline(**{**c, "text_encoder_2": t5})
    wide = make_flux_components(0, in_channels=16)["transformer"]
    wide.register_to_config(pooled_projection_dim=32)  # a config that no longer fits the 16-wide CLIP
    with pytest.raises(ValueError, match="pooled_projection_dim 32"):
        DiffusionCLIPPipeline(**{**c, "transformer": wide})
    with pytest.raises(TypeError, match="FlowMatchEulerDiscreteScheduler"):
        from diffusers import DDIMScheduler

        DiffusionCLIPPipeline(**{**c, "scheduler": DDIMScheduler()})


def test_fill_and_control_transformers_are_refused():
    c = make_flux_components(0)
    # Fill / Control: image or control latents concatenated to the noisy ones (FLUX.1-Fill: 384 in, 64 out)
    fill = FluxTransformer2DModel(
        in_channels=48, out_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(2, 2, 4),
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"4-channel latents \(x4 packed: 16\).*48 input channels.*Fill or Control"):
        DiffusionCLIPPipeline(**{**c, "transformer": fill})
    odd = FluxTransformer2DModel(
        in_channels=16, out_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(2, 2, 4),
    )  # fmt: skip
    with pytest.raises(ValueError, match="takes 16 input channels but predicts 8"):
        DiffusionCLIPPipeline(**{**c, "transformer": odd})
    vae = AutoencoderKL(block_out_channels=(4,), latent_channels=16, norm_num_groups=4)
    with pytest.raises(ValueError, match=r"16-channel latents \(x4 packed: 64\).*16 input channels"):
        DiffusionCLIPPipeline(**{**c, "vae": vae})


@pytest.mark.parametrize("sample_size", [18, 10**6, 0, "16"])
def test_a_vae_sample_size_that_cannot_be_packed_is_refused(sample_size):
    c = make_flux_components(0)
    c["vae"].register_to_config(sample_size=sample_size)  # 18 px: 9 latents, odd; 10**6: beyond the bound
    with pytest.raises(ValueError, match="working latent size .* must be even, in \\[2, 4096\\]"):
        DiffusionCLIPPipeline(**c)


def test_without_a_vae_sample_size_the_stock_default_size_is_used():
    c = make_flux_components(0)
    c["vae"].register_to_config(sample_size=None)
    pipe = DiffusionCLIPPipeline(**c)
    assert pipe.family.sample_size == 128 and pipe.resolution == 256  # FluxPipeline.default_sample_size latents


def test_call_errors_are_raised_before_any_work():
    pipe = make_pipe()
    with pytest.raises(ValueError, match="`eta` must be 0"):
        pipe.edit(images(1), eta=0.5)
    with pytest.raises(ValueError, match="inversion_start"):
        pipe.invert(images(1), inversion_start="official")
    with pytest.raises(ValueError, match=r"\(batch, 4, 8, 8\)"):
        pipe.edit(latents=torch.zeros(1, 16, 4, 4))  # packed-size channels are not the family's latents


@pytest.mark.parametrize(
    "name",
    ["FluxKontextPipeline", "FluxFillPipeline", "FluxControlPipeline", "FluxControlNetPipeline", "Flux2Pipeline"],
)
def test_unsupported_flux_layouts_are_refused_before_loading(tmp_path, name):
    (tmp_path / "model_index.json").write_text(f'{{"_class_name": "{name}", "_diffusers_version": "0.42.1"}}')
    with pytest.raises(ValueError, match=f"is a {name} repository"):
        DiffusionCLIPPipeline.from_pretrained(tmp_path)

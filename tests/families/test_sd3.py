"""The Stable Diffusion 3 family (issue 31): tiny SD3 components built from configs as diffusers' own SD3 tests build
them (offline), loaded from folders the stock `StableDiffusion3Pipeline` saves, inverted and edited by Euler steps on
the shifted sigma grid, fine-tuned with every scheme, and adapters exchanged with the stock pipeline."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import add_random_adapter, make_clip, make_sd3_components, make_unet
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from peft.utils import get_peft_model_state_dict

from diffusionclip_pipeline import DiffusionCLIPPipeline
from diffusionclip_pipeline.families import StableDiffusion3Family

SHIFT = 3.0


def make_pipe(seed: int = 0, with_t5: bool = False, with_clip: bool = False) -> DiffusionCLIPPipeline:
    components = make_sd3_components(seed, with_t5=with_t5)
    if with_clip:
        components.update(clip_model=make_clip(components["tokenizer"], 16), clip_tokenizer=components["tokenizer"])
    pipe = DiffusionCLIPPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def stock_pipe(pipe: DiffusionCLIPPipeline) -> StableDiffusion3Pipeline:
    names = ("transformer", "scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    stock = StableDiffusion3Pipeline(
        **{n: getattr(pipe, n) for n in names}, text_encoder_3=pipe.text_encoder_3, tokenizer_3=pipe.tokenizer_3
    )
    stock.set_progress_bar_config(disable=True)
    return stock


def images(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def sigma(t: int) -> float:  # SD3's static shift of s = t / 1000, written out independently of the package
    s = t / 1000
    return SHIFT * s / (1 + (SHIFT - 1) * s)


# ---- components and conditioning -----------------------------------------------------------------------------


@pytest.mark.parametrize("with_t5", [False, True])
def test_family_and_conditioning_match_the_stock_pipeline(with_t5):
    pipe = make_pipe(with_t5=with_t5)
    assert isinstance(pipe.family, StableDiffusion3Family)
    assert pipe.denoiser is pipe.transformer and pipe.unet is None and pipe.inverse_scheduler is None
    assert pipe.resolution == 16 and pipe.family.latent_channels == 4
    for prompt in ("a red circle", None):
        embeds, _, pooled, _ = stock_pipe(pipe).encode_prompt(
            prompt or "", None, None, do_classifier_free_guidance=False
        )
        ours = pipe.encode_prompt(prompt, batch_size=2)
        # equal up to float rounding (the T5 runs under no_grad here, with autograd in the stock call)
        torch.testing.assert_close(ours["encoder_hidden_states"], embeds.expand(2, -1, -1), rtol=0, atol=1e-5)
        assert torch.equal(ours["pooled_projections"], pooled.expand(2, -1))


def test_encode_and_decode_use_the_vae_shift_factor():
    pipe = make_pipe()
    x = images(1)
    vae = pipe.vae
    expected = (vae.encode(x).latent_dist.mean - 0.0609) * 1.5035
    torch.testing.assert_close(pipe.encode_image(x), expected)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(pipe.decode_latents(z), vae.decode(z / 1.5035 + 0.0609).sample)


# ---- inversion and regeneration --------------------------------------------------------------------------------


def reference_inversion(pipe, x0, t0: int, steps: int) -> torch.Tensor:
    """Euler up the grid floor(k t0 / S), k = 1..S, from the clean latent (sigma 0), the velocity taken at the
    source point, written with the stock pipeline's conditioning and the transformer called directly."""
    embeds, _, pooled, _ = stock_pipe(pipe).encode_prompt("", None, None, do_classifier_free_guidance=False)
    x = pipe.vae.encode(x0).latent_dist.mean
    x = (x - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
    levels = [0.0] + [sigma(k * t0 // steps) for k in range(1, steps + 1)]
    for low, high in zip(levels[:-1], levels[1:]):
        t = torch.full((x.shape[0],), low * 1000, dtype=torch.float32)
        v = pipe.transformer(
            hidden_states=x, timestep=t, encoder_hidden_states=embeds.expand(x.shape[0], -1, -1),
            pooled_projections=pooled.expand(x.shape[0], -1), return_dict=False,
        )[0]  # fmt: skip
        x = x + (high - low) * v
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


@torch.no_grad()
def test_fixed_point_inversion_makes_the_round_trip_exact():
    pipe = make_pipe()
    x0 = images(1)
    z0 = pipe.encode_image(pipe.prepare_image(x0))
    plain = pipe.edit(x0, t0=500, num_inversion_steps=4, num_inference_steps=4, output_type="latent").images
    fixed = pipe.edit(
        x0, t0=500, num_inversion_steps=4, num_inference_steps=4, num_fixed_point_iterations=8, output_type="latent"
    ).images
    assert float((fixed - z0).abs().max()) < 0.1 * float((plain - z0).abs().max())


def test_noise_encoding_is_the_stock_scale_noise():
    pipe = make_pipe()
    x0 = images(1)
    z0 = pipe.encode_image(pipe.prepare_image(x0))
    x_t0 = pipe.invert(x0, t0=400, encoding="noise", generator=torch.Generator().manual_seed(3)).x_t0
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(3))
    stock = FlowMatchEulerDiscreteScheduler(shift=SHIFT)  # its training table: timesteps = sigma * 1000, 1000 .. 1
    expected = stock.scale_noise(z0, stock.timesteps[1000 - 400 : 1000 - 400 + 1], noise)
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
    assert out.config.lora_target_modules == ("to_q", "to_k", "to_v", "to_out.0")  # the family's, not conv1
    lora = get_peft_model_state_dict(pipe.transformer, adapter_name="default")
    assert lora and any(float(v.abs().max()) > 0 for k, v in lora.items() if "lora_B" in k)
    after = {k.replace(".base_layer", ""): v for k, v in pipe.transformer.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(after[k], v) for k, v in base.items())


def test_training_finetune_without_a_config_takes_the_family_targets():
    """`training.finetune` called directly with ``config=None`` (not through `pipe.finetune`) asks the family for the
    LoRA targets too: the UNet list's convolution names would select nothing in a transformer."""
    from diffusionclip_pipeline.training import finetune

    pipe = make_pipe(with_clip=True)
    out = finetune(pipe, "red circle", "blue circle", images=images(1))
    assert out.config.lora_target_modules == ("to_q", "to_k", "to_v", "to_out.0")


# ---- adapters: interop with the stock pipeline ------------------------------------------------------------------


def add_adapter(pipe, name="smile", seed=0):
    add_random_adapter(pipe, name, seed=seed, targets=("to_q", "to_v"))  # the joint attention's projections
    pipe.set_adapters([name])


@torch.no_grad()
def velocity(pipe_or_stock, model, x, condition):
    return pipe_or_stock.family.predict(model, x, 500, condition)


@torch.no_grad()
def test_our_adapter_loads_in_the_stock_pipeline_with_identical_outputs(tmp_path):
    pipe = make_pipe()
    add_adapter(pipe)
    pipe.save_lora_weights(tmp_path / "smile", adapter_name="smile")
    stock = StableDiffusion3Pipeline(**{**make_sd3_components(0)})
    stock.load_lora_weights(tmp_path / "smile")
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    condition = pipe.encode_prompt(None, 2)
    ours, theirs = velocity(pipe, pipe.transformer, x, condition), velocity(pipe, stock.transformer, x, condition)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    with pipe.family.pipe._original_model():
        assert float((velocity(pipe, pipe.transformer, x, condition) - ours).abs().max()) > 1e-3


@torch.no_grad()
def test_a_stock_saved_sd3_lora_loads_into_ours(tmp_path):
    source = make_pipe()
    add_adapter(source, "stock")
    layers = get_peft_model_state_dict(source.transformer, adapter_name="stock")
    StableDiffusion3Pipeline.save_lora_weights(
        tmp_path / "stock",
        transformer_lora_layers=layers,
        transformer_lora_adapter_metadata=source.transformer.peft_config["stock"].to_dict(),
    )
    pipe = make_pipe()
    pipe.load_lora_weights(tmp_path / "stock", adapter_name="stock")
    assert pipe.get_list_adapters() == {"transformer": ["stock"]}
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    condition = pipe.encode_prompt(None)
    torch.testing.assert_close(
        velocity(pipe, pipe.transformer, x, condition),
        velocity(pipe, source.transformer, x, condition),
        rtol=0,
        atol=1e-6,
    )


def test_a_unet_adapter_is_refused_by_a_transformer(tmp_path):
    from conftest import add_random_adapter, make_pipeline

    unet_pipe = make_pipeline()
    add_random_adapter(unet_pipe, "smile")
    unet_pipe.save_lora_weights(tmp_path / "unet", adapter_name="smile")
    with pytest.raises(ValueError, match="is for a `unet`"):
        make_pipe().load_lora_weights(tmp_path / "unet", adapter_name="smile")


# ---- folders ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_a_stock_sd3_folder_loads_edits_and_round_trips(tmp_path):
    StableDiffusion3Pipeline(**make_sd3_components(0)).save_pretrained(tmp_path / "stock")
    pipe = DiffusionCLIPPipeline.from_pretrained(tmp_path / "stock")
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.family, StableDiffusion3Family) and pipe.text_encoder_3 is None
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
    # base weights, in the stock layout (the stock loader needs a missing T5 passed as None explicitly)
    stock = StableDiffusion3Pipeline.from_pretrained(tmp_path / "ours", text_encoder_3=None, tokenizer_3=None)
    assert not any("lora_" in k for k in stock.transformer.state_dict())


@torch.no_grad()
def test_from_pipe_works_both_ways():
    """Our pipeline from a stock one shares its components (adapters added to ours wrap the shared transformer:
    that is diffusers' `from_pipe` contract too); the stock pipeline from ours edits nothing, it generates."""
    stock = StableDiffusion3Pipeline(**make_sd3_components(0))
    pipe = DiffusionCLIPPipeline.from_pipe(stock)
    assert isinstance(pipe.family, StableDiffusion3Family)
    names = ("transformer", "scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    assert all(getattr(pipe, n) is getattr(stock, n) for n in names)
    back = StableDiffusion3Pipeline.from_pipe(make_pipe())
    out = back("a red circle", num_inference_steps=2, height=16, width=16, output_type="pt", guidance_scale=1.0)
    assert out.images.shape == (1, 3, 16, 16)


@pytest.mark.slow
def test_fresh_process_reload_gives_the_same_edit(tmp_path):
    """Within float rounding: 8.3e-7 measured between processes (in one process the reload is bit for bit, see
    `test_a_stock_sd3_folder_loads_edits_and_round_trips`)."""
    pipe = make_pipe()
    add_adapter(pipe)
    pipe.save_pretrained(tmp_path / "ours")
    kwargs = dict(t0=500, num_inversion_steps=3, num_inference_steps=3, output_type="pt")
    torch.save(pipe.edit(images(1), **kwargs).images, tmp_path / "expected.pt")
    code = (
        "import torch, sys; from diffusionclip_pipeline import DiffusionCLIPPipeline as P;"
        f"p = P.from_pretrained({str(tmp_path / 'ours')!r}); p.set_progress_bar_config(disable=True);"
        "x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1;"
        f"out = p.edit(x, t0=500, num_inversion_steps=3, num_inference_steps=3, output_type='pt').images;"
        f"d = (out - torch.load({str(tmp_path / 'expected.pt')!r})).abs().max(); print(float(d), file=sys.stderr);"
        "sys.exit(0 if d <= 1e-5 else 1)"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", code], env=env, timeout=300, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


# ---- errors ----------------------------------------------------------------------------------------------------


def test_component_errors_name_the_component():
    c = make_sd3_components(0)
    with pytest.raises(ValueError, match="text_encoder_2"):
        DiffusionCLIPPipeline(**{**c, "text_encoder_2": None})
    with pytest.raises(ValueError, match="text_encoder_3.*tokenizer_3"):
        DiffusionCLIPPipeline(**{**c, "text_encoder_3": make_sd3_components(0, with_t5=True)["text_encoder_3"]})
    with pytest.raises(TypeError, match="FlowMatchEulerDiscreteScheduler"):
        DiffusionCLIPPipeline(**{**c, "scheduler": DDIMScheduler()})
    with pytest.raises(ValueError, match="inverse_scheduler"):
        DiffusionCLIPPipeline(**c, inverse_scheduler=FlowMatchEulerDiscreteScheduler())
    with pytest.raises(ValueError, match="exactly one denoiser"):
        DiffusionCLIPPipeline(**c, unet=make_unet(sample_size=8))
    with pytest.raises(ValueError, match="exactly one denoiser"):
        DiffusionCLIPPipeline(**{**c, "transformer": None})
    from diffusers import AutoencoderKL

    wide = AutoencoderKL(block_out_channels=(4,), latent_channels=16, norm_num_groups=4)
    with pytest.raises(ValueError, match="16-channel latents.*4 input channels"):
        DiffusionCLIPPipeline(**{**c, "vae": wide})
    with pytest.raises(ValueError, match="use_beta_sigmas"):
        DiffusionCLIPPipeline(**{**c, "scheduler": FlowMatchEulerDiscreteScheduler(use_beta_sigmas=True)})


def test_call_errors_are_raised_before_any_work():
    pipe = make_pipe()
    with pytest.raises(ValueError, match="`eta` must be 0"):
        pipe.edit(images(1), eta=0.5)
    with pytest.raises(ValueError, match="inversion_start"):
        pipe.invert(images(1), inversion_start="official")
    with pytest.raises(ValueError, match=r"\(batch, 4, 8, 8\)"):
        pipe.edit(latents=torch.zeros(1, 16, 8, 8))


@pytest.mark.parametrize("name", ["FluxKontextPipeline", "StableDiffusion3ControlNetPipeline"])
def test_unsupported_flow_layouts_are_refused_before_loading(tmp_path, name):
    (tmp_path / "model_index.json").write_text(f'{{"_class_name": "{name}", "_diffusers_version": "0.42.1"}}')
    with pytest.raises(ValueError, match=name.removesuffix("Pipeline")):
        DiffusionCLIPPipeline.from_pretrained(tmp_path)


def test_a_bf16_base_trains_fp32_lora_with_gradient_checkpointing():
    """The memory settings of issue 31: the base transformer in bf16, the LoRA weights (and their optimizer) in
    fp32, activations recomputed per block."""
    pipe = make_pipe(with_clip=True).to(torch.bfloat16)
    out = pipe.finetune(
        "red circle", "blue circle", images=images(2), num_epochs=1, t0=400, num_train_steps=2,
        num_inversion_steps=2, batch_size=2, gradient_checkpointing=True,
    )  # fmt: skip
    assert all(torch.isfinite(torch.tensor(out.loss_history)))
    dtypes = {("lora" if "lora_" in n else "base", p.dtype) for n, p in pipe.transformer.named_parameters()}
    assert dtypes == {("lora", torch.float32), ("base", torch.bfloat16)}
    assert not pipe.transformer.is_gradient_checkpointing  # switched off again after training

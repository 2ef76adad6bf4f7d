"""The Stable Diffusion 3 family (issue 31): what only SD3 does. Tiny SD3 components built from configs as diffusers'
own SD3 tests build them (offline): the optional T5 in the conditioning, fixed-point inversion, its component errors
and the bf16 training settings. What SD3 does as Flux does (inversion against an independent Euler loop, folders,
adapters exchanged with the stock `StableDiffusion3Pipeline`, fine-tuning with every scheme) is tested for both in
`test_flow_families.py`."""

from __future__ import annotations

import pytest
import torch
from conftest import make_sd3_components, make_unet
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
from flow_helpers import SD3, images

from diffusionclip_pipeline import DiffusionCLIPPipeline
from diffusionclip_pipeline.families import StableDiffusion3Family

# ---- components and conditioning -----------------------------------------------------------------------------


@pytest.mark.parametrize("with_t5", [False, True])
def test_family_and_conditioning_match_the_stock_pipeline(with_t5):
    pipe = SD3.make_pipe(with_t5=with_t5)
    assert isinstance(pipe.family, StableDiffusion3Family)
    assert pipe.denoiser is pipe.transformer and pipe.unet is None and pipe.inverse_scheduler is None
    assert pipe.resolution == 16 and pipe.family.latent_channels == 4
    for prompt in ("a red circle", None):
        embeds, _, pooled, _ = SD3.stock_pipe(pipe).encode_prompt(
            prompt or "", None, None, do_classifier_free_guidance=False
        )
        ours = pipe.encode_prompt(prompt, batch_size=2)
        # equal up to float rounding (the T5 runs under no_grad here, with autograd in the stock call)
        torch.testing.assert_close(ours["encoder_hidden_states"], embeds.expand(2, -1, -1), rtol=0, atol=1e-5)
        assert torch.equal(ours["pooled_projections"], pooled.expand(2, -1))


# ---- inversion -------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_fixed_point_inversion_makes_the_round_trip_exact():
    pipe = SD3.make_pipe()
    x0 = images(1)
    z0 = pipe.encode_image(pipe.prepare_image(x0))
    plain = pipe.edit(x0, t0=500, num_inversion_steps=4, num_inference_steps=4, output_type="latent").images
    fixed = pipe.edit(
        x0, t0=500, num_inversion_steps=4, num_inference_steps=4, num_fixed_point_iterations=8, output_type="latent"
    ).images
    assert float((fixed - z0).abs().max()) < 0.1 * float((plain - z0).abs().max())


# ---- fine-tuning -----------------------------------------------------------------------------------------------


def test_training_finetune_without_a_config_takes_the_family_targets():
    """`training.finetune` called directly with ``config=None`` (not through `pipe.finetune`) asks the family for the
    LoRA targets too: the UNet list's convolution names would select nothing in a transformer."""
    from diffusionclip_pipeline.training import finetune

    pipe = SD3.make_pipe(with_clip=True)
    out = finetune(pipe, "red circle", "blue circle", images=images(1))
    assert out.config.lora_target_modules == ("to_q", "to_k", "to_v", "to_out.0")


def test_a_bf16_base_trains_fp32_lora_with_gradient_checkpointing():
    """The memory settings of issue 31: the base transformer in bf16, the LoRA weights (and their optimizer) in
    fp32, activations recomputed per block."""
    pipe = SD3.make_pipe(with_clip=True).to(torch.bfloat16)
    out = pipe.finetune(
        "red circle", "blue circle", images=images(2), num_epochs=1, t0=400, num_train_steps=2,
        num_inversion_steps=2, batch_size=2, gradient_checkpointing=True,
    )  # fmt: skip
    assert all(torch.isfinite(torch.tensor(out.loss_history)))
    dtypes = {("lora" if "lora_" in n else "base", p.dtype) for n, p in pipe.transformer.named_parameters()}
    assert dtypes == {("lora", torch.float32), ("base", torch.bfloat16)}
    assert not pipe.transformer.is_gradient_checkpointing  # switched off again after training


# ---- errors ----------------------------------------------------------------------------------------------------


def test_a_unet_adapter_is_refused_by_a_transformer(tmp_path):
    from conftest import add_random_adapter, make_pipeline

    unet_pipe = make_pipeline()
    add_random_adapter(unet_pipe, "smile")
    unet_pipe.save_lora_weights(tmp_path / "unet", adapter_name="smile")
    with pytest.raises(ValueError, match="is for a `unet`"):
        SD3.make_pipe().load_lora_weights(tmp_path / "unet", adapter_name="smile")


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

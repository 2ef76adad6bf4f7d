"""The Flux family (issue 31): what only Flux does. Tiny Flux components built from configs as diffusers' own Flux
tests build them (offline): the dynamic shift (mu) of the packed token count, 2x2 packing as the stock `FluxPipeline`
packs, the guidance embedding, true CFG in bf16, and the refusals of Fill / Control transformers and unpackable sizes.
What Flux does as SD3 does (inversion against an independent Euler loop, folders, adapters exchanged with the stock
pipeline, fine-tuning with every scheme) is tested for both in `test_flow_families.py`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_flux_components
from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
from flow_helpers import FLUX, MU, images
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from diffusionclip_pipeline import DiffusionCLIPPipeline
from diffusionclip_pipeline.families import FluxFamily

# ---- components and conditioning -----------------------------------------------------------------------------


def test_family_and_conditioning_match_the_stock_pipeline():
    pipe = FLUX.make_pipe()
    assert isinstance(pipe.family, FluxFamily) and pipe.family.name == "flux"
    assert pipe.denoiser is pipe.transformer and pipe.unet is None and pipe.inverse_scheduler is None
    # the VAE's sample size (16 px) sets the working size; 4 latent channels, packed into the transformer's 16
    assert pipe.resolution == 16 and pipe.family.sample_size == 8 and pipe.family.latent_channels == 4
    # mu of the packed token count: 16 tokens at the working size, 256 (diffusers' base_shift 0.5) for 32 x 32 latents
    assert pipe.family.shift_mu() == pytest.approx(MU)
    assert pipe.family.shift_mu(torch.zeros(1, 4, 32, 32)) == pytest.approx(0.5)
    for prompt in ("a red circle", None):
        with torch.no_grad():  # ours runs under no_grad (autograd changes the T5's float rounding, ~1e-5)
            embeds, pooled, _ = FLUX.stock_pipe(pipe).encode_prompt(prompt or "", None)
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


@torch.no_grad()
@pytest.mark.parametrize("guidance_embeds", [True, False])
def test_predict_is_the_stock_transformer_call_on_packed_latents(guidance_embeds):
    pipe = FLUX.make_pipe(guidance_embeds=guidance_embeds)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    ours = pipe.family.predict(pipe.transformer, x, 700, pipe.encode_prompt("a red circle", 2))
    guidance = 1.0 if guidance_embeds else None
    expected = FLUX.stock_velocity(pipe, pipe.transformer, x, 700, prompt="a red circle", guidance=guidance)
    assert ours.shape == x.shape
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
    if guidance_embeds:  # the guidance value reaches the model: the stock default 3.5 gives another velocity
        other = FLUX.stock_velocity(pipe, pipe.transformer, x, 700, prompt="a red circle", guidance=3.5)
        assert float((other - ours).abs().max()) > 1e-4


# ---- regeneration ----------------------------------------------------------------------------------------------


@torch.no_grad()
def test_bfloat16_edit_with_true_cfg_runs():
    pipe = FLUX.make_pipe().to(torch.bfloat16)
    kwargs = dict(t0=500, num_inversion_steps=2, num_inference_steps=2, output_type="pt", prompt="a red circle")
    plain = pipe.edit(images(1), **kwargs).images
    guided = pipe.edit(images(1), guidance_scale=3.0, **kwargs).images
    assert plain.shape == guided.shape == (1, 3, 16, 16)
    assert bool(torch.isfinite(guided).all()) and float((guided - plain).abs().max()) > 0


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

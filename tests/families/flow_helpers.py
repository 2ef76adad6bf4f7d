"""The two flow-matching families (SD3, Flux) as their tests drive them: one spec per family (its toy components from
`tests/conftest.py`, the stock pipeline, the VAE's latent constants, and the independent references: the sigma of a
timestep written out here, the stock transformer call, the stock scheduler's noise level). Shared by
`test_flow_families.py` (the tests that are the same for both) and `test_sd3.py` / `test_flux.py` (the rest).

Not a test module: it computes, the test modules assert."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from conftest import add_random_adapter, make_clip, make_flux_components, make_sd3_components
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline

from diffusionclip_pipeline import DiffusionCLIPPipeline
from diffusionclip_pipeline.families import FluxFamily, StableDiffusion3Family

SHIFT = 3.0  # SD3's static shift
# Flux's dynamic shift for the 16 tokens of 8x8 latents: diffusers' `calculate_shift` line through (256, 0.5) and
# (4096, 1.15), written out here
MU = 16 * (1.15 - 0.5) / (4096 - 256) + 0.5 - 256 * (1.15 - 0.5) / (4096 - 256)
# the components both stock pipelines take (SD3's also take its T5 pair)
STOCK_NAMES = ("transformer", "scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")


def images(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def add_adapter(pipe, name="smile", seed=0):
    add_random_adapter(pipe, name, seed=seed, targets=("to_q", "to_v"))  # the joint attention's projections
    pipe.set_adapters([name])


@torch.no_grad()
def velocity(pipe, model, x, condition):
    """Our family's velocity of ``model`` (ours, or a stock pipeline's transformer) at t = 500."""
    return pipe.family.predict(model, x, 500, condition)


class FlowFamilySpec:
    """One flow-matching family: how to build it at toy size and what to compare it with."""

    name: str
    family_class: type
    stock_class: type
    stock_names: tuple[str, ...] = STOCK_NAMES
    make_components: Callable[..., dict]  # a factory of tests/conftest.py
    # the VAE's latent constants, written out (not read from its config)
    shift_factor: float
    scaling_factor: float
    # latents that are not the family's (batch, 4, 8, 8): `edit(latents=...)` must refuse them
    wrong_latents_shape: tuple[int, ...]
    # LoRA keys a fine-tuned adapter must hold (beyond being non-empty)
    lora_key_prefixes: tuple[str, ...] = ()
    # what the stock `from_pretrained` needs to load a folder we saved
    stock_load_kwargs: dict = {}

    def __repr__(self) -> str:
        return self.name

    def make_pipe(self, seed: int = 0, with_clip: bool = False, **kwargs) -> DiffusionCLIPPipeline:
        components = self.make_components(seed, **kwargs)
        if with_clip:
            clip = make_clip(components["tokenizer"], 16)
            components.update(clip_model=clip, clip_tokenizer=components["tokenizer"])
        pipe = DiffusionCLIPPipeline(**components)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def stock_pipe(self, pipe: DiffusionCLIPPipeline):
        """The stock pipeline on ``pipe``'s components."""
        stock = self.stock_class(**{n: getattr(pipe, n) for n in self.stock_names})
        stock.set_progress_bar_config(disable=True)
        return stock

    def sigma(self, t: int) -> float:
        raise NotImplementedError

    def stock_velocity(self, pipe, transformer, x, t: int, prompt: str = "") -> torch.Tensor:
        """The stock pipeline's transformer call at timestep ``t`` (its sigma), on the stock conditioning."""
        raise NotImplementedError

    def stock_noise_timestep(self, pipe, t: int) -> tuple[FlowMatchEulerDiscreteScheduler, torch.Tensor]:
        """A stock scheduler and the timestep at which its `scale_noise` mixes to the sigma of ``t``."""
        raise NotImplementedError


class SD3Spec(FlowFamilySpec):
    name = "sd3"
    family_class = StableDiffusion3Family
    stock_class = StableDiffusion3Pipeline
    stock_names = STOCK_NAMES + ("text_encoder_3", "tokenizer_3")
    make_components = staticmethod(make_sd3_components)
    shift_factor, scaling_factor = 0.0609, 1.5035
    wrong_latents_shape = (1, 16, 8, 8)
    # the stock loader needs a missing T5 passed as None explicitly
    stock_load_kwargs = {"text_encoder_3": None, "tokenizer_3": None}

    def sigma(self, t: int) -> float:  # SD3's static shift of s = t / 1000, written out independently of the package
        s = t / 1000
        return SHIFT * s / (1 + (SHIFT - 1) * s)

    def stock_velocity(self, pipe, transformer, x, t: int, prompt: str = "") -> torch.Tensor:
        embeds, _, pooled, _ = self.stock_pipe(pipe).encode_prompt(
            prompt, None, None, do_classifier_free_guidance=False
        )
        n = x.shape[0]
        return transformer(
            hidden_states=x, timestep=torch.full((n,), self.sigma(t) * 1000, dtype=torch.float32),
            encoder_hidden_states=embeds.expand(n, -1, -1), pooled_projections=pooled.expand(n, -1),
            return_dict=False,
        )[0]  # fmt: skip

    def stock_noise_timestep(self, pipe, t: int):
        stock = FlowMatchEulerDiscreteScheduler(shift=SHIFT)  # its training table: timesteps = sigma * 1000, 1000 .. 1
        return stock, stock.timesteps[1000 - t : 1000 - t + 1]


def pack(x: torch.Tensor) -> torch.Tensor:  # 2x2 patches as tokens, channel order (c, row, col): pixel_unshuffle's
    return F.pixel_unshuffle(x, 2).flatten(2).transpose(1, 2)


def unpack(tokens: torch.Tensor, size: int) -> torch.Tensor:
    return F.pixel_shuffle(tokens.transpose(1, 2).unflatten(2, (size // 2, size // 2)), 2)


class FluxSpec(FlowFamilySpec):
    name = "flux"
    family_class = FluxFamily
    stock_class = FluxPipeline
    make_components = staticmethod(make_flux_components)
    shift_factor, scaling_factor = 0.1159, 0.3611
    wrong_latents_shape = (1, 16, 4, 4)  # packed-size channels are not the family's latents
    # both block kinds carry adapters (the single-stream blocks have no to_out: their output is proj_out)
    lora_key_prefixes = ("transformer_blocks.0.attn.to_out.0.", "single_transformer_blocks.0.attn.to_q.")

    def sigma(self, t: int) -> float:  # exponential time shift of s = t / 1000 by MU, written out independently
        s = t / 1000
        return math.exp(MU) / (math.exp(MU) + 1 / s - 1) if t > 0 else 0.0

    def stock_velocity(self, pipe, transformer, x, t: int, prompt: str = "", guidance=1.0) -> torch.Tensor:
        """The stock pipeline's transformer call (FluxPipeline.__call__) on packed latents, unpacked."""
        embeds, pooled, text_ids = self.stock_pipe(pipe).encode_prompt(prompt, None)
        n = x.shape[0]
        g = None if guidance is None else torch.full((n,), guidance, dtype=torch.float32)
        out = transformer(
            hidden_states=pack(x), timestep=torch.full((n,), self.sigma(t) * 1000, dtype=torch.float32) / 1000,
            guidance=g, pooled_projections=pooled.expand(n, -1), encoder_hidden_states=embeds.expand(n, -1, -1),
            txt_ids=text_ids, img_ids=FluxPipeline._prepare_latent_image_ids(n, 4, 4, x.device, x.dtype),
            return_dict=False,
        )[0]  # fmt: skip
        return unpack(out, x.shape[-1])

    def stock_noise_timestep(self, pipe, t: int):
        stock = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        stock.set_timesteps(sigmas=[t / 1000], mu=MU)  # the stock shift of s = t / 1000 at this image's mu
        return stock, stock.timesteps[:1]


SD3, FLUX = SD3Spec(), FluxSpec()
FAMILIES = [pytest.param(SD3, id="sd3"), pytest.param(FLUX, id="flux")]

"""The model-family seam: what `invert`, `edit`, the training schemes and the validation need from a model, and
nothing else, so that none of them branches on a model type (k-diffusion's model wrapper, as one small protocol).

A family is bound to a pipeline (`ModelFamily(pipe)`) and reads the pipeline's components on every call, so that
swapping a component (``register_modules``) is seen at once. It provides:

1. components: `check_components` (class method: which components the family needs and whether they fit);
2. images <-> the denoiser's space: `encode`, `decode`, `sample_size`, `vae_scale_factor`, `image_channels`;
3. conditioning: `encode_prompt` (prompt -> what the denoiser takes; opaque to the callers), encoded once per call;
4. the denoiser call: `predict(denoiser, sample, timestep, condition)` (the denoiser is passed in, so that training
   can call its own wrapped copy, e.g. DDP);
5. the step maths: `timesteps` (the grid from 0 to ``t0``), `generation_scheduler` and `inversion_scheduler`
   (objects with diffusers' ``step`` interface: ``.step(model_output, t, sample).prev_sample`` and
   ``.pred_original_sample``, the x0 estimate of the family's prediction type) and `noise_to` (the closed-form
   forward encoding of ``encoding="noise"``);
6. adapters: `default_lora_target_modules` and `stock_pipeline`, the diffusers pipeline class that loads its
   adapters; `denoiser_name`, the pipeline component that holds the denoiser (``unet`` or ``transformer``, also the
   key prefix of its LoRA files).

`DDIMFamily` implements 5. for the noise-prediction UNets (epsilon, v or sample prediction, as the scheduler's
``prediction_type`` says): DDIM on ``alphas_cumprod`` over DiffusionCLIP's grid. A flow-matching family implements
the same four methods with Euler steps on sigmas.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler
from diffusers.utils import logging
from diffusers.utils.torch_utils import randn_tensor

from ..choices import INVERSION_STARTS
from ..scheduling_ddim_grid import GridDDIMInverseScheduler, GridDDIMScheduler, ddim_timesteps

# Pixel DDPMs have attention only at low resolution (16x16 in the CelebA-HQ DDPM), so attention alone is a weak
# handle: the ResNet convolutions and their time-embedding projections are targeted as well.
DEFAULT_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "time_emb_proj")

logger = logging.get_logger(__name__)


class ModelFamily:
    """One model family behind the seam (see the module docstring for the protocol)."""

    name: ClassVar[str] = ""
    stock_pipeline: ClassVar[str] = ""  # the diffusers pipeline class that loads this family's adapters
    default_lora_target_modules: ClassVar[tuple[str, ...]] = DEFAULT_TARGET_MODULES
    denoiser_name: ClassVar[str] = "unet"  # the pipeline component holding the denoiser
    inversion_starts: ClassVar[tuple[str, ...]] = INVERSION_STARTS  # `invert`'s `inversion_start` choices
    supports_eta: ClassVar[bool] = True  # stochastic generation steps (DDIM's eta > 0)
    lowest_timestep: ClassVar[int] = 0  # the lowest point a grid may hold (a flow grid's 0 is the clean image)

    def __init__(self, pipe):
        self.pipe = pipe

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    # 1. components -------------------------------------------------------------------------------------------

    @classmethod
    def matches(cls, components: dict[str, Any]) -> bool:
        """Whether ``components`` (the pipeline's, by name) are of this family."""
        raise NotImplementedError

    @classmethod
    def check_components(cls, components: dict[str, Any]) -> None:
        """`ValueError` / `TypeError` naming the component when the set cannot work together."""
        raise NotImplementedError

    @classmethod
    def prepare_schedulers(cls, scheduler, inverse_scheduler):
        """The ``(scheduler, inverse_scheduler)`` pair the pipeline registers, from the ones given (the pipeline's
        `__init__` calls it once)."""
        raise NotImplementedError

    # 2. images <-> the denoiser's space ----------------------------------------------------------------------

    @property
    def autoencoder(self):
        """The autoencoder between pixels and the denoiser's space, `None` for a pixel-space model."""
        return None

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent along each side (1 in pixel space)."""
        return 1

    @property
    def sample_size(self) -> int:
        """The side of the denoiser's (square) input."""
        return int(self.pipe.denoiser.config.sample_size)

    @property
    def latent_channels(self) -> int:
        return int(self.pipe.denoiser.config.in_channels)

    @property
    def image_channels(self) -> int:
        """Channels of the images the pipeline reads and writes (3 for RGB, 1 for grey models)."""
        return self.latent_channels

    @property
    def image_dtype(self) -> torch.dtype:
        """The dtype images are given to `encode` in."""
        return self.pipe.denoiser.dtype

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """The denoiser-space latents of ``images`` (NCHW in [-1, 1]); deterministic."""
        return images

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (not clamped) from denoiser-space latents; differentiable."""
        return latents

    # 3. conditioning -----------------------------------------------------------------------------------------

    def encode_prompt(self, prompt: str | None, batch_size: int = 1, **conditioning):
        """What the denoiser is conditioned on for ``prompt`` (`None`: the empty prompt), for ``batch_size``
        samples; `None` for an unconditional model, where a non-empty ``prompt`` is a `ValueError`. ``conditioning``
        holds a family's extra inputs (SDXL's ``original_size``, ...); a family that has none refuses them."""
        self.refuse_conditioning(conditioning)
        if prompt:
            raise ValueError(f"`prompt` needs a text-conditioned UNet; this one is unconditional: {prompt!r}.")
        return None

    def encode_negative(self, batch_size: int = 1):
        """The unconditional input of classifier-free guidance (the empty prompt's conditioning by default)."""
        return self.encode_prompt(None, batch_size)

    def refuse_conditioning(self, conditioning: dict) -> None:
        given = sorted(name for name, value in conditioning.items() if value is not None)
        if given:
            raise ValueError(
                f"{', '.join(f'`{n}`' for n in given)}: SDXL's size conditioning; this is a {self.name} model."
            )

    # 4. the denoiser call ------------------------------------------------------------------------------------

    def predict(self, denoiser, sample: torch.Tensor, timestep: int, condition=None) -> torch.Tensor:
        """The denoiser's output at integer ``timestep`` for ``sample`` (``condition`` from `encode_prompt`)."""
        return denoiser(sample, torch.tensor(int(timestep), device=sample.device)).sample

    # 5. the step maths ---------------------------------------------------------------------------------------

    @property
    def num_train_timesteps(self) -> int:
        return int(self.pipe.scheduler.config.num_train_timesteps)

    def timesteps(self, t0: int, num_steps: int) -> list[int]:
        """The ascending grid ``[0, ..., t0]`` that inversion and generation share."""
        raise NotImplementedError

    def generation_scheduler(self, timesteps: list[int]):
        """A scheduler that steps down ``timesteps`` (ascending, as `timesteps` returns them) to the clean image."""
        raise NotImplementedError

    def inversion_scheduler(self, timesteps: list[int]):
        """A scheduler that steps up ``timesteps`` from the clean image; its ``source_timestep(t)`` is the level a
        step to ``t`` starts from (-1: the clean image)."""
        raise NotImplementedError

    def noise_to(self, x0: torch.Tensor, t0: int, generator=None) -> torch.Tensor:
        """The closed-form forward encoding of ``x0`` at ``t0`` (``encoding="noise"``), noise from ``generator``."""
        raise NotImplementedError


class DDIMFamily(ModelFamily):
    """Noise-prediction UNets (`UNet2DModel`, `UNet2DConditionModel`): DDIM on ``alphas_cumprod``, over
    DiffusionCLIP's grid ``int(linspace(0, t0, S))`` (`scheduling_ddim_grid`)."""

    @classmethod
    def prepare_schedulers(cls, scheduler, inverse_scheduler):
        """A `DDIMScheduler` and a `DDIMInverseScheduler` built from the configs given (any scheduler's, e.g. a
        DDPM's), with ``clip_sample=False``."""
        scheduler = as_deterministic(scheduler, DDIMScheduler)
        return scheduler, as_deterministic(inverse_scheduler or scheduler, DDIMInverseScheduler)

    def timesteps(self, t0: int, num_steps: int) -> list[int]:
        """DiffusionCLIP's grid ``int(linspace(0, t0, S))``; for a scheduler with ``timestep_spacing="trailing"``
        (SDXL-Turbo / Lightning-style few-step checkpoints, distilled on grids that end at ``t0`` and skip the low
        timesteps) diffusers' trailing rule on ``[0, t0]``: ``round(k (t0 + 1) / S) - 1``, k = 1..S (for ``t0`` 999
        and 4 steps: 249, 499, 749, 999, the stock grid), the lowest step going straight to the clean image."""
        if self.pipe.scheduler.config.get("timestep_spacing") != "trailing" or num_steps == 1:
            return ddim_timesteps(t0, num_steps, self.num_train_timesteps)
        ddim_timesteps(t0, 1, self.num_train_timesteps)  # the same checks of t0
        n = int(num_steps)
        return sorted({max(round((int(t0) + 1) * k / n) - 1, 0) for k in range(1, n + 1)})

    def generation_scheduler(self, timesteps: list[int]) -> GridDDIMScheduler:
        scheduler = GridDDIMScheduler.from_config(self.pipe.scheduler.config)
        scheduler.set_timesteps(timesteps=timesteps)
        return scheduler

    def inversion_scheduler(self, timesteps: list[int]) -> GridDDIMInverseScheduler:
        scheduler = GridDDIMInverseScheduler.from_config(self.pipe.inverse_scheduler.config)
        scheduler.set_timesteps(timesteps=timesteps)
        return scheduler

    def noise_to(self, x0: torch.Tensor, t0: int, generator=None) -> torch.Tensor:
        # q(x_t0 | x0) = N(sqrt(a_t0) x0, (1 - a_t0) I): DDPM eq. (4), EffDiff's encoding
        alpha = self.pipe.scheduler.alphas_cumprod[int(t0)].to(device=x0.device, dtype=x0.dtype)
        noise = randn_tensor(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise


def as_deterministic(scheduler, cls):
    """``cls`` built from ``scheduler``'s config with ``clip_sample=False`` (clipping x0 breaks DDIM inversion)."""
    if type(scheduler) is cls and not scheduler.config.clip_sample:
        return scheduler
    if scheduler.config.get("clip_sample", False):
        logger.info(f"Building {cls.__name__} with clip_sample=False from the {type(scheduler).__name__} config.")
    accepted = set(inspect.signature(cls.__init__).parameters)
    config = {k: v for k, v in scheduler.config.items() if k in accepted}  # e.g. DDPM's variance_type: not DDIM's
    return cls.from_config(config, clip_sample=False)

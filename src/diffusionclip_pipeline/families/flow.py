"""The step-maths half of a flow-matching model family (SD3, Flux): velocity-predicting transformers sampled by Euler
steps on the scheduler's shifted sigma grid (`scheduling_flow_match_grid`).

`FlowMatchFamily` implements part 5 of the protocol (`base.ModelFamily`): the grid (`flow_timesteps`), the two
schedulers built from ``pipe.scheduler.config`` (a `FlowMatchEulerDiscreteScheduler` config, as SD3 and Flux ship),
and the closed-form forward encoding ``(1 - sigma) x0 + sigma * noise``. With dynamic shifting (Flux), the sigma of
a timestep depends on the image's token count through ``mu`` (`shift_mu`, which a concrete family overrides).

Still abstract, for the concrete SD3 / Flux families: `matches`, `check_components`, `encode` / `decode` (the
16-channel VAE with its ``shift_factor``; Flux packs latents 2x2 into a sequence), `encode_prompt` and `predict`
(which should pass the model `model_timestep(t, sample)`: SD3 takes it as is, Flux divided by 1000).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor

from ..scheduling_flow_match_grid import (
    FlowMatchGridInverseScheduler,
    FlowMatchGridScheduler,
    check_flow_config,
    flow_sigma,
    flow_timesteps,
)
from ..utils.checks import check_timestep
from .base import ModelFamily

# the joint-attention projections of SD3's and Flux's transformer blocks (image stream; the concrete families may
# add the text stream's ``add_q_proj`` ... as diffusers' DreamBooth-LoRA scripts for SD3 / Flux do)
FLOW_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")


class FlowMatchFamily(ModelFamily):
    """Flow-matching (velocity) models: Euler both ways on the shifted sigma grid of ``pipe.scheduler.config``.

    A concrete family adds the components, the autoencoder, the conditioning and the denoiser call; ``predict``
    returns the velocity ``v ~ noise - x0`` and calls the model at `model_timestep`. The schedulers' outputs carry
    ``pred_original_sample = x - sigma * v``, the x0 estimate the losses take.
    """

    default_lora_target_modules: ClassVar[tuple[str, ...]] = FLOW_TARGET_MODULES
    # the clean image is sigma 0 exactly, so the official DDIM code's shortcut (the image taken as x at t = 0) has
    # no flow analogue
    inversion_starts: ClassVar[tuple[str, ...]] = ("clean",)
    supports_eta: ClassVar[bool] = False  # deterministic Euler steps only
    lowest_timestep: ClassVar[int] = 1  # t = 0 is the clean image, below the grid

    @classmethod
    def prepare_schedulers(cls, scheduler, inverse_scheduler):
        """The `FlowMatchEulerDiscreteScheduler` given (checked: the plain shifted Euler ODE) and no inverse
        scheduler: both directions are built from its config on each call (`FlowMatchGridScheduler`,
        `FlowMatchGridInverseScheduler`)."""
        if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
            raise TypeError(
                f"A flow-matching `{cls.denoiser_name}` needs a `FlowMatchEulerDiscreteScheduler` `scheduler`, got "
                f"{type(scheduler).__name__}."
            )
        if inverse_scheduler is not None:
            raise ValueError(
                "`inverse_scheduler` must be None for a flow-matching model: the inversion steps up the scheduler's "
                f"own grid (`FlowMatchGridInverseScheduler`), got {type(inverse_scheduler).__name__}."
            )
        check_flow_config(scheduler.config)
        return scheduler, None

    @property
    def scheduler_config(self):
        """The `FlowMatchEulerDiscreteScheduler` config the grid schedulers are built from (``pipe.scheduler``'s)."""
        return self.pipe.scheduler.config

    def shift_mu(self, sample: torch.Tensor | None = None) -> float | None:
        """The dynamic shift ``mu`` for ``sample`` (denoiser-space latents; `None`: the pipeline's image size), or
        `None` for a static ``shift``. Flux overrides it: `dynamic_shift_mu` of the image's token count."""
        return None

    def sigma(self, timestep: int, sample: torch.Tensor | None = None) -> float:
        """The float64 noise level of integer ``timestep`` (the t0 rule of `scheduling_flow_match_grid`)."""
        return flow_sigma(int(timestep), self.scheduler_config, mu=self.shift_mu(sample))

    def model_timestep(self, timestep: int, sample: torch.Tensor) -> torch.Tensor:
        """The model's timestep input for integer ``timestep``, one per sample: ``sigma * num_train_timesteps`` in
        float32 on ``sample``'s device (SD3 takes it as is, Flux divided by 1000)."""
        value = self.sigma(timestep, sample) * self.num_train_timesteps
        return torch.full((sample.shape[0],), value, dtype=torch.float32, device=sample.device)

    # 5. the step maths ---------------------------------------------------------------------------------------

    def timesteps(self, t0: int, num_steps: int) -> list[int]:
        return flow_timesteps(t0, num_steps, self.num_train_timesteps)

    def generation_scheduler(self, timesteps: list[int], sample: torch.Tensor | None = None) -> FlowMatchGridScheduler:
        scheduler = FlowMatchGridScheduler.from_config(self.scheduler_config)
        scheduler.set_timesteps(timesteps=timesteps, mu=self.shift_mu(sample))
        return scheduler

    def inversion_scheduler(
        self, timesteps: list[int], sample: torch.Tensor | None = None
    ) -> FlowMatchGridInverseScheduler:
        scheduler = FlowMatchGridInverseScheduler.from_config(self.scheduler_config)
        scheduler.set_timesteps(timesteps=timesteps, mu=self.shift_mu(sample))
        return scheduler

    def noise_to(self, x0: torch.Tensor, t0: int, generator=None) -> torch.Tensor:
        # rectified-flow forward path x_sigma = (1 - sigma) x0 + sigma * noise: the stock `scale_noise` at t0
        t0 = check_timestep(t0, "t0", self.num_train_timesteps)
        scheduler = FlowMatchGridScheduler.from_config(self.scheduler_config)
        scheduler.set_timesteps(timesteps=[t0], mu=self.shift_mu(x0))
        noise = randn_tensor(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return scheduler.noise_to(x0, t0, noise)

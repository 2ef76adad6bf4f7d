"""Timestep grids and deterministic DDIM steps on explicit (possibly non-uniform) grids.

DiffusionCLIP (Kim, Kwon, Ye, CVPR 2022, arXiv 2110.02711) inverts an image to a middle timestep ``t0`` and
regenerates it from there, on the grid ``int(linspace(0, t0, S))``. diffusers' `DDIMScheduler` and
`DDIMInverseScheduler` always step by the integer stride ``T // num_inference_steps``, so they can neither stop
at an arbitrary ``t0`` nor follow DiffusionCLIP's grid (strides of 12 and 13 for ``t0 = 500, S = 40``). The two
subclasses below add an explicit ``timesteps=`` grid to ``set_timesteps`` and step to the neighbouring grid
point; on a uniform grid they are bitwise identical to the stock schedulers (tested).

Grid convention (shared by both directions, so that inversion and generation pass through the same noise
levels): a grid ``[tau_0 = 0, tau_1, ..., tau_{n-1} = t0]`` has ``n`` steps. Step ``k`` connects ``tau_{k-1}``
and ``tau_k``, where ``tau_{-1}`` is the clean image (``alpha_cumprod = 1`` when ``set_alpha_to_one``, the
diffusers default; else ``alphas_cumprod[0]``). This is exactly diffusers' convention on uniform grids.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from .utils.checks import check_int, check_positive_int, check_timestep


def ddim_timesteps(t0: int, num_steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """Ascending DiffusionCLIP grid ``[0, ..., t0]`` of ``num_steps`` points (``int(linspace(0, t0, num_steps))``).

    When ``num_steps > t0 + 1`` the integer grid has repeated points; they are dropped (a step between equal
    timesteps would be a wasted model call) and a warning says how many steps remain.

    Args:
        t0 (`int`): The last (highest) timestep, in ``[1, num_train_timesteps - 1]``.
        num_steps (`int`): The number of steps (grid points), at least 1.
        num_train_timesteps (`int`, *optional*, defaults to 1000): The model's number of training timesteps.

    Returns:
        `list[int]`: The strictly increasing grid; it starts at 0 and ends at ``t0`` (for ``num_steps >= 2``).
    """
    t0 = check_timestep(t0, "t0", num_train_timesteps)
    num_steps = check_positive_int(num_steps, "num_steps")
    if num_steps == 1:
        return [int(t0)]
    if num_steps > t0 + 1:  # every integer in [0, t0] is hit: no need to build a huge linspace (1e9 steps: 7.5 GiB)
        grid, unique = range(num_steps), list(range(int(t0) + 1))
    else:
        grid = [int(s) for s in np.linspace(0.0, 1.0, int(num_steps)) * int(t0)]
        unique = sorted(set(grid))
    if len(unique) < len(grid):
        warnings.warn(
            f"{num_steps} steps do not fit between 0 and t0={t0}: using the {len(unique)} distinct integer "
            "timesteps instead (the output's `timesteps` holds the grid used).",
            stacklevel=2,
        )
    return unique


def _ddim_update(
    scheduler,
    model_output: torch.Tensor,
    sample: torch.Tensor,
    alpha_prod_t: torch.Tensor,
    alpha_prod_t_next: torch.Tensor,
    eta: float = 0.0,
    generator: torch.Generator | list[torch.Generator] | None = None,
    variance_noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DDIM eq. (12) of Song et al. (arXiv 2010.02502) from noise level ``alpha_prod_t`` to ``alpha_prod_t_next``.

    Runs either way: with ``alpha_prod_t_next > alpha_prod_t`` it denoises, with ``<`` it is the deterministic
    inversion (the DDIM ODE run forward), which DiffusionCLIP uses to encode real images. Mirrors the arithmetic of
    `DDIMScheduler.step` (same operations in the same order, so results are bitwise equal on uniform grids).
    """
    beta_prod_t = 1 - alpha_prod_t
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        pred_original_sample = (sample - beta_prod_t ** (0.5) * model_output) / alpha_prod_t ** (0.5)
        pred_epsilon = model_output
    elif prediction_type == "sample":
        pred_original_sample = model_output
        if float(beta_prod_t) == 0.0:
            # from the clean image (alpha = 1) the noise direction is undefined: take eps = 0, the limit for a
            # perfect model (diffusers' DDIMInverseScheduler divides by zero here, diffusers#10920)
            pred_epsilon = torch.zeros_like(sample)
        else:
            pred_epsilon = (sample - alpha_prod_t ** (0.5) * pred_original_sample) / beta_prod_t ** (0.5)
    elif prediction_type == "v_prediction":
        pred_original_sample = (alpha_prod_t**0.5) * sample - (beta_prod_t**0.5) * model_output
        pred_epsilon = (alpha_prod_t**0.5) * model_output + (beta_prod_t**0.5) * sample
    else:
        raise ValueError(f"`prediction_type` must be one of epsilon, sample, v_prediction, got {prediction_type!r}.")

    if scheduler.config.clip_sample:
        pred_original_sample = pred_original_sample.clamp(
            -scheduler.config.clip_sample_range, scheduler.config.clip_sample_range
        )

    std_dev_t = 0.0
    if eta > 0:
        # DDIM sigma(eta); only defined when denoising (the forward ODE has no stochastic form)
        variance = ((1 - alpha_prod_t_next) / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_next)
        std_dev_t = eta * variance ** (0.5)

    pred_sample_direction = (1 - alpha_prod_t_next - std_dev_t**2) ** (0.5) * pred_epsilon
    prev_sample = alpha_prod_t_next ** (0.5) * pred_original_sample + pred_sample_direction

    if eta > 0:
        if variance_noise is None:
            variance_noise = randn_tensor(
                model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype
            )
        prev_sample = prev_sample + std_dev_t * variance_noise
    return prev_sample, pred_original_sample


def explicit_grid(timesteps, num_train_timesteps: int, lowest: int = 0) -> list[int]:
    """``timesteps`` checked as a strictly increasing integer grid in ``[lowest, num_train_timesteps - 1]`` (the
    DDIM and flow-matching grid schedulers share it; a flow grid starts at 1, t = 0 being the clean image)."""
    grid = [check_int(t, "timesteps") for t in timesteps]
    if not grid:
        raise ValueError("`timesteps` must not be empty.")
    if any(b <= a for a, b in zip(grid, grid[1:])):
        raise ValueError(f"`timesteps` must be strictly increasing, got {grid}.")
    if grid[0] < lowest or grid[-1] > num_train_timesteps - 1:
        raise ValueError(f"`timesteps` must lie in [{lowest}, {num_train_timesteps - 1}], got {grid}.")
    return grid


def grid_point_below(grid: list[int], timestep) -> int:
    """The point of the ascending ``grid`` below ``timestep`` (-1, the clean image, below the lowest)."""
    t = int(timestep)
    if t not in grid:
        raise ValueError(f"`timestep` {t} is not on the grid {grid}.")
    k = grid.index(t)
    return grid[k - 1] if k > 0 else -1


class _ExplicitGrid:
    """What both grid schedulers share: an optional explicit ascending grid and its lower-neighbour lookup."""

    _grid: list[int] | None = None

    def _set_grid(self, num_inference_steps, device, timesteps, descending: bool):
        if timesteps is None:
            self._grid = None
            return super().set_timesteps(num_inference_steps, device=device)
        self._grid = explicit_grid(timesteps, self.config.num_train_timesteps)
        self.num_inference_steps = len(self._grid)
        order = self._grid[::-1] if descending else self._grid
        self.timesteps = torch.tensor(order, dtype=torch.long, device=device)

    def _grid_below(self, timestep) -> int:
        """The grid point below ``timestep`` (-1, the clean image, below the lowest); the stock stride without grid."""
        if self._grid is None:
            return int(timestep) - self.config.num_train_timesteps // self.num_inference_steps
        return grid_point_below(self._grid, timestep)


class GridDDIMScheduler(_ExplicitGrid, DDIMScheduler):
    """`DDIMScheduler` that can also run on an explicit grid: ``set_timesteps(timesteps=[0, ..., t0])``.

    ``timesteps`` is given ascending (as returned by `ddim_timesteps`) and stored descending, like the stock
    scheduler's. `step` goes from ``t`` to the next lower grid point, and from the lowest to the clean image
    (``final_alpha_cumprod``). Without ``timesteps`` it behaves exactly as `DDIMScheduler`.
    """

    def set_timesteps(self, num_inference_steps=None, device=None, timesteps=None):
        return self._set_grid(num_inference_steps, device, timesteps, descending=True)

    def previous_timestep(self, timestep) -> int:
        """The grid point the step from ``timestep`` lands on (-1 means the clean image)."""
        return self._grid_below(timestep)

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator=None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ):
        if self._grid is None:
            return super().step(
                model_output, timestep, sample, eta, use_clipped_model_output, generator, variance_noise, return_dict
            )
        t = int(timestep)
        prev_t = self.previous_timestep(t)
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        prev_sample, pred_original_sample = _ddim_update(
            self, model_output, sample, alpha_prod_t, alpha_prod_t_prev, eta, generator, variance_noise
        )
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return DDIMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)


class GridDDIMInverseScheduler(_ExplicitGrid, DDIMInverseScheduler):
    """`DDIMInverseScheduler` that can also run on an explicit ascending grid (``set_timesteps(timesteps=...)``).

    As in the stock scheduler, ``step(model_output, timestep, sample)`` takes the *target* ``timestep``; the source
    is the previous grid point (the clean image, ``initial_alpha_cumprod``, before the first). DiffusionCLIP
    evaluates the model at the source level: use `source_timestep` for the UNet's timestep label.
    """

    def set_timesteps(self, num_inference_steps=None, device=None, timesteps=None):
        return self._set_grid(num_inference_steps, device, timesteps, descending=False)

    def source_timestep(self, timestep) -> int:
        """The grid point a step *to* ``timestep`` starts from (-1 means the clean image)."""
        return self._grid_below(timestep)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        if self._grid is None:
            return super().step(model_output, timestep, sample, return_dict)
        t = int(timestep)
        source_t = self.source_timestep(t)
        alpha_prod_t = self.alphas_cumprod[source_t] if source_t >= 0 else self.initial_alpha_cumprod
        alpha_prod_t_next = self.alphas_cumprod[t]
        prev_sample, pred_original_sample = _ddim_update(self, model_output, sample, alpha_prod_t, alpha_prod_t_next)
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return DDIMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

"""Deterministic Euler steps both ways on a flow-matching model's (shifted) sigma grid: DiffusionCLIP's inversion and
regeneration for rectified-flow models (SD3, Flux), which diffusers has no inverse scheduler for (diffusers issues
#9607, #9924, #10511).

A flow-matching model (Lipman et al., arXiv 2210.02747; rectified flow, Liu et al., arXiv 2209.03003) is trained on
straight paths ``x_sigma = (1 - sigma) x0 + sigma * noise`` and predicts the velocity ``v ~ noise - x0``; sampling is
the Euler step ``x_next = x + (sigma_next - sigma) * v(x, sigma)`` (`FlowMatchEulerDiscreteScheduler.step`). The two
schedulers below take that step on an explicit integer grid, down (`FlowMatchGridScheduler`, generation) and up
(`FlowMatchGridInverseScheduler`, inversion, the velocity taken at the source point as DDIM inversion takes eps),
with the step interface of `scheduling_ddim_grid`'s schedulers, so that the pipeline's loops drive both families.

The ``t0`` rule (one for every flow model): a timestep is an integer ``t`` in ``[1, num_train_timesteps - 1]`` on the
scheduler's 1000-step scale, and its noise level is the *shifted* sigma the stock scheduler gives that (pre-shift)
timestep, with ``s = t / num_train_timesteps``:

- static shift (SD3: ``shift = 3.0``): ``sigma(t) = shift * s / (1 + (shift - 1) * s)``;
- dynamic shifting (Flux: ``use_dynamic_shifting``, ``mu`` from the image sequence length, `dynamic_shift_mu`):
  ``sigma(t) = exp(mu) / (exp(mu) + 1 / s - 1)`` (``time_shift_type="exponential"``) or
  ``mu / (mu + 1 / s - 1)`` (``"linear"``).

``t = 0`` has ``sigma = 0``: it *is* the clean image. The grid (`flow_timesteps`) is therefore
``floor(k * t0 / S)`` for ``k = 1 .. S``, uniform in ``s`` as the stock SD3 / Flux grids are (Flux's default sampling
grid is this one with ``t0 = 1000``); its ``S`` points are ``S`` steps each way, and the clean image (sigma 0,
labelled ``-1`` as in `scheduling_ddim_grid`) lies below the lowest point. (`ddim_timesteps` starts its grid at
0 instead because DDIM's ``t = 0`` is a real noise level, ``alphas_cumprod[0] < 1``; here it would be a step of
length zero, a wasted model call.)

Dtypes: sigmas are computed in float64 (Python floats) from the integer grid; a step is taken in float32 at least
(the sample is upcast, as the stock step does; a float64 sample stays float64) with the float64 step length rounded
once, and the result is cast to ``model_output``'s dtype, as the stock step does. The generation step from ``t`` to
``s`` and the inversion step from ``s`` to ``t`` use step lengths of exactly opposite sign. ``scheduler.timesteps``
holds the integer grid (the project's convention, what the pipeline passes to the family's ``predict`` and reports);
the model's own timestep input is `model_timestep`, ``sigma(t) * num_train_timesteps`` (what the stock schedulers'
``timesteps`` hold).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.utils import BaseOutput

from .scheduling_ddim_grid import explicit_grid, grid_point_below
from .utils.checks import check_int, check_number, check_positive_int, check_timestep

__all__ = [
    "FlowMatchGridInverseScheduler",
    "FlowMatchGridScheduler",
    "FlowMatchGridSchedulerOutput",
    "check_flow_config",
    "dynamic_shift_mu",
    "flow_sigma",
    "flow_timesteps",
]

# options of `FlowMatchEulerDiscreteScheduler` that change the sigma schedule or the step away from the plain
# (shifted) Euler ODE this module inverts; each is refused by name
_UNSUPPORTED = {
    "invert_sigmas": "inverted sigmas (Mochi) reverse the noise direction",
    "shift_terminal": "a stretched terminal sigma moves every grid point off the t0 rule",
    "use_karras_sigmas": "Karras sigmas replace the grid",
    "use_exponential_sigmas": "exponential sigmas replace the grid",
    "use_beta_sigmas": "beta sigmas replace the grid",
    "stochastic_sampling": "stochastic sampling is not deterministic, so it cannot be inverted",
}


@dataclass
class FlowMatchGridSchedulerOutput(BaseOutput):
    """Output of the grid schedulers' ``step``.

    Args:
        prev_sample (`torch.Tensor`): The sample at the step's target level (lower when generating, higher when
            inverting).
        pred_original_sample (`torch.Tensor`): The x0 estimate ``x - sigma * v`` at the point where the velocity was
            evaluated (the step's source), as the losses take it.
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


def check_flow_config(config) -> None:
    """`ValueError` naming the option when a `FlowMatchEulerDiscreteScheduler` ``config`` is not the plain shifted
    Euler ODE (`_UNSUPPORTED`), or its ``time_shift_type`` is unknown."""
    for option, why in _UNSUPPORTED.items():
        if config.get(option, None):
            raise ValueError(
                f"`{option}={config[option]!r}` is not supported by the flow-matching grid schedulers: {why}. "
                f"Use a scheduler config with `{option}` unset."
            )
    time_shift_type = config.get("time_shift_type", "exponential")
    if config.get("use_dynamic_shifting", False) and time_shift_type not in ("exponential", "linear"):
        raise ValueError(f"`time_shift_type` must be 'exponential' or 'linear', got {time_shift_type!r}.")


def dynamic_shift_mu(image_seq_len: int, config) -> float:
    """The ``mu`` of dynamic shifting for ``image_seq_len`` tokens: the line through ``(base_image_seq_len,
    base_shift)`` and ``(max_image_seq_len, max_shift)`` of the scheduler ``config``, as diffusers' Flux and SD3
    pipelines compute it (``calculate_shift``). Flux's sequence is ``(H / 16) * (W / 16)`` for an ``H x W`` image
    (VAE factor 8, 2x2 packing): 256 at 256 px (``mu = base_shift``), 4096 at 1024 px (``mu = max_shift``)."""
    image_seq_len = check_positive_int(image_seq_len, "image_seq_len")
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    m = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * m + (base_shift - m * base_len)


def flow_sigma(timestep: int, config, mu: float | None = None, shift: float | None = None) -> float:
    """The noise level of integer ``timestep`` under a `FlowMatchEulerDiscreteScheduler` ``config`` (the t0 rule of the
    module docstring), in float64; ``timestep`` 0 and -1 are the clean image, sigma 0.

    Args:
        timestep (`int`): In ``[-1, num_train_timesteps]``.
        config: The scheduler's config (``num_train_timesteps``, ``shift``, ``use_dynamic_shifting``,
            ``time_shift_type``).
        mu (`float`, *optional*): Needed with ``use_dynamic_shifting`` (see `dynamic_shift_mu`); ignored otherwise.
        shift (`float`, *optional*): Overrides ``config.shift`` (a scheduler's `set_shift`).

    Returns:
        `float`: ``sigma`` in ``[0, 1]``.
    """
    num_train_timesteps = int(config["num_train_timesteps"])
    t = check_int(timestep, "timestep", minimum=-1, maximum=num_train_timesteps)
    if t <= 0:
        return 0.0
    s = t / num_train_timesteps
    if config.get("use_dynamic_shifting", False):
        if mu is None:
            raise ValueError("`mu` must be given when the scheduler config sets `use_dynamic_shifting`.")
        mu = check_number(mu, "mu")
        # diffusers' `_time_shift_exponential` / `_time_shift_linear` with sigma = 1 (Flux, SD3.5 at any size)
        if config.get("time_shift_type", "exponential") == "linear":
            return mu / (mu + (1 / s - 1))
        return math.exp(mu) / (math.exp(mu) + (1 / s - 1))
    shift = float(config.get("shift", 1.0) if shift is None else shift)
    return shift * s / (1 + (shift - 1) * s)


def flow_timesteps(t0: int, num_steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """Ascending flow grid of ``num_steps`` points ``floor(k * t0 / num_steps)``, ``k = 1 .. num_steps``.

    The clean image (``t = 0``, sigma 0) lies below the lowest point, so ``num_steps`` points are ``num_steps`` steps
    each way. When ``num_steps > t0`` the integer grid repeats points; they are dropped (a step between equal
    timesteps would be a wasted model call) and a warning says how many steps remain.

    Args:
        t0 (`int`): The last (highest) timestep, in ``[1, num_train_timesteps - 1]``.
        num_steps (`int`): The number of steps (grid points), at least 1.
        num_train_timesteps (`int`, *optional*, defaults to 1000): The scheduler's ``num_train_timesteps``.

    Returns:
        `list[int]`: The strictly increasing grid; it ends at ``t0`` and holds no 0.
    """
    t0 = check_timestep(t0, "t0", num_train_timesteps)
    num_steps = check_positive_int(num_steps, "num_steps")
    grid = [k * t0 // num_steps for k in range(1, num_steps + 1)]  # integer maths: no float truncation error
    unique = sorted(set(grid) - {0})
    if len(unique) < len(grid):
        warnings.warn(
            f"{num_steps} steps do not fit between 0 and t0={t0}: using the {len(unique)} distinct positive integer "
            "timesteps instead (the output's `timesteps` holds the grid used).",
            stacklevel=2,
        )
    return unique


class _FlowMatchGrid(FlowMatchEulerDiscreteScheduler):
    """What both directions share: the config check, the explicit grid, its sigmas and neighbours."""

    _grid: list[int] | None = None
    _mu: float | None = None
    _descending: bool = True

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: list[float] | None = None,
        mu: float | None = None,
        timesteps: list[int] | None = None,
    ) -> None:
        """Sets the integer grid (ascending, as `flow_timesteps` returns it) and, with dynamic shifting, ``mu``.

        Args:
            num_inference_steps (`int`, *optional*): If given, must equal ``len(timesteps)``.
            device (`str` or `torch.device`, *optional*): Where ``timesteps`` and ``sigmas`` are put.
            sigmas (*optional*): Refused: the sigmas follow from the grid by the t0 rule.
            mu (`float`, *optional*): The dynamic shift (required with ``use_dynamic_shifting``, else ignored).
            timesteps (`list[int]`): The strictly increasing grid in ``[1, num_train_timesteps - 1]``.
        """
        check_flow_config(self.config)
        if sigmas is not None:
            raise ValueError("`sigmas` is not supported: pass the integer grid `timesteps` (see `flow_timesteps`).")
        if timesteps is None:
            raise ValueError("`timesteps` (the integer grid, see `flow_timesteps`) must be given.")
        grid = explicit_grid(timesteps, self.config.num_train_timesteps, lowest=1)
        if num_inference_steps is not None and num_inference_steps != len(grid):
            raise ValueError(
                f"`num_inference_steps` ({num_inference_steps}) must equal the length of `timesteps` ({len(grid)})."
            )
        if self.config.use_dynamic_shifting and mu is None:
            raise ValueError("`mu` must be passed when the scheduler config sets `use_dynamic_shifting`.")
        self._mu = None if mu is None else check_number(mu, "mu")
        self._grid = grid
        self.num_inference_steps = len(grid)
        order = grid[::-1] if self._descending else grid
        # generation: [t0 .. lowest] then the clean image; inversion: the clean image then [lowest .. t0]
        levels = order + [0] if self._descending else [0] + order
        self.timesteps = torch.tensor(order, dtype=torch.long, device=device)
        self.sigmas = torch.tensor([self.sigma(t) for t in levels], dtype=torch.float64, device=device)
        self._step_index = None
        self._begin_index = None

    def sigma(self, timestep) -> float:
        """The float64 noise level of integer ``timestep`` on this scheduler (-1 and 0: the clean image)."""
        return flow_sigma(int(timestep), self.config, mu=self._mu, shift=self.shift)

    def model_timestep(self, timestep) -> float:
        """The model's timestep input at integer ``timestep``: ``sigma * num_train_timesteps`` (SD3 takes it as is,
        Flux divided by 1000), what the stock scheduler's ``timesteps`` hold."""
        return self.sigma(timestep) * self.config.num_train_timesteps

    def _grid_below(self, timestep) -> int:
        if self._grid is None:
            raise ValueError("Call `set_timesteps(timesteps=...)` before stepping.")
        return grid_point_below(self._grid, timestep)

    def noise_to(self, x0: torch.Tensor, t0: int, noise: torch.Tensor) -> torch.Tensor:
        """The closed-form forward encoding ``(1 - sigma) x0 + sigma * noise`` at integer ``t0`` (EffDiff's
        forward-noise encoding for flows), equal to the stock ``scale_noise`` at ``t0``'s sigma."""
        t0 = check_timestep(t0, "t0", self.config.num_train_timesteps)
        if noise.shape != x0.shape:
            raise ValueError(f"`noise` must have the shape of `x0` {tuple(x0.shape)}, got {tuple(noise.shape)}.")
        sigma = torch.tensor(self.sigma(t0), dtype=x0.dtype, device=x0.device)
        return sigma * noise + (1.0 - sigma) * x0  # the stock `scale_noise`'s operations, in its order

    def scale_noise(self, sample: torch.Tensor, timestep, noise: torch.Tensor) -> torch.Tensor:
        """`noise_to` at the integer ``timestep`` (one for the batch), so that the stock name does not silently
        read the integer grid as the stock scheduler's float timesteps."""
        return self.noise_to(sample, int(torch.as_tensor(timestep).reshape(-1)[0]), noise)

    def _euler(self, model_output, sample, sigma_from: float, sigma_to: float, return_dict: bool):
        compute_dtype = torch.promote_types(sample.dtype, torch.float32)  # upcast as the stock step does
        x = sample.to(compute_dtype)
        v = model_output.to(compute_dtype)
        prev_sample = (x + (sigma_to - sigma_from) * v).to(model_output.dtype)  # Euler: x + (sigma' - sigma) v
        pred_original_sample = (x - sigma_from * v).to(model_output.dtype)  # x0 = x_sigma - sigma * v
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return FlowMatchGridSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)


class FlowMatchGridScheduler(_FlowMatchGrid):
    """Generation: Euler *down* an explicit flow grid, ``set_timesteps(timesteps=[..., t0], mu=None)``.

    ``step(v, t, x)`` goes from ``t`` to the next lower grid point, and from the lowest to the clean image (sigma 0):
    ``x + (sigma(prev) - sigma(t)) * v``, with ``pred_original_sample = x - sigma(t) * v``. Built from any
    `FlowMatchEulerDiscreteScheduler` config (``from_config``); refuses the options that are not the plain shifted
    Euler ODE (`check_flow_config`).

    >>> scheduler = FlowMatchGridScheduler(shift=3.0)  # SD3's
    >>> scheduler.set_timesteps(timesteps=flow_timesteps(t0=600, num_steps=4))
    >>> scheduler.timesteps.tolist(), [round(s, 4) for s in scheduler.sigmas.tolist()]
    ([600, 450, 300, 150], [0.8182, 0.7105, 0.5625, 0.3462, 0.0])
    """

    _descending = True

    def previous_timestep(self, timestep) -> int:
        """The grid point the step from ``timestep`` lands on (-1 means the clean image)."""
        return self._grid_below(timestep)

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> FlowMatchGridSchedulerOutput | tuple:
        """One Euler step down from integer ``timestep``; ``model_output`` is the velocity at ``(sample,
        timestep)``. ``eta`` must be 0 (``generator`` is unused): the deterministic ODE is what inversion inverts."""
        if eta != 0:
            raise ValueError(f"`eta` must be 0 for a flow-matching model (deterministic Euler steps), got {eta}.")
        prev_t = self.previous_timestep(timestep)
        return self._euler(model_output, sample, self.sigma(timestep), self.sigma(prev_t), return_dict)


class FlowMatchGridInverseScheduler(_FlowMatchGrid):
    """Inversion: Euler *up* the same grid as `FlowMatchGridScheduler`, from the clean image to ``t0``.

    As `GridDDIMInverseScheduler`, ``step(v, t, x)`` takes the *target* ``t`` (``timesteps`` ascend); the source is
    `source_timestep` (-1, the clean image, before the lowest point), where the caller evaluates the velocity:
    ``x + (sigma(t) - sigma(source)) * v(x, source)``, with ``pred_original_sample = x - sigma(source) * v``.
    Fixed-point refinement (Pan et al., arXiv 2309.04907) is the caller's loop: ``x_t <- step(v(x_t, t), t, x_s)``
    solves ``x_t = x_s + (sigma(t) - sigma(s)) v(x_t, t)``, the exact inverse of the generation step.
    """

    _descending = False

    def source_timestep(self, timestep) -> int:
        """The grid point a step *to* ``timestep`` starts from (-1 means the clean image)."""
        return self._grid_below(timestep)

    def step(
        self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True
    ) -> FlowMatchGridSchedulerOutput | tuple:
        """One Euler step up to integer ``timestep`` from ``sample`` at `source_timestep`."""
        source_t = self.source_timestep(timestep)
        return self._euler(model_output, sample, self.sigma(source_t), self.sigma(timestep), return_dict)

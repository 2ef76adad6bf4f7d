"""Noise-prediction mixing: continuous edit strength and multi-attribute editing (DiffusionCLIP Sec. 3.4).

At every generation step the pipeline evaluates the original UNet and the adapters named in a *mix* and combines

    eps = sum_i m_i * gamma_i(t) * eps_i + (1 - sum_i m_i * gamma_i(t)) * eps_original

where ``gamma_i(t)`` is adapter ``i``'s weight at timestep ``t`` and ``m_i`` an optional spatial mask in [0, 1]. With
one adapter and a constant weight ``r`` this is the paper's continuous transition
``eps = r * eps_adapted + (1 - r) * eps_original``; with weights summing to one and no masks it is the paper's
multi-attribute combination ``eps = sum_i gamma_i(t) eps_i`` (the original model gets weight 0). Masks (beyond the
paper) make local edits: outside an adapter's mask the original model's prediction is kept.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from .utils.checks import check_number

WeightFn = Callable[[int], float]


@dataclass
class MixComponent:
    """One adapter set in a mix: ``adapter_names=None`` means the pipeline's currently active adapters."""

    adapter_names: list[str] | None
    weight: WeightFn
    mask: torch.Tensor | None = None


def constant(value: float) -> WeightFn:
    """A weight that is ``value`` at every timestep."""
    return lambda t: value


def piecewise_weights(schedule: Mapping[int, Mapping[str, float]]) -> dict[str, WeightFn]:
    """Time-dependent weights from thresholds, as DiffusionCLIP's ``HYBRID_CONFIG``.

    ``{300: {"blue": 1, "square": 0}, 0: {"blue": 0.3, "square": 0.7}}`` uses the first row whose threshold the
    timestep reaches (``t >= 300`` -> first row, else the second). Thresholds are sorted in descending order (the
    official code relies on dict insertion order); every row must name the same adapters and sum to a positive value;
    rows are normalised to sum to one, as the official code does.

    Returns:
        `dict[str, Callable[[int], float]]`: usable as ``edit(adapters=...)``.
    """
    if not schedule:
        raise ValueError("`schedule` must not be empty.")
    rows = sorted(schedule.items(), key=lambda kv: -int(kv[0]))
    names = list(rows[0][1])
    for threshold, row in rows:
        if set(row) != set(names):
            raise ValueError(f"Every row of `schedule` must name {names}; row t >= {threshold} has {list(row)}.")
        total = sum(row.values())
        if not total > 0:
            raise ValueError(f"The weights for t >= {threshold} must sum to a positive value, got {dict(row)}.")
    if int(rows[-1][0]) > 0:
        raise ValueError(f"`schedule` must cover t = 0: its lowest threshold is {rows[-1][0]}.")

    def weight_of(name: str) -> WeightFn:
        def weight(t: int) -> float:
            row = next((row for threshold, row in rows if t >= int(threshold)), rows[-1][1])
            return row[name] / sum(row.values())

        return weight

    return {name: weight_of(name) for name in names}


def check_mask(mask, name: str, batch_size: int, size: int) -> torch.Tensor:
    """A mask as a float tensor broadcastable to ``(batch, 1, size, size)`` with values in [0, 1]."""
    if not torch.is_tensor(mask):
        raise TypeError(f"`adapter_masks[{name!r}]` must be a tensor, got {type(mask).__name__}.")
    m = mask.float()
    if m.ndim == 2:
        m = m[None, None]
    elif m.ndim == 3:
        m = m[:, None]
    if m.ndim != 4 or m.shape[1] != 1 or tuple(m.shape[-2:]) != (size, size) or m.shape[0] not in (1, batch_size):
        raise ValueError(
            f"`adapter_masks[{name!r}]` must be (H, W), (B, H, W) or (B, 1, H, W) with H = W = {size} and B in "
            f"(1, {batch_size}), got shape {tuple(mask.shape)}."
        )
    lo, hi = float(m.min()), float(m.max())
    if lo < 0 or hi > 1:
        raise ValueError(f"`adapter_masks[{name!r}]` must lie in [0, 1], got values in [{lo}, {hi}].")
    return m


def build_mix(
    strength: float,
    adapters: Mapping[str, float | WeightFn] | None,
    adapter_masks: Mapping[str, torch.Tensor] | None,
    loaded: Sequence[str],
    batch_size: int,
    size: int,
) -> list[MixComponent] | None:
    """Validates `edit`'s mixing arguments; `None` means "just the currently active adapters" (no mixing)."""
    strength = check_number(strength, "edit_strength")
    if adapters is None:
        if adapter_masks is not None:
            raise ValueError("`adapter_masks` needs `adapters` (a dict of adapter name -> weight).")
        if strength == 1.0:
            return None
        return [MixComponent(None, constant(float(strength)))]
    if strength != 1.0:
        raise ValueError(
            f"Pass either `edit_strength` ({strength}) or `adapters`, not both: scale the adapters' weights."
        )
    if not isinstance(adapters, Mapping) or not adapters:
        raise ValueError(f"`adapters` must be a non-empty dict of adapter name -> weight, got {adapters!r}.")
    unknown = [n for n in adapters if n not in loaded]
    if unknown:
        raise ValueError(f"`adapters` names {unknown}, which are not loaded; loaded adapters: {list(loaded)}.")
    masks = dict(adapter_masks or {})
    stray = [n for n in masks if n not in adapters]
    if stray:
        raise ValueError(f"`adapter_masks` names {stray}, which are not in `adapters` {list(adapters)}.")
    mix = []
    for name, weight in adapters.items():
        if callable(weight):
            fn = weight
        elif isinstance(weight, (int, float)) and not isinstance(weight, bool):
            fn = constant(check_number(weight, f"adapters[{name!r}]"))
        else:
            raise ValueError(f"`adapters[{name!r}]` must be a number or a callable t -> weight, got {weight!r}.")
        mask = check_mask(masks[name], name, batch_size, size) if name in masks else None
        mix.append(MixComponent([name], fn, mask))
    return mix

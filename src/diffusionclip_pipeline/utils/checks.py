"""Argument checks shared by every public entry point (the pipeline, the configs, the schedules, the commands).

One rule for every public entry point: a value of the wrong *type* raises `TypeError`, a value of the right type
but outside what is allowed raises `ValueError`. Each message names the argument in backticks and shows the value,
e.g. ``"`t0` must be an integer in [1, 999], got 1000."``. `bool` is never accepted where a number is expected
(``True`` is an `int` in Python, but never what a caller meant).
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Iterable
from numbers import Integral, Real

import numpy as np

__all__ = [
    "ADAPTER_NAME_PATTERN",
    "check_adapter_name",
    "check_bool",
    "check_callable",
    "check_choice",
    "check_finite_tensor",
    "check_int",
    "check_non_negative_int",
    "check_number",
    "check_positive_int",
    "check_prompt",
    "check_prompt_or_empty",
    "check_timestep",
    "short_repr",
]

# letters, digits, "_" and "-"; at most 64 characters: safe as a file or folder name on every OS, and never a path
ADAPTER_NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")


def short_repr(value, limit: int = 120) -> str:
    """``repr(value)`` cut to ``limit`` characters (tensors and arrays are shown by type and shape)."""
    torch = sys.modules.get("torch")  # never imported: then the value cannot be a tensor
    if (torch is not None and torch.is_tensor(value)) or isinstance(value, np.ndarray):
        return f"{type(value).__name__} of shape {tuple(value.shape)} and dtype {value.dtype}"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(value) -> bool:
    return isinstance(value, Integral) and not isinstance(value, (bool, np.bool_))


def check_int(value, name: str, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as a Python `int` in ``[minimum, maximum]`` (either bound may be open)."""
    if minimum is not None and maximum is not None:
        wanted = f"an integer in [{minimum}, {maximum}]"
    elif minimum is not None:
        wanted = {0: "an integer >= 0", 1: "a positive integer"}.get(minimum, f"an integer >= {minimum}")
    elif maximum is not None:
        wanted = f"an integer <= {maximum}"
    else:
        wanted = "an integer"
    if not _is_int(value):
        raise TypeError(f"`{name}` must be {wanted}, got {short_repr(value)} ({type(value).__name__}).")
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"`{name}` must be {wanted}, got {value}.")
    return value


def check_positive_int(value, name: str) -> int:
    """``value`` as an `int` >= 1."""
    return check_int(value, name, minimum=1)


def check_non_negative_int(value, name: str) -> int:
    """``value`` as an `int` >= 0."""
    return check_int(value, name, minimum=0)


def check_number(
    value,
    name: str,
    minimum: float | None = None,
    maximum: float | None = None,
    min_inclusive: bool = True,
    max_inclusive: bool = True,
) -> float:
    """``value`` as a finite Python `float` within the given bounds (NaN and infinities are always refused)."""
    lo = "" if minimum is None else ("[" if min_inclusive else "(") + f"{minimum}"
    hi = "" if maximum is None else f"{maximum}" + ("]" if max_inclusive else ")")
    if minimum is not None and maximum is not None:
        wanted = f"a finite number in {lo}, {hi}"
    elif minimum is not None:
        wanted = f"a finite number {'>=' if min_inclusive else '>'} {minimum}"
    elif maximum is not None:
        wanted = f"a finite number {'<=' if max_inclusive else '<'} {maximum}"
    else:
        wanted = "a finite number"
    if not isinstance(value, Real) or isinstance(value, (bool, np.bool_)):
        raise TypeError(f"`{name}` must be {wanted}, got {short_repr(value)} ({type(value).__name__}).")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be {wanted}, got {value}.")
    if minimum is not None and (value < minimum if min_inclusive else value <= minimum):
        raise ValueError(f"`{name}` must be {wanted}, got {value}.")
    if maximum is not None and (value > maximum if max_inclusive else value >= maximum):
        raise ValueError(f"`{name}` must be {wanted}, got {value}.")
    return value


def check_timestep(value, name: str, num_train_timesteps: int) -> int:
    """A diffusion timestep strictly inside the training range: an `int` in ``[1, num_train_timesteps - 1]``."""
    return check_int(value, name, minimum=1, maximum=int(num_train_timesteps) - 1)


def check_bool(value, name: str) -> bool:
    """``value`` if it is a `bool` (0 and 1 are not)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"`{name}` must be True or False, got {short_repr(value)} ({type(value).__name__}).")
    return bool(value)


def check_choice(value, name: str, choices: Iterable):
    """``value`` if it is one of ``choices``."""
    choices = tuple(choices)
    if not isinstance(value, str) and all(isinstance(c, str) for c in choices):
        raise TypeError(f"`{name}` must be one of {choices}, got {short_repr(value)} ({type(value).__name__}).")
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {choices}, got {short_repr(value)}.")
    return value


def check_prompt(value, name: str) -> str:
    """A text prompt: a `str` with at least one non-space character."""
    if not isinstance(value, str):
        raise TypeError(f"`{name}` must be a string, got {short_repr(value)} ({type(value).__name__}).")
    if not value.strip():
        raise ValueError(f"`{name}` must be a non-empty string, got {value!r}.")
    return value


def check_prompt_or_empty(value, name: str) -> str:
    """A prompt that may be empty (`None` is the empty prompt), e.g. the conditioning text of a diffusion UNet."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise TypeError(f"`{name}` must be a string or None, got {short_repr(value)} ({type(value).__name__}).")
    return value


def check_callable(value, name: str):
    """``value`` if it can be called."""
    if not callable(value):
        raise TypeError(f"`{name}` must be callable, got {short_repr(value)} ({type(value).__name__}).")
    return value


def check_adapter_name(value, name: str = "adapter_name") -> str:
    """An adapter name that is safe as a file name: 1-64 letters, digits, ``_`` or ``-`` (never a path)."""
    if not isinstance(value, str):
        raise TypeError(f"`{name}` must be a string, got {short_repr(value)} ({type(value).__name__}).")
    if not ADAPTER_NAME_PATTERN.fullmatch(value):
        raise ValueError(
            f"`{name}` must be 1-64 letters, digits, '_' or '-' (it names files and folders), got {value!r}."
        )
    return value


def check_finite_tensor(value, name: str):
    """``value`` if it holds no NaN or infinity."""
    import torch

    if not torch.is_tensor(value):
        raise TypeError(f"`{name}` must be a torch tensor, got {short_repr(value)} ({type(value).__name__}).")
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        bad = int((~torch.isfinite(value)).sum())
        raise ValueError(f"`{name}` holds {bad} non-finite value(s) (NaN or infinity) out of {value.numel()}.")
    return value

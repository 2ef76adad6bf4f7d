"""The settings the commands and the app start from, read from their one source when needed (never copied): the
fields of `FinetuneConfig`, the keyword defaults of `DiffusionCLIPPipeline.edit`, a registered model's recommended
settings, and the front-ends' rule that LoRA alpha follows the rank. Reading them imports torch, so the parsers call
these only when ``--help`` is shown or a command runs."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

from .errors import CLIError
from .registry import registered_models

__all__ = [
    "edit_defaults",
    "finetune_defaults",
    "finetune_fields",
    "rank_settings",
    "signature_defaults",
    "with_model_defaults",
]


def finetune_fields() -> dict[str, dataclasses.Field]:
    """`FinetuneConfig`'s fields by name (their ``metadata["help"]`` is the help of the matching options)."""
    from .. import FinetuneConfig

    return {f.name: f for f in dataclasses.fields(FinetuneConfig)}


def finetune_defaults(*names: str) -> dict[str, Any]:
    """`FinetuneConfig`'s defaults of the fields ``names``."""
    fields = finetune_fields()
    return {name: _field_default(fields[name]) for name in names}


def _field_default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def signature_defaults(function, names: dict[str, str]) -> dict[str, Any]:
    """``{key: default}`` of ``function``'s keyword arguments ``names`` (``{key: argument name}``)."""
    parameters = inspect.signature(function).parameters
    return {key: parameters[name].default for key, name in names.items()}


def edit_defaults(*names: str) -> dict[str, Any]:
    """`DiffusionCLIPPipeline.edit`'s defaults of the keyword arguments ``names``."""
    from .. import DiffusionCLIPPipeline

    return signature_defaults(DiffusionCLIPPipeline.edit, {name: name for name in names})


def rank_settings(rank: int) -> dict[str, Any]:
    """``lora_rank=rank`` with ``lora_alpha=rank``: the front-ends keep the LoRA scale alpha / r at 1 whatever the
    rank, as `FinetuneConfig`'s defaults do, so that a user changing only the rank does not also change the scale."""
    from ..loaders.lora_state import unit_scale_alpha  # the library's policy; imported when used (light --help)

    return {"lora_rank": rank, "lora_alpha": unit_scale_alpha(rank)}


def with_model_defaults(model: str, settings: dict, kind: str, fast: bool = False) -> dict:
    """The options given (``None``: not given) over a registered model's recommended ``kind`` settings, or over its
    fast preset with ``fast`` (``--fast``; a `CLIError` when the model registered none, or is a folder or hub id)."""
    settings = {k: v for k, v in settings.items() if v is not None}
    models = registered_models()
    registered = models.get(model)
    if fast:
        if registered is None:
            raise CLIError(f"--fast uses the fast {kind} preset of a registered --model; {model} is a folder or hub "
                           f"id, which has none: leave out --fast and pass the options you want")  # fmt: skip
        if not registered.has_fast(kind):
            having = [name for name, m in models.items() if m.has_fast(kind)]
            raise CLIError(f"--fast: --model {model} registered no fast {kind} preset (models with one: "
                           f"{', '.join(having) or 'none'}); leave out --fast")  # fmt: skip
        return {**registered.settings(kind, fast=True), **settings}
    if registered is None:
        return settings
    return {**registered.settings(kind), **settings}

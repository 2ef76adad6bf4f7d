"""The plugin registry: the ``--model`` names and the sub-commands of ``diffusionclip``.

The built-in commands (`BUILTIN_COMMANDS`, one module each in this package) and every plugin's commands are
`RegisteredCommand` records of the same registry; `load_plugins` adds the built-ins, then calls each entry point of
`PLUGIN_GROUP` once. `registered_models` / `registered_commands` are the read-only views the app and the commands use.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from types import MappingProxyType
from typing import Any

__all__ = [
    "BUILTIN_COMMANDS",
    "PLUGIN_GROUP",
    "RegisteredCommand",
    "RegisteredModel",
    "load_plugins",
    "register_command",
    "register_model",
    "registered_commands",
    "registered_models",
]

PLUGIN_GROUP = "diffusionclip_pipeline.plugins"
# the package's own commands, in the order ``--help`` lists them: the module `commands.<name>` defines `COMMAND`
BUILTIN_COMMANDS = ("finetune", "edit", "translate", "sweep")

Settings = Mapping[str, Any] | Callable[[], Mapping[str, Any]]


@dataclass(frozen=True)
class RegisteredModel:
    """A ``--model`` name: its loader, the settings it recommends (read at each call, so edits to them count; a
    callable is called then, so a plugin can defer heavy imports), and optionally its fast presets (``--fast``), a
    renderer of training images and the CPU thread count it runs best with."""

    load: Callable[[], Any]
    finetune_defaults: Settings
    edit_defaults: Settings
    help: str = ""
    render: Callable[[str, int, int], list] | None = None
    num_threads: int | None = None
    fast_finetune_defaults: Settings | None = None
    fast_edit_defaults: Settings | None = None

    def has_fast(self, kind: str) -> bool:
        """Whether the model registered fast ``kind`` (``"finetune"`` or ``"edit"``) settings."""
        return (self.fast_finetune_defaults if kind == "finetune" else self.fast_edit_defaults) is not None

    def settings(self, kind: str, fast: bool = False) -> Mapping[str, Any]:
        """The recommended ``kind`` settings, or with ``fast`` the fast preset (empty if none was registered)."""
        if fast:
            value = self.fast_finetune_defaults if kind == "finetune" else self.fast_edit_defaults
        else:
            value = self.finetune_defaults if kind == "finetune" else self.edit_defaults
        value = value() if callable(value) else value
        return value or {}


@dataclass(frozen=True)
class RegisteredCommand:
    """A sub-command: ``add_arguments(parser)`` fills its parser, ``run(args)`` runs it. ``num_threads``: the CPU
    threads set before ``run`` when neither ``--threads`` nor ``OMP_NUM_THREADS`` is given; a command that
    ``sets_threads`` sets them itself, after its checks (the built-ins: from the ``--model``'s recommendation)."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], None]
    num_threads: int | None = None
    sets_threads: bool = False


@dataclass
class _Registry:
    models: dict[str, RegisteredModel] = field(default_factory=dict)
    commands: dict[str, RegisteredCommand] = field(default_factory=dict)
    plugins_loaded: bool = False


_registry = _Registry()


def register_model(
    name: str,
    load: Callable[[], Any],
    finetune_defaults: Settings | None = None,
    edit_defaults: Settings | None = None,
    help: str = "",
    render: Callable[[str, int, int], list] | None = None,
    num_threads: int | None = None,
    fast_finetune_defaults: Settings | None = None,
    fast_edit_defaults: Settings | None = None,
) -> None:
    """Makes ``--model name`` load ``load()`` (a `DiffusionCLIPPipeline`).

    Args:
        name (`str`): The ``--model`` value (no ``/``: hub ids have one).
        load (`Callable[[], DiffusionCLIPPipeline]`): Loads the model.
        finetune_defaults / edit_defaults (`Mapping` or `Callable[[], Mapping]`, *optional*): Recommended settings,
            under the options given on the command line; a callable is called when they are needed.
        help (`str`, *optional*): Shown in ``--model``'s help.
        render (`Callable[[str, int, int], list[PIL.Image.Image]]`, *optional*): ``render(prompt, num_images,
            seed)`` draws training images showing ``prompt``, or raises `ValueError` saying why it cannot (e.g. the
            prompt names nothing it can draw). ``finetune`` without ``--images`` then trains on what it renders for
            ``--src`` (and ``--render PROMPT`` asks for it explicitly) instead of sampling from the model.
        num_threads (`int`, *optional*): CPU threads the model runs best with, used when neither ``--threads`` nor
            ``OMP_NUM_THREADS`` is given (tiny models are fastest on one thread, above all on a busy machine).
        fast_finetune_defaults / fast_edit_defaults (`Mapping` or `Callable[[], Mapping]`, *optional*): Fast presets
            that ``finetune --fast`` / ``edit --fast`` (and ``sweep --fast``) use instead of the recommended settings,
            still under the options given. Without one, ``--fast`` is an error for this model.
    """
    if not isinstance(name, str) or not name or "/" in name or os.sep in name:
        raise ValueError(f"A model name must be a non-empty string without '/' (hub ids have one), got {name!r}.")
    if name in _registry.models:
        raise ValueError(f"The model {name!r} is already registered.")
    if render is not None and not callable(render):
        raise TypeError(f"`render` must be callable, got {render!r}.")
    for option, value in (
        ("finetune_defaults", finetune_defaults), ("edit_defaults", edit_defaults),
        ("fast_finetune_defaults", fast_finetune_defaults), ("fast_edit_defaults", fast_edit_defaults),
    ):  # fmt: skip
        if value is not None and not (isinstance(value, Mapping) or callable(value)):
            raise TypeError(f"`{option}` must be a mapping, a callable returning one, or None, got {value!r}.")
    _registry.models[name] = RegisteredModel(
        load, finetune_defaults or {}, edit_defaults or {}, help, render, num_threads, fast_finetune_defaults,
        fast_edit_defaults,
    )  # fmt: skip


def register_command(
    name: str,
    help: str,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], None],
    num_threads: int | None = None,
) -> None:
    """Adds the sub-command ``diffusionclip name``; ``run`` may raise `CLIError`, `ValueError` or `OSError` (shown as
    one line). Its parser already has ``--threads`` and ``--quiet``; the threads are set before ``run`` is called
    (``num_threads``: the count used when neither ``--threads`` nor ``OMP_NUM_THREADS`` is given)."""
    if name in BUILTIN_COMMANDS or name in _registry.commands:
        raise ValueError(f"The command {name!r} already exists.")
    _registry.commands[name] = RegisteredCommand(help, add_arguments, run, num_threads)


def _register_builtin_commands() -> None:
    for name in BUILTIN_COMMANDS:  # their modules import only the standard library at module level
        _registry.commands.setdefault(name, importlib.import_module(f"{__package__}.{name}").COMMAND)


def load_plugins() -> None:
    """Registers the built-in commands, then calls each ``diffusionclip_pipeline.plugins`` entry point once; a
    failing plugin is reported in one line and undone (its models and commands are dropped, the rest works)."""
    if _registry.plugins_loaded:
        return
    _registry.plugins_loaded = True
    _register_builtin_commands()
    seen = set()
    for entry_point in entry_points(group=PLUGIN_GROUP):
        if (entry_point.name, entry_point.value) in seen:  # one distribution found twice on sys.path
            continue
        seen.add((entry_point.name, entry_point.value))
        models, commands = dict(_registry.models), dict(_registry.commands)
        try:
            entry_point.load()()
        except Exception as error:  # a broken plugin must not take the other commands down
            _registry.models, _registry.commands = models, commands
            name = f"{entry_point.name!r} ({entry_point.value})"
            print(f"diffusionclip: plugin {name} not loaded: {type(error).__name__}: {error}", file=sys.stderr)


def registered_models() -> Mapping[str, RegisteredModel]:
    """The registered ``--model`` names (plugins loaded), read-only, in registration order."""
    load_plugins()
    return MappingProxyType(_registry.models)


def registered_commands() -> Mapping[str, RegisteredCommand]:
    """Every sub-command, the built-ins first (plugins loaded), read-only."""
    load_plugins()
    return MappingProxyType(_registry.commands)

"""The ``diffusionclip`` command: ``finetune | edit | translate | sweep``, mirroring the Python API, and plugin
commands (the package's own: ``app``, and the test-bed's ``demo``).

One module per sub-command (`finetune`, `edit`, `sweep`, `translate`, `app`), each with ``add_arguments(parser)``
and ``run(args)``; `main` assembles them from the registry (`registry`); `loading` checks and loads the models,
`output` says and writes what a command made, `defaults` reads the library's defaults, `options` holds what the
parsers share.

``--model`` takes a hub id (``google/ddpm-celebahq-256``; needs the internet), a local pipeline or DDPM folder, or
the name of a model a plugin registered.

Failures are one line on stderr, never a traceback: ``diffusionclip <command>: error: <what, naming the file or
option>``. Exit status 2 for an error the user can fix (bad options, unreadable or missing files, an adapter for
another model, an unreachable hub, a full disk), 1 for an internal error (``diffusionclip <command>: internal error:
<type>: <message>``; ``DIFFUSIONCLIP_DEBUG=1`` shows the traceback) and 130 after Ctrl-C. Option values are checked
while parsing; paths, the output folder, the device and the model's whereabouts are checked next, before any model
loads or any training starts. Outputs are written atomically (a file is complete or absent), a fine-tuned adapter
only once training has finished, and an error or interruption says what had been written. Library warnings are
shown as one line each. Module-level imports are light (no torch, diffusers or transformers), so ``--help`` and
usage errors are quick; every command imports what it needs when it runs.

Plugins add ``--model`` names and sub-commands without this package knowing them. A plugin is a function without
arguments, published as an entry point of the group ``diffusionclip_pipeline.plugins``::

    [project.entry-points."diffusionclip_pipeline.plugins"]
    myplugin = "mypackage.cli_plugin:register"

that calls `register_model` (a name, its loader, its recommended ``finetune`` / ``edit`` settings and CPU threads,
and optionally fast presets for ``--fast`` and a renderer of training images) and `register_command` (a
sub-command: its arguments and what it runs). The registry calls every plugin once, when the parser is built or a
``--model`` is resolved. Entry points, because the dependency then points one way only (a plugin imports this
package, never the reverse), a plugin in another distribution works exactly like one shipped here, and a missing or
broken plugin costs only its own names: it is reported in one line and the rest of the CLI works.
"""

from __future__ import annotations

from .errors import CLIError
from .loading import check_device, check_output, load_pipeline, set_num_threads
from .options import checked
from .registry import (
    PLUGIN_GROUP,
    RegisteredCommand,
    RegisteredModel,
    load_plugins,
    register_command,
    register_model,
    registered_commands,
    registered_models,
)

__all__ = [
    "PLUGIN_GROUP",
    "CLIError",
    "RegisteredCommand",
    "RegisteredModel",
    "check_device",
    "check_output",
    "checked",
    "load_pipeline",
    "load_plugins",
    "register_command",
    "register_model",
    "registered_commands",
    "registered_models",
    "set_num_threads",
]

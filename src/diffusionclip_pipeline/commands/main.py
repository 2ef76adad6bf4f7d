"""``diffusionclip``: the parser assembled from the registered commands, and `main`, which runs one and maps every
failure to one line and an exit status (2: an error the user can fix, 1: an internal error, 130: Ctrl-C)."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from collections.abc import Iterator

from .errors import CLIError, one_line
from .loading import set_num_threads, truthy
from .options import Parser, common_arguments
from .registry import BUILTIN_COMMANDS, registered_commands, registered_models

__all__ = ["build_parser", "main"]

DEBUG_ENV = "DIFFUSIONCLIP_DEBUG"


def build_parser() -> argparse.ArgumentParser:
    """The ``diffusionclip`` parser: one sub-parser per registered command, built-ins first, each filled by the
    command's ``add_arguments`` and given ``--threads`` and ``--quiet``. A plugin command whose ``add_arguments``
    fails is left out with a one-line note."""
    commands = registered_commands()
    names = [*BUILTIN_COMMANDS, *(name for name in commands if name not in BUILTIN_COMMANDS)]
    parser = Parser(
        prog="diffusionclip",
        description="DiffusionCLIP (CVPR 2022) text-driven image editing with LoRA-fine-tuned diffusers DDPMs.",
        epilog="`diffusionclip <command> --help` lists a command's options and their defaults.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(names) + "}")
    registered_models()  # plugins loaded: the commands' help lists the models
    for name in names:
        command = commands[name]
        p = sub.add_parser(name, help=command.help)
        try:
            command.add_arguments(p)
        except Exception as error:  # as a broken plugin: the command is left out, the others work
            sub._name_parser_map.pop(name, None)
            sub._choices_actions = [a for a in sub._choices_actions if a.dest != name]
            print(f"diffusionclip: command {name!r} not added: {type(error).__name__}: {error}", file=sys.stderr)
            continue
        common_arguments(p)
        p.set_defaults(func=command.run, registered_command=command)
    return parser


@contextlib.contextmanager
def _one_line_warnings(command: str) -> Iterator[None]:
    """Shows every warning as one line, ``diffusionclip <command>: warning: <message>``, on stderr."""

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"diffusionclip {command}: warning: {one_line(message)}", file=sys.stderr)

    previous, warnings.showwarning = warnings.showwarning, show
    try:
        yield
    finally:
        warnings.showwarning = previous


def _written_note(args: argparse.Namespace) -> str:
    written = getattr(args, "written", [])
    if not written:
        return "; nothing was written"
    names = ", ".join(written[:3]) + (f" and {len(written) - 3} more" if len(written) > 3 else "")
    return f"; {len(written)} complete file(s) had been written: {names}"


def error_line(command: str, error: BaseException) -> tuple[str, int]:
    """The one line for ``error`` and the exit status: 2 for the errors a user can fix, 1 for internal errors."""
    kind, prefix = type(error).__name__, f"diffusionclip {command}: error: "
    if isinstance(error, (CLIError, ValueError, TypeError, OSError)):
        return prefix + one_line(error), 2
    if kind == "NonFiniteLossError":
        return f"{prefix}training diverged: {one_line(error)} (try a lower --learning-rate)", 2
    if kind == "OutOfMemoryError":
        return f"{prefix}out of memory: {one_line(error, 200)} (try a smaller --batch-size)", 2
    return (f"diffusionclip {command}: internal error: {kind}: {one_line(error)} (run with {DEBUG_ENV}=1 for the "
            "traceback)", 1)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Runs ``diffusionclip``; returns 0, 2 after a one-line error (bad usage exits with 2 while parsing), 1 after an
    internal error, 130 after Ctrl-C."""
    args = build_parser().parse_args(argv)
    args.written = []
    with _one_line_warnings(args.command):
        try:
            command = args.registered_command
            if not command.sets_threads:
                set_num_threads(args.threads, command.num_threads)
            args.func(args)
        except KeyboardInterrupt:
            if truthy(os.environ.get(DEBUG_ENV)):
                raise
            print(f"diffusionclip {args.command}: interrupted{_written_note(args)}", file=sys.stderr)
            return 130
        except Exception as error:
            if truthy(os.environ.get(DEBUG_ENV)):
                raise
            line, status = error_line(args.command, error)
            print(line + (_written_note(args) if args.written else ""), file=sys.stderr)
            return status
    return 0


if __name__ == "__main__":
    sys.exit(main())

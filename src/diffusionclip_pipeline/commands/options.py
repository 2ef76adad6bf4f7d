"""What every command's parser shares: `checked` (option values through `utils.checks` while parsing), the help
formatter and parser that show the library's real defaults, and the options common to several commands."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from .registry import registered_models

__all__ = [
    "NON_NEGATIVE",
    "POSITIVE",
    "POSITIVE_NUMBER",
    "HelpFormatter",
    "Parser",
    "checked",
    "common_arguments",
    "describe",
    "fast_models",
    "model_arguments",
    "registered_defaults",
]


def checked(check: Callable | str, **bounds) -> type[argparse.Action]:
    """An argparse action passing the option's value (or each of its values) through an argument check.

    ``add_argument("--batch-size", type=int, action=checked("check_positive_int"))``: ``--batch-size 0`` ends
    parsing with the one line ``"diffusionclip edit: error: `--batch-size` must be a positive integer, got 0."``
    and exit status 2. ``check`` is a function, or the name of one in `diffusionclip_pipeline.utils.checks`, imported
    only when an option is given (building the parser stays light).
    """

    class CheckedAction(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            name = option_string or self.dest
            fn = check
            if isinstance(fn, str):
                from ..utils import checks

                fn = getattr(checks, fn)
            try:
                if isinstance(values, list):
                    values = [fn(value, name, **bounds) for value in values]
                else:
                    values = fn(values, name, **bounds)
            except (TypeError, ValueError) as error:
                parser.exit(2, f"{parser.prog}: error: {error}\n")
            setattr(namespace, self.dest, values)

    return CheckedAction


POSITIVE = checked("check_positive_int")
NON_NEGATIVE = checked("check_non_negative_int")
POSITIVE_NUMBER = checked("check_number", minimum=0.0, min_inclusive=False)


class HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to every option's help that does not say its default already."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "%(" not in text:  # argparse %-formats help texts; a plain "%" must be doubled
            text = text.replace("%", "%%")
        default = action.default
        unset = any(default is v for v in (None, False, argparse.SUPPRESS))  # 0 is a default worth showing
        if "default" in text or not action.option_strings or unset:
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


class Parser(argparse.ArgumentParser):
    """An `argparse.ArgumentParser` whose help may be completed only when it is shown (`describe_defaults`), so
    that building the parser imports nothing heavy while ``--help`` still shows the library's real defaults."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.describe_defaults: Callable[[argparse.ArgumentParser], None] | None = None

    def format_help(self):
        if self.describe_defaults is not None:
            describe, self.describe_defaults = self.describe_defaults, None
            describe(self)
        return super().format_help()


def registered_defaults(kind: str, key: str, default) -> str:
    """``"; --model NAME: VALUE"`` for each registered model whose recommended ``kind`` setting ``key`` differs."""
    notes = []
    for name, model in registered_models().items():
        try:
            value = model.settings(kind).get(key, default)
        except Exception:  # a plugin's broken settings must not break --help
            continue
        if value != default:
            notes.append(f"--model {name}: {value}")
    return "".join(f"; {note}" for note in notes)


def describe(parser: argparse.ArgumentParser, helps: dict[str, str], defaults: dict, kind: str | None = None) -> None:
    """Sets the help of each option whose ``dest`` is a key of ``defaults`` to ``"<helps[dest]> (default: X)"``, with
    the registered models' recommended ``kind`` (``"finetune"`` / ``"edit"``) settings where they differ."""
    for action in parser._actions:
        if action.dest in defaults:
            default = defaults[action.dest]
            shown = default
            if isinstance(default, (list, tuple)):
                shown = " ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in default)
            notes = registered_defaults(kind, action.dest, default) if kind else ""
            action.help = f"{helps[action.dest]} (default: {shown}{notes})"


def fast_models(kind: str) -> str:
    """``"; models with one: ..."``: the registered models with a fast ``kind`` preset (for ``--fast``'s help)."""
    having = [name for name, model in registered_models().items() if model.has_fast(kind)]
    return f"; models with one: {', '.join(having)}" if having else "; no registered model has one yet"


def common_arguments(parser: argparse.ArgumentParser) -> None:
    """``--threads`` and ``--quiet``, on every sub-command (a plugin command that defines them keeps its own)."""
    if "--threads" not in parser._option_string_actions:
        parser.add_argument("--threads", type=int, action=POSITIVE, default=None,
                            help="CPU threads for torch, set before any model work (default: OMP_NUM_THREADS if set, "
                                 "else the model's or command's recommendation, else one per core); on a busy "
                                 "machine, 1 is often several times faster")  # fmt: skip
    if "--quiet" not in parser._option_string_actions:
        parser.add_argument("--quiet", action="store_true",
                            help="no progress bars (messages and warnings are still shown)")  # fmt: skip


def model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--clip``, ``--device``, then `common_arguments`."""
    registered = "".join(f"; {name}: {m.help}" if m.help else f"; {name}" for name, m in registered_models().items())
    parser.add_argument("--model", required=True, help=f"hub id, pipeline/DDPM folder or registered name{registered}")
    parser.add_argument(
        "--clip", default=None, help="CLIP id or folder if the model has none (default: openai/clip-vit-base-patch16)"
    )
    parser.add_argument("--device", default=None, help="torch device, e.g. cuda, cuda:1 or mps (default: cpu)")
    common_arguments(parser)

"""What the commands say and write: notes on stderr, progress bars, the output size said up front, the grids'
"before" row, and the files (images, CSV, Markdown tables), each written atomically through `utils.io` and
recorded in ``args.written`` (said after an error or an interruption)."""

from __future__ import annotations

import argparse
import os
import sys

from .errors import CLIError, one_line

__all__ = [
    "add_overwrite_argument",
    "as_model_sees_them",
    "check_outputs",
    "count",
    "csv_text",
    "duration",
    "makedirs",
    "markdown_table",
    "note",
    "progress",
    "save_image",
    "say_resolution",
    "write_text",
]


def note(args: argparse.Namespace, message: str) -> None:
    """``diffusionclip <command>: <message>`` on stderr."""
    print(f"diffusionclip {args.command}: {message}", file=sys.stderr)


def say_resolution(args: argparse.Namespace, pipe, images: list, files: list[str]) -> None:
    """Says the output size up front when some input differs from it."""
    size = int(getattr(pipe, "resolution", None) or pipe.denoiser.config.sample_size)
    other = [(f, im.size) for f, im in zip(files, images) if im.size != (size, size)]
    if other:
        (f, (w, h)), n = other[0], len(other)
        note(args, f"the model works at {size}x{size}: outputs are {size} px, inputs are centre-cropped and resized "
                   f"({n} of {len(images)} input(s) differ, e.g. {os.path.basename(f)} is {w}x{h})")  # fmt: skip


def as_model_sees_them(pipe, images: list) -> list:
    """The inputs centre-cropped and resized exactly as the model takes them (the grids' "before" row)."""
    from ..image_processing import postprocess_image

    return postprocess_image(pipe.prepare_image(images).float().cpu())


def progress(pipe, args: argparse.Namespace, desc: str) -> None:
    """The pipeline's progress bars on stderr (on a terminal), named ``desc``; none with ``--quiet``."""
    pipe.set_progress_bar_config(disable=True if args.quiet else None, desc=desc, leave=False)


def _written(args: argparse.Namespace, path: str, write) -> None:
    """Calls ``write()`` (an atomic write of ``path``), a failure as a `CLIError`; records ``path`` as written."""
    try:
        write()
    except OSError as error:
        raise CLIError(f"cannot write {path}: {error.strerror or one_line(error)}") from error
    args.written.append(path)


def save_image(args: argparse.Namespace, image, path: str) -> None:
    """Writes ``image`` to ``path`` atomically (`image_io.save_atomic`)."""
    from ..image_io import save_atomic

    _written(args, path, lambda: save_atomic(image, path))


def write_text(args: argparse.Namespace, text: str, path: str) -> None:
    """Writes ``text`` to ``path`` atomically (`utils.io.atomic_write_text`)."""
    from ..utils.io import atomic_write_text

    _written(args, path, lambda: atomic_write_text(path, text))


def add_overwrite_argument(parser: argparse.ArgumentParser) -> None:
    """``--overwrite``: replace existing outputs (an input is never overwritten)."""
    help_text = "replace outputs that exist already (default: refuse); an input file is never replaced"
    parser.add_argument("--overwrite", action="store_true", help=help_text)


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_outputs(args: argparse.Namespace, names: list[str], inputs: list[str]) -> None:
    """Before any work: raises `CLIError` if an output ``--output``/``name`` is one of the ``inputs`` (always: e.g.
    an input named ``grid.png`` in the ``--output`` folder), or exists and ``--overwrite`` was not given."""
    existing = [os.path.join(args.output, n) for n in names if os.path.lexists(os.path.join(args.output, n))]
    for path in existing:
        for source in inputs:
            if _same_file(path, source):
                raise CLIError(f"--output {args.output}: writing {os.path.basename(path)} would overwrite the input "
                               f"{source}; choose another --output folder")  # fmt: skip
    if existing and not getattr(args, "overwrite", False):
        shown = ", ".join(os.path.basename(p) for p in existing[:3]) + (" ..." if len(existing) > 3 else "")
        raise CLIError(f"--output {args.output}: {count(len(existing), 'output')} exist already ({shown}): pass "
                       "--overwrite to replace them, or choose another folder")  # fmt: skip


def makedirs(path: str) -> None:
    """Creates the ``--output`` folder ``path`` (a failure as a `CLIError`)."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        raise CLIError(f"cannot create --output {path}: {error.strerror or error}") from error


def count(n: int, noun: str) -> str:
    """``"1 image"``, ``"3 images"``."""
    return f"{n} {noun}" + ("" if n == 1 else "s")


def duration(seconds: float) -> str:
    """``"12.3 s"``, or ``"2 min 5 s"`` from a minute on."""
    return f"{seconds:.1f} s" if seconds < 60 else f"{int(seconds // 60)} min {seconds % 60:.0f} s"


def csv_text(rows: list[dict]) -> str:
    """The rows as CSV text, with every key of any row as a column."""
    import csv
    import io

    columns = list(dict.fromkeys(k for row in rows for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def markdown_table(rows: list[dict]) -> str:
    """The rows as a Markdown table (scores to 4 decimals, settings as given)."""
    columns = list(dict.fromkeys(k for row in rows for k in row))

    def cell(key, value):
        if key in ("t0", "edit_strength", "epoch"):
            return f"{value:g}" if isinstance(value, float) else str(value)
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(k, row.get(k, "")) for k in columns) + " |" for row in rows]
    return "\n".join(lines)

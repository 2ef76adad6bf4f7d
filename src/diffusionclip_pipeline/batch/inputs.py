"""What a batch edit reads and where each edit goes: the inputs of a folder (recursive, filtered by a glob) or of a
list file, each with the relative path its output mirrors, and the per-image seed derived from that path.

Nothing here decodes an image: the editing loop reads each one only when its batch comes (`image_io.read_image`).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass

from ..image_io import IMAGE_SUFFIXES

__all__ = ["BatchItem", "find_inputs", "glob_regex", "item_seed", "list_folder", "read_list_file"]


@dataclass(frozen=True)
class BatchItem:
    """One input of a batch edit.

    Args:
        source (`str`): The input file, as found (a path under the input folder, or as the list file names it).
        relative (`str`): Its path relative to the input root, with ``/`` separators: the manifest's key, what its
            output mirrors and what its seed derives from (so neither depends on the machine or the process).
        output (`str`): The output's path relative to the output folder (``relative`` with a ``.png`` suffix).
    """

    source: str
    relative: str
    output: str


def glob_regex(pattern: str) -> re.Pattern:
    """A glob as a regular expression over ``/``-separated relative paths: ``*`` and ``?`` stay within one folder
    level, ``**/`` spans any number of levels (none included), ``[...]`` is a character class (``[!...]`` negated)."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        char = pattern[i]
        end = pattern.find("]", i + 2) if char == "[" else -1
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif end > 0:
            body = pattern[i + 1 : end]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body).replace("\\", "\\\\") + "]")
            i = end
        else:
            out.append(re.escape(char))
        i += 1
    return re.compile("".join(out) + r"\Z")


def _matches(relative: str, pattern: str) -> bool:
    """``pattern`` against the relative path, or against the file name for a pattern without ``/``."""
    return bool(glob_regex(pattern).match(relative if "/" in pattern else relative.rsplit("/", 1)[-1]))


def list_folder(folder: str, pattern: str | None = None, exclude: str | None = None) -> list[tuple[str, str]]:
    """``(path, relative)`` of every image file under ``folder`` (recursive, sorted by relative path).

    ``pattern`` (a glob, `glob_regex`: e.g. ``"*.jpg"`` matches the names, ``"cats/*.png"`` and ``"**/cats/*"`` the
    relative paths) keeps the files that match;
    without it, the files ending in `IMAGE_SUFFIXES`. Hidden files and folders (``.name``, e.g. the atomic writer's
    temporary files) and the folder ``exclude`` (the output folder, when it lies inside the input folder) are skipped.
    """
    found = []
    skip = os.path.realpath(exclude) if exclude else None
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and os.path.realpath(os.path.join(root, d)) != skip)
        for name in files:
            if name.startswith("."):
                continue
            path = os.path.join(root, name)
            relative = os.path.relpath(path, folder).replace(os.sep, "/")
            if (pattern and _matches(relative, pattern)) or (not pattern and name.lower().endswith(IMAGE_SUFFIXES)):
                found.append((path, relative))
    return sorted(found, key=lambda pair: pair[1])


def read_list_file(path: str) -> list[tuple[str, str]]:
    """``(path, relative)`` of each image a list file names, one path a line (blank lines and ``#`` comments
    skipped; relative paths are taken from the list file's folder, which is also the root the outputs mirror).

    Raises:
        `ValueError`: a line names a file outside the list file's folder (its output would have no mirrored place),
        or the same file twice.
    """
    root = os.path.dirname(os.path.abspath(path))
    with open(path, encoding="utf-8") as handle:
        lines = [line.strip() for line in handle]
    found, seen = [], set()
    for number, line in enumerate(lines, 1):
        if not line or line.startswith("#"):
            continue
        full = os.path.normpath(os.path.join(root, line))
        relative = os.path.relpath(full, root).replace(os.sep, "/")
        if relative.startswith("../") or relative == "..":
            raise ValueError(f"`input_list` {path}, line {number}: {line!r} is outside the list file's folder {root}.")
        if relative in seen:
            raise ValueError(f"`input_list` {path}, line {number}: {line!r} is listed twice.")
        seen.add(relative)
        found.append((full, relative))
    return found


def _output_names(relatives: list[str]) -> list[str]:
    """``a/x.jpg`` -> ``a/x.png``; where two inputs would meet (``x.jpg`` and ``x.png``), the non-PNG ones keep
    their suffix in the name (``x.jpg.png``)."""
    plain = [os.path.splitext(r)[0] + ".png" for r in relatives]
    counts: dict[str, int] = {}
    for name in plain:
        counts[name] = counts.get(name, 0) + 1
    return [
        name if counts[name] == 1 or relative.lower().endswith(".png") else relative + ".png"
        for relative, name in zip(relatives, plain)
    ]


def find_inputs(
    input_dir: str | None = None, input_list: str | None = None, pattern: str | None = None, exclude: str | None = None
) -> list[BatchItem]:
    """The inputs of a batch edit, in a fixed order (by relative path): a folder's images (`list_folder`) or a list
    file's (`read_list_file`). Nothing is opened but the list file.

    Raises:
        `ValueError`: neither or both of ``input_dir`` / ``input_list`` given, ``pattern`` with a list file, or no
        input found. `FileNotFoundError`: the folder or list file does not exist.
    """
    if (input_dir is None) == (input_list is None):
        raise ValueError(f"Give one of `input_dir` and `input_list`, got {input_dir!r} and {input_list!r}.")
    if input_dir is not None:
        if not os.path.isdir(input_dir):
            raise FileNotFoundError(f"`input_dir` {input_dir}: no such folder.")
        pairs = list_folder(input_dir, pattern, exclude)
        where = f"`input_dir` {input_dir}" + (f" matching {pattern!r}" if pattern else "")
    else:
        if pattern is not None:
            raise ValueError(f"`pattern` {pattern!r} applies to `input_dir`, not to `input_list` {input_list}.")
        if not os.path.isfile(input_list):
            raise FileNotFoundError(f"`input_list` {input_list}: no such file.")
        pairs = read_list_file(input_list)
        where = f"`input_list` {input_list}"
    if not pairs:
        raise ValueError(f"No input images in {where} ({', '.join(IMAGE_SUFFIXES)} unless a glob is given).")
    outputs = _output_names([relative for _, relative in pairs])
    return [BatchItem(path, relative, out) for (path, relative), out in zip(pairs, outputs)]


def item_seed(seed: int, relative: str) -> int:
    """The seed of one image's noise (``encoding="noise"``, ``eta > 0``): derived from the run's ``seed`` and the
    image's relative path, so it does not depend on the order, the batch, the process or the machine (63 bits of
    ``sha256(f"{seed}:{relative}")``)."""
    digest = hashlib.sha256(f"{seed}:{relative}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1

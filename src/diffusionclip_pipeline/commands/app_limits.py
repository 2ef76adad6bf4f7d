"""What the web app accepts from a user, and how much: `AppLimits` (every numeric input, every upload and every file
read on the server is bounded), the confinement of server paths to the app's adapter folders, bounded reads of
uploads and zips, and the pruning of the app's work folder (`prune_work_folder`: its uploads and exports, by age and
total size).

A web user may name a server path only inside the app's adapter folders (``--adapter-root``, and the app's own
temporary folder, which holds its exports): the path is resolved (``..`` and symbolic links followed) before it is
compared, it must be a regular file or a folder (never a device, a FIFO or a socket), and a file is read only if it
is at most `AppLimits.max_file_bytes`. Every refusal of a path has the same message (`NOT_ALLOWED`), so the app does
not tell a user whether a file outside its folders exists. Only the standard library is imported here (the CLI
imports the commands for every command).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import sys
import time
import zipfile
import zlib
from dataclasses import dataclass, fields

__all__ = [
    "NOT_ALLOWED",
    "AppLimits",
    "FinetuneStopped",
    "adapter_source",
    "checked_upload",
    "prune_work_folder",
    "weights_from_zip",
]

NOT_ALLOWED = (
    "No adapter this app may load at {path!r}: give a folder, a .safetensors file or an exported .zip inside the "
    "app's adapter folders (diffusionclip app --adapter-root), or upload one."
)
_MIB = 2**20


@dataclass(frozen=True)
class AppLimits:
    """Server-side bounds on what one request may ask for (the web page's controls are not trusted).

    Args:
        max_epochs (`int`, defaults to 100): fine-tuning epochs of one request.
        max_lora_rank (`int`, defaults to 64): LoRA rank of a fine-tuned adapter.
        max_images (`int`, defaults to 16): images of one edit or fine-tuning request.
        max_image_pixels (`int`, defaults to 4096 * 4096): pixels of one image (checked before it is decoded).
        max_file_bytes (`int`, defaults to 256 MiB): an upload, an adapter file read on the server, and the weights
            extracted from a zip (counted while extracting: a zip's declared sizes are not trusted).
        max_adapters (`int`, defaults to 16): adapters loaded at once (fine-tuned or loaded; delete one to add more).
        max_finetune_seconds (`float`, defaults to 1800): a fine-tuning request that runs longer is stopped at its
            next step and its adapter discarded (the pipeline is shared: one request must not hold it for hours).
        max_learning_rate (`float`, defaults to 1.0): the learning rate of a fine-tuning request.
        max_edit_weight (`float`, defaults to 2.0): edit strength and combination weights lie in
            ``[-max_edit_weight, max_edit_weight]`` (the page offers 0..1 and -1..2).
        max_work_bytes (`int`, defaults to 2 GiB): the app's work folder (uploads, exports, extracted zips) is pruned
            to this total, oldest entries first (`prune_work_folder`; entries younger than `IN_USE_SECONDS` are
            kept: a request may be using them).
        max_work_age_seconds (`float`, defaults to 3600): entries of the work folder older than this are removed
            (an upload or a download is then gone: upload it again, export it again).
    """

    max_epochs: int = 100
    max_lora_rank: int = 64
    max_images: int = 16
    max_image_pixels: int = 4096 * 4096
    max_file_bytes: int = 256 * _MIB
    max_adapters: int = 16
    max_finetune_seconds: float = 1800.0
    max_learning_rate: float = 1.0
    max_edit_weight: float = 2.0
    max_work_bytes: int = 2048 * _MIB
    max_work_age_seconds: float = 3600.0

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"`{f.name}` must be a positive number, got {value!r}.")

    def describe(self) -> str:
        """One line for the app's log: every bound."""
        return ", ".join(f"{f.name}={getattr(self, f.name):g}" for f in fields(self))


class FinetuneStopped(KeyboardInterrupt):
    """Raised inside a fine-tuning run's progress hook to stop it at its next step: the run then discards its adapter
    and restores the previous ones, as after Ctrl-C (hence a `KeyboardInterrupt`: no ``except Exception`` swallows
    it). The message says why (cancelled, or longer than `AppLimits.max_finetune_seconds`)."""


def _log(message: str) -> None:
    print(f"diffusionclip app: {message}", file=sys.stderr)


def _inside(path: str, root: str) -> bool:
    return path == root or os.path.commonpath([path, root]) == root


def _regular_file(path: str, limit: int) -> bool:
    """Whether ``path`` (not followed if a link) is a regular file of at most ``limit`` bytes."""
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(info.st_mode) and info.st_size <= limit


def adapter_source(path: str, roots, limits: AppLimits, weights_name: str) -> str:
    """The regular file to read for ``path`` (a folder's ``weights_name``, or the file itself), if ``path`` lies
    inside one of ``roots`` once resolved, is a folder or a regular file, and the file is at most
    ``limits.max_file_bytes``; a relative ``path`` is taken relative to each root in turn. Anything else is one
    `ValueError` (`NOT_ALLOWED`), whatever the reason (logged on the server)."""
    text = str(path).strip()
    for root in roots:
        real_root = os.path.realpath(root)
        candidate = os.path.realpath(os.path.join(real_root, text))
        if not _inside(candidate, real_root):
            continue
        if os.path.isdir(candidate) and not os.path.islink(candidate):
            candidate = os.path.join(candidate, weights_name)
        if _regular_file(candidate, limits.max_file_bytes):
            return candidate
    _log(f"refused to load {text!r}: not a regular file or folder of at most {limits.max_file_bytes} bytes inside "
         f"{[os.path.realpath(r) for r in roots]}")  # fmt: skip
    raise ValueError(NOT_ALLOWED.format(path=text))


def checked_upload(path: str, limits: AppLimits) -> str:
    """``path`` (an uploaded file) if it is a regular file of at most ``limits.max_file_bytes``; else `ValueError`."""
    if not _regular_file(os.fspath(path), limits.max_file_bytes):
        raise ValueError(f"The upload is not a file of at most {limits.max_file_bytes // _MIB} MiB.")
    return os.fspath(path)


def is_zip(path: str) -> bool:
    """Whether the regular file ``path`` starts like a zip (read 4 bytes; `zipfile.is_zipfile` would scan it)."""
    with open(path, "rb") as handle:
        return handle.read(4) == b"PK\x03\x04"


def weights_from_zip(path: str, target: str, limits: AppLimits, weights_name: str) -> str:
    """Extracts the zip's one ``weights_name`` member to ``target`` (the member's name is never used as a path),
    reading at most ``limits.max_file_bytes`` bytes whatever the zip declares; returns ``target``."""
    name = os.path.basename(path)
    try:
        _extract(path, target, limits, weights_name)
    except BaseException as error:
        if os.path.exists(target):
            os.remove(target)
        if isinstance(error, (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError, zlib.error)):
            raise ValueError(f"{name!r} is not a readable zip: {error}") from error
        raise
    return target


def _extract(path: str, target: str, limits: AppLimits, weights_name: str) -> None:
    name, limit = os.path.basename(path), limits.max_file_bytes
    with zipfile.ZipFile(path) as archive:
        members = [m for m in archive.infolist() if os.path.basename(m.filename) == weights_name]
        if len(members) != 1:
            raise ValueError(f"{name!r} holds {len(members)} {weights_name} files, not 1.")
        too_large = f"{name!r}: its {weights_name} expands beyond {limit // _MIB} MiB."
        if members[0].file_size > limit:
            raise ValueError(too_large)
        with archive.open(members[0]) as source, open(target, "wb") as out:
            copied = 0
            while chunk := source.read(_MIB):
                copied += len(chunk)
                if copied > limit:
                    raise ValueError(too_large)
                out.write(chunk)


def remove_tree(path: str) -> None:
    """Removes a folder the app made (an export, an upload's extraction), ignoring what is already gone."""
    shutil.rmtree(path, ignore_errors=True)


IN_USE_SECONDS = 60.0  # `prune_work_folder` keeps entries changed more recently than this, whatever their size
CACHE_FOLDERS = ("gradio",)  # children of the work folder whose own children are the entries (gradio's upload cache)


def _entry(path: str) -> tuple[float, int]:
    """The newest modification time and the total size of ``path`` and everything below it (links not followed)."""
    info = os.lstat(path)
    newest, size = info.st_mtime, info.st_size if not stat.S_ISDIR(info.st_mode) else 0
    if stat.S_ISDIR(info.st_mode):
        for folder, _, files in os.walk(path):
            for name in files:
                with contextlib.suppress(OSError):  # removed meanwhile
                    info = os.lstat(os.path.join(folder, name))
                    newest, size = max(newest, info.st_mtime), size + info.st_size
    return newest, size


def _entries(folder: str) -> list[str]:
    """The prunable entries of a work folder: its children, and the children of its `CACHE_FOLDERS`."""
    entries = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name in CACHE_FOLDERS and os.path.isdir(path) and not os.path.islink(path):
            entries += [os.path.join(path, child) for child in sorted(os.listdir(path))]
        else:
            entries.append(path)
    return entries


def prune_work_folder(folder: str, limits: AppLimits, now: float | None = None) -> list[str]:
    """Removes the entries of the app's work folder ``folder`` (an export, an extracted zip, one upload in gradio's
    cache: each removed whole) last changed more than ``limits.max_work_age_seconds`` ago, then the oldest ones until
    the folder holds at most ``limits.max_work_bytes``, never one changed in the last `IN_USE_SECONDS` (``now``:
    `time.time()` by default). Returns the removed paths; a missing ``folder`` is nothing to prune."""
    now = time.time() if now is None else now
    if not os.path.isdir(folder):
        return []
    entries = []
    for path in _entries(folder):
        with contextlib.suppress(OSError):  # removed meanwhile
            entries.append((*_entry(path), path))
    entries.sort()  # oldest first
    removed, total = [], sum(size for _, size, _ in entries)
    for newest, size, path in entries:
        age = now - newest
        if age > limits.max_work_age_seconds or (total > limits.max_work_bytes and age > IN_USE_SECONDS):
            if os.path.isdir(path) and not os.path.islink(path):
                remove_tree(path)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
            removed.append(path)
            total -= size
    return removed

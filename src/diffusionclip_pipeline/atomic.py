"""Atomic replacement of a whole folder: readers see the old complete folder or the new complete one, never a mix.

The new content is written into a temporary sibling folder (``.<name>.tmp-*``), which is then swapped in. On Linux
the swap is one ``renameat2(RENAME_EXCHANGE)`` call; elsewhere two renames (the old folder is moved aside first, so
an interruption between them leaves the old folder complete under ``.<name>.old-*``, and no mixed folder). Leftovers
of interrupted saves are removed by the next save of the same folder.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import glob
import os
import shutil
import sys
import tempfile

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def exchange(a: str, b: str) -> bool:
    """Atomically swaps two existing paths; False when the platform or file system cannot."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    return False


def _leftovers(target: str) -> list[str]:
    parent, name = os.path.split(target)
    pattern = os.path.join(glob.escape(parent), f".{glob.escape(name)}.")
    return glob.glob(pattern + "tmp-*") + glob.glob(pattern + "old-*")


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike):
    """Yields an empty temporary folder; when the block succeeds, it replaces ``target`` (created if missing).

    If the block raises, the temporary folder is removed and ``target`` is untouched.
    """
    target = os.path.abspath(os.fspath(target))
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    if os.path.exists(target) and not os.path.isdir(target):
        raise ValueError(f"`save_directory` {target!r} exists and is not a folder.")
    for leftover in _leftovers(target):  # of an interrupted earlier save
        shutil.rmtree(leftover, ignore_errors=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-", dir=parent)
    try:
        yield tmp
        os.chmod(tmp, 0o755 & ~_umask())
        if not os.path.exists(target):
            os.rename(tmp, target)
        elif exchange(tmp, target):
            shutil.rmtree(tmp)  # now the old content
        else:
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.old-", dir=parent)
            os.rmdir(old)
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask

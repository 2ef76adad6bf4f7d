"""The one place that writes files atomically: a reader sees the old complete file or folder or the new one, never a
mix, and an error or an interruption leaves no temporary file of this writer behind.

`atomic_write` writes one file: the content goes to a temporary file in the same folder (``.<name>.<random>.tmp``),
which is then renamed over ``path``. The final file gets the permissions a plain ``open(path, "w")`` would give
(``0o666`` less the umask), not ``mkstemp``'s ``0o600``.

`atomic_directory` replaces a whole folder.
The new content is written into a temporary sibling folder (``.<name>.tmp-<pid>-*``), which is then swapped in. On
Linux the swap is one ``renameat2(RENAME_EXCHANGE)`` call; elsewhere two renames (the old folder is moved aside
first, so an interruption between them leaves the old folder complete under ``.<name>.old-<pid>-*``, and no mixed
folder). Entries of the old folder that the caller keeps (``keep``) are hard-linked into the new one first.

Sharing: several processes may write the same file or folder at once (the last complete write wins, readers never
see a mix). Each writer's temporary files carry its process id, and the leftovers of interrupted writes are removed
by the next write only when their process is gone, so one writer never deletes another live writer's files (on one
machine: process ids of other machines sharing a network folder cannot be checked).
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
from collections.abc import Callable

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
    """The temporary siblings of ``target`` that interrupted writers left: those of processes that are gone (the
    process id follows ``tmp-`` / ``old-``; a name without one is of a version before 0.2.1 and always a leftover)."""
    parent, name = os.path.split(target)
    pattern = os.path.join(glob.escape(parent), f".{glob.escape(name)}.")
    found = []
    for path in glob.glob(pattern + "tmp-*") + glob.glob(pattern + "old-*"):
        tag = os.path.basename(path)[len(name) + 6 :].split("-", 1)  # after ".<name>.tmp-"
        if not (len(tag) == 2 and tag[0].isdigit() and _alive(int(tag[0]))):
            found.append(path)
    return found


def _link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, keep: Callable[[str], bool] | None = None):
    """Yields a temporary folder; when the block succeeds, it replaces ``target`` (created if missing).

    ``keep(name)`` chooses the entries of an existing ``target`` that the new folder keeps (hard-linked, or copied,
    into the temporary folder before it is yielded); without it the new folder holds only what the block writes.
    If the block raises, the temporary folder is removed and ``target`` is untouched.
    """
    target = os.path.abspath(os.fspath(target))
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    if os.path.exists(target) and not os.path.isdir(target):
        raise ValueError(f"`save_directory` {target!r} exists and is not a folder.")
    for leftover in _leftovers(target):  # of an interrupted earlier save (another live writer's are kept)
        shutil.rmtree(leftover, ignore_errors=True)
    tag = f".{os.path.basename(target)}.%s-{os.getpid()}-"
    tmp = tempfile.mkdtemp(prefix=tag % "tmp", dir=parent)
    try:
        if keep is not None and os.path.isdir(target):
            for entry in os.listdir(target):
                source = os.path.join(target, entry)
                if not keep(entry):
                    continue
                if os.path.isdir(source) and not os.path.islink(source):
                    shutil.copytree(source, os.path.join(tmp, entry), symlinks=True, copy_function=_link_or_copy)
                else:
                    _link_or_copy(source, os.path.join(tmp, entry))
        yield tmp
        os.chmod(tmp, 0o755 & ~current_umask())
        if not os.path.exists(target) and _rename_if_absent(tmp, target):
            pass
        elif exchange(tmp, target):
            shutil.rmtree(tmp)  # now the old content
        else:
            old = tempfile.mkdtemp(prefix=tag % "old", dir=parent)
            os.rmdir(old)
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def _rename_if_absent(tmp: str, target: str) -> bool:
    """Renames ``tmp`` to ``target``; False if another writer created ``target`` in between (then swap instead)."""
    try:
        os.rename(tmp, target)
    except OSError:
        if not os.path.isdir(target):
            raise
        return False
    return True


def current_umask() -> int:
    """The process's umask, read without changing it where the platform allows (``os.umask`` sets it process-wide:
    another thread creating a file in between would get the wrong permissions)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Calls ``write(tmp_path)``, which must write the whole content to ``tmp_path`` (a fresh file in ``path``'s
    folder), then renames it to ``path`` in one step. If ``write`` raises (a full disk, Ctrl-C), ``path`` keeps its
    old content (or stays absent) and the temporary file is removed.
    """
    folder, name = os.path.split(os.path.abspath(os.fspath(path)))
    remove_leftovers(folder, name)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.{os.getpid()}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_leftovers(folder: str, name: str) -> None:
    r"""Removes the temporary files of killed `atomic_write`\ s of ``name`` in ``folder``: only those whose writing
    process (its id is in the file name) is gone, so that another live writer's file is never touched."""
    pattern = os.path.join(glob.escape(folder), f".{glob.escape(name)}.*.tmp")
    for leftover in glob.glob(pattern):
        pid = os.path.basename(leftover)[len(name) + 2 :].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            with contextlib.suppress(OSError):
                os.remove(leftover)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """`atomic_write` of a UTF-8 text file (newlines written as given)."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)

    atomic_write(path, write)

"""Quiet model loading and CPU thread settings, shared by the commands, the app, the test-bed and the scripts."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator

__all__ = ["LogProgress", "quiet_loading", "set_num_threads"]


def set_num_threads(threads: int | None = None, recommended: int | None = None) -> int:
    """Sets torch's CPU threads before any model work and returns the count in use.

    ``threads`` wins, then ``OMP_NUM_THREADS`` if set, then ``recommended`` (a registered model's or command's),
    else torch's default (one per core). On a machine another process keeps busy, fewer threads are much faster:
    editing one 32 px test-bed image took 53-90 s with 2 threads on a busy 2-core machine, 7.3 s with 1.

    Raises:
        ValueError: ``OMP_NUM_THREADS`` is set but not a positive integer.
    """
    import torch

    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if threads is None and env:
        if not env.isdigit() or int(env) < 1:
            raise ValueError(f"OMP_NUM_THREADS={env!r} is not a positive integer (unset it, or pass --threads N)")
        threads = int(env)
    if threads is None:
        threads = recommended
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Inside the block, loading models shows no progress bars (``Loading weights: 100%|...| 110/110``) and no
    library chatter below errors (diffusers, transformers and huggingface_hub log at ERROR level)."""
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as transformers_logging

    libraries = (diffusers_logging, transformers_logging)
    bars = [lib.is_progress_bar_enabled() for lib in libraries]
    levels = [lib.get_verbosity() for lib in (*libraries, hub_logging)]
    for lib in libraries:
        lib.disable_progress_bar()
    for lib in (*libraries, hub_logging):
        lib.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")  # huggingface_hub, via diffusers
            yield
    finally:
        for lib, on in zip(libraries, bars):
            lib.enable_progress_bar() if on else lib.disable_progress_bar()
        for lib, level in zip((*libraries, hub_logging), levels):
            lib.set_verbosity(level)


class LogProgress:
    """A progress reporter for logs (stderr not a terminal): one line per ``every`` percent of ``total`` and at the
    end, e.g. ``fine-tuning:  30% 12/40 [37 s, 86 s left] loss=0.41``. It has the part of tqdm's interface that the
    pipeline and the trainer use (iteration, `update`, `set_postfix`, `close`, ``n``)."""

    def __init__(self, iterable=None, total: int | None = None, desc: str | None = None, every: int = 10, file=None):
        import time

        self.iterable, self.desc, self.every, self.file = iterable, desc or "progress", every, file
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.n, self.initial, self.last_print_n = total, 0, 0, 0
        self.postfix, self._clock, self._start, self._next = "", time.perf_counter, time.perf_counter(), every

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __len__(self) -> int:
        return self.total or 0

    def set_postfix(self, values: dict | None = None, **kwargs) -> None:
        self.postfix = " ".join(f"{k}={v}" for k, v in {**(values or {}), **kwargs}.items())

    def update(self, n: int = 1) -> None:
        self.n += n
        if not self.total:
            return
        percent = 100 * self.n // self.total
        if percent >= self._next or self.n >= self.total:
            self._write(percent)
            self._next = (percent // self.every + 1) * self.every

    def close(self) -> None:
        if self.total and self.last_print_n < self.n:
            self._write(100 * self.n // self.total)

    def _write(self, percent: int) -> None:
        import sys

        elapsed = self._clock() - self._start
        done = self.n - self.initial
        left = f", {elapsed / done * (self.total - self.n):.0f} s left" if done and self.n < self.total else ""
        line = f"{self.desc}: {percent:3d}% {self.n}/{self.total} [{elapsed:.0f} s{left}] {self.postfix}".rstrip()
        print(line, file=self.file or sys.stderr, flush=True)
        self.last_print_n = self.n

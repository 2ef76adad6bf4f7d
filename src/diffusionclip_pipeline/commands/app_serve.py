"""How the web app runs and stops: the requests in flight (`Lifecycle`), the pruning of its work folder while it
runs (`Pruner`), and its shutdown on SIGINT (Ctrl-C) or SIGTERM (`serve`).

On the first signal the app stops cleanly: new requests are refused, a running fine-tune stops at its next step (its
adapter discarded, the previous adapters restored), the requests in flight are waited for (at most
`SHUTDOWN_SECONDS`), the server closes, the work folder (uploads, exports, extracted zips) is removed, and the process
exits with 128 + the signal's number: 130 after SIGINT, 143 after SIGTERM (the shell's convention; under systemd, add
``SuccessExitStatus=143``). A second signal meanwhile, or a request still running after `SHUTDOWN_SECONDS`, removes
the work folder and exits at once (``os._exit``: no thread is left inside torch while the interpreter is torn down,
which is what aborted with "terminate called without an active exception"). Only the standard library is imported
here (the CLI imports the commands for every command).
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable

from .app_limits import AppLimits, FinetuneStopped, prune_work_folder

__all__ = [
    "SHUTDOWN_SECONDS",
    "Lifecycle",
    "Pruner",
    "ShuttingDown",
    "exit_on_sigterm",
    "serve",
    "stop_guard",
    "tracked",
    "uploads_into",
]

SHUTDOWN_SECONDS = 30.0  # how long a shutdown waits for the requests in flight (a fine-tune stops at its next step)
PRUNE_SECONDS = 10.0  # how often a running app prunes its work folder
SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _log(message: str) -> None:
    print(f"diffusionclip app: {message}", file=sys.stderr, flush=True)


class ShuttingDown(ValueError):
    """A request that arrived while the app shuts down (shown to its user as an error)."""


class Lifecycle:
    """The requests an app state is serving, and whether it is closing (``closing``, an event: set, it refuses new
    requests and stops a running fine-tune at its next step)."""

    def __init__(self):
        self.closing = threading.Event()
        self._changed = threading.Condition()
        self._active = 0
        self._depth = threading.local()  # a request's own inner requests (an export inside a fine-tune) still run

    @property
    def active(self) -> int:
        return self._active

    @contextlib.contextmanager
    def request(self):
        """Counts the block as a request in flight; `ShuttingDown` once the app is closing (unless the thread is
        already inside a request: that one finishes as it started)."""
        depth = getattr(self._depth, "value", 0)
        with self._changed:
            if self.closing.is_set() and depth == 0:
                raise ShuttingDown("The app is shutting down: this request was not run.")
            self._active += 1
        self._depth.value = depth + 1
        try:
            yield
        finally:
            self._depth.value = depth
            with self._changed:
                self._active -= 1
                self._changed.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Waits until no request is in flight, at most ``timeout`` seconds; returns whether none is."""
        with self._changed:
            return self._changed.wait_for(lambda: self._active == 0, timeout)


def tracked(fn: Callable) -> Callable:
    """``fn(state, ...)`` as a request of ``state.lifecycle`` (refused while the app closes, waited for by `serve`)."""

    @functools.wraps(fn)
    def wrapper(state, *args, **kwargs):
        with state.lifecycle.request():
            return fn(state, *args, **kwargs)

    return wrapper


def stop_guard(
    report: Callable | None, stop: threading.Event | None, seconds: float, closing: threading.Event | None = None
) -> Callable:
    """``report``, which first raises `FinetuneStopped` once ``stop`` or ``closing`` is set or ``seconds`` passed."""
    deadline = time.monotonic() + seconds

    def guarded(done, total, postfix):
        if closing is not None and closing.is_set():
            raise FinetuneStopped("The app is shutting down: fine-tuning stopped, its adapter discarded.")
        if stop is not None and stop.is_set():
            raise FinetuneStopped("Fine-tuning was cancelled: its adapter is discarded.")
        if time.monotonic() > deadline:
            raise FinetuneStopped(f"Fine-tuning ran longer than this app allows ({seconds:g} s): stopped, its adapter "
                                  "discarded. Try fewer epochs or images.")  # fmt: skip
        if report is not None:
            report(done, total, postfix)

    return guarded


class Pruner:
    """A daemon thread that prunes ``folder`` (`app_limits.prune_work_folder` under ``limits``) every ``interval``
    seconds until `stop`."""

    def __init__(self, folder: str, limits: AppLimits, interval: float = PRUNE_SECONDS):
        self.folder, self.limits, self.interval = folder, limits, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="diffusionclip-app-pruner", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                removed = prune_work_folder(self.folder, self.limits)
            except OSError as error:  # the folder is being removed, or a file vanished mid-walk: try again later
                _log(f"pruning the work folder: {error}")
                continue
            if removed:
                _log(f"removed {len(removed)} old upload(s) or export(s) from the work folder")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval + 5)


class _Signals:
    """SIGINT and SIGTERM handlers for the block (main thread only; elsewhere none is installed): the first signal
    sets ``event``, a second one calls ``force(signum)``."""

    def __init__(self, force: Callable[[int], None]):
        self.event, self.received, self.force, self._previous = threading.Event(), [], force, {}

    def _handle(self, signum: int, frame) -> None:
        self.received.append(signum)
        if len(self.received) > 1:
            self.force(signum)
        self.event.set()

    def __enter__(self) -> _Signals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def _force_exit(state, status: int, reason: str) -> None:
    """Removes the work folder and ends the process at once with ``status``."""
    _log(f"{reason}: exiting now, without waiting for the requests in flight")
    shutil.rmtree(state.workdir, ignore_errors=True)
    sys.stdout.flush()
    os._exit(status)


_uploads_to = [None]  # the GRADIO_TEMP_DIR `uploads_into` set


def uploads_into(workdir: str) -> None:
    """Points gradio's upload folder (``GRADIO_TEMP_DIR``, read by gradio for the whole process) into ``workdir``,
    unless the user set it (then it is theirs: gradio's ``delete_cache`` prunes it by age, nothing removes it)."""
    if os.environ.get("GRADIO_TEMP_DIR") in (None, _uploads_to[0]):
        os.environ["GRADIO_TEMP_DIR"] = _uploads_to[0] = os.path.join(workdir, "gradio")


@contextlib.contextmanager
def exit_on_sigterm():
    """SIGTERM raises `SystemExit` (143) in the block, so ``finally`` clauses run (by default it ends the process
    on the spot). Main thread only; elsewhere nothing changes."""

    def handle(signum: int, frame) -> None:
        raise SystemExit(128 + signum)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def serve(demo, state, poll: float = 0.5) -> None:
    """Blocks while the launched ``demo`` (over ``state``) runs; on SIGINT or SIGTERM (or when its server stops)
    shuts it down: see the module's docstring. Raises `SystemExit` (130 or 143) after a signal."""
    name = lambda signum: signal.Signals(signum).name  # noqa: E731
    signals = _Signals(lambda signum: _force_exit(state, 128 + signum, f"{name(signum)} again"))
    with signals:
        _log(f"work folder {state.workdir} (uploads and exports; pruned while it runs, removed when it stops)")
        pruner = Pruner(state.workdir, state.limits)
        while not signals.event.wait(poll) and demo.is_running:
            pass
        signum = signals.received[0] if signals.received else None
        why = f"{name(signum)} received" if signum is not None else "the server stopped"
        _log(f"{why}: shutting down (a fine-tune in progress stops at its next step; its adapter is discarded)")
        started = time.monotonic()
        state.lifecycle.closing.set()
        if not state.lifecycle.wait_idle(SHUTDOWN_SECONDS):
            status = 1 if signum is None else 128 + signum
            _force_exit(state, status, f"a request still runs after {SHUTDOWN_SECONDS:g} s")
        pruner.stop()
        demo.close(verbose=False)
        state.close(timeout=0)
        _log(f"stopped in {time.monotonic() - started:.1f} s; its work folder is removed")
    if signum is not None:
        raise SystemExit(128 + signum)

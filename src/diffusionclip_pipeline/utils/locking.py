"""One user of a denoiser at a time: the lock that pipeline calls hold while they use or change its adapter state.

Editing with several adapters switches the denoiser's active set during the call, so two threads using one
pipeline, or two pipelines sharing one denoiser, would see each other's state. Holding the denoiser's lock makes such
calls wait for each other: results are the same as one after the other (they are not parallel).
"""

from __future__ import annotations

import functools
import threading
import weakref

__all__ = ["holds_unet_lock", "serialised", "unet_lock"]

_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def unet_lock(model) -> threading.RLock:
    """The re-entrant lock of ``model`` (a denoiser): held by every pipeline call that uses or changes its adapters."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
        return lock


def holds_unet_lock(method):
    """Decorates a pipeline method to hold ``self.denoiser``'s lock (`unet_lock`) for the whole call."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with unet_lock(self.denoiser):
            return method(self, *args, **kwargs)

    return wrapper


serialised = holds_unet_lock  # its 0.1 name (it serialises calls; it has nothing to do with serialisation)

"""The manifest of a batch edit: JSON lines in the output folder, one shard per process (``manifest.rank<k>.jsonl``),
so that no two processes ever write one file.

Each shard starts with a ``run`` line (the edit's settings, every `DiffusionCLIPPipeline.edit` argument with its
value or default, their hash ``settings_id`` and the adapter fingerprint, written before any output), then one line
per finished input: ``{"input", "output", "status": "done" | "failed", "seconds", "settings_id", "adapter",
"rank"}`` (and ``"error"`` for a failure, ``"warnings"`` for what reading the image dropped). A batch's lines are
appended in one write and flushed to disk (``fsync``) only after every output of the batch is in place (each output
file is itself written atomically), so a line names a complete file. A process killed during the append leaves at
most a torn last line, which the reader skips: those inputs are done again (their complete outputs are rewritten
with the same content), nothing is lost.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os

__all__ = [
    "MANIFEST_GLOB",
    "ManifestShard",
    "adapter_fingerprint",
    "canonical",
    "check_compatible",
    "done_inputs",
    "read_manifest",
    "settings_id",
    "shard_path",
]

MANIFEST_GLOB = "manifest.rank*.jsonl"


def shard_path(output_dir: str, rank: int) -> str:
    """The manifest shard process ``rank`` writes: ``<output_dir>/manifest.rank<rank>.jsonl``."""
    return os.path.join(output_dir, f"manifest.rank{rank}.jsonl")


def canonical(settings: dict) -> dict:
    """``settings`` as the manifest stores (and compares) them: JSON values, keys sorted, anything else as text."""
    return json.loads(json.dumps(settings, sort_keys=True, default=repr))


def settings_id(settings: dict) -> str:
    """A short hash of canonical ``settings`` (what each input's line records)."""
    return hashlib.sha256(json.dumps(canonical(settings), sort_keys=True).encode()).hexdigest()[:16]


def adapter_fingerprint(pipe) -> str:
    """A short hash of what the adapters make the edit do: for each active adapter (when adapters are enabled), its
    name, its weight and the bytes of its parameters; ``"none"`` when no adapter applies (a reconstruction)."""
    import torch

    from ..loaders import lora_state

    unet = pipe.unet
    if not lora_state.adapters_enabled(unet) or not lora_state.active_adapters(unet):
        return "none"
    digest = hashlib.sha256()
    weights = lora_state.adapter_weights(unet)
    for name in sorted(lora_state.active_adapters(unet)):
        digest.update(f"{name}:{weights.get(name, 1.0)!r};".encode())
        for parameter in lora_state.adapter_parameters(unet, name):
            data = parameter.detach().to("cpu").contiguous()
            digest.update(str(data.dtype).encode() + str(tuple(data.shape)).encode())
            digest.update(data.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def read_manifest(output_dir: str) -> list[dict]:
    """Every line of every shard in ``output_dir`` (whatever the process count of the runs that wrote them), in
    shard order; a torn or unreadable line (a process killed while appending) is skipped."""
    entries = []
    for path in sorted(glob.glob(os.path.join(glob.escape(output_dir), MANIFEST_GLOB))):
        with open(path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if isinstance(entry, dict):
                    entries.append(entry)
    return entries


def done_inputs(entries: list[dict]) -> set[str]:
    """The relative paths of the inputs whose edit is done (a failed input is tried again by the next run)."""
    return {e["input"] for e in entries if e.get("status") == "done" and isinstance(e.get("input"), str)}


def _differences(old: dict, new: dict) -> str:
    keys = sorted(set(old) | set(new))
    changed = [
        f"{k}: {old.get(k, '(unset)')!r} -> {new.get(k, '(unset)')!r}" for k in keys if old.get(k) != new.get(k)
    ]
    return ", ".join(changed[:4]) + (" ..." if len(changed) > 4 else "")


def check_compatible(entries: list[dict], settings: dict, adapter: str, output_dir: str) -> None:
    """Raises `ValueError` if an earlier run into ``output_dir`` used other settings or another adapter: its
    outputs would be mixed with this run's."""
    identity = settings_id(settings)
    for entry in entries:
        if "settings_id" not in entry and "adapter" not in entry:
            continue
        if entry.get("settings_id") != identity:
            changed = _differences(entry.get("settings") or {}, settings) or "see the manifest"
            raise ValueError(
                f"`output_dir` {output_dir} holds edits made with other settings ({changed}): pass `overwrite=True` "
                "(--overwrite) to redo them all with these, or choose another folder."
            )
        if entry.get("adapter") != adapter:
            raise ValueError(
                f"`output_dir` {output_dir} holds edits made with another adapter (fingerprint "
                f"{entry.get('adapter')}, now {adapter}): pass `overwrite=True` (--overwrite) to redo them all with "
                "this one, or choose another folder."
            )


class ManifestShard:
    """This process's shard, opened for appending: `append` writes a batch's lines at once and flushes them to disk.

    A torn last line left by a killed earlier run of the same rank is ended first, so the next line stays readable.
    """

    def __init__(self, output_dir: str, rank: int):
        self.path = shard_path(output_dir, rank)
        self.rank = rank

    def append(self, entries: list[dict]) -> None:
        text = "".join(json.dumps(entry, sort_keys=True) + "\n" for entry in entries)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            size = os.fstat(fd).st_size
            if size and _last_byte(self.path, size) != b"\n":
                text = "\n" + text  # end a torn line first: it stays unreadable, and skipped
            data = text.encode("utf-8")
            while data:
                data = data[os.write(fd, data) :]
            os.fsync(fd)
        finally:
            os.close(fd)


def _last_byte(path: str, size: int) -> bytes:
    with open(path, "rb") as handle:
        handle.seek(size - 1)
        return handle.read(1)

"""Fine-tuning checkpoints are integrity-checked as a whole (docs/reliability.md, "Fine-tuning"): an edited or
bit-flipped ``trainer_state.json`` is refused instead of resuming with another result, and every field is checked for
type and range before use (``num_clip_models`` = 3e7 cost 4.5 GB; a 100k-deep JSON raised RecursionError)."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from conftest import make_pipeline, random_images
from safetensors.torch import save_file

from diffusionclip_pipeline.training.checkpointing import CHECKPOINT_NAME, TRAINER_STATE_NAME, read_checkpoint

PROMPTS = ("red circle", "blue circle")
SETTINGS = dict(t0=100, num_inversion_steps=2, num_train_steps=1, num_epochs=2, batch_size=2, clip_num_augmentations=1)


def stop_at(n):
    calls = []

    def identity_loss(x0, x0_pred):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return (x0 - x0_pred).abs().mean(dim=(1, 2, 3))

    return identity_loss


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint of a run stopped in its second epoch."""
    folder = tmp_path_factory.mktemp("ckpt")
    with pytest.raises(KeyboardInterrupt):
        make_pipeline().finetune(*PROMPTS, images=random_images(3), identity_loss=stop_at(3), checkpoint_dir=folder,
                                 checkpoint_every=1, identity_loss_weight=0.5, **SETTINGS)  # fmt: skip
    return folder / CHECKPOINT_NAME


def edited(checkpoint, tmp_path, change, rehash: bool = False):
    """A copy of ``checkpoint`` whose state JSON ``change(state)`` edited (its checksum recomputed if ``rehash``:
    a crafted file, not an accident)."""
    target = tmp_path / f"copy{len(list(tmp_path.iterdir()))}"
    shutil.copytree(checkpoint, target)
    state = json.loads((target / TRAINER_STATE_NAME).read_text())
    change(state)
    if rehash:
        rest = {k: v for k, v in state.items() if k != "checksum"}
        state["checksum"] = hashlib.sha256(
            json.dumps(rest, sort_keys=True, separators=(",", ":")).encode()
        ).hexdigest()
    (target / TRAINER_STATE_NAME).write_text(json.dumps(state))
    return target


def test_an_intact_checkpoint_reads(checkpoint):
    assert read_checkpoint(checkpoint).num_updates >= 1


@pytest.mark.parametrize(
    "change",
    [
        lambda s: s["loss_history"].__setitem__(0, s["loss_history"][0] * 1.001),
        lambda s: s.__setitem__("batch", s["batch"] + 1),
        lambda s: s["settings"].__setitem__("learning_rate", 1.0),
        lambda s: s["optimizer"]["param_groups"][0].__setitem__("lr", 0.5),
    ],
    ids=["loss", "batch", "setting", "optimizer"],
)
def test_an_edited_state_is_refused(checkpoint, tmp_path, change):
    with pytest.raises(ValueError, match="trainer_state.json does not match its checksum"):
        read_checkpoint(edited(checkpoint, tmp_path, change))


def test_a_bit_flip_in_the_state_is_refused(checkpoint, tmp_path):
    target = tmp_path / "flipped"
    shutil.copytree(checkpoint, target)
    text = (target / TRAINER_STATE_NAME).read_text()
    position = text.index('"epoch": ') + len('"epoch": ')
    digit = text[position]
    (target / TRAINER_STATE_NAME).write_text(text[:position] + str((int(digit) + 1) % 10) + text[position + 1 :])
    with pytest.raises(ValueError, match="does not match its checksum"):
        read_checkpoint(target)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda s: s["settings"].__setitem__("num_clip_models", 30_000_000), "num_clip_models"),
        (lambda s: s.__setitem__("epoch", -1), "epoch"),
        (lambda s: s.__setitem__("epoch", 10**6), "past the run's num_epochs"),
        (lambda s: s.__setitem__("num_updates", 1.5), "num_updates"),
        (lambda s: s.__setitem__("loss_history", ["x"]), "loss_history"),
        (lambda s: s.__setitem__("loss_history", {"a": 1}), "loss_history"),
        (lambda s: s.__setitem__("optimizer", []), "optimizer"),
        (lambda s: s.__setitem__("grad_scaler", 3), "grad_scaler"),
        (lambda s: s["files"].__setitem__("optimizer.safetensors", "00"), "files"),
    ],
)
def test_every_field_is_checked_before_use_even_with_a_valid_checksum(checkpoint, tmp_path, change, match):
    with pytest.raises(ValueError, match=match):
        read_checkpoint(edited(checkpoint, tmp_path, change, rehash=True))


def test_a_deeply_nested_or_huge_state_is_a_value_error(checkpoint, tmp_path):
    target = tmp_path / "deep"
    shutil.copytree(checkpoint, target)
    (target / TRAINER_STATE_NAME).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="nested too deeply|unreadable"):
        read_checkpoint(target)
    with open(target / TRAINER_STATE_NAME, "wb") as handle:
        handle.truncate(65 * 2**20)  # sparse
    with pytest.raises(ValueError, match="larger than"):
        read_checkpoint(target)


def test_resuming_from_an_edited_checkpoint_trains_nothing(checkpoint, tmp_path):
    pipe = make_pipeline()
    bad = edited(checkpoint, tmp_path, lambda s: s["loss_history"].__setitem__(0, 0.0))
    with pytest.raises(ValueError, match="does not match its checksum"):
        pipe.finetune(*PROMPTS, images=random_images(3), identity_loss=stop_at(None), resume_from=bad,
                      identity_loss_weight=0.5, **SETTINGS)  # fmt: skip
    assert pipe.lora_adapters == []


def test_a_damaged_latent_cache_entry_is_recomputed_not_trusted(tmp_path):
    cache = tmp_path / "cache"
    first = make_pipeline().finetune(*PROMPTS, images=random_images(2), cache_dir=cache, **SETTINGS)
    entries = sorted(cache.iterdir())
    assert len(entries) == 2
    entries[0].write_bytes(entries[0].read_bytes()[:40])  # truncated
    save_file({"latents": torch.full((1, 3, 16, 16), float("nan"))}, str(entries[1]))  # readable, not finite
    with pytest.warns(UserWarning, match="latent cache entry .* is damaged"):
        again = make_pipeline().finetune(*PROMPTS, images=random_images(2), cache_dir=cache, **SETTINGS)
    assert again.num_cached_latents == 0 and again.loss_history == first.loss_history
    third = make_pipeline().finetune(*PROMPTS, images=random_images(2), cache_dir=cache, **SETTINGS)
    assert third.num_cached_latents == 2  # rewritten

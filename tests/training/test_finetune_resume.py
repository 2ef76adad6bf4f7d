"""Resumable fine-tuning: checkpoints every N optimizer steps, resumed bit for bit (also after a SIGKILL)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import make_pipeline, random_images
from peft.utils import get_peft_model_state_dict

from diffusionclip_pipeline.training.checkpointing import CHECKPOINT_NAME, TRAINER_STATE_NAME, read_checkpoint

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)  # conftest's folder
PROMPTS = ("red circle", "blue circle")
# 3 images in batches of 2: two batches per epoch (the second one partial), two epochs; 4 CLIP views (the default)
# so that the CLIP loss's view generator matters
SETTINGS = dict(t0=100, num_inversion_steps=3, num_train_steps=2, num_epochs=2, batch_size=2, identity_loss_weight=0.5)


def identity_loss_until(n=None, error=KeyboardInterrupt, delay=0.0):
    """An L1 identity loss that raises ``error`` at its ``n``-th call (never for ``n=None``); ``delay`` seconds per
    call slow a run down without changing its values."""
    calls = []

    def identity_loss(x0, x0_pred):
        calls.append(1)
        if len(calls) == n:
            raise error()
        if delay:
            time.sleep(delay)
        return (x0 - x0_pred).abs().mean(dim=(1, 2, 3))

    return identity_loss


def adapter_state(pipe, name="default"):
    return {k: v.clone() for k, v in get_peft_model_state_dict(pipe.unet, adapter_name=name).items()}


def assert_identical(a, b):
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]


def uninterrupted(**kw):
    pipe = make_pipeline()
    out = pipe.finetune(*PROMPTS, images=random_images(3), identity_loss=identity_loss_until(), **{**SETTINGS, **kw})
    return adapter_state(pipe), out.loss_history


def checkpointed_run(checkpoint_dir, n=None, every=1, pipe=None, **kw):
    """A run with checkpoints, interrupted (KeyboardInterrupt) at the ``n``-th identity-loss call."""
    pipe = pipe or make_pipeline()
    return pipe.finetune(
        *PROMPTS, images=random_images(3), identity_loss=identity_loss_until(n), checkpoint_dir=checkpoint_dir,
        checkpoint_every=every, **{**SETTINGS, **kw},
    )  # fmt: skip


@pytest.mark.parametrize(
    "kw, call, every, where, last",
    [
        # efficient: 2 optimizer steps per batch, 8 in all; stopped in epoch 1, batch 1: resumes within an epoch
        (dict(scheme="efficient"), 7, 1, (1, 1, 6), 8),
        # checkpoint_every=3 is rounded up to batch ends: steps 4 (epoch 0 done) and 8
        (dict(scheme="efficient"), 7, 3, (1, 0, 4), 8),
        # accumulating 3 micro-steps (updates after micro-steps 3 and 6 of 8): a checkpoint only at a batch end that
        # is an accumulation boundary (micro-step 6), none at the end (gradients pending)
        (dict(scheme="efficient", gradient_accumulation_steps=3), 8, 1, (1, 1, 2), 2),
        # full_chain: 1 optimizer step per batch, 4 in all
        (dict(scheme="full_chain"), 4, 1, (1, 1, 3), 4),
        (dict(scheme="full_chain"), 3, 1, (1, 0, 2), 4),
    ],
    ids=["efficient", "efficient-every-3", "efficient-accumulate-3", "full_chain-mid-epoch", "full_chain-epoch-end"],
)
def test_interrupted_run_resumes_bit_identically(tmp_path, kw, call, every, where, last):
    expected, expected_losses = uninterrupted(**kw)
    interrupted = make_pipeline()
    with pytest.raises(KeyboardInterrupt):
        checkpointed_run(tmp_path, n=call, every=every, pipe=interrupted, **kw)
    assert interrupted.lora_adapters == []  # the run is transactional: its adapter is discarded ...
    checkpoint = read_checkpoint(tmp_path)  # ... but its checkpoint stays
    assert (checkpoint.epoch, checkpoint.batch, checkpoint.num_updates) == where
    assert os.listdir(tmp_path) == [CHECKPOINT_NAME]

    fresh = make_pipeline()
    out = fresh.finetune(
        *PROMPTS, images=random_images(3), identity_loss=identity_loss_until(), resume_from=tmp_path / CHECKPOINT_NAME,
        checkpoint_dir=tmp_path, checkpoint_every=every, **{**SETTINGS, **kw},
    )  # fmt: skip
    assert out.loss_history == expected_losses
    assert_identical(adapter_state(fresh), expected)
    assert fresh.lora_adapters == ["default"]
    assert read_checkpoint(tmp_path).num_updates == last  # the resumed run went on checkpointing


def test_fp16_loss_scaling_state_is_restored(tmp_path):
    # the GradScaler's scale and growth tracker are part of the checkpoint; a float16 UNet, float32 adapter
    kw = dict(scheme="full_chain", mixed_precision="fp16", learning_rate=2e-2)

    def pipeline():
        pipe = make_pipeline()
        pipe.unet.to(torch.float16)
        return pipe

    expected_pipe = pipeline()
    expected = expected_pipe.finetune(
        *PROMPTS, images=random_images(3), identity_loss=identity_loss_until(), **{**SETTINGS, **kw}
    ).loss_history
    with pytest.raises(KeyboardInterrupt):
        checkpointed_run(tmp_path, n=3, pipe=pipeline(), **kw)
    assert read_checkpoint(tmp_path).trainer_state["grad_scaler"]["scale"] > 0
    fresh = pipeline()
    out = fresh.finetune(
        *PROMPTS,
        images=random_images(3),
        identity_loss=identity_loss_until(),
        resume_from=tmp_path,
        **{**SETTINGS, **kw},
    )
    assert out.loss_history == expected
    assert_identical(adapter_state(fresh), adapter_state(expected_pipe))


def test_checkpoint_adapter_is_a_loadable_adapter_file_and_a_finished_run_resumes_to_the_same_adapter(tmp_path):
    trained = make_pipeline()
    out = checkpointed_run(tmp_path, every=2, pipe=trained)
    checkpoint = read_checkpoint(tmp_path)
    assert (checkpoint.epoch, checkpoint.batch, checkpoint.num_updates) == (2, 0, 8)
    assert checkpoint.loss_history == out.loss_history
    assert sorted(os.listdir(checkpoint.path)) == [
        "optimizer.safetensors", "pytorch_lora_weights.safetensors", "random_states.safetensors", TRAINER_STATE_NAME,
    ]  # fmt: skip
    loaded = make_pipeline()
    loaded.load_lora_weights(os.path.join(checkpoint.path, "pytorch_lora_weights.safetensors"))
    assert_identical(adapter_state(loaded), adapter_state(trained))
    # resuming a finished run trains nothing more and gives the same adapter and history
    resumed = make_pipeline()
    again = resumed.finetune(
        *PROMPTS, images=random_images(3), identity_loss=identity_loss_until(), resume_from=tmp_path, **SETTINGS
    )
    assert again.loss_history == out.loss_history
    assert_identical(adapter_state(resumed), adapter_state(trained))
    state = json.loads((tmp_path / CHECKPOINT_NAME / TRAINER_STATE_NAME).read_text())
    assert state["settings"]["learning_rate"] == 5e-4 and state["settings"]["prompt_tar"] == "blue circle"
    assert set(state["settings"]) >= {"base_unet", "training_images", "latents", "direction", "scheduler"}


KILL_SCRIPT = r"""
import sys
sys.path[:0] = [{tests!r}, {here!r}]
import torch
torch.set_num_threads(1)
from conftest import make_pipeline, random_images
from test_finetune_resume import PROMPTS, SETTINGS, identity_loss_until

pipe = make_pipeline()
pipe.finetune(
    *PROMPTS, images=random_images(3), identity_loss=identity_loss_until(delay={delay}),
    checkpoint_dir={checkpoint_dir!r}, checkpoint_every=1, **SETTINGS,
)
print("finished")
"""


def checkpoint_updates(checkpoint_dir) -> int:
    """The step count of the checkpoint in ``checkpoint_dir`` (0 while there is none), read as another process
    writes it."""
    try:
        with open(os.path.join(checkpoint_dir, CHECKPOINT_NAME, TRAINER_STATE_NAME), encoding="utf-8") as handle:
            return json.load(handle)["num_updates"]
    except (OSError, ValueError):
        return 0


@pytest.mark.slow
def test_sigkilled_run_resumes_bit_identically(tmp_path):
    """A fine-tuning process SIGKILLed mid-run (checkpoint every step) leaves its last complete checkpoint; resuming
    from it gives the uninterrupted run's adapter and loss history, tensor for tensor."""
    checkpoint_dir = str(tmp_path / "ckpt")
    # 0.3 s per step: 8 steps
    script = KILL_SCRIPT.format(tests=TESTS, here=HERE, checkpoint_dir=checkpoint_dir, delay=0.3)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 180
        while checkpoint_updates(checkpoint_dir) < 3 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert process.poll() is None, process.communicate()[1][-3000:]  # still running: killed mid-run
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL

    checkpoint = read_checkpoint(checkpoint_dir)  # complete: every file matches the checksums trainer_state.json lists
    assert 3 <= checkpoint.num_updates < 8
    assert len(checkpoint.loss_history) == checkpoint.num_updates  # "efficient": one loss per optimizer step
    expected, expected_losses = uninterrupted()
    assert checkpoint.loss_history == expected_losses[: checkpoint.num_updates]
    fresh = make_pipeline()
    out = fresh.finetune(
        *PROMPTS, images=random_images(3), identity_loss=identity_loss_until(), resume_from=checkpoint_dir,
        checkpoint_dir=checkpoint_dir, checkpoint_every=1, **SETTINGS,
    )  # fmt: skip
    assert out.loss_history == expected_losses
    assert_identical(adapter_state(fresh), expected)
    # a write the kill interrupted left at most a temporary sibling folder, which the next checkpoint removed
    assert os.listdir(checkpoint_dir) == [CHECKPOINT_NAME]


@pytest.fixture
def interrupted_checkpoint(tmp_path):
    """The checkpoint of a run stopped at its 5th loss call (checkpoint after step 4: end of epoch 0)."""
    with pytest.raises(KeyboardInterrupt):
        checkpointed_run(tmp_path / "ckpt", n=5)
    return tmp_path / "ckpt"


def test_resume_with_other_settings_is_refused_naming_them(interrupted_checkpoint):
    pipe = make_pipeline()
    kw = dict(identity_loss=identity_loss_until(), resume_from=interrupted_checkpoint)
    cases = [
        (dict(learning_rate=1e-3), ["`learning_rate` (checkpoint: 0.0005, now: 0.001)"]),
        (dict(num_epochs=3, lora_rank=2), ["`num_epochs`", "`lora_rank`"]),
        (dict(prompt_tar="green circle"), ["`prompt_tar` (checkpoint: 'blue circle', now: 'green circle')"]),
        (dict(images=random_images(3, seed=1)), ["`training_images`", "`latents`"]),
        (dict(source_images=random_images(2, seed=1), target_images=random_images(2, seed=2)), ["`direction`"]),
    ]
    for change, names in cases:
        args = {"prompt_src": PROMPTS[0], "prompt_tar": PROMPTS[1], "images": random_images(3), **SETTINGS, **change}
        with pytest.raises(ValueError, match="settings differ from the checkpoint's") as info:
            pipe.finetune(**args, **kw)
        assert all(name in str(info.value) for name in names), str(info.value)
        assert pipe.lora_adapters == []
    other_base = make_pipeline(seed=1)  # another base UNet
    with pytest.raises(ValueError, match="`base_unet`"):
        other_base.finetune(*PROMPTS, images=random_images(3), **SETTINGS, **kw)
    assert other_base.lora_adapters == []


def test_truncated_or_corrupt_checkpoint_is_refused(interrupted_checkpoint, tmp_path):
    source = interrupted_checkpoint / CHECKPOINT_NAME

    def damaged(name, damage):
        target = tmp_path / f"damaged-{len(os.listdir(tmp_path))}"
        shutil.copytree(source, target)
        path = target / name
        if damage == "truncate":
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        elif damage == "flip":
            data = bytearray(path.read_bytes())
            data[-5] ^= 0xFF
            path.write_bytes(bytes(data))
        elif damage == "delete":
            path.unlink()
        else:
            path.write_text(damage)
        return target

    cases = [
        (damaged("optimizer.safetensors", "truncate"), "optimizer.safetensors does not match its checksum"),
        (damaged("pytorch_lora_weights.safetensors", "flip"), "pytorch_lora_weights.safetensors does not match"),
        (damaged("random_states.safetensors", "delete"), "random_states.safetensors is missing"),
        (damaged(TRAINER_STATE_NAME, "truncate"), "unreadable or incomplete"),
        (damaged(TRAINER_STATE_NAME, '{"format": "something else"}'), "not a diffusionclip-finetune-checkpoint"),
        (damaged(TRAINER_STATE_NAME, "delete"), "not a fine-tuning checkpoint"),
    ]
    for path, match in cases:
        with pytest.raises(ValueError, match=match):
            read_checkpoint(path)
    pipe = make_pipeline()
    with pytest.raises(ValueError, match="does not match its checksum"):
        pipe.finetune(
            *PROMPTS, images=random_images(3), identity_loss=identity_loss_until(), resume_from=cases[0][0], **SETTINGS
        )
    assert pipe.lora_adapters == []


def test_leftover_of_an_interrupted_write_is_ignored_and_removed(interrupted_checkpoint):
    # what a kill during a checkpoint write leaves: a temporary sibling with part of the files; the complete
    # checkpoint next to it is untouched (the swap is atomic)
    leftover = interrupted_checkpoint / f".{CHECKPOINT_NAME}.tmp-killed"
    leftover.mkdir()
    (leftover / "optimizer.safetensors").write_bytes(b"\0" * 10)
    assert read_checkpoint(interrupted_checkpoint).num_updates == 4
    expected, expected_losses = uninterrupted()
    pipe = make_pipeline()
    out = pipe.finetune(
        *PROMPTS, images=random_images(3), identity_loss=identity_loss_until(), resume_from=interrupted_checkpoint,
        checkpoint_dir=interrupted_checkpoint, checkpoint_every=1, **SETTINGS,
    )  # fmt: skip
    assert out.loss_history == expected_losses
    assert_identical(adapter_state(pipe), expected)
    assert os.listdir(interrupted_checkpoint) == [CHECKPOINT_NAME]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(checkpoint_every=0, checkpoint_dir="x"), ValueError, "`checkpoint_every` must be a positive integer"),
        (dict(checkpoint_every=-3, checkpoint_dir="x"), ValueError, "`checkpoint_every`"),
        (dict(checkpoint_every=1.5, checkpoint_dir="x"), TypeError, "`checkpoint_every`"),
        (dict(checkpoint_every=True, checkpoint_dir="x"), TypeError, "`checkpoint_every`"),
        (dict(checkpoint_dir="x"), ValueError, "`checkpoint_dir` needs `checkpoint_every`"),
        (dict(checkpoint_every=2), ValueError, "needs a `checkpoint_dir`"),
        (dict(checkpoint_dir=5, checkpoint_every=1), TypeError, "`checkpoint_dir`"),
        (dict(checkpoint_dir="file", checkpoint_every=1), ValueError, "`checkpoint_dir` .* is not a folder"),
        (dict(resume_from=3), TypeError, "`resume_from`"),
        (dict(resume_from="missing"), ValueError, "`resume_from` .* is not a folder"),
        (dict(resume_from="empty"), ValueError, "`resume_from` .* is not a fine-tuning checkpoint"),
    ],
)
def test_checkpoint_argument_validation(tmp_path, kwargs, error, match):
    (tmp_path / "file").write_text("")
    (tmp_path / "empty").mkdir()
    kwargs = {k: str(tmp_path / v) if isinstance(v, str) else v for k, v in kwargs.items()}
    pipe = make_pipeline()
    with pytest.raises(error, match=match):
        pipe.finetune(*PROMPTS, images=random_images(2), **SETTINGS, identity_loss=identity_loss_until(), **kwargs)
    assert pipe.lora_adapters == []
    assert sorted(os.listdir(tmp_path)) == ["empty", "file"]  # nothing written

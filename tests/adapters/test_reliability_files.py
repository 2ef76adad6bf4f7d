"""Adapter files and folders (docs/reliability.md, "Files on disk" and "Inputs and loaded weights"): crafted metadata
costs no quadratic CPU, half a LoRA pair is refused, an adapter folder is replaced as a whole, temporary files of live
writers are never removed, and crafted inputs give `ValueError` (float8, deep JSON, unknown names, links)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import add_random_adapter, make_pipeline
from safetensors import safe_open
from safetensors.torch import save_file

from diffusionclip_pipeline.loaders.lora_file import (
    DIFFUSERS_METADATA_KEY,
    LORA_WEIGHT_NAME,
    load_adapters_folder,
    read_adapter_file,
)
from diffusionclip_pipeline.utils.io import atomic_directory, atomic_write_text

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def saved(tmp_path):
    """A pipeline with the adapter ``a`` and its saved folder."""
    pipe = make_pipeline(with_clip=False)
    add_random_adapter(pipe, "a")
    pipe.save_lora_weights(tmp_path / "a", adapter_name="a")
    return pipe, tmp_path / "a" / LORA_WEIGHT_NAME


def rewrite(source, target, tensors=None, metadata=None):
    """``source``'s adapter file written to ``target`` with ``tensors(dict)`` / ``metadata(dict)`` changed."""
    with safe_open(str(source), framework="pt") as handle:
        meta, data = dict(handle.metadata()), {k: handle.get_tensor(k) for k in handle.keys()}
    data = tensors(data) if tensors else data
    meta = metadata(meta) if metadata else meta
    os.makedirs(os.path.dirname(target), exist_ok=True)
    save_file(data, str(target), metadata=meta)
    return target


def with_targets(targets):
    def change(meta):
        config = json.loads(meta[DIFFUSERS_METADATA_KEY])
        config["unet.target_modules"] = targets
        meta[DIFFUSERS_METADATA_KEY] = json.dumps(config)
        return meta

    return change


# ---- item 7: target modules ----------------------------------------------------------------------------------


def test_twenty_thousand_bogus_targets_are_refused_at_once(saved, tmp_path):
    pipe, path = saved
    bogus = [f"block_{i}.bogus_{i}" for i in range(20_000)]
    crafted = rewrite(path, tmp_path / "crafted" / LORA_WEIGHT_NAME, metadata=with_targets(bogus + ["to_q"]))
    started = time.monotonic()
    with pytest.raises(ValueError, match="20001 target modules, more than 1024"):
        pipe.load_lora_weights(crafted.parent, adapter_name="crafted")
    assert time.monotonic() - started < 5 and "crafted" not in pipe.lora_adapters


def test_targets_naming_no_module_are_dropped_before_peft(saved, tmp_path):
    pipe, path = saved
    real = list(read_adapter_file(str(path)).settings.target_modules)
    crafted = rewrite(path, tmp_path / "extra" / LORA_WEIGHT_NAME, metadata=with_targets(real + ["nope", "x.y"] * 400))
    pipe.load_lora_weights(crafted.parent, adapter_name="extra")
    assert sorted(pipe.unet.peft_config["extra"].target_modules) == sorted(real)
    for key, value in pipe.unet.state_dict().items():
        if ".extra." in key:
            assert torch.equal(value, pipe.unet.state_dict()[key.replace(".extra.", ".a.")])


# ---- item 9: half a LoRA pair ------------------------------------------------------------------------------------


@pytest.mark.parametrize("part", ["lora_A", "lora_B"])
def test_half_a_lora_pair_is_refused(saved, tmp_path, part):
    pipe, path = saved

    def drop_one(data):
        key = sorted(k for k in data if f".{part}." in k)[0]
        return {k: v for k, v in data.items() if k != key}

    crafted = rewrite(path, tmp_path / part / LORA_WEIGHT_NAME, tensors=drop_one)
    with pytest.raises(ValueError, match="half a LoRA pair"):
        pipe.load_lora_weights(crafted.parent, adapter_name="half")
    assert "half" not in pipe.lora_adapters


# ---- item 11: crafted values are ValueErrors ----------------------------------------------------------------------


def test_float8_deep_json_and_unknown_names_are_value_errors(saved, tmp_path):
    pipe, path = saved
    if hasattr(torch, "float8_e4m3fn"):
        crafted = rewrite(path, tmp_path / "f8" / LORA_WEIGHT_NAME,
                          tensors=lambda d: {k: v.to(torch.float8_e4m3fn) for k, v in d.items()})  # fmt: skip
        with pytest.raises(ValueError, match="float16/bfloat16/float32/float64"):
            pipe.load_lora_weights(crafted.parent, adapter_name="f8")
    deep = "[" * 100_000 + "]" * 100_000

    def deep_metadata(meta):
        meta[DIFFUSERS_METADATA_KEY] = deep
        return meta

    crafted = rewrite(path, tmp_path / "deep" / LORA_WEIGHT_NAME, metadata=deep_metadata)
    with pytest.raises(ValueError, match="unreadable LoRA metadata"):
        pipe.load_lora_weights(crafted.parent, adapter_name="deep")
    with pytest.raises(ValueError, match="No adapter named 'nope'"):
        pipe.save_lora_weights(tmp_path / "out", adapter_name="nope")
    assert not (tmp_path / "out").exists()


def test_a_linked_adapter_folder_is_not_followed(saved, tmp_path):
    pipe, _ = saved
    pipe.save_pretrained(tmp_path / "pipe")
    outside = tmp_path / "outside"
    os.rename(tmp_path / "pipe" / "lora" / "a", outside)
    os.symlink(outside, tmp_path / "pipe" / "lora" / "a")
    fresh = make_pipeline(with_clip=False)
    with pytest.raises(ValueError, match="is a link"):
        load_adapters_folder(fresh.unet, str(tmp_path / "pipe" / "lora"))
    assert fresh.lora_adapters == []


def test_the_load_warning_names_no_cli_option_that_does_not_exist(saved):
    pipe, path = saved
    with pytest.warns(UserWarning, match="keep_active=True") as record:
        pipe.load_lora_weights(path.parent, adapter_name="b")
    assert "--keep-active" not in str(record[0].message)


# ---- item 10: the adapter folder as a whole ----------------------------------------------------------------------


def test_an_adapter_folder_is_replaced_as_a_whole_keeping_other_files(saved, tmp_path):
    pipe, path = saved
    folder = path.parent
    (folder / "logs").mkdir()
    (folder / "logs" / "events.txt").write_text("kept")
    (folder / "validation.csv").write_text("kept")
    (folder / ".tmpab12cd").write_bytes(b"")  # safetensors' own temporary file, left by a kill
    (folder / f".{LORA_WEIGHT_NAME}.999999999.x.tmp").write_bytes(b"")  # a killed atomic_write's
    add_random_adapter(pipe, "b", seed=5)
    pipe.save_lora_weights(folder, adapter_name="b")
    assert sorted(os.listdir(folder)) == ["README.md", "logs", LORA_WEIGHT_NAME, "validation.csv"]
    assert (folder / "logs" / "events.txt").read_text() == "kept"
    assert "| rank | 2 |" in (folder / "README.md").read_text() and read_adapter_file(str(path)).settings.rank == 2
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".a.")]  # no temporary sibling left


KILL_SAVE = r"""
import sys, itertools
sys.path[:0] = [{tests!r}]
import torch
torch.set_num_threads(1)
from conftest import add_random_adapter, make_pipeline
pipe = make_pipeline(with_clip=False)
add_random_adapter(pipe, "one", rank=2, seed=1)
add_random_adapter(pipe, "two", rank=4, seed=2, targets=("to_q", "to_k", "to_v", "conv1", "conv2"))
pipe.save_lora_weights({folder!r}, adapter_name="one")
print("ready", flush=True)
for name in itertools.cycle(["two", "one"]):
    pipe.save_lora_weights({folder!r}, adapter_name=name)
"""


@pytest.mark.slow
def test_killed_adapter_saves_leave_one_complete_adapter(tmp_path):
    """20 SIGKILLs at random moments of repeated saves of two different adapters into one folder: the folder always
    holds one adapter's weights with its own card, and no temporary file is left after the next save."""
    folder = str(tmp_path / "adapter")
    rng, mixed = random.Random(0), 0
    for _ in range(20):
        code = KILL_SAVE.format(tests=TESTS, folder=folder)
        process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                                   env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
        assert process.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.5))
        process.send_signal(signal.SIGKILL)
        process.wait()
        adapter = read_adapter_file(folder)
        card = open(os.path.join(folder, "README.md"), encoding="utf-8").read()
        assert f"| rank | {adapter.settings.rank} |" in card  # the card of the weights beside it
        mixed += f"| rank | {6 - adapter.settings.rank} |" in card
        assert sorted(f for f in os.listdir(folder) if not f.startswith(".")) == ["README.md", LORA_WEIGHT_NAME]
    assert mixed == 0
    pipe = make_pipeline(with_clip=False)
    add_random_adapter(pipe, "one", rank=2, seed=1)
    pipe.save_lora_weights(folder, adapter_name="one")
    assert sorted(os.listdir(folder)) == ["README.md", LORA_WEIGHT_NAME]
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]


# ---- item 8: two writers in one folder ---------------------------------------------------------------------------


def test_a_live_writers_temporary_files_are_kept_a_dead_ones_removed(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        for pid in (live.pid, dead.pid):
            (tmp_path / f".x.txt.{pid}.abc.tmp").write_text("partial")
            (tmp_path / f".folder.tmp-{pid}-abc").mkdir()
        atomic_write_text(tmp_path / "x.txt", "done")
        with atomic_directory(tmp_path / "folder") as tmp:
            open(os.path.join(tmp, "f"), "w").close()
        left = sorted(f for f in os.listdir(tmp_path) if f.startswith("."))
        assert left == sorted([f".folder.tmp-{live.pid}-abc", f".x.txt.{live.pid}.abc.tmp"])
    finally:
        live.kill()
        live.wait()


RACE_SCRIPT = """
import os, sys
from diffusionclip_pipeline.utils.io import atomic_directory, atomic_write_text
target, me, runs = sys.argv[1], sys.argv[2], int(sys.argv[3])
for i in range(runs):
    with atomic_directory(os.path.join(target, "folder")) as tmp:
        for part in range(3):
            with open(os.path.join(tmp, f"part{part}"), "w") as f:
                f.write(f"{me} {i}")
    atomic_write_text(os.path.join(target, "file.txt"), f"{me} {i}" * 1000)
print("done")
"""


@pytest.mark.slow
def test_two_writers_sharing_a_folder_never_break_each_other(tmp_path):
    """Issue 28, item 8: two processes writing the same folder (as two runs sharing a checkpoint_dir or cache_dir
    do), 2 x 40 writes at once: neither crashes (a writer's temporary files are never removed by the other's
    cleanup), and every read sees one writer's complete folder and file."""
    for attempt in range(20):
        target = tmp_path / f"shared{attempt}"
        target.mkdir()
        writers = [
            subprocess.Popen(
                [sys.executable, "-c", RACE_SCRIPT, str(target), name, "40"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )  # fmt: skip
            for name in ("a", "b")
        ]
        for writer in writers:
            out, err = writer.communicate(timeout=300)
            assert writer.returncode == 0 and out.strip() == "done", err[-2000:]
        parts = {(target / "folder" / f"part{i}").read_text() for i in range(3)}
        assert len(parts) == 1  # one writer's complete folder, not a mix
        text = (target / "file.txt").read_text()
        assert text in {f"{me} 39" * 1000 for me in ("a", "b")}
        assert not [f for f in os.listdir(target) if f.startswith(".")]  # no leftovers once both are done

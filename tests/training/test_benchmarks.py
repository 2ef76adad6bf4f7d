"""The benchmark scripts run (one tiny configuration each); their numbers live in the README, not here."""

import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks")


@pytest.fixture(autouse=True)
def bench_path(monkeypatch):
    monkeypatch.syspath_prepend(BENCH)


def test_bench_finetune_tiny(capsys):
    import bench_finetune

    rows = bench_finetune.main(["--tiny", "--threads", "1"])
    assert [r["scheme"] for r in rows] == ["original", "lora_eff"]
    full, lora = rows
    assert lora["trainable"] < full["trainable"] and lora["artefact_bytes"] < full["artefact_bytes"]
    assert all(r["epoch_s"] > 0 and r["peak_bytes"] > 0 for r in rows)
    assert "| tiny | 2 | lora_eff |" in capsys.readouterr().out


def test_bench_edit_tiny(capsys):
    import bench_edit

    rows = bench_edit.main(["--tiny", "--threads", "1"])
    assert [r["batch"] for r in rows] == [1, 2]
    assert all(r["edit_s"] > 0 and r["floor_s"] > 0 for r in rows)
    assert "edit / floor" in capsys.readouterr().out
    sys.modules.pop("bench_edit", None)


@pytest.mark.slow
def test_bench_latent_tiny(capsys):
    import bench_latent

    bench_latent.main(["--tiny", "--resolution", "32", "--steps", "1"])
    out = capsys.readouterr().out
    for name in bench_latent.CONFIGS:
        assert f"| {name} |" in out and "failed" not in out


def test_bench_fast_tiny(capsys):
    import bench_fast

    rows = bench_fast.main(["--tiny", "--threads", "1"])
    out = capsys.readouterr().out
    assert [r["scheme"] for r in rows] == ["official", "today", "fast", "effdiff"]
    for name in ("official", "today", "fast", "effdiff"):
        assert f"| tiny | {name} |" in out
    by = {r["scheme"]: r for r in rows}
    # hook-counted UNet calls per image: the fast edit makes at most 6 (docs/fast.md), the one-step scheme one
    # forward (with gradients) per image per epoch and no other call; the official scheme its 39 + 40 and 6
    assert by["fast"]["edit_calls"] <= 6 and by["effdiff"]["edit_calls"] <= 6
    for name in ("fast", "effdiff"):
        assert (by[name]["grad_epoch"], by[name]["nograd_epoch"], by[name]["encode"]) == (1, 0, 0)
    assert (by["official"]["edit_calls"], by["official"]["grad_epoch"], by["official"]["encode"]) == (79, 6, 39)
    assert (by["today"]["edit_calls"], by["today"]["grad_epoch"], by["today"]["encode"]) == (64, 6, 80)
    assert by["fast"]["trainable"] < by["official"]["trainable"]

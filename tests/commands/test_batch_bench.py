"""The batch-editing benchmark's smoke run (benchmarks/bench_batch.py --tiny): fresh commands, their rows and the
UNet-call count per image. Slow: each configuration starts a Python process."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                "benchmarks"))  # fmt: skip

import bench_batch  # noqa: E402

pytestmark = pytest.mark.slow


def test_tiny_run_rows(tmp_path, capsys):
    argv = ["--tiny", "--images", "4", "--processes", "1", "--batch-sizes", "1", "2", "--compare-at", "2", "--work",
            str(tmp_path / "work"), "--json", str(tmp_path / "rows.json")]  # fmt: skip
    rows = bench_batch.main(argv)
    assert [(r["processes"], r["batch_size"], r["images"]) for r in rows] == [(1, 2, 4), (1, 1, 4)]
    for row in rows:
        assert row["unet_calls_per_image"] == 4  # 2 inversion + 2 generation steps
        assert 0 < row["outside_unet"] < 1 and row["images_per_s"] > 0 and row["wall_s"] >= row["loop_s"]
    out = capsys.readouterr().out
    assert "| processes | batch size |" in out and (tmp_path / "rows.json").is_file()
    assert sorted(os.listdir(tmp_path / "work" / "p1-b2" / "out")) == [
        "manifest.rank0.jsonl", *[f"scene{i:04d}.png" for i in range(4)]
    ]  # fmt: skip

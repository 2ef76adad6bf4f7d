"""The README's offline Python quick start runs as written, with one training epoch instead of 15 (wiring, not
quality: the quality is measured in docs/testbed.md)."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def offline_block() -> str:
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = text.split("## Try it offline", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_offline_quick_start_runs(tmp_path, monkeypatch, capsys):
    code = offline_block()
    old = "**RECOMMENDED_FINETUNE)"
    assert old in code, "the README's offline block changed: update this test"
    code = code.replace(old, '**{**RECOMMENDED_FINETUNE, "num_epochs": 1})')
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md (offline quick start)", "exec"), {"__name__": "readme"})
    assert (tmp_path / "red2blue" / "pytorch_lora_weights.safetensors").is_file()
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"\[(True|False)(, (True|False)){3}\]", printed), printed

"""The README's quick start runs as written: the same code, with the hub ids replaced by local folders of the
test-bed's models (no hub), rendered images for the faces, and a shorter fine-tuning."""

import os
import re
import shutil

import numpy as np
import PIL.Image

from diffusionclip_pipeline.testbed import WEIGHTS_DIR, load_pipeline, render_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
README = os.path.join(ROOT, "README.md")
# wiring, not quality: one epoch of one step on a shallow, short inversion
TINY = "settings.update(num_epochs=1, t0=100, num_inversion_steps=4, num_train_steps=2)"


def quick_start() -> str:
    text = open(README, encoding="utf-8").read()
    section = text.split("## Quick start with real models", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def substitute(code: str, replacements: dict[str, str]) -> str:
    for old, new in replacements.items():
        assert old in code, f"the README's quick start no longer has {old!r}: update this test"
        code = code.replace(old, new)
    return code


def test_quick_start_runs(tmp_path, monkeypatch):
    load_pipeline(second_clip=False).save_pretrained(tmp_path / "ddpm")  # stands in for google/ddpm-celebahq-256
    (tmp_path / "clip").mkdir()  # stands in for openai/clip-vit-base-patch16: model and tokenizer in one folder
    for part in ("clip", "tokenizer"):
        for name in os.listdir(os.path.join(WEIGHTS_DIR, part)):
            shutil.copy(os.path.join(WEIGHTS_DIR, part, name), tmp_path / "clip" / name)
    (tmp_path / "faces" / "train").mkdir(parents=True)
    (tmp_path / "faces" / "test").mkdir()
    images, _ = render_dataset(3, seed=0, shape="circle", colour="red")
    for i, image in enumerate(images[:2]):
        image.save(tmp_path / "faces" / "train" / f"{i}.png")
    images[2].save(tmp_path / "faces" / "test" / "face.png")

    code = substitute(quick_start(), {
        '"google/ddpm-celebahq-256"': repr(str(tmp_path / "ddpm")),
        '"openai/clip-vit-base-patch16"': repr(str(tmp_path / "clip")),
        "settings = dict(learning_rate=1e-4, num_epochs=5, l1_loss_weight=0.3)":
            "settings = dict(learning_rate=1e-4, num_epochs=5, l1_loss_weight=0.3); " + TINY,
    })  # fmt: skip
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md (quick start)", "exec"), {"__name__": "readme"})
    assert (tmp_path / "smile" / "pytorch_lora_weights.safetensors").is_file()
    edited, again = (np.asarray(PIL.Image.open(tmp_path / name)) for name in ("smiling.png", "smiling-again.png"))
    assert edited.shape == (32, 32, 3)
    np.testing.assert_array_equal(edited, again)  # "the saved adapter gives the same edit"

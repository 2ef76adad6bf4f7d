"""Adapter model cards: `save_lora_weights` writes ``README.md`` (and ``grid.png``); `push_adapter_to_hub` uploads."""

from __future__ import annotations

import os
import re

import huggingface_hub
import PIL.Image
import pytest
from conftest import make_pipeline, random_images
from huggingface_hub import ModelCard

from diffusionclip_pipeline import __version__
from diffusionclip_pipeline.loaders import lora_file, lora_state
from diffusionclip_pipeline.loaders.model_card import CARD_MARKER, CARD_NAME, GRID_NAME, adapter_card, hub_model_id

PROVENANCE = {
    "prompt_src": "face", "prompt_tar": "smiling | face", "t0": 300, "num_epochs": 3, "learning_rate": 1e-4,
    "package_version": "9.9.9", "extra_setting": "kept",
}  # fmt: skip


def with_adapter(pipe, name: str = "smile", provenance: dict | None = None, rank: int = 2):
    lora_state.add_adapter(pipe.unet, lora_state.LoraSettings(rank=rank, alpha=float(rank)), name)
    lora_state.set_provenance(pipe.unet, name, PROVENANCE if provenance is None else provenance)
    return pipe


def test_save_writes_a_card_the_hub_parses(tmp_path):
    pipe = with_adapter(make_pipeline(with_clip=False))
    pipe.unet.register_to_config(_name_or_path="google/ddpm-celebahq-256")
    pipe.save_lora_weights(tmp_path / "smile", license="apache-2.0")
    assert sorted(os.listdir(tmp_path / "smile")) == [CARD_NAME, lora_file.LORA_WEIGHT_NAME]  # no grid, no leftovers
    card = ModelCard.load(tmp_path / "smile" / CARD_NAME)
    assert {"diffusionclip", "lora", "text-guided-image-editing"} <= set(card.data.tags)
    assert card.data.library_name == "diffusers"
    assert card.data.base_model == "google/ddpm-celebahq-256"
    assert card.data.license == "apache-2.0"
    text = card.text
    for expected in ("“face” → “smiling | face”", "smiling \\| face", "| t0 (inversion depth) | 300 |",
                     "| epochs | 3 |", "9.9.9", "| extra_setting | kept |", "| rank | 2 |",
                     'from_pretrained("google/ddpm-celebahq-256")'):  # fmt: skip
        assert expected in text, expected
    assert "## Validation" not in text and GRID_NAME not in text


def test_card_of_a_local_model_has_no_base_model_and_lists_validation(tmp_path):
    pipe = with_adapter(make_pipeline(with_clip=False), provenance={**PROVENANCE, "validation": {
        "edit_success": 0.875, "clip": {"s_dir": 0.21}}})  # fmt: skip
    pipe.unet.register_to_config(_name_or_path=str(tmp_path))  # a local folder
    pipe.save_lora_weights(tmp_path / "smile")
    card = ModelCard.load(tmp_path / "smile" / CARD_NAME)
    assert card.data.base_model is None and card.data.license is None
    assert "## Validation" in card.text
    assert "| edit_success | 0.875 |" in card.text and "| clip.s_dir | 0.21 |" in card.text


def test_card_of_a_finetuned_adapter_records_its_run(tmp_path):
    pipe = make_pipeline()
    pipe.finetune("red circle", "blue circle", images=random_images(1), num_epochs=1, num_train_steps=1,
                  num_inversion_steps=2, t0=200, clip_num_augmentations=0)  # fmt: skip
    pipe.save_lora_weights(tmp_path / "blue")
    text = (tmp_path / "blue" / CARD_NAME).read_text()
    assert "“red circle” → “blue circle”" in text and "| t0 (inversion depth) | 200 |" in text
    assert f"| diffusionclip-pipeline version | {__version__} |" in text
    # a reloaded adapter's card says the same (the provenance travels in the weights file)
    fresh = make_pipeline(with_clip=False)
    fresh.load_lora_weights(tmp_path / "blue", adapter_name="blue")
    fresh.save_lora_weights(tmp_path / "again")
    assert (tmp_path / "again" / CARD_NAME).read_text() == text


def test_example_images_make_a_before_after_grid(tmp_path):
    pipe = with_adapter(make_pipeline(with_clip=False))
    images = [PIL.Image.new("RGB", (40, 24), c) for c in ("red", "blue", "green")]  # cropped, resized to 16
    pipe.save_lora_weights(tmp_path / "a", example_images=images,
                           example_edit_kwargs=dict(num_inversion_steps=2, num_inference_steps=2))  # fmt: skip
    with PIL.Image.open(tmp_path / "a" / GRID_NAME) as grid:
        assert grid.size == (3 * (16 + 2) + 2, 2 * (16 + 2) + 2)  # image_grid: two rows, 2 px padding
    text = (tmp_path / "a" / CARD_NAME).read_text()
    assert f"]({GRID_NAME})" in text and "`t0=300`" in text and "`num_inference_steps=2`" in text


def test_nothing_is_written_when_the_examples_fail(tmp_path):
    pipe = with_adapter(make_pipeline(with_clip=False))
    with pytest.raises(TypeError, match="example_images"):
        pipe.save_lora_weights(tmp_path / "a", example_images=["not an image"])
    with pytest.raises(TypeError, match="example_edit_kwargs"):
        pipe.save_lora_weights(tmp_path / "a", example_images=random_images(1), example_edit_kwargs=[1])
    assert not os.path.exists(tmp_path / "a") or not os.listdir(tmp_path / "a")


def test_a_foreign_readme_is_kept_and_our_card_is_replaced(tmp_path):
    pipe = with_adapter(make_pipeline(with_clip=False))
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / CARD_NAME).write_text("# my project\n")
    with pytest.warns(UserWarning, match="not written by diffusionclip-pipeline"):
        pipe.save_lora_weights(folder)
    assert (folder / CARD_NAME).read_text() == "# my project\n"
    assert (folder / lora_file.LORA_WEIGHT_NAME).is_file()
    pipe.save_lora_weights(tmp_path / "ours")
    lora_state.set_provenance(pipe.unet, "smile", {**PROVENANCE, "t0": 450})
    pipe.save_lora_weights(tmp_path / "ours")
    text = (tmp_path / "ours" / CARD_NAME).read_text()
    assert CARD_MARKER in text and "| 450 |" in text
    assert sorted(os.listdir(tmp_path / "ours")) == [CARD_NAME, lora_file.LORA_WEIGHT_NAME]


def test_a_weights_file_path_gets_no_card(tmp_path):
    pipe = with_adapter(make_pipeline(with_clip=False))
    pipe.save_lora_weights(tmp_path / "smile.safetensors")
    assert os.listdir(tmp_path) == ["smile.safetensors"]
    with pytest.raises(ValueError, match="needs a folder"):
        pipe.save_lora_weights(tmp_path / "smile.safetensors", example_images=random_images(1))


def test_push_adapter_to_hub_uploads_the_folder(tmp_path, monkeypatch):
    pipe = with_adapter(make_pipeline(with_clip=False))
    calls = {}

    def create_repo(self, repo_id, private=False, exist_ok=False, **kwargs):
        calls["create"] = (repo_id, private, exist_ok, self.token)

    def upload_folder(self, repo_id, folder_path, commit_message=None, **kwargs):
        calls["upload"] = (repo_id, commit_message)
        calls["files"] = sorted(os.listdir(folder_path))
        calls["card"] = ModelCard.load(os.path.join(folder_path, CARD_NAME))
        return "commit-info"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    steps = dict(num_inversion_steps=2, num_inference_steps=2)
    result = pipe.push_adapter_to_hub(
        "me/smile-lora", token="hf_test", private=True, example_images=random_images(2), example_edit_kwargs=steps
    )
    assert result == "commit-info"
    assert calls["create"] == ("me/smile-lora", True, True, "hf_test")
    assert calls["upload"] == ("me/smile-lora", "Upload DiffusionCLIP adapter 'smile'")
    assert calls["files"] == [CARD_NAME, GRID_NAME, lora_file.LORA_WEIGHT_NAME]
    assert 'snapshot_download("me/smile-lora")' in calls["card"].text
    assert "diffusionclip" in calls["card"].data.tags
    with pytest.raises(ValueError, match="repo_id"):
        pipe.push_adapter_to_hub("no-owner")


def test_hub_model_id():
    assert hub_model_id("google/ddpm-celebahq-256") == "google/ddpm-celebahq-256"
    cached = "/root/.cache/huggingface/hub/models--google--ddpm-celebahq-256/snapshots/0123abc/unet"
    assert hub_model_id(cached) == "google/ddpm-celebahq-256"
    assert hub_model_id("/a/local/folder") is None
    assert hub_model_id("relative-folder") is None
    assert hub_model_id(None) is None and hub_model_id("") is None


def test_adapter_card_without_provenance():
    text = adapter_card("imported", {}, {"rank": 4, "alpha": 4.0, "target_modules": ["to_q"]})
    assert "adapter `imported`" in text and "not recorded" in text and "t0=500" in text


def test_provenance_from_a_file_goes_into_the_card_inert():
    """An adapter file's provenance may hold anything: it must not become HTML, links, headings or code."""
    provenance = {
        "prompt_src": "face\n# Heading <script>alert(1)</script>",
        "prompt_tar": "[click](http://evil) ![x](http://evil/x.png)",
        "t0": '500).images[0]; __import__("os").system("rm -rf ~")#',
        "learning_rate": "`code` | cell",
    }
    card = adapter_card("a", provenance, {"rank": 4})
    assert "<script>" not in card and "&lt;script&gt;" in card
    assert re.search(r"(?<!\\)\]\(http://evil", card) is None and "\\[click\\]" in card  # no live link
    assert "\n# Heading" not in card  # one line
    assert "t0=500, edit_strength" in card and "system" not in card.split("## Use")[1].split("## Fine")[0]
    assert "\\`code\\` \\| cell" in card

"""Adapters through diffusers' `PeftAdapterMixin`: one owner of the state, diffusers' file layout, old files."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import add_random_adapter, make_pipeline, make_unet, random_images
from diffusers import UNet2DConditionModel, UNet2DModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from diffusionclip_pipeline import DiffusionCLIPPipeline
from diffusionclip_pipeline.families.unet_adapter_api import (
    base_state_dict,
    has_adapter_api,
    with_adapter_api,
)
from diffusionclip_pipeline.loaders import lora_file, lora_state

EDIT = dict(t0=100, num_inversion_steps=3, num_inference_steps=3, output_type="pt")
TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/, where conftest.py is
LEGACY = os.path.join(TESTS, "data", "legacy_v1_adapter")


def test_plain_unet_gains_the_adapter_api_and_saves_plain(tmp_path):
    pipe = make_pipeline(with_clip=False)
    assert type(pipe.unet) is UNet2DModel and has_adapter_api(pipe.unet)  # the type stays (stock pipelines take it)
    add_random_adapter(pipe, "a")
    # the same calls as on a UNet2DConditionModel
    assert pipe.unet.active_adapters() == ["a"] and list(pipe.unet.peft_config) == ["a"]
    pipe.unet.save_pretrained(tmp_path / "unet")
    config = json.loads((tmp_path / "unet" / "config.json").read_text())
    assert config["_class_name"] == "UNet2DModel"
    reloaded = UNet2DModel.from_pretrained(tmp_path / "unet")
    base = base_state_dict(pipe.unet)
    assert set(reloaded.state_dict()) == set(base)
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in base.items())
    with pytest.raises(TypeError, match="`unet`"):
        with_adapter_api(torch.nn.Linear(2, 2))


def test_pipeline_keeps_no_adapter_state_of_its_own():
    pipe = make_pipeline(with_clip=False)
    add_random_adapter(pipe, "a")
    add_random_adapter(pipe, "b", seed=1)
    pipe.unet.set_adapters(["a", "b"], [0.5, -1.0])  # through the UNet directly: the pipeline sees the same
    assert pipe.get_active_adapters() == ["a", "b"] and lora_state.adapter_weights(pipe.unet) == {"a": 0.5, "b": -1.0}
    assert pipe.get_list_adapters() == {"unet": ["a", "b"]}
    private = {k for k in vars(pipe) if "lora" in k.lower() or "adapter" in k.lower()}
    assert private == set()


def test_unload_leaves_no_stale_peft_config():
    pipe = make_pipeline(with_clip=False)
    x = random_images(1, seed=3)
    base = pipe.edit(x, **EDIT).images
    add_random_adapter(pipe, "a")
    add_random_adapter(pipe, "b", seed=1)
    pipe.set_adapters(["a", "b"], [1.0, 0.5])
    pipe.unload_lora_weights("a")
    assert list(pipe.unet.peft_config) == ["b"] and pipe.get_active_adapters() == ["b"]
    assert lora_state.adapter_weights(pipe.unet) == {"b": 0.5}
    pipe.unload_lora_weights()
    assert pipe.lora_adapters == [] and not hasattr(pipe.unet, "peft_config")
    assert lora_state.tuner_layers(pipe.unet) == []
    assert torch.equal(pipe.edit(x, **EDIT).images, base)


def test_adapter_file_has_diffusers_layout_and_reloads_alpha(tmp_path):
    pipe = make_pipeline(with_clip=False)
    add_random_adapter(pipe, "a", rank=2, alpha=4.0)
    path = pipe.save_lora_weights(tmp_path / "a")
    with safe_open(path, framework="pt") as f:
        keys, metadata = list(f.keys()), f.metadata()
    assert keys and all(k.startswith("unet.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
    config = json.loads(metadata["lora_adapter_metadata"])
    assert config["unet.r"] == 2 and config["unet.lora_alpha"] == 4.0
    ours = json.loads(metadata["diffusionclip"])
    assert ours["format_version"] == 2 and ours["provenance"]["prompt_tar"] == "blue circle"
    assert ours["base_config_fingerprint"] == lora_file.config_fingerprint(pipe.unet)

    # diffusers' own loader reads it, with the right alpha (not alpha = r)
    plain = with_adapter_api(make_unet())
    plain.load_lora_adapter(str(tmp_path / "a"), prefix="unet", use_safetensors=True, adapter_name="a")
    assert plain.peft_config["a"].lora_alpha == 4.0 and plain.peft_config["a"].r == 2
    x, t = random_images(1, seed=2), torch.tensor(50)
    with torch.no_grad():
        torch.testing.assert_close(plain(x, t).sample, pipe.unet(x, t).sample, atol=0, rtol=0)


def test_saved_adapter_reproduces_edits_bit_for_bit_in_a_fresh_process(tmp_path):
    pipe = make_pipeline(with_clip=False)
    add_random_adapter(pipe, "a")
    x = random_images(1, seed=5)
    edited = pipe.edit(x, **EDIT).images
    pipe.save_lora_weights(tmp_path / "adapter")
    save_file({"x": x, "edited": edited}, str(tmp_path / "expected.safetensors"))
    script = f"""
import sys, torch
sys.path.insert(0, {TESTS!r})
torch.set_num_threads(1)
from conftest import make_pipeline
from safetensors.torch import load_file
expected = load_file({str(tmp_path / "expected.safetensors")!r})
pipe = make_pipeline(with_clip=False)
pipe.load_lora_weights({str(tmp_path / "adapter")!r})
EDIT = dict(t0=100, num_inversion_steps=3, num_inference_steps=3, output_type="pt")
out = pipe.edit(expected["x"], **EDIT).images
print("IDENTICAL" if torch.equal(out, expected["edited"]) else "DIFFERENT")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "IDENTICAL" in result.stdout, result.stdout


def test_adapter_file_written_by_version_1_still_loads():
    # written by the code before the diffusers-layout change (tests/data/README.md), rank 2 with alpha 4
    pipe = make_pipeline()
    name = pipe.load_lora_weights(LEGACY)
    assert name == "default" and pipe.unet.peft_config["default"].lora_alpha == 4.0
    expected = load_file(os.path.join(LEGACY, "expected_edit.safetensors"))
    edited = pipe.edit(expected["input"], **EDIT).images
    torch.testing.assert_close(edited, expected["edited"], atol=1e-6, rtol=0)
    assert lora_state.get_provenance(pipe.unet, "default")["prompt_tar"] == "blue circle"


def test_save_pretrained_round_trip_with_adapters_is_exact_and_drops_unloaded_ones(tmp_path):
    pipe = make_pipeline()
    add_random_adapter(pipe, "a")
    add_random_adapter(pipe, "b", seed=1)
    pipe.set_adapters(["a", "b"], [0.75, 0.5])
    x = random_images(1, seed=4)
    mixed = pipe.edit(x, **EDIT).images
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = DiffusionCLIPPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.lora_adapters == ["a", "b"] and lora_state.adapter_weights(loaded.unet) == {"a": 0.75, "b": 0.5}
    assert torch.equal(loaded.edit(x, **EDIT).images, mixed)

    pipe.disable_lora()
    pipe.save_pretrained(tmp_path / "pipe")  # over the old folder
    assert DiffusionCLIPPipeline.from_pretrained(tmp_path / "pipe").get_active_adapters() == []
    pipe.unload_lora_weights()
    pipe.save_pretrained(tmp_path / "pipe")
    assert not os.path.exists(tmp_path / "pipe" / "lora")  # no stale index brings unloaded adapters back
    assert DiffusionCLIPPipeline.from_pretrained(tmp_path / "pipe").lora_adapters == []
    assert sorted(os.listdir(tmp_path)) == ["pipe"]  # no temporary folders left


def test_a_failed_save_pretrained_leaves_the_old_folder(tmp_path, monkeypatch):
    pipe = make_pipeline(with_clip=False)
    add_random_adapter(pipe, "a")
    pipe.save_pretrained(tmp_path / "pipe")
    before = sorted(os.listdir(tmp_path / "pipe"))

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lora_file, "save_adapter", full_disk)
    with pytest.raises(OSError, match="No space"):
        pipe.save_pretrained(tmp_path / "pipe")
    assert sorted(os.listdir(tmp_path / "pipe")) == before and sorted(os.listdir(tmp_path)) == ["pipe"]
    assert DiffusionCLIPPipeline.from_pretrained(tmp_path / "pipe").lora_adapters == ["a"]


@pytest.mark.parametrize("name", ["/abs/dir", "a/b", "..", "a\x00b", "with space", "", "x" * 65, "a.b"])
def test_adapter_names_that_are_not_safe_identifiers_are_refused(tmp_path, name):
    pipe = make_pipeline(with_clip=False)
    with pytest.raises(ValueError, match="`adapter_name`"):
        pipe.load_lora_weights(LEGACY, adapter_name=name)
    with pytest.raises(ValueError, match="`adapter_name`"):
        lora_state.add_adapter(pipe.unet, lora_state.LoraSettings(), name)
    assert pipe.lora_adapters == []
    with pytest.raises(TypeError, match="`adapter_name`"):
        pipe.load_lora_weights(LEGACY, adapter_name=3)


def test_index_may_only_name_folders_inside_the_pipeline_folder(tmp_path):
    pipe = make_pipeline(with_clip=False)
    add_random_adapter(pipe, "a")
    pipe.save_pretrained(tmp_path / "pipe")
    outside = tmp_path / "outside"
    pipe.save_lora_weights(outside)
    index = tmp_path / "pipe" / "lora" / "adapters.json"
    data = json.loads(index.read_text())
    data["adapters"] = [str(outside)]
    index.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="adapter name"):
        DiffusionCLIPPipeline.from_pretrained(tmp_path / "pipe")
    index.write_text("{not json")
    with pytest.raises(ValueError, match="unreadable or malformed"):
        DiffusionCLIPPipeline.from_pretrained(tmp_path / "pipe")


def _rewrite(path, out, tensors=None, metadata=None):
    with safe_open(path, framework="pt") as f:
        old_tensors = {k: f.get_tensor(k) for k in f.keys()}
        old_metadata = f.metadata()
    save_file(tensors if tensors is not None else old_tensors, out, metadata={**old_metadata, **(metadata or {})})
    return out


def test_crafted_or_non_finite_adapters_are_refused_before_any_layer_is_built(tmp_path):
    pipe = make_pipeline(with_clip=False)
    add_random_adapter(pipe, "a")
    good = pipe.save_lora_weights(tmp_path / "good")
    pipe.unload_lora_weights()
    tensors = load_file(good)

    nan = {k: v.clone() for k, v in tensors.items()}
    next(iter(nan.values()))[0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        pipe.load_lora_weights(_rewrite(good, str(tmp_path / "nan.safetensors"), tensors=nan))

    config = json.loads(safe_open(good, framework="pt").metadata()["lora_adapter_metadata"])
    huge = {**config, "unet.r": 200000}
    with pytest.raises(ValueError, match="`lora_rank`"):
        pipe.load_lora_weights(
            _rewrite(good, str(tmp_path / "huge.safetensors"), metadata={"lora_adapter_metadata": json.dumps(huge)})
        )
    big = {**config, "unet.r": 4000}  # allowed rank, but not the tensors' rank: refused before injection
    with pytest.raises(ValueError, match="rank 2, its metadata says 4000"):
        pipe.load_lora_weights(
            _rewrite(good, str(tmp_path / "big.safetensors"), metadata={"lora_adapter_metadata": json.dumps(big)})
        )
    inf_alpha = {**config, "unet.lora_alpha": float("inf")}
    with pytest.raises(ValueError, match="`lora_alpha`"):
        pipe.load_lora_weights(
            _rewrite(good, str(tmp_path / "a.safetensors"), metadata={"lora_adapter_metadata": json.dumps(inf_alpha)})
        )
    dora = {**config, "unet.use_dora": True}
    with pytest.raises(ValueError, match="use_dora"):
        pipe.load_lora_weights(
            _rewrite(good, str(tmp_path / "d.safetensors"), metadata={"lora_adapter_metadata": json.dumps(dora)})
        )
    wrong_shape = {k: (torch.zeros(v.shape[0] + 1, *v.shape[1:]) if ".lora_B." in k else v)
                   for k, v in tensors.items()}  # fmt: skip
    with pytest.raises(ValueError, match="does not fit this UNet"):
        pipe.load_lora_weights(_rewrite(good, str(tmp_path / "w.safetensors"), tensors=wrong_shape))
    assert pipe.lora_adapters == [] and lora_state.tuner_layers(pipe.unet) == []


def test_set_adapters_refuses_non_finite_weights():
    pipe = make_pipeline(with_clip=False)
    add_random_adapter(pipe, "a")
    for bad in (float("nan"), float("inf"), [float("nan")]):
        with pytest.raises(ValueError, match="adapter_weights"):
            pipe.set_adapters("a", bad)
    with pytest.raises(TypeError, match="adapter_weights"):
        pipe.set_adapters("a", "strong")
    with pytest.raises(ValueError, match="no adapter to save"):
        make_pipeline(with_clip=False).save_lora_weights("unused")


def test_same_adapter_api_on_a_conditional_unet():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, norm_num_groups=4, attention_head_dim=4,
    )  # fmt: skip
    assert with_adapter_api(unet) is unet
    lora_state.add_adapter(unet, lora_state.LoraSettings(rank=2, target_modules=("to_q", "to_v")), "a")
    assert unet.active_adapters() == ["a"] and lora_state.adapter_names(unet) == ["a"]
    lora_state.remove_adapter(unet, "a")
    assert lora_state.adapter_names(unet) == [] and lora_state.tuner_layers(unet) == []


def test_removing_an_adapter_restores_the_modules_only_it_wrapped():
    pipe = make_pipeline(with_clip=False)
    before = {n: type(m) for n, m in pipe.unet.named_modules()}
    add_random_adapter(pipe, "a", targets=("to_q",))
    with_a = {n: type(m) for n, m in pipe.unet.named_modules()}
    add_random_adapter(pipe, "b", targets=("to_q", "conv1"))
    pipe.unload_lora_weights("b")
    assert {n: type(m) for n, m in pipe.unet.named_modules()} == with_a
    pipe.unload_lora_weights("a")
    assert {n: type(m) for n, m in pipe.unet.named_modules()} == before


def test_fuse_lora_gives_the_adapted_model_and_refuses_the_inversion_until_unfused():
    pipe = make_pipeline(with_clip=False)
    add_random_adapter(pipe, "a")
    x = random_images(1)
    latents = pipe.invert(x, t0=200, num_inversion_steps=3).x_t0
    settings = {"latents": latents, "t0": 200, "num_inference_steps": 3, "output_type": "pt"}
    adapted = pipe.edit(**settings).images
    pipe.fuse_lora()
    assert pipe.fused_loras == {"a"}
    torch.testing.assert_close(pipe.edit(**settings).images, adapted, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="unfuse_lora"):
        pipe.invert(x, t0=200, num_inversion_steps=3)
    pipe.unfuse_lora()
    assert pipe.fused_loras == set()
    torch.testing.assert_close(pipe.invert(x, t0=200, num_inversion_steps=3).x_t0, latents, atol=1e-5, rtol=0)


def test_adapter_files_get_the_permissions_of_a_plain_write(tmp_path):
    """Written through a temporary file, they used to keep mkstemp's 0o600 while everything else got 0o644."""
    pipe = make_pipeline(with_clip=False)
    add_random_adapter(pipe, "a")
    previous = os.umask(0o027)
    try:
        weights = pipe.save_lora_weights(tmp_path / "a")
    finally:
        os.umask(previous)
    assert os.stat(weights).st_mode & 0o777 == 0o640
    assert os.stat(tmp_path / "a" / "README.md").st_mode & 0o777 == 0o640

"""`load_pipeline(kind="flow")` (issue 32): a Stable Diffusion 3 folder (no T5) with the pixel test-bed's CLIPs of the
loss, as the latent test-bed is loaded. The shipped folder's own tests are in test_testbed_flow.py."""

from __future__ import annotations

import pytest
from conftest import make_sd3_components
from diffusers import StableDiffusion3Pipeline

from diffusionclip_pipeline.families import StableDiffusion3Family
from diffusionclip_pipeline.testbed.pipeline import KINDS, load_pipeline


def test_a_flow_folder_loads_with_the_test_bed_clips(tmp_path):
    StableDiffusion3Pipeline(**make_sd3_components(0)).save_pretrained(tmp_path)
    pipe = load_pipeline(tmp_path, kind="flow")
    assert isinstance(pipe.family, StableDiffusion3Family) and pipe.text_encoder_3 is None
    assert pipe.clip_model is not None and pipe.clip_model_2 is not None
    assert "flow" in KINDS


def test_a_missing_flow_folder_says_how_to_build_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="export_flow.py"):
        load_pipeline(tmp_path, kind="flow")


def test_the_flow_settings_and_kind(tmp_path):
    from conftest import make_pipeline

    from diffusionclip_pipeline.testbed.demo import kind_of
    from diffusionclip_pipeline.testbed.settings import recommended

    finetune, edit = recommended("flow")
    assert "lora_target_modules" not in finetune  # the family's own: the transformer has no ResNet convolutions
    assert edit["num_inversion_steps"] == edit["num_inference_steps"]
    StableDiffusion3Pipeline(**make_sd3_components(0)).save_pretrained(tmp_path)
    assert kind_of(load_pipeline(tmp_path, kind="flow")) == "flow"
    assert kind_of(make_pipeline(with_clip=False)) == "pixel"
    with pytest.raises(ValueError, match="'pixel', 'latent' or 'flow'"):
        recommended("vq")


def test_the_cli_knows_the_flow_test_bed(registry):
    from diffusionclip_pipeline.testbed.cli_plugin import register

    register()
    assert "testbed-flow" in registry.models

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
    flow = registry.models["testbed-flow"]
    # `edit --fast` has the flow test-bed's own preset (the pixel one's depth, not the flow edit's t0 500);
    # `finetune --fast` has none: no fast fine-tune was measured on it
    assert flow.has_fast("edit") and not flow.has_fast("finetune")
    assert flow.settings("edit", fast=True)["encoding"] == "noise"
    assert flow.settings("edit", fast=True)["t0"] != flow.settings("edit")["t0"]


@pytest.mark.slow
def test_flow_colour_edit_beats_reconstruction():
    """On the shipped flow test-bed: fine-tune red -> blue on 16 rendered circles, edit 16 others with the
    recommended flow settings; the same edit without the adapter is the reconstruction, which keeps red and so
    must fail every colour criterion.

    Data seed 3 is neither the settings search's seed (5) nor the report's (7). The bar, 0.5, is the issue's
    85 % target for this edit less a wide margin for 16 images and one seed; the reconstruction scores 0.
    """
    import json

    from diffusionclip_pipeline.testbed import edit_success
    from diffusionclip_pipeline.testbed.demo import run_edit_experiment
    from diffusionclip_pipeline.testbed.settings import recommended

    pipe = load_pipeline(kind="flow")
    result = run_edit_experiment(pipe, "red", "blue", num_train=16, num_test=16, seed=3)
    pipe.disable_lora()
    reconstructed = pipe.edit(result["sources"], **recommended("flow")[1]).images
    baseline = [edit_success(s, r, target_colour="blue")["success"] for s, r in zip(result["sources"], reconstructed)]
    assert sum(baseline) == 0
    assert result["success_rate"] >= 0.5, json.dumps(result["criteria"])

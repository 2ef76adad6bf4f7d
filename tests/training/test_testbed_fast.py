"""The test-bed's fast presets (docs/fast.md): what they cost in UNet calls, and that they are reproducible."""

import numpy as np
import pytest
import torch

from diffusionclip_pipeline.testbed import FAST_EDIT, FAST_FINETUNE, RECOMMENDED_FINETUNE, load_pipeline, world
from diffusionclip_pipeline.training.config import FinetuneConfig


@pytest.mark.filterwarnings("ignore::diffusionclip_pipeline.pipeline_diffusionclip.NoAdapterWarning")
def test_fast_edit_makes_six_unet_calls_per_image_and_is_seeded():
    pipe = load_pipeline(second_clip=False)
    calls = []
    pipe.unet.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    images, _ = world.render_dataset(3, seed=11, shape="circle", colour="red")

    def edit(seed):
        return pipe.edit(images, generator=torch.Generator().manual_seed(seed), output_type="np", **FAST_EDIT).images

    first = edit(5)
    assert sum(calls) / len(images) == 6  # forward noise: no inversion call; 6 DDIM steps
    assert np.array_equal(first, edit(5))  # stochastic encoding, reproducible under the generator
    assert not np.array_equal(first, edit(6))


def test_fast_finetune_is_the_recommended_recipe_with_effdiffs_scheme():
    config = FinetuneConfig.from_kwargs(**FAST_FINETUNE)
    assert (config.scheme, config.encoding, config.learning_rate) == ("one_step", "noise", 2e-3)
    changed = {k for k in FAST_FINETUNE if FAST_FINETUNE[k] != RECOMMENDED_FINETUNE.get(k)}
    assert changed == {"scheme", "encoding", "learning_rate"}
    assert set(RECOMMENDED_FINETUNE) - set(FAST_FINETUNE) == {"num_fixed_point_iterations"}  # no inversion to refine


def test_testbed_registers_its_fast_presets_for_the_cli_flag():
    from diffusionclip_pipeline import commands

    commands.load_plugins()
    testbed = commands.registered_models()["testbed"]
    assert testbed.settings("finetune", fast=True) == FAST_FINETUNE
    assert testbed.settings("edit", fast=True) == FAST_EDIT
    assert not commands.registered_models()["testbed-latent"].has_fast("edit")  # not measured there: no preset

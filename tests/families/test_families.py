"""The model-family seam: which family a component set gets, and the step maths each family provides, against the
formulas written out here."""

import pytest
import torch
from conftest import make_ldm_components, make_pipeline, make_sd_components, random_images

from diffusionclip_pipeline import DiffusionCLIPPipeline
from diffusionclip_pipeline.families import (
    FAMILIES,
    LatentFamily,
    ModelFamily,
    PixelFamily,
    StableDiffusionFamily,
    check_components,
)


@pytest.mark.parametrize(
    "make, family",
    [
        (lambda: make_pipeline(with_clip=False), PixelFamily),
        (lambda: DiffusionCLIPPipeline(**make_ldm_components()), LatentFamily),
        (lambda: DiffusionCLIPPipeline(**make_sd_components()), StableDiffusionFamily),
    ],
)
def test_each_component_set_gets_its_family(make, family):
    pipe = make()
    assert type(pipe.family) is family and pipe.family.pipe is pipe
    components = {k: getattr(pipe, k) for k in ("unet", "vae", "vqvae", "text_encoder", "tokenizer")}
    assert check_components(**components) is family
    assert [f for f in FAMILIES if f.matches({"vae": None, "vqvae": None, **components})][0] is family


def test_every_family_implements_the_protocol():
    protocol = ("timesteps", "generation_scheduler", "inversion_scheduler", "noise_to")
    for family in FAMILIES:
        assert family.name and family.stock_pipeline and family.default_lora_target_modules
        for method in protocol:
            assert getattr(family, method) is not getattr(ModelFamily, method), f"{family.__name__}.{method}"


def test_ddim_generation_step_and_x0_estimate_follow_ddim_eq_12():
    pipe = make_pipeline(with_clip=False)
    grid = pipe.family.timesteps(300, 4)
    assert grid == [0, 100, 200, 300]
    scheduler = pipe.family.generation_scheduler(grid)
    x, eps = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)), torch.randn(1, 3, 16, 16)
    out = scheduler.step(eps, 300, x)
    a_t, a_s = pipe.scheduler.alphas_cumprod[300], pipe.scheduler.alphas_cumprod[200]
    x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()  # DDIM eq. (12), eta = 0
    torch.testing.assert_close(out.pred_original_sample, x0)
    torch.testing.assert_close(out.prev_sample, a_s.sqrt() * x0 + (1 - a_s).sqrt() * eps)


def test_ddim_inversion_step_runs_eq_12_forward_from_the_source_level():
    pipe = make_pipeline(with_clip=False)
    scheduler = pipe.family.inversion_scheduler([0, 100, 200])
    assert scheduler.source_timestep(200) == 100 and scheduler.source_timestep(0) == -1
    x, eps = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)), torch.randn(1, 3, 16, 16)
    a_s, a_t = pipe.scheduler.alphas_cumprod[100], pipe.scheduler.alphas_cumprod[200]
    x0 = (x - (1 - a_s).sqrt() * eps) / a_s.sqrt()
    torch.testing.assert_close(scheduler.step(eps, 200, x).prev_sample, a_t.sqrt() * x0 + (1 - a_t).sqrt() * eps)


def test_noise_to_is_the_closed_form_forward_process():
    pipe = make_pipeline(with_clip=False)
    x0 = random_images(2)
    out = pipe.family.noise_to(x0, 400, torch.Generator().manual_seed(3))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    a = pipe.scheduler.alphas_cumprod[400]
    torch.testing.assert_close(out, a.sqrt() * x0 + (1 - a).sqrt() * noise)


def test_the_conditional_family_passes_the_prompt_and_the_unconditional_refuses_one():
    pipe = DiffusionCLIPPipeline(**make_sd_components())
    condition = pipe.family.encode_prompt("red circle", 2)
    assert condition.shape[0] == 2 and condition.shape[-1] == pipe.unet.config.cross_attention_dim
    x = torch.randn(1, 4, 8, 8)
    expected = pipe.unet(x, torch.tensor(10), encoder_hidden_states=condition[:1]).sample
    torch.testing.assert_close(pipe.family.predict(pipe.unet, x, 10, condition), expected)
    with pytest.raises(ValueError, match="`prompt` needs a text-conditioned UNet"):
        make_pipeline(with_clip=False).family.encode_prompt("red circle")

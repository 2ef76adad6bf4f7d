"""EffDiff's noise encoding and the official code's inversion start, next to the default DDIM inversion."""

import pytest
import torch
from conftest import make_pipeline, random_images

EDIT = dict(t0=200, num_inference_steps=3, output_type="pt")


def count_unet_calls(pipe):
    calls = []
    pipe.unet.register_forward_hook(lambda *args: calls.append(1))
    return calls


def test_noise_encoding_is_the_closed_form_forward_noise_and_seeded():
    pipe = make_pipeline(with_clip=False)
    x = random_images(2, seed=1)
    calls = count_unet_calls(pipe)
    out = pipe.invert(x, t0=300, encoding="noise", generator=torch.Generator().manual_seed(7))
    assert calls == [] and out.timesteps == [300]
    alpha = pipe.scheduler.alphas_cumprod[300]
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(out.x_t0, alpha.sqrt() * x + (1 - alpha).sqrt() * eps, atol=1e-6, rtol=0)
    again = pipe.invert(x, t0=300, encoding="noise", generator=torch.Generator().manual_seed(7)).x_t0
    other = pipe.invert(x, t0=300, encoding="noise", generator=torch.Generator().manual_seed(8)).x_t0
    assert torch.equal(out.x_t0, again) and not torch.equal(out.x_t0, other)
    # edit with the noise encoding: only the generation's UNet calls
    calls.clear()
    pipe.edit(x, encoding="noise", generator=torch.Generator().manual_seed(7), **EDIT)
    assert len(calls) == 3


def test_official_inversion_start_skips_the_first_step():
    pipe = make_pipeline(with_clip=False)
    x = random_images(1, seed=2)
    calls = count_unet_calls(pipe)
    ours = pipe.invert(x, t0=200, num_inversion_steps=5).x_t0
    assert len(calls) == 5
    calls.clear()
    official = pipe.invert(x, t0=200, num_inversion_steps=5, inversion_start="official").x_t0
    assert len(calls) == 4
    # by hand: x at t = 0 is the clean image, then the S - 1 steps (0 -> 50), ..., (150 -> 200), eps at the lower t
    a = pipe.scheduler.alphas_cumprod
    latents = x.clone()
    grid = [0, 50, 100, 150, 200]
    for s, t in zip(grid[:-1], grid[1:]):
        with torch.no_grad():
            eps = pipe.unet(latents, torch.tensor(s)).sample
        x0 = (latents - (1 - a[s]).sqrt() * eps) / a[s].sqrt()
        latents = a[t].sqrt() * x0 + (1 - a[t]).sqrt() * eps
    torch.testing.assert_close(official, latents, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(official, ours)


@pytest.mark.parametrize("kwargs, error", [(dict(encoding="fast"), ValueError), (dict(inversion_start=0), TypeError)])
def test_encoding_choices_are_checked(kwargs, error):
    pipe = make_pipeline(with_clip=False)
    with pytest.raises(error, match=next(iter(kwargs))):
        pipe.invert(random_images(1), t0=100, **kwargs)

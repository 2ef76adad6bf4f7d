import numpy as np
import PIL.Image
import pytest
import torch
from conftest import make_pipeline, make_scheduler, make_unet, random_images
from diffusers import DDIMInverseScheduler, DDIMScheduler, DDPMPipeline

from diffusionclip_pipeline import DiffusionCLIPInversionOutput, DiffusionCLIPPipeline, DiffusionCLIPPipelineOutput


def _hand_ddim(x, eps, a_from, a_to):
    x0 = (x - (1 - a_from) ** 0.5 * eps) / a_from**0.5
    return a_to**0.5 * x0 + (1 - a_to) ** 0.5 * eps


def test_schedulers_are_deterministic_ddim(pipe):
    assert type(pipe.scheduler) is DDIMScheduler and type(pipe.inverse_scheduler) is DDIMInverseScheduler
    assert not pipe.scheduler.config.clip_sample and not pipe.inverse_scheduler.config.clip_sample
    assert make_scheduler().config.clip_sample  # the DDPM config it came from clips


def test_invert_matches_hand_written_ddim(pipe):
    x = random_images(2)
    out = pipe.invert(x, t0=300, num_inversion_steps=7)
    assert isinstance(out, DiffusionCLIPInversionOutput)
    # DiffusionCLIP's int(linspace(0, 1, S) * t0) truncates 249.99.. to 249
    assert out.timesteps == [0, 50, 100, 150, 200, 249, 300]
    alphas = pipe.scheduler.alphas_cumprod
    level = lambda t: torch.tensor(1.0) if t < 0 else alphas[t]  # noqa: E731
    expected = x
    for source, target in zip([-1] + out.timesteps[:-1], out.timesteps):
        eps = pipe.unet(expected, max(source, 0)).sample  # UNet at the source (lower) timestep
        expected = _hand_ddim(expected, eps, level(source), level(target))
    torch.testing.assert_close(out.x_t0, expected)
    torch.testing.assert_close(out.image, x)


def test_edit_generation_matches_hand_written_ddim(pipe):
    latents = random_images(2, seed=3)
    out = pipe.edit(latents=latents, t0=500, num_inference_steps=6, output_type="pt")
    assert out.timesteps == [500, 400, 300, 200, 100, 0]
    alphas = pipe.scheduler.alphas_cumprod
    x = latents
    for t, t_next in zip(out.timesteps, out.timesteps[1:] + [-1]):
        eps = pipe.unet(x, t).sample
        x = _hand_ddim(x, eps, alphas[t], torch.tensor(1.0) if t_next < 0 else alphas[t_next])
    torch.testing.assert_close(out.images, (x / 2 + 0.5).clamp(0, 1))
    assert torch.equal(out.x_t0, latents)


def test_invert_regenerate_recovers_input():
    """DDIM is a first-order ODE solver: the round-trip error shrinks ~1/steps. With this random UNet (whose eps
    changes fast with t) we measured mean |error| 0.20 / 0.056 / 0.023 at 10 / 40 / 100 steps on [-1, 1] images;
    trained, smooth models reach ~0.002 at 40 steps."""
    pipe = make_pipeline(with_clip=False)
    x = random_images(2)
    errors = []
    for n in (10, 100):
        latents = pipe.invert(x, t0=500, num_inversion_steps=n).x_t0
        rec = pipe.edit(latents=latents, t0=500, num_inference_steps=n, output_type="pt").images * 2 - 1
        errors.append((rec - x).abs().mean().item())
    assert errors[1] < 0.04
    assert errors[1] < errors[0] / 4


def test_fixed_point_inversion_matches_hand_written_iterations(pipe):
    x = random_images(2)
    out = pipe.invert(x, t0=300, num_inversion_steps=4, num_fixed_point_iterations=2)
    alphas = pipe.scheduler.alphas_cumprod
    level = lambda t: torch.tensor(1.0) if t < 0 else alphas[t]  # noqa: E731
    expected = x
    for source, target in zip([-1] + out.timesteps[:-1], out.timesteps):
        eps = pipe.unet(expected, max(source, 0)).sample  # DiffusionCLIP's step: UNet at the source level
        refined = _hand_ddim(expected, eps, level(source), level(target))
        for _ in range(2):  # x_t <- step(eps(x_t, t), x_s): UNet at the target level, as generation evaluates it
            refined = _hand_ddim(expected, pipe.unet(refined, target).sample, level(source), level(target))
        expected = refined
    torch.testing.assert_close(out.x_t0, expected)
    plain = pipe.invert(x, t0=300, num_inversion_steps=4, num_fixed_point_iterations=0).x_t0
    torch.testing.assert_close(plain, pipe.invert(x, t0=300, num_inversion_steps=4).x_t0)
    assert not torch.allclose(plain, out.x_t0)


def test_fixed_point_inversion_makes_regeneration_exact():
    """Each refined step converges to the exact inverse of the generation step on the same grid, so the round
    trip's error falls towards 0 with the iterations, where plain DDIM inversion keeps its discretisation error.
    Measured with this random UNet (10 steps): mean |error| 0.20 / 0.065 / 0.024 / 0.0030 / 0.00008 at k = 0 / 1 /
    2 / 4 / 8."""
    pipe = make_pipeline(with_clip=False)
    x = random_images(2)
    errors = []
    for k in (0, 2, 8):
        latents = pipe.invert(x, t0=500, num_inversion_steps=10, num_fixed_point_iterations=k).x_t0
        rec = pipe.edit(latents=latents, t0=500, num_inference_steps=10, output_type="pt").images * 2 - 1
        errors.append((rec - x).abs().mean().item())
    assert errors[0] > 0.1  # plain inversion at 10 steps: a visible round-trip error
    assert errors[1] < errors[0] / 4 and errors[2] < 1e-3
    # edit passes the setting to its inversion
    rec = pipe.edit(x, t0=500, num_inversion_steps=10, num_inference_steps=10, num_fixed_point_iterations=8,
                    output_type="pt").images  # fmt: skip
    torch.testing.assert_close(rec * 2 - 1, x, atol=1e-2, rtol=0)


def test_eta_seeded_determinism(pipe):
    x = random_images(2)
    kw = dict(t0=200, num_inversion_steps=4, num_inference_steps=4, eta=1.0, output_type="np")
    a = pipe.edit(x, generator=torch.Generator().manual_seed(0), **kw).images
    b = pipe.edit(x, generator=torch.Generator().manual_seed(0), **kw).images
    c = pipe.edit(x, generator=torch.Generator().manual_seed(1), **kw).images
    assert np.array_equal(a, b)
    assert not np.allclose(a, c)


def test_batch_equals_singles(pipe):
    x = random_images(2)
    kw = dict(t0=200, num_inversion_steps=5, num_inference_steps=5, output_type="pt")
    batch = pipe.edit(x, **kw).images
    singles = torch.cat([pipe.edit(x[i : i + 1], **kw).images for i in range(2)])
    torch.testing.assert_close(batch, singles, atol=1e-5, rtol=1e-5)
    # with eta > 0, per-image generators make the batch equal to the single runs too
    kw["eta"] = 1.0
    batch = pipe.edit(x, generator=[torch.Generator().manual_seed(i) for i in range(2)], **kw).images
    singles = torch.cat(
        [pipe.edit(x[i : i + 1], generator=torch.Generator().manual_seed(i), **kw).images for i in range(2)]
    )
    torch.testing.assert_close(batch, singles, atol=1e-5, rtol=1e-5)


def test_return_dict_false_equals_dataclass(pipe):
    x = random_images(1)
    kw = dict(t0=100, num_inversion_steps=3, num_inference_steps=3, output_type="pt")
    out = pipe.edit(x, **kw)
    images, latents, timesteps = pipe.edit(x, return_dict=False, **kw)
    assert isinstance(out, DiffusionCLIPPipelineOutput)
    assert torch.equal(images, out.images) and torch.equal(latents, out.x_t0) and timesteps == out.timesteps
    inv = pipe.invert(x, t0=100, num_inversion_steps=3, return_dict=False)
    assert torch.equal(inv[0], out.x_t0)
    assert torch.equal(pipe(x, **kw).images, out.images)  # __call__ is edit


@pytest.mark.parametrize("output_type", ["pil", "np", "pt"])
def test_output_types(pipe, output_type):
    out = pipe.edit(random_images(2), t0=50, num_inversion_steps=2, num_inference_steps=2, output_type=output_type)
    if output_type == "pil":
        assert len(out.images) == 2 and all(isinstance(i, PIL.Image.Image) and i.size == (16, 16) for i in out.images)
    elif output_type == "np":
        assert out.images.shape == (2, 16, 16, 3) and 0 <= out.images.min() and out.images.max() <= 1
    else:
        assert out.images.shape == (2, 3, 16, 16)


def test_accepted_image_forms_agree(pipe):
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    as_tensor = torch.from_numpy(array).permute(2, 0, 1).float() / 127.5 - 1
    kw = dict(t0=100, num_inversion_steps=2)
    ref = pipe.invert(as_tensor, **kw).x_t0
    for form in (array, array.astype(np.float32) / 255, PIL.Image.fromarray(array), [PIL.Image.fromarray(array)]):
        torch.testing.assert_close(pipe.invert(form, **kw).x_t0, ref, atol=1e-5, rtol=1e-5)
    # other modes and sizes are converted / centre-cropped and resized
    grey = PIL.Image.fromarray(array[..., 0]).resize((20, 24))
    assert pipe.invert([grey, PIL.Image.fromarray(array).convert("RGBA")], **kw).x_t0.shape == (2, 3, 16, 16)
    assert pipe.invert(torch.zeros(3, 32, 40), **kw).x_t0.shape == (1, 3, 16, 16)


def test_callback_on_step_end(pipe):
    seen = []

    def callback(p, i, t, kwargs):
        seen.append((i, t, tuple(kwargs)))
        return {"latents": torch.zeros_like(kwargs["latents"])} if i == 2 else None

    out = pipe.edit(
        latents=random_images(1),
        t0=300,
        num_inference_steps=3,
        output_type="pt",
        callback_on_step_end=callback,
        callback_on_step_end_tensor_inputs=["latents"],
    )
    assert [s[:2] for s in seen] == [(0, 300), (1, 150), (2, 0)]
    assert torch.equal(out.images, torch.full_like(out.images, 0.5))  # the last step's latents were replaced


def test_save_pretrained_round_trip(tmp_path, pipe):
    pipe.save_pretrained(tmp_path)
    loaded = DiffusionCLIPPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    kw = dict(t0=200, num_inversion_steps=4, num_inference_steps=4, output_type="pt")
    x = random_images(1)
    assert torch.equal(loaded.edit(x, **kw).images, pipe.edit(x, **kw).images)
    assert loaded.clip_model is not None and loaded.clip_tokenizer is not None
    strip = lambda c: {k: v for k, v in c.items() if k != "_use_default_values"}  # noqa: E731
    assert strip(loaded.scheduler.config) == strip(pipe.scheduler.config)


def test_loads_plain_ddpm_layout(tmp_path, clip_model, tokenizer):
    DDPMPipeline(unet=make_unet(), scheduler=make_scheduler()).save_pretrained(tmp_path)
    pipe = DiffusionCLIPPipeline.from_pretrained(tmp_path, clip_model=clip_model, clip_tokenizer=tokenizer)
    assert type(pipe.scheduler) is DDIMScheduler and not pipe.scheduler.config.clip_sample
    assert type(pipe.inverse_scheduler) is DDIMInverseScheduler and not pipe.inverse_scheduler.config.clip_sample
    assert pipe.clip_model is clip_model
    bare = DiffusionCLIPPipeline.from_pretrained(tmp_path, clip_model_name_or_path=str(tmp_path / "no-clip"))
    assert bare.clip_model is None and bare.clip_model_name_or_path == str(tmp_path / "no-clip")
    bare.set_progress_bar_config(disable=True)
    assert bare.edit(random_images(1), t0=10, num_inversion_steps=2, num_inference_steps=2).images[0].size == (16, 16)


def test_missing_clip_error_says_how_to_pass_a_local_one(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = make_pipeline(with_clip=False)
    pipe.clip_model_name_or_path = str(tmp_path / "missing")
    with pytest.raises(OSError, match="pass a local CLIP"):
        pipe.require_clip()


def test_load_clip_from_local_folder(tmp_path, clip_model, tokenizer):
    clip_model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    pipe = make_pipeline(with_clip=False)
    pipe.load_clip(str(tmp_path))
    ids = tokenizer(["a red circle"], return_tensors="pt").input_ids
    torch.testing.assert_close(
        pipe.clip_model.get_text_features(input_ids=ids).pooler_output,
        clip_model.get_text_features(input_ids=ids).pooler_output,
    )
    assert len(pipe.clip_models) == 1
    pipe.load_clip(str(tmp_path), second=True)  # the same weights as the second CLIP
    assert len(pipe.clip_models) == 2 and pipe.clip_model_2 is not pipe.clip_model
    torch.testing.assert_close(
        pipe.clip_model_2.get_text_features(input_ids=ids).pooler_output,
        clip_model.get_text_features(input_ids=ids).pooler_output,
    )
    with pytest.raises(ValueError, match="`second=True` needs a `clip_model_name_or_path`"):
        pipe.load_clip(second=True)


# ---- check_inputs: every branch -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(t0=0), ValueError, "`t0`"),
        (dict(t0=1000), ValueError, "`t0`"),
        (dict(t0=250.0), TypeError, "`t0`"),
        (dict(num_inversion_steps=0), ValueError, "`num_inversion_steps`"),
        (dict(num_inference_steps=-2), ValueError, "`num_inference_steps`"),
        (dict(eta=-0.1), ValueError, "`eta`"),
        (dict(eta=float("inf")), ValueError, "`eta`"),
        (dict(eta=float("nan")), ValueError, "`eta`"),
        (dict(t0="500"), TypeError, "`t0`"),
        (dict(image=None, latents=torch.full((1, 3, 16, 16), float("nan"))), ValueError, "`latents` holds"),
        (dict(generator=5), TypeError, "`generator`"),
        (dict(num_fixed_point_iterations=-1), ValueError, "`num_fixed_point_iterations`"),
        (dict(num_fixed_point_iterations=1.0), TypeError, "`num_fixed_point_iterations`"),
        (dict(num_fixed_point_iterations=True), TypeError, "`num_fixed_point_iterations`"),
        (dict(output_type="latents"), ValueError, "`output_type`"),  # "latent" is one of diffusers' types
        (dict(image=None), ValueError, "`image`"),
        (dict(image=[]), ValueError, "empty list"),
        (dict(image="cat.png"), TypeError, "`image` must be"),
        (dict(image=[torch.zeros(3, 16, 16), torch.zeros(3, 8, 8)]), ValueError, "mixed sizes"),
        (dict(image=torch.zeros(1, 4, 16, 16)), ValueError, "3 channels"),
        (dict(image=np.zeros((16, 16, 2), np.uint8)), ValueError, "3 channels"),
        (dict(image=torch.full((1, 3, 16, 16), 3.0)), ValueError, r"\[0, 1\]"),
        (dict(image=np.full((16, 16, 3), 2.0)), ValueError, r"\[0, 1\]"),
        (dict(image=torch.zeros(1, 3, 16, 16, dtype=torch.long)), TypeError, "floating point"),
        (dict(image=np.zeros((16, 16, 3), np.int32)), TypeError, "dtype"),
        (dict(image=None, latents=torch.zeros(1, 3, 8, 8)), ValueError, "`latents`"),
        (dict(generator=[torch.Generator()]), ValueError, "`generator`"),
        (dict(callback_on_step_end_tensor_inputs=["noise"]), ValueError, "callback_on_step_end_tensor_inputs"),
    ],
)
def test_check_inputs_rejects(pipe, kwargs, error, match):
    args = dict(image=random_images(2), t0=100, num_inversion_steps=2, num_inference_steps=2)
    args.update(kwargs)
    calls = []
    pipe.unet.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(error, match=match):
        pipe.edit(**args)
    assert calls == []  # failed before any model evaluation

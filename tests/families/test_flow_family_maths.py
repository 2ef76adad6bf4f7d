"""`FlowMatchFamily`'s step maths through a concrete toy family: a toy-size `SD3Transformer2DModel` (random weights)
and two exact velocity fields, driven by the loops the pipeline runs (`_invert` and `edit`, written out here)."""

from types import SimpleNamespace

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

from diffusionclip_pipeline.families.base import ModelFamily
from diffusionclip_pipeline.families.flow import FlowMatchFamily
from diffusionclip_pipeline.scheduling_flow_match_grid import (
    FlowMatchGridInverseScheduler,
    FlowMatchGridScheduler,
    dynamic_shift_mu,
    flow_sigma,
    flow_timesteps,
)

T = 1000
SD3_SCHEDULER = {"shift": 3.0}
FLUX_SCHEDULER = {"shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15}


class ToySD3Family(FlowMatchFamily):
    """A concrete flow family at toy size: the denoiser is called as the SD3 pipeline calls its transformer."""

    name = "toy-sd3"

    @classmethod
    def matches(cls, components) -> bool:
        return components.get("transformer") is not None

    @classmethod
    def check_components(cls, components) -> None:
        if not isinstance(components.get("scheduler"), FlowMatchEulerDiscreteScheduler):
            raise TypeError("`scheduler` must be a `FlowMatchEulerDiscreteScheduler`.")

    @property
    def sample_size(self) -> int:
        return int(self.pipe.transformer.config.sample_size)

    def encode_prompt(self, prompt=None, batch_size=1):
        gen, dtype = torch.Generator().manual_seed(len(prompt or "")), self.pipe.transformer.dtype
        hidden = torch.randn(batch_size, 5, 32, generator=gen, dtype=dtype)
        return hidden, torch.randn(batch_size, 64, generator=gen, dtype=dtype)

    def predict(self, denoiser, sample, timestep, condition=None):
        hidden, pooled = condition if condition is not None else (None, None)
        timestep = self.model_timestep(timestep, sample).to(sample.dtype)
        out = denoiser(
            hidden_states=sample, timestep=timestep, encoder_hidden_states=hidden, pooled_projections=pooled
        )
        return out.sample


class ToyFluxFamily(ToySD3Family):
    """Dynamic shifting: ``mu`` from the token count of 2x2-packed latents, as Flux computes it."""

    name = "toy-flux"

    def shift_mu(self, sample=None):
        height, width = (self.sample_size,) * 2 if sample is None else sample.shape[-2:]
        return dynamic_shift_mu((height // 2) * (width // 2), self.scheduler_config)


class StraightPath(torch.nn.Module):
    """The exact velocity of one straight path from ``x0`` to ``noise``: ``v = noise - x0`` everywhere."""

    def __init__(self, x0, noise):
        super().__init__()
        self.register_buffer("x0", x0)
        self.register_buffer("noise", noise)

    def forward(self, hidden_states, timestep, **kwargs):
        return SimpleNamespace(sample=(self.noise - self.x0).expand_as(hidden_states))


class PointMass(torch.nn.Module):
    """The exact velocity field of the data distribution concentrated at ``x0``: ``v(x, sigma) = (x - x0) / sigma``
    (every path is straight); it reads sigma from the model timestep, so it also checks ``sigma * T``."""

    def __init__(self, x0):
        super().__init__()
        self.register_buffer("x0", x0)

    def forward(self, hidden_states, timestep, **kwargs):
        sigma = (timestep / T).view(-1, 1, 1, 1)
        return SimpleNamespace(sample=(hidden_states - self.x0) / sigma)


def toy_transformer(dtype=torch.float32) -> SD3Transformer2DModel:
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in `dtype` (a later `.to(dtype)` warns about modules kept in float32)
    try:
        return SD3Transformer2DModel(
            sample_size=8, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
            caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
        ).eval()  # fmt: skip
    finally:
        torch.set_default_dtype(default)


def make_family(cls=ToySD3Family, scheduler_kwargs=None, transformer=None) -> FlowMatchFamily:
    scheduler = FlowMatchEulerDiscreteScheduler(**(SD3_SCHEDULER if scheduler_kwargs is None else scheduler_kwargs))
    transformer = toy_transformer() if transformer is None else transformer
    return cls(SimpleNamespace(transformer=transformer, scheduler=scheduler))


def velocity(family, denoiser, x, t, condition):
    return family.predict(denoiser, x, t, condition)


@torch.no_grad()
def invert(family, denoiser, x0, t0, num_steps, num_fixed_point_iterations=0, condition=None):
    """The pipeline's `_invert` loop: Euler up, the velocity at the source; refinement at the target."""
    scheduler = family.inversion_scheduler(family.timesteps(t0, num_steps))
    x = x0
    for t in scheduler.timesteps:
        source_t = max(scheduler.source_timestep(t), 0)
        next_x = scheduler.step(velocity(family, denoiser, x, source_t, condition), t, x).prev_sample
        for _ in range(num_fixed_point_iterations):
            next_x = scheduler.step(velocity(family, denoiser, next_x, t, condition), t, x).prev_sample
        x = next_x
    return x


@torch.no_grad()
def generate(family, denoiser, x_t0, t0, num_steps, condition=None, x0_estimates=None):
    """The pipeline's `edit` loop: Euler down the same grid to the clean image."""
    scheduler = family.generation_scheduler(family.timesteps(t0, num_steps))
    x = x_t0
    for t in scheduler.timesteps:
        out = scheduler.step(velocity(family, denoiser, x, t, condition), t, x, eta=0.0)
        x = out.prev_sample
        if x0_estimates is not None:
            x0_estimates.append(out.pred_original_sample)
    return x


def images(seed, dtype=torch.float32, batch=2):
    return torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---- the protocol ----------------------------------------------------------------------------------------------


def test_family_builds_grid_schedulers_from_the_pipeline_scheduler_config():
    family = make_family()
    grid = family.timesteps(600, 4)
    assert grid == flow_timesteps(600, 4) == [150, 300, 450, 600]
    gen, inv = family.generation_scheduler(grid), family.inversion_scheduler(grid)
    assert type(gen) is FlowMatchGridScheduler and type(inv) is FlowMatchGridInverseScheduler
    assert gen.timesteps.tolist() == grid[::-1] and inv.timesteps.tolist() == grid
    assert gen.config.shift == 3.0 and family.sigma(600) == flow_sigma(600, family.scheduler_config)
    assert family.default_lora_target_modules == ("to_q", "to_k", "to_v", "to_out.0")


def test_model_timestep_is_sigma_times_t_per_sample():
    family = make_family()
    timestep = family.model_timestep(300, images(0, batch=3))
    assert timestep.shape == (3,) and timestep.dtype == torch.float32
    stock = FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER)
    stock.set_timesteps(sigmas=[0.3])
    torch.testing.assert_close(timestep, stock.timesteps.expand(3), atol=T * 1e-6, rtol=0)
    assert family.model_timestep(0, images(0)).tolist() == [0.0, 0.0]  # the clean image


def test_abstract_parts_stay_abstract():
    family = FlowMatchFamily(SimpleNamespace(scheduler=FlowMatchEulerDiscreteScheduler()))
    assert isinstance(family, ModelFamily) and family.shift_mu() is None
    with pytest.raises(NotImplementedError):
        FlowMatchFamily.matches({})
    with pytest.raises(NotImplementedError):
        FlowMatchFamily.check_components({})


def test_noise_to_uses_the_generator_and_is_stock_scale_noise():
    family, x0 = make_family(), images(1)
    encoded = family.noise_to(x0, 600, torch.Generator().manual_seed(7))
    assert torch.equal(encoded, family.noise_to(x0, 600, torch.Generator().manual_seed(7)))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7))
    stock = FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER)
    stock.set_timesteps(sigmas=[0.6])
    torch.testing.assert_close(encoded, stock.scale_noise(x0, stock.timesteps.repeat(2), noise), atol=1e-6, rtol=0)


# ---- exact velocity fields: the round trip is exact ---------------------------------------------------------------


@pytest.mark.parametrize("cls, scheduler_kwargs", [(ToySD3Family, SD3_SCHEDULER), (ToyFluxFamily, FLUX_SCHEDULER)])
def test_straight_path_round_trip_is_exact(cls, scheduler_kwargs):
    x0, noise = images(2), images(3)
    family = make_family(cls, scheduler_kwargs)
    model = StraightPath(x0, noise)
    for t0, num_steps in ((300, 5), (600, 12), (999, 40)):
        x_t0 = invert(family, model, x0, t0, num_steps)
        sigma = family.sigma(t0)
        torch.testing.assert_close(x_t0, (1 - sigma) * x0 + sigma * noise, atol=1e-6, rtol=0)  # = the closed form
        estimates = []
        back = generate(family, model, x_t0, t0, num_steps, x0_estimates=estimates)
        torch.testing.assert_close(back, x0, atol=1e-6, rtol=0)
        for estimate in estimates:  # x - sigma v is x0 at every step of an exact field
            torch.testing.assert_close(estimate, x0, atol=1e-6, rtol=0)


@pytest.mark.parametrize("cls, scheduler_kwargs", [(ToySD3Family, SD3_SCHEDULER), (ToyFluxFamily, FLUX_SCHEDULER)])
def test_point_mass_field_regenerates_x0_from_noise_to(cls, scheduler_kwargs):
    """A position-dependent exact field: generation from the closed-form encoding lands on x0."""
    x0 = images(4)
    family = make_family(cls, scheduler_kwargs)
    for t0, num_steps in ((400, 3), (900, 25)):
        x_t0 = family.noise_to(x0, t0, torch.Generator().manual_seed(t0))
        torch.testing.assert_close(generate(family, PointMass(x0), x_t0, t0, num_steps), x0, atol=1e-6, rtol=0)


# ---- a non-trivial model: first-order error, removed by fixed-point refinement ------------------------------------


def round_trip_error(family, model, x0, t0, num_steps, num_fixed_point_iterations=0) -> tuple[float, float]:
    """Mean absolute round-trip error, and how far the inversion moved (so the round trip is not trivially exact)."""
    condition = family.encode_prompt("a", x0.shape[0])
    x_t0 = invert(family, model, x0, t0, num_steps, num_fixed_point_iterations, condition)
    back = generate(family, model, x_t0, t0, num_steps, condition)
    return (back - x0).abs().mean().item(), (x_t0 - x0).abs().mean().item()


@pytest.mark.parametrize("cls, scheduler_kwargs", [(ToySD3Family, SD3_SCHEDULER), (ToyFluxFamily, FLUX_SCHEDULER)])
def test_round_trip_error_falls_with_the_step_count(cls, scheduler_kwargs):
    """Euler both ways is first order: the mismatch of the velocity at the source (inversion) and at the target
    (generation) shrinks with the step; measured on a random toy SD3 transformer (docs/flow.md lists the curve)."""
    family, x0 = make_family(cls, scheduler_kwargs), images(5)
    errors = {n: round_trip_error(family, family.pipe.transformer, x0, 600, n) for n in (4, 8, 16, 32)}
    shown = {n: f"{error:.2e} (moved {moved:.3f})" for n, (error, moved) in errors.items()}
    print(f"\n{cls.name} round-trip MAE (t0 600) by steps:", shown)
    values = [errors[n][0] for n in (4, 8, 16, 32)]
    assert all(b < a for a, b in zip(values, values[1:])), values
    assert min(moved for _, moved in errors.values()) > max(values)  # the inversion did move the latents


def test_fixed_point_refinement_makes_the_round_trip_exact():
    family = make_family(transformer=toy_transformer(torch.float64))
    x0 = images(6, torch.float64)
    errors = [round_trip_error(family, family.pipe.transformer, x0, 600, 8, k)[0] for k in (0, 1, 3, 20)]
    print("\nfixed-point round-trip MAE (8 steps, float64) for k = 0, 1, 3, 20:", [f"{e:.1e}" for e in errors])
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-12  # float64 round-off: the refined inversion is the generation step's exact inverse


# ---- dynamic shifting and errors -----------------------------------------------------------------------------------


def test_flux_family_sigmas_follow_the_image_size():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    family = make_family(ToyFluxFamily, FLUX_SCHEDULER)
    grid = family.timesteps(800, 8)
    for sample, tokens in ((None, 16), (torch.zeros(1, 4, 32, 32), 256), (torch.zeros(1, 4, 128, 128), 4096)):
        stock = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)
        stock.set_timesteps(sigmas=[t / T for t in grid[::-1]], mu=calculate_shift(tokens))
        ours = family.generation_scheduler(grid, sample)
        torch.testing.assert_close(ours.sigmas.float(), stock.sigmas, atol=1e-6, rtol=0)
        inverse = family.inversion_scheduler(grid, sample)
        torch.testing.assert_close(inverse.sigmas.flip(0).float(), stock.sigmas, atol=1e-6, rtol=0)


def test_dynamic_shifting_without_a_mu_hook_is_refused():
    family = make_family(ToySD3Family, FLUX_SCHEDULER)  # `shift_mu` returns None
    with pytest.raises(ValueError, match="`mu` must be"):
        family.generation_scheduler([300])
    with pytest.raises(ValueError, match="`mu` must be"):
        family.noise_to(images(0), 300)


def test_unsupported_scheduler_config_is_refused_by_name():
    family = make_family(scheduler_kwargs={"stochastic_sampling": True})
    for build in (family.generation_scheduler, family.inversion_scheduler):
        with pytest.raises(ValueError, match="`stochastic_sampling=True`"):
            build([300])
    with pytest.raises(ValueError, match="`stochastic_sampling=True`"):
        family.noise_to(images(0), 300)


@pytest.mark.parametrize("t0", [0, 1000])
def test_bad_t0_is_refused(t0):
    family = make_family()
    with pytest.raises(ValueError, match="`t0`"):
        family.timesteps(t0, 4)
    with pytest.raises(ValueError, match="`t0`"):
        family.noise_to(images(0), t0)

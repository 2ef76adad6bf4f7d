"""The flow-matching grid schedulers against diffusers' `FlowMatchEulerDiscreteScheduler` and independent Euler loops
written here (sigmas by the t0 rule's formulas, not by the module under test)."""

import contextlib
import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from diffusionclip_pipeline.scheduling_flow_match_grid import (
    FlowMatchGridInverseScheduler,
    FlowMatchGridScheduler,
    check_flow_config,
    dynamic_shift_mu,
    flow_sigma,
    flow_timesteps,
)

T = 1000
# (scheduler kwargs, mu): SD3 (shift 3), shift 1, Flux's dynamic shifting at 256 and 1024 px, the linear time shift
CONFIGS = [
    ({"shift": 3.0}, None),
    ({"shift": 1.0}, None),
    ({"use_dynamic_shifting": True}, 0.5),
    ({"use_dynamic_shifting": True}, 1.15),
    ({"use_dynamic_shifting": True, "time_shift_type": "linear"}, 1.5),
]


def reference_sigma(t: int, shift: float = 1.0, mu: float | None = None, linear: bool = False) -> float:
    """The t0 rule written out: 0 for the clean image, else the stock scheduler's shift of s = t / T."""
    if t <= 0:
        return 0.0
    s = t / T
    if mu is None:
        return shift * s / (1 + (shift - 1) * s)
    return (mu if linear else math.exp(mu)) / ((mu if linear else math.exp(mu)) + 1 / s - 1)


def reference_sigma_for(kwargs: dict, mu):
    """``t -> sigma`` for one of `CONFIGS`."""
    linear = kwargs.get("time_shift_type") == "linear"
    mu = mu if kwargs.get("use_dynamic_shifting") else None
    return lambda t: reference_sigma(t, kwargs.get("shift", 1.0), mu, linear)


def velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """A smooth, non-linear, sigma-dependent velocity field (no model needed for the step maths)."""
    return torch.tanh(1.3 * x.flip(-1) + sigma) - 0.5 * sigma * x


def schedulers(kwargs: dict, mu, grid: list[int]):
    gen = FlowMatchGridScheduler(**kwargs)
    gen.set_timesteps(timesteps=grid, mu=mu)
    inv = FlowMatchGridInverseScheduler(**kwargs)
    inv.set_timesteps(timesteps=grid, mu=mu)
    return gen, inv


# ---- the grid ------------------------------------------------------------------------------------------------


def test_grid_is_uniform_in_s_and_ends_at_t0():
    assert flow_timesteps(600, 4) == [150, 300, 450, 600]
    assert flow_timesteps(500, 40) == [k * 500 // 40 for k in range(1, 41)]
    assert flow_timesteps(999, 1) == [999]
    for t0 in (1, 7, 301, 999):
        for n in (1, 2, 6, 40):
            with pytest.warns(UserWarning) if n > t0 else contextlib.nullcontext():
                grid = flow_timesteps(t0, n)
            assert grid[-1] == t0 and grid[0] >= 1
            assert all(b > a for a, b in zip(grid, grid[1:]))


def test_grid_reports_dropped_duplicates():
    with pytest.warns(UserWarning, match="3 distinct"):
        assert flow_timesteps(3, 5) == [1, 2, 3]  # floor(k * 3 / 5) = 0, 1, 1, 2, 3: 0 (the clean image) dropped


@pytest.mark.parametrize("t0, error", [(0, ValueError), (1000, ValueError), (-3, ValueError), (2.5, TypeError),
                                       (True, TypeError)])  # fmt: skip
def test_grid_rejects_bad_t0(t0, error):
    with pytest.raises(error, match="`t0`"):
        flow_timesteps(t0, 10)


@pytest.mark.parametrize("n, error", [(0, ValueError), (-1, ValueError), (1.5, TypeError)])
def test_grid_rejects_bad_steps(n, error):
    with pytest.raises(error, match="`num_steps`"):
        flow_timesteps(500, n)


# ---- sigmas: the stock scheduler's at the grid's timesteps ------------------------------------------------------


@pytest.mark.parametrize("kwargs, mu", CONFIGS)
def test_sigmas_equal_the_stock_schedulers(kwargs, mu):
    grid = flow_timesteps(700, 7)
    gen, inv = schedulers(kwargs, mu, grid)
    stock = FlowMatchEulerDiscreteScheduler(**kwargs)
    stock.set_timesteps(sigmas=[t / T for t in grid[::-1]], mu=mu)  # the stock shift applied to s = t / T
    assert gen.sigmas.dtype == torch.float64
    torch.testing.assert_close(gen.sigmas.float(), stock.sigmas, atol=1e-6, rtol=0)  # both end in the clean 0
    torch.testing.assert_close(inv.sigmas.flip(0).float(), stock.sigmas, atol=1e-6, rtol=0)
    model_timesteps = torch.tensor([gen.model_timestep(t) for t in gen.timesteps], dtype=torch.float32)
    torch.testing.assert_close(model_timesteps, stock.timesteps, atol=T * 1e-6, rtol=0)
    sigma = reference_sigma_for(kwargs, mu)
    assert gen.sigmas.tolist() == pytest.approx([sigma(t) for t in grid[::-1]] + [0.0], abs=1e-15)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_static_shift_is_the_stock_training_table(shift):
    """Timestep t's sigma is the stock scheduler's training sigma of (pre-shift) timestep t: ``sigmas[T - t]``."""
    stock = FlowMatchEulerDiscreteScheduler(shift=shift)
    config = FlowMatchGridScheduler(shift=shift).config
    ours = torch.tensor([flow_sigma(t, config) for t in range(1, T)], dtype=torch.float64)
    torch.testing.assert_close(ours.float(), stock.sigmas[T - torch.arange(1, T)], atol=1e-6, rtol=0)


def test_from_config_of_sd3_and_flux_schedulers():
    sd3 = FlowMatchEulerDiscreteScheduler(shift=3.0)
    flux = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    )  # fmt: skip
    for stock, mu in ((sd3, None), (flux, 1.15)):
        for cls in (FlowMatchGridScheduler, FlowMatchGridInverseScheduler):
            scheduler = cls.from_config(stock.config)
            public = {k: v for k, v in scheduler.config.items() if not k.startswith("_")}
            assert public == {k: v for k, v in stock.config.items() if not k.startswith("_")}
            scheduler.set_timesteps(timesteps=[250, 500], mu=mu)
    scheduler = FlowMatchGridScheduler.from_config(sd3.config)
    scheduler.set_shift(1.0)  # the stock setter is honoured
    scheduler.set_timesteps(timesteps=[500])
    assert scheduler.sigmas.tolist() == [0.5, 0.0]


def test_dynamic_shift_mu_is_diffusers_calculate_shift():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    config = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).config
    for seq_len in (16, 256, 1024, 4096, 8192):
        assert dynamic_shift_mu(seq_len, config) == pytest.approx(calculate_shift(seq_len), abs=1e-12)
    assert dynamic_shift_mu(256, config) == pytest.approx(0.5)  # Flux at 256 px: base_shift
    assert dynamic_shift_mu(4096, config) == pytest.approx(1.15)  # at 1024 px: max_shift
    with pytest.raises(ValueError, match="`image_seq_len`"):
        dynamic_shift_mu(0, config)


# ---- the steps --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, mu", CONFIGS)
def test_generation_is_an_independent_euler_loop(kwargs, mu):
    grid, sigma = flow_timesteps(800, 9), reference_sigma_for(kwargs, mu)
    gen, _ = schedulers(kwargs, mu, grid)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected, levels = x.clone(), grid[::-1] + [0]
    for t, t_next in zip(levels, levels[1:]):  # Euler down: x <- x + (sigma_next - sigma) v(x, sigma)
        expected = expected + (sigma(t_next) - sigma(t)) * velocity(expected, sigma(t))
    assert gen.timesteps.tolist() == grid[::-1] and gen.timesteps.dtype == torch.long
    for t in gen.timesteps:
        x = gen.step(velocity(x, gen.sigma(t)), t, x).prev_sample
    torch.testing.assert_close(x, expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("kwargs, mu", CONFIGS)
def test_inversion_is_an_independent_euler_up_loop(kwargs, mu):
    grid, sigma = flow_timesteps(800, 9), reference_sigma_for(kwargs, mu)
    _, inv = schedulers(kwargs, mu, grid)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected, levels = x.clone(), [0] + grid
    for t, t_next in zip(levels, levels[1:]):  # Euler up, the velocity at the source point
        expected = expected + (sigma(t_next) - sigma(t)) * velocity(expected, sigma(t))
    assert inv.timesteps.tolist() == grid
    assert [inv.source_timestep(t) for t in grid] == [-1] + grid[:-1]
    for t in inv.timesteps:
        x = inv.step(velocity(x, inv.sigma(inv.source_timestep(t))), t, x).prev_sample
    torch.testing.assert_close(x, expected, atol=1e-12, rtol=0)


def test_generation_step_matches_the_stock_step():
    """float32, SD3's shift: the same Euler step as `FlowMatchEulerDiscreteScheduler.step` on the same sigmas."""
    grid = flow_timesteps(600, 6)
    gen, _ = schedulers({"shift": 3.0}, None, grid)
    stock = FlowMatchEulerDiscreteScheduler(shift=3.0)
    stock.set_timesteps(sigmas=[t / T for t in grid[::-1]])
    x = y = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    for t, stock_t in zip(gen.timesteps, stock.timesteps):
        x = gen.step(velocity(x, gen.sigma(t)), t, x).prev_sample
        y = stock.step(velocity(y, float(stock_t) / T), stock_t, y).prev_sample
    torch.testing.assert_close(x, y, atol=2e-6, rtol=0)


def test_pred_original_sample_is_x_minus_sigma_v():
    gen, inv = schedulers({"shift": 3.0}, None, [200, 400])
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    v = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(4))
    sigma = torch.tensor(gen.sigma(400))
    assert torch.equal(gen.step(v, 400, x).pred_original_sample, x - sigma * v)
    assert torch.equal(inv.step(v, 400, x).pred_original_sample, x - torch.tensor(inv.sigma(200)) * v)  # source
    assert torch.equal(inv.step(v, 200, x).pred_original_sample, x)  # from the clean image, sigma 0
    prev, x0 = gen.step(v, 200, x, return_dict=False)
    assert torch.equal(prev, x - torch.tensor(gen.sigma(200)) * v)  # the lowest point steps to sigma 0 ...
    assert torch.equal(x0, prev)  # ... which is the x0 estimate


def test_step_dtypes():
    """The step runs in float32 at least (the stock upcast) and returns ``model_output``'s dtype."""
    gen, inv = schedulers({"shift": 3.0}, None, [300, 600])
    x = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(5))
    dt = gen.sigma(300) - gen.sigma(600)
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        low, v = x.to(dtype), x.flip(-1).to(dtype)
        out = gen.step(v, 600, low)
        assert out.prev_sample.dtype == out.pred_original_sample.dtype == dtype
        wide = torch.promote_types(dtype, torch.float32)
        assert torch.equal(out.prev_sample, (low.to(wide) + dt * v.to(wide)).to(dtype))
        assert inv.step(v, 600, low).prev_sample.dtype == dtype


def test_steps_both_ways_are_exact_opposites():
    """The generation step s <- t and the inversion step t <- s with the same velocity undo each other."""
    gen, inv = schedulers({"use_dynamic_shifting": True}, 1.15, flow_timesteps(900, 5))
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    v = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    for t in gen.timesteps:
        back = inv.step(v, t, gen.step(v, t, x).prev_sample).prev_sample
        torch.testing.assert_close(back, x, atol=1e-15, rtol=0)


# ---- the forward encoding ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, mu", CONFIGS)
def test_noise_to_is_stock_scale_noise(kwargs, mu):
    gen = torch.Generator().manual_seed(8)
    x0, noise = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    for t0 in (1, 250, 600, 999):
        scheduler = FlowMatchGridScheduler(**kwargs)
        scheduler.set_timesteps(timesteps=[t0], mu=mu)
        stock = FlowMatchEulerDiscreteScheduler(**kwargs)
        stock.set_timesteps(sigmas=[t0 / T], mu=mu)
        expected = stock.scale_noise(x0, stock.timesteps[:1].repeat(2), noise)
        torch.testing.assert_close(scheduler.noise_to(x0, t0, noise), expected, atol=1e-6, rtol=0)
        assert torch.equal(scheduler.scale_noise(x0, torch.tensor([t0, t0]), noise), scheduler.noise_to(x0, t0, noise))


# ---- errors -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "option, value",
    [("stochastic_sampling", True), ("use_karras_sigmas", True), ("use_exponential_sigmas", True),
     ("use_beta_sigmas", True), ("invert_sigmas", True), ("shift_terminal", 0.1)],
)  # fmt: skip
def test_unsupported_config_options_are_refused_by_name(option, value):
    config = FlowMatchEulerDiscreteScheduler(**{option: value}).config
    for cls in (FlowMatchGridScheduler, FlowMatchGridInverseScheduler):
        scheduler = cls.from_config(config)
        with pytest.raises(ValueError, match=f"`{option}="):
            scheduler.set_timesteps(timesteps=[500])
    with pytest.raises(ValueError, match=f"`{option}="):
        check_flow_config(config)


def test_unknown_time_shift_type_is_refused():
    with pytest.raises(ValueError, match="`time_shift_type`"):
        check_flow_config({"use_dynamic_shifting": True, "time_shift_type": "cubic"})


def test_set_timesteps_errors():
    s = FlowMatchGridScheduler(shift=3.0)
    with pytest.raises(ValueError, match="`timesteps` \\(the integer grid"):
        s.set_timesteps(10)
    with pytest.raises(ValueError, match="`sigmas` is not supported"):
        s.set_timesteps(sigmas=[0.5], timesteps=[500])
    with pytest.raises(ValueError, match="must not be empty"):
        s.set_timesteps(timesteps=[])
    with pytest.raises(ValueError, match="strictly increasing"):
        s.set_timesteps(timesteps=[10, 10, 30])
    for grid in ([0, 10], [10, 1000]):
        with pytest.raises(ValueError, match=r"lie in \[1, 999\]"):
            s.set_timesteps(timesteps=grid)
    with pytest.raises(ValueError, match="`num_inference_steps` \\(3\\) must equal"):
        s.set_timesteps(3, timesteps=[10, 20])
    with pytest.raises(TypeError, match="`timesteps`"):
        s.set_timesteps(timesteps=[10.5])
    with pytest.raises(ValueError, match="`mu` must be passed"):
        FlowMatchGridInverseScheduler(use_dynamic_shifting=True).set_timesteps(timesteps=[500])


def test_step_errors():
    x = torch.zeros(1, 2, 2, 2)
    for cls in (FlowMatchGridScheduler, FlowMatchGridInverseScheduler):
        s = cls(shift=3.0)
        with pytest.raises(ValueError, match="Call `set_timesteps"):
            s.step(x, 500, x)
        s.set_timesteps(timesteps=[100, 300])
        with pytest.raises(ValueError, match="not on the grid"):
            s.step(x, 200, x)
    gen = FlowMatchGridScheduler()
    gen.set_timesteps(timesteps=[300])
    with pytest.raises(ValueError, match="`eta` must be 0"):
        gen.step(x, 300, x, eta=0.5)


def test_sigma_and_noise_to_errors():
    config = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).config
    with pytest.raises(ValueError, match="`mu` must be given"):
        flow_sigma(500, config)
    with pytest.raises(ValueError, match="`timestep`"):
        flow_sigma(1001, config, mu=1.0)
    assert flow_sigma(-1, config) == flow_sigma(0, config) == 0.0  # the clean image needs no mu
    s = FlowMatchGridScheduler()
    s.set_timesteps(timesteps=[500])
    x = torch.zeros(1, 2, 2, 2)
    with pytest.raises(ValueError, match="`t0`"):
        s.noise_to(x, 0, x)
    with pytest.raises(ValueError, match="`noise` must have the shape"):
        s.noise_to(x, 500, torch.zeros(1, 2, 2, 3))

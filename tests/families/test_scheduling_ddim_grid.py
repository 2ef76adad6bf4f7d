import numpy as np
import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler

from diffusionclip_pipeline.scheduling_ddim_grid import GridDDIMInverseScheduler, GridDDIMScheduler, ddim_timesteps


def test_grid_is_diffusionclip_linspace():
    grid = ddim_timesteps(500, 40)
    assert grid == [int(s) for s in np.linspace(0, 1, 40) * 500]
    assert grid[0] == 0 and grid[-1] == 500 and len(grid) == 40
    assert set(np.diff(grid)) == {12, 13}  # non-uniform: the stock schedulers cannot step it


def test_grid_any_t0_and_steps():
    for t0 in (1, 7, 301, 601, 999):
        for n in (1, 2, 6, 40):
            with pytest.warns(UserWarning) if n > t0 + 1 else _no_warning():
                grid = ddim_timesteps(t0, n)
            assert grid[-1] == t0
            assert all(b > a for a, b in zip(grid, grid[1:]))


def test_grid_reports_dropped_duplicates():
    with pytest.warns(UserWarning, match="6 distinct"):
        assert ddim_timesteps(5, 40) == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("t0, error", [(0, ValueError), (1000, ValueError), (-3, ValueError), (2.5, TypeError),
                                       (True, TypeError), ("500", TypeError)])  # fmt: skip
def test_grid_rejects_bad_t0(t0, error):
    with pytest.raises(error, match="`t0`"):
        ddim_timesteps(t0, 10)


@pytest.mark.parametrize("n, error", [(0, ValueError), (-1, ValueError), (1.5, TypeError), (None, TypeError)])
def test_grid_rejects_bad_steps(n, error):
    with pytest.raises(error, match="`num_steps`"):
        ddim_timesteps(500, n)


def test_explicit_grid_validation():
    s = GridDDIMScheduler(clip_sample=False)
    with pytest.raises(ValueError, match="strictly increasing"):
        s.set_timesteps(timesteps=[0, 10, 10])
    with pytest.raises(ValueError, match=r"lie in \[0, 999\]"):
        s.set_timesteps(timesteps=[0, 1000])
    s.set_timesteps(timesteps=[0, 10, 30])
    with pytest.raises(ValueError, match="not on the grid"):
        s.step(torch.zeros(1, 3, 2, 2), 20, torch.zeros(1, 3, 2, 2))


def test_uniform_grid_bitwise_equal_to_stock_schedulers():
    """On a grid the stock schedulers can step (stride 20 to t0 = 500), results are bitwise identical."""
    r, n = 20, 26
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 8, generator=gen)
    eps = [torch.randn(2, 3, 8, 8, generator=gen) for _ in range(n)]
    grid = ddim_timesteps(500, n)
    assert grid == list(range(0, 501, r))

    stock_inv = DDIMInverseScheduler(clip_sample=False)
    stock_inv.set_timesteps(1000 // r)
    ours_inv = GridDDIMInverseScheduler(clip_sample=False)
    ours_inv.set_timesteps(timesteps=grid)
    assert ours_inv.timesteps.tolist() == stock_inv.timesteps[:n].tolist()
    a = b = x
    for t, e in zip(ours_inv.timesteps, eps):
        a = stock_inv.step(e, t, a).prev_sample
        b = ours_inv.step(e, t, b).prev_sample
        assert torch.equal(a, b)

    stock = DDIMScheduler(clip_sample=False)
    stock.set_timesteps(1000 // r)
    ours = GridDDIMScheduler(clip_sample=False)
    ours.set_timesteps(timesteps=grid)
    assert ours.timesteps.tolist() == stock.timesteps[-n:].tolist()
    for eta in (0.0, 0.7):
        a = b = x
        for t, e in zip(ours.timesteps, eps):
            noise = torch.randn(2, 3, 8, 8, generator=gen)
            a = stock.step(e, t, a, eta=eta, variance_noise=noise if eta else None).prev_sample
            b = ours.step(e, t, b, eta=eta, variance_noise=noise if eta else None).prev_sample
            assert torch.equal(a, b)


def _hand_step(x, eps, a_from, a_to):
    x0 = (x - (1 - a_from) ** 0.5 * eps) / a_from**0.5
    return a_to**0.5 * x0 + (1 - a_to) ** 0.5 * eps


def test_non_uniform_grid_matches_hand_formula_both_ways():
    grid = ddim_timesteps(601, 7)  # [0, 100, 200, 300, 400, 500, 601] -> last stride 101
    alphas = DDIMScheduler().alphas_cumprod
    level = {-1: torch.tensor(1.0), **{t: alphas[t] for t in grid}}
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 4, 4, generator=gen)
    eps = torch.randn(1, 3, 4, 4, generator=gen)

    inv = GridDDIMInverseScheduler(clip_sample=False)
    inv.set_timesteps(timesteps=grid)
    prev = [-1] + grid[:-1]
    for t, s in zip(grid, prev):
        assert inv.source_timestep(t) == s
        torch.testing.assert_close(inv.step(eps, t, x).prev_sample, _hand_step(x, eps, level[s], level[t]))

    sch = GridDDIMScheduler(clip_sample=False)
    sch.set_timesteps(timesteps=grid)
    assert sch.timesteps.tolist() == grid[::-1]
    for t, s in zip(grid, prev):
        assert sch.previous_timestep(t) == s
        torch.testing.assert_close(sch.step(eps, t, x).prev_sample, _hand_step(x, eps, level[t], level[s]))


def test_without_grid_falls_back_to_stock_behaviour():
    ours, stock = GridDDIMScheduler(clip_sample=False), DDIMScheduler(clip_sample=False)
    ours.set_timesteps(10)
    stock.set_timesteps(10)
    x, e = torch.ones(1, 1, 2, 2), torch.full((1, 1, 2, 2), 0.3)
    assert torch.equal(ours.step(e, 900, x).prev_sample, stock.step(e, 900, x).prev_sample)


class _no_warning:
    def __enter__(self):
        import warnings

        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)

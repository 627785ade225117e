"""Eqs. 1-3 and the transition log-probability (sde.py)."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import sde

floats = st.floats(-3, 3, allow_nan=False)


def test_sigma_grid_matches_definition():
    T, s = 16, 3.0
    g = sde.sigma_grid(T, s)
    assert g.shape == (T + 1,) and g[0] == 1 and g[-1] == 0
    assert torch.all(g[1:] < g[:-1])
    u = 1 - 5 / 16  # an interior point of linspace(1, 0, 17)
    assert math.isclose(g[5].item(), s * u / (1 + (s - 1) * u), rel_tol=1e-12)
    assert torch.allclose(sde.sigma_grid(T, 1.0), torch.linspace(1, 0, T + 1, dtype=torch.float64))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), i=st.integers(0, 15), schedule=st.sampled_from(sde.SCHEDULES))
def test_sde_with_eta_zero_is_the_ode_step(seed, i, schedule):
    g = torch.Generator().manual_seed(seed)
    x, v = torch.randn(3, 4, 5, generator=g), torch.randn(3, 4, 5, generator=g)
    s = sde.sigma_grid(16)
    x_next, logp, mean, std = sde.sde_step(x, v, s[i], s[i + 1], eta=0.0, schedule=schedule, generator=g)
    assert torch.equal(x_next, sde.ode_step(x, v, s[i], s[i + 1]))
    assert torch.equal(mean, x_next) and logp is None


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), i=st.integers(0, 15), eta=st.floats(0.05, 1.5),
       schedule=st.sampled_from(sde.SCHEDULES))
def test_log_prob_matches_torch_normal(seed, i, eta, schedule):
    g = torch.Generator().manual_seed(seed)
    x, v = torch.randn(4, 16, 8, generator=g), torch.randn(4, 16, 8, generator=g)
    s = sde.sigma_grid(16)
    x_next, logp, mean, std = sde.sde_step(x, v, s[i], s[i + 1], eta, schedule, generator=g)
    ref = torch.distributions.Normal(mean.double(), std.double()).log_prob(x_next.double()).mean((1, 2))
    assert logp.dtype == torch.float32 and logp.shape == (4,)
    assert torch.allclose(logp.double(), ref, rtol=1e-5, atol=1e-4)
    # scoring a given sample reproduces the drawn one's log-prob
    _, logp2, _, _ = sde.sde_step(x, v, s[i], s[i + 1], eta, schedule, x_next=x_next)
    assert torch.equal(logp, logp2)


def test_sde_std_per_schedule_and_t1_substitution():
    s = sde.sigma_grid(16)
    x = v = torch.zeros(1, 2)
    _, _, _, std = sde.sde_step(x, v, s[3], s[4], 0.7, "constant")
    assert torch.allclose(std, torch.tensor(0.7 * math.sqrt(s[3] - s[4])).float())
    # flowgrpo: eta sqrt(t / (1 - t)), and at t = 1 the schedule is read at t_next = sigma_1
    _, _, _, std = sde.sde_step(x, v, s[3], s[4], 0.7, "flowgrpo")
    want = 0.7 * math.sqrt(s[3] / (1 - s[3])) * math.sqrt(s[3] - s[4])
    assert math.isclose(std.item(), want, rel_tol=1e-6)
    # t = 1 (the first step): the reference keeps t = 1 in the numerator and reads the denominator at
    # sigma_1. T = 16, shift 3: sigma_1 = 3 (15/16) / (1 + 2 (15/16)) = 45/46, so sigma_t = 0.7 sqrt(46)
    # and, with dt = 1/46, std = 0.7 exactly
    assert math.isclose(s[1].item(), 45 / 46, rel_tol=1e-15)
    assert math.isclose(sde.noise_level(s[0], s[1], 0.7).item(), 0.7 * math.sqrt(46), rel_tol=1e-12)
    _, _, _, std0 = sde.sde_step(x, v, s[0], s[1], 0.7, "flowgrpo")
    assert math.isclose(std0.item(), 0.7, rel_tol=1e-6)


def test_sde_step_broadcasts_one_mean_over_the_group():
    """Singular sampling: G samples drawn from one shared (x, v) share the mean."""
    x, v = torch.randn(1, 6), torch.randn(1, 6)
    s = sde.sigma_grid(8)
    x_next, logp, mean, std = sde.sde_step(x.expand(5, 6), v.expand(5, 6), s[2], s[3], 0.7,
                                            generator=torch.Generator().manual_seed(0))
    assert x_next.shape == (5, 6) and logp.shape == (5,)
    assert torch.equal(mean, mean[:1].expand(5, 6))
    assert len({tuple(r.tolist()) for r in x_next}) == 5


def test_x0_prediction_is_the_euler_step_to_zero():
    x, v = torch.randn(3, 4), torch.randn(3, 4)
    t = torch.tensor([0.2, 0.5, 0.9])
    assert torch.allclose(sde.x0_prediction(x, v, t), sde.ode_step(x, v, t, torch.zeros(3)))
    # and it is exact on the straight path x_t = (1 - t) x0 + t eps with v = eps - x0
    x0, eps = torch.randn(3, 4), torch.randn(3, 4)
    xt = (1 - t[:, None]) * x0 + t[:, None] * eps
    assert torch.allclose(sde.x0_prediction(xt, eps - x0, t), x0, atol=1e-6)


def test_bad_schedule_and_grid_arguments():
    with pytest.raises(ValueError, match="noise schedule"):
        sde.noise_level(0.5, 0.4, 0.7, "ddpm")
    with pytest.raises(ValueError, match="T"):
        sde.sigma_grid(0)


# ---- marginal preservation (Eq. 2 has the same marginals as the ODE) -----------------------
# Gaussian data x0 ~ N(mu, diag(s^2)): x_t = (1-t) x0 + t eps ~ N((1-t) mu, (1-t)^2 s^2 + t^2) and
# the exact velocity E[eps - x0 | x_t] = -mu + (t - (1-t) s^2) / var_t * (x_t - (1-t) mu).
N, STEPS, CHECKS = 10000, 200, (0.75, 0.5, 0.25)
MEAN_TOL, VAR_TOL = 0.06, 0.10  # abs on the mean, relative on the variance (MC error ~1-3 %)


def gaussian_velocity(mu, s):
    def v(x, t):
        t = t.reshape(-1, 1)
        var = (1 - t) ** 2 * s**2 + t**2
        return -mu + (t - (1 - t) * s**2) / var * (x - (1 - t) * mu)
    return v


def marginal_errors(mu, s, eta, schedule, step=sde.sde_step, seed=0):
    g = torch.Generator().manual_seed(seed)
    sig = torch.linspace(1, 0, STEPS + 1, dtype=torch.float64)
    x = torch.randn(N, mu.numel(), generator=g, dtype=torch.float64)
    v, worst = gaussian_velocity(mu, s), (0.0, 0.0)
    for i in range(STEPS):
        x = step(x, v(x, sig[i].expand(N)), sig[i], sig[i + 1], eta, schedule, generator=g)[0]
        c = round(sig[i + 1].item(), 9)
        if c in CHECKS:
            m, var = (1 - c) * mu, (1 - c) ** 2 * s**2 + c**2
            worst = (max(worst[0], (x.mean(0) - m).abs().max().item()),
                     max(worst[1], (x.var(0) / var - 1).abs().max().item()))
    return worst


def wrong_sign_sde_step(x, v, t, t_next, eta, schedule, generator=None):
    """Eq. 3 with the score term's sign flipped: v + sigma^2/2 * score instead of minus."""
    sig = sde.noise_level(t, t_next, eta, schedule)
    dt = t_next - t
    mean = x + (v - sig**2 / (2 * t) * (x + (1 - t) * v)) * dt
    return (mean + sig * dt.abs().sqrt() * torch.randn(x.shape, generator=generator, dtype=x.dtype),)


gaussians = st.tuples(st.lists(st.floats(-2, 2), min_size=3, max_size=3),
                      st.lists(st.floats(0.4, 2.0), min_size=3, max_size=3))


@settings(max_examples=4, deadline=None)
@given(data=gaussians, schedule=st.sampled_from(sde.SCHEDULES), eta=st.floats(0.3, 1.0))
def test_sde_preserves_the_rectified_flow_marginals(data, schedule, eta):
    mu, s = (torch.tensor(a, dtype=torch.float64) for a in data)
    err_mean, err_var = marginal_errors(mu, s, eta, schedule)
    assert err_mean < MEAN_TOL and err_var < VAR_TOL, (err_mean, err_var)


@pytest.mark.parametrize("schedule", sde.SCHEDULES)
def test_marginal_check_catches_a_wrong_drift(schedule):
    mu, s = torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64), torch.tensor([0.5, 1.0, 1.5], dtype=torch.float64)
    err_mean, err_var = marginal_errors(mu, s, 0.7, schedule, step=wrong_sign_sde_step)
    assert err_mean > MEAN_TOL or err_var > VAR_TOL, (err_mean, err_var)


def test_bf16_inputs_are_stepped_in_fp32():
    """bf16 latents: the step runs in fp32 with fp64 times (dt in bf16 would be ~10 % off at T = 16):
    the same numbers as the fp64 step of the same (bf16-valued) inputs, to fp32 rounding."""
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(3, 64, generator=g).bfloat16(), torch.randn(3, 64, generator=g).bfloat16()
    s = sde.sigma_grid(16)
    for i in (0, 7, 14):
        xn, lp, mean, std = sde.sde_step(x, v, s[i], s[i + 1], 0.7, generator=torch.Generator().manual_seed(1))
        _, lp64, mean64, std64 = sde.sde_step(x.double(), v.double(), s[i], s[i + 1], 0.7, x_next=xn.double())
        assert xn.dtype == mean.dtype == torch.float32 and lp.dtype == torch.float32
        assert torch.allclose(mean.double(), mean64, rtol=1e-6, atol=1e-6)
        assert torch.allclose(std.double(), std64, rtol=1e-6) and torch.allclose(lp, lp64, rtol=1e-5, atol=1e-5)
        assert torch.allclose(sde.ode_step(x, v, s[i], s[i + 1]).double(), sde.ode_step(x.double(), v.double(), s[i],
                              s[i + 1]), rtol=1e-6, atol=1e-6)


def test_zero_noise_step_is_refused_never_nan():
    x = v = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="zero noise"):
        sde.sde_step(x, v, 0.5, 0.5, 0.7)  # a step of zero length
    # T = 1: one step from t = 1 straight to t = 0 has a finite std (eta sqrt(1 / (1 - 0)) sqrt(1) = eta)
    s = sde.sigma_grid(1)
    xn, lp, _, std = sde.sde_step(torch.randn(2, 3), torch.randn(2, 3), s[0], s[1], 0.7)
    assert torch.isfinite(lp).all() and torch.allclose(std, torch.tensor(0.7))

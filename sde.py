"""Eqs. 1-3 of G2RPO: the sampling grid, the ODE step, the SDE step and its log-probability.

Rectified flow: x_t = (1 - t) x_0 + t eps, t = 1 is noise, t = 0 data; v_theta(x_t, t) ~ eps - x_0.
Sampling walks a grid sigma_0 = 1 > sigma_1 > ... > sigma_T = 0 with dt = sigma_{i+1} - sigma_i < 0.

    code            paper
    ----            -----
    x, t            x_t, t            current state and time (t = sigma_i)
    t_next          t + dt            next grid point (dt < 0)
    v               v_theta(x_t, t)   the model's velocity
    eta             eta               noise level (0.7 in G2RPO)
    sigma_t         sigma_t           diffusion coefficient of Eq. 2
    mean, std       -                 Gaussian of one Euler-Maruyama step, std = sigma_t sqrt(|dt|)
    x0_hat          x_0 estimate      x - t v

Eq. 1 (ODE):  x_{t+dt} = x_t + v dt
Eq. 2 (SDE):  dx = [v + sigma_t^2 / (2t) (x + (1 - t) v)] dt + sigma_t dw   (same marginals)
Eq. 3 (step): mean = x + [v + sigma_t^2 / (2t) (x + (1 - t) v)] dt,  x_{t+dt} = mean + std * eps

The bracket is v - sigma_t^2 / 2 * score, with score = -(x + (1 - t) v) / t (tests check that
flipping this sign breaks the marginals). Pure tensor functions: no model, no I/O.
"""
import math

import torch

SCHEDULES = ("flowgrpo", "constant")


def sigma_grid(T: int, shift: float = 3.0) -> torch.Tensor:
    """(T + 1,) fp64 grid from 1 to 0: linspace(1, 0, T + 1), then the SD3 shift s*x / (1 + (s-1)*x)."""
    if T < 1:
        raise ValueError(f"T (sampling steps) must be >= 1, got {T}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    sigma = torch.linspace(1.0, 0.0, T + 1, dtype=torch.float64)
    return shift * sigma / (1 + (shift - 1) * sigma)


def ode_step(x: torch.Tensor, v: torch.Tensor, t, t_next) -> torch.Tensor:
    """Eq. 1: one Euler step x + v * (t_next - t). t, t_next: floats or (B,) tensors."""
    return x + v * _bcast(_as_tensor(t_next, x) - _as_tensor(t, x), x)


def x0_prediction(x: torch.Tensor, v: torch.Tensor, t) -> torch.Tensor:
    """x_0 estimate x - t v (equal to one Euler step from t straight to 0)."""
    return x - _bcast(_as_tensor(t, x), x) * v


def noise_level(t, t_next, eta: float, schedule: str = "flowgrpo") -> torch.Tensor:
    """sigma_t of Eq. 2.

    'flowgrpo' (G2RPO, Flow-GRPO): eta * sqrt(t / (1 - t)). It is infinite at t = 1; there we
        evaluate it at t_next instead (on the sampling grid that is sigma_1, the same substitution
        as the reference code).
    'constant' (DanceGRPO): eta.
    """
    t = torch.as_tensor(t, dtype=torch.float64)
    t_next = torch.as_tensor(t_next, dtype=torch.float64)
    if schedule == "flowgrpo":
        t_eff = torch.where(t >= 1, t_next, t)
        return eta * torch.sqrt(t_eff / (1 - t_eff))
    if schedule == "constant":
        return torch.full_like(t, float(eta))
    raise ValueError(f"unknown noise schedule {schedule!r}; choose one of {SCHEDULES}")


def sde_step(x, v, t, t_next, eta: float, schedule: str = "flowgrpo", x_next=None, generator=None):
    """Eq. 3: one Euler-Maruyama step of Eq. 2 from t to t_next (< t).

    Draws x_next = mean + std * eps unless `x_next` is given, in which case that sample is scored.
    `x` may have batch 1 and `v` too while `x_next` (or the noise) has batch G: the G branches of
    Singular Stochastic Sampling share one mean. Returns (x_next, log_prob, mean, std).
    With eta = 0 the step is exactly the ODE step (std = 0; log_prob is then None).
    """
    t_, tn_ = _as_tensor(t, x), _as_tensor(t_next, x)
    dt = _bcast(tn_ - t_, x)
    sig = _bcast(noise_level(t, t_next, eta, schedule).to(x.device, x.dtype), x)  # sigma_t
    tb = _bcast(t_, x)
    mean = x + (v + sig**2 / (2 * tb) * (x + (1 - tb) * v)) * dt
    std = sig * torch.sqrt(dt.abs())
    if x_next is None:
        eps = torch.randn(mean.shape, generator=generator, device=x.device, dtype=x.dtype)
        x_next = mean + std * eps
    if eta == 0:
        return x_next, None, mean, std
    return x_next, log_prob(x_next, mean, std), mean, std


def log_prob(x_next: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(B,) Gaussian log-density of a transition, in fp32, MEAN over all non-batch dims.

    As in every reference implementation the per-dimension log-densities are averaged, not
    summed: the PPO ratio exp(logp - logp_old) is then the D-th root of the true likelihood ratio
    (D = number of dims), which keeps it near 1 and makes the clip range act per dimension.
    """
    x_next, mean, std = (a.float() for a in (x_next, mean, std))
    lp = -((x_next - mean) ** 2) / (2 * std**2) - torch.log(std) - math.log(math.sqrt(2 * math.pi))
    return lp.mean(dim=tuple(range(1, lp.ndim)))


def _as_tensor(t, x):
    return torch.as_tensor(t, dtype=x.dtype, device=x.device)


def _bcast(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A scalar or (B,) time -> broadcastable against x of shape (B, ...)."""
    return t.reshape(t.shape + (1,) * (x.ndim - t.ndim)) if t.ndim else t

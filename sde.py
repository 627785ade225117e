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
    """Eq. 1: one Euler step x + v * (t_next - t). t, t_next: floats or (B,) tensors. dt is formed in
    fp64 and the step done in fp32 (or x's dtype if wider), as sde_step."""
    dtype = _compute_dtype(x)
    dt = torch.as_tensor(t_next, dtype=torch.float64) - torch.as_tensor(t, dtype=torch.float64)
    return x.to(dtype) + v.to(dtype) * _bcast(dt.to(x.device, dtype), x)


def x0_prediction(x: torch.Tensor, v: torch.Tensor, t) -> torch.Tensor:
    """x_0 estimate x - t v (equal to one Euler step from t straight to 0)."""
    return x - _bcast(_as_tensor(t, x), x) * v


def noise_level(t, t_next, eta: float, schedule: str = "flowgrpo") -> torch.Tensor:
    """sigma_t of Eq. 2, in fp64.

    'flowgrpo' (G2RPO, Flow-GRPO): eta * sqrt(t / (1 - t)). It is infinite at t = 1, where the paper
        says nothing; like the reference code (Flow-GRPO's sde_step_with_logprob, the G2RPO
        authors' script) we then read the DENOMINATOR at t_next and keep t = 1 in the numerator:
        eta * sqrt(1 / (1 - t_next)) (= 0.7 sqrt(46) at T = 16, shift 3). Substituting t_next in
        both places would give a std smaller by sqrt(t_next) (1.1 % at T = 16).
    'constant' (DanceGRPO): eta.
    """
    t = torch.as_tensor(t, dtype=torch.float64)
    t_next = torch.as_tensor(t_next, dtype=torch.float64)
    if schedule == "flowgrpo":
        return eta * torch.sqrt(t / (1 - torch.where(t >= 1, t_next, t)))
    if schedule == "constant":
        return torch.full_like(t, float(eta))
    raise ValueError(f"unknown noise schedule {schedule!r}; choose one of {SCHEDULES}")


def sde_step(x, v, t, t_next, eta: float, schedule: str = "flowgrpo", x_next=None, generator=None):
    """Eq. 3: one Euler-Maruyama step of Eq. 2 from t to t_next (< t).

    Draws x_next = mean + std * eps unless `x_next` is given, in which case that sample is scored.
    `x` may have batch 1 and `v` too while `x_next` (or the noise) has batch G: the G branches of
    Singular Stochastic Sampling share one mean. Returns (x_next, log_prob, mean, std).
    With eta = 0 the step is exactly the ODE step (std = 0; log_prob is then None).
    Precision: the times and coefficients are computed in fp64 and the step in fp32 (or x's dtype
    if wider), whatever the input dtype: bf16 latents would put dt ~10 % off at T = 16. The
    returned tensors are in that compute dtype.
    """
    dtype = _compute_dtype(x)
    x, v = x.to(dtype), v.to(dtype)
    t64, tn64 = (torch.as_tensor(a, dtype=torch.float64).to(x.device) for a in (t, t_next))
    sig = noise_level(t64, tn64, eta, schedule)  # sigma_t, fp64
    dt, a = _bcast(tn64 - t64, x), _bcast(sig**2 / (2 * t64), x)  # fp64 coefficients
    one_minus_t = _bcast(1 - t64, x)
    mean = x + (v + a.to(dtype) * (x + one_minus_t.to(dtype) * v)) * dt.to(dtype)
    std = (_bcast(sig, x) * torch.sqrt(dt.abs())).to(dtype)
    if eta > 0 and not bool((std > 0).all()):
        raise ValueError(f"SDE step from t={t64.tolist()} to t_next={tn64.tolist()} has zero noise (a step of "
                         f"zero length, or a schedule that vanishes there): its log-probability is undefined")
    if x_next is None:
        eps = torch.randn(mean.shape, generator=generator, device=x.device, dtype=dtype)
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
    return torch.as_tensor(t, dtype=_compute_dtype(x), device=x.device)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32, or x's dtype if it is wider (fp64): a step never runs in bf16 / fp16."""
    return torch.promote_types(x.dtype, torch.float32)


def _bcast(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A scalar or (B,) time -> broadcastable against x of shape (B, ...)."""
    return t.reshape(t.shape + (1,) * (x.ndim - t.ndim)) if t.ndim else t

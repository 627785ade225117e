"""Eq. 12 (loss.py)."""
import torch
from hypothesis import given, settings, strategies as st

import loss as L


def loop_loss(logp, logp_old, A, eps):
    """Eq. 12 written as the paper's double sum, one (k, i) at a time."""
    K, G = A.shape
    total = 0.0
    for k in range(K):
        for i in range(G):
            r = torch.exp(logp[k, i] - logp_old[k, i])
            total = total + torch.minimum(r * A[k, i], torch.clamp(r, 1 - eps, 1 + eps) * A[k, i])
    return -total / (G * K)


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 10_000), A=st.floats(-5, 5))
def test_ratio_one_gives_minus_mean_advantage(seed, A):
    adv = torch.randn(4, 6, generator=torch.Generator().manual_seed(seed)) + A
    lp = torch.randn(4, 6)
    loss, diag = L.g2rpo_loss(lp, lp.clone(), adv, 1e-4)
    assert torch.allclose(loss, -adv.mean(), atol=1e-6)
    assert diag["clip_frac"] == 0 and diag["ratio_drift_max"] == 0


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 10_000), eps=st.sampled_from([1e-4, 1e-2, 0.2]))
def test_matches_a_plain_loop(seed, eps):
    g = torch.Generator().manual_seed(seed)
    lp_old = torch.randn(3, 5, generator=g)
    lp = lp_old + eps * 3 * torch.randn(3, 5, generator=g)
    A = torch.randn(3, 5, generator=g)
    loss, _ = L.g2rpo_loss(lp, lp_old, A, eps)
    assert torch.allclose(loss, loop_loss(lp, lp_old, A, eps), atol=1e-6)


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_gradient_vanishes_exactly_where_the_clipped_branch_is_active(seed):
    g = torch.Generator().manual_seed(seed)
    eps = 0.05
    lp_old = torch.randn(4, 8, generator=g)
    lp = (lp_old + 0.2 * torch.randn(4, 8, generator=g)).requires_grad_()
    A = torch.randn(4, 8, generator=g)
    loss, diag = L.g2rpo_loss(lp, lp_old, A, eps)
    loss.backward()
    r = torch.exp(lp - lp_old).detach()
    active = ((A > 0) & (r > 1 + eps)) | ((A < 0) & (r < 1 - eps))
    assert torch.all(lp.grad[active] == 0)
    assert torch.all(lp.grad[~active] != 0)
    # unclipped gradient of -mean(r A) wrt logp is -r A / N
    assert torch.allclose(lp.grad[~active], (-r * A / A.numel())[~active])
    assert abs(diag["clip_frac"] - ((r - 1).abs() > eps).float().mean().item()) < 1e-7


def test_kl_term():
    mean, ref, std = torch.randn(3, 4), torch.randn(3, 4), torch.full((3, 4), 0.5)
    kl = L.gaussian_kl(mean, ref, std)
    want = torch.distributions.kl_divergence(torch.distributions.Normal(mean, std),
                                             torch.distributions.Normal(ref, std)).mean(1)
    assert torch.allclose(kl, want, atol=1e-6)
    lp = torch.zeros(3)
    base, _ = L.g2rpo_loss(lp, lp, torch.ones(3))
    with_kl, _ = L.g2rpo_loss(lp, lp, torch.ones(3), kl=kl, beta=0.1)
    assert torch.allclose(with_kl - base, 0.1 * kl.mean())
    try:
        L.g2rpo_loss(lp, lp, torch.ones(3), beta=0.1)
        raise AssertionError("beta > 0 without kl must fail")
    except ValueError as e:
        assert "kl" in str(e)

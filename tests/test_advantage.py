"""Eqs. 8 and 11 (advantage.py)."""
import pytest
import torch
from hypothesis import assume, given, settings, strategies as st

import advantage

groups = st.lists(st.floats(-10, 10, allow_nan=False), min_size=2, max_size=16)


def spread(r):
    return max(r) - min(r) > 1e-2


@settings(max_examples=200, deadline=None)
@given(r=groups)
def test_zero_mean_unit_std(r):
    assume(spread(r))
    A = advantage.group_advantage(torch.tensor(r, dtype=torch.float64))
    assert abs(A.mean().item()) < 1e-5 and abs(A.std().item() - 1) < 1e-4


@settings(max_examples=200, deadline=None)
@given(r=groups, a=st.floats(0.1, 100), b=st.floats(-100, 100))
def test_invariant_to_positive_affine_maps(r, a, b):
    assume(spread(r))
    R = torch.tensor(r, dtype=torch.float64)
    assert torch.allclose(advantage.group_advantage(a * R + b), advantage.group_advantage(R), atol=1e-4)


@settings(max_examples=100, deadline=None)
@given(r=groups, seed=st.integers(0, 1000))
def test_equivariant_to_permutations(r, seed):
    R = torch.tensor(r)
    perm = torch.randperm(len(r), generator=torch.Generator().manual_seed(seed))
    assert torch.allclose(advantage.group_advantage(R[perm]), advantage.group_advantage(R)[perm])


@settings(max_examples=100, deadline=None)
@given(c=st.floats(-1e6, 1e6, allow_nan=False), G=st.integers(2, 16))
def test_constant_rewards_give_exact_zeros(c, G):
    A = advantage.group_advantage(torch.full((3, G), c))
    assert torch.equal(A, torch.zeros(3, G))


def test_groups_are_normalised_independently():
    R = torch.stack([torch.arange(4.0), 100 * torch.arange(4.0) + 7, torch.ones(4)])  # (3, G)
    A = advantage.group_advantage(R)
    assert torch.allclose(A[0], A[1]) and torch.equal(A[2], torch.zeros(4))
    # per-step normalisation (Eq. 8): not one normalisation over all steps
    assert not torch.allclose(A, advantage.group_advantage(R.reshape(-1)).reshape(3, 4))


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 10_000), n_rewards=st.integers(1, 3), n_lam=st.integers(1, 4))
def test_eq11_is_the_sum_over_granularities_and_rewards(seed, n_rewards, n_lam):
    R = torch.randn(n_rewards, n_lam, 5, 8, generator=torch.Generator().manual_seed(seed))
    A = advantage.mixed_advantage(R, adv_clip=1e9)
    want = sum(advantage.group_advantage(R[r, l]) for r in range(n_rewards) for l in range(n_lam))
    assert A.shape == (5, 8) and torch.allclose(A, want, atol=1e-5)
    w = torch.rand(n_rewards, generator=torch.Generator().manual_seed(seed + 1))
    Aw = advantage.mixed_advantage(R, weights=w, adv_clip=1e9)
    want_w = sum(w[r] * advantage.group_advantage(R[r, l]) for r in range(n_rewards) for l in range(n_lam))
    assert torch.allclose(Aw, want_w, atol=1e-5)


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 10_000), clip=st.floats(0.1, 3))
def test_clipping_bounds(seed, clip):
    R = torch.randn(2, 3, 4, 12, generator=torch.Generator().manual_seed(seed)) ** 3
    A = advantage.mixed_advantage(R, adv_clip=clip)
    free = advantage.mixed_advantage(R, adv_clip=1e9)
    assert A.abs().max() <= clip
    assert torch.equal(A, free.clamp(-clip, clip))


def test_bad_shapes():
    with pytest.raises(ValueError, match="G >= 2"):
        advantage.group_advantage(torch.ones(3, 1))
    with pytest.raises(ValueError, match="n_rewards"):
        advantage.mixed_advantage(torch.ones(4, 12))
    with pytest.raises(ValueError, match="weight"):
        advantage.mixed_advantage(torch.randn(2, 1, 4), weights=[1.0])


@settings(max_examples=50, deadline=None)
@given(st.integers(2, 6), st.lists(st.floats(0.1, 3), min_size=3, max_size=3))
def test_lambda_weights_weigh_each_granularity(G, w):
    """--lambda-weights (an ablation): sum_lam w_lam A^lam; all ones is Eq. 11's plain sum."""
    R = torch.randn(2, 3, 4, G, generator=torch.Generator().manual_seed(G))
    plain = advantage.mixed_advantage(R, adv_clip=1e9)
    assert torch.equal(advantage.mixed_advantage(R, adv_clip=1e9, lambda_weights=[1.0, 1.0, 1.0]), plain)
    per_lam = [advantage.mixed_advantage(R[:, i:i + 1], adv_clip=1e9) for i in range(3)]
    want = sum(wi * a for wi, a in zip(w, per_lam))
    torch.testing.assert_close(advantage.mixed_advantage(R, adv_clip=1e9, lambda_weights=w), want)
    with pytest.raises(ValueError, match="one weight per granularity"):
        advantage.mixed_advantage(R, lambda_weights=[1.0, 2.0])

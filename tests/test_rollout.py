"""Singular Stochastic Sampling and Eq. 10 (rollout.py)."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import rollout
import sde


class CountingVelocity:
    """A velocity field that records every call it receives (x-dependent, t-dependent)."""

    def __init__(self):
        self.calls, self.evals, self.batches = 0, 0, []

    def __call__(self, x, t):
        self.calls += 1
        self.evals += x.shape[0]
        self.batches.append(x.shape[0])
        return torch.tanh(x) * 0.5 - x * t.reshape(-1, 1, 1) + 0.1


def run(T=8, M=(0, 1, 2, 3), G=4, Lambda=(1, 2, 3), eta=0.7, fine_first=False, seed=0):
    v = CountingVelocity()
    x_T = torch.randn(1, 3, 5, generator=torch.Generator().manual_seed(seed))
    out = rollout.singular_rollout(v, x_T, sde.sigma_grid(T), list(M), G, Lambda, eta=eta,
                                   fine_first=fine_first, generator=torch.Generator().manual_seed(seed + 1))
    return out, v


def test_branches_share_x_k_and_differ_after_the_sde_step():
    out, _ = run()
    for grp in out.groups:
        assert torch.equal(grp.x_k, out.anchor[grp.k : grp.k + 1])  # the anchor's own x_k, bit for bit
        assert grp.x_next.shape[0] == 4 and grp.log_prob.shape == (4,)
        for i in range(4):
            for j in range(i):
                assert not torch.equal(grp.x_next[i], grp.x_next[j])
                for lam, img in grp.images.items():
                    assert not torch.equal(img[i], img[j])


def test_eta_zero_gives_one_image_per_granularity_and_lam1_is_the_anchor():
    out, _ = run(eta=0.0)
    for grp in out.groups:
        for lam, img in grp.images.items():
            assert torch.equal(img, img[:1].expand_as(img))
        # lambda = 1 with no noise retraces the anchor trajectory exactly
        assert torch.allclose(grp.images[1][0], out.anchor[-1], atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(T=st.integers(2, 12), G=st.integers(2, 5), fine_first=st.booleans(), data=st.data())
def test_counted_evaluations_are_real_and_predicted(T, G, fine_first, data):
    M = sorted(data.draw(st.sets(st.integers(0, T - 1), min_size=1, max_size=T)))
    Lambda = sorted(data.draw(st.sets(st.integers(1, 4), min_size=1, max_size=3)))
    out, v = run(T, M, G, Lambda, fine_first=fine_first)
    assert (out.calls, out.evals) == (v.calls, v.evals)
    assert (out.calls, out.evals) == rollout.predicted_evaluations(T, M, G, Lambda, fine_first)


def test_sde_step_costs_no_model_evaluation():
    """With a single granularity and the SDE step on the last grid interval, nothing follows the
    SDE step, so any evaluation beyond the T anchor calls would be the SDE step's."""
    out, v = run(T=6, M=(5,), Lambda=(1,))
    assert v.calls == 6 and v.evals == 6 and out.groups[0].images[1].shape[0] == 4


def test_branches_of_a_step_are_batched_and_shared_prefixes_computed_once():
    out, v = run(T=8, M=(0,), G=4, Lambda=(1, 2, 3))
    # anchor: 8 batch-1 calls; then depth 0 evaluates x_1 once for all lams (G), depth 1 has three
    # distinct nodes (lam 1, 2, 3) in ONE call of 3G, ...
    assert v.batches[:8] == [1] * 8
    assert v.batches[8] == 4 and v.batches[9] == 12
    assert len(v.batches) == 8 + 7  # one call per depth of the longest (lam = 1) path


# ---- Eq. 10 -----------------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(T=st.integers(1, 40), data=st.data(), lam=st.integers(1, 6), fine_first=st.booleans())
def test_strided_grid_properties(T, data, lam, fine_first):
    k = data.draw(st.integers(0, T - 1))
    g = rollout.strided_grid(T, k, lam, fine_first)
    assert all(b > a for a, b in zip(g, g[1:]))  # strictly decreasing sigmas
    assert g[0] == k + 1 and g[-1] == T  # right after the SDE step, ends at t = 0
    n = T - k - 1
    steps = (1 + math.ceil((n - 1) / lam) if n else 0) if fine_first else math.ceil(n / lam)
    assert len(g) == steps + 1
    # every step but the last has stride lam (after the one fine step of the fine_first variant)
    gaps = [b - a for a, b in zip(g, g[1:])]
    body = gaps[1:-1] if fine_first else gaps[:-1]
    assert all(d == lam for d in body) and all(d <= lam for d in gaps)
    if lam == 1:
        assert g == list(range(k + 1, T + 1))


def test_strided_grid_example_and_final_x0_prediction():
    assert rollout.strided_grid(16, 0, 3) == [1, 4, 7, 10, 13, 16]
    assert rollout.strided_grid(16, 1, 3) == [2, 5, 8, 11, 14, 16]  # last step 14 -> 16 is x0-pred
    assert rollout.strided_grid(16, 1, 3, fine_first=True) == [2, 3, 6, 9, 12, 15, 16]
    # the image of a granularity whose grid misses t = 0 is x - t v at its last strided point
    out, v = run(T=8, M=(1,), G=2, Lambda=(3,), eta=0.0)
    s = out.sigmas
    x = out.groups[0].x_next
    for a, b in zip([2, 5], [5, 8]):
        x = sde.ode_step(x, v(x, s[a].repeat(2).float()), s[a], s[b])
    assert torch.allclose(out.groups[0].images[3], x, atol=1e-6)


def test_paper_cost_formula_and_our_counts():
    total, overhead = rollout.paper_cost(range(9, 17), (1, 2, 3))
    assert total == 179 and round(100 * overhead, 1) == 44.1  # the paper prints 184 / 45.7 %
    # paper setting: T = 16, M = first 8 grid steps, G = 12
    assert rollout.predicted_evaluations(16, range(8), 12, (1, 2)) == (108, 1600)
    assert rollout.predicted_evaluations(16, range(8), 12, (1, 2, 3)) == (108, 1900)


@pytest.mark.parametrize("kw,msg", [(dict(G=1), "G"), (dict(Lambda=()), "Lambda"),
                                    (dict(Lambda=(0, 1)), "Lambda"), (dict(M=(8,)), "SDE steps")])
def test_bad_arguments(kw, msg):
    args = dict(T=8, M=(0,), G=2, Lambda=(1,)) | kw
    with pytest.raises(ValueError, match=msg):
        run(**args)


# ---- the baselines' sampling (trajectory_rollout) ---------------------------------------------
def test_trajectory_rollout_is_stochastic_exactly_at_its_sde_steps():
    v = CountingVelocity()
    x_T = torch.randn(1, 3, 5, generator=torch.Generator().manual_seed(0))
    T, G = 8, 4
    out = rollout.trajectory_rollout(v, x_T, sde.sigma_grid(T), G, [2, 5], eta=0.7,
                                     generator=torch.Generator().manual_seed(1))
    assert (v.calls, v.evals) == (out.calls, out.evals) == (T, T * (G + 1))
    assert [g.k for g in out.groups] == [2, 5]
    g2, g5 = out.groups
    assert torch.equal(g2.x_k, g2.x_k[:1].expand_as(g2.x_k))  # ODE before step 2: branches identical
    assert not torch.equal(g2.x_next[0], g2.x_next[1])  # they split at the SDE step
    assert not torch.equal(g5.x_k[0], g5.x_k[1]) and g5.log_prob.shape == (G,)
    assert torch.equal(g2.images[1], g5.images[1]) and g2.images[1].shape == (G, 3, 5)  # one image per trajectory
    # row 0 is the pure ODE anchor: the same as singular_rollout's
    ref = rollout.singular_rollout(CountingVelocity(), x_T, sde.sigma_grid(T), [0], 2, (1,))
    assert torch.allclose(out.anchor, ref.anchor, atol=1e-6)
    # no SDE step at all: every trajectory is the anchor
    det = rollout.trajectory_rollout(CountingVelocity(), x_T, sde.sigma_grid(T), G, [])
    assert not det.groups and det.anchor.shape == (T + 1, 3, 5)

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
    steps = (1 + (n - 1) // lam if n else 0) if fine_first else math.ceil(n / lam)
    assert len(g) == steps + 1
    # every step but the last has stride lam (after the one fine step of the fine_first variant);
    # the last is shorter (ours) or up to 2 lam - 1 long (the reference's x0-prediction)
    gaps = [b - a for a, b in zip(g, g[1:])]
    body = gaps[1:-1] if fine_first else gaps[:-1]
    assert all(d == lam for d in body) and all(d <= (2 * lam - 1 if fine_first else lam) for d in gaps)
    if lam == 1:
        assert g == list(range(k + 1, T + 1))


def test_strided_grid_example_and_final_x0_prediction():
    assert rollout.strided_grid(16, 0, 3) == [1, 4, 7, 10, 13, 16]
    assert rollout.strided_grid(16, 1, 3) == [2, 5, 8, 11, 14, 16]  # last step 14 -> 16 is x0-pred
    assert rollout.strided_grid(16, 1, 3, fine_first=True) == [2, 3, 6, 9, 12, 16]  # 15 is never visited
    # the image of a granularity whose grid misses t = 0 is x - t v at its last strided point
    out, v = run(T=8, M=(1,), G=2, Lambda=(3,), eta=0.0)
    s = out.sigmas
    x = out.groups[0].x_next
    for a, b in zip([2, 5], [5, 8]):
        x = sde.ode_step(x, v(x, s[a].repeat(2).float()), s[a], s[b])
    assert torch.allclose(out.groups[0].images[3], x, atol=1e-6)


def reference_grid(T, k, lam):
    """The reference code's loop, restated: the list cat(sigmas[:k+2], sigmas[k+2::lam]) as grid indices;
    the ODE loop visits its indices k+1 .. len-2 and the image is the x0-prediction (a step to t = 0)
    at the last one visited."""
    lst = list(range(k + 2)) + list(range(k + 2, T + 1, lam))
    visited = [lst[i] for i in range(k + 1, len(lst) - 1)]
    return visited + [T]


def test_fine_first_is_the_reference_grid_for_every_k_and_lambda():
    T = 16
    previous = lambda k, lam: sorted({k + 1} | set(range(k + 2, T, lam)) | {T})  # this variant until 2026-11
    differ = 0
    for lam in (1, 2, 3, 4):
        for k in range(T - 1):  # k = T - 1: the SDE step lands on t = 0, no ODE step (the reference has none)
            assert rollout.strided_grid(T, k, lam, fine_first=True) == reference_grid(T, k, lam), (k, lam)
            differ += previous(k, lam) != reference_grid(T, k, lam)
        assert rollout.strided_grid(T, T - 1, lam, fine_first=True) == [T]
    assert differ == sum((T - k - 2) % lam != 0 for lam in (1, 2, 3, 4) for k in range(T - 1)) == 28
    # ODE steps per branch summed over M = {0..7}: the reference's 48 (lambda 2) and 33 (lambda 3)
    per_branch = lambda lam, ff: sum(len(rollout.strided_grid(T, k, lam, ff)) - 1 for k in range(8))
    assert (per_branch(2, True), per_branch(3, True)) == (48, 33)
    previous_steps = lambda lam: sum(len(previous(k, lam)) - 1 for k in range(8))
    assert (previous_steps(2), previous_steps(3)) == (52, 39)


def test_paper_cost_formula_and_our_counts():
    total, overhead = rollout.paper_cost(range(9, 17), (1, 2, 3))
    assert total == 179 and round(100 * overhead, 1) == 44.1  # the paper prints 184 / 45.7 %
    # paper setting: T = 16, M = first 8 grid steps, G = 12
    assert rollout.predicted_evaluations(16, range(8), 12, (1, 2)) == (108, 1600)
    assert rollout.predicted_evaluations(16, range(8), 12, (1, 2, 3)) == (108, 1900)
    # the default grid's closed form: sum over lam of ceil((T - k - 1) / lam), the first step shared
    for T, M, G, Lambda in ((16, range(8), 12, (1, 2, 3)), (8, (0, 3, 7), 5, (2, 3)), (5, (4,), 3, (1,))):
        evals = T + G * sum(1 + sum(math.ceil((T - k - 1) / lam) - 1 for lam in Lambda) for k in M if T - k - 1)
        assert rollout.predicted_evaluations(T, M, G, Lambda)[1] == evals


@pytest.mark.parametrize("kw,msg", [(dict(G=1), "G"), (dict(Lambda=()), "Lambda"),
                                    (dict(Lambda=(0, 1)), "Lambda"), (dict(M=(8,)), "SDE steps")])
def test_bad_arguments(kw, msg):
    args = dict(T=8, M=(0,), G=2, Lambda=(1,)) | kw
    with pytest.raises(ValueError, match=msg):
        run(**args)


# ---- the readable path, stacking for the rewards, re-scoring under the current policy --------
@settings(max_examples=25, deadline=None)
@given(T=st.integers(2, 10), G=st.integers(2, 4), fine_first=st.booleans(), data=st.data())
def test_plain_per_lambda_path_gives_the_same_images_as_the_batched_one(T, G, fine_first, data):
    """Eq. 10 as written (ode_path per granularity) == the shared, batched continuation, bit for bit
    (the velocity is row-wise, so batching cannot change a number); the batched one calls less."""
    M = sorted(data.draw(st.sets(st.integers(0, T - 1), min_size=1, max_size=T)))
    Lambda = tuple(data.draw(st.lists(st.integers(1, 4), min_size=1, max_size=3, unique=True)))
    x_T = torch.randn(1, 3, 5, generator=torch.Generator().manual_seed(T))
    outs = [rollout.singular_rollout(CountingVelocity(), x_T, sde.sigma_grid(T), M, G, Lambda, fine_first=fine_first,
                                     generator=torch.Generator().manual_seed(1), batched=b) for b in (True, False)]
    for ga, gb in zip(outs[0].groups, outs[1].groups):
        assert torch.equal(ga.x_next, gb.x_next) and torch.equal(ga.log_prob, gb.log_prob)
        for lam in Lambda:
            assert torch.equal(ga.images[lam], gb.images[lam]), (ga.k, lam)
    assert outs[0].evals <= outs[1].evals and outs[0].calls <= outs[1].calls


def test_plain_path_is_eq_10_step_by_step():
    """ode_path visits exactly the strided grid: one Euler step (Eq. 1) per pair of points."""
    T, k, lam = 8, 1, 3
    path = rollout.strided_grid(T, k, lam)
    sigmas, v = sde.sigma_grid(T), CountingVelocity()
    x = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(0))
    y = x.clone()
    for i, j in zip(path[:-1], path[1:]):
        y = y + CountingVelocity()(y, sigmas[i].repeat(2).float()) * float(sigmas[j] - sigmas[i])
    assert torch.allclose(rollout.ode_path(v, x, sigmas, path), y, atol=1e-6) and v.calls == len(path) - 1


def test_stack_images_is_the_layout_of_mixed_advantage():
    out, _ = run(M=(0, 2, 5), G=4, Lambda=(3, 1))
    imgs = rollout.stack_images(out)
    assert imgs.shape == (2, 3, 4, 3, 5)  # (|Lambda|, |M|, G, ...)
    for j, lam in enumerate((3, 1)):
        for m, grp in enumerate(out.groups):
            assert torch.equal(imgs[j, m], grp.images[lam])


def test_rescore_is_one_evaluation_at_the_shared_x_k_and_reproduces_the_old_log_probs():
    """Under the rollout's own policy the ratio of Eq. 12 is exactly 1: rescore == stored log_prob,
    with ONE model evaluation of batch 1 per group; gradients reach the policy's parameters."""
    out, v = run(M=(0, 3), G=5)
    for grp in out.groups:
        v.batches.clear()
        assert torch.equal(rollout.rescore(v, grp, out.sigmas, 0.7), grp.log_prob) and v.batches == [1]
    w = torch.zeros(1, requires_grad=True)
    logp = rollout.rescore(lambda x, t: CountingVelocity()(x, t) + w, out.groups[0], out.sigmas, 0.7)
    logp.sum().backward()
    assert w.grad is not None and w.grad.abs().item() > 0
    other = rollout.rescore(lambda x, t: CountingVelocity()(x, t) + 0.01, out.groups[0], out.sigmas, 0.7)
    assert not torch.equal(other, out.groups[0].log_prob)  # another policy: another log-prob


@settings(max_examples=30, deadline=None)
@given(T=st.integers(2, 10), G=st.integers(2, 4), fine_first=st.booleans(), data=st.data())
def test_subset_cost_is_the_mean_over_every_subset(T, G, fine_first, data):
    """--sde-steps-per-iteration S: the expected cost is exactly the mean over the S-subsets of M."""
    import itertools
    from fractions import Fraction
    M = sorted(data.draw(st.sets(st.integers(0, T - 1), min_size=1, max_size=T)))
    Lambda = sorted(data.draw(st.sets(st.integers(1, 3), min_size=1, max_size=3)))
    S = data.draw(st.integers(1, len(M)))
    subsets = list(itertools.combinations(M, S))
    mean = [sum(Fraction(rollout.predicted_evaluations(T, list(c), G, Lambda, fine_first)[i]) for c in subsets)
            / len(subsets) for i in (0, 1)]
    got = rollout.subset_evaluations(T, M, G, Lambda, S, fine_first)
    assert got == pytest.approx([float(m) for m in mean], rel=1e-12)


def test_a_random_subset_of_m_is_rolled_out_and_counted():
    """train.G2RPO with --sde-steps-per-iteration 2: each prompt's rollout covers 2 distinct steps of M drawn from
    its generator, and the evaluations counted at the model are the closed form's for that subset."""
    import train
    a = train.parse_args(["--T", "8", "--G", "3", "--sde-steps", "0", "2", "4", "6", "--sde-steps-per-iteration", "2"])
    plan = train.make_plan(a, sde.sigma_grid(a.T))
    seen = set()
    for seed in range(12):
        v = CountingVelocity()
        ro = plan.rollout(v, torch.randn(1, 3, 5), 0, torch.Generator().manual_seed(seed))
        ks = [g.k for g in ro.groups]
        assert len(ks) == 2 == len(set(ks)) and set(ks) <= {0, 2, 4, 6}
        assert (ro.calls, ro.evals) == (v.calls, v.evals) == rollout.predicted_evaluations(8, ks, 3, a.Lambda)
        seen.add(tuple(ks))
    assert len(seen) > 3  # the subset changes with the generator
    assert plan.evals == rollout.subset_evaluations(8, [0, 2, 4, 6], 3, a.Lambda, 2)[1] < \
        rollout.predicted_evaluations(8, [0, 2, 4, 6], 3, a.Lambda)[1]

"""The trajectory-level baselines (baselines/grpo.py): their sampling, their step plans, their presets."""
import pytest
import torch

import rollout
import sde
import train
from launch import arguments
from baselines import grpo
from test_rollout import CountingVelocity


def test_trajectory_rollout_is_stochastic_exactly_at_its_sde_steps():
    v = CountingVelocity()
    x_T = torch.randn(1, 3, 5, generator=torch.Generator().manual_seed(0))
    T, G = 8, 4
    out = grpo.trajectory_rollout(v, x_T, sde.sigma_grid(T), G, [2, 5], eta=0.7,
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
    det = grpo.trajectory_rollout(CountingVelocity(), x_T, sde.sigma_grid(T), G, [])
    assert not det.groups and det.anchor.shape == (T + 1, 3, 5)


@pytest.mark.parametrize("algo", ["dancegrpo", "flowgrpo", "mixgrpo"])
def test_each_baseline_plans_its_own_stochastic_and_trained_steps(algo):
    a = train.parse_args(["--algo", algo, "--T", "8", "--window", "3", "--window-shift-every", "10"])
    arguments.check_args(a)
    g = torch.Generator().manual_seed(0)
    plan = lambda it: grpo.step_plan(algo, it, 8, g, a.train_fraction, a.window, a.window_shift_every)
    sde_steps, trained = plan(0)
    if algo == "flowgrpo":
        assert sde_steps == trained == list(range(8)) and a.schedule == "flowgrpo" and a.eta == 0.7
    elif algo == "dancegrpo":
        assert sde_steps == list(range(8)) and a.schedule == "constant" and a.eta == 0.3
        assert len(trained) == round(0.6 * 8) and set(trained) <= set(sde_steps)
        assert trained != plan(0)[1] or trained != plan(0)[1]  # a random subset, drawn anew
    else:  # a window of 3 that moves one step later every 10 iterations
        assert sde_steps == trained == [0, 1, 2]
        assert plan(10)[0] == [1, 2, 3] and plan(59)[0] == [5, 6, 7]
    assert a.Lambda == (1,)


def test_g2rpo_plans_every_k_of_M_and_no_mgai_is_lambda_one():
    a = train.parse_args(["--T", "8"])
    plan = train.make_plan(a, sde.sigma_grid(8))
    assert plan.M == [0, 1, 2, 3] and plan.Lambda == (1, 2, 3)
    assert (plan.calls, plan.evals) == rollout.predicted_evaluations(8, [0, 1, 2, 3], a.G, (1, 2, 3))
    assert train.parse_args(["--algo", "g2rpo-no-mgai"]).Lambda == (1,)


def test_the_plan_object_gives_what_train_scores():
    """TrajectoryGRPO: its groups are the trained steps, and the G final images are scored once."""
    a = train.parse_args(["--algo", "dancegrpo", "--T", "6", "--G", "3"])
    plan = train.make_plan(a, sde.sigma_grid(6))
    x_T = torch.randn(1, 3, 5, generator=torch.Generator().manual_seed(0))
    ro = plan.rollout(CountingVelocity(), x_T, 0, torch.Generator().manual_seed(1))
    assert len(ro.groups) == round(0.6 * 6) and plan.images(ro).shape == (1, 1, 3, 3, 5)
    assert (plan.calls, plan.evals) == (ro.calls, ro.evals) == (6, 6 * 4)


def test_rescore_scores_the_baselines_own_states():
    """A baseline group's x_k holds G different states: rescore evaluates each and, with the rollout's
    velocity, reproduces the stored log-probabilities exactly."""
    v, T, G = CountingVelocity(), 6, 3
    x_T = torch.randn(1, 3, 5, generator=torch.Generator().manual_seed(0))
    ro = grpo.trajectory_rollout(v, x_T, sde.sigma_grid(T), G, [1, 3], generator=torch.Generator().manual_seed(2))
    for grp in ro.groups:
        n = v.evals
        assert torch.equal(rollout.rescore(v, grp, ro.sigmas, 0.7), grp.log_prob) and v.evals - n == G


def test_one_step_trajectory_has_finite_log_probs():
    """T = 1: the only SDE step runs from t = 1 to t = 0; its std is eta (the reference's t = 1 rule), not 0."""
    x_T = torch.randn(1, 3, 5, generator=torch.Generator().manual_seed(0))
    ro = grpo.trajectory_rollout(CountingVelocity(), x_T, sde.sigma_grid(1), 3, [0], eta=0.7,
                                 generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(ro.groups[0].log_prob).all() and torch.isfinite(ro.groups[0].images[1]).all()

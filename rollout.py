"""Singular Stochastic Sampling (Sec. 3.2) with the strided ODE schedules of Eq. 10 (Sec. 3.3).

For one prompt and one shared initial noise x_T:
  1. one deterministic anchor trajectory (Eq. 1) over the whole grid, keeping its velocities;
  2. for each SDE step k in M: G directions from the shared x_k in ONE Euler-Maruyama step
     (Eq. 3), reusing the anchor's velocity at x_k, so the SDE step costs no model evaluation;
  3. each branch continued to a clean image by ODE at every granularity lambda in Lambda, on
     the strided grid of Eq. 10. A velocity that several granularities need (same branch, same
     grid prefix, hence the same state) is evaluated once; all nodes of one depth, across
     branches and granularities, go to the model in ONE batched call (per-sample t).

    code        paper
    ----        -----
    k           SDE step; grid index 0..T-1 (the paper counts down: k_paper = T - k)
    M           the SDE steps trained on (default: the first T/2 grid indices, paper {16..9})
    G           group size (branches per k)
    Lambda, lam granularities Lambda and lambda
    x_k         x_k, shared by the G branches
    x_next      {x^i_{k-1}}, the G states after the SDE step
    images      x^{i,j}_{0<-k}, per granularity

Grid convention (Eq. 10): after the SDE step lands on grid index j = k + 1, the ODE steps start at
j, j + lam, j + 2 lam, ... (Eq. 10's S = {1, 1 + lam, ...} counted from the SDE step) and each goes
to the next such point, or to t = 0 if that comes first. The last step may therefore be shorter,
and it equals the x0-prediction x - t v at the last strided point (the reference code's ending).
Number of ODE steps: ceil((T - k - 1) / lam); lam = 1 is the full grid. `fine_first=True` gives
the reference code's grid exactly (one fine step to j + 1, then every lam-th point, a last strided
point short of t = 0 dropped for the x0-prediction before it): 1 + floor((T - k - 2) / lam) steps.

Training needs two more steps, both here so that this file holds the whole algorithm:
  stack_images  the rollout's clean latents in the (|Lambda|, |M|, G, ...) layout of Eqs. 8 and 11;
  rescore       log p_theta(x^i_{k-1} | x_k, c) of a group under the CURRENT policy, with gradients:
                one model evaluation at the shared x_k serves the G branches (Eq. 12's ratio).

v(x, t) is any velocity function: x (B, ...), t (B,) -> (B, ...). Conditioning is closed over.
"""
from dataclasses import dataclass, field
from typing import Protocol

import torch

try:  # copied into a package folder
    from .sde import ode_step, sde_step
except ImportError:  # flat files on sys.path (this repository)
    from sde import ode_step, sde_step


def strided_grid(T: int, k: int, lam: int, fine_first: bool = False) -> list:
    """Grid indices visited after the SDE step k -> k + 1: strictly increasing, from k + 1 to T.

    fine_first=False (ours): k + 1, k + 1 + lam, ... while < T, then T.
    fine_first=True (the reference code's list cat(sigmas[:k+2], sigmas[k+2::lam])): k + 1, then
        k + 2, k + 2 + lam, ... <= T; the loop stops at the list's second-to-last point and takes
        the x0-prediction there (= one Euler step to t = 0), so the last point is replaced by T:
        when it is T nothing changes, when it is < T it is never visited.
    """
    if not 0 <= k < T:
        raise ValueError(f"SDE step k={k} must be a grid index in [0, {T - 1}] for T={T}")
    if lam < 1:
        raise ValueError(f"granularity lambda must be an integer >= 1, got {lam}")
    j = k + 1
    if not fine_first:
        return list(range(j, T, lam)) + [T]
    ref = [j] + list(range(j + 1, T + 1, lam))
    return ref[:-1] + [T] if len(ref) > 1 else [T]


def default_sde_steps(T: int) -> list:
    """The paper's M: the first (noisiest) half of the grid, k = 0 .. T/2 - 1."""
    return list(range(T // 2))


@dataclass
class Group:
    """One SDE step k of one prompt."""
    k: int
    x_k: torch.Tensor  # (1, ...) shared state
    x_next: torch.Tensor  # (G, ...) states after the SDE step
    log_prob: torch.Tensor  # (G,) old log-probabilities of x_next (fp32, mean over dims)
    images: dict  # lam -> (G, ...) clean latents x_{0<-k}


@dataclass
class Rollout:
    sigmas: torch.Tensor  # (T + 1,)
    anchor: torch.Tensor  # (T + 1, ...) deterministic trajectory, anchor[T] is its image
    groups: list = field(default_factory=list)  # one Group per k in M
    calls: int = 0  # batched calls of v
    evals: int = 0  # per-sample evaluations (sum of batch sizes)


class Plan(Protocol):
    """What train.py needs of a sampling plan: one prompt's rollout (Algorithm 1, lines 6-20), which of its steps
    are trained (lines 24-26), what to score, and what it costs. G2RPO's plan is train.G2RPO (singular_rollout at
    every k in M); the trajectory-level baselines' is baselines.grpo.TrajectoryGRPO. A plan is built from the
    settings it uses, and is the same object for the whole run."""

    Lambda: tuple  # the granularities whose rewards are logged per image set ((1,) for a trajectory baseline)
    calls: float  # batched model calls of one prompt's rollout (expected, when steps are drawn at random)
    evals: float  # model evaluations (rows through the transformer) of one prompt's rollout (expected)
    images_per_prompt: int  # images decoded and scored per prompt
    train_passes: str  # the update's forward/backward passes per prompt, in words (the start-up line)

    def rollout(self, v, x_T, it: int, generator) -> "Rollout":
        """One prompt's rollout from its x_T (1, ...) under the velocity v(x, t), at iteration `it`, drawing its noise
        from `generator`; its groups are the steps to train, each holding x_k, the G next states, their log-probs."""

    def images(self, ro: "Rollout") -> torch.Tensor:
        """The final latents to decode and score, (|Lambda|, K, G, ...): K = the trained steps, or 1 when every
        trained step shares the same G images."""


@torch.no_grad()
def singular_rollout(v, x_T, sigmas, M, G, Lambda=(1, 2, 3), eta=0.7, schedule="flowgrpo",
                     fine_first=False, generator=None, batched=True) -> Rollout:
    """Algorithm 1, lines 7-19, for one prompt. x_T: (1, ...) shared initial noise.
    batched=False continues each granularity on its own (ode_path, Eq. 10 as written); the default
    shares and batches the same evaluations (_continue_batched). Both give the same images."""
    T = len(sigmas) - 1
    _check(T, M, G, Lambda)
    out = Rollout(sigmas=sigmas, anchor=None)

    def call(x, t):  # every model evaluation goes through here and is counted
        out.calls, out.evals = out.calls + 1, out.evals + x.shape[0]
        return v(x, t.to(x.device, torch.promote_types(x.dtype, torch.float32)))

    # 1. anchor trajectory (Eq. 1)
    xs, vs = [x_T], []
    for i in range(T):
        vs.append(call(xs[i], sigmas[i : i + 1]))
        xs.append(ode_step(xs[i], vs[i], sigmas[i], sigmas[i + 1]))
    out.anchor = torch.cat(xs)

    for k in M:
        # 2. one SDE step (Eq. 3), G directions, shared x_k and shared velocity (no evaluation)
        x_k, v_k = xs[k], vs[k]
        rep = (G,) + (-1,) * (x_k.ndim - 1)
        x_next, logp, _, _ = sde_step(x_k.expand(rep), v_k.expand(rep), sigmas[k], sigmas[k + 1],
                                      eta, schedule, generator=generator)
        # 3. ODE continuations to t = 0 on the strided grid of every granularity (Eq. 10)
        paths = {lam: strided_grid(T, k, lam, fine_first) for lam in Lambda}
        if batched:
            images = _continue_batched(call, x_next, sigmas, paths)
        else:
            images = {lam: ode_path(call, x_next, sigmas, p) for lam, p in paths.items()}
        out.groups.append(Group(k=k, x_k=x_k, x_next=x_next, log_prob=logp, images=images))
    return out


def ode_path(v, x, sigmas, path) -> torch.Tensor:
    """Eq. 10 for one granularity, as written: x (B, ...) at grid index path[0], one ODE step (Eq. 1)
    to each next index of `path`; returns the state at path[-1] (the image when path[-1] = T)."""
    for i, j in zip(path[:-1], path[1:]):
        t = sigmas[i].repeat(x.shape[0]).to(x.device, torch.promote_types(x.dtype, torch.float32))
        x = ode_step(x, v(x, t), sigmas[i], sigmas[j])
    return x


def _continue_batched(call, x_next, sigmas, paths) -> dict:
    """ode_path for every granularity at once. A node is a grid prefix: granularities that share a
    prefix share its state, so its velocity is evaluated once; all nodes of one depth, across
    granularities, go to the model in ONE batched call (per-sample t). Returns lam -> (G, ...)."""
    G, j = x_next.shape[0], next(iter(paths.values()))[0]
    state = {(j,): x_next}  # prefix -> (G, ...)
    d = 0
    while nodes := sorted({tuple(p[: d + 1]) for p in paths.values() if len(p) > d + 1}):
        x = torch.cat([state[n] for n in nodes])  # (len(nodes) * G, ...)
        t = torch.cat([sigmas[n[-1]].repeat(G) for n in nodes])
        vel = call(x, t).split(G)
        for n, vn in zip(nodes, vel):
            for p in paths.values():
                child = tuple(p[: d + 2])
                if tuple(p[: d + 1]) == n and len(p) > d + 1 and child not in state:
                    state[child] = ode_step(state[n], vn, sigmas[n[-1]], sigmas[p[d + 1]])
        d += 1
    return {lam: state[tuple(p)] for lam, p in paths.items()}


def stack_images(ro: Rollout) -> torch.Tensor:
    """(|Lambda|, |M|, G, ...) clean latents x^{i,j}_{0<-k}: decode and score them, reshape the scores
    to (n_rewards, |Lambda|, |M|, G) and advantage.mixed_advantage gives A^{mix} (|M|, G)."""
    lams = list(ro.groups[0].images)
    return torch.stack([torch.stack([g.images[lam] for g in ro.groups]) for lam in lams])


def rescore(v, group: Group, sigmas, eta: float, schedule: str = "flowgrpo") -> torch.Tensor:
    """(G,) log p_theta(x^i_{k-1} | x_k, c) of the group's G next states under the current policy v,
    with gradients: Eq. 3 scoring the stored x_next. ONE model evaluation at the shared x_k (batch 1)
    serves all G branches; a group whose x_k holds G states (the trajectory baselines) evaluates each.
    Eq. 12's ratio is exp(rescore(...) - group.log_prob)."""
    t = sigmas[group.k]
    return _logp(group, v(group.x_k, t.float().expand(group.x_k.shape[0])), sigmas, eta, schedule)


def rescore_groups(v, groups: list, sigmas, eta: float, schedule: str = "flowgrpo") -> list:
    """rescore for several groups (several k, or several prompts when v's conditioning holds one row per
    x_k row) in ONE model call: their x_k stacked, each row at its own t. The loss is a sum over k, so one
    forward/backward over all of them gives the gradient of |M| separate ones (to float rounding), with one
    parameter gather instead of |M| under FSDP. Returns [(G,)] in the order of `groups`."""
    x = torch.cat([g.x_k for g in groups])  # (sum of rows, ...); a row per group (G per trajectory group)
    t = torch.cat([sigmas[g.k].float().expand(g.x_k.shape[0]) for g in groups])
    v_all = v(x, t).split([g.x_k.shape[0] for g in groups])
    return [_logp(g, v_k, sigmas, eta, schedule) for g, v_k in zip(groups, v_all)]


def _logp(group: Group, v_k, sigmas, eta, schedule):
    t, t_next = sigmas[group.k], sigmas[group.k + 1]
    rep = (group.x_next.shape[0],) + (-1,) * (group.x_k.ndim - 1)
    _, logp, _, _ = sde_step(group.x_k.expand(rep), v_k.expand(rep), t, t_next, eta, schedule, x_next=group.x_next)
    return logp


def predicted_evaluations(T, M, G, Lambda, fine_first=False):
    """(batched calls, per-sample evaluations) that singular_rollout makes, counted from the grids
    without a model: T for the anchor (batch 1), then per k in M one batched call per depth of the
    deepest grid, and G evaluations per distinct grid prefix (a node) that is not an image.
    fine_first=False has the closed form sum over lam of ceil((T - k - 1) / lam) steps per branch,
    the first shared by all granularities (tests/test_rollout.py checks both)."""
    calls, evals = T, T  # anchor, batch 1
    for k in M:
        paths = [strided_grid(T, k, lam, fine_first) for lam in Lambda]
        calls += max(len(p) for p in paths) - 1
        evals += G * len({tuple(p[: d + 1]) for p in paths for d in range(len(p) - 1)})
    return calls, evals


def subset_evaluations(T, M, G, Lambda, S, fine_first=False):
    """(calls, evaluations) per prompt in expectation when each iteration rolls out a uniform random subset
    of S steps of M (train.py --sde-steps-per-iteration): the anchor's T, plus S / |M| of each k's own cost
    (every k is in the subset with probability S / |M|). S = |M| gives predicted_evaluations exactly."""
    calls, evals = predicted_evaluations(T, M, G, Lambda, fine_first)
    if S == len(M):
        return calls, evals
    return T + S / len(M) * (calls - T), T + S / len(M) * (evals - T)


def paper_cost(M_paper, Lambda=(1, 2, 3)):
    """Sec. 11's formula: S_lam = sum_m floor(m / lam); returns (total, overhead of lam > 1).

    For M = {16, ..., 9} it gives 100 + 48 + 31 = 179 and 44.1 %; the paper prints 184 and 45.7 %.
    """
    S = {lam: sum(m // lam for m in M_paper) for lam in Lambda}
    total = sum(S.values())
    return total, (total - S.get(1, 0)) / total


def _check(T, M, G, Lambda):
    if G < 2:
        raise ValueError(f"group size G must be >= 2 to normalise advantages, got {G}")
    if not Lambda or any(int(l) != l or l < 1 for l in Lambda) or len(set(Lambda)) != len(Lambda):
        raise ValueError(f"Lambda must be distinct integers >= 1, got {Lambda}")
    if not M or any(not 0 <= k < T for k in M):
        raise ValueError(f"SDE steps M must be non-empty grid indices in [0, {T - 1}], got {M}")

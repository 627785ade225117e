"""The trajectory-level GRPO baselines, run in G2RPO's harness: DanceGRPO, Flow-GRPO, MixGRPO.

They sample G whole trajectories from one shared x_T (Table 4) and score one image per trajectory;
the group-normalised reward (Eq. 4) is the advantage of every trained step of that trajectory.
What is stochastic and what is trained is where they differ (G2RPO: rollout.singular_rollout):

    algo        SDE steps                              trained steps               noise sigma_t
    ----        ---------                              -------------               -------------
    flowgrpo    every step                             every step                  eta sqrt(t/(1-t)), eta 0.7
    dancegrpo   every step                             a random train_fraction     eta = 0.3 (constant)
    mixgrpo     a window of `window` steps, ODE        the window                  eta sqrt(t/(1-t))
                elsewhere; it moves one step later
                every window_shift_every iterations

The deterministic anchor rides along as row 0 of the same batched calls (T calls of G + 1), so the
logged anchor reward is comparable with G2RPO's. They reuse sde.sde_step, advantage.mixed_advantage
(with |Lambda| = 1 and the trajectory reward repeated over the trained steps: Eq. 8 per step is
then Eq. 4) and loss.g2rpo_loss; nothing of the equations is copied here.
"""
import torch

from rollout import Group, Rollout
from sde import ode_step, sde_step

ALGOS = ("dancegrpo", "flowgrpo", "mixgrpo")
PRESETS = {"dancegrpo": dict(schedule="constant", eta=0.3)}  # their papers' noise; Lambda = {1} for all
PRESETS = {algo: {"Lambda": (1,), **PRESETS.get(algo, {})} for algo in ALGOS}


def step_plan(algo: str, it: int, T: int, generator=None, train_fraction=0.6, window=4, window_shift_every=25):
    """(SDE steps, trained steps) of iteration `it`, as grid indices."""
    if algo == "mixgrpo":
        start = (it // window_shift_every) % (T - window + 1)
        return list(range(start, start + window)), list(range(start, start + window))
    steps = list(range(T))
    if algo == "dancegrpo":
        n = max(1, round(train_fraction * T))
        return steps, sorted(torch.randperm(T, generator=generator, device=generator.device)[:n].tolist())
    if algo == "flowgrpo":
        return steps, steps
    raise ValueError(f"unknown baseline {algo!r}; choose one of {ALGOS}")


@torch.no_grad()
def trajectory_rollout(v, x_T, sigmas, G, sde_steps, eta=0.7, schedule="flowgrpo", generator=None) -> Rollout:
    """G whole trajectories from the shared x_T (1, ...): an SDE step (Eq. 3) at every grid index in
    `sde_steps`, an ODE step (Eq. 1) elsewhere; the anchor is row 0 of every batched call. One Group
    per SDE step, whose x_k holds the G branches' own states; every group's images[1] is the same
    (G, ...) final images (one reward per trajectory, Eq. 4)."""
    T = len(sigmas) - 1
    if G < 2 or any(not 0 <= k < T for k in sde_steps):
        raise ValueError(f"need G >= 2 and SDE steps in [0, {T - 1}], got G={G}, steps={sde_steps}")
    out = Rollout(sigmas=sigmas, anchor=None, calls=T, evals=T * (G + 1))
    x = x_T.expand((G + 1,) + x_T.shape[1:])  # (G + 1, ...) row 0: anchor
    xs = [x_T]
    for i in range(T):
        vel = v(x, sigmas[i].repeat(G + 1).to(x.device, torch.promote_types(x.dtype, torch.float32)))
        x_anchor = ode_step(x[:1], vel[:1], sigmas[i], sigmas[i + 1])
        if i in sde_steps:
            x_next, logp, _, _ = sde_step(x[1:], vel[1:], sigmas[i], sigmas[i + 1], eta, schedule,
                                          generator=generator)
            out.groups.append(Group(k=i, x_k=x[1:], x_next=x_next, log_prob=logp, images={}))
        else:
            x_next = ode_step(x[1:], vel[1:], sigmas[i], sigmas[i + 1])
        xs.append(x_anchor)
        x = torch.cat([x_anchor, x_next])
    for grp in out.groups:
        grp.images[1] = x[1:]
    out.anchor = torch.cat(xs)
    return out


class TrajectoryGRPO:
    """A baseline's sampling plan (rollout.Plan): rollout() gives a Rollout whose groups are this iteration's trained
    steps (step_plan), images() the G final images, scored once for every trained step."""

    def __init__(self, algo: str, sigmas, G: int, eta: float, schedule: str, train_fraction: float = 0.6,
                 window: int = 4, window_shift_every: int = 25):
        self.algo, self.sigmas, self.T, self.G, self.eta, self.schedule = algo, sigmas, len(sigmas) - 1, G, eta, schedule
        self.train_fraction, self.window, self.window_shift_every = train_fraction, window, window_shift_every
        self.Lambda = (1,)
        self.calls, self.evals = self.T, self.T * (G + 1)  # per prompt: T batched calls of G + 1
        n_trained = {"flowgrpo": self.T, "dancegrpo": max(1, round(train_fraction * self.T)), "mixgrpo": window}[algo]
        self.images_per_prompt, self.train_passes = G, f"{n_trained} forward/backward of batch {G}"

    def rollout(self, v, x_T, it: int, generator) -> Rollout:
        sde_steps, trained = step_plan(self.algo, it, self.T, generator, self.train_fraction, self.window,
                                       self.window_shift_every)
        ro = trajectory_rollout(v, x_T, self.sigmas, self.G, sde_steps, self.eta, self.schedule, generator=generator)
        ro.groups = [g for g in ro.groups if g.k in trained]
        return ro

    def images(self, ro: Rollout) -> torch.Tensor:
        """(1, 1, G, ...): the G final images, scored once and shared by every trained step."""
        return ro.groups[0].images[1][None, None]

"""A reward-hacking guard: probe the policy on held-out prompts with the trained reward AND rewards it is not
trained on, keep the best model by a named criterion, and stop (or warn) when the others fall.

Why: the trained reward can keep rising while the images degrade (the paper's Table 1: CLIP falls when
training on HPS; on the small world toy-clean collapses after ~100 iterations while toy-adherence holds).
A probe is deterministic: the same prompts and seeds, ODE-sampled (Eq. 1), every --probe-every iterations,
so the numbers of two probes differ only by the policy.

    probe p          the mean reward of each reward model over the probe images, after p iterations
    start            the first probe (iteration 0: the base model)
    reference        what a fall is measured against: the reward's peak so far (default), or its start
    tolerance X      a reward not trained on is "held" while it is >= its reference - X
    criterion        best = the highest trained-reward probe among the probes where every other reward is held

Why the peak by default: on the small world the rewards not trained on first RISE with the trained one, then
collapse; measured against the start, the collapse stays "within tolerance" long after it began (a 150-
iteration run kept iteration 140, whose toy-clean had fallen from 0.245 to 0.086 on the probe set, 0.078 in
the evaluation). The peak is never below the start, so it catches every fall the start does, and a lucky
high probe can raise false alarms: keep the probe set large enough that its noise is below X.
    patience P       stop after P probes in a row without a new best (0: never)

The guard is pure bookkeeping (no tensors, no ranks): train.py feeds it each probe's means, and replays the
probes of probes.jsonl after a --resume, so a resumed run reaches the same decisions as a straight one.
"""
import math
from dataclasses import dataclass, field

CRITERION = "highest trained-reward probe with every other probe reward >= its reference - tolerance"


@dataclass
class Verdict:
    """What one probe means for the run."""
    held: bool  # every reward not trained on is >= its reference - tolerance
    fallen: dict  # reward -> how far below its reference (only those beyond the tolerance)
    best: bool  # a new best by the criterion (iteration 0 included: the base model is the first candidate)
    stale: int  # probes in a row without a new best
    stop: str  # why the run should stop ('' to go on)
    best_iteration: int  # the best probe so far
    start: dict  # the first probe's means
    reference: dict  # what "fallen" was measured against at this probe (the peak of the earlier probes, or start)


@dataclass
class Guard:
    trained: list  # names of the trained rewards (their sum is the criterion's score)
    others: list  # names of the rewards not trained on
    tolerance: float = 0.05
    patience: int = 0
    stop_on_fall: bool = False  # stop when a reward not trained on falls beyond the tolerance (else: warn)
    against: str = "peak"  # "peak": the best value of each reward so far; "start": the first probe
    start: dict = field(default_factory=dict)
    peak: dict = field(default_factory=dict)
    best_score: float = float("-inf")
    best_iteration: int = -1
    stale: int = 0

    def update(self, iteration: int, means: dict) -> Verdict:
        """Take probe `means` ({reward name: mean}) after `iteration` iterations; the first one is the start."""
        if self.against not in ("peak", "start"):
            raise ValueError(f"against must be 'peak' or 'start', got {self.against!r}")
        if not self.start:
            self.start, self.peak = dict(means), dict(means)
        ref = dict(self.peak if self.against == "peak" else self.start)
        fallen = {n: ref[n] - means[n] for n in self.others  # NaN (a diverged model) counts as fallen
                  if not means[n] >= ref[n] - self.tolerance}
        self.peak = {n: max(self.peak[n], means[n]) if math.isfinite(means[n]) else self.peak[n] for n in self.peak}
        score = sum(means[n] for n in self.trained)
        best = not fallen and math.isfinite(score) and score > self.best_score
        if best:
            self.best_score, self.best_iteration, self.stale = score, iteration, 0
        else:
            self.stale += 1
        stop = ""
        if fallen and self.stop_on_fall:
            stop = "probe rewards not trained on fell: " + ", ".join(
                f"{n} {means[n]:.4f} < {self.against} {ref[n]:.4f} - {self.tolerance}" for n in fallen)
        elif self.patience and self.stale >= self.patience:
            stop = f"{self.stale} probes without a new best ({CRITERION}; best at iteration {self.best_iteration})"
        return Verdict(not fallen, fallen, best, self.stale, stop, self.best_iteration, dict(self.start), ref)


def probe_items(prompts: list, seeds: int) -> list:
    """[(prompt, seed)]: every probe prompt with seeds 0 .. seeds-1, prompt-major (the grid's layout)."""
    return [(p, s) for p in prompts for s in range(seeds)]


def share(items: list, rank: int, world: int) -> list:
    """This rank's (index, item) pairs: a strided share, padded by repeating its last item so that every rank
    makes the same number of model calls (FSDP's collectives need it); padded entries have index None."""
    n = -(-len(items) // world)  # ceil
    mine = [(i, items[i]) for i in range(rank, len(items), world)]
    last = mine[-1][1] if mine else items[-1]
    return mine + [(None, last)] * (n - len(mine))

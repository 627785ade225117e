"""What a training run keeps around Algorithm 1's lines (train.train): the start-up line and args.json, the sample
grids, the reward-hacking guard's probes, metrics.jsonl and the progress bar, the stop of a diverged run, the
checkpoints, the export. Every rank calls each method at the same point; rank 0 writes the logs.
"""
import sys
from pathlib import Path

import torch

from tqdm import tqdm

from launch import checkpoints, run_folder
from launch.collectives import all_true, stop_if_any
from launch.export import export
from launch.metrics import start_log, write_log
from launch.probing import probe, probe_cost

DIVERGED = ("{} iterations in a row without an update (non-finite rewards, advantages or gradients): the run has "
            "diverged and nothing is exported; lower --lr, or --resume from an earlier checkpoint")


def write_samples(policy, prompts, marked, a, path, is_main) -> bool:
    """Deterministic ODE samples of fixed prompts and seeds 0, 1 (every rank runs the FSDP forwards).
    Returns whether every image is finite (on every rank): a diverged model samples NaN."""
    from report.figures import save_grid
    policy.transformer.eval()
    imgs = policy.sample([p for p in prompts for _ in range(2)], [0, 1] * len(prompts), a.T, a.shift)
    if is_main:
        save_grid(imgs, prompts, 2, path, max(1, 96 // policy.height), marked)
    policy.transformer.train()
    return all_true(bool(torch.isfinite(imgs).all()))


class Bookkeeping:
    """Around the loop of train.train; `r` is its set-up (train.Run)."""

    def __init__(self, a, r, rank: int, world: int, device):
        self.a, self.r, self.rank, self.world, self.device = a, r, rank, world, device
        self.is_main, self.out = rank == 0, Path(a.out)
        # the last sample grid: finite, at which iteration; iterations done; iterations in a row without an update
        self.ok, self.sampled_at, self.done, self.idle = True, None, r.start, 0
        self.bar = None

    def samples(self, done: int) -> bool:
        """The sample grid after `done` iterations; whether every image is finite."""
        return write_samples(self.r.policy, *self.r.grid, self.a, self.out / f"samples_{done:06d}.png",
                                  self.is_main)

    def iterations(self):
        """The iterations still to run (a progress bar on rank 0), after the start-up line, the first grid and the
        guard's first probe (the base model)."""
        a, r = self.a, self.r
        if self.is_main:
            if a.resume and r.start == 0:
                print(f"train.py: --resume: no whole checkpoint in {self.out}: starting at iteration 0", file=sys.stderr)
            start_log(a, r.plan, r.model, self.world, self.device, self.out, r.start, r.settings, r.policy)
            if r.probe:
                print(probe_cost(a, r.plan, len(r.probe.prompts), self.world))
        if r.start == 0:
            self.samples(0)
            if r.probe:
                probe(r, a, 0, self.world, self.out, self.is_main)
        self.bar = tqdm(range(r.start, a.iterations), initial=r.start, total=a.iterations, disable=not self.is_main,
                        dynamic_ncols=True)
        return self.bar

    def after(self, it: int, rec: dict) -> bool:
        """After iteration `it` and its metrics record: the guard's probe when due, the record logged, a diverged run
        stopped, a checkpoint when due. False when the guard stops the run (probe() said why)."""
        a, r, done = self.a, self.r, it + 1
        verdict = None
        if r.probe and (done % a.probe_every == 0 or done == a.iterations):
            rec["probe"], verdict = probe(r, a, done, self.world, self.out, self.is_main)
        if self.is_main:
            write_log(rec, self.out, self.bar)
        self.idle = 0 if rec["optimizer_steps"] else self.idle + 1  # the same on every rank (all_true)
        if self.idle >= a.max_skipped:
            stop_if_any(DIVERGED.format(self.idle), "train.py")
        if a.checkpoint_every and done % a.checkpoint_every == 0:
            checkpoints.save(self.out, done, r.model, r.optim, r.sampler.position, self.rank, r.settings)
            if self.is_main:
                run_folder.prune(self.out, a.keep_checkpoints)
            self.ok, self.sampled_at = self.samples(done), done
        self.done = done
        return not (verdict and verdict.stop)

    def end(self):
        """The final model's grid (a diverged model samples non-finite images, and is not exported), the export."""
        if self.sampled_at != self.done:
            self.ok = self.samples(self.done)
        if not self.ok:
            stop_if_any("the trained model samples non-finite images: the run has diverged and is not exported",
                        "train.py")
        if self.a.export:
            export(self.out / "final", self.r.model, self.r.model_dir, self.rank, bool(self.a.lora_rank))

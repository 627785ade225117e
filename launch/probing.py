"""The reward-hacking guard as a training run uses it (guard/probes.py is the bookkeeping): the probe set and
rewards, what a probe costs against the iterations between two, and the probe itself - every rank ODE-samples
and scores its share, the scores are gathered so that every rank reaches the same verdict; rank 0 logs
probes.jsonl and the probe grid, and a new best is exported to <out>/best.
"""
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from guard.probes import Guard, probe_items, share
from launch import run_folder
from launch.collectives import all_gather_objects
from launch.export import export
from rewards import load_rewards


@dataclass
class Probes:
    prompts: list  # the held-out probe prompts, each with seeds 0 .. probe_seeds - 1
    items: list  # this rank's share: (index or None for padding, (prompt, seed))
    rewards: list  # the trained rewards, then the others
    guard: Guard


def set_up_probes(a, prompts: list, rewards: list, rank: int, world: int, out: Path, start: int, device):
    """The guard's probe set (the first --probe-max-prompts) and rewards; after a --resume, the guard replays the
    probes up to `start`."""
    prompts = prompts[:a.probe_max_prompts or None]
    items = probe_items(prompts, a.probe_seeds)
    others = load_rewards(a.probe_rewards, device=device, **asdict(a.rewards)) if a.probe_rewards else []
    guard = Guard([r.name for r in rewards], [r.name for r in others], a.probe_tolerance, a.probe_patience,
                  a.probe_stop, a.probe_against)
    for rec in run_folder.probes(out, upto=start):
        guard.update(rec["iteration"], rec["rewards"])
    return Probes(prompts, share(items, rank, world), rewards + others, guard)


def probe_cost(a, plan, n_prompts: int, world: int) -> str:
    """The start-up line of the guard: what one probe costs, against the iterations between probes."""
    images = n_prompts * a.probe_seeds
    evals = math.ceil(images / world) * a.T  # per rank: its share of the ODE samples, T steps each
    between = a.probe_every * a.prompts_per_rank * plan.evals  # per rank: the rollouts between two probes
    return (f"guard: a probe every {a.probe_every} iterations = {n_prompts} prompts x {a.probe_seeds} seeds = {images} "
            f"ODE samples of {a.T} steps, {evals:,} model evaluations per rank, {100 * evals / between:.1f} % of the "
            f"{between:,.0f} of the rollouts between two probes (--probe-max-prompts, --probe-seeds, --probe-every)")


def probe(r, a, done: int, world: int, out: Path, is_main: bool):
    """Probe the policy after `done` iterations: every rank ODE-samples and scores its share, the scores are
    gathered so that every rank reaches the same verdict. Rank 0 logs probes.jsonl and the probe grid; a new
    best (after training began) is exported to out/best. Returns ({reward: mean}, the guard's verdict)."""
    from report.figures import save_grid
    t0, p = time.time(), r.probe
    prompts, seeds = [item[0] for _, item in p.items], [item[1] for _, item in p.items]
    r.model.eval()
    imgs = r.policy.sample(prompts, seeds, a.T, a.shift)  # (n, 3, H, W)
    r.model.train()
    with torch.no_grad():
        scores = torch.stack([rw.score(imgs, prompts) for rw in p.rewards]).float().cpu()  # (n_rewards, n)
    keep = [j for j, (i, _) in enumerate(p.items) if i is not None]
    pixels = (imgs[keep].nan_to_num(0).clamp(0, 1) * 255).round().byte()
    parts = all_gather_objects(([p.items[j][0] for j in keep], scores[:, keep], pixels))
    index = torch.tensor([i for part in parts for i in part[0]]).argsort()
    scores, imgs = torch.cat([part[1] for part in parts], 1)[:, index], torch.cat([part[2] for part in parts])[index]
    means = {rw.name: scores[i].mean().item() for i, rw in enumerate(p.rewards)}
    verdict = p.guard.update(done, means)
    if is_main and verdict.stop:
        print(f"train.py: the guard stops the run after iteration {done}: {verdict.stop}", file=sys.stderr)
    elif is_main and verdict.fallen:
        print(f"train.py: probe at iteration {done}: rewards not trained on fell below their {a.probe_against} - "
              f"{a.probe_tolerance}: {verdict.fallen} (the best model so far stays in {out / 'best'})", file=sys.stderr)
    if is_main:
        save_grid(imgs.float() / 255, p.prompts, a.probe_seeds, out / "probes" / f"probe_{done:06d}.png",
                  max(1, 96 // r.policy.height))
        run_folder.append_probe(out, {"iteration": done, "rewards": means, **asdict(verdict), "sec": time.time() - t0})
    if verdict.best and done > 0 and a.keep_best:
        export(out / "best", r.model, r.model_dir, dist.get_rank(), bool(a.lora_rank))
    return means, verdict

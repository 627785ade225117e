"""Equal compute on the small CPU world: can a cheaper G2RPO match the best baseline, and the ablations.

    make bench-equal                                   # everything, in the protocol's order (95 min on 2 busy cores)
    python bench/equal.py --out runs/bench-equal --stage select     # only the learning-rate selection
    python bench/equal.py --out runs/bench-equal --report           # tables from the finished runs

The protocol (bench/README.md, "Equal compute: the protocol") was committed before any of these runs.
Stages, in order; each run is one torchrun job of 2 processes from the toy base model with train.py's toy
preset, checkpointed every 5 iterations so that any budget point can be scored; a finished run is kept:
  select    every method at every learning rate of LRS, selection seed 7, to the rollout budget; the rate with
            the best in-domain adherence (train prompts) at the budget is the method's rate
  compare   every method at its rate, seeds 42, 43, 44, to the rollout budget; scored at equal iterations
            (50), equal rollout evaluations (the budget) and equal wall clock (the checkpoint at or before
            G2RPO's 50-iteration training seconds of the same seed)
  ablate    G2RPO at its selected rate, seeds 42, 43, 44, 50 iterations: eta, the step set M, weighted Eq. 11
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.algos import COLUMNS, curves, fmt, logger, scores  # noqa: E402

ITERATIONS = 50  # G2RPO's iterations; the rollout budget is what it spends in them
LRS = (3e-5, 1e-4, 3e-4)
SELECT_SEED, SEEDS = 7, (42, 43, 44)
METHODS = [  # (label, train.py flags); MixGRPO: the best baseline of bench/algos.py at equal rollout budget
    ("G2RPO", ["--algo", "g2rpo"]),
    ("G2RPO S=1", ["--algo", "g2rpo", "--sde-steps-per-iteration", "1"]),
    ("MixGRPO", ["--algo", "mixgrpo"]),
]
ABLATIONS = [  # (label, flags) on top of G2RPO; eta 0.7, M = first half and the plain sum are G2RPO itself.
    # Run in this order, each on all seeds before the next (the cheapest questions first)
    ("weighted 1.5/1/0.5", ["--lambda-weights", "1.5", "1.0", "0.5"]),
    ("eta 0.3", ["--eta", "0.3"]), ("eta 1.0", ["--eta", "1.0"]), ("eta 0.5", ["--eta", "0.5"]),
    ("M second half", ["--sde-steps", "4", "5", "6", "7"]), ("M every other", ["--sde-steps", "0", "2", "4", "6"]),
    ("M all", ["--sde-steps", *map(str, range(8))]),
]


def cost(flags) -> float:
    """Rollout model evaluations per prompt and iteration that the algorithm needs (expected, for a random
    subset of M): G2RPO's closed form with its anchor; a baseline's T G (its logged anchor is not counted)."""
    import train
    from launch import arguments
    from sde import sigma_grid
    a = train.parse_args(list(flags))
    arguments.check_args(a)
    return train.make_plan(a, sigma_grid(a.T, a.shift or 3.0)).evals if a.algo.startswith("g2rpo") else a.T * a.G


def budget(flags) -> int:
    return round(ITERATIONS * cost(["--algo", "g2rpo"]) / cost(flags))


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


def train(run: Path, flags, seed: int, lr: float, iterations: int, port: int, log):
    """Train to `iterations` (continue a run that stopped), checkpoints every 5 iterations, all kept."""
    if (run / "final").exists():
        return
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(ROOT / "train.py"), *flags, "--seed", str(seed), "--lr", str(lr), "--out", str(run),
           "--iterations", str(iterations), "--checkpoint-every", "5", "--keep-checkpoints", "1000", "--probe-every",
           "0"] + (["--resume"] if (run / "args.json").exists() else [])
    log(" ".join(cmd[4:]))
    t0 = time.time()
    with open(run.parent / f"{run.name}.log", "a") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    log(f"  {time.time() - t0:.0f} s")


def score(run: Path, it: int) -> list:
    """bench/algos.py's scores of the checkpoint after `it` iterations (cached in run/eval_<it>.json)."""
    path = run / f"eval_{it}.json"
    if not path.exists():
        import torch
        import evaluate
        from launch import eval_models
        import toy
        torch.set_num_threads(1)
        ref = eval_models.resolve_model(str(run / f"ckpt_{it:06d}"))
        policy = evaluate.load_policy(ref, evaluate.Args(), torch.device("cpu"), torch.float32, None)
        path.write_text(json.dumps(toy.reward_table(policy, n=16, T=8, seed=0), indent=1))
    return scores(json.loads(path.read_text()))


def wall_clock_point(run: Path, seconds: float) -> int:
    """The last checkpointed iteration whose training seconds (rollout + reward + update) are <= `seconds`."""
    its, _, sec = curves(run)
    ok = [int(i) for i, s in zip(its, sec) if s <= seconds and i % 5 == 0]
    return ok[-1] if ok else 0


def selected(out: Path) -> dict:
    """method -> its learning rate by the rule (best in-domain adherence at the budget, selection seed)."""
    rates = {}
    for label, flags in METHODS:
        done = {lr: score(out / f"select-{slug(label)}-lr{lr:g}", budget(flags))[0] for lr in LRS
                if (out / f"select-{slug(label)}-lr{lr:g}" / "final").exists()}
        if len(done) == len(LRS):
            rates[label] = max(done, key=done.get)
    return rates


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench-equal")
    ap.add_argument("--stage", choices=("all", "select", "compare", "ablate"), default="all")
    ap.add_argument("--report", action="store_true", help="only the tables, from finished runs")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = logger(out)

    if not args.report and args.stage in ("all", "select"):
        for i, ((label, flags), lr) in enumerate((m, lr) for m in METHODS for lr in LRS):
            run = out / f"select-{slug(label)}-lr{lr:g}"
            train(run, flags, SELECT_SEED, lr, budget(flags), 29300 + i, log)
            log(f"select {label} lr {lr:g}: {score(run, budget(flags))}")
    rates = selected(out)
    if not args.report and args.stage in ("all", "compare"):
        for i, (seed, (label, flags)) in enumerate((s, m) for s in SEEDS for m in METHODS):
            if label in rates:
                run = out / f"{slug(label)}-s{seed}"
                train(run, flags, seed, rates[label], budget(flags), 29350 + i, log)
    if not args.report and args.stage in ("all", "ablate") and "G2RPO" in rates:
        for i, ((label, flags), seed) in enumerate((m, s) for m in ABLATIONS for s in SEEDS):
            train(out / f"ablate-{slug(label)}-s{seed}", ["--algo", "g2rpo", *flags], seed, rates["G2RPO"],
                  ITERATIONS, 29400 + i, log)
    text = report(out, rates)
    (out / "results.md").write_text(text)
    print(text)


def table(rows: list) -> list:
    head = "| method | iterations | rollout evals / prompt | " + " | ".join(c[2] for c in COLUMNS) + " | seeds |"
    return [head, "|" + "---|" * (len(COLUMNS) + 4)] + rows


def report(out: Path, rates: dict) -> str:
    md = ["# Equal compute on the small world", "", "Learning rates selected (seed 7, best in-domain adherence at the "
          "rollout budget): " + ", ".join(f"{k} {v:g}" for k, v in rates.items()), ""]
    md += ["## Selection runs (seed 7, at the rollout budget)", ""] + table(
        [f"| {label} lr {lr:g} | {budget(flags)} | {cost(flags):g} | " + " | ".join(
            f"{v:.3f}" for v in score(out / f"select-{slug(label)}-lr{lr:g}", budget(flags))) + " | 1 |"
         for label, flags in METHODS for lr in LRS if (out / f"select-{slug(label)}-lr{lr:g}" / "final").exists()])
    for title, point in (("equal iterations", lambda run, flags, s: ITERATIONS),
                         ("equal rollout evaluations", lambda run, flags, s: budget(flags)),
                         ("equal wall clock", lambda run, flags, s: wall_clock_point(
                             run, curves(out / f"g2rpo-s{s}")[2][ITERATIONS - 1]))):
        rows = []
        for label, flags in METHODS:
            runs = [(out / f"{slug(label)}-s{s}", s) for s in SEEDS if (out / f"{slug(label)}-s{s}" / "final").exists()]
            if not runs or not (out / f"g2rpo-s{runs[0][1]}" / "final").exists():
                continue
            pts = [point(r, flags, s) for r, s in runs]
            vals = np.array([score(r, p) for (r, _), p in zip(runs, pts)])
            rows.append(f"| {label} | {'/'.join(map(str, pts))} | {cost(flags):g} | "
                        + " | ".join(fmt(vals[:, j]) for j in range(vals.shape[1])) + f" | {len(runs)} |")
            rows += [f"| &nbsp; seed {s} | {p} | | " + " | ".join(f"{v:.3f}" for v in row) + " | |"
                     for (_, s), p, row in zip(runs, pts, vals)]
        md += ["", f"## Seeds {', '.join(map(str, SEEDS))}: {title}", ""] + table(rows)
    rows = []
    for label, flags in [("G2RPO (eta 0.7, M first half, plain sum)", [])] + ABLATIONS:
        runs = [out / (f"g2rpo-s{s}" if not flags else f"ablate-{slug(label)}-s{s}") for s in SEEDS]
        runs = [r for r in runs if (r / "final").exists()]
        if runs:
            vals = np.array([score(r, ITERATIONS) for r in runs])
            rows.append(f"| {label} | {ITERATIONS} | {cost(['--algo', 'g2rpo', *flags]):g} | "
                        + " | ".join(fmt(vals[:, j]) for j in range(vals.shape[1])) + f" | {len(runs)} |")
    md += ["", f"## Ablations (G2RPO, {ITERATIONS} iterations, seeds {', '.join(map(str, SEEDS))})", ""] + table(rows)
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    main()

"""LoRA against full fine-tuning, and the reward-hacking guard on a long run, on the small CPU world.

    make bench-lora                                    # both parts: ~35 min on 2 cores
    python bench/lora_guard.py --out runs/bench-lora --report   # only rebuild the tables

Part 1, LoRA vs full: train.py's toy preset (50 iterations, G2RPO, 2 processes), seeds 42, 43, 44, once
with full fine-tuning (lr 1e-4, the demo) and once with --lora-rank 8 (alpha 8, lr 1e-3: ten times the
full rate, the usual ratio for adapters; not tuned here). Scores as bench/algos.py gives them (16 ODE
samples per prompt), and the peak memory per process that train.py logs (resident set on the CPU).

Part 2, the guard: seed 42 for 150 iterations at the demo's learning rate (the run that hacks toy-adherence:
toy-clean collapses), probes every 10 iterations on the held-out prompts with toy-clean and toy-shape
(the toy preset's guard, warn mode). The model the guard keeps (out/best) is scored against the final model
and the demo's (iteration 50).

A finished run is kept: interrupt and call again to continue. Results: OUT/results.md, OUT/guard.png.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.algos import COLUMNS, evaluate, fmt, run_leg, scores  # noqa: E402

ARMS = [("full fine-tuning", []), ("LoRA r8", ["--lora-rank", "8", "--lora-alpha", "8", "--lr", "1e-3"])]
GUARD_ITERATIONS = 150


def memory(run: Path) -> float:
    """Peak memory (GiB) of a process over the run, as train.py logs it."""
    return max(json.loads(l)["peak_mem_gb"] for l in (run / "metrics.jsonl").read_text().splitlines())


def trained(run: Path) -> int:
    log = (run.parent / f"{run.name}.log").read_text()
    return int(log.split("trained parameters ")[1].split()[0].replace(",", ""))


def report(out: Path, seeds) -> str:
    lines = ["## LoRA vs full fine-tuning (50 iterations, 3 seeds, mean ± std)", "",
             "| | " + " | ".join(t for _, _, t in COLUMNS) + " | trained parameters | peak memory / process |",
             "|---|" + "---|" * (len(COLUMNS) + 2)]
    base = out / "eval_base.json"
    if base.exists():
        lines.append("| base model | " + " | ".join(f"{v:.3f}" for v in scores(json.loads(base.read_text())))
                     + " | | |")
    for label, _ in ARMS:
        runs = [out / f"{label.split()[0].lower()}-s{s}" for s in seeds]
        done = [r for r in runs if (r / "eval_final_50.json").exists()]
        if done:
            vals = np.array([scores(json.loads((r / "eval_final_50.json").read_text())) for r in done])
            lines.append(f"| {label} ({len(done)} seeds) | " + " | ".join(fmt(vals[:, j]) for j in range(vals.shape[1]))
                         + f" | {trained(done[0]):,} | {np.mean([memory(r) for r in done]):.2f} GiB |")
            lines += [f"| &nbsp; seed {r.name.rsplit('-s', 1)[1]} | " + " | ".join(f"{v:.3f}" for v in row) + " | | |"
                      for r, row in zip(done, vals)]
    g = out / "guard"
    if (g / "probes.jsonl").exists():
        probes = [json.loads(l) for l in (g / "probes.jsonl").read_text().splitlines()]
        best = [p["iteration"] for p in probes if p["best"]][-1]
        lines += ["", f"## The guard: one run of {GUARD_ITERATIONS} iterations (seed 42), probes every 10", "",
                  "| iteration | " + " | ".join(probes[0]["rewards"]) + " | held | best so far |", "|---|" + "---|" * (len(probes[0]["rewards"]) + 2)]
        lines += [f"| {p['iteration']} | " + " | ".join(f"{v:.3f}" for v in p["rewards"].values())
                  + f" | {'yes' if p['held'] else 'no'} | {p['best_iteration']} |" for p in probes]
        lines += ["", f"The guard keeps iteration {best}. Scores of the kept, final and demo models:", "",
                  "| model | " + " | ".join(t for _, _, t in COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
        for name, path in ((f"kept by the guard (iteration {best})", g / "eval_best.json"),
                           (f"final (iteration {GUARD_ITERATIONS})", g / f"eval_final_{GUARD_ITERATIONS}.json"),
                           ("demo (iteration 50, full fine-tuning seed 42)", out / "full-s42" / "eval_final_50.json")):
            if path.exists():
                lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in scores(json.loads(path.read_text()))) + " |")
        recs = [json.loads(l) for l in (g / "metrics.jsonl").read_text().splitlines()]
        sec_it = np.mean([r["sec_rollout"] + r["sec_reward"] + r["sec_train"] for r in recs])
        sec_probe = np.mean([p["sec"] for p in probes])
        lines += ["", f"Probe cost: {sec_probe:.2f} s per probe against {sec_it:.2f} s per iteration: "
                  f"{100 * sec_probe / (10 * sec_it):.1f} % of the training time at one probe per 10 iterations."]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench-lora")
    ap.add_argument("--seeds", default="42,43,44")
    ap.add_argument("--report", action="store_true", help="only rebuild the tables")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    t0 = time.time()

    def log(msg):
        print(f"[+{time.time() - t0:5.0f}s] {msg}", flush=True)

    if not args.report:
        out.mkdir(parents=True, exist_ok=True)
        import toy
        evaluate(Path(toy.base_model()), out / "eval_base.json")
        for i, (s, (label, extra)) in enumerate((s, arm) for s in seeds for arm in ARMS):
            run = out / f"{label.split()[0].lower()}-s{s}"
            run.mkdir(exist_ok=True)
            run_leg(run, "g2rpo", extra, s, 50, 29500 + i, log)
            log(f"{label} seed {s}: {scores(evaluate(run / 'final_50', run / 'eval_final_50.json'))}")
        g = out / "guard"
        g.mkdir(exist_ok=True)
        run_leg(g, "g2rpo", [], 42, GUARD_ITERATIONS, 29590, log)
        evaluate(g / "best", g / "eval_best.json")
        evaluate(g / f"final_{GUARD_ITERATIONS}", g / f"eval_final_{GUARD_ITERATIONS}.json")
        log(f"done in {time.time() - t0:.0f} s")
    text = report(out, seeds)
    (out / "results.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()

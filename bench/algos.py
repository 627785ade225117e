"""G2RPO against its baselines on the small CPU world, under identical conditions.

    make bench-algos                                   # everything below: 89 min on 2 cores
    python bench/algos.py --seeds 42,43,44 --out runs/bench
    python bench/algos.py --out runs/bench --report    # only rebuild tables and plots
    python bench/algos.py --out runs/bench-lr3e-5 --lr 3e-5 --no-budget --no-ablation  # lr sensitivity

Every run starts from the same toy base model, sees the same prompt stream (same sampler seed) and
uses train.py's toy preset; a seed changes x_T and the SDE noise. Hyperparameters are fixed per
algorithm (train.PRESETS['toy'], baselines/grpo.py PRESETS) and were committed before any baseline run.

Two budgets:
  (a) the same number of iterations (--iterations, 50);
  (b) the same budget of rollout model evaluations: G2RPO's per-prompt cost times --iterations.
      Per prompt and iteration G2RPO spends rollout.predicted_evaluations (288 on the toy) and a
      baseline T * G (64: G trajectories of T steps; its logged deterministic anchor is not counted,
      which favours the baselines), so a baseline gets 4.5x the iterations.
The training forward/backward passes are not in that budget (a baseline trains on G samples per
trained step, G2RPO on one shared x_k); the wall-clock column and plot show what they cost.

Each run is one torchrun job of 2 processes, continued with --resume at the budget's iteration
(the learning rate is constant, so the first leg of a longer run IS the shorter run). A finished
leg is not re-run: interrupt and call again to continue. Results: OUT/results.md, results.json,
curves.png, ablation.png.
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

METHODS = [  # (label, --algo, extra flags)
    ("G2RPO", "g2rpo", []),
    ("G2RPO w/o MGAI", "g2rpo-no-mgai", []),
    ("DanceGRPO", "dancegrpo", []),
    ("Flow-GRPO", "flowgrpo", []),
    ("MixGRPO", "mixgrpo", []),
]
ABLATION = [  # paper Table 2; {1} and {1,2,3} are the first two methods
    ("Lambda {1,2}", "g2rpo", ["--Lambda", "1", "2"]),
    ("Lambda {1,3}", "g2rpo", ["--Lambda", "1", "3"]),
]
ABLATION_ROWS = [("{1}", "G2RPO w/o MGAI"), ("{1,2}", "Lambda {1,2}"), ("{1,3}", "Lambda {1,3}"),
                 ("{1,2,3}", "G2RPO")]
TRAIN_REWARD = "toy-adherence"
EVAL_N, EVAL_T = 16, 8  # final-model scores: samples per prompt, ODE steps
COLUMNS = [("train", "toy-adherence", "adherence, train prompts (trained on)"),
           ("held-out", "toy-adherence", "adherence, held-out prompts (OOD)"),
           ("train", "toy-clean", "clean (OOD reward)"),
           ("train", "toy-shape", "shape (OOD reward)")]


def cost_per_prompt(algo: str, extra) -> int:
    """Rollout model evaluations per prompt and iteration that the ALGORITHM needs (see top), for
    the arguments train.py gives the run (toy preset + the algorithm's preset + extra)."""
    import train
    from launch import arguments
    from rollout import predicted_evaluations
    a = train.parse_args(["--algo", algo] + list(extra))
    arguments.check_args(a)
    return predicted_evaluations(a.T, arguments.sde_steps(a), a.G, a.Lambda, a.fine_first)[1] \
        if algo.startswith("g2rpo") else a.T * a.G


def budget_iterations(algo, extra, iterations: int) -> int:
    """Iterations of `algo` that spend what G2RPO spends in `iterations` (rounded)."""
    return max(1, round(iterations * cost_per_prompt("g2rpo", []) / cost_per_prompt(algo, extra)))


def slug(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label.lower()).strip("-").replace("--", "-")


def run_leg(run_dir: Path, algo, extra, seed: int, iterations: int, port: int, log):
    """Train (or continue) to `iterations`; keep the exported model as final_<iterations>."""
    final = run_dir / f"final_{iterations}"
    if final.exists():
        return
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(ROOT / "train.py"), "--algo", algo, "--seed", str(seed), "--out", str(run_dir),
           "--iterations", str(iterations), "--checkpoint-every", str(iterations), "--resume"] + list(extra)
    log(" ".join(cmd[1:]))
    t0 = time.time()
    with open(run_dir.parent / f"{run_dir.name}.log", "a") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    os.replace(run_dir / "final", final)
    log(f"  {time.time() - t0:.0f} s (with start-up and export)")


def logger(out: Path):
    """log(msg): a time-stamped line on stdout and in out/bench.log (seconds since this call)."""
    t0 = time.time()

    def log(msg):
        line = f"[{time.strftime('%H:%M:%S')} +{time.time() - t0:5.0f}s] {msg}"
        print(line, flush=True)
        with open(out / "bench.log", "a") as f:
            f.write(line + "\n")
    return log


def evaluate(model_dir: Path, path: Path) -> dict:
    """toy.reward_table of a model folder (EVAL_N samples per prompt, EVAL_T steps), cached in `path`."""
    if not path.exists():
        import torch
        import toy
        from policy.flux import FluxPolicy
        torch.set_num_threads(1)
        from policy.lora import base_of, is_lora_folder, load_lora
        lora = is_lora_folder(model_dir)  # a LoRA export: its base model + the adapter
        policy = FluxPolicy.from_pretrained(base_of(model_dir) if lora else model_dir, dtype=torch.float32)
        if lora:
            load_lora(policy.transformer, model_dir)
        table = toy.reward_table(policy, n=EVAL_N, T=EVAL_T, seed=0)
        path.write_text(json.dumps(table, indent=1))
    return json.loads(path.read_text())


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------
def scores(table: dict) -> list:
    return [table[f"model, {split}"][name] for split, name, _ in COLUMNS]


def fmt(values) -> str:
    v = np.asarray(values, dtype=float)
    return f"{v.mean():.3f} ± {v.std(ddof=1):.3f}" if len(v) > 1 else f"{v.mean():.3f}"


def row(out: Path, label: str, seeds, it: int):
    """Per-seed scores (seeds x columns) of one method at one iteration, and the mean wall clock."""
    runs = [out / f"{slug(label)}-s{s}" for s in seeds]
    have = [(r, r / f"eval_final_{it}.json") for r in runs if (r / f"eval_final_{it}.json").exists()]
    if not have:
        return None
    vals = np.array([scores(json.loads(e.read_text())) for _, e in have])
    secs = [seconds_to(r, it) for r, _ in have]
    return vals, float(np.mean(secs)), len(have)


def curves(run: Path):
    recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    it = np.array([r["iteration"] for r in recs])
    y = np.array([r["anchor_reward"][TRAIN_REWARD] for r in recs])
    sec = np.cumsum([r["sec_rollout"] + r["sec_reward"] + r["sec_train"] for r in recs])
    return it, y, sec


def seconds_to(run: Path, it: int) -> float:
    """Wall-clock of the iterations up to `it` (rollout + reward + training; no start-up)."""
    its, _, sec = curves(run)
    return float(sec[its <= it][-1])


def report(out: Path, seeds, iterations: int):
    """results.md, results.json, curves.png and ablation.png from whatever runs are finished."""
    if not (out / "eval_base.json").exists():
        raise SystemExit(f"bench/algos.py: no results in {out}; run it without --report first")
    base = json.loads((out / "eval_base.json").read_text())
    g_cost = cost_per_prompt("g2rpo", [])
    head = "| method | iterations | rollout evals / prompt / it | " + " | ".join(c[2] for c in COLUMNS) + \
           " | wall clock (s) | seeds |\n|" + "---|" * (len(COLUMNS) + 5) + "\n"
    base_row = f"| base model | 0 | — | " + " | ".join(f"{s:.3f}" for s in scores(base)) + " | — | — |\n"
    md, res = [f"# G2RPO and its baselines on the small world\n\nSeeds {', '.join(map(str, seeds))}; "
               f"mean ± std (ddof 1) over seeds; rewards of the final model, {EVAL_N} samples per prompt, "
               f"T = {EVAL_T} ODE steps.\n"], {"base": scores(base), "columns": [c[2] for c in COLUMNS]}
    same = [(lab, lab, algo, ex) for lab, algo, ex in METHODS]
    by_label = {lab: (algo, ex) for lab, algo, ex in METHODS + ABLATION}
    for title, key, entries in (
            (f"(a) Same iterations ({iterations})", "same_iterations",
             [(lab, src, algo, ex, iterations) for lab, src, algo, ex in same]),
            (f"(b) Same rollout budget ({iterations * g_cost:,} model evaluations per prompt)", "same_budget",
             [(lab, src, algo, ex, budget_iterations(algo, ex, iterations)) for lab, src, algo, ex in same]),
            (f"Lambda ablation (paper Table 2), {iterations} iterations", "ablation",
             [(f"Lambda {name}", src, *by_label[src], iterations) for name, src in ABLATION_ROWS])):
        md.append(f"\n## {title}\n\n" + head + base_row)
        res[key] = {}
        for lab, src, algo, ex, it in entries:
            r = row(out, src, seeds, it)
            if r is None:
                md.append(f"| {lab} | {it} | {cost_per_prompt(algo, ex)} | " + " | ".join("—" for _ in COLUMNS)
                          + " | — | 0 |\n")
                continue
            vals, sec, n = r
            md.append(f"| {lab} | {it} | {cost_per_prompt(algo, ex)} | " +
                      " | ".join(fmt(vals[:, j]) for j in range(len(COLUMNS))) + f" | {sec:.0f} | {n} |\n")
            res[key][lab] = {"iterations": it, "per_seed": vals.tolist(), "mean": vals.mean(0).tolist(),
                             "std": vals.std(0, ddof=1).tolist() if n > 1 else None, "seconds": sec}
        ref_label = entries[-1][0] if key == "ablation" else "G2RPO"  # Lambda {1,2,3} is G2RPO
        ref = res[key].get(ref_label)
        others = [(lab, v) for lab, v in res[key].items() if v is not ref and len(v["per_seed"]) == len(seeds)]
        if ref and len(ref["per_seed"]) == len(seeds) and others:  # paired by seed
            md.append(f"\nSeeds in which {ref_label} scores higher, per column: "
                      + "; ".join(f"than {lab} " + "/".join(str(int(c)) for c in
                                  (np.array(ref["per_seed"]) > np.array(v["per_seed"])).sum(0)) for lab, v in others)
                      + f" (of {len(seeds)}).\n")
    (out / "results.md").write_text("".join(md))
    (out / "results.json").write_text(json.dumps(res, indent=1))
    plot(out, seeds, METHODS, out / "curves.png", budget=iterations * g_cost)
    plot(out, seeds, [(src, *by_label[src]) for _, src in ABLATION_ROWS], out / "ablation.png", xs=("iteration",))
    return "".join(md)


def plot(out: Path, seeds, methods, path: Path, budget=None,
         xs=("iteration", "rollout model evaluations per prompt", "wall clock (s, 2 cores)")):
    """Deterministic-sample reward while training (mean of the last 10 iterations, from the 10th), mean over seeds
    with a band of one std, against iterations, rollout evaluations and seconds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from report.figures import moving_mean
    fig, axes = plt.subplots(1, len(xs), figsize=(5 * len(xs), 3.6), squeeze=False)
    for lab, algo, ex in methods:
        runs = [out / f"{slug(lab)}-s{s}" for s in seeds]
        data = [curves(r) for r in runs if (r / "metrics.jsonl").exists()]
        if not data:
            continue
        n = min(len(d[0]) for d in data)
        if n < 10:
            continue
        ys = np.stack([moving_mean(d[1][:n]) for d in data])  # full windows only: from the 10th iteration
        its = data[0][0][9:n]
        x_of = {xs[0]: its, "rollout model evaluations per prompt": its * cost_per_prompt(algo, ex),
                "wall clock (s, 2 cores)": np.mean([d[2][9:n] for d in data], 0)}
        for ax, name in zip(axes[0], xs):
            m, s = ys.mean(0), ys.std(0)
            line, = ax.plot(x_of[name], m, label=f"{lab} ({len(data)} seeds)")
            ax.fill_between(x_of[name], m - s, m + s, color=line.get_color(), alpha=0.15)
    for ax, name in zip(axes[0], xs):
        ax.set_xlabel(name), ax.set_ylabel(f"{TRAIN_REWARD} of the ODE sample")
        if budget and name.startswith("rollout"):
            ax.legend(handles=[ax.axvline(budget, color="grey", ls="--", lw=1, label="budget (b)")], fontsize=8)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path), plt.close(fig)



def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench")
    ap.add_argument("--seeds", default="42,43,44")
    ap.add_argument("--iterations", type=int, default=50, help="budget (a); (b) follows from it")
    ap.add_argument("--no-ablation", action="store_true", help="skip the Lambda {1,2} and {1,3} runs")
    ap.add_argument("--methods", default="", help="comma-separated --algo names to run (default: all)")
    ap.add_argument("--no-budget", action="store_true", help="skip the longer runs of budget (b)")
    ap.add_argument("--lr", type=float, default=None, help="override every method's learning rate "
                    "(a sensitivity check; use its own --out)")
    ap.add_argument("--report", action="store_true", help="only rebuild the tables and plots")
    args = ap.parse_args(argv)
    unknown = set(filter(None, args.methods.split(","))) - {algo for _, algo, _ in METHODS}
    if unknown:
        ap.error(f"--methods {args.methods}: unknown {sorted(unknown)}; choose from "
                 f"{','.join(algo for _, algo, _ in METHODS)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        ap.error(f"--seeds {args.seeds!r}: give comma-separated integers, e.g. 42,43,44")
    out = Path(args.out)
    t_start, log = time.time(), logger(out)

    if not args.report:
        out.mkdir(parents=True, exist_ok=True)
        import toy
        base = Path(toy.base_model())
        log(f"base model {base}: {scores(evaluate(base, out / 'eval_base.json'))}")
        jobs = [(lab, algo, ex, s) for s in seeds for lab, algo, ex in METHODS]
        jobs += [] if args.no_ablation else [(lab, algo, ex, s) for s in seeds for lab, algo, ex in ABLATION]
        if args.methods:
            jobs = [j for j in jobs if j[1] in args.methods.split(",")]
        lr = [] if args.lr is None else ["--lr", str(args.lr)]
        for i, (lab, algo, ex, s) in enumerate(jobs):
            run_dir = out / f"{slug(lab)}-s{s}"
            run_dir.mkdir(exist_ok=True)
            legs = sorted({args.iterations} | ({budget_iterations(algo, ex, args.iterations)}
                                                if (lab, algo, ex) in METHODS and not args.no_budget else set()))
            for it in legs:
                log(f"[{i + 1}/{len(jobs)}] {lab} seed {s}: to iteration {it}")
                run_leg(run_dir, algo, ex + lr, s, it, 29500 + i % 50, log)
                table = evaluate(run_dir / f"final_{it}", run_dir / f"eval_final_{it}.json")
                log(f"  eval {lab} seed {s} it {it}: {scores(table)}")
            report(out, seeds, args.iterations)
        log(f"benchmark done in {time.time() - t_start:.0f} s")
    print(report(out, seeds, args.iterations))


if __name__ == "__main__":
    main()

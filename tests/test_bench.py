"""The benchmark's budget arithmetic and its report (the benchmark itself is `make bench-algos`)."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import algos  # noqa: E402


def test_budget_matches_g2rpo_rollout_cost():
    # toy preset: T = 8, G = 8, M = first 4 steps; G2RPO Lambda {1,2,3}: 288; {1}: 184; baselines T*G
    assert algos.cost_per_prompt("g2rpo", []) == 288
    assert algos.cost_per_prompt("g2rpo-no-mgai", []) == 184
    assert algos.cost_per_prompt("g2rpo", ["--Lambda", "1", "3"]) == 224
    for algo in ("dancegrpo", "flowgrpo", "mixgrpo"):
        assert algos.cost_per_prompt(algo, []) == 8 * 8
        assert algos.budget_iterations(algo, [], 50) == 225
    assert algos.budget_iterations("g2rpo", [], 50) == 50
    assert algos.budget_iterations("g2rpo-no-mgai", [], 50) == 78  # 14,400 / 184 = 78.3
    for label, algo, ex in algos.METHODS:  # the equal budget holds to within one iteration's cost
        n, c = algos.budget_iterations(algo, ex, 50), algos.cost_per_prompt(algo, ex)
        assert abs(n * c - 50 * 288) <= c / 2


def _fake_run(out: Path, label: str, seed: int, it: int, values, sec_per_it=0.5):
    run = out / f"{algos.slug(label)}-s{seed}"
    run.mkdir(parents=True)
    recs = [{"iteration": i + 1, "anchor_reward": {"toy-adherence": 0.5 + 0.001 * i}, "sec_rollout": sec_per_it,
             "sec_reward": 0.0, "sec_train": 0.0} for i in range(it)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    table = {"model, train": {"toy-adherence": values[0], "toy-clean": values[2], "toy-shape": values[3]},
             "model, held-out": {"toy-adherence": values[1], "toy-clean": 0.0, "toy-shape": 0.0}}
    (run / f"eval_final_{it}.json").write_text(json.dumps(table))


def test_report_mean_and_std_over_seeds(tmp_path):
    pytest.importorskip("matplotlib")
    base = {"model, train": {"toy-adherence": 0.5, "toy-clean": 0.2, "toy-shape": 0.4},
            "model, held-out": {"toy-adherence": 0.45, "toy-clean": 0.0, "toy-shape": 0.0}}
    (tmp_path / "eval_base.json").write_text(json.dumps(base))
    per_seed = {1: [0.6, 0.55, 0.25, 0.41], 2: [0.7, 0.65, 0.15, 0.43]}
    for s, v in per_seed.items():
        _fake_run(tmp_path, "G2RPO", s, 4, v)
    _fake_run(tmp_path, "DanceGRPO", 1, 18, [0.9, 0.8, 0.3, 0.5])  # only one seed, at its budget
    md = algos.report(tmp_path, [1, 2], 4)
    res = json.loads((tmp_path / "results.json").read_text())
    g = res["same_iterations"]["G2RPO"]
    want = np.array(list(per_seed.values()))
    assert np.allclose(g["mean"], want.mean(0)) and np.allclose(g["std"], want.std(0, ddof=1))
    assert g["seconds"] == pytest.approx(2.0)  # 4 iterations x 0.5 s
    assert "| G2RPO | 4 | 288 | 0.650 ± 0.071 | 0.600 ± 0.071 | 0.200 ± 0.071 | 0.420 ± 0.014 | 2 | 2 |" in md
    assert "DanceGRPO" not in res["same_iterations"]  # no run at 4 iterations: a dash row, not a number
    assert res["same_budget"]["DanceGRPO"]["iterations"] == 18 and res["same_budget"]["DanceGRPO"]["std"] is None
    assert "| MixGRPO | 18 | 64 | — |" in md
    assert (tmp_path / "curves.png").stat().st_size > 0 and (tmp_path / "ablation.png").exists()


@pytest.mark.parametrize("argv, msg", [(["--methods", "g2rpo,ppo"], "unknown"), (["--seeds", "a,b"], "integers")])
def test_bad_arguments_stop_before_any_work(tmp_path, argv, msg, capsys):
    with pytest.raises(SystemExit):
        algos.main(argv + ["--out", str(tmp_path / "b")])
    assert msg in capsys.readouterr().err and not (tmp_path / "b").exists()


# ------------------------------------------------------------------------------------------------ bench/scale.py
BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_scale_replaces_nothing_of_this_repository_at_run_time():
    """bench/scale.py and bench/measure.py hand train.py's code what the simulation needs as arguments
    (train.clip_and_step's `agree`, train.update's `step`, the plan, policy and reward given to train.sample_prompt):
    no assignment to, or deletion of, an attribute of one of this repository's modules."""
    import ast
    root = BENCH.parent
    ours = {p.stem for p in root.glob("*.py")} | {p.name for p in root.iterdir() if p.is_dir() and any(p.glob("*.py"))}
    for path in (BENCH / "scale.py", BENCH / "measure.py"):
        tree = ast.parse(path.read_text())
        modules = set()  # the names this file binds to modules of ours
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules |= {(a.asname or a.name).split(".")[0] for a in node.names if a.name.split(".")[0] in ours}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ours:
                modules |= {a.asname or a.name for a in node.names if (root / node.module.replace(".", "/") / a.name)
                            .with_suffix(".py").is_file()}
        patched = []
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else \
                [node.target] if isinstance(node, ast.AugAssign) else []
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setattr" and node.args:
                targets = [ast.Attribute(value=node.args[0], attr="?")]
            for t in targets:
                while isinstance(t, ast.Attribute):
                    t = t.value
                    if isinstance(t, ast.Name) and t.id in modules:
                        patched.append(f"{path.name}:{node.lineno}")
        assert modules and not patched, patched


@pytest.mark.parametrize("argv, msg", [(["--worlds", "8", "0"], ">= 1"), (["--iterations", "0"], ">= 1"),
                                       (["--out", "results.txt"], "give a .md path")])
def test_scale_refuses_bad_arguments_before_any_work(argv, msg):
    import scale
    with pytest.raises(SystemExit, match=msg):
        scale.parse(argv)

"""The reward-hacking guard (guard/probes.py, train.py --probe-every): the rule, its replay, and real runs."""
import json
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from guard.probes import Guard, probe_items, share
from test_train import launch, metrics

probe_means = st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1), st.floats(0, 1)), min_size=1, max_size=12)


@settings(max_examples=200, deadline=None)
@given(seq=probe_means, tol=st.floats(0, 0.3), patience=st.integers(0, 4))
@pytest.mark.parametrize("against", ["start", "peak"])
def test_the_best_is_the_highest_trained_reward_among_held_probes(against, seq, tol, patience):
    g = Guard(["r"], ["a", "b"], tol, patience, against=against)
    verdicts = [g.update(i, dict(zip("rab", m))) for i, m in enumerate(seq)]

    def ref(i, j):  # the first probe, or the best of the probes before i
        return seq[0][j] if against == "start" else max(m[j] for m in seq[:max(i, 1)])
    held = [i for i, m in enumerate(seq) if all(m[j] >= ref(i, j) - tol for j in (1, 2))]
    assert [v.held for v in verdicts] == [i in held for i in range(len(seq))]
    assert 0 in held and verdicts[0].best  # the base model is the first candidate
    best = max(held, key=lambda i: (seq[i][0], -i))  # the first of equal scores
    assert g.best_iteration == best and [i for i, v in enumerate(verdicts) if v.best][-1] == best
    for i, v in enumerate(verdicts):  # patience: stop at P probes in a row without a new best
        assert bool(v.stop) == (patience > 0 and v.stale >= patience)
        assert v.stale == i - max(j for j in range(i + 1) if verdicts[j].best)


def test_a_collapse_after_a_rise_is_a_fall_from_the_peak_not_from_the_start():
    """The small world's pattern: the reward not trained on rises with the trained one, then collapses."""
    seq = [(0.50, 0.10), (0.55, 0.20), (0.60, 0.25), (0.70, 0.09)]
    for against, held in (("start", [True, True, True, True]), ("peak", [True, True, True, False])):
        g = Guard(["r"], ["a"], 0.05, against=against)
        assert [g.update(i, {"r": r, "a": a}).held for i, (r, a) in enumerate(seq)] == held
        assert g.best_iteration == (3 if against == "start" else 2)


def test_a_fall_stops_only_when_asked_and_nan_counts_as_a_fall():
    for stop in (False, True):
        g = Guard(["r"], ["a"], 0.1, stop_on_fall=stop, against="start")
        g.update(0, {"r": 0.5, "a": 0.5})
        v = g.update(1, {"r": 0.9, "a": 0.35})
        assert v.fallen == pytest.approx({"a": 0.15}) and not v.best and bool(v.stop) == stop
        assert g.update(2, {"r": 0.9, "a": 0.41}).best  # back within the tolerance: a new best
        v = g.update(3, {"r": 2.0, "a": math.nan})
        assert "a" in v.fallen and not v.best  # a diverged model never passes as held or best
        assert not g.update(4, {"r": math.nan, "a": 0.5}).best


@given(st.lists(st.text(min_size=1, max_size=3), min_size=1, max_size=7, unique=True), st.integers(1, 3),
       st.integers(1, 5))
def test_the_ranks_share_every_probe_image_once_with_equal_call_counts(prompts, seeds, world):
    items = probe_items(prompts, seeds)
    shares = [share(items, r, world) for r in range(world)]
    assert len({len(s) for s in shares}) == 1  # the same number of model calls on every rank
    real = sorted(i for s in shares for i, _ in s if i is not None)
    assert real == list(range(len(items)))
    assert all(items[i] == item for s in shares for i, item in s if i is not None)


def test_the_guard_stops_a_run_and_keeps_the_best(tiny_model, tmp_path):
    out = tmp_path / "run"
    r = launch(2, out, tiny_model, ["--iterations", "10", "--checkpoint-every", "1", "--keep-checkpoints", "10",
                                    "--probe-every", "1", "--probe-prompts", str(tiny_model[1]), "--probe-seeds", "1",
                                    "--probe-rewards", "toy-clean+toy-shape", "--probe-patience", "3", "--lr", "1e-2"])
    probes = [json.loads(l) for l in (out / "probes.jsonl").read_text().splitlines()]
    assert probes[0]["iteration"] == 0 and set(probes[0]["rewards"]) == {"toy-adherence", "toy-clean", "toy-shape"}
    stops = [p["iteration"] for p in probes if p["stop"]]
    assert stops and all(p["stop"] == "" for p in probes[:-1])  # this run stops early; the first stop ends it
    done = stops[0]
    assert done < 10 and "the guard stops the run" in r.stdout + r.stderr
    # its cost at start: 6 prompts x 1 seed, shared by 2 ranks, T = 4 steps; against 1 iteration of 1 prompt
    assert "guard: a probe every 1 iterations = 6 prompts x 1 seeds = 6 ODE samples of 4 steps, 12 model " \
           "evaluations per rank" in r.stdout
    assert [m["iteration"] for m in metrics(out)] == list(range(1, done + 1))
    assert [m["probe"] for m in metrics(out)] == [p["rewards"] for p in probes[1:]]
    assert (out / "final").is_dir() and (out / f"samples_{done:06d}.png").is_file()
    assert (out / "probes" / f"probe_{done:06d}.png").is_file()
    best = [p["iteration"] for p in probes if p["best"]][-1]
    assert best > 0  # this run improves before it stalls: best/ is the model of that iteration
    from safetensors.torch import load_file
    import evaluate
    from launch import eval_models
    kept = load_file(str(next((out / "best" / "transformer").glob("*.safetensors"))))
    ref = eval_models.resolve_model(str(out / f"ckpt_{best:06d}"), str(tiny_model[0]))
    at_best = evaluate.load_policy(ref, evaluate.Args(), "cpu", torch.float32, None).transformer.state_dict()
    assert set(kept) == set(at_best) and all(torch.equal(kept[k], at_best[k]) for k in kept)

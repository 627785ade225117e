"""bench/gpu_smoke.py (make gpu-smoke) on the CPU: a short real subset (the build of the tiny FLUX and of every reward
model, a train.py step made to fail with a bad flag, then evaluate.py with all five metrics, which must still run and
pass), and its bookkeeping (step selection, failure reasons, the world-size comparison) without subprocesses."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import gpu_smoke  # noqa: E402


def test_a_failed_step_is_reported_and_the_next_ones_still_run(tmp_path):
    out = tmp_path / "smoke"
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_smoke.py"), "--out", str(out),
           "--steps", "build,train-ws1,eval-ws1-base", "--step-args", "train-ws1=--G 1"]
    r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "SMOKE_DEVICE": "cpu", "OMP_NUM_THREADS": "1"},
                       capture_output=True, text=True, timeout=600)
    lines = [l for l in r.stdout.splitlines() if l.startswith(("PASS ", "FAIL "))]
    assert r.returncode == 1, r.stdout + r.stderr[-3000:]
    assert [l.split()[:2] for l in lines] == [["PASS", "build"], ["FAIL", "train-ws1"], ["PASS", "eval-ws1-base"]], \
        r.stdout
    assert "--G 1: the group needs at least 2 members" in lines[1] and str(out / "logs" / "train-ws1.log") in lines[1]
    res = json.loads((out / "results.json").read_text())
    assert (res["device"], res["passed"], res["ok"]) == ("cpu", 2, False)
    assert [(s["step"], s["ok"]) for s in res["steps"]] == [("build", True), ("train-ws1", False),
                                                             ("eval-ws1-base", True)]
    md = (out / "results.md").read_text()
    assert md.startswith("# gpu-smoke: FAIL (2 of 3 steps passed)") and "| train-ws1 | FAIL |" in md
    scored = json.loads((out / "work" / "eval-ws1" / "base" / "results.json").read_text())
    assert list(scored["metrics"]) == list(gpu_smoke.METRICS)  # every reward model of the registry ran
    assert all((out / "logs" / f"{s}.log").is_file() for s in ("build", "train-ws1", "eval-ws1-base"))


def test_step_list_and_selection(capsys):
    names = [s.name for s in gpu_smoke.steps()]
    assert names[:2] == ["env", "build"] and names[-1] == "gpu-check"
    for needed in ("train-ws1", "train-ws1-resume", "train-ws2", "train-ws2-resume", "train-lora", "train-hsdp",
                   *(f"{kind}-{m}" for m in gpu_smoke.MODELS for kind in ("eval-ws1", "eval-ws2", "equal"))):
        assert needed in names
    assert [s.name for s in gpu_smoke.selected(gpu_smoke.steps(), "train-ws2*,env")] == \
        ["env", "train-ws2", "train-ws2-resume"]  # always in the canonical order
    with pytest.raises(SystemExit, match="no step matches"):
        gpu_smoke.selected(gpu_smoke.steps(), "trian-ws1")
    assert gpu_smoke.main(["--list"]) == 0 and "train-hsdp" in capsys.readouterr().out


def test_failure_reasons():
    why = gpu_smoke.reason("...\n[rank1]: RuntimeError: CUDA error: invalid device ordinal\nmore\n")
    assert why.startswith("two ranks on one GPU") and why.endswith(": [rank1]: RuntimeError: CUDA error: invalid "
                                                                   "device ordinal")
    assert "driver is older" in gpu_smoke.reason("UserWarning: CUDA driver version is insufficient for CUDA runtime")
    log = "$ python train.py\nsome output\ntrain.py: invalid arguments:\n  --G 1: too small\nlast words\n"
    assert gpu_smoke.reason(log) == "train.py: invalid arguments: --G 1: too small"
    traceback = "$ cmd\nTraceback (most recent call last):\n  File x\nValueError: bad\n"
    assert gpu_smoke.reason(traceback) == "ValueError: bad"
    torchrun = ("[rank0]: Traceback (most recent call last):\n[rank0]:   File x\n[rank0]: KeyError: 'a'\n"
                "Traceback (most recent call last):\n  File \"torch/distributed/run.py\"\n"
                "E1205 21:39:30.907000 15425 torch/distributed/elastic/multiprocessing/api.py:1002] failed\n"
                "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\n====\n  exitcode  : 1 (pid: 7)\n")
    assert gpu_smoke.reason(torchrun) == "[rank0]: KeyError: 'a'"


def write_run(run: Path, scores: list, pixels: list):
    (run / "images").mkdir(parents=True)
    rows = []
    for i, (s, px) in enumerate(zip(scores, pixels)):
        (run / "images" / f"{i}.png").write_bytes(px)
        rows.append({"index": i, "file": f"images/{i}.png", "scores": {m: s for m in gpu_smoke.METRICS}})
    (run / "scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_equal_scores_across_world_sizes(tmp_path):
    c = gpu_smoke.Ctx("cpu", tmp_path, tmp_path, 0, 60)
    check = gpu_smoke.check_equal("base")
    assert "no " in check(c, "")  # nothing evaluated yet
    write_run(tmp_path / "eval-ws1" / "base", [0.5, None], [b"a", b"b"])
    write_run(tmp_path / "eval-ws2" / "base", [0.5, None], [b"a", b"b"])
    assert check(c, "") == ""
    (tmp_path / "eval-ws2" / "base" / "scores.jsonl").write_text(
        (tmp_path / "eval-ws2" / "base" / "scores.jsonl").read_text().replace("0.5", "0.5000001"))
    why = check(c, "")
    assert why.startswith("world size 1 vs 2: 0 of 2 PNGs differ") and "hps 1e-07" in why
    c.score_tol = 1e-6
    assert check(c, "").startswith("note: scores within --score-tol")
    (tmp_path / "eval-ws2" / "base" / "images" / "1.png").write_bytes(b"c")
    assert check(c, "").startswith("world size 1 vs 2: 1 of 2 PNGs differ")


def test_two_rank_steps_are_skipped_with_one_gpu(tmp_path):
    """NCCL refuses two ranks on one GPU: on a one-GPU node the steps that need two are said, not failed."""
    c = gpu_smoke.Ctx("cuda", tmp_path, tmp_path / "work", 1, 60.0)
    (tmp_path / "logs").mkdir()
    by_name = {s.name: s for s in gpu_smoke.steps()}
    for name in ("train-ws2", "train-hsdp", "eval-ws2-base", "equal-base"):
        r = gpu_smoke.run_step(by_name[name], c, dict(os.environ))
        assert r["ok"] and gpu_smoke.verdict(r) == "SKIP" and "NCCL refuses two ranks on one GPU" in r["why"], name
    assert by_name["train-ws1"].ranks == 1 and by_name["eval-ws1-base"].ranks == 1

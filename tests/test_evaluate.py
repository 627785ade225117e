"""evaluate.py on a tiny toy model: the same images on 1 and 2 processes (torchrun), resume after a real SIGKILL
and after deleted outputs, a diverged model refused, metrics given / skipped (ImageReward on tiny weights,
UnifiedReward through a real local server), the Student-t intervals against hand arithmetic, train.py's export
and checkpoint, comparison and grid, and the toy evaluation end to end."""
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import evaluate  # noqa: E402
import toy  # noqa: E402
from report import tables  # noqa: E402
from conftest import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TINY = toy.ToyConfig(steps=3, batch=8, heads=2, double_blocks=1, single_blocks=1)
FAST = ["--steps", "3", "--per-prompt", "2", "--batch-size", "3", "--device", "cpu"]  # 10 images: batches 3, 3, 3, 1
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("world")
    toy.base_model(d / "tiny", seed=0, cfg=TINY, log=None)
    (d / "prompts.txt").write_text("\n".join(toy.TRAIN_PROMPTS[:3] + ["", *toy.HELDOUT_PROMPTS[:2]]) + "\n")
    return d


def base_argv(world, out, model="tiny"):
    return ["--model", str(world / model), "--prompts", str(world / "prompts.txt"), "--out", str(out), *FAST]


@pytest.fixture(scope="module")
def reference(world):
    """The uninterrupted one-process run everything else is compared with."""
    evaluate.main(base_argv(world, world / "ref"))
    return world / "ref" / "tiny"


def pixels(run) -> dict:
    return {p.name: np.array(Image.open(p)) for p in sorted((Path(run) / "images").glob("*.png"))}


def scores(run) -> list:
    return [json.loads(l) for l in (Path(run) / "scores.jsonl").read_text().splitlines()]


def same_run(a, b):
    pa, pb = pixels(a), pixels(b)
    assert list(pa) == list(pb) and len(pa) == 10
    for k in pa:
        assert np.array_equal(pa[k], pb[k]), k
    assert scores(a) == scores(b)
    ra, rb = (json.loads((Path(r) / "results.json").read_text()) for r in (a, b))
    assert ra["metrics"] == rb["metrics"]


# ---------------------------------------------------------------- world sizes
def test_same_images_on_one_and_two_processes(world, reference, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), str(ROOT / "evaluate.py"), *base_argv(world, tmp_path)]
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "world size 2" in r.stdout and "10 images sampled" in r.stdout
    same_run(reference, tmp_path / "tiny")
    m = json.loads((reference / "manifest.json").read_text())["images"]
    assert [e["file"] for e in m[:3]] == ["images/00000_00.png", "images/00000_01.png", "images/00001_00.png"]
    assert [e["seed"] for e in m[:3]] == [42, 42 + 1_000_000, 43] and m[-1]["prompt_index"] == 4  # empty line skipped
    s = scores(reference)
    assert len({round(x["scores"]["toy-adherence"], 6) for x in s}) > 5  # images and scores really differ


def test_batches_do_not_depend_on_the_world_size():
    items = evaluate.plan([f"p{j}" for j in range(7)], [""] * 7, 3, 0)  # 21 images
    one = [tuple(it.index for it in b) for b in evaluate.rank_batches(items, 4, 0, 1)]
    assert one == [(0, 1, 2, 3), (4, 5, 6, 7), (8, 9, 10, 11), (12, 13, 14, 15), (16, 17, 18, 19), (20,)]
    for world in (2, 3, 8):
        per_rank = [[tuple(it.index for it in b) for b in evaluate.rank_batches(items, 4, r, world)]
                    for r in range(world)]
        assert sorted(b for bs in per_rank for b in bs) == one  # the same batches, only spread differently
        assert all(bs == one[r::world] for r, bs in enumerate(per_rank))


# ---------------------------------------------------------------- resume
def test_resume_after_kill_and_after_deleted_outputs(world, reference, tmp_path, capsys):
    """SIGKILL inside the run right after its 4th PNG (batch 0 done and scored, batch 1 half written), then
    resume: the 4 PNGs and batch 0's scores are reused, the rest is made, and everything equals the reference."""
    argv = base_argv(world, tmp_path)
    code = (f"import os, signal, sys\nsys.path.insert(0, {str(ROOT)!r})\nimport evaluate\n"
            "n, save = [0], evaluate.save_png\n"
            "def dying_save(img, path):\n    save(img, path)\n    n[0] += 1\n"
            "    if n[0] == 4:\n        os.kill(os.getpid(), signal.SIGKILL)\n"
            f"evaluate.save_png = dying_save\nevaluate.main({argv!r})\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    run = tmp_path / "tiny"
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert len(pixels(run)) == 4 and not (run / "results.json").exists() and not (run / "scores.jsonl").exists()
    part = (run / "scores.part0.jsonl").read_text().splitlines()
    assert sorted({json.loads(l)["index"] for l in part}) == [0, 1, 2] and len(part) == 9  # batch 0 x 3 metrics
    before = {p.name: p.stat().st_mtime_ns for p in (run / "images").glob("*.png")}
    capsys.readouterr()
    evaluate.main(argv)
    assert "6 images sampled, 4 found on disk, 21 scores computed" in capsys.readouterr().out
    assert all((run / "images" / f).stat().st_mtime_ns == t for f, t in before.items())  # not rewritten
    same_run(reference, run)
    assert not list(run.glob("scores.part*"))
    (run / "images" / "00003_01.png").unlink()  # delete an output: only it is made again, nothing is rescored
    evaluate.main(argv)
    assert "1 images sampled, 9 found on disk, 0 scores computed" in capsys.readouterr().out
    same_run(reference, run)
    with pytest.raises(SystemExit, match="other settings"):  # a resume never mixes settings
        evaluate.main(argv[:-6] + ["--steps", "4", "--per-prompt", "2", "--batch-size", "3"])


def test_a_diverged_model_is_refused_before_its_batch_is_saved(world, reference, tmp_path, monkeypatch):
    """NaN in images 4 and 5 (prompt 2, seeds 44 and 1_000_044; batch 1 = images 3..5): a one-line error naming the
    model and the first of them; batch 0's PNGs and scores are kept, no PNG of batch 1 is written, nothing is
    summarised; rerun with a sane model, the folder finishes exactly as the reference."""
    from policy.interface import Policy
    real = Policy.sample

    def diverged(policy, prompts, seeds, *args, **kw):
        x = real(policy, prompts, seeds, *args, **kw)
        x[torch.tensor([s % 1_000_000 == 44 for s in seeds])] = float("nan")
        return x

    monkeypatch.setattr(Policy, "sample", diverged)
    argv = base_argv(world, tmp_path)
    with pytest.raises(SystemExit, match=r"^evaluate.py: tiny sampled a non-finite image \(prompt 2, seed 44\)") as e:
        evaluate.main(argv)
    assert "\n" not in str(e.value) and "diverged" in str(e.value)
    run = tmp_path / "tiny"
    assert sorted(p.name for p in (run / "images").iterdir()) == ["00000_00.png", "00000_01.png", "00001_00.png"]
    assert not (run / "results.json").exists() and not (run / "scores.jsonl").exists()
    assert sorted({json.loads(l)["index"] for l in (run / "scores.part0.jsonl").read_text().splitlines()}) == [0, 1, 2]
    monkeypatch.undo()
    evaluate.main(argv)
    same_run(reference, run)


# ---------------------------------------------------------------- metrics given and skipped
def test_metrics_given_and_skipped(world, reference, tmp_path, capsys):
    """Only the metrics whose files are given appear (ImageReward from tiny weights, UnifiedReward from a real
    server on 127.0.0.1); HPS is skipped with one line. Reusing the reference images: nothing is re-sampled."""
    import test_imagereward as tir
    import test_unifiedreward as tur
    shutil.copytree(reference, tmp_path / "tiny")
    ckpt = tmp_path / "ImageReward.pt"
    torch.save(tir.tiny_state(0), ckpt)
    tokenizer = tir.write_tokenizer(str(tmp_path / "bert"))
    with tur.Server() as server:
        capsys.readouterr()
        evaluate.main(base_argv(world, tmp_path) + [
            "--metrics", "hps,imagereward,unifiedreward,toy-clean", "--imagereward-checkpoint", str(ckpt),
            "--imagereward-tokenizer", tokenizer, "--unifiedreward-url", server.url])
    out = capsys.readouterr().out
    skip = [l for l in out.splitlines() if l.startswith("skipping")]
    assert skip == [l for l in skip if "HPS-v2.1: needs --hps-checkpoint" in l] and len(skip) == 1
    assert "0 images sampled, 10 found on disk, 20 scores computed" in out  # toy-clean was already scored
    res = json.loads((tmp_path / "tiny" / "results.json").read_text())
    assert list(res["metrics"]) == ["imagereward", "unifiedreward", "toy-clean"]
    assert list(res["skipped"]) == ["hps"] and "HPS_v2.1" in res["skipped"]["hps"]
    table = (tmp_path / "tiny" / "table.md").read_text().splitlines()
    assert table[0] == "| model | ImageReward | UnifiedReward | toy-clean |"
    assert any(l.startswith("not evaluated: skipping HPS-v2.1") for l in table) and "PickScore" not in table[0]
    ref = {r["index"]: r["scores"] for r in scores(reference)}
    for r in scores(tmp_path / "tiny"):  # per image: the server's answer to THAT png, the old toy-clean kept
        png = (tmp_path / "tiny" / r["file"]).read_bytes()
        assert r["scores"]["unifiedreward"] == pytest.approx(tur.brightness_score(png), abs=1e-6)
        assert r["scores"]["toy-clean"] == ref[r["index"]]["toy-clean"]
        assert isinstance(r["scores"]["imagereward"], float)


def test_files_given_but_missing_are_errors(world, tmp_path):
    with pytest.raises(SystemExit, match="--hps-checkpoint"):
        evaluate.main(base_argv(world, tmp_path) + ["--metrics", "hps", "--hps-checkpoint", str(tmp_path / "no.pt")])
    with pytest.raises(SystemExit, match="not a diffusers model folder"):
        evaluate.main(["--model", str(tmp_path), "--out", str(tmp_path)])


def test_flux_models_never_reach_the_toy_world(tmp_path):
    """A FLUX folder (tiny, random, with a VAE): the paper's five metrics by default, each skipped with one line
    when its files are not given; sampling, the manifest and the table run without importing the toy world."""
    import tiny_flux
    tiny_flux.save_tiny_flux(tmp_path / "flux")
    (tmp_path / "p.txt").write_text("a red house\na blue sky\n")
    argv = ["--model", str(tmp_path / "flux"), "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "eval"),
            "--height", "16", "--width", "16", "--steps", "2", "--device", "cpu"]
    code = (f"import sys\nsys.path.insert(0, {str(ROOT)!r})\nimport evaluate\nevaluate.main({argv!r})\n"
            "print('toy imported:', [m for m in sys.modules if m == 'toy' or m.startswith('toy.')])\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    skips = [l.split(":")[0] for l in r.stdout.splitlines() if l.startswith("skipping")]
    assert skips == ["skipping HPS-v2.1", "skipping CLIP", "skipping PickScore", "skipping ImageReward",
                     "skipping UnifiedReward"]
    assert "metrics none" in r.stdout and "flux: 2 images sampled" in r.stdout and "toy imported: []" in r.stdout
    assert len(pixels(tmp_path / "eval" / "flux")) == 2


# ---------------------------------------------------------------- statistics (report/tables.py)
def half_width(values, level=0.95):
    return tables.mean_ci(values, level)["half_width"] * math.sqrt(len(values)) / statistics.stdev(values)


def test_student_t_quantiles_by_hand():
    """The interval's t_{(1+level)/2, n-1} against closed forms and printed tables."""
    assert half_width([0.0, 2.0]) == pytest.approx(math.tan(0.95 * math.pi / 2), rel=1e-12)  # df 1: Cauchy
    assert half_width([0.0, 2.0], 0.9) == pytest.approx(math.tan(0.9 * math.pi / 2), rel=1e-12)
    assert half_width([0.0, 1.0, 3.0]) == pytest.approx(math.sqrt(2 * 0.95**2 / (1 - 0.95**2)), rel=1e-12)  # df 2
    assert half_width([1.0, 2.0, 4.0, 8.0, 16.0]) == pytest.approx(2.776445105, abs=1e-8)  # df 4, printed tables
    assert half_width(list(map(float, range(10)))) == pytest.approx(2.262157163, abs=1e-8)  # df 9
    assert half_width([float(i % 7) for i in range(400)]) == pytest.approx(1.965927, abs=2e-6)  # df 399


def test_interval_over_prompts_by_hand():
    """5 prompts x 2 images; prompt means 1..5: mean 3, s = sqrt(2.5), half-width t_{.975,4} sqrt(2.5 / 5)."""
    recs = [{"prompt_index": j, "m": j + 1 + d} for j in range(5) for d in (-0.5, 0.5)]
    recs.append({"prompt_index": 5, "m": None})  # an unscored image
    s = tables.summarise(recs, ["m"])["m"]
    half = 2.776445105 * math.sqrt(2.5) / math.sqrt(5)  # = 1.963243
    assert s["mean"] == pytest.approx(3.0) and s["std"] == pytest.approx(math.sqrt(2.5))
    assert s["half_width"] == pytest.approx(half, abs=1e-8) and s["low"] == pytest.approx(3 - half)
    assert (s["prompts"], s["images"], s["missing"]) == (5, 10, 1)
    one = tables.summarise([{"prompt_index": 0, "m": 2.0}], ["m"])["m"]
    assert one["mean"] == 2.0 and one["half_width"] is None


# ---------------------------------------------------------------- train.py outputs, comparison and grid
def test_export_and_checkpoint_of_train_py(world, reference, tmp_path, capsys, monkeypatch):
    """One G2RPO iteration with train.py; its final/ and its ckpt_000001/ (read over the base through
    args.json) give the same images, and not the base model's."""
    import socket
    import train
    out = tmp_path / "train"
    with socket.socket() as sock:  # a free port for train.py's one-process gloo group, in this process
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for k, v in dict(RANK=0, LOCAL_RANK=0, WORLD_SIZE=1, MASTER_ADDR="127.0.0.1", MASTER_PORT=port).items():
        monkeypatch.setenv(k, str(v))
    train.main(["--model", str(world / "tiny"), "--prompts", str(world / "prompts.txt"), "--out", str(out),
                "--reward", "toy-adherence", "--G", "3", "--T", "4", "--Lambda", "1", "2", "--sde-steps", "0", "1",
                "--lr", "1e-2", "--clip-range", "0.05", "--mixed-precision", "fp32", "--device", "cpu",
                "--num-samples", "2", "--iterations", "1", "--checkpoint-every", "1"])
    monkeypatch.undo()
    evaluate.main(["--model", str(out / "final"), str(out / "ckpt_000001"), "--prompts", str(world / "prompts.txt"),
                   "--out", str(tmp_path / "eval"), *FAST])
    final, ckpt = tmp_path / "eval" / "train-final", tmp_path / "eval" / "train-ckpt_000001"
    same_run(final, ckpt)
    base = pixels(reference)
    assert any(not np.array_equal(base[k], v) for k, v in pixels(final).items())
    assert json.loads((ckpt / "manifest.json").read_text())["model"]["checkpoint"].endswith("ckpt_000001")
    grid = Image.open(tmp_path / "eval" / "grid.png")
    assert grid.size == (200 + 2 * (96 + 4), 30 + 5 * (96 + 4))  # 5 prompts (rows) x 2 models (columns)
    capsys.readouterr()
    evaluate.main(["--compare", str(reference), str(tmp_path / "eval"), "--out", str(tmp_path / "cmp")])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| model | toy-adherence | toy-clean | toy-shape |"
    rows = [l for l in lines if l.startswith("| tiny") or l.startswith("| train")]
    assert [r.split(" |")[0] for r in rows] == ["| tiny", "| train-ckpt_000001", "| train-final"]  # folder: sorted
    assert "(" not in rows[0] and rows[1].count("(") == 3 and rows[1].split(" | ")[1:] == rows[2].split(" | ")[1:]
    assert (tmp_path / "cmp" / "comparison.md").read_text().startswith(lines[0])
    assert (tmp_path / "cmp" / "grid.png").is_file()


# ---------------------------------------------------------------- the toy evaluation end to end (make eval)
def test_toy_evaluation_end_to_end(world, tmp_path, capsys):
    """`python evaluate.py` with its toy defaults (60 prompts x 4 images, 16 steps), on the tiny model."""
    evaluate.main(["--model", str(world / "tiny"), "--out", str(tmp_path)])
    out = capsys.readouterr().out
    res = json.loads((tmp_path / "tiny" / "results.json").read_text())
    assert (res["images"], res["prompts"], res["settings"]["steps"]) == (240, 60, 16)
    assert list(res["metrics"]) == list(toy.TOY_REWARDS) and list(res["groups"]) == ["train", "held-out"]
    assert res["groups"]["held-out"]["toy-adherence"]["prompts"] == 12
    for m, s in res["metrics"].items():
        assert s["images"] == 240 and s["low"] < s["mean"] < s["high"], m
    assert "| tiny · held-out |" in out and "(n = 60; train: 48; held-out: 12)" in out


def test_a_bad_prompt_file_is_named_before_any_work(tmp_path):
    for content, msg in ((b"caf\xe9\n", "not a UTF-8 text file"), (b"\n  \n", "holds no prompt")):
        f = tmp_path / "prompts.txt"
        f.write_bytes(content)
        with pytest.raises(SystemExit, match=f"--prompts {f}: {msg}"):
            evaluate.load_prompts(evaluate.Args(prompts=str(f)), toy_world=False)

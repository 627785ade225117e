"""evaluate.py's faults end in one line and lose nothing: a damaged model (a truncated export, adapter or checkpoint
data file, an unreadable .metadata) is named with its file before any work; a run folder of other settings or
weights is refused when finished and set aside when not; leftover temporary files are not images; an --out that
cannot be written is said in one line; a non-finite sample on one rank of two stops both, rank 0 saying why and the
other quiet."""
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import evaluate  # noqa: E402
from launch import eval_models
from policy.families import folder_problem  # noqa: E402
from policy.weights import safetensors_problem  # noqa: E402
from conftest import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
WEIGHTS = "diffusion_pytorch_model.safetensors"


def argv(model, prompts, out, *more):
    return ["--model", str(model), "--prompts", str(prompts), "--out", str(out), "--steps", "2", "--per-prompt", "1",
            "--batch-size", "3", "--device", "cpu", "--metrics", "toy-clean", *more]


def cut(file: Path, keep: int):
    file.write_bytes(file.read_bytes()[:keep])


@pytest.fixture(scope="module")
def train_out(tiny_model, tmp_path_factory):
    """What train.py leaves, written by hand: final/ (a copy of the tiny model), ckpt_000001/ (its transformer as a
    DCP checkpoint; no state.json nor rng files: evaluation does not read them), a LoRA export with a fake adapter."""
    import torch.distributed.checkpoint as dcp
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file
    model, _ = tiny_model
    out = tmp_path_factory.mktemp("faults") / "run"
    shutil.copytree(model, out / "final")
    (out / "args.json").write_text(json.dumps({"model": str(model)}))
    state = FluxTransformer2DModel.from_pretrained(model / "transformer").state_dict()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process")
        dcp.save({"model": state}, checkpoint_id=str(out / "ckpt_000001"), no_dist=True)
    (out / "lora").mkdir()
    save_file({"transformer.x.lora_A.weight": torch.zeros(64, 8)}, out / "lora" / "pytorch_lora_weights.safetensors")
    (out / "lora" / "lora.json").write_text(json.dumps({"base": str(model)}))
    return out


def damaged(train_out, tmp_path, what) -> tuple:
    """(the model folder to pass, the file damaged, the words expected): a copy of train_out with one file damaged."""
    run = tmp_path / "run"
    shutil.copytree(train_out, run)
    ckpt = run / "ckpt_000001"
    distcp = sorted(ckpt.glob("*.distcp"))[0]
    size = lambda f: f.stat().st_size  # noqa: E731
    if what == "export":
        f = run / "final" / "transformer" / WEIGHTS
        full = size(f)
        cut(f, full - 100)
        return run / "final", f"model run-final: model folder {run / 'final'}: transformer/{WEIGHTS}: truncated: " \
                              f"{full - 100} of {full} bytes"
    if what == "lora":
        f = run / "lora" / "pytorch_lora_weights.safetensors"
        full = size(f)
        cut(f, 500)
        return run / "lora", f"model lora: adapter {run / 'lora'}: pytorch_lora_weights.safetensors: truncated: " \
                             f"500 of {full} bytes"
    if what == "distcp cut":
        full = size(distcp)
        cut(distcp, full // 2)
        return ckpt, f"model run-ckpt_000001: checkpoint {ckpt}: {distcp.name} is truncated ({full // 2} of "
    if what == "distcp missing":
        distcp.unlink()
        return ckpt, f"model run-ckpt_000001: checkpoint {ckpt}: {distcp.name} is missing"
    if what == "metadata missing":  # a checkpoint is not recognised without it: named from its .distcp files
        (ckpt / ".metadata").unlink()
        return ckpt, f"--model {ckpt}: a checkpoint without its .metadata (written last: the save was cut short)"
    (ckpt / ".metadata").write_bytes(b"not a pickle")
    return ckpt, f"model run-ckpt_000001: checkpoint {ckpt}: .metadata is unreadable ("


@pytest.mark.parametrize("what", ["export", "lora", "distcp cut", "distcp missing", "metadata", "metadata missing"])
def test_a_damaged_model_is_named_with_its_file_before_any_work(tiny_model, train_out, tmp_path, what):
    """One line naming the model, the file and what is wrong; no run folder is started (nothing to set aside)."""
    model, expected = damaged(train_out, tmp_path, what)
    with pytest.raises(SystemExit) as e:
        evaluate.main(argv(model, tiny_model[1], tmp_path / "eval"))
    line = str(e.value.code)
    assert line.startswith(f"evaluate.py: {expected}") and "\n" not in line, line
    assert not (tmp_path / "eval").exists() or not any((tmp_path / "eval").iterdir())


def test_whole_models_pass_the_checks(tiny_model, train_out):
    for spec in ("final", "ckpt_000001", "lora"):
        assert eval_models.model_problem(eval_models.resolve_model(str(train_out / spec))) == "", spec


def test_safetensors_problem_from_the_header_alone(tiny_model, tmp_path):
    f = tiny_model[0] / "transformer" / WEIGHTS
    data, g = f.read_bytes(), tmp_path / "x.safetensors"
    assert safetensors_problem(f) == ""
    g.write_bytes(data[:-1])
    assert safetensors_problem(g) == f"truncated: {len(data) - 1} of {len(data)} bytes"
    g.write_bytes(data[:20])
    assert re.fullmatch(r"truncated: 20 of at least \d+ bytes \(cut in its header\)", safetensors_problem(g))
    g.write_bytes(data + b"\0")
    assert safetensors_problem(g) == f"damaged: {len(data) + 1} bytes, its header describes {len(data)}"
    for junk, why in ((b"", "not a safetensors file (empty)"),
                      (b"<html>404 not found</html>", "not a safetensors file"),
                      (b"\x05\0\0\0\0\0\0\0hello", "not a safetensors file (its header is not JSON)")):
        g.write_bytes(junk)
        assert safetensors_problem(g).startswith(why), junk
    assert safetensors_problem(tmp_path / "none.safetensors") == "missing"
    folder = tmp_path / "model"
    shutil.copytree(tiny_model[0], folder)
    (folder / "transformer" / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "diffusion_pytorch_model-00002-of-00002.safetensors"}}))
    assert folder_problem(folder) == "transformer/diffusion_pytorch_model-00002-of-00002.safetensors is missing " \
                                     "(transformer/diffusion_pytorch_model.safetensors.index.json names it)"


def test_other_settings_refused_when_finished_set_aside_when_not(tiny_model, tmp_path, capsys):
    """A finished evaluation is never replaced unasked; an unfinished one of other settings is moved aside (images
    kept) or removed (no image yet) and the rerun goes on; one of the same settings resumes, and the hidden
    temporary files of killed atomic writes are removed, not taken for images."""
    model, prompts = tiny_model
    out, run = tmp_path / "eval", tmp_path / "eval" / "model"
    evaluate.main(argv(model, prompts, out))
    other = argv(model, prompts, out, "--shift", "2.0")
    with pytest.raises(SystemExit, match=re.escape(f"evaluate.py: {run} holds a finished evaluation with other "
                                                   "settings: give this one another name (--names) or another --out, "
                                                   f"or delete {run} to replace it")):
        evaluate.main(other)
    (run / "results.json").unlink()  # as if killed before the end: 6 images of shift 3 on disk
    capsys.readouterr()
    evaluate.main(other)
    said = capsys.readouterr().out
    aside = [p for p in out.iterdir() if p.name.startswith("model.other-")]
    assert len(aside) == 1 and len(list((aside[0] / "images").glob("*.png"))) == 6  # kept, not reused
    assert f"{run}: an unfinished evaluation with other settings (6 images): moved to {aside[0]}" in said
    assert "6 images sampled, 0 found on disk" in said
    assert json.loads((run / "results.json").read_text())["settings"]["shift"] == 2.0
    for f in list((run / "images").iterdir()) + [run / "results.json", run / "scores.jsonl"]:  # started, not sampled
        f.unlink()
    evaluate.main(argv(model, prompts, out, "--shift", "2.5"))
    assert f"{run}: an unfinished evaluation with other settings and no image yet: removed" in capsys.readouterr().out
    # the same settings, killed: two images lost, leftovers of atomic writes beside them
    (run / "results.json").unlink()
    for f in ("00001_00.png", "00004_00.png"):
        (run / "images" / f).unlink()
    leftovers = [run / "images" / ".00001_00.tmp0123456789abcdef.png", run / ".scores.tmpfedcba9876543210.jsonl"]
    for f in leftovers:
        f.write_bytes(b"half")
    evaluate.main(argv(model, prompts, out, "--shift", "2.5"))
    said = capsys.readouterr().out
    assert "2 images sampled, 4 found on disk, 0 scores computed" in said and "removed" not in said
    assert not any(f.exists() for f in leftovers) and len(list(out.glob("model.other-*"))) == 1


def test_an_out_that_cannot_be_written_is_one_line(tiny_model, tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match=re.escape(f"evaluate.py: --out {tmp_path / 'file'} is a file, not a folder")):
        evaluate.main(argv(*tiny_model, tmp_path / "file"))


def test_a_non_finite_sample_on_one_rank_stops_both(tiny_model, tmp_path):
    """Rank 1 samples NaN (prompt 4: batch 1 of 2); rank 0 finishes its batch, then both stop: rank 0 says the line
    once, rank 1 is quiet, neither prints a traceback; rank 0's images are kept."""
    model, prompts = tiny_model
    script = tmp_path / "nan.py"
    script.write_text(
        f"import sys\nsys.path.insert(0, {str(ROOT)!r})\nimport evaluate\nfrom policy.interface import Policy\nreal = Policy.sample\n"
        "def sample(policy, prompts, seeds, *a, **k):\n    x = real(policy, prompts, seeds, *a, **k)\n"
        "    x[[s == 46 for s in seeds]] = float('nan')\n    return x\n"
        "Policy.sample = sample\nevaluate.main(sys.argv[1:])\n")
    logs = tmp_path / "logs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), "--log-dir", str(logs), "--redirects", "3", str(script),
           *argv(model, prompts, tmp_path / "eval")]
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    rank = {k: "".join(f.read_text() for f in sorted(logs.rglob(f"attempt_0/{k}/*.log"))) for k in (0, 1)}
    line = "evaluate.py: model sampled a non-finite image (prompt 4, seed 46): a diverged model is not scored"
    assert rank[0].count(line) == 1 and "Traceback" not in rank[0], rank[0][-3000:]
    assert rank[1].strip() == "", rank[1][-3000:]  # quiet: exit status 1, nothing printed
    assert sorted(p.name for p in (tmp_path / "eval" / "model" / "images").glob("*.png")) == \
        ["00000_00.png", "00001_00.png", "00002_00.png"]


@pytest.mark.parametrize("more,says", [(["--dtype", "fp16"], "--dtype fp16: bf16 or fp32"),
                                       (["--device", "tpu"], "--device tpu: cuda or cpu"),
                                       (["--shift", "-1"], "--shift -1.0: must be a finite number > 0"),
                                       (["--height", "17"], "--height 17: must be a multiple of 2 for")])
def test_flags_a_library_would_refuse_are_one_line_before_any_work(tiny_model, tmp_path, more, says):
    model, prompts = tiny_model
    with pytest.raises(SystemExit, match=re.escape(says)):
        evaluate.main(argv(model, prompts, tmp_path / "eval", *more))
    assert not (tmp_path / "eval" / model.name).exists()  # no run folder started

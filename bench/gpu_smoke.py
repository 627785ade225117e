"""The whole GPU path in a GPU's first ten minutes: train.py and evaluate.py end to end on a tiny FLUX built
from configs (nothing downloaded), then the kernel-level gpu_check. One PASS/FAIL line per step; every step
runs even when an earlier one failed; results.md and results.json under --out; exit 1 if any step failed.

    python bench/gpu_smoke.py                      # = make gpu-smoke: NCCL on the GPUs
    SMOKE_DEVICE=cpu python bench/gpu_smoke.py     # the same on gloo, on the CPU (--device cpu)
    python bench/gpu_smoke.py --list               # the steps
    python bench/gpu_smoke.py --steps env,build,train-ws1    # some of them (names or shell patterns)

Steps (each a subprocess with a timeout; its output in OUT/logs/STEP.log):
  env               torch, CUDA, driver, GPUs, the project's packages; on cuda: a GPU must be usable
  build             OUT/work: a tiny FLUX.1 (tests/tiny_flux.py: the real classes, a VAE, CLIP and T5 encoders,
                    random weights, 32x32 px), prompt files, and tiny random reward models of every kind the
                    registry knows: HPS and CLIP (open_clip), PickScore (transformers CLIP), ImageReward (BLIP,
                    ImageReward.pt's key layout), UnifiedReward (a local Qwen2.5-VL folder)
  train-ws1         python train.py: bf16, reward PickScore, probes every iteration (CLIP not trained on),
                    checkpoints every 2, 3 iterations; then checks metrics, ckpt_000002, probes, best/, final/
  train-ws1-resume  the same run continued to iteration 4 with --resume (resumes.jsonl, ckpt_000004, final/)
  train-ws2         torchrun --nproc_per_node 2 train.py (NCCL on 2 GPUs; on one GPU, as train.py places two ranks)
  train-ws2-resume  and its --resume
  train-lora        LoRA rank 4, every trained step in one pass (--rescore-batch 0), activation checkpointing;
                    2 processes (FSDP2 over a frozen bf16 base) on the CPU or 2 GPUs, else 1
  train-hsdp        --replicas 2 on 4 processes (2 x 2) where 4 GPUs or the CPU, else on 2 (2 x 1)
  eval-ws1-MODEL    python evaluate.py with all five metrics (hps, clip, pickscore, imagereward, unifiedreward)
  eval-ws2-MODEL    torchrun --nproc_per_node 2 evaluate.py, the same
  equal-MODEL       the two: the same PNGs and exactly the same scores
                    MODEL: base (the tiny FLUX), export (train-ws1's final/), ckpt (train-ws1's newest DCP
                    checkpoint, read over the base), lora (train-lora's adapter)
  train-FAMILY      the other families (policy/families.py): a tiny Stable Diffusion 3.5 and a tiny Qwen-Image
                    (tests/tiny_sd3.py, tests/tiny_qwen_image.py: the real classes, built by the step), LoRA rank 4,
                    bf16, classifier-free guidance, 2 iterations on 2 processes where two devices (else 1), checkpoint
                    after 1, then evaluate.py (PickScore) on the export
  gpu-check         bench/gpu_check.py (on the CPU: --device cpu --tiny)

HPS is read by evaluate.py with the architecture ViT-H-14 (no flag chooses another): the eval steps run
evaluate.py through this file (`gpu_smoke.py _exec evaluate.py ...`), which first registers a tiny open_clip
config under that name (--hps-arch would make this unnecessary). Everything else runs train.py, evaluate.py
and gpu_check.py as a user would.
"""
import argparse
import fnmatch
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METRICS = ("hps", "clip", "pickscore", "imagereward", "unifiedreward")
MODELS = ("base", "export", "ckpt", "lora")
FAMILIES = {"sd3": ("tiny_sd3", "save_tiny_sd3"), "qwen-image": ("tiny_qwen_image", "save_tiny_qwen_image")}
TRAIN_PROMPTS = ["a red house", "a blue sky", "a photo of a cat", "a green tree", "a small dog on the mat",
                 "a big red tree"]
PROBE_PROMPTS = ["a cat in the sky", "a blue house with a tree"]
EVAL_PROMPTS = ["a dog on the house", "a green sky", "a small blue cat"]
SIZE = 32  # px; the tiny VAE downsamples 2x: 16 x 16 latents, 64 image tokens
# the tiny open_clip model of HPS and CLIP (tests/test_rewards.py's, ViT-H-14's layout thousands of times smaller)
TINY_OPEN_CLIP = {"embed_dim": 16,
                  "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
                  "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
HPS_ARCH = "ViT-H-14"  # rewards.clip.load_hps's default: evaluate.py has no flag for another


# ------------------------------------------------------------------------------------------------
# the work folder: tiny models, prompts, reward models (the `build` step, run as `gpu_smoke.py _build WORK`)
# ------------------------------------------------------------------------------------------------
def paths(work: Path) -> dict:
    w = Path(work)
    return {"flux": w / "flux", "prompts": w / "prompts.txt", "probes": w / "probe_prompts.txt",
            "eval_prompts": w / "eval_prompts.txt", "arch": w / "open_clip_arch", "hps": w / "hps" / "HPS_tiny.pt",
            "clip": w / "clip", "pick_model": w / "pickscore" / "model", "pick_proc": w / "pickscore" / "processor",
            "ir_ckpt": w / "imagereward" / "ImageReward.pt", "ir_tok": w / "imagereward" / "bert",
            "ur": w / "unifiedreward", "built": w / "built.json",
            **{family: w / family for family in FAMILIES}}


def build(work: Path):
    """Write everything the steps need into `work`; built.json last (its presence = the build finished)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    import torch
    p = paths(work)
    work.mkdir(parents=True, exist_ok=True)
    p["built"].unlink(missing_ok=True)
    t0 = time.time()

    import tiny_flux  # the tests' tiny FLUX.1: real classes, random weights, in-memory vocabularies
    tiny_flux.save_tiny_flux(p["flux"])
    (p["flux"] / "g2rpo.json").write_text(json.dumps({"height": SIZE, "width": SIZE, "max_sequence_length": 32}))
    print(f"tiny FLUX (VAE, CLIP + T5 encoders) in {p['flux']} ({time.time() - t0:.1f} s)", flush=True)
    for key, prompts in (("prompts", TRAIN_PROMPTS), ("probes", PROBE_PROMPTS), ("eval_prompts", EVAL_PROMPTS)):
        p[key].write_text("\n".join(prompts) + "\n")

    import open_clip  # HPS (ViT-H-14 shadowed by the tiny config) and CLIP (an open_clip folder)
    p["arch"].mkdir(parents=True, exist_ok=True)
    (p["arch"] / f"{HPS_ARCH}.json").write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(p["arch"])
    torch.manual_seed(0)
    hps = open_clip.create_model(HPS_ARCH, pretrained=None).eval()
    p["hps"].parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": hps.state_dict()}, p["hps"])
    torch.manual_seed(1)
    clip = open_clip.create_model(HPS_ARCH, pretrained=None).eval()
    p["clip"].mkdir(parents=True, exist_ok=True)
    pre = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "interpolation": "bicubic", "resize_mode": "squash"}
    (p["clip"] / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_OPEN_CLIP, "preprocess_cfg": pre}))
    torch.save(clip.state_dict(), p["clip"] / "open_clip_pytorch_model.bin")

    import math  # PickScore: a transformers CLIPModel and a CLIP processor with CLIP's own BPE (from open_clip)
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer
    torch.manual_seed(2)
    cfg = CLIPConfig(text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=77),
                     vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37,
                                        num_hidden_layers=1, num_attention_heads=2),
                     projection_dim=16, logit_scale_init_value=math.log(100.0))
    CLIPModel(cfg).eval().save_pretrained(p["pick_model"])
    bpe = open_clip.tokenizer.SimpleTokenizer()
    merges = [m for m, _ in sorted(bpe.bpe_ranks.items(), key=lambda kv: kv[1])]
    special = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    tok = CLIPTokenizer(vocab={special.get(k, k): v for k, v in bpe.encoder.items()}, merges=merges)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer=tok).save_pretrained(p["pick_proc"])

    import test_imagereward  # ImageReward.pt's key layout at a small width, and a BERT vocabulary
    p["ir_ckpt"].parent.mkdir(parents=True, exist_ok=True)
    torch.save(test_imagereward.tiny_state(0), p["ir_ckpt"])
    test_imagereward.write_tokenizer(str(p["ir_tok"]))

    import test_unifiedreward  # a Qwen2.5-VL of the real classes; zero_head: it always answers a parsable score
    test_unifiedreward.save_tiny_qwen(p["ur"], zero_head=True)
    p["built"].write_text(json.dumps({"sec": time.time() - t0}))
    print(f"reward models (HPS, CLIP, PickScore, ImageReward, UnifiedReward) in {work} ({time.time() - t0:.1f} s)")


def exec_script(script: str, args: list):
    """Run SCRIPT (train.py, evaluate.py) as __main__ after registering the tiny open_clip config under
    ViT-H-14 (from $SMOKE_OPEN_CLIP_ARCH), so that HPS loads the tiny checkpoint; torchrun can launch this."""
    import runpy
    import open_clip
    open_clip.add_model_config(os.environ["SMOKE_OPEN_CLIP_ARCH"])
    path = str((ROOT / script).resolve())
    sys.path.insert(0, str(ROOT))
    sys.argv = [path, *args]
    runpy.run_path(path, run_name="__main__")


# ------------------------------------------------------------------------------------------------
# the steps
# ------------------------------------------------------------------------------------------------
@dataclass
class Ctx:
    device: str  # cuda or cpu
    out: Path
    work: Path
    gpus: int  # CUDA devices visible (0 on the CPU)
    timeout: float
    step_args: dict = field(default_factory=dict)  # step name -> extra flags (tests inject failures with it)
    score_tol: float = 0.0  # equal-*: largest |score at world size 1 - at world size 2| accepted

    @property
    def p(self):
        return paths(self.work)


@dataclass
class Step:
    name: str
    what: str
    commands: object  # ctx -> [argv, ...] run in order (stopping at the first failure), or None
    check: object = None  # ctx, log text -> '' when fine, 'note: ...' when fine with a remark, else why not
    clean: tuple = ()  # folders under the work folder removed first (a rerun never passes on an older run's files)
    ranks: int = 1  # processes it needs, each with a GPU of its own on cuda (NCCL refuses two ranks on one GPU)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher(nproc: int) -> list:
    if nproc == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port())]


def train_flags(c: Ctx, out: Path) -> list:
    p = c.p
    return ["--model", str(p["flux"]), "--prompts", str(p["prompts"]), "--out", str(out),
            "--reward", "pickscore", "--pickscore-model", str(p["pick_model"]),
            "--pickscore-processor", str(p["pick_proc"]), "--G", "3", "--T", "4", "--Lambda", "1", "2",
            "--sde-steps", "0", "1", "--lr", "3e-3", "--clip-range", "0.05", "--mixed-precision", "bf16",
            "--num-samples", "2", "--device", c.device]


def guard_flags(c: Ctx) -> list:
    p = c.p
    return ["--probe-every", "1", "--probe-prompts", str(p["probes"]), "--probe-seeds", "1",
            "--probe-rewards", "clip", "--clip-model", str(p["clip"]), "--probe-tolerance", "1e6"]


def train_run(world: int, resume: bool):
    def commands(c: Ctx):
        out = c.work / f"train-ws{world}"
        its = ["--iterations", "4", "--resume"] if resume else ["--iterations", "3", "--overwrite"]
        name = f"train-ws{world}" + ("-resume" if resume else "")
        return [launcher(world) + [str(ROOT / "train.py"), *train_flags(c, out), *guard_flags(c),
                                   "--checkpoint-every", "2", *its, *c.step_args.get(name, [])]]
    return commands


def jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def check_train(world: int, resume: bool):
    def check(c: Ctx, log: str) -> str:
        out = c.work / f"train-ws{world}"
        its = [m["iteration"] for m in jsonl(out / "metrics.jsonl")]
        want = [1, 2, 3, 4] if resume else [1, 2, 3]
        if its != want:
            return f"metrics.jsonl iterations {its}, expected {want}"
        if f"world size {world}" not in log:
            return f"'world size {world}' not in the log"
        bad = [m["iteration"] for m in jsonl(out / "metrics.jsonl") if m["skipped"] or not m["optimizer_steps"]]
        if bad:
            return f"no update at iteration(s) {bad}"
        ckpts = sorted(q.name for q in out.glob("ckpt_*"))
        if ckpts != (["ckpt_000002", "ckpt_000004"] if resume else ["ckpt_000002"]):
            return f"checkpoints {ckpts}"
        if resume and [r["iteration"] for r in jsonl(out / "resumes.jsonl")] != [2]:
            return f"resumes.jsonl: {jsonl(out / 'resumes.jsonl')} (expected a resume at iteration 2)"
        probes = jsonl(out / "probes.jsonl")
        if [r["iteration"] for r in probes] != list(range(len(want) + 1)):
            return f"probes.jsonl iterations {[r['iteration'] for r in probes]}"
        if any(set(r["rewards"]) != {"clip", "pickscore"} for r in probes):
            return f"probes scored {sorted(probes[-1]['rewards'])}, expected clip and pickscore"
        if not (out / "final" / "transformer").is_dir():
            return "no final/transformer"
        best = [r["iteration"] for r in probes if r.get("best") and r["iteration"] > 0]
        if best and not (out / "best" / "transformer").is_dir():
            return f"the guard found a best model at iteration {best[-1]} but best/ holds no transformer"
        if not best and (out / "best").exists():
            return "best/ written although no probe after iteration 0 was a new best"
        if resume and not best:  # the guard's choice depends on the numbers: say so, it is no failure
            return "note: no probe after iteration 0 beat the base model, so best/ was not exercised"
        return f"note: best/ from iteration {best[-1]}" if best else ""
    return check


def pair_world(c: Ctx) -> int:
    """2 where two ranks can each have a device (the CPU, 2 GPUs), else 1."""
    return 2 if c.device == "cpu" or c.gpus >= 2 else 1


def lora_commands(c: Ctx):
    out = c.work / "train-lora"
    return [launcher(pair_world(c)) + [
        str(ROOT / "train.py"), *train_flags(c, out), "--lora-rank", "4", "--lora-alpha", "8", "--rescore-batch", "0",
        "--activation-checkpointing", "--iterations", "2", "--checkpoint-every", "2", "--overwrite",
        *c.step_args.get("train-lora", [])]]


def check_lora(c: Ctx, log: str) -> str:
    out = c.work / "train-lora"
    m = jsonl(out / "metrics.jsonl")
    if [r["iteration"] for r in m] != [1, 2] or not all(r["optimizer_steps"] == 1 for r in m):
        return f"metrics.jsonl: {[(r['iteration'], r['optimizer_steps']) for r in m]}"
    if "LoRA rank 4" not in log:
        return "'LoRA rank 4' not in the log"
    if not (out / "final" / "lora.json").is_file() or (out / "final" / "transformer").exists():
        return "final/ is not an adapter folder (lora.json, no transformer/)"
    if not (out / "ckpt_000002" / "state.json").is_file():
        return "no ckpt_000002"
    return ""


def build_family(work: Path, family: str):
    """The tiny model of `family` in the work folder, as its pipeline's save_pretrained writes it (its step's first
    command: built only when the step runs)."""
    import importlib
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    module, save = FAMILIES[family]
    folder = paths(work)[family]
    getattr(importlib.import_module(module), save)(folder)
    (folder / "g2rpo.json").write_text(json.dumps({"height": SIZE, "width": SIZE, "max_sequence_length": 16}))
    print(f"tiny {family} in {folder}", flush=True)


def family_run(family: str):
    def commands(c: Ctx):
        out = c.work / f"train-{family}"
        flags = train_flags(c, out)
        flags[flags.index("--model") + 1] = str(c.p[family])
        return [[sys.executable, str(ROOT / "bench" / "gpu_smoke.py"), "_build_family", str(c.work), family],
                launcher(pair_world(c)) + [str(ROOT / "train.py"), *flags, "--lora-rank", "4", "--lora-alpha", "8",
                                           "--iterations", "2", "--checkpoint-every", "1", "--overwrite",
                                           *c.step_args.get(f"train-{family}", [])],
                [sys.executable, str(ROOT / "evaluate.py"), "--model", str(out / "final"), "--prompts",
                 str(c.p["eval_prompts"]), "--metrics", "pickscore", "--pickscore-model", str(c.p["pick_model"]),
                 "--pickscore-processor", str(c.p["pick_proc"]), "--steps", "2", "--out", str(c.work / f"eval-{family}"),
                 "--device", c.device]]
    return commands


def check_family(family: str):
    def check(c: Ctx, log: str) -> str:
        out = c.work / f"train-{family}"
        m = jsonl(out / "metrics.jsonl")
        if [r["iteration"] for r in m] != [1, 2] or not all(r["optimizer_steps"] == 1 for r in m):
            return f"metrics.jsonl: {[(r['iteration'], r['optimizer_steps']) for r in m]}"
        if "x2 transformer rows: classifier-free guidance" not in log:
            return "the start-up line does not count the guided rows twice"
        if not (out / "final" / "lora.json").is_file():
            return "final/ is not an adapter folder"
        res = c.work / f"eval-{family}" / f"train-{family}-final" / "results.json"
        if not res.is_file() or "pickscore" not in json.loads(res.read_text())["metrics"]:
            return f"no PickScore in {res}"
        return ""
    return check


def hsdp_world(c: Ctx) -> int:
    return 4 if c.device == "cpu" or c.gpus >= 4 else 2


def hsdp_commands(c: Ctx):
    return [launcher(hsdp_world(c)) + [str(ROOT / "train.py"), *train_flags(c, c.work / "train-hsdp"),
                                       "--replicas", "2", "--iterations", "1", "--checkpoint-every", "1",
                                       "--overwrite", *c.step_args.get("train-hsdp", [])]]


def check_hsdp(c: Ctx, log: str) -> str:
    want = f"HSDP 2 x {hsdp_world(c) // 2}"
    if want not in log:
        return f"'{want}' not in the log"
    out = c.work / "train-hsdp"
    if [r["optimizer_steps"] for r in jsonl(out / "metrics.jsonl")] != [1]:
        return "no update in metrics.jsonl"
    if not (out / "final" / "transformer").is_dir() or not (out / "ckpt_000001" / "state.json").is_file():
        return "no final/ or no ckpt_000001"
    return ""


def model_path(c: Ctx, model: str) -> Path:
    if model == "base":
        return c.p["flux"]
    if model == "export":
        return c.work / "train-ws1" / "final"
    if model == "lora":
        return c.work / "train-lora" / "final"
    ckpts = sorted((c.work / "train-ws1").glob("ckpt_[0-9]*[0-9]"))
    return ckpts[-1] if ckpts else c.work / "train-ws1" / "ckpt_000004"


def eval_flags(c: Ctx) -> list:
    p = c.p
    return ["--prompts", str(p["eval_prompts"]), "--steps", "3", "--per-prompt", "2", "--batch-size", "3",
            "--device", c.device, "--metrics", ",".join(METRICS), "--hps-checkpoint", str(p["hps"]),
            "--clip-model", str(p["clip"]), "--pickscore-model", str(p["pick_model"]),
            "--pickscore-processor", str(p["pick_proc"]), "--imagereward-checkpoint", str(p["ir_ckpt"]),
            "--imagereward-tokenizer", str(p["ir_tok"]), "--unifiedreward-local", str(p["ur"]),
            "--unifiedreward-workers", "3"]


def eval_run(world: int, model: str):
    def commands(c: Ctx):
        name = f"eval-ws{world}-{model}"
        return [launcher(world) + [str(ROOT / "bench" / "gpu_smoke.py"), "_exec", "evaluate.py",
                                   "--model", str(model_path(c, model)), "--names", model,
                                   "--out", str(c.work / f"eval-ws{world}"), *eval_flags(c),
                                   *c.step_args.get(name, [])]]
    return commands


def check_eval(world: int, model: str):
    def check(c: Ctx, log: str) -> str:
        run = c.work / f"eval-ws{world}" / model
        if not (run / "results.json").is_file():
            return f"no {run / 'results.json'}"
        res = json.loads((run / "results.json").read_text())
        if list(res["metrics"]) != list(METRICS):
            return f"metrics {list(res['metrics'])} (skipped: {res.get('skipped')}), expected all of {METRICS}"
        rows = jsonl(run / "scores.jsonl")
        if len(rows) != 2 * len(EVAL_PROMPTS):
            return f"{len(rows)} scored images, expected {2 * len(EVAL_PROMPTS)}"
        unscored = sorted({m for r in rows for m in METRICS if r["scores"].get(m) is None})
        if unscored:
            return f"images without a score from {unscored}"
        if f"world size {world}" not in log:
            return f"'world size {world}' not in the log"
        return ""
    return check


def check_equal(model: str):
    def check(c: Ctx, log: str) -> str:
        a, b = (c.work / f"eval-ws{w}" / model for w in (1, 2))
        for run in (a, b):
            if not (run / "scores.jsonl").is_file():
                return f"no {run / 'scores.jsonl'} (its eval step failed)"
        sa, sb = ({r["index"]: r for r in jsonl(run / "scores.jsonl")} for run in (a, b))
        if sorted(sa) != sorted(sb):
            return f"images {sorted(sa)} vs {sorted(sb)}"
        png = [i for i in sa if (a / sa[i]["file"]).read_bytes() != (b / sb[i]["file"]).read_bytes()]
        diff = {m: max(abs((sa[i]["scores"][m] or 0) - (sb[i]["scores"][m] or 0)) for i in sa) for m in METRICS}
        differ = {m: d for m, d in diff.items() if d > c.score_tol or any((sa[i]["scores"][m] is None) !=
                                                                          (sb[i]["scores"][m] is None) for i in sa)}
        if png or differ:
            return (f"world size 1 vs 2: {len(png)} of {len(sa)} PNGs differ; largest score differences "
                    + ", ".join(f"{m} {d:.3g}" for m, d in differ.items()))
        return f"note: scores within --score-tol {c.score_tol:g}: " + ", ".join(
            f"{m} {d:.3g}" for m, d in diff.items() if d) if any(diff.values()) else ""
    return check


def gpu_check_commands(c: Ctx):
    cpu = ["--device", "cpu", "--tiny", "--peak-tflops", "0.1", "--warmup", "1", "--repeats", "1", "--T", "4",
           "--rollout-batches", "12", "--train-batches", "1,2"] if c.device == "cpu" else []
    return [[sys.executable, str(ROOT / "bench" / "gpu_check.py"), *cpu, "--out", str(c.work / "gpu-check"),
             *c.step_args.get("gpu-check", [])]]


def check_gpu_check(c: Ctx, log: str) -> str:
    f = c.work / "gpu-check" / "results.json"
    if not f.is_file():
        return f"no {f}"
    res = json.loads(f.read_text())
    errors = [r["name"] for r in res["rows"] if r.get("error")]
    return f"rows with errors: {errors}" if errors else ("" if res["drift"] else "no PPO-ratio rows")


ENV_CODE = r"""
import importlib, json, os, subprocess, sys
import torch
info = {"python": sys.version.split()[0], "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(), "gpus": torch.cuda.device_count()}
if torch.cuda.is_available():
    info["gpu_names"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    torch.ones(8, device="cuda").sum().item()  # a kernel runs
try:
    info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=30).stdout.strip() or None
except (OSError, subprocess.SubprocessError):
    info["driver"] = None
for mod in ("torchvision", "diffusers", "transformers", "open_clip", "peft", "accelerate", "tyro", "numpy", "scipy",
            "safetensors", "sentencepiece", "PIL", "matplotlib", "tqdm"):
    try:
        info[mod] = getattr(importlib.import_module(mod), "__version__", "?")
    except Exception as e:
        info[mod] = f"MISSING ({type(e).__name__}: {e})"
print(json.dumps(info, indent=1))
missing = [m for m, v in info.items() if isinstance(v, str) and v.startswith("MISSING")]
if missing:
    sys.exit(f"missing or broken packages: {missing}")
if os.environ["SMOKE_WANT"] == "cuda" and not torch.cuda.is_available():
    sys.exit(f"no usable CUDA device for torch {torch.__version__} (built for CUDA {torch.version.cuda}); driver "
             f"{info['driver']}: a driver older than the CUDA torch was built for leaves torch without a GPU")
"""


def steps() -> list:
    s = [Step("env", "versions, GPUs, packages", lambda c: [[sys.executable, "-c", ENV_CODE]]),
         Step("build", "tiny FLUX and tiny reward models of every kind",
              lambda c: [[sys.executable, str(ROOT / "bench" / "gpu_smoke.py"), "_build", str(c.work)]],
              lambda c, log: "" if c.p["built"].is_file() else "built.json not written")]
    for world in (1, 2):
        for resume in (False, True):
            s.append(Step(f"train-ws{world}" + ("-resume" if resume else ""),
                          f"train.py world size {world}, bf16, probes, checkpoints" + (", --resume" if resume else ""),
                          train_run(world, resume), check_train(world, resume), ranks=world))
    s.append(Step("train-lora", "LoRA, one pass, activation checkpointing", lora_commands, check_lora))
    s.append(Step("train-hsdp", "HSDP --replicas 2", hsdp_commands, check_hsdp, ranks=2))
    for model in MODELS:
        for world in (1, 2):
            s.append(Step(f"eval-ws{world}-{model}", f"evaluate.py world size {world}, {model}, all five metrics",
                          eval_run(world, model), check_eval(world, model), (f"eval-ws{world}/{model}",), world))
        s.append(Step(f"equal-{model}", f"{model}: the same PNGs and scores at world sizes 1 and 2", None,
                      check_equal(model), ranks=2))
    for family in FAMILIES:
        s.append(Step(f"train-{family}", f"tiny {family}: LoRA, bf16, guidance, 2 iterations; evaluate.py on the export",
                      family_run(family), check_family(family), (f"train-{family}", f"eval-{family}")))
    s.append(Step("gpu-check", "bench/gpu_check.py", gpu_check_commands, check_gpu_check, ("gpu-check",)))
    return s


# ------------------------------------------------------------------------------------------------
# running them
# ------------------------------------------------------------------------------------------------
HINTS = [(re.compile(r"invalid device ordinal|Duplicate GPU detected|ncclInvalidUsage|needs GPU \d+, but \d+ (is|are) "
                     r"visible"), "two ranks on one GPU: not supported by train.py/evaluate.py (NCCL refuses two "
          "ranks per GPU)"),
         (re.compile(r"CUDA driver version is insufficient|found no NVIDIA driver|driver on your system is too old"),
          "the NVIDIA driver is older than this torch's CUDA needs (README: GPU node)")]


def reason(log: str) -> str:
    """One line saying why a command failed: a hint for known causes, else the last error-like line of the
    command's own output (torchrun's closing traceback and failure summary are passed over)."""
    for pattern, hint in HINTS:
        if m := pattern.search(log):
            line = log[log.rfind("\n", 0, m.start()) + 1:].split("\n", 1)[0].strip()
            return f"{hint}: {line}"[:300]
    lines = [l.rstrip() for l in log.splitlines() if l.strip() and not l.startswith("$ ")
             and not re.match(r"[EWI]\d{4} \d\d:\d\d:\d\d", l)]  # torchrun's own log lines
    launcher = next((i for i, l in enumerate(lines) if "ChildFailedError" in l), None)
    if launcher is not None:  # from torchrun's own traceback (the last one before its ChildFailedError) on
        lines = lines[:max((k for k in range(launcher) if "Traceback (most recent" in lines[k]), default=launcher)]
    for i in reversed(range(len(lines))):
        if re.search(r"Error|error:|Exception|train\.py:|evaluate\.py:|gpu_check:|Traceback|Killed|exit", lines[i]):
            more = []  # a message ending in ':' with its indented lines (train.py's list of invalid arguments)
            while lines[i].endswith(":") and i + 1 + len(more) < len(lines) and len(more) < 3 \
                    and lines[i + 1 + len(more)][:1].isspace():
                more.append(lines[i + 1 + len(more)].strip())
            return " ".join([lines[i].strip(), *more])[:300]
    return lines[-1].strip()[:300] if lines else "no output"


def run_command(cmd: list, log, timeout: float, env: dict):
    """(return code or None on timeout). The command runs in its own process group, killed whole on timeout."""
    log.write(f"$ {shlex.join(cmd)}\n")
    log.flush()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return None


def run_step(step: Step, c: Ctx, env: dict) -> dict:
    t0, log_path = time.time(), c.out / "logs" / f"{step.name}.log"
    if c.device == "cuda" and step.ranks > c.gpus:  # cannot be run here: said, not failed
        return {"step": step.name, "ok": True, "skipped": True, "sec": 0.0, "what": step.what, "log": "",
                "why": f"needs {step.ranks} GPUs, {c.gpus} visible: NCCL refuses two ranks on one GPU; "
                       "SMOKE_DEVICE=cpu runs it on gloo"}
    why = note = ""
    for folder in step.clean:
        shutil.rmtree(c.work / folder, ignore_errors=True)
    with open(log_path, "w") as log:
        try:
            for cmd in (step.commands(c) if step.commands else []):
                left = c.timeout - (time.time() - t0)
                rc = run_command(cmd, log, max(left, 1), env)
                if rc is None:
                    why = f"timed out after {c.timeout:g} s"
                elif rc != 0:
                    log.flush()
                    why = f"exit {rc}: {reason(log_path.read_text())}"
                if why:
                    break
            if not why and step.check:
                log.flush()
                why = step.check(c, log_path.read_text())
                log.write(f"\ncheck: {why or 'ok'}\n")
                if why.startswith("note: "):  # passed, with something worth a line
                    note, why = why.removeprefix("note: "), ""
        except Exception as e:  # a check that breaks is this step's failure, never the whole smoke's
            why = f"{type(e).__name__}: {e}"
            log.write(f"\n{why}\n")
    return {"step": step.name, "ok": not why, "sec": round(time.time() - t0, 1), "why": why or note,
            "what": step.what, "log": str(log_path)}


def selected(all_steps: list, spec: str) -> list:
    if not spec:
        return all_steps
    pats = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [p for p in pats if not any(fnmatch.fnmatchcase(s.name, p) for s in all_steps)]
    if unknown:
        raise SystemExit(f"gpu_smoke: no step matches {unknown}; steps: {[s.name for s in all_steps]}")
    return [s for s in all_steps if any(fnmatch.fnmatchcase(s.name, p) for p in pats)]


def markdown(res: dict) -> str:
    lines = [f"# gpu-smoke: {'PASS' if res['ok'] else 'FAIL'} ({res['passed']} of {len(res['steps'])} steps passed)",
             "", f"device {res['device']} ({res['gpus']} GPU(s)), torch {res['torch']}, {res['started']}, "
             f"{res['sec']:.0f} s", "", "| step | result | s | what | why (or a note) |", "|---|---|---|---|---|"]
    for r in res["steps"]:
        lines.append(f"| {r['step']} | {verdict(r)} | {r['sec']:.1f} | {r['what']} | "
                     f"{r['why'].replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def verdict(r: dict) -> str:
    return "SKIP" if r.get("skipped") else "PASS" if r["ok"] else "FAIL"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=os.environ.get("SMOKE_DEVICE") or "cuda", choices=("cuda", "cpu"),
                   help="cuda (NCCL; default) or cpu (gloo); default from $SMOKE_DEVICE")
    p.add_argument("--out", default="runs/gpu-smoke", help="results.md, results.json, logs/, work/")
    p.add_argument("--steps", default="", help="comma-separated step names or patterns (default: all)")
    p.add_argument("--timeout", type=float, default=300, help="seconds per step (a hung collective costs this once)")
    p.add_argument("--step-args", action="append", default=[], metavar="STEP=FLAGS",
                   help="extra flags for a step's command, e.g. train-ws1='--G 1' (repeatable)")
    p.add_argument("--score-tol", type=float, default=0.0,
                   help="equal-*: accept scores that differ by at most this between world sizes (default 0: equal)")
    p.add_argument("--list", action="store_true", help="print the steps and exit")
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_build"]:
        return build(Path(argv[1])) or 0
    if argv[:1] == ["_build_family"]:
        return build_family(Path(argv[1]), argv[2]) or 0
    if argv[:1] == ["_exec"]:
        return exec_script(argv[1], argv[2:]) or 0
    a = parse_args(argv)
    todo = selected(steps(), a.steps)
    if a.list:
        for s in steps():
            print(f"{s.name:18s} {s.what}")
        return 0
    step_args = {}
    for item in a.step_args:
        name, _, flags = item.partition("=")
        step_args[name] = shlex.split(flags)
    out = Path(a.out).resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    import torch  # only for the device count and the header; every step runs in its own process
    gpus = torch.cuda.device_count() if a.device == "cuda" else 0
    c = Ctx(a.device, out, out / "work", gpus, a.timeout, step_args, a.score_tol)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "SMOKE_WANT": a.device, "SMOKE_OPEN_CLIP_ARCH": str(c.p["arch"]),
           "G2RPO_CACHE": str(c.work / "cache"), "PYTHONPATH": os.pathsep.join(
               [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))}
    if a.device == "cpu":
        env["OMP_NUM_THREADS"] = "1"
    print(f"gpu-smoke: {len(todo)} steps on {a.device}" + (f" ({gpus} GPU(s))" if a.device == "cuda" else " (gloo)")
          + f", logs in {out / 'logs'}", flush=True)
    res = {"device": a.device, "gpus": gpus, "torch": torch.__version__, "python": platform.python_version(),
           "started": time.strftime("%Y-%m-%d %H:%M:%S"), "steps": [], "ok": True, "passed": 0, "sec": 0.0}
    t0 = time.time()
    for step in todo:
        r = run_step(step, c, env)
        res["steps"].append(r)
        note = f"; {r['why']}" if r["why"] else ""
        print(f"{verdict(r)} {step.name} ({r['sec']:.1f} s{note})" if r["ok"] else
              f"FAIL {step.name} ({r['why']}; {r['log']})", flush=True)
        res.update(ok=all(x["ok"] for x in res["steps"]), passed=sum(verdict(x) == "PASS" for x in res["steps"]),
                   sec=time.time() - t0)
        (out / "results.json").write_text(json.dumps(res, indent=1))  # after every step: a cut run keeps its lines
        (out / "results.md").write_text(markdown(res))
    skipped = sum(verdict(x) == "SKIP" for x in res["steps"])
    print(f"gpu-smoke: {res['passed']} of {len(todo)} steps passed{f', {skipped} skipped' if skipped else ''} in "
          f"{res['sec']:.0f} s: {out / 'results.md'}")
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

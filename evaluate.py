"""Evaluate models as the paper does: Table 1 (five preference metrics on the HPDv2 test prompts), Table 3 (the
same at 10 / 16 / 20 sampling steps), a Fig. 4-style grid, and run-against-run comparisons.

    python evaluate.py                                  # the toy world: its base model and its 60 prompts
    python evaluate.py --model runs/g2rpo/final         # what train.py exported (toy or FLUX)
    torchrun --nproc_per_node 8 evaluate.py --model /models/FLUX.1-dev runs/g2rpo/final --prompts hpdv2_test.txt \\
        --hps-checkpoint HPS_v2.1_compressed.pt --clip-model DFN5B-CLIP-ViT-H-14-378 ...   # README: every flag
    python evaluate.py --compare runs/eval/FLUX.1-dev runs/eval/g2rpo-final   # one table, differences to row 1

Models (--model, several allowed; each gets the same prompts and seeds)
    a diffusers FLUX folder: FLUX.1-dev, or <train out>/final as train.py exports it (same layout);
    a train.py checkpoint <train out>/ckpt_XXXXXX: the base model named in <train out>/args.json (or --base)
        with the checkpoint's "model" state read over its transformer (torch.distributed.checkpoint, no process
        group needed, fp32 master weights cast to the evaluation dtype);
    'toy' (the default): the toy world's base model, toy.base_model().
Prompts (--prompts FILE, one per line; empty lines are skipped and a prompt's index counts the others)
    The paper evaluates on the 400 prompts of the HPDv2 test split (the HPDv2 dataset's test.json, one caption
    per entry); any list works, e.g. the `hpsv2` benchmark's prompts. The toy world (no --prompts with toy
    models) uses toy.TRAIN_PROMPTS then toy.HELDOUT_PROMPTS, reported together and per group.
Sampling: deterministic ODE (Eq. 1) on sde.sigma_grid(steps, shift) through toy.sample, guidance 3.5.
    Image k of prompt j starts from x_T drawn with seed  --seed + j + 1_000_000 k  (nothing else). The images,
    in (j, k) order, are cut into fixed batches of --batch-size; batch b runs on rank b mod world. Every image is
    thus computed in the same batch, with the same numbers, on 1 or N processes; each prompt is encoded alone.
    (This matters on a GPU: in bf16 on an H200, batches of 4 instead of 16 changed every toy image, by up to
    7/255 per pixel.)
Metrics: HPS-v2.1, CLIP score, PickScore (rewards.py), ImageReward (imagereward.py), UnifiedReward
    (unifiedreward.py), each from local files; one whose files are not given is skipped with one line saying
    what it needs. Toy models: the toy rewards. Images are scored as the PNG stores them (uint8).
Statistics: a prompt's images are averaged first; the table gives the mean over prompts +- the half-width of
    the 95 % Student-t interval over prompts (t_{0.975, n-1} s / sqrt(n); with one image per prompt, as in the
    paper, this is the usual interval over images). PickScore is shown / 100, the scale of the paper's Table 1.
Outputs, per model in <out>/<name>/: images/JJJJJ_KK.png, manifest.json (settings, prompt and seed of every
    image), scores.jsonl (one line per image), results.json, table.md; with several models <out>/comparison.md
    and <out>/grid.png. Images are written as they are made and never all held in memory.
Resume: rerunning the same command skips every image already on disk and every (image, metric) already scored
    (scores are appended to scores.part<rank>.jsonl as they come, merged into scores.jsonl at the end); changed
    sampling settings are refused. A new metric on an old run only scores.
"""
import argparse
import gc
import hashlib
import json
import math
import os
import statistics
import time
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

SEED_STRIDE = 1_000_000  # seed of image k of prompt j: seed + j + SEED_STRIDE * k
PAPER_METRICS = ("hps", "clip", "pickscore", "imagereward", "unifiedreward")  # Table 1's columns, in order
TITLES = {"hps": "HPS-v2.1", "clip": "CLIP", "pickscore": "PickScore", "imagereward": "ImageReward",
          "unifiedreward": "UnifiedReward"}
DISPLAY_SCALE = {"pickscore": 0.01}  # Table 1 prints PickScore (logit_scale.exp() * cos) / 100


@dataclass
class Args:
    """Defaults are the paper's evaluation (16 steps, guidance 3.5, one image per prompt); with toy models
    and no --prompts, 4 images per prompt and batches of 16."""
    model: list = field(default_factory=list)  # model folders, train.py outputs (final/, ckpt_XXXXXX/) or 'toy'
    names: list = field(default_factory=list)  # one label per model (default: from its path)
    base: str = ""  # base model under a checkpoint (default: 'model' in <train out>/args.json)
    prompts: str = ""  # prompt file, one per line (the HPDv2 test split); empty: the toy prompts
    out: str = "runs/eval"  # output folder: <out>/<name>/ per model, comparison.md and grid.png
    steps: int = 16  # ODE sampling steps T (Table 3: 10, 16, 20)
    height: int = 0  # image height (0: the model folder's default: 720 for FLUX, 16 for the toy)
    width: int = 0  # image width (0: the model folder's default)
    guidance: float = 3.5  # FLUX.1-dev's distilled guidance scale (no effect on models without it)
    shift: float = 3.0  # shift of the sigma grid
    seed: int = 42  # base seed: image k of prompt j uses seed + j + 1_000_000 k
    per_prompt: int = 0  # images per prompt (0: 1; 4 on the toy prompts)
    batch_size: int = 0  # images per batched sampling and scoring call (0: 4; 16 on the toy prompts)
    metrics: str = ""  # comma-separated (empty: hps,clip,pickscore,imagereward,unifiedreward; toy models: toy-*)
    hps_checkpoint: str = ""  # HPS_v2.1_compressed.pt
    clip_model: str = ""  # open_clip DFN5B-CLIP-ViT-H-14-378 folder (or file)
    pickscore_model: str = ""  # PickScore_v1 folder
    pickscore_processor: str = ""  # CLIP-ViT-H-14-laion2B-s32B-b79K processor folder
    imagereward_checkpoint: str = ""  # ImageReward.pt
    imagereward_tokenizer: str = ""  # bert-base-uncased tokenizer folder
    imagereward_med_config: str = ""  # med_config.json (optional: head count, LayerNorm eps)
    unifiedreward_url: str = ""  # OpenAI-compatible server base URL, e.g. http://127.0.0.1:8000/v1
    unifiedreward_model: str = ""  # the served model name (empty: the server's only model)
    unifiedreward_local: str = ""  # or a local UnifiedReward-qwen-* folder (transformers)
    unifiedreward_workers: int = 8  # concurrent requests per rank (local: images per generate call)
    compare: list = field(default_factory=list)  # runs (a folder of runs: each, by name) -> one table vs row 1, a grid
    grid_prompts: int = 6  # rows (prompts) of the qualitative grid
    device: str = ""  # cuda or cpu (empty: cuda if available)
    dtype: str = ""  # transformer dtype bf16 or fp32 (empty: bf16 on cuda, fp32 on cpu)


def parse_args(argv=None) -> Args:
    import inspect
    import re
    helps = dict(re.findall(r"^    (\w+): .*?  # (.*)$", inspect.getsource(Args), re.M))  # the field comments
    p = argparse.ArgumentParser(description="Evaluate models into the paper's Table 1 / Table 3 (see the docstring).")
    for f in fields(Args):
        flag, doc = "--" + f.name.replace("_", "-"), helps.get(f.name, "").replace("%", "%%")
        if f.name in ("model", "names", "compare"):
            p.add_argument(flag, nargs="+", action="extend", default=[], help=doc)
        else:
            p.add_argument(flag, type=type(f.default), default=f.default, help=doc)
    return Args(**vars(p.parse_args(argv)))


# ------------------------------------------------------------------------------------------------
# Statistics: 95 % Student-t interval of a mean, without scipy
# ------------------------------------------------------------------------------------------------
def _t_abs_cdf(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with integer df, closed form (Abramowitz & Stegun 26.7.3, 26.7.4)."""
    th = math.atan(t / math.sqrt(df))
    s, c2 = math.sin(th), math.cos(th) ** 2
    if df % 2:  # (2/pi) [th + sin th (cos th + 2/3 cos^3 th + ... + (2.4...(df-3))/(1.3...(df-2)) cos^(df-2) th)]
        term = total = math.cos(th) if df > 1 else 0.0
        for j in range(3, df - 1, 2):
            term *= (j - 1) / j * c2
            total += term
        return 2 / math.pi * (th + s * total)
    term = total = 1.0  # sin th (1 + 1/2 cos^2 th + ... + (1.3...(df-3))/(2.4...(df-2)) cos^(df-2) th)
    for j in range(2, df - 1, 2):
        term *= (j - 1) / j * c2
        total += term
    return s * total


def t_quantile(p: float, df: int) -> float:
    """t_{p, df} for p in (0.5, 1): bisection on the exact CDF; df > 1000: the expansion about the normal
    quantile z (A&S 26.7.5, terms to df^-4; its error there is below 1e-12)."""
    if df > 1000:
        return _t_expansion(p, df)
    target, lo, hi = 2 * p - 1, 0.0, 1.0
    while _t_abs_cdf(hi, df) < target:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_abs_cdf(mid, df) < target else (lo, mid)
    return (lo + hi) / 2


def _t_expansion(p: float, df: int) -> float:
    z = statistics.NormalDist().inv_cdf(p)
    g = [(z**3 + z) / 4, (5 * z**5 + 16 * z**3 + 3 * z) / 96, (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384,
         (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160]
    return z + sum(gi / df ** (i + 1) for i, gi in enumerate(g))


def mean_ci(values, level: float = 0.95) -> dict:
    """mean, sample std (n - 1), and the Student-t interval mean +- t_{(1+level)/2, n-1} std / sqrt(n)."""
    v = [float(x) for x in values]
    n = len(v)
    mean = sum(v) / n if n else None
    if n < 2:
        return {"mean": mean, "std": None, "n": n, "half_width": None, "low": None, "high": None}
    std = math.sqrt(sum((x - mean) ** 2 for x in v) / (n - 1))
    h = t_quantile((1 + level) / 2, n - 1) * std / math.sqrt(n)
    return {"mean": mean, "std": std, "n": n, "half_width": h, "low": mean - h, "high": mean + h}


def summarise(records: list, metrics: list) -> dict:
    """records: one dict per image (prompt_index, metric -> score or None). Per metric: images of a prompt are
    averaged, then mean_ci over prompts; 'images' counts the scored images, 'missing' the unscored ones."""
    out = {}
    for m in metrics:
        per_prompt, missing = {}, 0
        for r in records:
            s = r.get(m)
            if s is None or (isinstance(s, float) and math.isnan(s)):
                missing += 1
            else:
                per_prompt.setdefault(r["prompt_index"], []).append(s)
        stats = mean_ci([sum(s) / len(s) for s in per_prompt.values()])
        n = stats.pop("n")
        out[m] = {**stats, "prompts": n, "images": sum(map(len, per_prompt.values())), "missing": missing}
    return out


# ------------------------------------------------------------------------------------------------
# Distributed plumbing. torchrun sets WORLD_SIZE; a plain `python evaluate.py` is a world of one and needs no
# process group. Ranks share nothing but the output folder and one gather of the new scores per model.
# ------------------------------------------------------------------------------------------------
def setup(device_pref: str):
    rank, local, world = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
    use_cuda = (device_pref or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    if use_cuda:
        torch.cuda.set_device(local)
    if world > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return rank, world, torch.device("cuda", local) if use_cuda else torch.device("cpu")


def barrier(world):
    if world > 1:
        dist.barrier()


def gather(obj, world) -> list:
    """[obj of rank 0, ..., obj of rank world-1] on rank 0, None elsewhere."""
    if world == 1:
        return [obj]
    out = [None] * world if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------
@dataclass
class ModelRef:
    name: str
    folder: Path  # diffusers folder for FluxPolicy.from_pretrained
    checkpoint: Path = None  # train.py DCP checkpoint read over the folder's transformer
    toy: bool = False


def resolve_model(spec: str, base: str = "") -> ModelRef:
    if spec in ("", "toy"):
        import toy
        return ModelRef("toy-base", Path(toy.base_model()), None, True)
    p = Path(spec)
    if (p / ".metadata").is_file():  # a torch.distributed.checkpoint folder written by train.py
        args = p.parent / "args.json"
        under = base or (json.loads(args.read_text()).get("model", "") if args.is_file() else None)
        if under is None:
            raise SystemExit(f"evaluate.py: checkpoint {p} has no {args} naming its base model: pass --base")
        ref = resolve_model(under or "toy")
        return ModelRef(f"{p.parent.name}-{p.name}", ref.folder, p, ref.toy)
    if (p / "model_index.json").is_file():
        return ModelRef(f"{p.parent.name}-{p.name}" if p.name == "final" else p.name, p, None,
                        (p / "toy.json").is_file())
    hint = " (a train.py output: pass its final/ or one of its ckpt_*/ folders)" if (p / "args.json").is_file() else ""
    raise SystemExit(f"evaluate.py: --model {spec}: not a diffusers model folder (model_index.json) nor a "
                     f"train.py checkpoint (.metadata){hint}")


def fingerprint(ref: ModelRef) -> str:
    """Names, sizes and sampled bytes of the transformer's (and the checkpoint's) files: a resume refuses a
    run folder whose images came from other weights."""
    h = hashlib.sha256()
    for root in [ref.folder / "transformer"] + ([ref.checkpoint] if ref.checkpoint else []):
        for f in sorted(p for p in root.resolve().rglob("*") if p.is_file()):
            size = f.stat().st_size
            h.update(f"{f.name}:{size}".encode())
            with open(f, "rb") as fh:
                for off in sorted({0, max(0, size // 2 - 4096), max(0, size - 8192)}):
                    fh.seek(off)
                    h.update(fh.read(8192))
    return h.hexdigest()[:16]


def load_policy(ref: ModelRef, a: Args, device, dtype, cache_dir):
    from policy.flux import FluxPolicy
    dims = {k: v for k, v in (("height", a.height), ("width", a.width)) if v}
    policy = FluxPolicy.from_pretrained(ref.folder, device=device, dtype=dtype, guidance=a.guidance,
                                        cache_dir=cache_dir, **dims)
    if ref.checkpoint:
        import torch.distributed.checkpoint as dcp
        state = policy.transformer.state_dict()  # the parameters themselves: read in place, cast to dtype
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
            dcp.load({"model": state}, checkpoint_id=str(ref.checkpoint), no_dist=True)
    policy.transformer.eval()
    return policy


# ------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------
def metric_needs(name: str, a: Args):
    """None when the files of metric `name` are given (FileNotFoundError when given but absent), else the one
    line saying what it needs."""
    import rewards
    given = {"hps": ["hps_checkpoint"], "clip": ["clip_model"], "pickscore": ["pickscore_model", "pickscore_processor"],
             "imagereward": ["imagereward_checkpoint", "imagereward_tokenizer"]}
    if name.startswith("toy"):
        import toy
        if name not in toy.TOY_REWARDS:
            raise SystemExit(f"evaluate.py: unknown toy metric {name!r}; valid: {', '.join(toy.TOY_REWARDS)}")
        return None
    if name == "unifiedreward":
        if a.unifiedreward_url or a.unifiedreward_local:
            if a.unifiedreward_local and not os.path.exists(a.unifiedreward_local):
                raise FileNotFoundError(f"--unifiedreward-local {a.unifiedreward_local}: no such folder")
            return None
        from rewards import unifiedreward
        return f"skipping UnifiedReward: needs {unifiedreward.ORIGIN}"
    if name not in given:
        raise SystemExit(f"evaluate.py: unknown metric {name!r}; valid: {', '.join(PAPER_METRICS)} or toy-*")
    keys = given[name] + (["imagereward_med_config"] if name == "imagereward" else [])
    for k in keys:
        if getattr(a, k) and not os.path.exists(getattr(a, k)):
            raise FileNotFoundError(f"--{k.replace('_', '-')} {getattr(a, k)}: no such file or folder")
    if all(getattr(a, k) for k in given[name]):
        return None
    from rewards import imagereward
    origin = imagereward.ORIGIN if name == "imagereward" else rewards.REWARDS[name][3]
    flags = " and ".join("--" + k.replace("_", "-") for k in given[name])
    return f"skipping {TITLES[name]}: needs {flags} ({origin})"


def load_metric(name: str, a: Args, device):
    import rewards
    if name.startswith("toy") or name in rewards.REWARDS:
        paths = {k: getattr(a, k) for k in ("hps_checkpoint", "clip_model", "pickscore_model", "pickscore_processor")}
        return rewards.load_rewards(name, device=device, **paths)[0]
    if name == "imagereward":
        from rewards import imagereward
        return imagereward.load(a.imagereward_checkpoint, a.imagereward_tokenizer, a.imagereward_med_config or None,
                                device=device)
    from rewards import unifiedreward
    return unifiedreward.load(url=a.unifiedreward_url or None, model=a.unifiedreward_model or None,
                              local=a.unifiedreward_local or None, device=device, strict=False,
                              workers=a.unifiedreward_workers)


# ------------------------------------------------------------------------------------------------
# The evaluation of one model
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Item:
    index: int  # position in (prompt, k) order
    prompt_index: int
    k: int  # image k of the prompt
    prompt: str
    group: str
    seed: int

    @property
    def file(self) -> str:
        return f"{self.prompt_index:05d}_{self.k:02d}.png"


def plan(prompts: list, groups: list, per_prompt: int, seed: int) -> list:
    return [Item(j * per_prompt + k, j, k, p, g, seed + j + SEED_STRIDE * k)
            for j, (p, g) in enumerate(zip(prompts, groups)) for k in range(per_prompt)]


def rank_batches(items: list, batch_size: int, rank: int, world: int) -> list:
    """This rank's batches: items cut into fixed batches of batch_size in order, batch b to rank b mod world.
    A batch's content never depends on the world size, so neither do its numbers."""
    return [items[i:i + batch_size] for i in range(0, len(items), batch_size)][rank::world]


def save_png(img: np.ndarray, path: Path):
    """(H, W, 3) uint8 -> PNG, atomically (a file named *.png is always complete)."""
    from PIL import Image
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    Image.fromarray(img).save(tmp)
    os.replace(tmp, path)


def load_png(path: Path) -> np.ndarray:
    from PIL import Image
    return np.array(Image.open(path).convert("RGB"))


def read_scores(run: Path) -> dict:
    """{index: {metric: score}} from scores.jsonl and every scores.part*.jsonl (a line cut by a kill is skipped)."""
    done = {}
    for f in [run / "scores.jsonl"] + sorted(run.glob("scores.part*.jsonl")):
        if not f.is_file():
            continue
        for line in f.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "metric" in r:  # a part-file line: one (image, metric)
                done.setdefault(r["index"], {})[r["metric"]] = r["score"]
            else:  # a scores.jsonl line: one image, every metric
                done.setdefault(r["index"], {}).update(r["scores"])
    return done


def evaluate_model(ref: ModelRef, items: list, metrics: list, skipped: dict, scorers: dict, a: Args,
                   settings: dict, run: Path, rank: int, world: int, device, dtype) -> dict:
    """Sample what is not on disk, score what is not scored (this rank's batches), gather; rank 0 writes the
    run's scores.jsonl, results.json and table.md and returns the results (None on other ranks)."""
    images = run / "images"
    model = {"folder": str(ref.folder), "checkpoint": ref.checkpoint and str(ref.checkpoint),
             "fingerprint": fingerprint(ref)}
    manifest = {"name": ref.name, "model": model, "settings": settings,
                "images": [{"index": it.index, "file": f"images/{it.file}", "prompt_index": it.prompt_index, "k": it.k,
                            "prompt": it.prompt, "group": it.group, "seed": it.seed} for it in items]}
    path = run / "manifest.json"
    if path.is_file():  # every rank checks, so all of them stop together
        prev = json.loads(path.read_text())
        diff = [k for k in ("settings", "images") if prev.get(k) != manifest[k]]
        diff += ["weights"] * (prev["model"]["fingerprint"] != manifest["model"]["fingerprint"])
        if diff:
            raise SystemExit(f"evaluate.py: {run} holds a run with other {' and '.join(diff)}; use another --out "
                             "or --names (or delete it)")
    barrier(world)
    if rank == 0:
        images.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(manifest, indent=1))
    barrier(world)

    done = read_scores(run)
    mine = rank_batches(items, a.batch_size, rank, world)
    todo_prompts = list(dict.fromkeys(it.prompt for b in mine for it in b if not (images / it.file).is_file()))
    policy, new, count = None, [], {"sampled": 0, "on_disk": 0, "scored": 0}
    t0 = time.time()
    with open(run / f"scores.part{rank}.jsonl", "a") as part:
        for batch in mine:
            missing = {it.index for it in batch if not (images / it.file).is_file()}
            if missing:
                if policy is None:
                    policy = load_policy(ref, a, device, dtype, run.parent / "prompt_cache")
                    policy.encode_prompts(todo_prompts, batch_size=1)  # alone: the same numbers on any world size
                from policy.flux import sample
                x = sample(policy, [it.prompt for it in batch], [it.seed for it in batch], a.steps, a.shift,
                               batch_size=len(batch))  # (b, 3, H, W) in [0, 1], the whole batch
                u8 = (x.float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
                for it, img in zip(batch, u8):
                    if it.index in missing:
                        save_png(img, images / it.file)
                count["sampled"] += len(missing)
            count["on_disk"] += len(batch) - len(missing)
            need = [m for m in metrics if any(m not in done.get(it.index, {}) for it in batch)]
            if not need:
                continue
            pix = torch.from_numpy(np.stack([load_png(images / it.file) for it in batch])).permute(0, 3, 1, 2)
            pix = pix.float().div(255).to(device)  # (b, 3, H, W): what the PNG holds
            for m in need:
                scores = scorers[m].score(pix, [it.prompt for it in batch]).tolist()
                for it, s in zip(batch, scores):
                    if m not in done.setdefault(it.index, {}):
                        s = None if math.isnan(s) else s
                        done[it.index][m] = s
                        new.append((it.index, m, s))
                        part.write(json.dumps({"index": it.index, "metric": m, "score": s}) + "\n")
                        count["scored"] += 1
                part.flush()
    del policy
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    everything = gather({"new": new, "count": count, "failures": _failures(scorers)}, world)
    if rank != 0:
        return None
    for g in everything[1:]:
        for index, m, s in g["new"]:
            done.setdefault(index, {})[m] = s
    total = {k: sum(g["count"][k] for g in everything) for k in count}
    print(f"{ref.name}: {total['sampled']} images sampled, {total['on_disk']} found on disk, {total['scored']} "
          f"scores computed ({time.time() - t0:.1f} s)", flush=True)
    for _, _, error in (f for g in everything for f in g["failures"]):
        print(f"  unscored (NaN): {error}")
    return finish_run(run, ref, items, metrics, skipped, done, settings)


def _failures(scorers) -> list:
    out = []
    for s in scorers.values():
        out += getattr(s, "failures", [])
        if hasattr(s, "failures"):
            s.failures = []
    return out


def finish_run(run: Path, ref: ModelRef, items: list, metrics: list, skipped: dict, done: dict, settings: dict) -> dict:
    """Rank 0: scores.jsonl (every image, every metric known), results.json and table.md of this run."""
    rows = [{"index": it.index, "file": f"images/{it.file}", "prompt_index": it.prompt_index, "k": it.k,
             "prompt": it.prompt, "group": it.group, "seed": it.seed, "scores": done.get(it.index, {})} for it in items]
    tmp = run / ".scores.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, run / "scores.jsonl")
    for f in run.glob("scores.part*.jsonl"):
        f.unlink()
    flat = [{"prompt_index": r["prompt_index"], **r["scores"]} for r in rows]
    groups = list(dict.fromkeys(it.group for it in items if it.group))
    results = {"name": ref.name, "settings": settings, "images": len(items),
               "prompts": len({it.prompt_index for it in items}), "metrics": summarise(flat, metrics),
               "groups": {g: summarise([f for f, it in zip(flat, items) if it.group == g], metrics) for g in groups},
               "skipped": skipped}
    (run / "results.json").write_text(json.dumps(results, indent=1))
    (run / "table.md").write_text(render_table([(run, results)]) + "\n")
    return results


# ------------------------------------------------------------------------------------------------
# Tables, comparison and the qualitative grid
# ------------------------------------------------------------------------------------------------
def _cell(stat: dict, metric: str, ref: dict = None) -> str:
    scale = DISPLAY_SCALE.get(metric, 1.0)
    if stat is None or stat["mean"] is None:
        return "—"
    text = f"{stat['mean'] * scale:.3f}"
    if stat["half_width"] is not None:
        text += f" ± {stat['half_width'] * scale:.3f}"
    if ref is not None and ref.get("mean") is not None:
        text += f" ({(stat['mean'] - ref['mean']) * scale:+.3f})"
    return text


def render_table(runs: list, deltas: bool = False) -> str:
    """Markdown in Table 1's layout: a row per run (and per prompt group), a column per metric; deltas: each
    row's difference to the first run's row of the same group. runs: [(folder, results)]."""
    metrics = sorted(dict.fromkeys(m for _, r in runs for m in r["metrics"]),
                     key=lambda m: PAPER_METRICS.index(m) if m in PAPER_METRICS else len(PAPER_METRICS))
    keys = ("steps", "height", "width", "guidance", "per_prompt", "prompts_file")
    differ = [k for k in keys if len({str(r["settings"].get(k)) for _, r in runs}) > 1]  # e.g. Table 3's steps
    groups = list(dict.fromkeys(g for _, r in runs for g in r["groups"]))
    first = runs[0][1]
    lines = ["| model | " + " | ".join(TITLES.get(m, m) for m in metrics) + " |", "|---|" + "---|" * len(metrics)]
    for _, r in runs:
        label = r["name"] + "".join(f", {k}={r['settings'].get(k)}" for k in differ)
        for g in [""] + list(r["groups"]):
            stats = r["groups"][g] if g else r["metrics"]
            ref = (first["groups"].get(g, {}) if g else first["metrics"]) if deltas and r is not first else {}
            cells = [_cell(stats.get(m), m, ref.get(m)) for m in metrics]
            lines.append(f"| {label}{' · ' + g if g else ''} | " + " | ".join(cells) + " |")
    n = "; ".join((g + ": " if g else "") + _prompt_counts(runs, g) for g in [""] + groups)
    lines += ["", f"mean ± half-width of the 95 % Student-t interval over prompts (n = {n})"
              + ("; PickScore shown / 100 as in Table 1" if "pickscore" in metrics else "")
              + ("; (±x.xxx) difference to the first row" if deltas and len(runs) > 1 else "")]
    skipped = {k: v for _, r in runs for k, v in r.get("skipped", {}).items() if k not in metrics}
    return "\n".join(lines + [f"not evaluated: {line}" for line in skipped.values()])


def _prompt_counts(runs: list, group: str) -> str:
    """The numbers of prompts behind the rows of one group ('' = all prompts)."""
    ns = {s["prompts"] for _, r in runs for s in (r["groups"].get(group, {}) if group else r["metrics"]).values()}
    return ", ".join(map(str, sorted(ns)))


def compare(paths: list, out: Path, n_rows: int = 6) -> str:
    """One table of several runs (differences to the first) -> stdout and out/comparison.md; out/grid.png."""
    runs = []
    for p in map(Path, paths):
        found = [p] if (p / "results.json").is_file() else sorted(q.parent for q in p.glob("*/results.json"))
        if not found:
            raise SystemExit(f"evaluate.py --compare: {p} holds no results.json (nor do its subfolders)")
        runs += [(q, json.loads((q / "results.json").read_text())) for q in found]
    text = render_table(runs, deltas=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.md").write_text(text + "\n")
    print(text)
    if len(runs) > 1:
        grid = save_grid([q for q, _ in runs], out / "grid.png", n_rows)
        print(f"grid: {grid}" if grid else "grid: the runs share no prompt with the same seed")
    return text


def save_grid(runs: list, path: Path, n_rows: int = 6):
    """Fig. 4 style: a row per prompt (the first image of evenly spaced prompts that every run has with the same
    seed), a column per run. Reads the PNGs of the cells only."""
    from PIL import Image, ImageDraw
    manifests = [json.loads((r / "manifest.json").read_text()) for r in runs]
    names = [m["name"] for m in manifests]
    firsts = [{(e["prompt"], e["seed"]): e for e in m["images"] if e["k"] == 0} for m in manifests]
    common = [e for e in manifests[0]["images"] if e["k"] == 0 and all((e["prompt"], e["seed"]) in f for f in firsts)]
    if not common:
        return None
    k = min(n_rows, len(common))
    rows = [common[round(i * (len(common) - 1) / max(1, k - 1))] for i in range(k)]  # distinct: k <= len(common)
    size = Image.open(runs[0] / rows[0]["file"]).size
    cell = 96 if max(size) < 96 else 256
    label, head, pad, chars = 200, 30, 4, cell // 6  # chars: what fits a cell's width in PIL's default font
    grid = Image.new("RGB", (label + len(runs) * (cell + pad), head + len(rows) * (cell + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for c, name in enumerate(names):  # the model's name on two lines at most
        draw.multiline_text((label + c * (cell + pad) + 2, 2), name[:chars] + "\n" + name[chars:2 * chars], "black")
    for r, e in enumerate(rows):
        y = head + r * (cell + pad)
        words, text = (e["prompt"] + (f" ({e['group']})" if e["group"] else "")).split(), [""]
        for w in words:
            text[-1:] = [text[-1] + " " + w] if len(text[-1]) + len(w) < 30 else [text[-1], w]
        draw.multiline_text((4, y + 4), "\n".join(t.strip() for t in text[:6]), fill="black")
        for c, (run, f) in enumerate(zip(runs, firsts)):
            img = Image.open(run / f[(e["prompt"], e["seed"])]["file"]).convert("RGB")
            w, h = (max(1, round(d * cell / max(img.size))) for d in img.size)  # fit the cell, keep the aspect
            img = img.resize((w, h), Image.NEAREST if max(img.size) < cell else Image.LANCZOS)
            grid.paste(img, (label + c * (cell + pad) + (cell - w) // 2, y + (cell - h) // 2))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    grid.save(tmp)
    os.replace(tmp, path)
    return path


class _Lazy(dict):
    """Metric name -> scorer, loaded on first use (a run that only samples loads no reward model)."""

    def __init__(self, load):
        super().__init__()
        self._load = load

    def __missing__(self, name):
        self[name] = self._load(name)
        return self[name]


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------
def main(argv=None):
    a = parse_args(argv)
    if a.compare:
        return compare(a.compare, Path(a.out), a.grid_prompts)
    rank, world, device = setup(a.device)
    import diffusers
    import transformers
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    threads = torch.get_num_threads()
    try:
        return _main(a, rank, world, device)
    finally:
        torch.set_num_threads(threads)
        if world > 1:
            dist.destroy_process_group()


def _main(a: Args, rank: int, world: int, device):
    import toy
    specs = a.model or ["toy"]
    refs = [resolve_model(s, a.base) for s in specs] if rank == 0 else None  # rank 0 pretrains the toy model once
    barrier(world)
    refs = refs or [resolve_model(s, a.base) for s in specs]
    if a.names:
        if len(a.names) != len(refs):
            raise SystemExit(f"evaluate.py: {len(refs)} models but {len(a.names)} --names")
        for r, n in zip(refs, a.names):
            r.name = n
    if len({r.name for r in refs}) < len(refs):
        raise SystemExit(f"evaluate.py: two models are named alike {[r.name for r in refs]}: give --names")
    toy_world = all(r.toy for r in refs)
    if a.prompts:
        prompts = [l.strip() for l in open(a.prompts, encoding="utf-8") if l.strip()]
        groups = [""] * len(prompts)
    else:
        if not toy_world:
            raise SystemExit("evaluate.py: --prompts FILE is required with FLUX models (the HPDv2 test prompts)")
        prompts = toy.TRAIN_PROMPTS + toy.HELDOUT_PROMPTS
        groups = ["train"] * len(toy.TRAIN_PROMPTS) + ["held-out"] * len(toy.HELDOUT_PROMPTS)
    if not prompts or len(prompts) >= SEED_STRIDE:
        raise SystemExit(f"evaluate.py: need 1 to {SEED_STRIDE - 1} prompts, got {len(prompts)}")
    toy_prompts = toy_world and not a.prompts
    a.per_prompt = a.per_prompt or (4 if toy_prompts else 1)
    a.batch_size = a.batch_size or (16 if toy_prompts else 4)
    if a.steps < 1 or a.per_prompt < 1 or a.batch_size < 1:
        raise SystemExit("evaluate.py: --steps, --per-prompt and --batch-size must be >= 1")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    if toy_world and device.type == "cpu":
        torch.set_num_threads(1)  # tiny matrices: one thread is fastest, and the same on any launch
    names = [m.strip() for m in a.metrics.split(",") if m.strip()] or \
        (list(toy.TOY_REWARDS) if toy_world else list(PAPER_METRICS))
    skipped = {m: line for m in names if (line := metric_needs(m, a))}
    metrics = [m for m in names if m not in skipped]
    if rank == 0:
        for line in skipped.values():
            print(line)
    items = plan(prompts, groups, a.per_prompt, a.seed)
    settings = {"steps": a.steps, "shift": a.shift, "guidance": a.guidance, "height": a.height, "width": a.width,
                "seed": a.seed, "per_prompt": a.per_prompt, "batch_size": a.batch_size, "dtype": str(dtype),
                "prompts_file": Path(a.prompts).name if a.prompts else "toy: TRAIN_PROMPTS + HELDOUT_PROMPTS",
                "prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16]}
    nb = math.ceil(len(items) / a.batch_size)
    if rank == 0:
        print(f"world size {world} | {len(refs)} model(s) | {len(prompts)} prompts x {a.per_prompt} = {len(items)} "
              f"images per model | {nb} batches of {a.batch_size} (rank r takes batches r, r+{world}, ...) | "
              f"T={a.steps} shift={a.shift} guidance={a.guidance} | metrics {', '.join(metrics) or 'none'} | "
              f"device {device} {str(dtype).removeprefix('torch.')}", flush=True)
    scorers = _Lazy(lambda m: load_metric(m, a, device))
    out, results = Path(a.out), []
    for ref in refs:
        run = out / ref.name
        r = evaluate_model(ref, items, metrics, skipped, scorers, a, settings, run, rank, world, device, dtype)
        results.append((run, r))
        barrier(world)
    if rank == 0:
        if len(refs) > 1:
            compare([str(run) for run, _ in results], out, a.grid_prompts)
        else:
            print(render_table(results))
    return results


if __name__ == "__main__":
    main()

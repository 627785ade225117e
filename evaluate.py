"""Evaluate models as the paper does: Table 1 (five preference metrics on the HPDv2 test prompts), Table 3 (the
same at 10 / 16 / 20 sampling steps), a Fig. 4-style grid, and run-against-run comparisons.

    python evaluate.py                                  # the toy world: its base model and its 60 prompts
    python evaluate.py --model runs/g2rpo/final         # what train.py exported (toy, FLUX.1, SD3.5, Qwen-Image)
    torchrun --nproc_per_node 8 evaluate.py --model /models/FLUX.1-dev runs/g2rpo/final --prompts hpdv2_test.txt \\
        --hps-checkpoint HPS_v2.1_compressed.pt --clip-model DFN5B-CLIP-ViT-H-14-378 ...   # README: every flag
    python evaluate.py --compare runs/eval/FLUX.1-dev runs/eval/g2rpo-final   # one table, differences to row 1

A model is a diffusers folder of a family policy/families.py lists, a train.py checkpoint (read over its base model)
or 'toy'. Image k of prompt j is the ODE sample (policy.interface.Policy.sample) from seed --seed + j + 1_000_000 k; the images, in (j, k) order,
are cut into fixed batches of --batch-size and batch b runs on rank b mod world, so an image has the same numbers
on 1 or N processes. The metrics of the reward registry (rewards/__init__.py) whose files are given score the
PNGs as stored (uint8); a skipped metric gets one line saying what it needs. A non-finite sample (a diverged
model) stops the evaluation before any PNG of its batch is written. <out>/<name>/ holds a model's images, scores
and results (report/runs.py; rerunning the command resumes); the tables: report/tables.py.

Faults end in one line and lose nothing. Every file a model is read from is checked before any work (the checkpoint's
.metadata and data files, the safetensors of an export or adapter): a damaged one is named with its model. A rank that
meets an error stops every rank with it (launch.collectives.stop_if_any: rank 0 says it, the others exit 1 quietly).
A run folder of other settings or weights is refused when its evaluation finished, and set aside when it did not
(report/runs.py).
"""
import gc
import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Annotated

import diffusers
import numpy as np
import torch
import torch.distributed as dist
import transformers
import tyro

from data.prompts import encoding_share, prompt_file_errors, read_prompts
from launch import collectives
from launch.eval_models import WHO, ModelRef, arg_errors, one_line, resolve_models, size_errors
from launch.shared_folder import check_shared
from policy.families import family_of
from policy.lora import add_lora, load_lora
from policy.weights import fingerprint_files
from report import runs
from report.files import file_errors_in_one_line, folder_errors, load_png, save_png, write_text
from report.tables import compare, render_table
from rewards import REWARDS, RewardOptions, load_rewards, lookup, needs, prompt_errors

SEED_STRIDE = 1_000_000  # seed of image k of prompt j: seed + j + SEED_STRIDE * k
COLUMNS = {name: (spec.title, spec.scale) for name, spec in REWARDS.items()}  # Table 1's columns, titles, scales


@dataclass
class Args:
    """Evaluate models into the paper's Table 1 / Table 3 (see evaluate.py's docstring). Defaults are the paper's
    evaluation (16 steps, FLUX.1-dev's guidance 3.5, one image per prompt); with toy models and no --prompts, 4 images per
    prompt and batches of 16."""
    model: list[str] = field(default_factory=list)  # model folders, train.py outputs (final/, ckpt_XXXXXX/) or 'toy'
    names: list[str] = field(default_factory=list)  # one label per model (empty: from its path)
    base: str = ""  # base model under a checkpoint or LoRA adapter (empty: its args.json or lora.json)
    prompts: str = ""  # prompt file, one per line (the HPDv2 test split); empty: the toy prompts
    out: str = "runs/eval"  # output folder: <out>/<name>/ per model, comparison.md and grid.png
    steps: int = 16  # ODE sampling steps T (Table 3: 10, 16, 20)
    height: int = 0  # image height (0: the model folder's default: 720 for FLUX.1-dev, 16 for the toy)
    width: int = 0  # image width (0: the model folder's default)
    guidance: float = 0.0  # guidance scale (0: the model family's: FLUX.1-dev's distilled 3.5, CFG 4.5 for SD3.5, 4.0 for Qwen-Image)
    shift: float = 0.0  # time shift of the sigma grid (0: the model family's: 3 for FLUX.1 and SD3.5, Qwen-Image's own)
    seed: int = 42  # base seed: image k of prompt j uses seed + j + 1_000_000 k
    per_prompt: int = 0  # images per prompt (0: 1; 4 on the toy prompts)
    batch_size: int = 0  # images per batched sampling and scoring call (0: 4; 16 on the toy prompts)
    metrics: str = ""  # comma-separated (empty: hps,clip,pickscore,imagereward,unifiedreward; toy models: toy-*)
    rewards: Annotated[RewardOptions, tyro.conf.OmitArgPrefixes] = field(default_factory=RewardOptions)
    compare: list[str] = field(default_factory=list)  # runs (a folder: each run in it) -> one table vs row 1, a grid
    grid_prompts: int = 6  # rows (prompts) of the qualitative grid
    device: str = ""  # cuda or cpu (empty: cuda if available)
    dtype: str = ""  # transformer dtype bf16 or fp32 (empty: bf16 on cuda, fp32 on cpu)
    collective_timeout: float = collectives.DEFAULT_TIMEOUT_MIN  # minutes a rank waits for the others (NCCL watchdog)


# ------------------------------------------------------------------------------------------------
# Models (resolved and checked before any work: launch/eval_models.py), prompts and the images to make. Ranks
# (torchrun; a plain `python evaluate.py` is a world of one, with no process group) share nothing but the output
# folder and one gather of the new scores per model (launch/collectives.py).
# ------------------------------------------------------------------------------------------------
def load_policy(ref: ModelRef, a: Args, device, dtype, cache_dir):
    dims = {k: v for k, v in (("height", a.height), ("width", a.width)) if v}
    family = family_of(ref.folder)
    policy = family.from_pretrained(ref.folder, device=device, dtype=dtype, guidance=a.guidance, cache_dir=cache_dir,
                                    **dims)
    if ref.lora:
        load_lora(policy.transformer, ref.lora)
    if ref.lora_args:  # a LoRA run's checkpoint holds the adapter only: add it, then read it
        r = ref.lora_args
        add_lora(policy.transformer, r["lora_rank"], r["lora_alpha"], r["lora_targets"] or family.LORA_TARGETS)
    if ref.checkpoint:
        import torch.distributed.checkpoint as dcp
        state = {k: v for k, v in policy.transformer.state_dict().items()  # the parameters themselves: read in
                 if not ref.lora_args or ".lora_" in k}  # place, cast to dtype
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
            dcp.load({"model": state}, checkpoint_id=str(ref.checkpoint), no_dist=True)
    policy.transformer.eval()
    return policy


def load_prompts(a: Args, toy_world: bool):
    """(prompts, groups): the lines of --prompts, or the toy world's train then held-out prompts."""
    if a.prompts:
        if errors := prompt_file_errors(a.prompts):  # missing, not UTF-8 text, or no prompt in it
            raise SystemExit("evaluate.py: " + errors[0])
        prompts = read_prompts(a.prompts)
        return prompts, [""] * len(prompts)
    if not toy_world:
        raise SystemExit("evaluate.py: --prompts FILE is required with real models (the HPDv2 test prompts)")
    import toy
    return (toy.TRAIN_PROMPTS + toy.HELDOUT_PROMPTS,
            ["train"] * len(toy.TRAIN_PROMPTS) + ["held-out"] * len(toy.HELDOUT_PROMPTS))


@dataclass(frozen=True)
class Item:  # one image; asdict(item) is its line in manifest.json and scores.jsonl
    index: int  # position in (prompt, k) order
    file: str  # images/JJJJJ_KK.png in the run folder
    prompt_index: int  # j
    k: int  # image k of the prompt
    prompt: str
    group: str
    seed: int


def plan(prompts: list, groups: list, per_prompt: int, seed: int) -> list:
    return [Item(j * per_prompt + k, f"images/{j:05d}_{k:02d}.png", j, k, p, g, seed + j + SEED_STRIDE * k)
            for j, (p, g) in enumerate(zip(prompts, groups)) for k in range(per_prompt)]


def rank_batches(items: list, batch_size: int, rank: int, world: int) -> list:
    """This rank's batches: items cut into fixed batches of batch_size in order, batch b to rank b mod world.
    A batch's content never depends on the world size, so neither do its numbers."""
    return [items[i:i + batch_size] for i in range(0, len(items), batch_size)][rank::world]


@dataclass(frozen=True)
class Context:
    """What every model of one invocation is evaluated with."""
    args: Args  # per_prompt and batch_size resolved
    items: list  # Item per image, in (prompt, k) order
    metrics: list  # metric names to score
    skipped: dict  # metric -> the line saying what it needs
    scorers: dict  # metric -> reward object, loaded on first use (a run that only samples loads none)
    options: dict  # the reward registry's options (files, URLs) as given
    settings: dict  # what a resume must match
    rank: int
    world: int
    device: torch.device
    dtype: torch.dtype


# ------------------------------------------------------------------------------------------------
# The evaluation of one model: sample what is not on disk, score what is not scored, gather, write
# ------------------------------------------------------------------------------------------------
def start_run(ref: ModelRef, ctx: Context, run: Path) -> dict:
    """Write run/manifest.json (refused if the folder holds images of other settings, prompts or weights)."""
    extra = [p for p in (ref.checkpoint, ref.lora) if p]
    weights = fingerprint_files([ref.folder / "transformer"] + extra)
    model = {"folder": str(ref.folder), "checkpoint": ref.checkpoint and str(ref.checkpoint),
             **({"lora": str(ref.lora)} if ref.lora else {}), "fingerprint": weights[:16]}
    manifest = {"name": ref.name, "model": model, "settings": ctx.settings, "images": [asdict(it) for it in ctx.items]}
    other, error = one_line(runs.check_manifest, run, manifest)  # every rank reads the same files: the same answer
    collectives.stop_if_any(error, WHO)  # a finished evaluation of other settings or weights: refused
    if ctx.rank == 0:
        if other:  # an unfinished one: its images are not this model's
            print(runs.set_aside(run, other), flush=True)
        runs.tidy(run)
        (run / "images").mkdir(parents=True, exist_ok=True)
        write_text(run / "manifest.json", json.dumps(manifest, indent=1))
    collectives.barrier()
    return manifest


def score_batch(batch: list, ctx: Context, run: Path, done: dict) -> list:
    """Score the PNGs of a batch with every metric one of them lacks -> [(index, metric, score or None)]."""
    need = [m for m in ctx.metrics if any(m not in done.get(it.index, {}) for it in batch)]
    if not need:
        return []
    pix = torch.from_numpy(np.stack([load_png(run / it.file) for it in batch])).permute(0, 3, 1, 2)
    pix = pix.float().div(255).to(ctx.device)  # (b, 3, H, W): what the PNG holds
    new = []
    for m in need:
        if m not in ctx.scorers:
            ctx.scorers[m] = load_rewards(m, device=ctx.device, **ctx.options)[0]
        for it, s in zip(batch, ctx.scorers[m].score(pix, [it.prompt for it in batch]).tolist()):
            if m not in done.setdefault(it.index, {}):
                done[it.index][m] = None if math.isnan(s) else s
                new.append((it.index, m, done[it.index][m]))
    return new


def sample_and_score(ref: ModelRef, ctx: Context, run: Path, done: dict):
    """This rank's batches: sample the missing images, score them; new scores go to scores.part<rank>.jsonl."""
    a = ctx.args
    mine = rank_batches(ctx.items, a.batch_size, ctx.rank, ctx.world)
    needs = [[it.prompt for b in rank_batches(ctx.items, a.batch_size, r, ctx.world) for it in b
              if not (run / it.file).is_file()] for r in range(ctx.world)]  # every rank sees the same files here
    policy, new, count, error = None, [], {"sampled": 0, "on_disk": 0, "scored": 0}, None
    if needs[ctx.rank]:  # the prompts of this rank's missing images, encoded by one rank each into the shared cache
        policy = load_policy(ref, a, ctx.device, ctx.dtype, run.parent / "prompt_cache")
        policy.encode_prompts(encoding_share(needs, ctx.rank), batch_size=1)  # alone: the same numbers on any world
    collectives.barrier()
    with open(run / f"scores.part{ctx.rank}.jsonl", "a") as part:
        for batch in mine:
            missing = {it.index for it in batch if not (run / it.file).is_file()}
            if missing:
                x = policy.sample([it.prompt for it in batch], [it.seed for it in batch], a.steps, a.shift,
                                  batch_size=len(batch))  # (b, 3, H, W) in [0, 1], the whole batch
                bad = [it for it, ok in zip(batch, x.flatten(1).isfinite().all(1).tolist()) if not ok]
                if bad:  # a diverged model: stop before any PNG of this batch exists (uint8 would hide the NaN)
                    error = (f"{ref.name} sampled a non-finite image (prompt {bad[0].prompt_index}, seed "
                             f"{bad[0].seed}): a diverged model is not scored")
                    break
                u8 = (x.float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
                for it, img in zip(batch, u8):
                    if it.index in missing:
                        save_png(img, run / it.file)
                count["sampled"] += len(missing)
            count["on_disk"] += len(batch) - len(missing)
            scored = score_batch(batch, ctx, run, done)
            part.writelines(json.dumps({"index": i, "metric": m, "score": s}) + "\n" for i, m, s in scored)
            part.flush()
            new += scored
    count["scored"] = len(new)
    del policy
    gc.collect()
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()
    collectives.stop_if_any(error, WHO)  # the other ranks have finished their batches: what they made is kept
    return new, count


def evaluate_model(ref: ModelRef, ctx: Context) -> dict:
    """Sample and score this rank's batches, gather; rank 0 writes the run's scores.jsonl, results.json and
    table.md and returns the results (None on other ranks)."""
    run, t0 = Path(ctx.args.out) / ref.name, time.time()
    manifest = start_run(ref, ctx, run)
    done = runs.read_scores(run)
    new, count = sample_and_score(ref, ctx, run, done)
    failures = []
    for s in (s for s in ctx.scorers.values() if hasattr(s, "failures")):  # UnifiedReward's unparsable replies
        failures, s.failures = failures + s.failures, []
    everything = collectives.gather_objects({"new": new, "count": count, "failures": failures})
    if ctx.rank != 0:
        return None
    for g in everything[1:]:
        for index, m, s in g["new"]:
            done.setdefault(index, {})[m] = s
    total = {k: sum(g["count"][k] for g in everything) for k in count}
    print(f"{ref.name}: {total['sampled']} images sampled, {total['on_disk']} found on disk, {total['scored']} "
          f"scores computed ({time.time() - t0:.1f} s)", flush=True)
    for _, _, error in (f for g in everything for f in g["failures"]):
        print(f"  unscored (NaN): {error}")
    return runs.finish(run, manifest, done, ctx.metrics, ctx.skipped, COLUMNS)


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------
def make_context(a: Args, toy_world: bool, rank: int, world: int, device) -> Context:
    prompts, groups = load_prompts(a, toy_world)
    if not prompts or len(prompts) >= SEED_STRIDE:
        raise SystemExit(f"evaluate.py: need 1 to {SEED_STRIDE - 1} prompts, got {len(prompts)}")
    toy_prompts = toy_world and not a.prompts
    a = replace(a, per_prompt=a.per_prompt or (4 if toy_prompts else 1),
                batch_size=a.batch_size or (16 if toy_prompts else 4))
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    names = [m.strip() for m in a.metrics.split(",") if m.strip()]
    if not names and toy_world:
        import toy
        names = list(toy.TOY_REWARDS)
    names = names or list(REWARDS)  # Table 1's columns
    options = asdict(a.rewards) | {"unifiedreward_strict": False}  # an unparsable reply: NaN, reported, go on
    try:
        skipped = {m: f"skipping {lookup(m).title}: needs {what}" for m in names if (what := needs(m, options))}
        source = f"--prompts {a.prompts}" if a.prompts else "the toy prompts"  # a metric that cannot score them
        skipped |= {m: f"skipping {lookup(m).title}: {e}" for m in names if m not in skipped
                    for e in prompt_errors(m, prompts, source)}
    except (ValueError, FileNotFoundError) as e:  # an unknown metric, a file given that does not exist
        raise SystemExit(f"evaluate.py: {e}")
    settings = {"steps": a.steps, "shift": a.shift, "guidance": a.guidance, "height": a.height, "width": a.width,
                "seed": a.seed, "per_prompt": a.per_prompt, "batch_size": a.batch_size, "dtype": str(dtype),
                "prompts_file": Path(a.prompts).name if a.prompts else "toy: TRAIN_PROMPTS + HELDOUT_PROMPTS",
                "prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16]}
    return Context(a, plan(prompts, groups, a.per_prompt, a.seed), [m for m in names if m not in skipped], skipped,
                   {}, options, settings, rank, world, device, dtype)


def main(argv=None):
    a = tyro.cli(Args, args=argv)
    if errors := folder_errors(a.out, "--out") + arg_errors(a):  # before the process group: rank 0 says it
        raise SystemExit(f"{WHO}: {errors[0]}" if int(os.environ.get("RANK", "0")) == 0 else 1)
    if a.compare:
        with file_errors_in_one_line(WHO, a.out):
            return compare(a.compare, Path(a.out), a.grid_prompts, COLUMNS)
    rank, world, device = collectives.init(a.device, a.collective_timeout, WHO, group_of_one=False)
    threads = torch.get_num_threads()
    try:
        with collectives.peers_stop_quietly(WHO):  # another rank stopped (and said why): this one exits quietly
            return evaluate_all(a, rank, world, device)
    finally:
        torch.set_num_threads(threads)
        if world > 1 and dist.is_initialized():  # stop_if_any has ended it already when a rank stopped
            dist.destroy_process_group()


def evaluate_all(a: Args, rank: int, world: int, device) -> list:
    """Every model of the command: checked, sampled, scored; the table or the comparison. [(run folder, results)]."""
    check_shared(Path(a.out), rank, WHO)  # every rank writes images and scores into --out
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    refs = resolve_models(a, rank, world)
    collectives.stop_if_any(size_errors(a, refs), WHO)
    toy_world = all(r.toy for r in refs)
    ctx, error = one_line(make_context, a, toy_world, rank, world, device)  # prompts, metrics, settings
    collectives.stop_if_any(error, WHO)
    if toy_world and device.type == "cpu":
        torch.set_num_threads(1)  # tiny matrices: one thread is fastest, and the same on any launch
    a, n = ctx.args, len(ctx.items)
    if rank == 0:
        for line in ctx.skipped.values():
            print(line)
        print(f"world size {world} | {len(refs)} model(s) | {n // a.per_prompt} prompts x {a.per_prompt} = {n} "
              f"images per model | {math.ceil(n / a.batch_size)} batches of {a.batch_size} (rank r takes batches "
              f"r, r+{world}, ...) | T={a.steps} shift={a.shift or 'family'} guidance={a.guidance or 'family'} | metrics "
              f"{', '.join(ctx.metrics) or 'none'} | device {device} {str(ctx.dtype).removeprefix('torch.')}",
              flush=True)
    results = []
    with file_errors_in_one_line(WHO, a.out):  # a full disk, a read-only folder: one line naming the path
        for ref in refs:
            results.append((Path(a.out) / ref.name, evaluate_model(ref, ctx)))
            collectives.barrier()
        if rank == 0 and len(refs) > 1:
            compare([str(run) for run, _ in results], Path(a.out), a.grid_prompts, COLUMNS)
        elif rank == 0:
            print(render_table(results, columns=COLUMNS))
    return results


if __name__ == "__main__":
    collectives.run_then_exit(main)  # not Python's shutdown: see run_then_exit

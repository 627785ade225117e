"""G2RPO training (Algorithm 1) with plain torch.distributed FSDP2.

    torchrun --nproc_per_node 8 train.py --model /path/to/FLUX.1-dev --reward hps --hps-checkpoint HPS_v2.1_compressed.pt
    torchrun --nproc_per_node 2 train.py            # no --model: the small CPU world (toy.py)
    python train.py ...                             # one process

One iteration (Algorithm 1): every rank takes its prompt(s) from a seeded distributed sampler;
for each prompt, one shared x_T, the anchor ODE, and for each k in M a group of G directions
continued at every granularity (rollout.singular_rollout, no gradients, parameters gathered
ONCE for the whole rollout); rewards of every image (n_rewards, |Lambda|, |M|, G); Eq. 8/11
advantages; then for each k one forward at the shared x_k with gradients, the log-probs of the
G next states (sde.sde_step scoring them), Eq. 12, backward; one optimizer step per iteration.
"""
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from advantage import mixed_advantage
from loss import g2rpo_loss
from rollout import default_sde_steps, predicted_evaluations, singular_rollout, trajectory_rollout
from sde import SCHEDULES, sde_step, sigma_grid


@dataclass
class Args:
    """Defaults are the paper's Table 4 (FLUX.1-dev); without --model, TOY_PRESET overrides some."""
    model: str = ""  # local diffusers FLUX.1-dev folder; empty: the small CPU world (toy.py)
    algo: str = "g2rpo"  # g2rpo, g2rpo-no-mgai (Lambda = {1}), or the baselines dancegrpo, flowgrpo, mixgrpo
    train_fraction: float = 0.6  # dancegrpo: share of its SDE steps trained per iteration (random subset)
    window: int = 4  # mixgrpo: SDE (and trained) steps in the sliding window
    window_shift_every: int = 25  # mixgrpo: iterations before the window moves one step later
    reward: str = "hps"  # '+'-separated reward names (rewards.py), e.g. hps, hps+clip, toy-adherence
    hps_checkpoint: str = ""  # HPS_v2.1_compressed.pt (for 'hps')
    clip_model: str = ""  # open_clip DFN5B ViT-H-14-378 folder or file (for 'clip')
    pickscore_model: str = ""  # PickScore_v1 folder (for 'pickscore')
    pickscore_processor: str = ""  # CLIP-ViT-H-14 processor folder (for 'pickscore')
    prompts: str = ""  # text file, one prompt per line (HPDv2 train prompts); toy: its own
    out: str = "runs/g2rpo"  # output folder: metrics.jsonl, checkpoints/, samples, export
    iterations: int = 300  # training iterations (Algorithm 1's E)
    prompts_per_rank: int = 1  # prompts per GPU per iteration ("train batch size" 1)
    G: int = 12  # group size: directions per SDE step
    T: int = 16  # sampling steps
    eta: float = 0.7  # SDE noise level
    schedule: str = "flowgrpo"  # noise schedule: flowgrpo (eta sqrt(t/(1-t))) or constant
    shift: float = 3.0  # scheduler shift of the sigma grid
    Lambda: str = "1,2,3"  # granularities, comma-separated
    sde_steps: str = ""  # SDE steps M as grid indices, comma-separated; empty: first half
    fine_first: bool = False  # Eq. 10 variant of the reference code (one fine step, then strided)
    lr: float = 2e-6  # AdamW learning rate
    weight_decay: float = 1e-4  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient clipping
    clip_range: float = 1e-4  # PPO clip epsilon
    adv_clip: float = 5.0  # advantage clip max
    step_per_k: bool = False  # optimizer step after every k instead of once per iteration
    seed: int = 42  # model/noise seed
    sampler_seed: int = 1223627  # prompt sampler seed
    mixed_precision: str = "bf16"  # bf16 (fp32 master weights, bf16 compute) or fp32
    activation_checkpointing: bool = False  # recompute transformer blocks in backward
    height: int = 0  # image height (0: the model folder's default, 720 for FLUX in the paper)
    width: int = 0  # image width (0: the model folder's default)
    checkpoint_every: int = 50  # iterations between sharded checkpoints (0: never)
    resume: bool = False  # continue from the latest complete checkpoint in --out
    export: bool = True  # export the transformer in diffusers format at the end
    num_samples: int = 8  # images in the fixed-prompt sample grid
    device: str = ""  # cuda or cpu (empty: cuda if available)


TOY_PRESET = dict(reward="toy-adherence", iterations=50, G=8, T=8, lr=1e-4, weight_decay=0.0,
                  clip_range=1e-2, mixed_precision="fp32", checkpoint_every=25)  # make demo: ~3 min on 2 cores


ALGOS = ("g2rpo", "g2rpo-no-mgai", "dancegrpo", "flowgrpo", "mixgrpo")
ALGO_PRESET = {"g2rpo-no-mgai": dict(Lambda="1"), "dancegrpo": dict(schedule="constant", eta=0.3)}


def parse_args(argv=None) -> Args:
    import argparse
    import inspect
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    doc = dict(line.strip().split(":", 1)[0:1] + line.split("#", 1)[1:] for line in
               inspect.getsource(Args).splitlines() if "#" in line and ":" in line.split("#")[0])
    for f in fields(Args):
        flag, help_ = "--" + f.name.replace("_", "-"), f"{doc.get(f.name, '').strip()} (default: {f.default!r})"
        if f.type is bool or f.type == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_)
        else:
            p.add_argument(flag, type=type(f.default), default=None, help=help_)
    given = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    preset = {} if given.get("model") else TOY_PRESET
    return Args(**{**preset, **ALGO_PRESET.get(given.get("algo", "g2rpo"), {}), **given})


def check_args(a: Args):
    """Stop with a clear message before any work."""
    errors = []
    if a.algo not in ALGOS:
        errors.append(f"--algo {a.algo!r}: choose one of {ALGOS}")
    if not 0 < a.train_fraction <= 1 or not 1 <= a.window <= a.T or a.window_shift_every < 1:
        errors.append("--train-fraction must be in (0, 1], --window in [1, T], --window-shift-every >= 1")
    if a.G < 2:
        errors.append(f"--G {a.G}: the group needs at least 2 members to normalise advantages")
    if a.T < 2:
        errors.append(f"--T {a.T}: need at least 2 sampling steps")
    try:
        lams = [int(x) for x in a.Lambda.split(",") if x.strip()]
    except ValueError:
        lams = None
    if not lams or min(lams) < 1 or len(set(lams)) != len(lams):
        errors.append(f"--Lambda {a.Lambda!r}: give distinct integers >= 1, e.g. 1,2,3")
    try:
        M = [int(x) for x in a.sde_steps.split(",") if x.strip()] or default_sde_steps(a.T)
        if not M or any(not 0 <= k < a.T for k in M):
            errors.append(f"--sde-steps {a.sde_steps!r}: grid indices must lie in [0, {a.T - 1}] for T={a.T}")
    except ValueError:
        errors.append(f"--sde-steps {a.sde_steps!r}: give comma-separated integers")
    if a.algo == "g2rpo-no-mgai" and lams != [1]:
        errors.append(f"--algo g2rpo-no-mgai is G2RPO with Lambda = {{1}}; drop --Lambda {a.Lambda}")
    if a.eta < 0:
        errors.append(f"--eta {a.eta}: the noise level must be >= 0")
    if a.schedule not in SCHEDULES:
        errors.append(f"--schedule {a.schedule!r}: choose one of {SCHEDULES}")
    if a.mixed_precision not in ("bf16", "fp32"):
        errors.append(f"--mixed-precision {a.mixed_precision!r}: choose bf16 or fp32")
    for name, val in (("iterations", a.iterations), ("prompts_per_rank", a.prompts_per_rank)):
        if val < 1:
            errors.append(f"--{name.replace('_', '-')} {val}: must be >= 1")
    for flag, path in (("model", a.model), ("prompts", a.prompts), ("hps-checkpoint", a.hps_checkpoint),
                       ("clip-model", a.clip_model), ("pickscore-model", a.pickscore_model)):
        if path and not os.path.exists(path):
            errors.append(f"--{flag} {path}: no such file or folder")
    if errors:
        raise SystemExit("train.py: invalid arguments:\n  " + "\n  ".join(errors))
    return lams, M


# ------------------------------------------------------------------------------------------------
# Distributed plumbing: process group, FSDP2 sharding, gathering for the rollout, checkpoints.
# Everything rank-aware lives in this block; the equation modules know nothing about ranks.
# ------------------------------------------------------------------------------------------------
def setup_distributed(device_pref: str):
    """torchrun sets RANK/WORLD_SIZE; a plain `python train.py` runs as a world of one."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(29500 + os.getpid() % 1000))
    rank, local, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    use_cuda = (device_pref or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    if use_cuda:
        torch.cuda.set_device(local)
    if not use_cuda:  # small CPU matmuls: one thread per process beats oversubscribed spinning
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    return rank, world, device


def shard_model(transformer, device, mixed_precision: str, activation_checkpointing: bool):
    """FSDP2: one unit per transformer block plus the root; fp32 master weights, bf16 compute."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if mixed_precision == "bf16" else MixedPrecisionPolicy()
    if activation_checkpointing:
        transformer.enable_gradient_checkpointing()
    blocks = list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(transformer, mesh=mesh, mp_policy=mp)
    return transformer


class GatherMeter:
    """Counts the bytes FSDP all-gathers into this rank (measured at the collective)."""

    def __init__(self):
        self.bytes = 0
        for name in ("all_gather_into_tensor", "all_gather_single"):  # FSDP2 uses one or the other
            if hasattr(dist, name):
                setattr(dist, name, self._counted(getattr(dist, name)))

    def _counted(self, fn):
        def counted(output_tensor, input_tensor, *a, **kw):
            self.bytes += output_tensor.numel() * output_tensor.element_size()
            return fn(output_tensor, input_tensor, *a, **kw)
        return counted

    def take(self) -> int:
        b, self.bytes = self.bytes, 0
        return b


class Gathered:
    """Keep the sharded parameters gathered for a whole rollout: ONE all-gather per iteration,
    not one per forward (reshard_after_forward is switched off inside, then everything reshards)."""

    def __init__(self, model):
        self.units = [m for m in model.modules() if hasattr(m, "reshard")]

    def __enter__(self):
        for u in self.units:
            u.set_reshard_after_forward(False, recurse=False)

    def __exit__(self, *exc):
        for u in self.units:
            u.reshard()
            u.set_reshard_after_forward(True, recurse=False)


def all_true(flag: bool, device) -> bool:
    t = torch.tensor([0.0 if flag else 1.0], device=device)
    dist.all_reduce(t)
    return t.item() == 0


def save_checkpoint(out: Path, it: int, model, optim, sampler_state, rank: int):
    """Sharded DCP checkpoint, written to a temp folder and renamed when every rank is done."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    final, tmp = out / f"ckpt_{it:06d}", out / f"ckpt_{it:06d}.tmp"
    msd, osd = get_state_dict(model, optim)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp))
    torch.save({"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
               tmp / f"rng_{rank}.pt")
    dist.barrier()
    if rank == 0:
        (tmp / "state.json").write_text(json.dumps({"iteration": it, "sampler": sampler_state}))
        os.replace(tmp, final)  # atomic: a folder named ckpt_* is always complete
    dist.barrier()


def load_checkpoint(out: Path, model, optim, rank: int):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    done = sorted(p for p in out.glob("ckpt_*") if not p.name.endswith(".tmp") and (p / "state.json").exists())
    if not done:
        return 0, None
    msd, osd = get_state_dict(model, optim)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(done[-1]))
    set_state_dict(model, optim, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng = torch.load(done[-1] / f"rng_{rank}.pt", weights_only=False)
    torch.set_rng_state(rng["torch"]), np.random.set_state(rng["numpy"]), random.setstate(rng["python"])
    if rng["cuda"] is not None:
        torch.cuda.set_rng_state_all(rng["cuda"])
    meta = json.loads((done[-1] / "state.json").read_text())
    return meta["iteration"], meta["sampler"]


def export_model(out: Path, model, model_dir: Path, rank: int):
    """Write out/final: the model folder with the trained transformer (diffusers format); the
    other components are symlinked, so FluxPipeline/FluxPolicy.from_pretrained(out/final) work."""
    from diffusers import FluxTransformer2DModel
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        final, tmp = out / "final", out / "final.tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        with torch.device("meta"):
            plain = FluxTransformer2DModel.from_config(model.config)
        plain.load_state_dict(sd, assign=True)
        plain.save_pretrained(tmp / "transformer")
        for item in model_dir.iterdir():
            if item.name != "transformer" and not (tmp / item.name).exists():
                (tmp / item.name).symlink_to(item.resolve())
        if final.exists():
            import shutil
            shutil.rmtree(final)
        os.replace(tmp, final)
    dist.barrier()


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------
class PromptSampler:
    """Seeded, epoch-shuffled, rank-strided prompts; its position is part of the checkpoint."""

    def __init__(self, prompts, seed, rank, world, per_rank):
        self.prompts, self.seed, self.rank, self.world, self.per_rank = prompts, seed, rank, world, per_rank
        self.position = 0  # global prompt index consumed so far (same on every rank)

    def next(self):
        out = []
        for j in range(self.per_rank):
            g = self.position + self.rank * self.per_rank + j
            epoch, i = divmod(g, len(self.prompts))
            perm = torch.randperm(len(self.prompts), generator=torch.Generator().manual_seed(self.seed + epoch))
            out.append((g, self.prompts[perm[i]]))
        self.position += self.world * self.per_rank
        return out


# ------------------------------------------------------------------------------------------------
# The algorithm
# ------------------------------------------------------------------------------------------------
def plan(a, it, M, T, gen):
    """(SDE steps, trained steps) of iteration `it`. G2RPO: its M, each k trained (Sec. 3.2).
    Baselines: Flow-GRPO SDE and trains at every step; DanceGRPO SDE at every step, trains a random
    train_fraction of them; MixGRPO SDE and trains only in a window that moves later over time."""
    if a.algo.startswith("g2rpo"):
        return M, M
    if a.algo == "mixgrpo":
        start = (it // a.window_shift_every) % (T - a.window + 1)
        return list(range(start, start + a.window)), list(range(start, start + a.window))
    steps = list(range(T))
    if a.algo == "dancegrpo":
        n = max(1, round(a.train_fraction * T))
        return steps, sorted(torch.randperm(T, generator=gen, device=gen.device)[:n].tolist())
    return steps, steps


def rollout_prompt(policy, model, rewards, prompt, x_T, sigmas, M, lams, a, gen, it):
    """Lines 7-22 of Algorithm 1 for one prompt: rollout and rewards R (n_r, |Lambda|, |trained|, G).
    Baselines: one reward per trajectory, repeated over the trained steps, so that Eq. 8 applied per
    step gives every step the trajectory's Eq. 4 advantage."""
    cond = policy.embed(prompt)
    v = policy.velocity(cond, model)
    if a.algo.startswith("g2rpo"):
        ro = singular_rollout(v, x_T, sigmas, M, a.G, lams, a.eta, a.schedule, a.fine_first, generator=gen)
    else:
        sde_steps, trained = plan(a, it, M, len(sigmas) - 1, gen)
        ro = trajectory_rollout(v, x_T, sigmas, a.G, sde_steps, a.eta, a.schedule, generator=gen)
        ro.groups = [g for g in ro.groups if g.k in trained]
    t0 = time.time()
    with torch.no_grad():
        if a.algo.startswith("g2rpo"):
            latents = torch.stack([torch.stack([g.images[l] for g in ro.groups]) for l in lams])  # (L, |M|, G, ...)
        else:  # the G final images, once
            latents = ro.groups[0].images[1][None, None]  # (1, 1, G, ...)
        images = policy.decode(torch.cat([latents.flatten(0, 2), ro.anchor[-1:]]))
        scores = torch.stack([r.score(images, [prompt] * len(images)) for r in rewards]).float().cpu()
    R = scores[:, :-1].reshape(len(rewards), len(lams), -1, a.G).expand(-1, -1, len(ro.groups), -1)
    return ro, cond, R, scores[:, -1], time.time() - t0


def train_prompt(policy, model, ro, cond, A, a, n_total):
    """Lines 24-26: for each k in M one forward at the shared x_k with gradients, Eq. 12, backward."""
    v = policy.velocity(cond, model)
    out = {"loss": 0.0, "clip_frac": 0.0, "ratio_drift_mean": 0.0, "ratio_drift_max": 0.0}
    for j, grp in enumerate(ro.groups):
        s, s_next = ro.sigmas[grp.k], ro.sigmas[grp.k + 1]
        # G2RPO: x_k is (1, L, C) and ONE forward serves the G branches; baselines: their G own states
        v_k = v(grp.x_k, s.reshape(1).float())
        G = grp.x_next.shape[0]
        rep = (G,) + (-1,) * (grp.x_k.ndim - 1)
        _, logp, _, _ = sde_step(grp.x_k.expand(rep), v_k.expand(rep), s, s_next, a.eta, a.schedule,
                                 x_next=grp.x_next)
        loss, diag = g2rpo_loss(logp, grp.log_prob, A[j].to(logp.device), a.clip_range)
        (loss / n_total).backward()
        out["loss"] += loss.item() / n_total
        for key in ("clip_frac", "ratio_drift_mean"):
            out[key] += diag[key] / n_total
        out["ratio_drift_max"] = max(out["ratio_drift_max"], diag["ratio_drift_max"])
        yield out


def main(argv=None):
    a = parse_args(argv)
    lams, M = check_args(a)
    rank, world, device = setup_distributed(a.device)
    out = Path(a.out)
    is_main = rank == 0
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(a.seed + rank)
    random.seed(a.seed + rank), np.random.seed(a.seed + rank)

    from policy.flux import FluxPolicy
    from rewards import load_rewards
    if a.model:
        model_dir = Path(a.model)
        prompts = [l.strip() for l in open(a.prompts)] if a.prompts else None
        if not prompts:
            raise SystemExit("train.py: --prompts FILE is required with --model (one prompt per line)")
    else:
        import toy
        if is_main:
            toy.base_model()  # pretrains on first use (minutes), then cached
        dist.barrier()
        model_dir = Path(toy.base_model())
        prompts = [l.strip() for l in open(a.prompts)] if a.prompts else list(toy.TRAIN_PROMPTS)
    prompts = [p for p in prompts if p]
    dims = {k: v for k, v in (("height", a.height), ("width", a.width)) if v}
    policy = FluxPolicy.from_pretrained(model_dir, device=device, dtype=torch.float32,
                                        cache_dir=out / "prompt_cache", **dims)
    policy.encode_prompts(prompts[rank::world])  # each rank embeds its share into the disk cache
    dist.barrier()
    paths = dict(hps_checkpoint=a.hps_checkpoint, clip_model=a.clip_model,
                 pickscore_model=a.pickscore_model, pickscore_processor=a.pickscore_processor)
    rewards = load_rewards(a.reward, device=device, **{k: v for k, v in paths.items() if v})

    model = shard_model(policy.transformer, device, a.mixed_precision, a.activation_checkpointing)
    model.train()
    optim = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=a.weight_decay,
                              betas=(0.9, 0.999), eps=1e-8)
    sampler = PromptSampler(prompts, a.sampler_seed, rank, world, a.prompts_per_rank)
    start = 0
    if a.resume:
        start, pos = load_checkpoint(out, model, optim, rank)
        sampler.position = pos or 0
    meter = GatherMeter()
    sigmas = sigma_grid(a.T, a.shift).to(device)
    if a.algo.startswith("g2rpo"):
        calls, evals = predicted_evaluations(a.T, M, a.G, lams, a.fine_first)
    else:  # baselines: G trajectories + the anchor, batched, at every step; one image per trajectory
        lams, calls, evals = [1], a.T, a.T * (a.G + 1)
    if is_main:
        print(f"world size {world} | prompts/iteration {world * a.prompts_per_rank} | "
              f"samples/iteration {world * a.prompts_per_rank * len(M) * a.G * len(lams)} | "
              f"model evaluations per prompt {evals} in {calls} batched calls + {len(M)} training "
              f"forward/backward | M={M} Lambda={lams} G={a.G} T={a.T} | device {device}", flush=True)
        (out / "args.json").write_text(json.dumps(asdict(a), indent=1))
    metrics_file = out / "metrics.jsonl"
    if is_main and metrics_file.exists():  # keep only what the checkpoint we continue from has seen
        keep = [l for l in metrics_file.read_text().splitlines() if json.loads(l)["iteration"] <= start]
        metrics_file.write_text("".join(l + "\n" for l in keep))
    grid_prompts = prompts[: max(1, a.num_samples // 2)] if a.model else list(toy.GRID_PROMPTS)
    if start == 0:
        write_samples(policy, grid_prompts, a, out / "samples_000000.png", is_main)
    bar = tqdm(range(start, a.iterations), initial=start, total=a.iterations, disable=not is_main,
               dynamic_ncols=True)

    for it in bar:
        t0 = time.time()
        batch = sampler.next()
        # ---- sampling phase: no gradients, parameters gathered once --------------------------
        model.eval()
        meter.take()
        with Gathered(model):
            results = []
            for g_idx, prompt in batch:
                gen = torch.Generator(device).manual_seed(a.seed * 1_000_003 + g_idx)  # x_T and SDE noise
                x_T = policy.noise(1, generator=gen)
                results.append((prompt,) + rollout_prompt(policy, model, rewards, prompt, x_T, sigmas, M, lams, a,
                                                          gen, it))
        gathered_rollout = meter.take()
        t_roll = time.time() - t0
        # ---- advantages (Eqs. 8, 11) ----------------------------------------------------------
        As = [mixed_advantage(R, adv_clip=a.adv_clip) for _, _, _, R, _, _ in results]
        finite = all(torch.isfinite(R).all() and torch.isfinite(A).all()
                     for (_, _, _, R, _, _), A in zip(results, As))
        # ---- training phase (Eq. 12) ----------------------------------------------------------
        t1 = time.time()
        model.train()
        optim.zero_grad(set_to_none=True)
        stats, grad_norm, steps = {}, float("nan"), 0
        if all_true(finite, device):
            for (prompt, ro, cond, R, _, _), A in zip(results, As):
                for stats in train_prompt(policy, model, ro, cond, A, a, len(ro.groups) * len(results)):
                    if a.step_per_k:
                        grad_norm, ok = clip_and_step(model, optim, a, device)
                        steps += ok
        if not a.step_per_k:
            grad_norm, ok = clip_and_step(model, optim, a, device) if stats else (float("nan"), False)
            steps += ok
        t_train = time.time() - t1
        # ---- logging --------------------------------------------------------------------------
        Rs = [r[3] for r in results]  # per prompt (n_r, L, k, G); k may differ between prompts
        R_mean = torch.stack([R.mean((2, 3)) for R in Rs]).mean(0)  # (n_r, L)
        anchor = torch.stack([r[4] for r in results])  # (P, n_r)
        local = torch.cat([R_mean.flatten(), anchor.mean(0), torch.tensor([stats.get("loss", 0.0)])])
        dist.all_reduce(local)
        local /= world
        n_r = len(rewards)
        rec = {"iteration": it + 1,
               "anchor_reward": {r.name: local[n_r * len(lams) + i].item() for i, r in enumerate(rewards)},
               "reward_per_lambda": {f"{r.name}@{l}": local[i * len(lams) + j].item()
                                     for i, r in enumerate(rewards) for j, l in enumerate(lams)},
               "loss": local[-1].item(), "grad_norm": float(grad_norm), "optimizer_steps": steps,
               "skipped": not finite, **{k: v for k, v in stats.items() if k != "loss"},
               "adv_abs_mean": torch.cat([A.flatten() for A in As]).abs().mean().item(),
               "adv_std": torch.cat([A.flatten() for A in As]).std().item(),
               "reward_std_in_group": torch.stack([R.std(-1).mean() for R in Rs]).mean().item(),
               "model_evaluations": evals * len(batch), "batched_calls": calls * len(batch),
               "gathered_bytes_rollout": gathered_rollout, "gathered_bytes_train": meter.take(),
               "sec_reward": sum(r[5] for r in results), "sec_rollout": t_roll - sum(r[5] for r in results),
               "sec_train": t_train,
               "peak_mem_gb": (torch.cuda.max_memory_allocated() if device.type == "cuda" else _rss()) / 2**30}
        if is_main:
            with open(metrics_file, "a") as f:
                f.write(json.dumps(rec) + "\n")
            bar.set_postfix({**{k: f"{v:.4f}" for k, v in rec["anchor_reward"].items()},
                             "loss": f"{rec['loss']:+.2e}", "drift": f"{stats.get('ratio_drift_mean', 0):.1e}"})
            if not finite:
                bar.write(f"iteration {it + 1}: non-finite reward or advantage, update skipped")
            plot_curve(metrics_file, out / "reward_curve.png")
        if a.checkpoint_every and (it + 1) % a.checkpoint_every == 0:
            save_checkpoint(out, it + 1, model, optim, sampler.position, rank)
            write_samples(policy, grid_prompts, a, out / f"samples_{it + 1:06d}.png", is_main)
    if a.export:
        export_model(out, model, model_dir, rank)
    dist.barrier()
    dist.destroy_process_group()


def write_samples(policy, prompts, a, path, is_main):
    """Deterministic samples of fixed prompts and seeds (every rank runs the FSDP forwards)."""
    from policy.flux import sample
    from report.figures import save_grid
    policy.transformer.eval()
    scale = max(1, 96 // policy.height)
    imgs = sample(policy, [p for p in prompts for _ in range(2)], [0, 1] * len(prompts), a.T, a.shift)
    if is_main:
        save_grid(imgs, prompts, 2, path, scale)
    policy.transformer.train()


def plot_curve(metrics_file: Path, path: Path):
    """The paper's Fig. 1a: the deterministic anchor sample's reward per iteration."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    recs = [json.loads(l) for l in metrics_file.read_text().splitlines()]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    its = [r["iteration"] for r in recs]
    for name in recs[0]["anchor_reward"]:
        y = np.array([r["anchor_reward"][name] for r in recs])
        avg = np.convolve(y, np.ones(10), "full")[: len(y)] / np.minimum(np.arange(1, len(y) + 1), 10)
        line, = ax.plot(its, y, alpha=0.3, lw=1)
        ax.plot(its, avg, color=line.get_color(), lw=2, label=f"{name} (mean of last 10)")
    ax.set_xlabel("iteration"), ax.set_ylabel("reward of the ODE sample"), ax.legend(), fig.tight_layout()
    fig.savefig(path.with_suffix(".tmp.png")), plt.close(fig)
    os.replace(path.with_suffix(".tmp.png"), path)


def clip_and_step(model, optim, a, device):
    """Clip, check the gradient is finite on every rank, step; a non-finite one never lands."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), a.max_grad_norm)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    ok = all_true(bool(torch.isfinite(norm)), device)
    if ok:
        optim.step()
    else:
        print(f"rank {dist.get_rank()}: non-finite gradient norm {norm.item()}, update skipped", file=sys.stderr)
    optim.zero_grad(set_to_none=True)
    return norm.item(), ok


def _rss() -> int:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


if __name__ == "__main__":
    main()

"""G2RPO training: Algorithm 1 of the paper, with plain torch.distributed FSDP2.

    torchrun --nproc_per_node 8 train.py --model /path/to/FLUX.1-dev --prompts train.txt \
        --reward hps --hps-checkpoint HPS_v2.1_compressed.pt
    torchrun --nproc_per_node 1 train.py --model /path/to/stable-diffusion-3.5-medium --lora-rank 32 ...
    torchrun --nproc_per_node 2 train.py            # no --model: the small CPU world (toy/), preset 'toy'
    python train.py --help                          # every option, with the defaults this command would use

--model is a diffusers folder of any family policy/families.py lists (FLUX.1, Stable Diffusion 3.5, Qwen-Image); the
policy (policy/interface.py) is all this file knows of it. The file reads top to bottom: the configuration (Table 4),
the policy's loading, the sampling plan, one prompt's rollout (lines 6-20), the update (lines 24-26), then train(), whose loop
carries Algorithm 1's line numbers. The equations live in sde.py (Eqs. 1-3), rollout.py (Sec. 3.2, Eq. 10,
re-scoring), advantage.py (Eqs. 8, 11) and loss.py (Eq. 12). What only a launcher needs (argument checks, the
process group, FSDP2, checkpoints, export, metrics, the run folder, the guard's probes) is in launch/.
"""
import argparse
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
import torch.distributed as dist
import tyro

from advantage import mixed_advantage
from baselines.grpo import ALGOS as BASELINES, PRESETS as BASELINE_PRESETS, TrajectoryGRPO
from data.prompts import PromptSampler, encoding_share, future_prompts, read_prompts
from launch import checkpoints, collectives, startup
from launch.arguments import run_settings, sde_steps
from launch.bookkeeping import Bookkeeping
from launch.collectives import all_gather_objects, all_true, barrier
from launch.metrics import Costs, record
from launch.probing import Probes, set_up_probes
from launch.sharding import Gathered, shard_model
from loss import g2rpo_loss
from policy import families
from policy.lora import add_lora, trainable
from report.files import file_errors_in_one_line
from rewards import RewardOptions, load_rewards
from rollout import Rollout, rescore_groups, singular_rollout, stack_images, subset_evaluations
from sde import SCHEDULES

ALGOS = ("g2rpo", "g2rpo-no-mgai") + BASELINES


# ------------------------------------------------------------------------------------------------
# Configuration: the dataclass defaults are the paper's Table 4 (FLUX.1-dev)
# ------------------------------------------------------------------------------------------------
@dataclass
class Args:
    """G2RPO training (Algorithm 1). Each default below is what THIS command line would run with."""
    model: str = ""  # local diffusers folder: FLUX.1-dev (the paper's), SD3.5, Qwen-Image; empty: the small CPU world (toy/)
    preset: Literal["paper", "toy"] = "paper"  # defaults: paper = Table 4; toy = the small world's demo (given when --model is empty)
    algo: Literal[ALGOS] = "g2rpo"  # g2rpo, g2rpo-no-mgai (Lambda = {1}), or the baselines (baselines/grpo.py)
    reward: str = "hps"  # '+'-separated reward names (rewards/), e.g. hps, hps+clip, toy-adherence
    rewards: Annotated[RewardOptions, tyro.conf.OmitArgPrefixes] = field(default_factory=RewardOptions)
    prompts: str = ""  # text file, one prompt per line (HPDv2 train prompts); toy: its own
    out: str = "runs/g2rpo"  # output folder: metrics.jsonl, checkpoints, samples, export
    iterations: int = 300  # training iterations (Algorithm 1's E)
    prompts_per_rank: int = 1  # prompts per GPU per iteration ("train batch size" 1)
    G: int = 12  # group size: directions per SDE step
    T: int = 16  # sampling steps
    eta: float = 0.7  # SDE noise level
    schedule: Literal[SCHEDULES] = "flowgrpo"  # noise schedule: flowgrpo (eta sqrt(t/(1-t))) or constant
    shift: float = 0.0  # time shift of the sigma grid (0: the model family's: 3 for FLUX.1 as in Table 4 and for SD3.5, Qwen-Image's resolution-dependent one)
    guidance: float = 0.0  # guidance scale (0: the model family's: FLUX.1-dev's distilled 3.5, CFG 4.5 for SD3.5, 4.0 for Qwen-Image)
    Lambda: tuple[int, ...] = (1, 2, 3)  # granularities, e.g. --Lambda 1 2 3
    sde_steps: tuple[int, ...] = ()  # SDE steps M as grid indices (G2RPO); empty: the first half
    fine_first: bool = False  # Eq. 10 grid of the reference code exactly (one fine step, then strided)
    sde_steps_per_iteration: int = 0  # cheaper G2RPO: a random subset of M of this size per prompt (0: all of M)
    lambda_weights: tuple[float, ...] = ()  # weights of the granularities in Eq. 11 (empty: plain sum, the paper)
    train_fraction: float = 0.6  # dancegrpo: share of its SDE steps trained per iteration (random subset)
    window: int = 4  # mixgrpo: SDE (and trained) steps in the sliding window
    window_shift_every: int = 25  # mixgrpo: iterations before the window moves one step later
    lr: float = 2e-6  # AdamW learning rate
    weight_decay: float = 1e-4  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient clipping
    clip_range: float = 1e-4  # PPO clip epsilon
    adv_clip: float = 5.0  # advantage clip max
    step_per_k: bool = False  # optimizer step after every k (the reference code) instead of once per iteration
    rescore_batch: int = 1  # trained steps per forward/backward: 1 = one per k (reference code), 0 = all in one pass
    seed: int = 42  # model/noise seed
    sampler_seed: int = 1223627  # prompt sampler seed
    mixed_precision: Literal["bf16", "fp32"] = "bf16"  # bf16 (fp32 master weights, bf16 compute) or fp32
    activation_checkpointing: bool = False  # recompute transformer blocks in backward
    replicas: int = 1  # HSDP: shard within groups of world/replicas ranks (a node), replicate across the groups
    lora_rank: int = 0  # LoRA rank (policy/lora.py): train adapters only, base frozen (bf16 under bf16); 0: full fine-tuning
    lora_alpha: float = 0.0  # LoRA alpha: the update is scaled by alpha / rank (0: alpha = rank)
    lora_targets: tuple[str, ...] = ()  # module names (suffixes) that get adapters (empty: the model family's LORA_TARGETS)
    height: int = 0  # image height (0: the model folder's default, 720 for FLUX in the paper)
    width: int = 0  # image width (0: the model folder's default)
    checkpoint_every: int = 50  # iterations between sharded checkpoints (0: never)
    keep_checkpoints: int = 2  # newest complete checkpoints kept (older ones are deleted)
    resume: bool = False  # continue from the latest complete checkpoint in --out (same settings)
    overwrite: bool = False  # clear a previous run in --out first (its prompt cache is kept)
    max_skipped: int = 5  # stop (exit 1) after this many iterations in a row without an update
    probe_every: int = 0  # reward-hacking guard (guard/probes.py): iterations between probes (0: off)
    probe_rewards: str = ""  # '+'-separated rewards NOT trained on, probed beside the trained one, e.g. clip+pickscore
    probe_prompts: str = ""  # held-out prompt file for the probes (the small world: its held-out prompts)
    probe_seeds: int = 2  # ODE images per probe prompt (seeds 0, 1, ...)
    probe_max_prompts: int = 64  # probe with the first N prompts of --probe-prompts (0: all; 400 x 2 seeds cost ~7 iterations on FLUX)
    probe_tolerance: float = 0.05  # a reward not trained on has fallen when it is below its reference - this
    probe_against: Literal["peak", "start"] = "peak"  # the reference: its best probe so far, or its first probe
    probe_patience: int = 0  # stop after this many probes in a row without a new best (0: never)
    probe_stop: bool = False  # stop when a reward not trained on has fallen (default: warn and go on)
    keep_best: bool = True  # export the best model by the guard's criterion to --out/best (with --probe-every)
    export: bool = True  # export the transformer in diffusers format at the end
    preflight: bool = True  # on a GPU: stop at start when the estimated peak memory (launch/preflight.py) does not fit
    num_samples: int = 8  # images in the fixed-prompt sample grid
    device: str = ""  # cuda or cpu (empty: cuda if available)
    collective_timeout: float = collectives.DEFAULT_TIMEOUT_MIN  # minutes a rank waits in a collective (NCCL watchdog) while rank 0 alone exports or writes


PRESETS = {"paper": {},  # Table 4 = the dataclass defaults
           # the small world's demo (make demo: 2.5 min on 2 cores), chosen on G2RPO alone
           "toy": dict(reward="toy-adherence", iterations=50, G=8, T=8, lr=1e-4, weight_decay=0.0, clip_range=1e-2,
                       mixed_precision="fp32", checkpoint_every=25, probe_every=10, probe_rewards="toy-clean+toy-shape")}
ALGO_PRESETS = {"g2rpo-no-mgai": dict(Lambda=(1,)), **BASELINE_PRESETS}


def parse_args(argv=None) -> Args:
    """Table 4, then the preset (toy when --model is empty), then the --algo's own settings, then the
    flags given. --help shows the defaults of the command line it is added to."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--model", default=""), pre.add_argument("--preset"), pre.add_argument("--algo", default="")
    known, _ = pre.parse_known_args(argv)
    preset = known.preset if known.preset in PRESETS else ("paper" if known.model else "toy")
    default = replace(Args(), preset=preset, **PRESETS[preset], **ALGO_PRESETS.get(known.algo, {}))
    return tyro.cli(Args, args=argv, default=default, description=__doc__.splitlines()[0])


# ------------------------------------------------------------------------------------------------
# Line 1: the policy, sharded (launch/sharding.py) before its weights are read
# ------------------------------------------------------------------------------------------------
def load_model(a: Args, weights, device, dtype, lora_targets, fp32_inputs=("timestep", "guidance")):
    """The transformer as this rank trains it, never whole in its memory: built on the meta device, the LoRA
    adapters added (seeded) on `lora_targets`, sharded (shard_model, the family's `fp32_inputs`), and only then this rank's shard read from
    `weights` (the model folder's files, policy.weights.WeightFiles) by policy.weights.load_transformer. Peak: the
    shard plus one block's part, not the whole fp32 model."""
    from policy.weights import load_transformer

    def prepare(transformer):  # on the meta device, before any weight is read
        if a.lora_rank:  # adapters in fp32, the base frozen (policy/lora.py)
            add_lora(transformer, a.lora_rank, a.lora_alpha, lora_targets, seed=a.seed)
        return shard_model(transformer, device, a.mixed_precision, a.activation_checkpointing, a.replicas,
                           fp32_inputs=fp32_inputs)
    return load_transformer(weights, device, dtype, prepare)


# ------------------------------------------------------------------------------------------------
# The sampling plan (rollout.Plan): G2RPO's here, the trajectory baselines' in baselines/grpo.py
# ------------------------------------------------------------------------------------------------
class G2RPO:
    """Singular Stochastic Sampling at every k in M, every granularity in Lambda (Sec. 3.2, Eq. 10); each k is
    trained. S < |M| (--sde-steps-per-iteration): a uniform random S-subset of M per prompt."""

    def __init__(self, sigmas, M, G: int, Lambda, eta: float, schedule: str, fine_first: bool = False, S: int = 0):
        self.sigmas, self.M, self.G, self.Lambda = sigmas, list(M), G, tuple(Lambda)
        self.eta, self.schedule, self.fine_first, self.S = eta, schedule, fine_first, S or len(M)
        self.calls, self.evals = subset_evaluations(len(sigmas) - 1, self.M, G, self.Lambda, self.S, fine_first)
        self.images_per_prompt = self.S * G * len(self.Lambda)
        self.train_passes = f"{self.S} forward/backward of batch 1 (shared x_k)"

    def rollout(self, v, x_T, it: int, generator) -> Rollout:
        M = self.M
        if self.S < len(M):  # drawn from the prompt's generator
            M = sorted(M[i] for i in torch.randperm(len(M), generator=generator, device=generator.device)[:self.S])
        return singular_rollout(v, x_T, self.sigmas, M, self.G, self.Lambda, self.eta, self.schedule, self.fine_first,
                                generator=generator)

    def images(self, ro: Rollout) -> torch.Tensor:
        return stack_images(ro)  # (|Lambda|, |M|, G, ...)


def make_plan(a: Args, sigmas):
    """The --algo's plan, given the settings it uses."""
    if a.algo.startswith("g2rpo"):
        return G2RPO(sigmas, sde_steps(a), a.G, a.Lambda, a.eta, a.schedule, a.fine_first, a.sde_steps_per_iteration)
    return TrajectoryGRPO(a.algo, sigmas, a.G, a.eta, a.schedule, a.train_fraction, a.window, a.window_shift_every)


# ------------------------------------------------------------------------------------------------
# Lines 7-20 for one prompt; lines 24-26
# ------------------------------------------------------------------------------------------------
@dataclass
class Sampled:
    """One prompt after lines 7-20: its rollout and the rewards of every image."""
    prompt: str
    cond: object  # the family's Cond (policy/interface.py)
    rollout: object  # rollout.Rollout; its groups are the trained steps
    R: torch.Tensor  # (n_rewards, |Lambda|, |trained steps|, G)
    anchor_reward: torch.Tensor  # (n_rewards,) of the deterministic (ODE) sample
    sec_reward: float


def sample_prompt(plan, policy, model, rewards, prompt, it, gen) -> Sampled:
    """Lines 7-20 for one prompt: the shared initial noise, the rollout (no gradients), decode, every image's rewards."""
    x_T = policy.noise(1, generator=gen)  # line 7: one x_T for the whole group
    cond = policy.embed(prompt)
    ro = plan.rollout(policy.velocity(cond, model), x_T, it, gen)
    t0 = time.time()
    with torch.no_grad():
        latents = plan.images(ro)  # (L, K, G, ...), K = |trained steps|, or 1 when shared by all
        images = policy.decode(torch.cat([latents.flatten(0, 2), ro.anchor[-1:]]))  # + the anchor's image
        scores = torch.stack([r.score(images, [prompt] * len(images)) for r in rewards]).float().cpu()
    L, _, G = latents.shape[:3]
    R = scores[:, :-1].reshape(len(rewards), L, -1, G).expand(-1, -1, len(ro.groups), -1)
    return Sampled(prompt, cond, ro, R, scores[:, -1], time.time() - t0)


def clip_and_step(model, optim, max_grad_norm: float, agree=all_true):
    """Line 26: clip, check the gradient norm is finite on every rank (`agree`), step; a non-finite one never lands."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    ok = agree(bool(torch.isfinite(norm)))
    if ok:
        optim.step()
    else:
        print(f"rank {dist.get_rank()}: non-finite gradient norm {norm.item()}, update skipped", file=sys.stderr)
    optim.zero_grad(set_to_none=True)
    return norm.item(), ok


def update(policy, model, optim, results, As, a: Args, step=clip_and_step) -> dict:
    """Lines 24-26: for each prompt and each trained k, re-score the G next states under the current policy
    (rollout.rescore_groups: one forward at the shared x_k; --rescore-batch groups per forward, 0 = all in one pass),
    Eq. 12, backward; then one optimizer `step` (or one per k with --step-per-k). Returns the loss, its diagnostics
    and the step count."""
    work = [(s, group, A[j]) for s, A in zip(results, As) for j, group in enumerate(s.rollout.groups)]
    n, size = len(work), a.rescore_batch or len(work)  # the loss is a mean over every (prompt, k, i)
    stats = dict(loss=0.0, clip_frac=0.0, ratio_drift_mean=0.0, ratio_drift_max=0.0, grad_norm=float("nan"),
                 optimizer_steps=0)
    for c in range(0, n, size):
        chunk = work[c:c + size]
        v = policy.rows_velocity([(s.cond, group.x_k.shape[0]) for s, group, _ in chunk], model)
        logps = rescore_groups(v, [group for _, group, _ in chunk], chunk[0][0].rollout.sigmas, a.eta, a.schedule)
        total = 0.0
        for (s, group, A), logp in zip(chunk, logps):  # logp: (G,) with gradients
            loss, diag = g2rpo_loss(logp, group.log_prob, A.to(logp.device), a.clip_range)  # Eq. 12
            total = total + loss / n
            stats["loss"] += loss.item() / n
            for k in ("clip_frac", "ratio_drift_mean"):
                stats[k] += diag[k] / n
            stats["ratio_drift_max"] = max(stats["ratio_drift_max"], diag["ratio_drift_max"])
        total.backward()
        if a.step_per_k or c + size >= n:  # line 26
            stats["grad_norm"], ok = step(model, optim, a.max_grad_norm)
            stats["optimizer_steps"] += ok
    return stats


# ------------------------------------------------------------------------------------------------
# Lines 1-2, then Algorithm 1
# ------------------------------------------------------------------------------------------------
def load_world(a: Args, rank: int):
    """(model folder, training prompts, sample-grid prompts, prompts to mark in the grid). The small
    world (toy/) is reached only here, and only without --model."""
    prompts = read_prompts(a.prompts) if a.prompts else None
    if a.model:
        return Path(a.model), prompts, prompts[: max(1, a.num_samples // 2)], ()
    import toy
    if rank == 0:
        toy.base_model()  # pretrains on first use (minutes), then cached
    barrier()
    return Path(toy.base_model()), prompts or list(toy.TRAIN_PROMPTS), list(toy.GRID_PROMPTS), toy.HELDOUT_PROMPTS


@dataclass
class Run:
    """What the set-up hands the loop."""
    policy: object  # the model family's policy.interface.Policy
    model: torch.nn.Module  # the FSDP2-sharded transformer (plain at world size 1 where it can be: shard_model)
    optim: torch.optim.Optimizer
    rewards: list
    sampler: PromptSampler
    plan: object  # rollout.Plan: G2RPO, or baselines.grpo.TrajectoryGRPO
    start: int  # first iteration (> 0 when resumed)
    model_dir: Path
    grid: tuple  # (sample-grid prompts, prompts marked in it)
    settings: dict = None  # args.json: the arguments, the world size, the digests of the model and prompt files
    probe: Probes = None  # the reward-hacking guard's probes (--probe-every)


def set_up(a: Args, rank: int, world: int, device) -> Run:
    """Lines 1-2 of Algorithm 1: the policy, the reward models, the optimizer; a resumed state; the
    prompts this rank will use, encoded once into the disk cache (the text encoders are then freed)."""
    from policy.weights import WeightFiles
    out = Path(a.out)
    torch.manual_seed(a.seed + rank), random.seed(a.seed + rank), np.random.seed(a.seed + rank)
    model_dir, prompts, grid_prompts, marked = load_world(a, rank)
    dims = {k: v for k, v in (("height", a.height), ("width", a.width)) if v}
    bf16 = a.mixed_precision == "bf16"
    base_dtype = torch.bfloat16 if a.lora_rank and bf16 else torch.float32  # a frozen base needs no fp32 master
    family = families.family_of(model_dir)  # from its model_index.json: FLUX.1, SD3.5, Qwen-Image
    model = load_model(a, WeightFiles(model_dir / "transformer", family.TRANSFORMER), device, base_dtype,
                       a.lora_targets or family.LORA_TARGETS, family.FP32_INPUTS).train()
    policy = family.from_pretrained(model_dir, device=device, dtype=base_dtype, cache_dir=out / "prompt_cache",
                                    embed_dtype=torch.bfloat16 if bf16 else None, transformer=model,
                                    guidance=a.guidance, **dims)
    rewards = load_rewards(a.reward, device=device, **asdict(a.rewards))
    optim = torch.optim.AdamW(trainable(model), lr=a.lr, weight_decay=a.weight_decay, betas=(0.9, 0.999), eps=1e-8)
    sampler = PromptSampler(prompts, a.sampler_seed, rank, world, a.prompts_per_rank)
    start, position = checkpoints.load(out, model, optim, rank) if a.resume else (0, 0)
    sampler.position = position or 0
    probes = set_up_probes(a, read_prompts(a.probe_prompts) if a.probe_prompts else list(marked), rewards, rank, world,
                           out, start, device) if a.probe_every else None
    needs = future_prompts(sampler, a.iterations - start) + (grid_prompts if rank == 0 else []) \
        + ([item[0] for _, item in probes.items] if probes else [])
    policy.encode_prompts(encoding_share(all_gather_objects(needs), rank))  # one writer per prompt-cache file
    barrier()
    plan = make_plan(a, policy.sigmas(a.T, a.shift).to(device))  # chosen once; the family's time shift
    return Run(policy, model, optim, rewards, sampler, plan, start, model_dir, (grid_prompts, marked),
               run_settings(a, world), probes)


def main(argv=None):
    a = parse_args(argv)
    with collectives.peers_stop_quietly("train.py"), file_errors_in_one_line("train.py", a.out):
        train(a)


def train(a: Args):
    """Algorithm 1. Around its lines, launch.bookkeeping logs, probes, checkpoints and exports."""
    is_main = os.environ.get("RANK", "0") == "0"
    rank, world, device, lock = startup.start(a, is_main)  # noqa: F841 - the lock is held until exit
    r = set_up(a, rank, world, device)  # lines 1-2: the policy, the reward models, the optimizer (resumed)
    model, plan, books, costs = r.model, r.plan, Bookkeeping(a, r, rank, world, device), Costs(device)
    for it in books.iterations():  # line 3: for each training iteration
        costs.start()
        batch = r.sampler.next()  # line 5: this rank's prompts
        model.eval()  # line 4 (pi_old <- pi_theta): the rollout runs the current weights, its log-probs are the old
        with Gathered(model), costs.phase("rollout"):  # lines 6-20, per prompt (its generator: x_T and SDE noise)
            results = [sample_prompt(plan, r.policy, model, r.rewards, prompt, it,
                                     torch.Generator(device).manual_seed(a.seed * 1_000_003 + g)) for g, prompt in batch]
        As = [mixed_advantage(s.R, adv_clip=a.adv_clip, lambda_weights=a.lambda_weights or None)  # lines 21-22:
              for s in results]  # Eqs. 8, 11 -> (|k|, G)
        finite = all(torch.isfinite(s.R).all() and torch.isfinite(A).all() for s, A in zip(results, As))
        with costs.phase("train"):  # lines 24-26: Eq. 12, the update; skipped on every rank if any is non-finite
            model.train(), r.optim.zero_grad(set_to_none=True)
            stats = update(r.policy, model, r.optim, results, As, a) if all_true(finite) else {}
        if not books.after(it, record(it, results, As, stats, plan.Lambda, r.rewards, finite, costs.take())):
            break  # the guard's stopping rule
    books.end()
    barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    collectives.run_then_exit(main)  # not Python's shutdown: see run_then_exit

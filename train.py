"""G2RPO training: Algorithm 1 of the paper, with plain torch.distributed FSDP2.

    torchrun --nproc_per_node 8 train.py --model /path/to/FLUX.1-dev --prompts train.txt \
        --reward hps --hps-checkpoint HPS_v2.1_compressed.pt
    torchrun --nproc_per_node 2 train.py            # no --model: the small CPU world (toy/), preset 'toy'
    python train.py --help                          # every option, with the defaults this command would use

The file reads top to bottom: configuration, the one distributed block, data, the sampling plan,
then main(), whose loop carries Algorithm 1's line numbers. The equations live in sde.py (Eqs.
1-3), rollout.py (Sec. 3.2, Eq. 10, re-scoring), advantage.py (Eqs. 8, 11) and loss.py (Eq. 12).
"""
import argparse
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
import torch.distributed as dist
import tyro
from tqdm import tqdm

from advantage import mixed_advantage
from baselines.grpo import ALGOS as BASELINES, PRESETS as BASELINE_PRESETS, TrajectoryGRPO
from data.prompts import PromptSampler, encoding_share, future_prompts, numbered_prompts, prompt_file_errors, \
    read_prompts
from loss import g2rpo_loss
from guard.probes import Guard, probe_items, share
from launch import checkpoints, collectives, peak_memory
from launch.collectives import all_gather_objects, all_true, barrier, mean_over_ranks, stop_if_any
from launch.shared_folder import check_shared
from policy.lora import TARGETS as LORA_TARGETS, add_lora, trainable
from report import trainrun
from report.files import file_errors_in_one_line, folder_errors, why_not_written
from rewards import RewardOptions, load_rewards, prompt_errors, reward_spec_errors, spec_names
from rollout import default_sde_steps, rescore_groups, singular_rollout, stack_images, subset_evaluations
from sde import SCHEDULES, sigma_grid

ALGOS = ("g2rpo", "g2rpo-no-mgai") + BASELINES


# ------------------------------------------------------------------------------------------------
# Configuration: the dataclass defaults are the paper's Table 4 (FLUX.1-dev)
# ------------------------------------------------------------------------------------------------
@dataclass
class Args:
    """G2RPO training (Algorithm 1). Each default below is what THIS command line would run with."""
    model: str = ""  # local diffusers FLUX.1-dev folder; empty: the small CPU world (toy/)
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
    shift: float = 3.0  # scheduler shift of the sigma grid
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
    lora_targets: tuple[str, ...] = LORA_TARGETS  # module names (suffixes) that get adapters
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


def sde_steps(a: Args) -> list:
    """M: the --sde-steps given, or the paper's first half of the grid."""
    return list(a.sde_steps) or default_sde_steps(a.T)


def plan_errors(a: Args) -> list:
    """The flags of the chosen --algo's sampling plan: a baseline's, or G2RPO's (Lambda, M and its variants)."""
    errors = []

    def need(ok, message):
        if not ok:
            errors.append(message)
    if a.algo in BASELINES:
        need(a.Lambda == (1,) and not a.sde_steps, f"--algo {a.algo} scores one image per trajectory and plans its "
             "own SDE steps: drop --Lambda and --sde-steps")
        need(not a.sde_steps_per_iteration and not a.lambda_weights, f"--algo {a.algo}: --sde-steps-per-iteration "
             "and --lambda-weights are G2RPO's options")
        need(a.algo != "dancegrpo" or 0 < a.train_fraction <= 1, f"--train-fraction {a.train_fraction}: in (0, 1]")
        need(a.algo != "mixgrpo" or 1 <= a.window <= a.T, f"--window {a.window}: must be in [1, T = {a.T}]")
        need(a.algo != "mixgrpo" or a.window_shift_every >= 1, "--window-shift-every: must be >= 1")
    else:
        need(a.Lambda and min(a.Lambda) >= 1 and len(set(a.Lambda)) == len(a.Lambda),
             f"--Lambda {' '.join(map(str, a.Lambda))}: give distinct integers >= 1, e.g. --Lambda 1 2 3")
        M = sde_steps(a)
        need(all(0 <= k < a.T for k in M) and len(set(M)) == len(M), f"--sde-steps {' '.join(map(str, a.sde_steps))}"
             f": distinct grid indices in [0, {a.T - 1}] for T={a.T}")
        need(a.algo != "g2rpo-no-mgai" or a.Lambda == (1,), "--algo g2rpo-no-mgai is G2RPO with Lambda = {1}; "
             "drop --Lambda")
        need(0 <= a.sde_steps_per_iteration <= len(M), f"--sde-steps-per-iteration {a.sde_steps_per_iteration}: "
             f"in [0, |M| = {len(M)}] (0: all of M)")
        need(not a.lambda_weights or len(a.lambda_weights) == len(a.Lambda), f"--lambda-weights: one weight per "
             f"granularity of --Lambda {' '.join(map(str, a.Lambda))}")
    return errors


def guard_errors(a: Args) -> list:
    """The reward-hacking guard's flags (--probe-every)."""
    errors = [] if math.isfinite(a.probe_tolerance) and a.probe_tolerance >= 0 else \
        [f"--probe-tolerance {a.probe_tolerance}: must be >= 0"]
    if a.model and not a.probe_prompts:
        errors.append("--probe-every with --model needs --probe-prompts FILE (held-out prompts)")
    errors += prompt_file_checks(a.probe_prompts, "--probe-prompts", a.reward, a.probe_rewards) if a.probe_prompts else []
    if a.probe_rewards:
        spec = [f"--probe-rewards {e}" for e in reward_spec_errors(a.probe_rewards, asdict(a.rewards))]
        if not spec and not reward_spec_errors(a.reward, asdict(a.rewards)):
            both = set(spec_names(a.probe_rewards)) & set(spec_names(a.reward))
            spec += [f"--probe-rewards {'+'.join(sorted(both))}: trained on already (the trained reward is always "
                     "probed); name rewards NOT trained on"] * bool(both)
        errors += spec
    return errors


def prompt_file_checks(path: str, flag: str, *specs: str) -> list:
    """The prompt file given with `flag` (data/prompts.py says what is read), then its prompts against what the
    rewards of `specs` can score (rewards.prompt_errors: the small world's grammar for toy-adherence)."""
    if errors := prompt_file_errors(path, flag):
        return errors
    lines, prompts = zip(*numbered_prompts(path))
    return [e for spec in specs if spec for e in prompt_errors(spec, list(prompts), f"{flag} {path}", list(lines))]


def check_args(a: Args):
    """Stop with one clear line per problem before any work (the flags of the chosen --algo only)."""
    errors = []

    def need(ok, message):
        if not ok:
            errors.append(message)
    need(a.G >= 2, f"--G {a.G}: the group needs at least 2 members to normalise advantages")
    need(a.T >= 2, f"--T {a.T}: need at least 2 sampling steps")
    need(a.eta > 0, f"--eta {a.eta}: must be > 0 (a step without noise has no log-probability to train)")
    need(a.shift > 0, f"--shift {a.shift}: must be > 0")
    for flag, val in (("lr", a.lr), ("clip-range", a.clip_range), ("adv-clip", a.adv_clip),
                      ("max-grad-norm", a.max_grad_norm)):
        need(math.isfinite(val) and val > 0, f"--{flag} {val}: must be a finite number > 0")
    need(a.clip_range < 1, f"--clip-range {a.clip_range}: must be < 1 (the ratio is clipped to [1 - eps, 1 + eps])")
    need(math.isfinite(a.weight_decay) and a.weight_decay >= 0, f"--weight-decay {a.weight_decay}: must be >= 0")
    need(math.isfinite(a.lora_alpha) and a.lora_alpha >= 0, f"--lora-alpha {a.lora_alpha}: must be >= 0 (0: = rank)")
    need(not a.lora_rank or a.lora_targets, "--lora-targets: give at least one module name, e.g. attn.to_q")
    for flag, val, low in (("iterations", a.iterations, 1), ("prompts-per-rank", a.prompts_per_rank, 1),
                           ("checkpoint-every", a.checkpoint_every, 0), ("keep-checkpoints", a.keep_checkpoints, 1),
                           ("max-skipped", a.max_skipped, 1), ("num-samples", a.num_samples, 0),
                           ("height", a.height, 0), ("width", a.width, 0), ("lora-rank", a.lora_rank, 0),
                           ("probe-every", a.probe_every, 0), ("probe-seeds", a.probe_seeds, 1),
                           ("probe-max-prompts", a.probe_max_prompts, 0),
                           ("probe-patience", a.probe_patience, 0)):
        need(val >= low, f"--{flag} {val}: must be >= {low}")
    errors += plan_errors(a)
    need(math.isfinite(a.collective_timeout) and a.collective_timeout >= 1, f"--collective-timeout "
         f"{a.collective_timeout}: minutes, >= 1 (it must outlast rank 0's longest lone step: the export)")
    need(a.device in ("", "cpu", "cuda"), f"--device {a.device}: cuda or cpu (empty: cuda if available; torchrun "
         "gives each rank its own GPU)")
    need(a.rescore_batch >= 0, f"--rescore-batch {a.rescore_batch}: must be >= 0 (0: all trained steps in one pass)")
    need(not a.step_per_k or a.rescore_batch == 1, "--step-per-k steps the optimizer after every k: it needs "
         "--rescore-batch 1")
    need(not a.model or (Path(a.model) / "model_index.json").is_file(), f"--model {a.model}: not a diffusers model "
         "folder (no model_index.json): give the folder FluxPipeline.save_pretrained writes, e.g. FLUX.1-dev")
    need(not a.model or a.prompts, "--prompts FILE is required with --model (one prompt per line)")
    errors += prompt_file_checks(a.prompts, "--prompts", a.reward) if a.prompts else []
    errors += [f"--reward {e}" for e in reward_spec_errors(a.reward, asdict(a.rewards))]
    errors += guard_errors(a) if a.probe_every else []
    if errors:
        raise SystemExit("train.py: invalid arguments:\n  " + "\n  ".join(errors))


# ------------------------------------------------------------------------------------------------
# Distributed plumbing: process group, FSDP2 sharding, gathering for the rollout, collectives,
# checkpoints and export. Everything rank-aware lives in this block.
# ------------------------------------------------------------------------------------------------
def shard_model(transformer, device, mixed_precision: str, activation_checkpointing: bool, replicas: int = 1,
                plain_alone: bool = True):
    """FSDP2: one unit per transformer block plus the root; fp32 master weights, bf16 compute. replicas > 1:
    HSDP on a 2-D mesh (replicas, world / replicas): parameters are sharded, all-gathered and gradients
    reduce-scattered within a group of consecutive ranks (one node: NVLink), and only the gradient shards
    are all-reduced across the groups (the network).
    World size 1 has nothing to shard, and FSDP2 would still keep an unsharded copy of the parameters beside them
    (22.3 GiB for FLUX.1-dev in bf16): the plain module is returned where no copy is needed, in fp32 and with a
    frozen base (LoRA: the base is held in the compute dtype; the fp32 adapters compute in fp32, peft casts their
    input, where FSDP2 would run them in bf16: the same within bf16 rounding, tests/test_one_process.py). Full
    fine-tuning under bf16 keeps FSDP2 at world size 1: its unsharded bf16 parameters are the compute copy of the
    fp32 master weights that bf16 compute needs anyway. plain_alone=False: FSDP2 at world size 1 all the same
    (the tests compare the two)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    world = dist.get_world_size()
    if activation_checkpointing:
        transformer.enable_gradient_checkpointing()
    frozen_base = any(not p.requires_grad for p in transformer.parameters())  # LoRA
    if plain_alone and world == 1 and (mixed_precision == "fp32" or frozen_base):
        return transformer
    mesh = init_device_mesh(device.type, (world,)) if replicas == 1 else \
        init_device_mesh(device.type, (replicas, world // replicas), mesh_dim_names=("replicate", "shard"))
    # bf16: the root casts the model's inputs (as FluxPipeline passes them in the model dtype; the transformer
    # casts t and the guidance to it itself), the blocks cast nothing: the rotary tables the root computes from
    # the position ids stay fp32 inside every block, as in FluxPipeline and an unsharded bf16 model (FSDP2's
    # default would cast each block's inputs, the tables included, to bf16). Position ids are integers < 256:
    # exact in bf16 up to 4096 px.
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if mixed_precision == "bf16" else MixedPrecisionPolicy()
    block_mp = replace(mp, cast_forward_inputs=False)
    for block in list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks):
        fully_shard(block, mesh=mesh, mp_policy=block_mp)
    return fully_shard(transformer, mesh=mesh, mp_policy=mp)


def load_model(a: Args, weights, device, dtype):
    """The transformer as this rank trains it, never whole in its memory: built on the meta device, the LoRA
    adapters added (seeded), sharded (shard_model), and only then this rank's shard read from `weights` (the model
    folder's files, policy.flux.WeightFiles) by policy.flux.load_transformer. Peak: the shard plus one block's
    part, not the whole fp32 model."""
    from policy.flux import load_transformer

    def prepare(transformer):  # on the meta device, before any weight is read
        if a.lora_rank:  # adapters in fp32, the base frozen (policy/lora.py)
            add_lora(transformer, a.lora_rank, a.lora_alpha, a.lora_targets, seed=a.seed)
        return shard_model(transformer, device, a.mixed_precision, a.activation_checkpointing, a.replicas)
    return load_transformer(weights, device, dtype, prepare)


class Gathered:
    """Keep the sharded parameters gathered for a whole rollout: ONE all-gather per iteration,
    not one per forward (reshard_after_forward is switched off inside, then everything reshards). A plain
    module (world size 1, shard_model) has nothing to gather."""

    def __init__(self, model):
        self.units = [m for m in model.modules() if hasattr(m, "reshard")]

    def __enter__(self):
        for u in self.units:
            u.set_reshard_after_forward(False, recurse=False)

    def __exit__(self, *exc):
        for u in self.units:
            u.reshard()
            u.set_reshard_after_forward(True, recurse=False)


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


def clip_and_step(model, optim, a, device):
    """Clip, check the gradient is finite on every rank, step; a non-finite one never lands."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), a.max_grad_norm)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    ok = all_true(bool(torch.isfinite(norm)))
    if ok:
        optim.step()
    else:
        print(f"rank {dist.get_rank()}: non-finite gradient norm {norm.item()}, update skipped", file=sys.stderr)
    optim.zero_grad(set_to_none=True)
    return norm.item(), ok


def export_model(path: Path, model, model_dir: Path, rank: int, lora: bool):
    """The trained transformer as a model folder (policy.flux.save_model_folder), or under LoRA the adapter
    in diffusers' LoRA format (policy.lora.save_lora), at `path`."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from policy.flux import save_model_folder
    from policy.lora import save_lora
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                              ignore_frozen_params=lora))
    error = None
    if rank == 0:
        try:
            save_lora(path, sd, model, model_dir) if lora else save_model_folder(path, sd, model.config, model_dir)
        except Exception as e:  # noqa: BLE001 - one line, and every rank stops with it
            shutil.rmtree(path.with_name(path.name + ".tmp"), ignore_errors=True)
            error = f"export to {path} failed: {why_not_written(e, path)}"
    stop_if_any(error, "train.py")


# ------------------------------------------------------------------------------------------------
# Data: the prompts (data/prompts.py), the world, the sample grid
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


def write_samples(policy, prompts, marked, a, path, is_main) -> bool:
    """Deterministic ODE samples of fixed prompts and seeds 0, 1 (every rank runs the FSDP forwards).
    Returns whether every image is finite (on every rank): a diverged model samples NaN."""
    from policy.flux import sample
    from report.figures import save_grid
    policy.transformer.eval()
    imgs = sample(policy, [p for p in prompts for _ in range(2)], [0, 1] * len(prompts), a.T, a.shift)
    if is_main:
        save_grid(imgs, prompts, 2, path, max(1, 96 // policy.height), marked)
    policy.transformer.train()
    return all_true(bool(torch.isfinite(imgs).all()))


# ------------------------------------------------------------------------------------------------
# The algorithm: G2RPO's sampling plan (the baselines' is baselines.grpo.TrajectoryGRPO), one
# prompt's lines 7-20, and lines 24-26
# ------------------------------------------------------------------------------------------------
class G2RPO:
    """Singular Stochastic Sampling at every k in M, every granularity in Lambda; each k is trained."""

    def __init__(self, a: Args, sigmas):
        self.a, self.sigmas, self.M, self.Lambda = a, sigmas, sde_steps(a), a.Lambda
        self.S = a.sde_steps_per_iteration or len(self.M)  # steps of M rolled out and trained per prompt
        self.calls, self.evals = subset_evaluations(a.T, self.M, a.G, a.Lambda, self.S, a.fine_first)
        self.images_per_prompt = self.S * a.G * len(a.Lambda)
        self.train_passes = f"{self.S} forward/backward of batch 1 (shared x_k)"

    def rollout(self, v, x_T, it, generator):
        a, M = self.a, self.M
        if self.S < len(M):  # --sde-steps-per-iteration: a uniform random subset of M (the prompt's generator)
            M = sorted(M[i] for i in torch.randperm(len(M), generator=generator, device=generator.device)[:self.S])
        return singular_rollout(v, x_T, self.sigmas, M, a.G, a.Lambda, a.eta, a.schedule, a.fine_first,
                                generator=generator)

    def images(self, ro):
        return stack_images(ro)  # (|Lambda|, |M|, G, ...)


@dataclass
class Sampled:
    """One prompt after lines 7-20: its rollout and the rewards of every image."""
    prompt: str
    cond: object  # policy.flux.Cond
    rollout: object  # rollout.Rollout; its groups are the trained steps
    R: torch.Tensor  # (n_rewards, |Lambda|, |trained steps|, G)
    anchor_reward: torch.Tensor  # (n_rewards,) of the deterministic (ODE) sample
    sec_reward: float


def sample_prompt(plan, policy, model, rewards, prompt, x_T, it, gen) -> Sampled:
    """Lines 7-20 for one prompt: rollout (no gradients), decode, rewards of every image."""
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


def rows_velocity(policy, model, conds: list):
    """v(x, t) for rows of several prompts: [(cond, rows)] in order. One prompt: its cond expanded to the rows
    (the rollout's own call); several: their embeddings repeated row by row into one batched cond."""
    from policy.flux import Cond
    if all(c is conds[0][0] for c, _ in conds):
        return policy.velocity(conds[0][0], model)
    return policy.velocity(Cond(torch.cat([c.prompt_embeds.expand(n, -1, -1) for c, n in conds]),
                                torch.cat([c.pooled.expand(n, -1) for c, n in conds])), model)


def update(policy, model, optim, results, As, a, device) -> dict:
    """Lines 24-26: for each prompt and each trained k, re-score the G next states under the current
    policy (rollout.rescore_groups: one forward at the shared x_k; --rescore-batch groups per forward,
    0 = all of them in one pass), Eq. 12, backward; then one optimizer step (or one per k with
    --step-per-k). Returns the loss, its diagnostics and the step count."""
    stats = {"loss": 0.0, "clip_frac": 0.0, "ratio_drift_mean": 0.0, "ratio_drift_max": 0.0,
             "grad_norm": float("nan"), "optimizer_steps": 0}
    work = [(s, group, A[j]) for s, A in zip(results, As) for j, group in enumerate(s.rollout.groups)]
    n = len(work)  # the loss is a mean over every (prompt, k, i)
    size = a.rescore_batch or n
    for c in range(0, n, size):
        chunk = work[c:c + size]
        v = rows_velocity(policy, model, [(s.cond, group.x_k.shape[0]) for s, group, _ in chunk])
        logps = rescore_groups(v, [group for _, group, _ in chunk], chunk[0][0].rollout.sigmas, a.eta, a.schedule)
        total = 0.0
        for (s, group, A), logp in zip(chunk, logps):  # logp: (G,) with gradients
            loss, diag = g2rpo_loss(logp, group.log_prob, A.to(logp.device), a.clip_range)
            total = total + loss / n
            stats["loss"] += loss.item() / n
            stats["clip_frac"] += diag["clip_frac"] / n
            stats["ratio_drift_mean"] += diag["ratio_drift_mean"] / n
            stats["ratio_drift_max"] = max(stats["ratio_drift_max"], diag["ratio_drift_max"])
        total.backward()
        if a.step_per_k:
            stats["grad_norm"], ok = clip_and_step(model, optim, a, device)
            stats["optimizer_steps"] += ok
    if not a.step_per_k:
        stats["grad_norm"], ok = clip_and_step(model, optim, a, device)
        stats["optimizer_steps"] += ok
    return stats


def log_record(it, results, As, stats, plan, rewards, finite, costs) -> dict:
    """One line of metrics.jsonl: rewards averaged over prompts and ranks, the update's diagnostics,
    and `costs` (gathered bytes, the seconds of the rollout with rewards and of the update)."""
    mean = mean_over_ranks({
        "R": torch.stack([s.R.mean((2, 3)) for s in results]).mean(0),  # (n_r, L); |k| may differ per prompt
        "anchor": torch.stack([s.anchor_reward for s in results]).mean(0),  # (n_r,)
        "loss": torch.tensor([stats.get("loss", 0.0)])})
    names = [r.name for r in rewards]
    A = torch.cat([A.flatten() for A in As])
    sec_reward = sum(s.sec_reward for s in results)
    return {"iteration": it + 1,
            "anchor_reward": {n: v.item() for n, v in zip(names, mean["anchor"])},
            "reward_per_lambda": {f"{n}@{lam}": mean["R"][i, j].item()
                                  for i, n in enumerate(names) for j, lam in enumerate(plan.Lambda)},
            "loss": mean["loss"].item(), "grad_norm": stats.get("grad_norm", float("nan")),
            "optimizer_steps": stats.get("optimizer_steps", 0), "skipped": not finite,
            **{k: stats[k] for k in ("clip_frac", "ratio_drift_mean", "ratio_drift_max") if k in stats},
            "adv_abs_mean": A.abs().mean().item(), "adv_std": A.std().item(),
            "reward_std_in_group": torch.stack([s.R.std(-1).mean() for s in results]).mean().item(),
            "model_evaluations": sum(s.rollout.evals for s in results),  # counted at the model calls
            "batched_calls": sum(s.rollout.calls for s in results),
            "gathered_bytes_rollout": costs["gathered_rollout"], "gathered_bytes_train": costs["gathered_train"],
            "sec_reward": sec_reward, "sec_rollout": costs["sec_rollout"] - sec_reward, "sec_train": costs["sec_train"],
            "peak_mem_gb": costs["peak_mem_gb"]}


def start_log(a, plan, model, world, device, out, start, settings):
    """Rank 0: the derived numbers of this run (the mesh as FSDP2 built it, or none: shard_model); args.json (or
    resumes.jsonl) and metrics.jsonl (trainrun)."""
    P, n_trained = world * a.prompts_per_rank, sum(p.numel() for p in trainable(model))
    param = next(model.parameters())
    shape = tuple(param.device_mesh.shape) if hasattr(param, "device_mesh") else ()
    mesh = "one process, no FSDP" if not shape else f"FSDP over {shape[0]}" if len(shape) == 1 else \
        f"HSDP {shape[0]} x {shape[1]} (replicas x shards)"
    print(f"{a.algo} | preset {a.preset} | world size {world} | prompts/iteration {P} | images scored/iteration "
          f"{P * plan.images_per_prompt} | model evaluations per prompt {plan.evals:g} in {plan.calls:g} batched "
          f"calls + {plan.train_passes} | Lambda={plan.Lambda} G={a.G} T={a.T} | trained parameters {n_trained:,}"
          f"{f' (LoRA rank {a.lora_rank})' if a.lora_rank else ''} | {mesh} | device {device}", flush=True)
    trainrun.start(out, settings, a.resume, start)


def write_log(rec, out, bar):
    """Rank 0: the record into metrics.jsonl and the reward curve (trainrun.append), and onto the progress bar."""
    trainrun.append(out, rec)
    bar.set_postfix({**{k: f"{v:.4f}" for k, v in rec["anchor_reward"].items()},
                     "loss": f"{rec['loss']:+.2e}", "drift": f"{rec.get('ratio_drift_mean', 0):.1e}"})
    if rec["skipped"]:
        bar.write(f"iteration {rec['iteration']}: non-finite reward or advantage, update skipped")


# ------------------------------------------------------------------------------------------------
# The reward-hacking guard (guard/probes.py): deterministic probes on held-out prompts, scored with the
# trained reward and rewards not trained on; the best model kept, a fall reported (or the run stopped)
# ------------------------------------------------------------------------------------------------
@dataclass
class Probes:
    prompts: list  # the held-out probe prompts, each with seeds 0 .. probe_seeds - 1
    items: list  # this rank's share: (index or None for padding, (prompt, seed))
    rewards: list  # the trained rewards, then the others
    guard: Guard


def set_up_probes(a: Args, prompts: list, rewards: list, rank: int, world: int, out: Path, start: int, device):
    """The guard's probe set (the first --probe-max-prompts) and rewards; after a --resume, the guard replays the
    probes up to `start`."""
    prompts = prompts[:a.probe_max_prompts or None]
    items = probe_items(prompts, a.probe_seeds)
    others = load_rewards(a.probe_rewards, device=device, **asdict(a.rewards)) if a.probe_rewards else []
    guard = Guard([r.name for r in rewards], [r.name for r in others], a.probe_tolerance, a.probe_patience,
                  a.probe_stop, a.probe_against)
    for rec in trainrun.probes(out, upto=start):
        guard.update(rec["iteration"], rec["rewards"])
    return Probes(prompts, share(items, rank, world), rewards + others, guard)


def probe_cost(a: Args, plan, n_prompts: int, world: int) -> str:
    """The start-up line of the guard: what one probe costs, against the iterations between probes."""
    images = n_prompts * a.probe_seeds
    evals = math.ceil(images / world) * a.T  # per rank: its share of the ODE samples, T steps each
    between = a.probe_every * a.prompts_per_rank * plan.evals  # per rank: the rollouts between two probes
    return (f"guard: a probe every {a.probe_every} iterations = {n_prompts} prompts x {a.probe_seeds} seeds = {images} "
            f"ODE samples of {a.T} steps, {evals:,} model evaluations per rank, {100 * evals / between:.1f} % of the "
            f"{between:,.0f} of the rollouts between two probes (--probe-max-prompts, --probe-seeds, --probe-every)")


def probe(r, a: Args, done: int, world: int, out: Path, is_main: bool):
    """Probe the policy after `done` iterations: every rank ODE-samples and scores its share, the scores are
    gathered so that every rank reaches the same verdict. Rank 0 logs probes.jsonl and the probe grid; a new
    best (after training began) is exported to out/best. Returns ({reward: mean}, the guard's verdict)."""
    from policy.flux import sample
    from report.figures import save_grid
    t0, p = time.time(), r.probe
    prompts, seeds = [item[0] for _, item in p.items], [item[1] for _, item in p.items]
    r.model.eval()
    imgs = sample(r.policy, prompts, seeds, a.T, a.shift)  # (n, 3, H, W)
    r.model.train()
    with torch.no_grad():
        scores = torch.stack([rw.score(imgs, prompts) for rw in p.rewards]).float().cpu()  # (n_rewards, n)
    keep = [j for j, (i, _) in enumerate(p.items) if i is not None]
    pixels = (imgs[keep].nan_to_num(0).clamp(0, 1) * 255).round().byte()
    parts = all_gather_objects(([p.items[j][0] for j in keep], scores[:, keep], pixels))
    index = torch.tensor([i for part in parts for i in part[0]]).argsort()
    scores, imgs = torch.cat([part[1] for part in parts], 1)[:, index], torch.cat([part[2] for part in parts])[index]
    means = {rw.name: scores[i].mean().item() for i, rw in enumerate(p.rewards)}
    verdict = p.guard.update(done, means)
    if is_main and verdict.stop:
        print(f"train.py: the guard stops the run after iteration {done}: {verdict.stop}", file=sys.stderr)
    elif is_main and verdict.fallen:
        print(f"train.py: probe at iteration {done}: rewards not trained on fell below their {a.probe_against} - "
              f"{a.probe_tolerance}: {verdict.fallen} (the best model so far stays in {out / 'best'})", file=sys.stderr)
    if is_main:
        save_grid(imgs.float() / 255, p.prompts, a.probe_seeds, out / "probes" / f"probe_{done:06d}.png",
                  max(1, 96 // r.policy.height))
        trainrun.append_probe(out, {"iteration": done, "rewards": means, **asdict(verdict), "sec": time.time() - t0})
    if verdict.best and done > 0 and a.keep_best:
        export_model(out / "best", r.model, r.model_dir, dist.get_rank(), bool(a.lora_rank))
    return means, verdict


# ------------------------------------------------------------------------------------------------
# main: set-up, then Algorithm 1
# ------------------------------------------------------------------------------------------------
@dataclass
class Run:
    """What the set-up hands the loop."""
    policy: object  # policy.flux.FluxPolicy
    model: torch.nn.Module  # the FSDP2-sharded transformer (plain at world size 1 where it can be: shard_model)
    optim: torch.optim.Optimizer
    rewards: list
    sampler: PromptSampler
    plan: object  # G2RPO or baselines.grpo.TrajectoryGRPO
    start: int  # first iteration (> 0 when resumed)
    model_dir: Path
    grid: tuple  # (sample-grid prompts, prompts marked in it)
    settings: dict = None  # args.json: the arguments, the world size, the digests of the model and prompt files
    probe: Probes = None  # the reward-hacking guard's probes (--probe-every)


def set_up(a: Args, rank: int, world: int, device) -> Run:
    """Lines 1-2 of Algorithm 1: the policy, the reward models, the optimizer; a resumed state; the
    prompts this rank will use, encoded once into the disk cache (the text encoders are then freed)."""
    from policy.flux import FluxPolicy, WeightFiles
    out = Path(a.out)
    torch.manual_seed(a.seed + rank), random.seed(a.seed + rank), np.random.seed(a.seed + rank)
    model_dir, prompts, grid_prompts, marked = load_world(a, rank)
    dims = {k: v for k, v in (("height", a.height), ("width", a.width)) if v}
    bf16 = a.mixed_precision == "bf16"
    base_dtype = torch.bfloat16 if a.lora_rank and bf16 else torch.float32  # a frozen base needs no fp32 master
    model = load_model(a, WeightFiles(model_dir / "transformer"), device, base_dtype).train()
    policy = FluxPolicy.from_pretrained(model_dir, device=device, dtype=base_dtype, cache_dir=out / "prompt_cache",
                                        embed_dtype=torch.bfloat16 if bf16 else None, transformer=model, **dims)
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
    sigmas = sigma_grid(a.T, a.shift).to(device)
    plan = G2RPO(a, sigmas) if a.algo.startswith("g2rpo") else TrajectoryGRPO(a, sigmas)  # chosen once
    return Run(policy, model, optim, rewards, sampler, plan, start, model_dir, (grid_prompts, marked),
               run_settings(a, world), probes)


def checkpoint(r: Run, a: Args, done: int, rank: int, out: Path, is_main: bool) -> bool:
    """A sharded checkpoint after `done` iterations (the oldest beyond --keep-checkpoints pruned) and its sample
    grid; returns whether the grid is finite."""
    checkpoints.save(out, done, r.model, r.optim, r.sampler.position, rank, r.settings)
    if is_main:
        trainrun.prune(out, a.keep_checkpoints)
    return write_samples(r.policy, *r.grid, a, out / f"samples_{done:06d}.png", is_main)


def run_settings(a: Args, world: int) -> dict:
    """What args.json records and a --resume must match (report/trainrun.DEFINING): the arguments, the world size,
    and digests of what --model and the prompt files hold (the same path with other content is another run)."""
    from policy.flux import fingerprint_files

    def digest(path):
        return hashlib.sha256("\n".join(read_prompts(path)).encode()).hexdigest()[:16] if path else ""
    return {**asdict(a), "world_size": world, "prompts_digest": digest(a.prompts),
            "probe_prompts_digest": digest(a.probe_prompts),
            "model_digest": fingerprint_files([Path(a.model) / "transformer"])[:16] if a.model else ""}


def check_all(a: Args, is_main: bool):
    """Every problem with the arguments, the model folder or the run folder, before any work (nothing is written);
    printed once, by rank 0."""
    try:
        check_args(a)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        errors = [] if a.replicas >= 1 and world % a.replicas == 0 else [
            f"--replicas {a.replicas}: must divide the world size {world} (e.g. 2 for 2 nodes x 8 GPUs: shard within "
            "a node, replicate across nodes)"]
        errors += model_errors(a) + folder_errors(a.out, "--out")
        if a.model and Path(a.model).resolve() in (Path(a.out).resolve(), *Path(a.out).resolve().parents):
            errors.append(f"--out {a.out} is inside --model {a.model}: the run would write into the model folder; give "
                          "another --out")
        if not errors:
            errors += trainrun.ownership_errors(Path(a.out), run_settings(a, world), a.resume, a.overwrite)
        if errors:
            raise SystemExit("train.py: " + "\n  ".join(errors))
    except SystemExit as e:
        if not is_main:  # every rank found the same: rank 0 says it, and must not be ended by torchrun first
            time.sleep(2)
        raise SystemExit(e.code if is_main else 1) from None


def model_errors(a: Args) -> list:
    """The flags that reach diffusers and peft, against the model's own config files (read, not loaded): the image
    size against the latent grid's multiple, the LoRA targets against the transformer's module names."""
    from policy.flux import folder_problem, size_multiple, transformer_config
    from policy.lora import target_errors
    if a.model and (why := folder_problem(a.model)):
        return [f"--model {a.model}: {why}"]
    multiple = size_multiple(a.model) if a.model else 2  # the small world: pixel space, 2x2 patches
    errors = [f"--{flag} {v}: must be a multiple of {multiple} for this model (2x2 patches of its latent cells), e.g. "
              f"{max(multiple, v // multiple * multiple)}" for flag, v in (("height", a.height), ("width", a.width))
              if v % multiple]
    if a.lora_rank:
        if a.model:
            config = transformer_config(a.model)
        else:
            import toy
            config = dict(toy.build(toy.ToyConfig(), seed=0).transformer.config)
        errors += target_errors(config, a.lora_targets)
    return errors


DIVERGED = ("{} iterations in a row without an update (non-finite rewards, advantages or gradients): the run has "
            "diverged and nothing is exported; lower --lr, or --resume from an earlier checkpoint")


def will_it_fit(a: Args, world: int, device, is_main: bool):
    """On a GPU, before any weight is read: the estimated per-GPU peak of this run (launch/preflight.py, the
    accounting bench/scale.py simulates) against this GPU's memory; every rank stops with rank 0 saying, in one line,
    what would fit. On the CPU there is no fixed budget to check."""
    if device.type != "cuda" or not a.model:
        return
    from launch.preflight import check_fits_args, estimate, settings_from_args
    model = Path(a.model)
    cfg = json.loads((model / "transformer" / "config.json").read_text())
    vae = json.loads((model / "vae" / "config.json").read_text()) if (model / "vae" / "config.json").is_file() else None
    memory = torch.cuda.get_device_properties(device).total_memory
    why = check_fits_args(a, world, cfg, memory, vae)
    whys = [w for w in all_gather_objects(why) if w]
    if whys:
        stop(f"will not fit: {whys[0]} (--no-preflight runs it anyway)", is_main)
    if is_main:
        print(f"pre-flight: {estimate(cfg, **settings_from_args(a, world, cfg, vae)).line()}; this GPU has "
              f"{memory / 2**30:.1f} GiB", flush=True)


def stop(message: str, is_main: bool):
    """End every rank with exit status 1; rank 0 says why."""
    dist.destroy_process_group()
    raise SystemExit(f"train.py: {message}" if is_main else 1)


def quiet():
    """Silence what is known to be harmless, so that the progress bar and real warnings stay visible."""
    import warnings
    import diffusers
    import transformers
    diffusers.utils.logging.disable_progress_bar()  # weight-loading bars
    transformers.utils.logging.disable_progress_bar()
    # FSDP2 warns that the transformer returns a view; an in-place op on it would skip a hook, but
    # FluxPolicy.velocity only ever copies it (.float()) before anything else touches it
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")


def start(a: Args, is_main: bool):
    """Before any work: the arguments, the process group, whether the run fits the GPU, one --out for every rank
    (two nodes: a shared one), and rank 0's lock on it. Returns (rank, world, device, the lock or None)."""
    check_all(a, is_main)
    quiet()
    rank, world, device = collectives.init(a.device, a.collective_timeout)
    if a.preflight:
        will_it_fit(a, world, device, is_main)  # before any weight is read
    check_shared(Path(a.out), rank)
    lock, error = None, None
    if is_main:  # rank 0 alone takes the lock; every rank stops with its answer
        try:
            lock = trainrun.take_lock(Path(a.out), overwrite=a.overwrite)
            for line in trainrun.tidy(Path(a.out)):  # what an interrupted run left that is not whole
                print(f"train.py: {line}", file=sys.stderr, flush=True)
        except SystemExit as e:
            error = str(e.code).removeprefix("train.py: ")
        except OSError as e:
            error = f"--out: {why_not_written(e, a.out)}"
    stop_if_any(error, "train.py")
    return rank, world, device, lock


def main(argv=None):
    a = parse_args(argv)
    with collectives.peers_stop_quietly("train.py"), file_errors_in_one_line("train.py", a.out):
        run(a)


def run(a: Args):
    is_main, out = os.environ.get("RANK", "0") == "0", Path(a.out)
    rank, world, device, lock = start(a, is_main)  # noqa: F841 - the lock is held until exit
    r = set_up(a, rank, world, device)
    model, optim, plan, meter = r.model, r.optim, r.plan, GatherMeter()
    if is_main:
        if a.resume and r.start == 0:
            print(f"train.py: --resume: no whole checkpoint in {out}: starting at iteration 0", file=sys.stderr)
        start_log(a, plan, model, world, device, out, r.start, r.settings)
        print(probe_cost(a, plan, len(r.probe.prompts), world)) if r.probe else None
    if r.start == 0:
        write_samples(r.policy, *r.grid, a, out / "samples_000000.png", is_main)
        probe(r, a, 0, world, out, is_main) if r.probe else None  # the guard's start: the base model
    # the last sample grid: finite, at which iteration; iterations done; iterations in a row without an update
    ok, sampled_at, done, idle = True, None, r.start, 0
    bar = tqdm(range(r.start, a.iterations), initial=r.start, total=a.iterations, disable=not is_main, dynamic_ncols=True)

    for it in bar:  # line 3: for each training iteration
        t0 = time.time()
        peak_memory.reset(device)  # peak_mem_gb: this iteration's
        batch = r.sampler.next()  # line 5: this rank's prompts
        # line 4 (pi_old <- pi_theta): the rollout runs the current weights, its log-probs are the "old" ones
        model.eval(), meter.take()
        with Gathered(model):  # lines 6-20: no gradients, parameters gathered once
            results = []
            for g_idx, prompt in batch:
                gen = torch.Generator(device).manual_seed(a.seed * 1_000_003 + g_idx)  # x_T and SDE noise
                x_T = r.policy.noise(1, generator=gen)  # line 7: one shared initial noise
                results.append(sample_prompt(plan, r.policy, model, r.rewards, prompt, x_T, it, gen))
        gathered_rollout, t_roll = meter.take(), time.time() - t0
        As = [mixed_advantage(s.R, adv_clip=a.adv_clip, lambda_weights=a.lambda_weights or None)  # lines 21-22:
              for s in results]  # Eqs. 8, 11 -> (|k|, G)
        finite = all(torch.isfinite(s.R).all() and torch.isfinite(A).all() for s, A in zip(results, As))
        t1 = time.time()  # lines 24-26: Eq. 12 and the update, skipped on every rank if any rank is non-finite
        model.train(), optim.zero_grad(set_to_none=True)
        stats = update(r.policy, model, optim, results, As, a, device) if all_true(finite) else {}
        costs = dict(gathered_rollout=gathered_rollout, gathered_train=meter.take(), sec_rollout=t_roll,
                     sec_train=time.time() - t1, peak_mem_gb=peak_memory.gib(device))
        rec = log_record(it, results, As, stats, plan, r.rewards, finite, costs)
        if r.probe and ((it + 1) % a.probe_every == 0 or it + 1 == a.iterations):  # the reward-hacking guard
            rec["probe"], verdict = probe(r, a, it + 1, world, out, is_main)
        if is_main:
            write_log(rec, out, bar)
        idle = 0 if rec["optimizer_steps"] else idle + 1  # the same on every rank (all_true above)
        if idle >= a.max_skipped:
            stop(DIVERGED.format(idle), is_main)
        if a.checkpoint_every and (it + 1) % a.checkpoint_every == 0:
            ok, sampled_at = checkpoint(r, a, it + 1, rank, out, is_main), it + 1
        done = it + 1
        if "probe" in rec and verdict.stop:  # the guard's stopping rule (probe() said why)
            break
    if sampled_at != done:  # the final model's samples: a diverged model samples non-finite images
        ok = write_samples(r.policy, *r.grid, a, out / f"samples_{done:06d}.png", is_main)
    if not ok:
        stop("the trained model samples non-finite images: the run has diverged and is not exported", is_main)
    if a.export:
        export_model(out / "final", model, r.model_dir, rank, bool(a.lora_rank))
    barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

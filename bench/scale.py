"""Will the paper's setting fit, and how long will it take? One G2RPO iteration of FLUX.1-dev, simulated.

    make bench-scale                                   # world sizes 8 and 16 in parallel, ~3.5 min of CPU each
    python bench/scale.py --worlds 8 16 --out runs/bench-scale/results.md
    python bench/scale.py --family qwen-image          # or sd3.5-medium, sd3.5-large (make bench-scale-families):
                                                       # 8 GPUs full and 1 GPU LoRA, runs/bench-scale/<family>/

Families (--family): flux1-dev (the default, below), and at their released configs and usual training sizes
(bench/released.py) sd3.5-medium (512 px), sd3.5-large (1024 px), qwen-image (1024 px), each with G2RPO's Table-4
settings. Their policies (policy/sd3.py, policy/qwen_image.py) guide with classifier-free guidance: every velocity is
ONE transformer call of 2B rows (Policy.rows_velocity), which the replay below keys by its B samples; the encoding
runs the family's text encoders (SD3.5: CLIP-L, CLIP-G, T5-XXL; Qwen-Image: Qwen2.5-VL-7B, its vision tower loaded
and counted though unused) on the prompt and the negative prompt in one batch. Qwen-Image's padded text mask is
passed as None (a fake tensor's mask.all() answers True): its attention is counted unmasked, same shapes.

What is simulated: one rank of `torchrun --nproc_per_node W train.py --model FLUX.1-dev` (Table 4: T = 16,
G = 12, M = the first 8 steps, Lambda = {1, 2, 3}, 720x720, one prompt per GPU), run through the
project's own code on FAKE tensors (torch FakeTensorMode: shapes, dtypes and devices, no data, no compute)
with a fake process group of W ranks (collectives return at once). Random init from the real configs:
FLUX.1-dev's transformer (19 + 38 blocks, 24 heads x 128, 11.9 B parameters), its VAE, T5-XXL and CLIP-L
for the encoding, open_clip ViT-H-14 for HPS. The code path: `train.load_model` (built on the meta device, each
rank filling its own shard; the weights it reads are fake bf16 tensors, FakeWeights), `train.shard_model` (FSDP2
per block + root, bf16 MixedPrecisionPolicy; at world size 1 under LoRA the plain model), `train.Gathered` +
`train.make_plan` + `train.sample_prompt` (rollout.singular_rollout, decode, reward), `train.update`
(rollout.rescore_groups + loss.g2rpo_loss + backward per k), `train.clip_and_step` (AdamW), and the checkpoint's
state dict (`get_state_dict`, as launch.checkpoints.save). Only public functions, with their own arguments: where
fake tensors cannot answer a check, the simulation hands train.clip_and_step an `agree` that runs the collective and
answers True. How it builds and measures: bench/measure.py.

Measured per phase on rank 0 (all ranks are alike):
  memory  torch.distributed._tools.FSDPMemTracker: peak bytes by kind (sharded parameters, gathered
          parameters and all-gather buffers, gradients, optimizer state, activations, temporaries);
  FLOPs   torch.utils.flop_counter's formulas per op (what FlopCounterMode counts; tests/test_scale.py checks
          the two agree, and that fake equals real tensors on a tiny config);
  time    a roofline per op on an H100 SXM and an H200: max(FLOPs / (MFU x peak of its dtype),
          bytes read + written / (BW_EFF x memory bandwidth)), summed; collectives separately.
Shortcuts (exact for FLOPs, bytes and collectives, say --full to run everything): a model call whose
input shape was already seen is replayed (its recorded counts added, except collectives: the rollout
runs under train.Gathered, so a repeat gathers nothing; its output allocated) instead of run again, so
the rollout runs 4 transformer calls (batch 1, 12, 24, 36) of its 108 and the decode 2 VAE calls (8 and
1 images) of 37; training runs ONE of the |M| per-k passes, with the gradients of an earlier
k already present (the steady state of k >= 2), and multiplies its counts by |M|. AdamW's moments are
allocated before the iteration (they are resident from iteration 2 on).
"""
import argparse
import json
import os
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench import measure  # noqa: E402
from bench.measure import _proc_status, _reset_peak_rss  # noqa: E402, F401 - tests/test_loading.py reads them here
from launch import checkpoints  # noqa: E402
from launch.preflight import CLIP_L, FLUX_DEV, FLUX_VAE, GiB, RESERVE_GIB, T5_XXL  # noqa: E402 - the released configs
from policy.lora import trainable  # noqa: E402


@dataclass
class Setting:
    """What one rank holds and runs. Defaults: the paper's (train.Args = Table 4) on FLUX.1-dev."""
    transformer: dict = field(default_factory=lambda: dict(FLUX_DEV))
    vae: dict = field(default_factory=lambda: dict(FLUX_VAE))
    t5: dict = field(default_factory=lambda: dict(T5_XXL))
    clip_text: dict = field(default_factory=lambda: dict(CLIP_L))
    reward: object = "ViT-H-14"  # open_clip model name (HPS-v2.1), or a built model (tests)
    reward_size: int = 224
    height: int = 720
    width: int = 720
    seq_len: int = 512  # T5 tokens
    T: int = 16
    G: int = 12
    M: tuple = tuple(range(8))
    Lambda: tuple = (1, 2, 3)
    lora_rank: int = 0  # train.py --lora-rank: frozen bf16 base, fp32 adapters (alpha = 2 rank), AdamW on the adapters
    # the other families (--family; their configs: bench/released.py). flux1-dev: the fields above, nothing else
    family: str = "flux1-dev"
    guidance: float = 3.5  # FLUX.1-dev's distilled guidance; the CFG scale of sd3.5-* and qwen-image
    clip_g: dict = None  # SD3.5's text_encoder_2 (CLIP-G); clip_text is then its CLIP-L (with projection)
    vision: dict = None  # Qwen-Image: the Qwen2.5-VL vision tower's config (loaded with the text encoder, unused);
    # t5 is then the Qwen2.5-VL language model's config, seq_len the prompt's tokens (its Cond's length)
    negative_len: int = 0  # Qwen-Image: tokens of the negative prompt " " (its Cond's length)
    template_len: int = 0  # Qwen-Image: the chat template's tokens before the prompt (encoded, then dropped)


FAMILIES = ("flux1-dev", "sd3.5-medium", "sd3.5-large", "qwen-image")


def family_setting(family: str, **kw) -> Setting:
    """The Setting of a family's released configuration at its usual training size (bench/released.py says where
    each number comes from), G2RPO's Table-4 settings (T, G, M, Lambda, one prompt per GPU) kept for every family."""
    from bench import released as r
    if family == "flux1-dev":
        return Setting(**kw)
    if family in ("sd3.5-medium", "sd3.5-large"):
        medium = family == "sd3.5-medium"
        return Setting(family=family, transformer=dict(r.SD35_MEDIUM if medium else r.SD35_LARGE),
                       vae=dict(r.SD35_VAE), t5=dict(T5_XXL), clip_text=dict(r.SD35_CLIP_L), clip_g=dict(r.SD35_CLIP_G),
                       **(r.SD35_MEDIUM_SETTING if medium else r.SD35_LARGE_SETTING), **kw)
    if family == "qwen-image":
        return Setting(family=family, transformer=dict(r.QWEN_IMAGE), vae=dict(r.QWEN_IMAGE_VAE),
                       t5=dict(r.QWEN_VL_TEXT), clip_text=None, vision=dict(r.QWEN_VL_VISION), **r.QWEN_IMAGE_SETTING,
                       **kw)
    raise ValueError(f"unknown family {family!r}: one of {', '.join(FAMILIES)}")


def tiny_setting(size: int = 32, heads: int = 2, head_dim: int = 16) -> Setting:
    """The same classes at toy size (tests/test_scale.py): FLUX 1 + 1 blocks, VAE 2x, 2-layer encoders;
    `size` px images ((size / 4)^2 tokens), `heads` x `head_dim` transformer width."""
    import open_clip
    torch.manual_seed(0)
    reward = open_clip.CLIP(embed_dim=16, vision_cfg=dict(layers=1, width=32, head_width=16, patch_size=8, image_size=32),
                            text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1))
    return Setting(
        transformer=dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=head_dim,
                         num_attention_heads=heads, joint_attention_dim=32, pooled_projection_dim=24, guidance_embeds=True,
                         axes_dims_rope=(head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8)),
        vae=dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                 up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=(8, 16), layers_per_block=1,
                 latent_channels=16, norm_num_groups=4, sample_size=32, scaling_factor=0.3611, shift_factor=0.1159,
                 use_quant_conv=False, use_post_quant_conv=False),
        t5=dict(vocab_size=100, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, relative_attention_num_buckets=8),
        clip_text=dict(vocab_size=100, hidden_size=24, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                       max_position_embeddings=77, projection_dim=24),
        reward=reward, reward_size=32, height=size, width=size, seq_len=16, T=4, G=2, M=(0, 1), Lambda=(1, 2))


def tiny_family_setting(family: str, size: int = 32, heads: int = 2, head_dim: int = 16) -> Setting:
    """tiny_setting's counterpart for the other families (tests/test_scale.py): the same classes as
    family_setting's at toy size (as tests/tiny_sd3.py and tests/tiny_qwen_image.py build them), 2 blocks, VAE 2x
    (SD3) or 4x (Qwen-Image), 2-layer text encoders."""
    s = tiny_setting(size, heads, head_dim)
    if family == "flux1-dev":
        return s
    if family.startswith("sd3.5"):
        clip = dict(vocab_size=100, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                    max_position_embeddings=77)
        return replace(s, family=family, guidance=4.5, transformer=dict(
            sample_size=size // 2, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
            attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=32,
            caption_projection_dim=heads * head_dim, pooled_projection_dim=20, pos_embed_max_size=size // 4,
            dual_attention_layers=(0,), qk_norm="rms_norm"),
            vae={**s.vae, "scaling_factor": 1.5305, "shift_factor": 0.0609},
            clip_text=dict(clip, hidden_size=12, projection_dim=8),
            clip_g=dict(clip, hidden_size=16, projection_dim=12))
    if family == "qwen-image":
        text = dict(vocab_size=100, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=1, rope_theta=1e6, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]})
        return replace(s, family=family, guidance=4.0, seq_len=12, negative_len=6, template_len=5, transformer=dict(
            patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=head_dim,
            num_attention_heads=heads, joint_attention_dim=16, axes_dims_rope=(head_dim // 4, 3 * head_dim // 8,
                                                                                3 * head_dim // 8)),
            vae=dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[False, True]),
            t5=text, clip_text=None, vision=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2,
                                                 out_hidden_size=16))
    raise ValueError(f"unknown family {family!r}: one of {', '.join(FAMILIES)}")


# ------------------------------------------------------------------------------------------------
# The GPUs and what we assume of them (RESERVE_GIB, NCCL buffers and fragmentation: launch/preflight.py's)
# ------------------------------------------------------------------------------------------------
# dense peak FLOP/s by compute dtype (H100 SXM = H200: same GH100 chip). fp32 matmuls run on the CUDA
# cores (PyTorch leaves TF32 off for matmul); fp32 convolutions use TF32 (cuDNN's default is on).
PEAK = {"bf16": 989e12, "tf32": 494e12, "fp32": 67e12}
GPUS = {"H100": dict(bw=3.35e12, mem_gib=78.0), "H200": dict(bw=4.8e12, mem_gib=139.0)}  # usable after CUDA context
MFU = 0.40  # share of peak that large bf16 matmuls and flash attention reach in practice (FSDP trainers report 35-50 %)
BW_EFF = 0.70  # share of HBM bandwidth that elementwise kernels reach
NVLINK = 300e9  # bytes/s per GPU that an intra-node ring all-gather / reduce-scatter reaches (NVLink 4: 450 GB/s/dir)
IB = 40e9  # bytes/s per GPU across nodes (one 400 Gb/s NIC per GPU, ~80 %)
DISK = 2e9  # bytes/s per GPU written by a checkpoint (shared file system)


# ------------------------------------------------------------------------------------------------
# One rank of one iteration
# ------------------------------------------------------------------------------------------------
def simulate(s: Setting, fake: bool = True, full: bool = False, checkpointing=(False, True), flop_counter=None,
             rss=False) -> dict:
    """One rank of one iteration, phase by phase. Needs an initialised process group (fake or real).
    On real tensors (fake=False, tests) `flop_counter` (a FlopCounterMode, entered) and `rss` add
    independent measurements to every phase."""
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode
    import train
    from launch.collectives import all_true
    a = replace(train.Args(), G=s.G, T=s.T, Lambda=tuple(s.Lambda), sde_steps=tuple(s.M))
    meter = measure.Meter(PEAK, GPUS, MFU, BW_EFF)
    # a fake tensor holds no value: train.clip_and_step's check that the gradient norm is finite on every rank runs
    # its collective and is answered True
    agree = (lambda flag: all_true(flag) or True) if fake else all_true
    with FakeTensorMode(allow_non_fake_inputs=True) if fake else nullcontext(), measure.real_meshes(), meter:
        hps, policy, model, load_peak = load(s)
        optim = torch.optim.AdamW(trainable(model), lr=a.lr, weight_decay=a.weight_decay, betas=(0.9, 0.999), eps=1e-8)
        rec = measure.Recorder(track(model, optim, policy, hps), meter, flop_counter, rss)
        r = iteration(s, a, rec, hps, policy, model, optim, partial(train.clip_and_step, agree=agree), full,
                      checkpointing)
    shard = sum(measure.nbytes(p.to_local() if hasattr(p, "to_local") else p) for p in model.parameters())
    return dict(world=dist.get_world_size(), lora_rank=s.lora_rank, sharded=r["sharded"], trained=r["trained"],
                phases=r["phases"], load_peak=load_peak, ckpt_bytes=r["ckpt_bytes"], param_shard_bytes=shard,
                params=sum(p.numel() for p in model.parameters()),
                bf16_bytes=sum(p.numel() * 2 for p in model.parameters()),  # gathered in bf16
                rollout_calls=r["rollout_calls"], rollout_evals=r["rollout_evals"], loss_ok=r["loss_ok"],
                images=len(s.Lambda) * len(s.M) * s.G + 1, calls=r["calls"])


def load(s: Setting, device="cpu"):
    """Lines 1-2 as train.set_up: the HPS reward, then the policy (train.load_model: each rank materialises its shard
    only, then reads its rows block by block), tracked -> (reward, policy, transformer, the load's peak bytes)."""
    from torch.distributed._tools.mem_tracker import MemTracker
    hps = measure.build_reward(s, device)
    load = MemTracker()
    load.track_external(hps.model)
    with load:
        policy, model = measure.build_policy(s, device)
    return hps, policy, model, measure.peak_total(load)


def track(model, optim, policy, hps):
    """The iteration's memory tracker: FSDPMemTracker, or for a plain module (world size 1 under LoRA,
    train.shard_model) measure.plain_tracker."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed.fsdp import FSDPModule
    if isinstance(model, FSDPModule):
        tracker = FSDPMemTracker(model, optim)
        tracker.track_external(policy.vae, hps.model, *([policy.img_ids] if hasattr(policy, "img_ids") else []))
    else:
        tracker = measure.plain_tracker(model)
        tracker.track_external(model, optim)
    return tracker


def iteration(s: Setting, a, rec, hps, policy, model, optim, step, full: bool, checkpointing, device="cpu") -> dict:
    """The encoding, lines 6-20 (sample), lines 24-26 (train_phases; `step`: line 26) and a checkpoint's state dict,
    each a phase of `rec`."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.fsdp import FSDPModule
    caller = measure.Caller(model)
    with rec.tracker:
        # AdamW's moments exist from iteration 2 on. The first step on DTensors also fills DTensor's
        # sharding-propagation cache, which runs each op once on global-shaped tensors: meta tensors on a
        # GPU, but fake CPU tensors here, which the tracker would count (the full fp32 model) in a phase
        for p in trainable(model):
            p.grad = torch.zeros_like(p)
        step(model, optim, a.max_grad_norm)
        if s.family == "flux1-dev":
            with rec.phase("encode", note=f"T5-XXL + CLIP-L in {str(policy.dtype)[6:]} (the policy's dtype), batch 1"):
                cond = measure.encode(s, device, policy.dtype)
        else:  # the prompt and the negative prompt in one batch, as Policy.encode_prompts encodes them
            with rec.phase("encode", note=f"{ENCODERS[s.family]} in {str(policy.dtype)[6:]} (the policy's dtype), "
                           "batch 2 (the prompt and the negative)"):
                cond, negative = measure.encode_family(s, device, policy.dtype)
            # classifier-free guidance: Policy.rows_velocity asks the policy itself for the negative's conditioning
            policy.embed = lambda p: negative if p == policy.NEGATIVE_PROMPT else cond
        sampled, A = sample(rec, policy, caller, hps, cond, a, full, device)
        stats = train_phases(rec, policy, caller, optim, sampled, A, a, step, full, checkpointing)
        policy.__dict__.pop("embed", None)
        with rec.phase("checkpoint", note="get_state_dict(model, optim) as launch.checkpoints.save"):
            msd, osd = get_state_dict(model, optim, options=checkpoints.trained_only())
            ckpt_bytes = sum(measure.nbytes(t.to_local() if hasattr(t, "to_local") else t)
                             for t in measure.tensors((msd, osd)))
    return dict(sharded=isinstance(model, FSDPModule), trained=sum(p.numel() for p in trainable(model)),
                phases=rec.phases, ckpt_bytes=ckpt_bytes, rollout_calls=sampled.rollout.calls,
                rollout_evals=sampled.rollout.evals, loss_ok=stats is not None,
                calls={label: {str(sig): c[0] for sig, c in memo.items()} for label, memo in rec.calls.items()})


CFG = "; classifier-free guidance: 2 transformer rows per sample, one batched call"
ENCODERS = {"sd3.5-medium": "CLIP-L + CLIP-G + T5-XXL", "sd3.5-large": "CLIP-L + CLIP-G + T5-XXL",
            "qwen-image": "Qwen2.5-VL-7B (vision tower loaded, unused)"}


def sample(rec, policy, caller, hps, cond, a, full: bool, device):
    """Lines 6-20 through train.sample_prompt under train.Gathered, for one prompt. It is handed the plan, the policy
    and the reward with their rollout, decode and score as phases of `rec`, the policy's embed answering `cond` (the
    encoding, as its prompt cache would). The transformer's and the VAE's calls are replayed per batch size (`full`:
    all run) -> (train.Sampled, its advantages)."""
    import train
    from advantage import mixed_advantage
    prompt = "a photo of a cat"
    hps.text_features([prompt])
    plan = train.make_plan(a, policy.sigmas(a.T, a.shift).to(device))
    velocity = partial(rec.replayed, key=lambda x, t: x.shape[0], label="transformer", replay=not full)
    rollout = rec.wrap("rollout", lambda v, *r: plan.rollout(velocity(v), *r),
                       note="singular_rollout under train.Gathered (parameters gathered once)"
                       + (CFG if policy.rows_per_sample == 2 else ""))
    decode = rec.wrap("decode", policy.decode, note="VAE fp32, 8 images per call" if policy.rows_per_sample == 1
                      else f"VAE {str(policy.vae.dtype)[6:]}, 8 images per call")
    score = rec.wrap("reward", hps.score, note="HPS (ViT-H-14 fp32, 224 px), all images in one call")
    policy.vae.decode = rec.replayed(policy.vae.decode, key=lambda z, **k: z.shape[0], label="vae", replay=not full)
    caller.model.eval()
    gen = torch.Generator(device).manual_seed(0)
    with train.Gathered(caller.model):
        sampled = train.sample_prompt(measure.Handed(plan, rollout=rollout),
                                      measure.Handed(policy, decode=decode, embed=lambda p: cond), caller,
                                      [measure.Handed(hps, score=score)], prompt, 0, gen)
    del policy.vae.decode  # the simulation's own VAE: its decode replayed for the rollout's images only
    return sampled, mixed_advantage(sampled.R, adv_clip=a.adv_clip)  # (|M|, G)


def train_phases(rec, policy, caller, optim, sampled, A, a, step, full: bool, checkpointing):
    """Lines 24-26 of one iteration, each as a phase of `rec`: the per-k update (one k run, its counts x |M|, with
    an earlier k's gradients present, unless `full`) and the one-pass update, without and with activation
    checkpointing; the per-k update's optimizer `step` is a phase of its own. Returns the per-k update's statistics."""
    import train
    from torch.distributed._tools.fsdp2_mem_tracker import _FSDPRefType
    from torch.distributed._tools.mem_tracker import _MemRefType
    model = caller.model
    model.train()
    n = len(sampled.rollout.groups)
    for ac in checkpointing:
        if ac:
            model.enable_gradient_checkpointing()  # what shard_model(activation_checkpointing=True) does
        tag = " AC" if ac else ""
        short = full or n == 1
        if not short:  # one k, with the gradients of an earlier k present (the steady state)
            for p in trainable(model):
                p.grad = torch.zeros_like(p)
                # filed as the tracker files FSDP's own gradients (a plain module's: MemTracker's)
                kind = (p.grad._local_tensor, _FSDPRefType.SHARDED_GRAD) if hasattr(p.grad, "_local_tensor") else \
                    (p.grad, _MemRefType.GRAD)
                rec.tracker._update_and_maybe_create_winfos(*kind, True)
        one = replace(sampled, rollout=replace(sampled.rollout, groups=sampled.rollout.groups[:1]))
        with rec.phase(f"train per-k{tag}", scale=1 if short else n,
                       note=f"{n} x (forward+backward, batch 1)" + ("" if short else ": 1 run, counts x n")
                       + (CFG if policy.rows_per_sample == 2 else "")):
            stats = train.update(policy, caller, optim, [sampled if short else one], [A if short else A[:1]], a,
                                 step=rec.wrap(f"optimizer step{tag}", step, note="clip_grad_norm_ + AdamW"))
        with rec.phase(f"train one-pass{tag}", note=f"1 x (forward+backward, batch {n}): train.update "
                       "--rescore-batch 0, its optimizer step included" + (CFG if policy.rows_per_sample == 2 else "")):
            train.update(policy, caller, optim, [sampled], [A], replace(a, rescore_batch=0), step=step)
        optim.zero_grad(set_to_none=True)
    return stats


def run_world(world: int, full: bool, lora_rank: int = 0, family: str = "flux1-dev") -> dict:
    """One process = one fake process group of `world` ranks; we are rank 0."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        result = simulate(family_setting(family, lora_rank=lora_rank), fake=True, full=full)
        return result if family == "flux1-dev" else {**result, "family": family}
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------
# From one rank's counts to the answers: fit, time per iteration, GPU-hours, communication
# ------------------------------------------------------------------------------------------------
KINDS = {"params": ("Sharded Param", "Buffer", "Parameter"), "gathered": ("Unsharded Param", "All Gather"),
         "grads": ("Sharded Grad", "Unsharded Grad", "Reduce Scatter", "Gradient"),
         "optimizer": ("OptState", "Optstate"),
         "activations": ("Activation", "Inputs"), "temporaries": ("Temp",)}
ITERATION = ("encode", "rollout", "decode", "reward")  # then a train variant and its optimizer step


def breakdown(peak: dict) -> dict:
    """FSDPMemTracker's kinds -> the six columns, GiB."""
    return {col: sum(peak.get(k, 0) for k in kinds) / GiB for col, kinds in KINDS.items()}


def reference_forwards(T, M, G, Lambda) -> int:
    """Batch-1 forwards per prompt of the authors' schedule: the anchor, then per k and branch the SDE step's
    forward again and every ODE step of every granularity on the reference grid (fine_first)."""
    from rollout import strided_grid
    return T + G * sum(1 + sum(len(strided_grid(T, k, lam, True)) - 1 for lam in Lambda) for k in M)


def comm_seconds(ag, rs, world, hsdp=False):
    """Ring collectives of one rank: (W - 1) / W of the bytes cross its link. One node (W <= 8): NVLink.
    Flat over 2+ nodes: the inter-node NIC bounds the ring. HSDP 2 x 8: gathers and reduce-scatters within
    the node, then an all-reduce of the 1/8 gradient shard across the 2 replicas (2 (R - 1) / R of it)."""
    if hsdp:
        return (ag + rs) * 7 / 8 / NVLINK + rs / 8 / IB
    return (ag + rs) * (world - 1) / world / (NVLINK if world <= 8 else IB)


def train_fraction() -> float:
    import train
    return train.Args().train_fraction


def analyse(r: dict, iterations: int) -> dict:
    """Fit per configuration, seconds per iteration per GPU, GPU-hours, communication."""
    P, W = r["phases"], r["world"]
    n_k = len(Setting().M)
    out = {"world": W, "configs": {}, "runs": {}}
    for variant in ("per-k", "one-pass"):
        for ac in ("", " AC"):
            train, step = P[f"train {variant}{ac}"], P[f"optimizer step{ac}"]
            phases = [P[p] for p in ITERATION] + [train, step, P["checkpoint"]]
            peak = max(p["peak"]["Total"] for p in phases) / GiB
            worst = max(ITERATION + (f"train {variant}{ac}", f"optimizer step{ac}", "checkpoint"),
                        key=lambda n: P[n]["peak"]["Total"])
            row = {"peak_gib": peak, "worst_phase": worst, "load_gib": r["load_peak"] / GiB}
            for gpu, spec in GPUS.items():
                row[f"fits_{gpu}"] = max(peak, row["load_gib"]) + RESERVE_GIB <= spec["mem_gib"]
                compute = sum(p[f"sec_{gpu}"] for p in phases[:-1])
                ag = train.get("comm_all_gather", 0) + P["rollout"].get("comm_all_gather", 0)
                rs = train.get("comm_reduce_scatter", 0)
                for topo, hsdp in (("flat", False),) + ((("hsdp", True),) if W == 16 else ()):
                    comm = comm_seconds(ag, rs, W, hsdp)
                    exposed = max(0.0, comm - train[f"sec_{gpu}"])  # FSDP prefetch overlaps comm with compute
                    ckpt = r["ckpt_bytes"] / DISK / 50  # every 50 iterations (train.Args.checkpoint_every)
                    row[f"sec_{gpu}_{topo}"] = compute + exposed + ckpt
                    row[f"comm_sec_{topo}"] = comm
            row["comm_gb"] = (ag + rs) / 1e9
            out["configs"][f"{variant}{ac}"] = row
    # whole runs: G2RPO (per-k, as train.py runs today), the authors' schedule, DanceGRPO in our harness
    calls = r["calls"]["transformer"]
    fwd1, fwd12 = calls["1"], calls["12"]
    k_pass = {k: v / n_k for k, v in P["train per-k"].items() if isinstance(v, (int, float))}
    row_pass = {k: v / n_k for k, v in P["train one-pass"].items() if isinstance(v, (int, float))}
    s = Setting()
    n_ref = reference_forwards(s.T, s.M, s.G, s.Lambda)
    per_image = lambda key: (P["decode"][key] + P["reward"][key]) / r["images"]  # noqa: E731
    fixed = lambda key: P["encode"][key] + P["optimizer step"][key]  # noqa: E731
    n_dance = round(train_fraction() * s.T)  # DanceGRPO's trained steps, each a batch-G forward+backward

    def schedule(key):
        """The three schedules' compute per prompt and iteration, from the simulated calls (key: flops or
        sec_<gpu>). The authors': n_ref batch-1 forwards, G |M| batch-1 forward+backward, every image decoded
        and scored. DanceGRPO here (baselines/grpo.py): T calls of G + 1 rows (batch 12 scaled to 13), n_dance
        forward+backward of batch G (the one-pass batch-|M| pass per row, times G), G + 1 images."""
        return {"G2RPO": sum(P[p][key] for p in ITERATION + ("train per-k",)) + P["optimizer step"][key],
                "reference schedule": n_ref * fwd1[key] + s.G * n_k * k_pass[key] + per_image(key) * r["images"]
                + fixed(key),
                "DanceGRPO": s.T * fwd12[key] * (s.G + 1) / s.G + n_dance * s.G * row_pass[key]
                + per_image(key) * (s.G + 1) + fixed(key)}
    for gpu in GPUS:
        secs = schedule(f"sec_{gpu}")
        secs["G2RPO"] = out["configs"]["per-k"][f"sec_{gpu}_flat"]  # with exposed communication and checkpoints
        for name, sec in secs.items():
            out["runs"].setdefault(name, {})[gpu] = dict(sec_per_iteration=sec, gpu_hours=sec * iterations * W / 3600)
    out["flops"] = schedule("flops")
    out["reference_forwards"] = n_ref
    return out


TITLES = {"flux1-dev": "FLUX.1-dev", "sd3.5-medium": "Stable Diffusion 3.5 Medium",
          "sd3.5-large": "Stable Diffusion 3.5 Large", "qwen-image": "Qwen-Image"}


def markdown(results: list, analyses: list, args) -> str:
    """The tables of results.md."""
    gb = lambda b: f"{b / GiB:.1f}"  # noqa: E731
    family = getattr(args, "family", "flux1-dev")
    if family == "flux1-dev":
        title, size = "# One G2RPO iteration of FLUX.1-dev, simulated (`python bench/scale.py`)", "720x720"
    else:
        f = family_setting(family)
        title = f"# One G2RPO iteration of {TITLES[family]}, simulated (`python bench/scale.py --family {family}`)"
        size = f"{f.height}x{f.width}, classifier-free guidance {f.guidance} (2 transformer rows per sample; " \
               f"'batch' below counts samples), {'T5 ' if f.family != 'qwen-image' else ''}text tokens {f.seq_len}" \
               f"{f', negative prompt {f.negative_len}' if f.negative_len else ''} (configs: bench/released.py)"
    lines = [title, "",
             f"Table 4 setting: T = 16, G = 12, M = 8 steps, Lambda = {{1, 2, 3}}, {size}, one prompt per GPU. "
             f"Per rank; memory in GiB (FSDPMemTracker on fake tensors; without FSDP MemTracker), time = roofline "
             f"at {MFU:.0%} of dense "
             f"peak (bf16 {PEAK['bf16'] / 1e12:.0f}, fp32 {PEAK['fp32'] / 1e12:.0f}, TF32 conv "
             f"{PEAK['tf32'] / 1e12:.0f} TFLOP/s) and {BW_EFF:.0%} of HBM bandwidth (H100 SXM 3.35, H200 4.8 TB/s).", ""]
    for r, a in zip(results, analyses):
        W = r["world"]
        lora = f", LoRA rank {r['lora_rank']} ({r['trained'] / 1e6:.0f} M trained parameters, frozen bf16 base)" \
            if r.get("lora_rank") else ""
        lines += [f"## {'' if family == 'flux1-dev' else TITLES[family] + ': '}World size {W}{lora}", "",
                  f"{r['params'] / 1e9:.2f} B parameters: {gb(r['param_shard_bytes'])} GiB of them per rank ("
                  f"{'the frozen bf16 base and fp32 adapters' if r.get('lora_rank') else 'fp32'}"
                  f"{' shard' if r.get('sharded', True) else ', whole: no FSDP at world size 1'}), "
                  f"{gb(r['bf16_bytes'])} GiB in bf16{', gathered for the rollout' if r.get('sharded', True) else ''}. "
                  f"Load (train.load_model: each rank fills its own shard, a block at a time; the VAE and HPS "
                  f"loaded): peak {gb(r['load_peak'])} GiB. Rollout: "
                  f"{r['rollout_evals']} evaluations in {r['rollout_calls']} calls; {r['images']} images decoded "
                  f"and scored.", "",
                  "| phase | peak | params | gathered | grads | optimizer | activations | temporaries | TFLOP "
                  "| H100 s | H200 s | all-gather GB | reduce-scatter GB | how |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, p in r["phases"].items():
            b = breakdown(p["peak"])
            lines.append(f"| {name} | **{p['peak']['Total'] / GiB:.1f}** | " + " | ".join(f"{v:.1f}" for v in b.values())
                         + f" | {p.get('flops', 0) / 1e12:,.1f} | {p.get('sec_H100', 0):.1f} | {p.get('sec_H200', 0):.1f}"
                         f" | {p.get('comm_all_gather', 0) / 1e9:.1f} | {p.get('comm_reduce_scatter', 0) / 1e9:.1f}"
                         f" | {p['note']} |")
        lines += ["", f"Checkpoint (model + AdamW moments, this rank's shard): {r['ckpt_bytes'] / 1e9:.1f} GB, "
                  f"{r['ckpt_bytes'] / DISK:.0f} s at {DISK / 1e9:.0f} GB/s per GPU, every 50 iterations.", "",
                  "| training as | peak GiB (phase) | fits H100 80 GB | fits H200 141 GB | comm GB/iteration "
                  "| s/iteration H100 | s/iteration H200 |", "|---|---|---|---|---|---|---|"]
        for cfg, c in a["configs"].items():
            topo = " (HSDP 2x8: " + ", ".join(f"{c[f'sec_{g}_hsdp']:.0f}" for g in GPUS) + ")" if W == 16 else ""
            lines.append(f"| {cfg} | {c['peak_gib']:.1f} ({c['worst_phase']}) | {'yes' if c['fits_H100'] else 'NO'} "
                         f"| {'yes' if c['fits_H200'] else 'NO'} | {c['comm_gb']:.0f} | {c['sec_H100_flat']:.0f} "
                         f"| {c['sec_H200_flat']:.0f}{topo} |")
        lines += ["", f"Whole run, {args.iterations} iterations on {W} GPUs (PFLOP per prompt and iteration):", "",
                  "| schedule | PFLOP/iteration/GPU | H100 s/iteration | H200 s/iteration | H100 GPU-hours | H200 GPU-hours |",
                  "|---|---|---|---|---|---|"]
        for name, run in a["runs"].items():
            lines.append(f"| {name} | {a['flops'][name] / 1e15:.1f} | {run['H100']['sec_per_iteration']:.0f} | "
                         f"{run['H200']['sec_per_iteration']:.0f} | {run['H100']['gpu_hours']:,.0f} | "
                         f"{run['H200']['gpu_hours']:,.0f} |")
        lines.append("")
    return "\n".join(lines)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worlds", type=int, nargs="*", help="world sizes (GPUs), one process each (default: 8 and 16 for "
                   "flux1-dev, 8 for the other families)")
    p.add_argument("--lora-worlds", type=int, nargs="*", default=[1], help="world sizes simulated with LoRA")
    p.add_argument("--lora-rank", type=int, default=32, help="LoRA rank of those (alpha = 2 rank)")
    p.add_argument("--iterations", type=int, default=300, help="training iterations of the whole run")
    p.add_argument("--full", action="store_true", help="run every model call (slow) instead of replaying repeats")
    p.add_argument("--family", default="flux1-dev", choices=FAMILIES,
                   help="the model family, at its released configuration and usual training size (bench/released.py)")
    p.add_argument("--out", help="markdown table; results.json beside it (default: runs/bench-scale/results.md, for "
                   "another family than flux1-dev runs/bench-scale/<family>/results.md)")
    p.add_argument("--report", action="store_true", help="only rebuild the tables from the results.json beside --out")
    p.add_argument("--world", type=int, help=argparse.SUPPRESS)  # internal: simulate one world, write --json
    p.add_argument("--json", help=argparse.SUPPRESS)
    p.add_argument("--lora", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worlds is None:
        a.worlds = [8, 16] if a.family == "flux1-dev" else [8]
    if any(w < 1 for w in a.worlds) or a.iterations < 1:
        raise SystemExit(f"bench/scale.py: --worlds and --iterations must be >= 1, got {a.worlds} and {a.iterations}")
    if a.out is None:
        a.out = "runs/bench-scale/results.md" if a.family == "flux1-dev" else f"runs/bench-scale/{a.family}/results.md"
    if not a.out.endswith(".md"):
        raise SystemExit(f"bench/scale.py: --out {a.out}: give a .md path (results.json is written beside it)")
    return a


def main(argv=None):
    a = parse(argv)
    if a.world:  # one world in this process (a fake process group is set up once per process)
        t0 = time.process_time()
        result = run_world(a.world, a.full, a.lora_rank if a.lora else 0, a.family)
        Path(a.json).write_text(json.dumps({**result, "sim_seconds": time.process_time() - t0}, default=float))
        return
    out, t0 = Path(a.out), time.time()
    if a.report:
        if not out.with_suffix(".json").is_file():
            raise SystemExit(f"bench/scale.py: --report: no {out.with_suffix('.json')} (run without --report first)")
        results = json.loads(out.with_suffix(".json").read_text())["results"]
        a.family = next((r["family"] for r in results if "family" in r), a.family)  # the tables' family: the run's
    else:
        results = simulate_worlds(a, out)
    analyses = [analyse(r, a.iterations) for r in results]
    text = markdown(results, analyses, a) + f"\nSimulated in {sum(r.get('sim_seconds', 0) for r in results):.0f} s of CPU " \
        f"(wall {time.time() - t0:.0f} s).\n"
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"results": results, "analysis": analyses}, indent=1, default=float))
    print(text)
    print(f"written: {out}, {out.with_suffix('.json')}")


def simulate_worlds(a, out: Path) -> list:
    """One subprocess per world size (a fake process group is set up once per process), in parallel."""
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    jobs = []
    for w, lora in [(w, False) for w in a.worlds] + [(w, True) for w in a.lora_worlds]:  # in parallel: a core each
        name = f"world{w}" + (f"-lora{a.lora_rank}" if lora else "")
        js, log = out.parent / f"{name}.json", out.parent / f"{name}.log"
        cmd = [sys.executable, __file__, "--world", str(w), "--json", str(js), "--lora-rank", str(a.lora_rank)] + \
            ["--full"] * a.full + ["--lora"] * lora + ["--family", a.family] * (a.family != "flux1-dev")
        jobs.append((w, js, log, subprocess.Popen(cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)))
    results = []
    for w, js, log, proc in jobs:
        if proc.wait():
            tail = log.read_text().strip().splitlines()[-1:]
            raise SystemExit(f"bench/scale.py: world {w} failed ({tail[0] if tail else 'no output'}); see {log}")
        results.append(json.loads(js.read_text()))
    return results


if __name__ == "__main__":
    main()
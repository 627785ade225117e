"""One GPU, five minutes: what FLUX.1-dev's blocks cost in G2RPO's rollout and training step, measured beside a
prediction on fake tensors (no GPU needed), and how far the PPO ratio drifts from 1 in bf16.

    python bench/gpu_check.py                                 # one GPU (~1.5 min on an H100: an estimate)
    python bench/gpu_check.py --double 4 --single 8           # more blocks
    python bench/gpu_check.py --device cpu --tiny             # same code path, tiny width: ~25 s on 2 cores

The model: FLUX.1-dev's transformer config with --double 2 + --single 4 of its 19 + 38 blocks (1.3 B of its
11.9 B parameters), random bf16 weights built on the device, called only through the project's code:
policy.flux.FluxPolicy.velocity (720x720: 2025 image + 512 T5 tokens, guidance 3.5), rollout.singular_rollout,
rollout.rescore / rescore_groups, loss.g2rpo_loss. --tiny: 2 x 16 wide, 1 + 1 blocks, 128x128 px, 32 tokens.

Table 1, one row per call, each its own peak-memory window. "rollout B": one no-grad velocity call of B rows at
per-row t (1 = an anchor step, 12 = G branches, 36 = G x |Lambda|). "train B": Eq. 12's forward+backward at B
shared states x_k (1 = train.py --rescore-batch 1, 8 = |M| = --rescore-batch 0; "+AC": with activation
checkpointing). Columns: ms, the median of --repeats calls after --warmup (CUDA events; perf_counter on CPU);
TFLOP, FlopCounterMode on the first warm-up call (matrix products and attention); TFLOP/s and MFU, over the dense
bf16 peak (H100 SXM / H200 989, H100 PCIe 756, A100 312 TFLOP/s, else --peak-tflops); GiB,
torch.cuda.max_memory_allocated, weights included. pred ms, pred GiB: the same call on fake tensors (shapes only),
its FLOPs / (peak x --efficiency) and its peak of live tensor bytes (no allocator rounding, no workspaces).
full model: FLUX.1-dev's 19 + 38 blocks, EXTRAPOLATED affine in the block counts from one more block of each kind
on fake tensors (FLOPs exact); ms scaled by FLOPs; GiB = measured + (full pred - pred). One GPU, no FSDP: bf16
parameters and gradients (train.py's FSDP holds fp32 shards).

Table 2, the PPO ratio at the first update (--T steps, M = the first T/2, eta 0.7, clip 1e-4), weights in fp32
and bf16: old log-probs from singular_rollout (--drift-G branches, the anchor's batch-1 call at x_k), new ones
from the training forward at the same weights (checkpointing on: the same arithmetic) at batch 1 (rescore per
k) and |M| (one pass). Reported: max and mean |r - 1|, the share outside the clip range, max |v_train - v_roll|.

Writes OUT/results.json and OUT/results.md (--out, default runs/gpu-check) and prints the tables.
"""
import argparse
import copy
import functools
import gc
import json
import platform
import statistics
import sys
import time
import weakref
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode
# The two private torch APIs used, both for the prediction, neither with a public equivalent: fake tensors
# (shapes and devices, no memory: the meta device would pick other attention kernels), and the dispatch mode
# that sees every aten op, backward's included (LiveBytes).
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from loss import g2rpo_loss  # noqa: E402
from rollout import Group, rescore, rescore_groups, singular_rollout  # noqa: E402
from sde import sde_step, sigma_grid  # noqa: E402
from launch.preflight import FLUX_DEV  # noqa: E402  (black-forest-labs/FLUX.1-dev transformer/config.json)

TINY = dict(FLUX_DEV, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=32,
            axes_dims_rope=(4, 6, 6))
PEAK_BF16 = [("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0)]  # dense, TFLOP/s
CLIP_RANGE, ETA, GUIDANCE = 1e-4, 0.7, 3.5  # Table 4


# CPU attention has no formula in torch's FLOP counter: the GPU kernels' one (torch.utils.flop_counter's
# sdpa_flop_count and sdpa_backward_flop_count), so that CPU and GPU counts agree. Shapes (B, H, L, d).
def _attention(q, k, v, *args, out_shape=None, **kwargs):  # Q K^T and P V
    return 2 * q[0] * q[1] * q[2] * k[2] * (q[3] + v[3])


def _attention_backward(grad_out, q, k, v, *args, out_shape=None, **kwargs):  # Q K^T again, dP, dV, dQ, dK
    return 2 * q[0] * q[1] * q[2] * k[2] * (3 * q[3] + 2 * v[3])


_aten = torch.ops.aten
CPU_ATTENTION = {_aten._scaled_dot_product_flash_attention_for_cpu: _attention,
                 _aten._scaled_dot_product_flash_attention_for_cpu_backward: _attention_backward}


def flop_counter():
    return FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    p.add_argument("--tiny", action="store_true", help="2 x 16 wide, 1 + 1 blocks, 128x128 px, 32 text tokens")
    p.add_argument("--double", type=int, help="double-stream blocks (default 2; --tiny 1; FLUX.1-dev 19)")
    p.add_argument("--single", type=int, help="single-stream blocks (default 4; --tiny 1; FLUX.1-dev 38)")
    p.add_argument("--size", type=int, help="image height = width in pixels (default 720; --tiny 128)")
    p.add_argument("--text-len", type=int, help="T5 tokens (default 512; --tiny 32)")
    p.add_argument("--rollout-batches", default="1,12,36", help="rows of the no-grad rollout calls")
    p.add_argument("--train-batches", default="1,8", help="shared states x_k per training forward+backward")
    p.add_argument("--G", type=int, default=12, help="branches per shared state in the training rows (Table 4)")
    p.add_argument("--T", type=int, default=16, help="sampling steps of the drift rollout (M = the first T/2)")
    p.add_argument("--drift-G", type=int, default=4, help="branches per SDE step in the drift rollout")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per row (the first counts FLOPs)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per row (the median is reported)")
    p.add_argument("--efficiency", type=float, default=0.4, help="share of the peak the prediction assumes")
    p.add_argument("--peak-tflops", type=float, help="dense bf16 peak of the device (TFLOP/s) if not detected")
    p.add_argument("--no-full", action="store_true", help="skip the full-model columns (fake tensors, CPU time)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/gpu-check", help="folder for results.json and results.md")
    a = p.parse_args(argv)
    try:
        a.rollout_batches = [int(b) for b in a.rollout_batches.split(",")]
        a.train_batches = [int(b) for b in a.train_batches.split(",")]
    except ValueError:
        p.error("--rollout-batches and --train-batches take comma-separated integers, e.g. 1,12,36")
    a.double = a.double if a.double is not None else (1 if a.tiny else 2)
    a.single = a.single if a.single is not None else (1 if a.tiny else 4)
    a.size = a.size or (128 if a.tiny else 720)
    a.text_len = a.text_len or (32 if a.tiny else 512)
    checks = [(min(a.rollout_batches + a.train_batches) >= 1, "batch sizes must be >= 1"),
              (a.double >= 1 and a.single >= 1, "--double and --single must be >= 1 (FLUX has both kinds)"),
              (a.size > 0 and a.size % 16 == 0, f"--size must be a positive multiple of 16, got {a.size}"),
              (1 <= a.text_len <= 512, f"--text-len must be in [1, 512], got {a.text_len}"),
              (a.T >= 2, f"--T must be >= 2, got {a.T}"),
              (max(a.train_batches) <= a.T // 2, f"train batches must be <= |M| = T/2 = {a.T // 2}"),
              (a.G >= 1 and a.drift_G >= 2, "--G must be >= 1 and --drift-G >= 2"),
              (a.warmup >= 1 and a.repeats >= 1, "--warmup and --repeats must be >= 1"),
              (0 < a.efficiency <= 1, f"--efficiency must be in (0, 1], got {a.efficiency}"),
              (a.peak_tflops is None or a.peak_tflops > 0, "--peak-tflops must be > 0")]
    for ok, message in checks:
        if not ok:
            p.error(message)
    return a


def resolve_device(name: str) -> torch.device:
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"gpu_check: unknown device {name!r}; use cuda, cuda:N or cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: --device cuda but torch sees no CUDA GPU here; run with --device cpu --tiny")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise SystemExit(f"gpu_check: {name} does not exist ({torch.cuda.device_count()} CUDA device(s))")
    if dev.type not in ("cuda", "cpu"):
        raise SystemExit(f"gpu_check: device type {dev.type!r} is not supported; use cuda or cpu")
    return dev


def peak_tflops(dev, given):
    if given or dev.type != "cuda":
        return given
    return next((peak for key, peak in PEAK_BF16 if key in torch.cuda.get_device_name(dev)), None)


# ---------------------------------------------------------------- the model, through the policy
def build_transformer(cfg, dev):
    """FluxTransformer2DModel(**cfg), random weights initialised in bf16 on `dev` (real, fake or meta tensors)."""
    from diffusers import FluxTransformer2DModel
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(dev):
            return FluxTransformer2DModel(**cfg).eval()
    finally:
        torch.set_default_dtype(old)


@functools.cache
def vae_stand_in():
    """FLUX's VAE as FluxPolicy sees it (16 latent channels, 8x downsampling), 8 wide, real, on the CPU: FluxPolicy
    reads its config; nothing here decodes. First called outside FakeTensorMode (main, predict)."""
    from diffusers import AutoencoderKL
    with torch.device("cpu"):
        vae = AutoencoderKL(latent_channels=16, block_out_channels=(8,) * 4, norm_num_groups=4, layers_per_block=1,
                            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
    return vae.eval()


def flux_policy(transformer, dev, dtype, a):
    from policy.flux import FluxPolicy
    return FluxPolicy("random-init", transformer, vae_stand_in(), a.size, a.size, a.text_len, GUIDANCE, device=dev,
                      dtype=dtype)


def random_cond(policy, gen=None):
    from policy.flux import Cond
    cfg = policy.transformer.config
    enc = torch.randn(1, policy.max_sequence_length, cfg.joint_attention_dim, generator=gen)  # (1, S, 4096)
    pooled = torch.randn(1, cfg.pooled_projection_dim, generator=gen)  # (1, 768)
    return Cond(enc.to(policy.device, torch.bfloat16), pooled.to(policy.device, torch.bfloat16))  # as cached


def make_groups(policy, v, n, G, T, seed):
    """n groups at k = 0..n-1 as a rollout holds them: x_k a state (noise), G next states from one SDE step
    of the velocity at x_k, and their log-probs (the 'old' ones); one no-grad batched call."""
    sigmas = sigma_grid(T)
    x_k = policy.noise(n, generator=torch.Generator().manual_seed(seed))  # (n, L, C)
    gen = torch.Generator(policy.device).manual_seed(seed)  # the SDE noise is drawn on the device
    with torch.no_grad():
        v_k = v(x_k, sigmas[:n].float())
    groups = []
    for k in range(n):
        x_next, logp, _, _ = sde_step(x_k[k:k + 1].expand(G, -1, -1), v_k[k:k + 1].expand(G, -1, -1), sigmas[k],
                                      sigmas[k + 1], ETA, generator=gen)
        groups.append(Group(k=k, x_k=x_k[k:k + 1], x_next=x_next, log_prob=logp, images={}))
    return groups, sigmas


def row_call(policy, cond, kind, B, G, T, real=True, transformer=None, seed=0):
    """The zero-argument call a row times. 'rollout': v(x, t), B rows, no grad. 'train': the training step at B
    shared states (train.update's: rescore_groups, g2rpo_loss, backward). On fake tensors (real=False) a square of
    the velocity stands in for the SDE log-prob and loss (sde_step checks its std on the data, which fake tensors
    cannot do; FlopCounterMode counts neither, and their tensors are (G, L, C))."""
    v = policy.velocity(cond, transformer)
    net = policy.transformer if transformer is None else transformer
    x = policy.noise(B, generator=torch.Generator().manual_seed(seed) if real else None)  # (B, L, C) fp32
    t = torch.linspace(0.95, 0.05, B, device=policy.device)  # per-row t, as in the batched continuations
    if kind == "rollout":
        return torch.no_grad()(lambda: v(x, t))

    def fake_step():
        net.zero_grad(set_to_none=True)
        v(x, t).square().mean().backward()
    if not real:
        return fake_step
    groups, sigmas = make_groups(policy, v, B, G, T, seed)
    A = torch.randn(B, G, generator=torch.Generator().manual_seed(seed)).to(policy.device)  # (B, G)

    def step():
        net.zero_grad(set_to_none=True)
        logp = torch.stack(rescore_groups(v, groups, sigmas, ETA))  # (B, G)
        loss, _ = g2rpo_loss(logp, torch.stack([g.log_prob for g in groups]), A, CLIP_RANGE)
        loss.backward()
    return step


# ---------------------------------------------------------------- measurement and prediction
def measure(call, dev, warmup, repeats, count=True):
    """{sec (median), sec_min, flops and flops_by_op (FlopCounterMode on the first warm-up call; None unless count),
    peak_gib (CUDA only)}. The counted call stays outside the memory window: FlopCounterMode keeps the
    activations that checkpointing recomputes alive until it exits (torch 2.14), ~3x the true peak."""
    cuda = dev.type == "cuda"
    counter = flop_counter()
    with counter if count else nullcontext():
        call()
    gc.collect()
    if cuda:
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    for _ in range(warmup - 1):
        call()

    def timed():  # seconds
        if not cuda:
            t0 = time.perf_counter()
            call()
            return time.perf_counter() - t0
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    times = [timed() for _ in range(repeats)]
    by_op = {str(op): n for op, n in counter.get_flop_counts().get("Global", {}).items()} if count else None
    return {"sec": statistics.median(times), "sec_min": min(times),
            "flops": counter.get_total_flops() if count else None, "flops_by_op": by_op,
            "peak_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if cuda else None}


def _tensors(out):  # an op's outputs: a tensor, or tuples and lists of them (and non-tensors)
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return [out] if isinstance(out, torch.Tensor) else []


class LiveBytes(TorchDispatchMode):
    """Peak bytes of live tensor storages: each storage an op returns counts once, until it is freed. The peak
    torch.distributed._tools.MemTracker reports (within 3 % on the tiny model), several times faster."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.known = set()  # id() of the storages counted and not yet freed

    def add(self, *tensors):
        for t in tensors:
            storage = t.untyped_storage()  # one Python object per storage, alive as long as the storage
            if id(storage) not in self.known:
                self.known.add(id(storage))
                self.live += storage.nbytes()
                weakref.finalize(storage, self._free, id(storage), storage.nbytes())
        self.peak = max(self.peak, self.live)

    def _free(self, key, n):
        self.known.discard(key)
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.add(*_tensors(out))
        return out


def predict(cfg, dev, kind, B, a, checkpointing=False):
    """{flops, gib}: the same row on fake tensors: its peak of live tensor bytes, then in a second call (see
    measure) its FLOPs."""
    vae_stand_in()  # real
    with FakeTensorMode():
        policy = flux_policy(build_transformer(cfg, dev), dev, torch.bfloat16, a)
        if checkpointing:
            policy.transformer.enable_gradient_checkpointing()
        live = LiveBytes()
        live.add(*policy.transformer.parameters(), *policy.transformer.buffers())
        with live:
            call = row_call(policy, random_cond(policy), kind, B, a.G, a.T, real=False)
            call()
        with flop_counter() as counter:
            call()
    return {"flops": counter.get_total_flops(), "gib": live.peak / 2**30}


def predict_full(cfg, dev, kind, B, a, checkpointing, pred, blocks=(19, 38)):
    """The row for `blocks` (double, single; FLUX.1-dev's 19 + 38), affine in the block counts: pred + (19 - d)
    x (one more double block) + (38 - s) x (one more single block), each increment counted on fake tensors.
    Exact for FLOPs; for memory it holds while every block kind is present (a no-grad call's transient is
    one block's; training's saved activations grow by the block)."""
    more_d = predict(dict(cfg, num_layers=cfg["num_layers"] + 1), dev, kind, B, a, checkpointing)
    more_s = predict(dict(cfg, num_single_layers=cfg["num_single_layers"] + 1), dev, kind, B, a, checkpointing)
    n_d, n_s = blocks[0] - cfg["num_layers"], blocks[1] - cfg["num_single_layers"]
    return {k: pred[k] + n_d * (more_d[k] - pred[k]) + n_s * (more_s[k] - pred[k]) for k in pred}


def free(dev):
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def timing_row(policy, cond, cfg, dev, pred_dev, peak, a, kind, B, ckpt):
    """One row of Table 1: measured, predicted on fake `pred_dev` tensors, and the full model's columns."""
    r = {"name": f"{kind} B={B}" + (" +AC" if ckpt else ""), "kind": kind, "batch": B, "checkpointing": ckpt}
    if ckpt:
        policy.transformer.enable_gradient_checkpointing()
    try:
        r.update(measure(row_call(policy, cond, kind, B, a.G, a.T, seed=a.seed), dev, a.warmup, a.repeats))
    except torch.OutOfMemoryError:  # a smaller GPU: keep the prediction, say what did not fit
        r.update(sec=None, flops=None, peak_gib=None, error="out of memory")
    policy.transformer.disable_gradient_checkpointing()
    policy.transformer.zero_grad(set_to_none=True)
    free(dev)
    pred_dev, pred = predict_on(pred_dev, cfg, kind, B, a, ckpt)
    tflops_s = r["flops"] / r["sec"] / 1e12 if r["sec"] else None
    r.update(pred_flops=pred["flops"], pred_gib=pred["gib"], pred_device=pred_dev.type, tflops_s=tflops_s,
             mfu=tflops_s / peak if peak and tflops_s else None,
             pred_sec=pred["flops"] / (peak * 1e12 * a.efficiency) if peak else None)
    if not a.no_full:
        full = predict_full(cfg, pred_dev, kind, B, a, ckpt, pred)
        r["full_flops"] = full["flops"]
        r["full_sec"] = r["sec"] * full["flops"] / r["flops"] if r["sec"] else None
        r["full_gib"] = full["gib"] + (r["peak_gib"] - pred["gib"] if r["peak_gib"] is not None else 0.0)
    return r


def predict_on(pred_dev, cfg, kind, B, a, ckpt):
    """(the device whose fake tensors predicted, predict(...)): `pred_dev`'s, or the CPU's if those fail."""
    try:
        return pred_dev, predict(cfg, pred_dev, kind, B, a, ckpt)
    except Exception as e:  # fake tensors of a device type need its driver; the CPU's never do
        if pred_dev.type == "cpu":
            raise
        print(f"  fake {pred_dev.type} tensors failed ({type(e).__name__}: {str(e).strip()[:80]}); "
              "predicting on fake CPU tensors", flush=True)
        return torch.device("cpu"), predict(cfg, torch.device("cpu"), kind, B, a, ckpt)


def timing_rows(policy, cond, cfg, dev, peak, a):
    specs = [("rollout", B, False) for B in a.rollout_batches] + [("train", B, False) for B in a.train_batches]
    rows, t0, pred_dev = [], time.time(), dev
    for kind, B, ckpt in specs + [("train", max(a.train_batches), True)]:
        r = timing_row(policy, cond, cfg, dev, pred_dev, peak, a, kind, B, ckpt)
        if r["pred_device"] != pred_dev.type:  # fake tensors of `dev` failed: the CPU's from then on
            pred_dev = torch.device("cpu")
        rows.append(r)
        print(f"  {r['name']:<16} {fmt(r['sec'] and 1e3 * r['sec'], '9.1f')} ms  "
              f"{fmt(r['flops'] and r['flops'] / 1e12, '9.3g')} TFLOP  {fmt(r['peak_gib'], '.3g')} GiB  "
              f"(predicted {fmt(r['pred_sec'] and 1e3 * r['pred_sec'], '.1f')} ms, {r['pred_gib']:.3g} GiB; "
              f"{time.time() - t0:.0f} s)", flush=True)
    return rows


# ---------------------------------------------------------------- the PPO ratio at the first update
def drift(model_bf16, dev, a):
    """Table 2, in fp32 (a copy of the weights) and in bf16."""
    out = []
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        try:
            model = model_bf16 if dtype == torch.bfloat16 else copy.deepcopy(model_bf16).float()
            out += drift_in(model, dtype, dev, a)
            print(f"  {name}: max |r - 1| {out[-2]['ratio_drift_max']:.3g} at batch 1, "
                  f"{out[-1]['ratio_drift_max']:.3g} at batch {a.T // 2}", flush=True)
        except torch.OutOfMemoryError:  # the fp32 copy and its forward with gradients need ~3x the bf16 model
            out.append({"precision": name, "error": "out of memory"})
        model = None
        model_bf16.disable_gradient_checkpointing()
        free(dev)
    return out


def drift_in(model, dtype, dev, a):
    """Old log-probs from singular_rollout, new ones from the training forward at the same weights (batch 1 and
    batch |M|): two rows of Table 2."""
    sigmas, M = sigma_grid(a.T), list(range(a.T // 2))
    policy = flux_policy(model, dev, dtype, a)
    cond = random_cond(policy, torch.Generator().manual_seed(a.seed + 1))
    v_roll, seen_roll = recorded(policy.velocity(cond))
    x_T = policy.noise(1, generator=torch.Generator().manual_seed(a.seed + 2))  # (1, L, C)
    ro = singular_rollout(v_roll, x_T, sigmas, M, a.drift_G, Lambda=(a.T,), eta=ETA,
                          generator=torch.Generator(dev).manual_seed(a.seed + 3))
    old = torch.stack([g.log_prob for g in ro.groups])  # (|M|, G) from the anchor's batch-1 calls
    v_old = torch.cat(seen_roll[:len(M)])  # the anchor's velocities at x_k, k in M (its first T calls)
    model.enable_gradient_checkpointing()  # less memory; the forward's arithmetic is unchanged
    v_train, seen = recorded(policy.velocity(cond))  # gradients on: the parameters require grad
    new_1 = torch.stack([rescore(v_train, g, sigmas, ETA).detach() for g in ro.groups])  # batch 1, one per k
    new_M = torch.stack(rescore_groups(v_train, ro.groups, sigmas, ETA)).detach()  # batch |M|, one pass
    rows = []
    for batch, new, v_new in ((1, new_1, torch.cat(seen[:len(M)])), (len(M), new_M, seen[len(M)])):
        _, diag = g2rpo_loss(new, old, torch.zeros_like(old), CLIP_RANGE)  # the ratio needs no advantages
        rows.append({"precision": "fp32" if dtype == torch.float32 else "bf16", "train_batch": batch,
                     "ratio_drift_max": diag["ratio_drift_max"], "ratio_drift_mean": diag["ratio_drift_mean"],
                     "clip_frac": diag["clip_frac"], "v_max_abs_diff": (v_new - v_old).abs().max().item(),
                     "v_abs_mean": v_old.abs().mean().item()})
    return rows


def recorded(v):
    """v, and the list its (detached) outputs are appended to, call by call."""
    seen = []

    def w(x, t):
        out = v(x, t)
        seen.append(out.detach())
        return out
    return w, seen


# ---------------------------------------------------------------- report
def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def markdown(res) -> str:
    lines = [f"GPU check: {res['device_name']} ({res['device']}), dense bf16 peak {fmt(res['peak_tflops'], '.3g')} "
             f"TFLOP/s, prediction at {res['efficiency']:.0%} of it; {res['blocks']} blocks "
             f"({res['params'] / 1e6:.1f} M parameters; FLUX.1-dev's 19 + 38: {res['full_params'] / 1e6:.1f} M), "
             f"{res['tokens']} image + {res['text_len']} text tokens, bf16, random weights; "
             f"torch {res['torch']}, diffusers {res['diffusers']}; {res['wall_sec']:.0f} s in all.", "",
             "| measurement | ms | TFLOP | TFLOP/s | MFU | GiB | pred ms | pred GiB | full model: TFLOP | ms (extrap.) "
             "| GiB (extrap.) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        name = r["name"] + (f" ({r['error']})" if "error" in r else "")
        lines.append(f"| {name} | {fmt(r['sec'] and 1e3 * r['sec'], '.4g')} | "
                     f"{fmt(r['flops'] and r['flops'] / 1e12, '.3g')} | {fmt(r['tflops_s'], '.3g')} | "
                     f"{fmt(r['mfu'], '.1%')} | {fmt(r['peak_gib'], '.3g')} | "
                     f"{fmt(r['pred_sec'] and 1e3 * r['pred_sec'], '.4g')} | {r['pred_gib']:.3g} | "
                     f"{fmt(r.get('full_flops') and r['full_flops'] / 1e12, '.4g')} | "
                     f"{fmt(r.get('full_sec') and 1e3 * r['full_sec'], '.4g')} | {fmt(r.get('full_gib'), '.3g')} |")
    lines += ["", f"PPO ratio at the first update (T = {res['T']}, |M| = {res['T'] // 2}, G = {res['drift_G']}, "
              f"clip range {CLIP_RANGE:g}): old log-probs from the rollout's batch-1 anchor call at x_k", "",
              "| precision | training forward | max abs(r - 1) | mean abs(r - 1) | outside clip | max abs(dv) "
              "| mean abs(v) |", "|---|---|---|---|---|---|---|"]
    for d in res["drift"]:
        if "error" in d:
            lines.append(f"| {d['precision']} | {d['error']} | | | | | |")
            continue
        what = "batch 1 (rescore)" if d["train_batch"] == 1 else f"batch {d['train_batch']} (one pass)"
        lines.append(f"| {d['precision']} | {what} | {d['ratio_drift_max']:.3g} | {d['ratio_drift_mean']:.3g} | "
                     f"{d['clip_frac']:.0%} | {d['v_max_abs_diff']:.3g} | {d['v_abs_mean']:.3g} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    start = time.time()
    a = parse_args(argv)
    dev = resolve_device(a.device)
    import diffusers
    peak = peak_tflops(dev, a.peak_tflops)
    if dev.type == "cuda" and peak is None:
        raise SystemExit(f"gpu_check: unknown dense bf16 peak for {torch.cuda.get_device_name(dev)}; "
                         "pass --peak-tflops (the vendor's dense bf16 figure)")
    base = TINY if a.tiny else FLUX_DEV
    cfg = dict(base, num_layers=a.double, num_single_layers=a.single)
    torch.manual_seed(a.seed)
    policy = flux_policy(build_transformer(cfg, dev), dev, torch.bfloat16, a)
    cond = random_cond(policy, torch.Generator().manual_seed(a.seed))
    cuda = dev.type == "cuda"
    name = torch.cuda.get_device_name(dev) if cuda else platform.processor() or "cpu"
    res = {"device": str(dev), "device_name": name,
           "device_gib": torch.cuda.get_device_properties(dev).total_memory / 2**30 if cuda else None,
           "peak_tflops": peak, "efficiency": a.efficiency, "config": cfg, "blocks": f"{a.double} + {a.single}",
           "params": sum(p.numel() for p in policy.transformer.parameters()),
           "full_params": sum(p.numel() for p in build_transformer(base, "meta").parameters()),
           "tokens": policy.img_ids.shape[0], "text_len": a.text_len, "size": a.size, "G": a.G, "T": a.T,
           "drift_G": a.drift_G, "torch": torch.__version__, "diffusers": diffusers.__version__,
           "cuda": torch.version.cuda, "rows": [], "drift": []}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    def save():  # after every phase, so that a run cut short keeps what it measured
        res["wall_sec"] = time.time() - start
        (out / "results.json").write_text(json.dumps(res, indent=1, default=str))
        (out / "results.md").write_text(markdown(res))

    print(f"gpu_check: {res['device_name']}, {res['blocks']} blocks, {res['params'] / 1e6:.1f} M parameters, "
          f"{res['tokens']} + {a.text_len} tokens; timing", flush=True)
    res["rows"] = timing_rows(policy, cond, cfg, dev, peak, a)
    save()
    print("gpu_check: PPO ratio drift", flush=True)
    res["drift"] = drift(policy.transformer, dev, a)
    save()
    print("\n" + markdown(res) + f"\nwritten: {out / 'results.json'}, {out / 'results.md'}")
    return res


if __name__ == "__main__":
    main()

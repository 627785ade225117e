"""One GPU, a few minutes: what FLUX.1-dev's blocks cost in G2RPO's rollout and training step,
measured beside a prediction that needs no GPU, and how far the PPO ratio drifts from 1 in bf16.

    python bench/gpu_check.py                                 # one GPU (see "Time" below)
    python bench/gpu_check.py --double 4 --single 8 --extras  # more blocks; attention backends, compile
    python bench/gpu_check.py --device cpu --tiny             # same code path, tiny width: ~25 s on 2 cores

The model is FLUX.1-dev's transformer config (24 heads x 128 = 3072 wide, joint_attention_dim 4096,
pooled_projection_dim 768, in_channels 64, guidance_embeds) with fewer blocks (--double 2, --single 4
of FLUX.1-dev's 19 + 38: 1.3 B of its 11.9 B parameters), random weights, built directly on the device
in bf16, and called only through the project's code: policy.flux.FluxPolicy.velocity (packed latents
(B, 2025, 64) at 720x720, 512 T5 tokens, img_ids / txt_ids, guidance 3.5), rollout.singular_rollout,
rollout.rescore and loss.g2rpo_loss. FluxPolicy checks in_channels against its VAE, so it gets a
stand-in AutoencoderKL with FLUX's 16 latent channels and 8x downsampling at width 8; nothing here
decodes. --tiny swaps in a 2 x 16 wide model at 128x128 px and 32 text tokens (a test of the script).

Table 1, one row per measurement (each row its own peak-memory window):
  rollout B       one no-grad batched call of the velocity with B rows at per-row t. B = 1 is an
                  anchor step, 12 = G branches at one depth, 36 = G x |Lambda| (a depth where all
                  granularities still differ).
  train B         Eq. 12's training step with gradients on the parameters: B = 1 is today's
                  rollout.rescore at one shared x_k (+ g2rpo_loss, backward); B = 8 = |M| is the
                  one-pass variant, all |M| shared states x_k in one forward+backward (rescore_batched
                  below); "+AC" with activation checkpointing (train.py --activation-checkpointing).
  ms              median of --repeats timed calls (CUDA events; perf_counter on CPU) after --warmup
  TFLOP           FLOPs of one call, counted by torch.utils.flop_counter.FlopCounterMode on the real
                  tensors (the first warm-up call, outside the memory window): matrix products and
                  attention only (CPU attention gets the GPU kernels' formula, registered below)
  TFLOP/s, MFU    TFLOP / time, and that over the dense bf16 peak (H100 SXM / H200 989, H100 PCIe
                  756, A100 312 TFLOP/s; other devices: --peak-tflops)
  GiB             torch.cuda.max_memory_allocated over the row (reset before it): weights included
  pred ms, GiB    the prediction for the same configuration without running it, on fake tensors
                  (FakeTensorMode: shapes only, no memory, no compute): FlopCounterMode's FLOPs /
                  (peak x --efficiency), and the peak of live tensor bytes (LiveBytes: parameters,
                  gradients, activations, temporaries; no allocator rounding, no library workspace)
  full model      FLUX.1-dev's 19 + 38 blocks at the same batch, affine in the block counts: this
                  row's prediction + 17 x (one more double block) + 34 x (one more single block), both
                  increments counted on fake tensors (exact for FLOPs). ms = measured ms x full TFLOP /
                  measured TFLOP (the same achieved TFLOP/s: every block has the same shapes);
                  GiB = measured GiB + (full pred GiB - pred GiB): the measured overhead (allocator,
                  cuBLAS workspace) is kept, the extra blocks' parameters, gradients and activations
                  come from the prediction. Extrapolated, not measured. One GPU, no FSDP: bf16
                  parameters and bf16 gradients (train.py's FSDP holds fp32 shards instead).

Table 2, the PPO ratio at the first update (--T steps, M = the first T/2, eta 0.7, clip 1e-4): the
project's rollout (singular_rollout with --drift-G branches; Lambda = {T}, one x0-prediction per
branch, as the continuations do not touch the log-probs) gives the old log-probs, computed from the
anchor's batch-1 no-grad call at x_k; the training forward at the same weights re-scores them with
gradients enabled (activation checkpointing on, which does not change the forward's arithmetic),
at batch 1 (rescore, as train.update does) and batched over the |M| states x_k (one pass).
Reported: max and mean |r - 1| over the (|M|, G) ratios, the share outside the clip range, and
max |v_train - v_rollout|. fp32 = the weights in fp32, bf16 = the same (bf16-valued) weights in
bf16; each precision's rollout and training run in that precision.

Extras (--extras): the B = 12 rollout call under each SDPA backend (flash, efficient, cuDNN, math)
and with torch.compile of the transformer (compile time in wall s), and B = 96 (|M| x G: the first
depth if the rollout batched across the SDE steps k; later depths reach |M| x G x |Lambda| = 288,
--rollout-batches 1,12,36,288).

Time: the rows' GPU work is ~5 PFLOP (seconds); the predictions run on the CPU, a few seconds per row.
Not yet run on a GPU by us: ~1.5 min on an H100 with imports and model build is an estimate;
--extras adds the compile (~1 min).

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
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count
from torch.utils.weak import WeakIdKeyDictionary

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from loss import g2rpo_loss  # noqa: E402
from rollout import Group, rescore, rescore_groups, singular_rollout  # noqa: E402
from sde import sde_step, sigma_grid  # noqa: E402

FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))  # black-forest-labs/FLUX.1-dev transformer/config.json
TINY = dict(FLUX_DEV, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=32,
            axes_dims_rope=(4, 6, 6))
PEAK_BF16 = [("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0)]  # dense, TFLOP/s
CLIP_RANGE, ETA, GUIDANCE = 1e-4, 0.7, 3.5  # Table 4

# CPU attention (_scaled_dot_product_flash_attention_for_cpu) has no formula in torch's FLOP counter:
# give it the one the GPU kernels use, so CPU and GPU counts agree.
_cpu = torch.ops.aten
if hasattr(_cpu, "_scaled_dot_product_flash_attention_for_cpu"):
    from torch.utils.flop_counter import flop_registry
    if _cpu._scaled_dot_product_flash_attention_for_cpu not in flop_registry:
        @register_flop_formula(_cpu._scaled_dot_product_flash_attention_for_cpu)
        def _cpu_sdpa_flop(q, k, v, *args, out_shape=None, **kwargs):
            return sdpa_flop_count(q, k, v)

        @register_flop_formula(_cpu._scaled_dot_product_flash_attention_for_cpu_backward)
        def _cpu_sdpa_backward_flop(grad_out, q, k, v, *args, out_shape=None, **kwargs):
            return sdpa_backward_flop_count(grad_out, q, k, v)


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
    p.add_argument("--extras", action="store_true", help="attention backends, torch.compile, B = 96")
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
    if given:
        return given
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        return next((peak for key, peak in PEAK_BF16 if key in name), None)
    return None


# ---------------------------------------------------------------- the model, through the policy
@contextmanager
def default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_policy(cfg, dev, dtype, size, text_len):
    """FluxPolicy around FluxTransformer2DModel(**cfg), built on `dev` in `dtype` (real or fake tensors)."""
    from diffusers import FluxTransformer2DModel

    from policy.flux import FluxPolicy
    with default_dtype(dtype), torch.device(dev):
        transformer = FluxTransformer2DModel(**cfg).eval()
    return FluxPolicy("random-init", transformer, vae_stand_in(), size, size, text_len, GUIDANCE, device=dev,
                      dtype=dtype)


@functools.cache
def vae_stand_in():
    """FLUX's VAE as FluxPolicy sees it (16 latent channels, 8x downsampling), 8 wide, on the CPU: FluxPolicy
    reads its config; nothing here decodes."""
    from diffusers import AutoencoderKL
    with unset_fake_temporarily(), torch.device("cpu"):  # real, even when first asked for under FakeTensorMode
        vae = AutoencoderKL(latent_channels=16, block_out_channels=(8,) * 4, norm_num_groups=4, layers_per_block=1,
                            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
    return vae.eval()


def random_cond(policy, cfg, gen=None):
    from policy.flux import Cond
    dev = policy.device
    enc = torch.randn(1, policy.max_sequence_length, cfg["joint_attention_dim"], generator=gen)  # (1, S, 4096)
    pooled = torch.randn(1, cfg["pooled_projection_dim"], generator=gen)  # (1, 768)
    return Cond(enc.to(dev, torch.bfloat16), pooled.to(dev, torch.bfloat16))  # bf16 values, as the cache stores


def rescore_batched(v, groups, sigmas, eta=ETA):
    """(|M|, G) log-probs of every group's G next states from ONE forward at its |M| shared states x_k
    (one-pass training, train.py --rescore-batch 0): rollout.rescore_groups, stacked."""
    return torch.stack(rescore_groups(v, groups, sigmas, eta))


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
    """The zero-argument call a row times. kind 'rollout': v(x, t), B rows, no grad. kind 'train': the
    training step at B shared states. On fake tensors (real=False) the training step's SDE log-prob and
    loss are replaced by a square of the velocity: sde_step checks its std on the data, which fake
    tensors cannot do; FlopCounterMode counts neither (elementwise), and their tensors are (G, L, C)."""
    v = policy.velocity(cond, transformer)
    net = policy.transformer if transformer is None else transformer
    if kind == "rollout":
        x = policy.noise(B, generator=torch.Generator().manual_seed(seed) if real else None)  # (B, L, C) fp32
        t = torch.linspace(0.95, 0.05, B, device=policy.device)  # per-row t, as in the batched continuations

        def call():
            with torch.no_grad():
                return v(x, t)
        return call
    if not real:
        x = policy.noise(B)
        t = torch.linspace(0.95, 0.05, B, device=policy.device)

        def fake_step():
            net.zero_grad(set_to_none=True)
            v(x, t).square().mean().backward()
        return fake_step
    groups, sigmas = make_groups(policy, v, B, G, T, seed)
    A = torch.randn(B, G, generator=torch.Generator().manual_seed(seed)).to(policy.device)  # (B, G)

    def step():
        net.zero_grad(set_to_none=True)
        logp = rescore(v, groups[0], sigmas, ETA)[None] if B == 1 else rescore_batched(v, groups, sigmas)
        loss, _ = g2rpo_loss(logp, torch.stack([g.log_prob for g in groups]), A, CLIP_RANGE)
        loss.backward()
    return step


# ---------------------------------------------------------------- measurement and prediction
def measure(call, dev, warmup, repeats, count=True):
    """{sec (median), sec_min, flops (FlopCounterMode on the first warm-up call; None unless count),
    peak_gib (CUDA only)}. The counted call stays outside the memory window: FlopCounterMode keeps the
    activations that checkpointing recomputes alive until it exits (torch 2.14), ~3x the true peak."""
    cuda = dev.type == "cuda"
    counter = FlopCounterMode(display=False)
    with counter if count else nullcontext():
        call()
    gc.collect()
    if cuda:
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    for _ in range(warmup - 1):
        call()
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if cuda else None
    flops = counter.get_total_flops() if count else None
    by_op = {str(op): n for op, n in counter.get_flop_counts().get("Global", {}).items()} if count else None
    return {"sec": statistics.median(times), "sec_min": min(times), "flops": flops, "flops_by_op": by_op,
            "peak_gib": peak}


class LiveBytes(TorchDispatchMode):
    """Peak bytes of live tensor storages: each storage an op returns counts once, until it is freed.
    The peak torch.distributed._tools.MemTracker reports (within 3 % on the tiny model), without the
    per-module snapshots that make MemTracker several times slower here."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.known = WeakIdKeyDictionary()

    def add(self, *tensors):
        for t in tensors:
            storage = t.untyped_storage()
            if storage not in self.known:
                self.known[storage] = n = storage.nbytes()
                self.live += n
                weakref.finalize(storage, self._free, n)
        self.peak = max(self.peak, self.live)

    def _free(self, n):
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.add(*(t for t in tree_leaves(out) if isinstance(t, torch.Tensor)))
        return out


def predict(cfg, dev, kind, B, a, checkpointing=False):
    """{flops, gib}: the same row on fake tensors (FakeTensorMode: no memory, no compute): its peak of live
    tensor bytes (parameters, gradients, activations, temporaries), then in a second call (see measure) its
    FLOPs by FlopCounterMode."""
    with FakeTensorMode():
        policy = build_policy(cfg, dev, torch.bfloat16, a.size, a.text_len)
        if checkpointing:
            policy.transformer.enable_gradient_checkpointing()
        live = LiveBytes()
        live.add(*policy.transformer.parameters(), *policy.transformer.buffers())
        with live:
            call = row_call(policy, random_cond(policy, cfg), kind, B, a.G, a.T, real=False)
            call()
        with FlopCounterMode(display=False) as counter:
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


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def timing_rows(policy, cond, cfg, dev, peak, a):
    specs = [("rollout", B, False) for B in a.rollout_batches] + [("train", B, False) for B in a.train_batches]
    specs.append(("train", max(a.train_batches), True))
    rows, t0, pred_dev = [], time.time(), dev
    for kind, B, ckpt in specs:
        if ckpt:
            policy.transformer.enable_gradient_checkpointing()
        r = {"name": f"{kind} B={B}" + (" +AC" if ckpt else ""), "kind": kind, "batch": B, "checkpointing": ckpt}
        try:
            r.update(measure(row_call(policy, cond, kind, B, a.G, a.T, seed=a.seed), dev, a.warmup, a.repeats))
        except torch.OutOfMemoryError:  # a smaller GPU: keep the prediction, say what did not fit
            r.update(sec=None, flops=None, peak_gib=None, error="out of memory")
        policy.transformer.disable_gradient_checkpointing()
        policy.transformer.zero_grad(set_to_none=True)
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        try:
            pred = predict(cfg, pred_dev, kind, B, a, ckpt)
        except Exception as e:  # fake tensors of this device type need its driver; the CPU's never do
            if pred_dev.type == "cpu":
                raise
            print(f"  fake {pred_dev.type} tensors failed ({type(e).__name__}: {str(e).strip()[:80]}); "
                  "predicting on fake CPU tensors", flush=True)
            pred_dev = torch.device("cpu")
            pred = predict(cfg, pred_dev, kind, B, a, ckpt)
        r.update(pred_flops=pred["flops"], pred_gib=pred["gib"], pred_device=pred_dev.type)
        r.update(derived(r, peak, a.efficiency))
        if not a.no_full:
            full = predict_full(cfg, pred_dev, kind, B, a, ckpt, pred)
            r["full_flops"] = full["flops"]
            r["full_sec"] = r["sec"] * full["flops"] / r["flops"] if r["sec"] else None
            r["full_gib"] = full["gib"] + (r["peak_gib"] - pred["gib"] if r["peak_gib"] is not None else 0.0)
        rows.append(r)
        print(f"  {r['name']:<16} {fmt(r['sec'] and 1e3 * r['sec'], '9.1f')} ms  "
              f"{fmt(r['flops'] and r['flops'] / 1e12, '9.3g')} TFLOP  {fmt(r['peak_gib'], '.3g')} GiB  "
              f"(predicted {fmt(r['pred_sec'] and 1e3 * r['pred_sec'], '.1f')} ms, {pred['gib']:.3g} GiB; "
              f"{time.time() - t0:.0f} s)", flush=True)
    return rows


def derived(r, peak, efficiency):
    tflops_s = r["flops"] / r["sec"] / 1e12 if r["sec"] else None
    return {"tflops_s": tflops_s, "mfu": tflops_s / peak if peak and tflops_s else None,
            "pred_sec": r["pred_flops"] / (peak * 1e12 * efficiency) if peak else None}


# ---------------------------------------------------------------- the PPO ratio at the first update
def drift(model_bf16, cfg, dev, a):
    """Table 2, in fp32 (a copy of the weights) and in bf16."""
    out = []
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        try:
            model = model_bf16 if dtype == torch.bfloat16 else copy.deepcopy(model_bf16).float()
            out += drift_in(model, dtype, cfg, dev, a)
            print(f"  {name}: max |r - 1| {out[-2]['ratio_drift_max']:.3g} at batch 1, "
                  f"{out[-1]['ratio_drift_max']:.3g} at batch {a.T // 2}", flush=True)
        except torch.OutOfMemoryError:  # the fp32 copy and its forward with gradients need ~3x the bf16 model
            out.append({"precision": name, "error": "out of memory"})
        model = None
        model_bf16.disable_gradient_checkpointing()
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return out


def drift_in(model, dtype, cfg, dev, a):
    """Old log-probs from singular_rollout, new ones from the training forward at the same weights (batch 1 and
    batch |M|): two rows of Table 2."""
    from policy.flux import FluxPolicy
    sigmas, M = sigma_grid(a.T), list(range(a.T // 2))
    policy = FluxPolicy("random-init", model, vae_stand_in(), a.size, a.size, a.text_len, GUIDANCE, device=dev,
                        dtype=dtype)
    cond = random_cond(policy, cfg, torch.Generator().manual_seed(a.seed + 1))
    v_roll, seen_roll = recorded(policy.velocity(cond))
    x_T = policy.noise(1, generator=torch.Generator().manual_seed(a.seed + 2))  # (1, L, C)
    ro = singular_rollout(v_roll, x_T, sigmas, M, a.drift_G, Lambda=(a.T,), eta=ETA,
                          generator=torch.Generator(dev).manual_seed(a.seed + 3))
    old = torch.stack([g.log_prob for g in ro.groups])  # (|M|, G) from the anchor's batch-1 calls
    v_old = torch.cat(seen_roll[:len(M)])  # the anchor's velocities at x_k, k in M (its first T calls)
    A = torch.zeros_like(old)  # the ratio does not depend on the advantages
    model.enable_gradient_checkpointing()  # less memory; the forward's arithmetic is unchanged
    v_train, seen = recorded(policy.velocity(cond))  # gradients on: the parameters require grad
    new_1 = torch.stack([rescore(v_train, g, sigmas, ETA).detach() for g in ro.groups])  # batch 1, one per k
    new_M = rescore_batched(v_train, ro.groups, sigmas).detach()  # batch |M|, one pass
    rows = []
    for batch, new, v_new in ((1, new_1, torch.cat(seen[:len(M)])), (len(M), new_M, seen[len(M)])):
        _, diag = g2rpo_loss(new, old, A, CLIP_RANGE)
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


# ---------------------------------------------------------------- extras
def extras(policy, cond, dev, peak, a):
    """The B = 12 rollout call per SDPA backend and compiled (FLOPs taken from the eager call), and B = 96."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    rows, flops12 = [], None

    def add(name, B, run, transformer=None):
        nonlocal flops12
        try:
            t0 = time.perf_counter()
            r = {"name": name, "batch": B}
            r.update(run(row_call(policy, cond, "rollout", B, a.G, a.T, transformer=transformer, seed=a.seed)))
            r["wall_sec"] = time.perf_counter() - t0
            r["flops"] = r["flops"] or flops12
            flops12 = flops12 or (r["flops"] if B == 12 else None)
            r["tflops_s"] = r["flops"] / r["sec"] / 1e12
            r["mfu"] = r["tflops_s"] / peak if peak else None
        except Exception as e:  # a backend that this device or these shapes do not support
            r = {"name": name, "batch": B, "error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:100]}"}
        rows.append(r)
        print(f"  {name:<26} " + (f"{1e3 * r['sec']:9.1f} ms" if "sec" in r else r["error"]), flush=True)

    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                          ("cudnn", SDPBackend.CUDNN_ATTENTION), ("math", SDPBackend.MATH)):
        def run(call, backend=backend):
            with sdpa_kernel(backend):
                return measure(call, dev, a.warmup, a.repeats)
        add(f"rollout B=12 sdpa {name}", 12, run)

    def compiled_run(call):  # the first call compiles (its time is in wall s); FlopCounterMode stays out of it
        call()
        return measure(call, dev, a.warmup, a.repeats, count=False)
    add("rollout B=12 torch.compile", 12, compiled_run, torch.compile(policy.transformer))
    add("rollout B=96 (M x G)", 96, lambda call: measure(call, dev, a.warmup, a.repeats))
    return rows


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
    if res.get("extras"):
        lines += ["", "| extra (no-grad rollout call) | ms | TFLOP/s | MFU | GiB | wall s |",
                  "|---|---|---|---|---|---|"]
        for r in res["extras"]:
            if "error" in r:
                lines.append(f"| {r['name']} | {r['error'].replace('|', '/')} | | | | |")
            else:
                lines.append(f"| {r['name']} | {1e3 * r['sec']:.4g} | {r['tflops_s']:.3g} | {fmt(r['mfu'], '.1%')} | "
                             f"{fmt(r['peak_gib'], '.3g')} | {r['wall_sec']:.1f} |")
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
    full_cfg = dict(base)
    torch.manual_seed(a.seed)
    policy = build_policy(cfg, dev, torch.bfloat16, a.size, a.text_len)
    cond = random_cond(policy, cfg, torch.Generator().manual_seed(a.seed))
    with FakeTensorMode():
        full_params = n_params(build_policy(full_cfg, "cpu", torch.bfloat16, a.size, a.text_len).transformer)
    cuda = dev.type == "cuda"
    name = torch.cuda.get_device_name(dev) if cuda else platform.processor() or "cpu"
    res = {"device": str(dev), "device_name": name,
           "device_gib": torch.cuda.get_device_properties(dev).total_memory / 2**30 if cuda else None,
           "peak_tflops": peak, "efficiency": a.efficiency, "config": cfg, "blocks": f"{a.double} + {a.single}",
           "params": n_params(policy.transformer), "full_params": full_params, "tokens": policy.img_ids.shape[0],
           "text_len": a.text_len, "size": a.size, "G": a.G, "T": a.T, "drift_G": a.drift_G,
           "torch": torch.__version__, "diffusers": diffusers.__version__, "cuda": torch.version.cuda,
           "rows": [], "drift": []}
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
    res["drift"] = drift(policy.transformer, cfg, dev, a)
    save()
    if a.extras:
        print("gpu_check: extras", flush=True)
        res["extras"] = extras(policy, cond, dev, peak, a)
        save()
    print("\n" + markdown(res) + f"\nwritten: {out / 'results.json'}, {out / 'results.md'}")
    return res

if __name__ == "__main__":
    main()

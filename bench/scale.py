"""Will the paper's setting fit, and how long will it take? One G2RPO iteration of FLUX.1-dev, simulated.

    make bench-scale                                   # world sizes 8 and 16 in parallel, ~3.5 min of CPU each
    python bench/scale.py --worlds 8 16 --out runs/bench-scale/results.md

What is simulated: one rank of `torchrun --nproc_per_node W train.py --model FLUX.1-dev` (Table 4: T = 16,
G = 12, M = the first 8 steps, Lambda = {1, 2, 3}, 720x720, one prompt per GPU), run through the
project's own code on FAKE tensors (torch FakeTensorMode: shapes, dtypes and devices, no data, no compute)
with a fake process group of W ranks (collectives return at once). Random init from the real configs:
FLUX.1-dev's transformer (19 + 38 blocks, 24 heads x 128, 11.9 B parameters), its VAE, T5-XXL and CLIP-L
for the encoding, open_clip ViT-H-14 for HPS. The code path: `train.load_model` (built on the meta device, each
rank filling its own shard; the weights it reads are fake bf16 tensors, FakeWeights), `train.shard_model` (FSDP2
per block + root, bf16 MixedPrecisionPolicy; at world size 1 under LoRA the plain model), `train.Gathered` +
`train.sample_prompt` (rollout.singular_rollout, decode, reward), `train.update` (rollout.rescore +
loss.g2rpo_loss + backward per k), `train.clip_and_step` (AdamW), and the checkpoint's state dict
(`get_state_dict`, as launch.checkpoints.save).

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
import tempfile
import time
from collections import Counter
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from launch import checkpoints  # noqa: E402
from policy.lora import trainable  # noqa: E402
aten = torch.ops.aten
GiB = 2**30

# ------------------------------------------------------------------------------------------------
# The models (diffusers / transformers / open_clip configs of the released checkpoints)
# ------------------------------------------------------------------------------------------------
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
FLUX_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
                use_quant_conv=False, use_post_quant_conv=False)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, projection_dim=768)


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


# ------------------------------------------------------------------------------------------------
# The GPUs and what we assume of them
# ------------------------------------------------------------------------------------------------
# dense peak FLOP/s by compute dtype (H100 SXM = H200: same GH100 chip). fp32 matmuls run on the CUDA
# cores (PyTorch leaves TF32 off for matmul); fp32 convolutions use TF32 (cuDNN's default is on).
PEAK = {"bf16": 989e12, "tf32": 494e12, "fp32": 67e12}
GPUS = {"H100": dict(bw=3.35e12, mem_gib=78.0), "H200": dict(bw=4.8e12, mem_gib=139.0)}  # usable after CUDA context
MFU = 0.40  # share of peak that large bf16 matmuls and flash attention reach in practice (FSDP trainers report 35-50 %)
BW_EFF = 0.70  # share of HBM bandwidth that elementwise kernels reach
RESERVE_GIB = 4.0  # NCCL buffers and allocator fragmentation, on top of what the tracker counts
NVLINK = 300e9  # bytes/s per GPU that an intra-node ring all-gather / reduce-scatter reaches (NVLink 4: 450 GB/s/dir)
IB = 40e9  # bytes/s per GPU across nodes (one 400 Gb/s NIC per GPU, ~80 %)
DISK = 2e9  # bytes/s per GPU written by a checkpoint (shared file system)


def _ensure_cpu_attention_flops():
    """FlopCounterMode knows the CUDA attention kernels; on fake CPU tensors SDPA dispatches to the CPU flash
    kernel, which has the same FLOPs: give it the same formulas."""
    from torch.utils.flop_counter import flop_registry
    pairs = [(aten._scaled_dot_product_flash_attention_for_cpu, aten._scaled_dot_product_flash_attention),
             (aten._scaled_dot_product_flash_attention_for_cpu_backward,
              aten._scaled_dot_product_flash_attention_backward)]
    for cpu, cuda in pairs:
        flop_registry.setdefault(cpu, flop_registry[cuda])


_ensure_cpu_attention_flops()


# ------------------------------------------------------------------------------------------------
# Counting: FLOPs, bytes, collectives, roofline time (Meter); memory by phase (Recorder)
# ------------------------------------------------------------------------------------------------
def _tensors(tree):
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _nbytes(t):
    return t.numel() * t.element_size()


class Meter(TorchDispatchMode):
    """Per op: FLOPs (flop_counter's formulas, as FlopCounterMode), bytes of inputs and outputs, the bytes of
    each collective (all_gather: the gathered output; reduce_scatter: the full input; all_reduce: the
    tensor), and the roofline seconds on each GPU. On fake tensors, .item() answers 1 (bool: True): AdamW's step
    count needs a number, sde.sde_step's check that the noise is > 0 needs True."""

    def __init__(self):
        super().__init__()
        self.n = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.distributed.tensor import DTensor
        from torch._subclasses.fake_tensor import FakeTensor
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented  # DTensor first desugars into ops on the local shards
        kwargs = kwargs or {}
        if func is aten._local_scalar_dense.default and isinstance(args[0], FakeTensor):
            return True if args[0].dtype == torch.bool else 1
        out = func(*args, **kwargs)
        name = func.name()
        if name.startswith(("c10d::", "_c10d_functional::")):
            kind = next((k for k in ("all_gather", "allgather", "reduce_scatter", "allreduce", "all_reduce")
                         if k in name), "other")
            kind = {"allgather": "all_gather", "allreduce": "all_reduce"}.get(kind, kind)
            self.n[f"comm_{kind}"] += max(map(_nbytes, _tensors((args, out))), default=0)
            return out
        from torch.utils.flop_counter import flop_registry
        packet = func._overloadpacket
        flops = flop_registry[packet](*args, **kwargs, out_val=out) if packet in flop_registry else 0
        moved = 0 if func.is_view else sum(map(_nbytes, _tensors((args, kwargs, out))))
        self.n["flops"] += flops
        self.n["bytes"] += moved
        dtype = next((t.dtype for t in _tensors(args) if t.is_floating_point()), torch.float32)
        peak = PEAK["bf16"] if dtype in (torch.bfloat16, torch.float16) else \
            PEAK["tf32"] if packet is aten.convolution else PEAK["fp32"]
        for gpu, spec in GPUS.items():
            self.n[f"sec_{gpu}"] += max(flops / (MFU * peak), moved / (BW_EFF * spec["bw"]))
        return out


def _peak_total(tracker) -> int:
    """A MemTracker's peak bytes on the device (the meta device's, where models are built, aside)."""
    return max([s["Total"] for d, s in tracker.get_tracker_snapshot("peak").items() if d.type != "meta"] or [0])


def _proc_status(key: str) -> int:
    """Bytes of a /proc/self/status entry (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak_rss() -> int:
    """Restart the kernel's peak-RSS counter (VmHWM, Linux >= 4.0); returns the resident set now."""
    Path("/proc/self/clear_refs").write_text("5")
    return _proc_status("VmRSS")


class _NoHook:
    def remove(self):
        pass


def plain_tracker(model):
    """MemTracker for a model that FSDP does not wrap (world size 1 under LoRA, train.shard_model), counting what
    FSDPMemTracker counts for one it wraps: the model's parameters (kind "Parameter"), gradients and optimizer state,
    and every activation, but not the weights of other modules (the VAE, the reward: FSDPMemTracker leaves them out
    too). Two more changes: a frozen parameter gets no gradient hook (MemTracker would register one and fail), and a
    module called again at the top level is a repeat within the iteration, not the next iteration (which MemTracker
    refuses): its statistics start over. Only the peaks by kind are kept up to date (the per-module ones, unused
    here, cost a pass over every module at every op: 20x the time on FLUX.1-dev)."""
    from torch.distributed._tools.mem_tracker import MemTracker
    mine = set(model.modules())

    class PlainTracker(MemTracker):
        def _pre_fw_hook(self, module, inputs):
            name = self._mod_tracker.get_known_fqn(module)
            if module in self.memory_tracking and not self._mod_tracker.is_bw and \
                    set(self._mod_tracker.parents) - {name} == {"Global"}:
                del self.memory_tracking[module]
            super()._pre_fw_hook(module, inputs)

        def _update_peak_stats(self, peak_state):
            for dev, snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < snap["Total"]:
                    self._peak_mem[dev], self._peak_mem_snap[dev] = snap["Total"], dict(snap)

        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            if module not in mine:
                return 0, 0
            for p in module.parameters():
                if not p.requires_grad:
                    self._param_to_grad_hook_handles.setdefault(p, (_NoHook(), _NoHook()))
            return super()._track_module_params_and_buffers(module, install_grad_hooks)
    return PlainTracker()


@dataclass
class Like:
    """What a replayed call returns: an empty tensor of this kind."""
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device


class Recorder:
    """Phases of one iteration: peak memory (FSDPMemTracker, restarted at each phase boundary) and the
    Meter's counts. A phase inside another (the optimizer step inside train.update) is its own: the outer
    one neither counts its work nor its peak. `replayed(fn)` runs fn once per input shape and replays
    the counts for repeats."""

    def __init__(self, tracker, meter, flop_counter=None, rss=False):
        self.tracker, self.meter, self.phases, self.stack = tracker, meter, {}, []
        self.flop_counter, self.rss = flop_counter, rss  # cross-checks on real tensors (tests/test_scale.py)
        self.calls = {}  # label -> {input signature: counts of one call}

    def _current(self):
        snap = self.tracker.get_tracker_snapshot("current")
        return next(iter(snap.values()), {"Total": 0})

    def _fold(self):
        """Take the tracker's peak since the last restart into the running phase, restart it at now.
        (MemTracker keeps one running peak; its private fields are the only way to restart it.)"""
        peak = next(iter(self.tracker.get_tracker_snapshot("peak").values()), {"Total": 0})
        if self.stack and (self.stack[-1]["peak"] is None or peak["Total"] > self.stack[-1]["peak"]["Total"]):
            self.stack[-1]["peak"] = peak
        self.tracker._peak_mem_snap = self.tracker.get_tracker_snapshot("current")
        self.tracker._peak_mem = {d: s["Total"] for d, s in self.tracker._peak_mem_snap.items()}

    @contextmanager
    def phase(self, name, scale=1.0, note=""):
        self._fold()
        frame = dict(peak=None, bound=0, before=Counter(self.meter.n), inner=Counter(), start=self._current()["Total"])
        if self.flop_counter is not None:
            frame["before"]["flop_counter"] = self.flop_counter.get_total_flops()
        if self.rss:
            frame["rss_start"] = _reset_peak_rss()
        self.stack.append(frame)
        t0 = time.time()
        try:
            yield
        finally:
            self._fold()
            self.stack.pop()
        now = Counter(self.meter.n)
        if self.flop_counter is not None:
            now["flop_counter"] = self.flop_counter.get_total_flops()
        spent = Counter({k: v - frame["before"][k] for k, v in now.items()})
        if self.stack:
            self.stack[-1]["inner"].update(spent)
        counts = {k: (v - frame["inner"][k]) * scale for k, v in spent.items()}
        peak = {str(getattr(k, "value", k)): v for k, v in frame["peak"].items()}
        if frame["bound"] > peak["Total"]:  # a replayed call on a higher base than when it ran
            peak["Activation"] = peak.get("Activation", 0) + frame["bound"] - peak["Total"]
            peak["Total"] = frame["bound"]
        self.phases[name] = dict(peak=peak, start_bytes=frame["start"], **counts, note=note,
                                 sim_seconds=round(time.time() - t0, 1))
        if self.rss:  # measured: this process's resident set, its peak since the phase began
            self.phases[name].update(rss_start=frame["rss_start"], rss_peak=_proc_status("VmHWM"))

    def wrap(self, name, fn, **kw):
        def wrapped(*a, **k):
            with self.phase(name, **kw):
                return fn(*a, **k)
        return wrapped

    def replayed(self, fn, key, label, replay=True):
        memo = self.calls.setdefault(label, {})

        def call(*a, **k):
            sig = key(*a, **k)
            if replay and sig in memo:
                counts, excess, like = memo[sig]
                # a repeat under train.Gathered finds the parameters resident: no collective
                self.meter.n.update({k: v for k, v in counts.items() if not k.startswith("comm_")})
                self.stack[-1]["bound"] = max(self.stack[-1]["bound"], self._current()["Total"] + excess)
                return tree_map(lambda s: torch.empty(s.shape, dtype=s.dtype, device=s.device)
                                if isinstance(s, Like) else s, like)
            self._fold()
            start, before = self._current()["Total"], Counter(self.meter.n)
            out = fn(*a, **k)
            peak = self.tracker.get_tracker_snapshot("peak")
            excess = next(iter(peak.values()), {"Total": start})["Total"] - start
            like = tree_map(lambda t: Like(t.shape, t.dtype, t.device) if isinstance(t, torch.Tensor) else t, out)
            memo.setdefault(sig, ({k: v - before[k] for k, v in self.meter.n.items()}, excess, like))
            return out
        return call


# ------------------------------------------------------------------------------------------------
# One rank of one iteration
# ------------------------------------------------------------------------------------------------
class Caller(torch.nn.Module):
    """Calls the FSDP root from outside it: FSDPMemTracker refuses a second call of a root module, but
    allows a submodule called many times (the rollout calls the transformer 108 times)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, *a, **k):
        return self.model(*a, **k)


@contextmanager
def checks_pass():
    """Fake tensors hold no values, so a check on them cannot be evaluated. train.all_true (every rank
    finite?): run its collective, answer True. torchvision's normalize refuses std == 0 with
    (std == 0).any(), which Meter answers True: the same arithmetic without the check."""
    import torchvision.transforms.functional as TF
    import train
    orig_all_true, orig_normalize = train.all_true, TF.normalize
    train.all_true = lambda flag: orig_all_true(flag) or True
    TF.normalize = lambda x, mean, std: (x - x.new_tensor(mean)[:, None, None]) / x.new_tensor(std)[:, None, None]
    try:
        yield
    finally:
        train.all_true, TF.normalize = orig_all_true, orig_normalize


@contextmanager
def real_meshes():
    """init_device_mesh reads its rank map with .tolist(): build meshes outside fake mode."""
    import torch.distributed.device_mesh as dm
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    orig = dm.init_device_mesh

    def init(*a, **k):
        with unset_fake_temporarily():
            return orig(*a, **k)
    dm.init_device_mesh = init
    try:
        yield
    finally:
        dm.init_device_mesh = orig


def build_reward(s: Setting, device):
    """The HPS reward: rewards.clip.OpenClipReward as load_hps makes it (open_clip ViT-H-14, fp32)."""
    import open_clip
    from rewards.clip import OPENAI_MEAN, OPENAI_STD, OpenClipReward
    with torch.device(device):
        # open_clip.create_model(name) = CLIP(**its config), then .to(device), which fake parameters refuse
        clip = open_clip.CLIP(**open_clip.get_model_config(s.reward)) if isinstance(s.reward, str) else s.reward
    tok = open_clip.get_tokenizer(s.reward if isinstance(s.reward, str) else "ViT-B-32")
    clip.to = lambda *a, **k: clip  # already there, in fp32; .to() cannot swap fake parameters
    hps = OpenClipReward("hps", clip, tok, s.reward_size, OPENAI_MEAN, OPENAI_STD, "longest", "bicubic", device)
    del clip.to
    return hps


class FakeWeights:
    """FLUX.1-dev's weight files as policy.flux.load_transformer reads them (WeightFiles' .config and .read): each
    part this rank reads is a new bf16 tensor (the released files are bf16) of its shape, random (N(0, 0.02)) so
    that real tensors (tests/test_scale.py) compute finite numbers."""

    def __init__(self, config: dict):
        self.config = config

    def read(self, items):
        for key, index, shape in items:
            yield key, torch.empty([i.stop - i.start for i in index], dtype=torch.bfloat16).normal_(0, 0.02)


def build_policy(s: Setting, device):
    """The policy as train.set_up builds it: train.load_model (the transformer on the meta device, under LoRA its
    fp32 adapters (policy.lora.add_lora) on a bf16 base, sharded by train.shard_model (not at world size 1 under
    LoRA), then this rank's part read from FakeWeights and cast to its dtype), and the VAE."""
    from diffusers import AutoencoderKL
    import train
    from policy.flux import FluxPolicy
    dtype = torch.bfloat16 if s.lora_rank else torch.float32
    a = replace(train.Args(), lora_rank=s.lora_rank, lora_alpha=2 * s.lora_rank, mixed_precision="bf16")
    to = torch.nn.Module.to  # peft casts each new adapter to the base's dtype with .to(), which cannot swap tracked
    torch.nn.Module.to = lambda self, *a, **k: self  # fake parameters: they stay fp32, as add_lora leaves them
    try:
        transformer = train.load_model(a, FakeWeights(s.transformer), torch.device(device), dtype).eval()
    finally:
        torch.nn.Module.to = to
    with torch.device(device):
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # built in its dtype (.to() cannot swap tracked fake parameters)
        try:
            vae = AutoencoderKL(**s.vae).eval()
        finally:
            torch.set_default_dtype(default)
        policy = FluxPolicy(Path(tempfile.gettempdir()) / "scale-sim", transformer, vae, s.height, s.width,
                            s.seq_len, 3.5, device=device, dtype=dtype, embed_dtype=torch.bfloat16)
    return policy, transformer


def encode(s: Setting, device, dtype=torch.float32):
    """The prompt encoding as policy.flux.FluxPolicy.encode_prompts runs it (T5-XXL and CLIP-L in the policy's
    dtype, batch 1, then freed) -> the stored Cond in bf16. In bf16 T5's `wo` layers stay fp32, as from_pretrained
    keeps them."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel
    from policy.flux import Cond
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built on the device in its dtype (.to() cannot swap tracked fake parameters)
    try:
        with torch.device(device):
            t5 = T5EncoderModel(T5Config(**s.t5)).eval()
            clip_text = CLIPTextModel(CLIPTextConfig(**s.clip_text)).eval()
            for name, m in t5.named_modules():
                if dtype != torch.float32 and name.rsplit(".", 1)[-1] in T5EncoderModel._keep_in_fp32_modules:
                    m.weight = torch.nn.Parameter(m.weight.float(), requires_grad=m.weight.requires_grad)
    finally:
        torch.set_default_dtype(default)
    with torch.no_grad():
        seq = t5(torch.zeros(1, s.seq_len, dtype=torch.long, device=device))[0]  # (1, S, D)
        pooled = clip_text(torch.zeros(1, 77, dtype=torch.long, device=device)).pooler_output  # (1, P)
    del t5, clip_text
    return Cond(seq.bfloat16(), pooled.bfloat16())


def train_phases(rec, tracker, policy, caller, optim, sampled, A, a, device, full, checkpointing):
    """Lines 24-26 of one iteration, each as a phase of `rec`: the per-k update (one k run, its counts x |M|, with
    an earlier k's gradients present, unless `full`) and the one-pass update, without and with activation
    checkpointing. Returns the per-k update's statistics."""
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
                tracker._update_and_maybe_create_winfos(*kind, True)
        step = train.clip_and_step
        train.clip_and_step = rec.wrap(f"optimizer step{tag}", step, note="clip_grad_norm_ + AdamW")
        try:
            one = replace(sampled, rollout=replace(sampled.rollout, groups=sampled.rollout.groups[:1]))
            with rec.phase(f"train per-k{tag}", scale=1 if short else n,
                           note=f"{n} x (forward+backward, batch 1)" + ("" if short else ": 1 run, counts x n")):
                stats = train.update(policy, caller, optim, [sampled if short else one],
                                     [A if short else A[:1]], a, device)
        finally:
            train.clip_and_step = step
        with rec.phase(f"train one-pass{tag}", note=f"1 x (forward+backward, batch {n}): train.update "
                       "--rescore-batch 0, its optimizer step included"):
            train.update(policy, caller, optim, [sampled], [A], replace(a, rescore_batch=0), device)
        optim.zero_grad(set_to_none=True)
    return stats


def simulate(s: Setting, fake: bool = True, full: bool = False, checkpointing=(False, True), flop_counter=None,
             rss=False) -> dict:
    """One rank of one iteration, phase by phase. Needs an initialised process group (fake or real).
    On real tensors (fake=False, tests) `flop_counter` (a FlopCounterMode, entered) and `rss` add
    independent measurements to every phase."""
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.distributed.checkpoint.state_dict import get_state_dict
    import train
    from advantage import mixed_advantage

    device = "cpu"
    a = replace(train.Args(), G=s.G, T=s.T, Lambda=tuple(s.Lambda), sde_steps=tuple(s.M))
    meter = Meter()
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else nullcontext()
    with fake_mode, real_meshes(), checks_pass() if fake else nullcontext(), meter:
        # load (train.load_model): each rank materialises its shard only, then reads its rows block by block
        hps = build_reward(s, device)
        load = MemTracker()
        load.track_external(hps.model)
        with load:
            policy, model = build_policy(s, device)
        load_peak = _peak_total(load)
        caller = Caller(model)
        optim = torch.optim.AdamW(trainable(model), lr=a.lr, weight_decay=a.weight_decay, betas=(0.9, 0.999), eps=1e-8)
        sharded = isinstance(model, FSDPModule)  # not at world size 1 under LoRA (train.shard_model)
        if sharded:
            tracker = FSDPMemTracker(model, optim)
            tracker.track_external(policy.vae, hps.model, policy.img_ids)
        else:
            tracker = plain_tracker(model)
            tracker.track_external(model, optim)
        rec = Recorder(tracker, meter, flop_counter, rss)
        with tracker:
            # AdamW's moments exist from iteration 2 on. The first step on DTensors also fills DTensor's
            # sharding-propagation cache, which runs each op once on global-shaped tensors: meta tensors on a
            # GPU, but fake CPU tensors here, which the tracker would count (the full fp32 model) in a phase
            for p in trainable(model):
                p.grad = torch.zeros_like(p)
            train.clip_and_step(model, optim, a, device)

            with rec.phase("encode", note=f"T5-XXL + CLIP-L in {str(policy.dtype)[6:]} (the policy's dtype), batch 1"):
                cond = encode(s, device, policy.dtype)
            prompt = "a photo of a cat"
            policy._store(prompt, cond)
            hps.text_features([prompt])
            plan = train.G2RPO(a, train.sigma_grid(a.T, a.shift).to(device))

            # lines 6-20 through train.sample_prompt, phases split at the rollout, decode and reward
            orig_rollout = plan.rollout
            plan.rollout = rec.wrap("rollout", lambda v, *r: orig_rollout(
                rec.replayed(v, key=lambda x, t: x.shape[0], label="transformer", replay=not full), *r),
                note="singular_rollout under train.Gathered (parameters gathered once)")
            policy.vae.decode = rec.replayed(policy.vae.decode, key=lambda z, **k: z.shape[0], label="vae",
                                             replay=not full)
            policy.decode = rec.wrap("decode", policy.decode, note="VAE fp32, 8 images per call")
            hps.score = rec.wrap("reward", hps.score, note="HPS (ViT-H-14 fp32, 224 px), all images in one call")
            model.eval()
            gen = torch.Generator(device).manual_seed(0)
            with train.Gathered(model):
                sampled = train.sample_prompt(plan, policy, caller, [hps], prompt, policy.noise(1, generator=gen), 0, gen)
            A = mixed_advantage(sampled.R, adv_clip=a.adv_clip)  # (|M|, G)
            del policy.decode, hps.score  # back to the methods

            # lines 24-26: per k (train.update as it is), or one pass; with and without checkpointing
            stats = train_phases(rec, tracker, policy, caller, optim, sampled, A, a, device, full, checkpointing)

            with rec.phase("checkpoint", note="get_state_dict(model, optim) as launch.checkpoints.save"):
                msd, osd = get_state_dict(model, optim, options=checkpoints.trained_only())
                ckpt_bytes = sum(_nbytes(t.to_local() if hasattr(t, "to_local") else t)
                                 for t in _tensors((msd, osd)))
    shard = sum(_nbytes(p.to_local() if hasattr(p, "to_local") else p) for p in model.parameters())
    n_trained = sum(p.numel() for p in trainable(model))
    full_bytes = sum(p.numel() * 2 for p in model.parameters())  # bf16 gathered
    return dict(world=dist.get_world_size(), lora_rank=s.lora_rank, sharded=sharded, trained=n_trained,
                phases=rec.phases, load_peak=load_peak, ckpt_bytes=ckpt_bytes,
                param_shard_bytes=shard, params=sum(p.numel() for p in model.parameters()), bf16_bytes=full_bytes,
                rollout_calls=sampled.rollout.calls, rollout_evals=sampled.rollout.evals, loss_ok=stats is not None,
                images=len(s.Lambda) * len(s.M) * s.G + 1,
                calls={label: {str(sig): c[0] for sig, c in memo.items()} for label, memo in rec.calls.items()})


def run_world(world: int, full: bool, lora_rank: int = 0) -> dict:
    """One process = one fake process group of `world` ranks; we are rank 0."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        return simulate(Setting(lora_rank=lora_rank), fake=True, full=full)
    finally:
        dist.destroy_process_group()


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


def markdown(results: list, analyses: list, args) -> str:
    """The tables of results.md."""
    gb = lambda b: f"{b / GiB:.1f}"  # noqa: E731
    lines = [f"# One G2RPO iteration of FLUX.1-dev, simulated (`python bench/scale.py`)", "",
             f"Table 4 setting: T = 16, G = 12, M = 8 steps, Lambda = {{1, 2, 3}}, 720x720, one prompt per GPU. "
             f"Per rank; memory in GiB (FSDPMemTracker on fake tensors; without FSDP MemTracker), time = roofline "
             f"at {MFU:.0%} of dense "
             f"peak (bf16 {PEAK['bf16'] / 1e12:.0f}, fp32 {PEAK['fp32'] / 1e12:.0f}, TF32 conv "
             f"{PEAK['tf32'] / 1e12:.0f} TFLOP/s) and {BW_EFF:.0%} of HBM bandwidth (H100 SXM 3.35, H200 4.8 TB/s).", ""]
    for r, a in zip(results, analyses):
        W = r["world"]
        lora = f", LoRA rank {r['lora_rank']} ({r['trained'] / 1e6:.0f} M trained parameters, frozen bf16 base)" \
            if r.get("lora_rank") else ""
        lines += [f"## World size {W}{lora}", "",
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
    p.add_argument("--worlds", type=int, nargs="*", default=[8, 16], help="world sizes (GPUs), one process each")
    p.add_argument("--lora-worlds", type=int, nargs="*", default=[1], help="world sizes simulated with LoRA")
    p.add_argument("--lora-rank", type=int, default=32, help="LoRA rank of those (alpha = 2 rank)")
    p.add_argument("--iterations", type=int, default=300, help="training iterations of the whole run")
    p.add_argument("--full", action="store_true", help="run every model call (slow) instead of replaying repeats")
    p.add_argument("--out", default="runs/bench-scale/results.md", help="markdown table; results.json beside it")
    p.add_argument("--report", action="store_true", help="only rebuild the tables from the results.json beside --out")
    p.add_argument("--world", type=int, help=argparse.SUPPRESS)  # internal: simulate one world, write --json
    p.add_argument("--json", help=argparse.SUPPRESS)
    p.add_argument("--lora", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if any(w < 1 for w in a.worlds) or a.iterations < 1:
        raise SystemExit(f"bench/scale.py: --worlds and --iterations must be >= 1, got {a.worlds} and {a.iterations}")
    if not a.out.endswith(".md"):
        raise SystemExit(f"bench/scale.py: --out {a.out}: give a .md path (results.json is written beside it)")
    return a


def main(argv=None):
    a = parse(argv)
    if a.world:  # one world in this process (a fake process group is set up once per process)
        t0 = time.process_time()
        result = run_world(a.world, a.full, a.lora_rank if a.lora else 0)
        Path(a.json).write_text(json.dumps({**result, "sim_seconds": time.process_time() - t0}, default=float))
        return
    out, t0 = Path(a.out), time.time()
    if a.report:
        if not out.with_suffix(".json").is_file():
            raise SystemExit(f"bench/scale.py: --report: no {out.with_suffix('.json')} (run without --report first)")
        results = json.loads(out.with_suffix(".json").read_text())["results"]
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
            ["--full"] * a.full + ["--lora"] * lora
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

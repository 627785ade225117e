"""How bench/scale.py runs train.py's code on fake tensors and measures it (its README: the docstring there).

  Meter          per op: FLOPs (torch.utils.flop_counter's formulas), bytes read and written, the bytes of each
                 collective, and the roofline seconds on each GPU of bench/scale.py's assumptions
  Recorder       per phase of the iteration: the peak memory by kind (FSDPMemTracker, or plain_tracker for a model
                 FSDP does not wrap) and the Meter's counts; `wrap` makes a function a phase, `replayed` runs a call
                 once per input shape
  Handed         an object handed to train.py's code with some of its methods replaced (a phase, a replay)
  the objects    train.py's own, built as train.set_up builds them where fake tensors allow: the policy through
                 train.load_model from FakeWeights (policy.weights.WeightFiles' interface), the VAE, the text encoders
                 (encode) and the HPS reward (build_reward)

Two things fake tensors cannot do are replaced for the duration of a call, both torch's, never this repository's:
init_device_mesh runs outside fake mode (real_meshes: it reads its rank map with .tolist()), and nn.Module.to is a
no-op while train.load_model adds LoRA adapters (build_policy: peft's .to() cannot swap tracked fake parameters).
"""
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

aten = torch.ops.aten


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
def tensors(tree):
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def nbytes(t):
    return t.numel() * t.element_size()


class Meter(TorchDispatchMode):
    """Per op: FLOPs (flop_counter's formulas, as FlopCounterMode), bytes of inputs and outputs, the bytes of
    each collective (all_gather: the gathered output; reduce_scatter: the full input; all_reduce: the
    tensor), and the roofline seconds on each GPU. On fake tensors, .item() answers 1 (bool: True): AdamW's step
    count needs a number, sde.sde_step's check that the noise is > 0 needs True. `peak`: dense FLOP/s by compute
    dtype ('bf16', 'tf32', 'fp32'); `gpus`: {name: {'bw': memory bytes/s}}; `mfu`, `bw_eff`: the shares reached."""

    def __init__(self, peak: dict, gpus: dict, mfu: float, bw_eff: float):
        super().__init__()
        self.n = Counter()
        self.peak, self.gpus, self.mfu, self.bw_eff = peak, gpus, mfu, bw_eff

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
            self.n[f"comm_{kind}"] += max(map(nbytes, tensors((args, out))), default=0)
            return out
        from torch.utils.flop_counter import flop_registry
        packet = func._overloadpacket
        flops = flop_registry[packet](*args, **kwargs, out_val=out) if packet in flop_registry else 0
        moved = 0 if func.is_view else sum(map(nbytes, tensors((args, kwargs, out))))
        self.n["flops"] += flops
        self.n["bytes"] += moved
        dtype = next((t.dtype for t in tensors(args) if t.is_floating_point()), torch.float32)
        peak = self.peak["bf16"] if dtype in (torch.bfloat16, torch.float16) else \
            self.peak["tf32"] if packet is aten.convolution else self.peak["fp32"]
        for gpu, spec in self.gpus.items():
            self.n[f"sec_{gpu}"] += max(flops / (self.mfu * peak), moved / (self.bw_eff * spec["bw"]))
        return out


def peak_total(tracker) -> int:
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
    """MemTracker for a model that FSDP does not wrap (world size 1 under LoRA, launch.sharding.shard_model), counting what
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

    def current(self) -> dict:
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
        frame = dict(peak=None, bound=0, before=Counter(self.meter.n), inner=Counter(), start=self.current()["Total"])
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
                # a repeat under launch.sharding.Gathered finds the parameters resident: no collective
                self.meter.n.update({k: v for k, v in counts.items() if not k.startswith("comm_")})
                self.stack[-1]["bound"] = max(self.stack[-1]["bound"], self.current()["Total"] + excess)
                return tree_map(lambda s: torch.empty(s.shape, dtype=s.dtype, device=s.device)
                                if isinstance(s, Like) else s, like)
            self._fold()
            start, before = self.current()["Total"], Counter(self.meter.n)
            out = fn(*a, **k)
            peak = self.tracker.get_tracker_snapshot("peak")
            excess = next(iter(peak.values()), {"Total": start})["Total"] - start
            like = tree_map(lambda t: Like(t.shape, t.dtype, t.device) if isinstance(t, torch.Tensor) else t, out)
            memo.setdefault(sig, ({k: v - before[k] for k, v in self.meter.n.items()}, excess, like))
            return out
        return call


class Handed:
    """`obj` as it is handed to train.py's code, with the methods given as keywords (name=function) in place of its
    own; every other attribute is obj's. bench/scale.py hands train.sample_prompt its plan, policy and reward so:
    their rollout, decode and score each a phase (Recorder.wrap)."""

    def __init__(self, obj, **methods):
        self._obj = obj
        self.__dict__.update(methods)

    def __getattr__(self, attr):
        return getattr(self._obj, attr)


# ------------------------------------------------------------------------------------------------
# train.py's objects on fake tensors
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


def build_reward(s, device):
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
    """A transformer's weight files as policy.weights.load_transformer reads them (WeightFiles' interface; FLUX.1-dev's
    unless `transformer_class` is given): each part this rank reads is a new bf16 tensor (the released files are
    bf16) of its shape, random (N(0, 0.02)) so that real tensors (tests/test_scale.py) compute finite numbers."""

    def __init__(self, config: dict, transformer_class=None):
        if transformer_class is None:
            from diffusers import FluxTransformer2DModel as transformer_class
        self.config, self.transformer_class = config, transformer_class

    def read(self, items):
        for key, index, shape in items:
            yield key, torch.empty([i.stop - i.start for i in index], dtype=torch.bfloat16).normal_(0, 0.02)


def family_classes(family: str):
    """(Policy subclass, VAE class) of a bench/scale.py family."""
    from diffusers import AutoencoderKL
    if family == "flux1-dev":
        from policy.flux import FluxPolicy
        return FluxPolicy, AutoencoderKL
    if family.startswith("sd3.5"):
        from policy.sd3 import SD3Policy
        return SD3Policy, AutoencoderKL
    if family == "qwen-image":
        from diffusers import AutoencoderKLQwenImage
        from policy.qwen_image import QwenImagePolicy
        return QwenImagePolicy, AutoencoderKLQwenImage
    raise ValueError(f"unknown family {family!r}")


def sim_root(s) -> Path:
    """The policy's model folder: none exists. SD3Policy reads its position table from the folder's weights when it
    has some (policy.sd3._buffers_from_file): a folder holding only transformer/config.json has none, and then
    build_empty's computed table stays, as load_transformer built it."""
    root = Path(tempfile.gettempdir()) / "scale-sim"
    if s.family.startswith("sd3.5"):
        import json
        from torch._subclasses.fake_tensor import unset_fake_temporarily
        root = Path(tempfile.mkdtemp(prefix="scale-sim-"))
        (root / "transformer").mkdir()
        with unset_fake_temporarily():
            (root / "transformer" / "config.json").write_text(json.dumps(
                {"_class_name": "SD3Transformer2DModel", **s.transformer}, default=list))
    return root


def build_policy(s, device):
    """The policy as train.set_up builds it: train.load_model (the transformer on the meta device, under LoRA its
    fp32 adapters (policy.lora.add_lora) on a bf16 base, sharded by launch.sharding.shard_model (not at world size 1 under
    LoRA), then this rank's part read from FakeWeights and cast to its dtype), and the VAE; the policy by its class's
    constructor (the family's: bench/scale.py Setting.family)."""
    import train
    family = getattr(s, "family", "flux1-dev")
    policy_class, vae_class = family_classes(family)
    dtype = torch.bfloat16 if s.lora_rank else torch.float32
    a = replace(train.Args(), lora_rank=s.lora_rank, lora_alpha=2 * s.lora_rank, mixed_precision="bf16")
    to = torch.nn.Module.to  # peft casts each new adapter to the base's dtype with .to(), which cannot swap tracked
    torch.nn.Module.to = lambda self, *a, **k: self  # fake parameters: they stay fp32, as add_lora leaves them
    try:
        transformer = train.load_model(a, FakeWeights(s.transformer, policy_class.TRANSFORMER), torch.device(device),
                                       dtype, policy_class.LORA_TARGETS).eval()
    finally:
        torch.nn.Module.to = to
    with torch.device(device):
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # built in its dtype (.to() cannot swap tracked fake parameters)
        try:
            vae = vae_class(**s.vae).eval()
        finally:
            torch.set_default_dtype(default)
        # max_sequence_length: T5's tokens (FLUX.1, SD3.5); Qwen-Image's Cond has the prompt's own length instead,
        # at most the pipeline's 512
        seq = s.seq_len if family != "qwen-image" else max(512, s.seq_len)
        policy = policy_class(sim_root(s), transformer, vae, s.height, s.width, seq, getattr(s, "guidance", 3.5),
                              device=device, dtype=dtype, embed_dtype=torch.bfloat16)
    return policy, transformer


def encode(s, device, dtype=torch.float32):
    """The prompt encoding as policy.flux.FluxPolicy.encode runs it (T5-XXL and CLIP-L in the policy's
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


def _built(dtype, device, make):
    """make() with its parameters created on `device` in `dtype` (.to() cannot swap tracked fake parameters)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return make().eval()
    finally:
        torch.set_default_dtype(default)


def encode_family(s, device, dtype=torch.float32):
    """The encoding of a family with classifier-free guidance (bench/scale.py Setting.family), as its policy's encode
    runs it: its text encoders built in the policy's dtype on the device, one forward of batch 2 (the prompt and the
    negative prompt, one batch as Policy.encode_prompts encodes them), then freed -> (the prompt's Cond, the
    negative's), bf16 (the stored embed dtype).
      sd3.5-*     CLIP-L and CLIP-G (CLIPTextModelWithProjection, 77 tokens, hidden states kept: the policy takes the
                  penultimate) and T5-XXL (seq_len tokens; `wo` in fp32 under bf16, as from_pretrained keeps it):
                  prompt_embeds (1, 77 + seq_len, 4096), pooled (1, 2048);
      qwen-image  Qwen2_5_VLForConditionalGeneration (the 7B language model, its lm_head and the vision tower, all
                  loaded by the pipeline) over template_len + seq_len tokens, hidden states kept: prompt_embeds
                  (1, seq_len, 3584) and its mask; the negative " " has negative_len tokens."""
    if s.family.startswith("sd3.5"):
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel
        from policy.sd3 import Cond

        def t5_make():
            t5 = T5EncoderModel(T5Config(**s.t5))
            for name, m in t5.named_modules():
                if dtype != torch.float32 and name.rsplit(".", 1)[-1] in T5EncoderModel._keep_in_fp32_modules:
                    m.weight = torch.nn.Parameter(m.weight.float(), requires_grad=m.weight.requires_grad)
            return t5
        clips = [_built(dtype, device, lambda c=c: CLIPTextModelWithProjection(CLIPTextConfig(**c)))
                 for c in (s.clip_text, s.clip_g)]
        t5 = _built(dtype, device, t5_make)
        with torch.no_grad():
            seqs, pooled = [], []
            for clip in clips:
                out = clip(torch.zeros(2, 77, dtype=torch.long, device=device), output_hidden_states=True)
                seqs.append(out.hidden_states[-2])
                pooled.append(out[0])
            seq_t5 = t5(torch.zeros(2, s.seq_len, dtype=torch.long, device=device))[0]
            seq = torch.cat(seqs, -1)
            seq = torch.nn.functional.pad(seq, (0, seq_t5.shape[-1] - seq.shape[-1]))
            seq, pooled = torch.cat([seq, seq_t5], -2), torch.cat(pooled, -1)
        del clips, t5
        both = [Cond(seq[j:j + 1].bfloat16().clone(), pooled[j:j + 1].bfloat16().clone()) for j in (0, 1)]
        return both[0], both[1]
    if s.family == "qwen-image":
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
        from policy.qwen_image import Cond
        cfg = Qwen2_5_VLConfig(text_config=dict(s.t5), vision_config=dict(s.vision),
                               **{k: s.t5[k] for k in ("hidden_size", "vocab_size")})
        encoder = _built(dtype, device, lambda: Qwen2_5_VLForConditionalGeneration(cfg))
        n = s.template_len + s.seq_len
        mask = torch.ones(2, n, dtype=torch.long, device=device)
        mask[1, s.template_len + s.negative_len:] = 0  # the negative, padded to the prompt's length
        with torch.no_grad():
            hidden = encoder(input_ids=torch.zeros(2, n, dtype=torch.long, device=device), attention_mask=mask,
                             output_hidden_states=True).hidden_states[-1]
        del encoder
        cond, neg = (hidden[j:j + 1, s.template_len:s.template_len + k].bfloat16().clone()
                     for j, k in ((0, s.seq_len), (1, s.negative_len)))
        return (Cond(cond, torch.ones(1, s.seq_len, dtype=torch.long, device=device)),
                Cond(neg, torch.ones(1, s.negative_len, dtype=torch.long, device=device)))
    raise ValueError(f"encode_family: {s.family!r} has no classifier-free guidance (FLUX.1: encode)")

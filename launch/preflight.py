"""Will it fit? One GPU's peak memory for a train.py run, estimated before any weight is loaded.

    est = estimate(json.load(open(model / "transformer" / "config.json")), world=1)   # full fine-tuning, 1 GPU
    check_fits(est, 80 * 10**9)  # -> "estimated peak 204.6 GiB per GPU (training: AdamW 88.7, fp32 weights 44.3,
    #  gradients 44.3, activations 21.9, ...) + 4 GiB reserve > 74.5 GiB on this GPU: use --lora-rank 32 (47.1 GiB),
    #  or 8 GPUs (--nproc_per_node 8: 56.4 GiB)"     (None when it fits)

Pure arithmetic (microseconds, no GPU, no model): the accounting that bench/scale.py simulates on fake tensors,
per phase of one rank of one iteration, in bytes:

  weights        the rank's share of the transformer: fp32 master weights / world (HSDP: / world per replica);
                 under LoRA the frozen base in bf16 (fp32 without bf16 compute) and fp32 adapters, / world
  gradients      fp32, the trained parameters' share (LoRA: the adapters')
  AdamW          two fp32 moments of the trained parameters' share (present from iteration 2 on)
  gathered copy  the whole transformer in the compute dtype, gathered once for the rollout (launch.sharding.Gathered); FSDP2
                 keeps it even at world size 1. launch.sharding.shard_model returns the plain module at world size 1 under
                 LoRA or fp32 (no copy): `gathered_copy=None` follows that rule, True/False forces it
  activations    the largest call's: the rollout's widest batched call (G x |Lambda| rows, no gradients: one
                 block's transient), or one training pass (rows = the trained steps in the pass: with gradients
                 every block's stored tensors; with --activation-checkpointing every block's input + one block
                 recomputed and differentiated)
  FSDP buffers   training's per-block working set: a gathered block, the next one prefetched, a reduce-scatter
  rollout results, decoded images, VAE, reward models, text encoders (at the encoding only)
  reading        loading (train.load_model): the rank's shard and the tensor being read and cast
                 (`loads_whole_model=True`: the whole transformer first, as from_pretrained held it before that)

Activations are rows x tokens x hidden x the element size x a constant per block type ("units" below), with
tokens = 512 T5 tokens + (H / 16)(W / 16) image tokens. The constants come from bench/scale.py's simulation at
FLUX.1-dev's width (24 heads x 128) with 1-2 double and 2-4 single blocks at the paper's shapes (720x720, 512
tokens, G = 12), corrected as tests/preflight_sim.py says (`python tests/preflight_sim.py --world W --lora R
--blocks D S`). tests/test_preflight.py checks them against FLUX.1-dev itself simulated (W = 8 and 1, full and
LoRA: tests/preflight_reference.json, not used to fit them; every phase within 5 %, measured 1 % typically, 3.5 %
at most), a simulation at FLUX.1-dev's width with 2 + 3 blocks, and FSDPMemTracker on real tensors of a tiny
config. They are for bf16 compute (FSDP2's MixedPrecisionPolicy); fp32 compute doubles the element size, not
calibrated. The --algo baselines (trajectory=True) reuse G2RPO's constants with their row counts: approximate.
"""
import json
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

GiB = 2**30
RESERVE_GIB = 4.0  # NCCL buffers and allocator fragmentation, beyond the tensors (bench/scale.py's verdicts too)

# ------------------------------------------------------------------------------------------------
# Activation constants, in units of rows x tokens x hidden x element size (bf16: 2 bytes). Evidence: the
# corrected simulation (tests/preflight_sim.py) at FLUX.1-dev's width, W = 8 (full fine-tuning) and W = 1 (LoRA
# rank 32, with FSDP2 before launch.sharding.shard_model kept the plain module there, and the plain module since), blocks
# D + S = 1 + 2, 2 + 2, 1 + 4; one unit per row there is 2,537 x 3,072 x 2 B = 14.9 MiB.
# ------------------------------------------------------------------------------------------------
# Per mode: full fine-tuning under FSDP2 (bf16 compute copies of every weight); LoRA on the default targets under
# FSDP2 (adapters in bf16 too; a frozen linear layer keeps no input for a weight gradient); LoRA on the plain module
# (world size 1, launch.sharding.shard_model: peft casts each adapted layer's input to the fp32 adapters, and keeps it).
#   rollout    no gradients: the largest transient of one block call, per row. 36 rows: 9.30 / 9.16 / 11.85 GiB
#              above the rollout's start, the same with 1 + 2, 2 + 2 and 1 + 4 blocks
#   double, single   with gradients: stored per row per double / single block until its backward. One pass (8 rows):
#              2 + 2 minus 1 + 2 blocks (3.37 / 2.45 / 3.74 GiB), (1 + 4 minus 1 + 2) / 2 (2.91 / 1.64 / 2.22 GiB)
#   temp       per row, beyond the blocks at the backward's start (the loss, the output layers' gradients): the one
#              pass's peak minus its blocks minus the FSDP buffers (below)
#   recompute  --activation-checkpointing: one block recomputed and differentiated, with the gradients of its
#              activations, per row, beside every block's input (C_INPUT): one pass (8 rows) minus per k (1 row) on
#              1 + 2 blocks (the plain module: its 1 + 2 one pass over 8 rows)
#   fixed      checkpointing, x hidden^2 bytes: a feed-forward weight's fp32 gradient (4 hidden x hidden, 0.14 GiB at
#              FLUX width), the per-k remainder of the same fit; none under LoRA
MODES = {  # mode: (rollout, double, single, temp, recompute, fixed)
    "full": (17.8, 29.05, 25.04, 3.7, 32.1, 16),
    "lora": (17.8, 21.1, 14.1, 13.0, 28.1, 0),
    "lora plain": (22.7, 32.2, 19.1, 13.0, 37.2, 0),
}
C_INPUT = 1.0  # --activation-checkpointing: a block's stored input (hidden + text states): 1 + 4 minus 1 + 2 blocks
C_IO = 3  # x rows x image tokens x in_channels x 4 B: the model's fp32 input and output and their bf16 casts
VAE_C = 5.95  # decoding: fp32 elements per pixel per channel of the VAE's first block (128 in FLUX's VAE) for one
#               image, the decoder's peak: 11.8 GiB for 8 images of 720x720 (FLUX.1-dev's VAE, simulated)
REWARD_C = 12.45  # a ViT reward's activations per image, in elements of tokens x width (fp32): HPS (ViT-H-14,
#                   257 tokens x 1280) on the 289 images of one prompt, 4.41 GiB above the reward phase's start

# ------------------------------------------------------------------------------------------------
# The released models: their configs (diffusers / transformers / open_clip config.json of black-forest-labs/FLUX.1-dev
# and its encoders; bench/scale.py builds them on fake tensors) and the parameter counts of the models around the
# transformer (checked against those configs on the meta device by tests/test_preflight.py)
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
FLUX_VAE_PARAMS = 83_819_683  # AutoencoderKL of FLUX.1-dev (encoder + decoder; train.py loads both)
T5_XXL_PARAMS, CLIP_L_PARAMS = 4_762_310_656, 123_060_480  # text_encoder_2 (T5 encoder), text_encoder (CLIP-L)
# T5's `wo` layers, which from_pretrained keeps in fp32 when loading in bf16
T5_XXL_FP32_PARAMS = T5_XXL["num_layers"] * T5_XXL["d_ff"] * T5_XXL["d_model"]
# reward name -> (parameters, bytes per parameter on the GPU, ViT tokens x width per image; 0: not a ViT, none)
REWARD_MODELS = {
    "hps": (986_109_441, 4, 257 * 1280),  # open_clip ViT-H-14, fp32, 224 px
    "clip": (986_714_881, 4, 730 * 1280),  # DFN5B-CLIP-ViT-H-14-378, fp32, 378 px
    "pickscore": (986_109_441, 4, 257 * 1280),  # transformers CLIPModel ViT-H-14 (same sizes as open_clip's)
    "imagereward": (446_200_000, 4, 577 * 1024),  # BLIP ViT-L/16 + BERT (rewards/imagereward.py, 303 M + 142 M)
    "unifiedreward": (0, 2, 0),  # an HTTP judge holds nothing on this GPU
}
UNIFIEDREWARD_LOCAL_PARAMS = 8_300_000_000  # --unifiedreward-local: Qwen2.5-VL-7B, bf16 (its activations not counted)

DOUBLE_LINEARS = (  # (name, in, out) of FluxTransformerBlock's linear layers, in units of the hidden size D
    ("norm1.linear", 1, 6), ("norm1_context.linear", 1, 6),
    ("attn.to_q", 1, 1), ("attn.to_k", 1, 1), ("attn.to_v", 1, 1), ("attn.to_out.0", 1, 1),
    ("attn.add_q_proj", 1, 1), ("attn.add_k_proj", 1, 1), ("attn.add_v_proj", 1, 1), ("attn.to_add_out", 1, 1),
    ("ff.net.0.proj", 1, 4), ("ff.net.2", 4, 1), ("ff_context.net.0.proj", 1, 4), ("ff_context.net.2", 4, 1))
SINGLE_LINEARS = (  # FluxSingleTransformerBlock (mlp_ratio 4)
    ("norm.linear", 1, 3), ("proj_mlp", 1, 4), ("proj_out", 5, 1), ("attn.to_q", 1, 1), ("attn.to_k", 1, 1),
    ("attn.to_v", 1, 1))
LORA_TARGETS = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                "ff_context.net.2")  # = policy.lora.TARGETS (a test checks), not imported: this file needs no torch


def _dims(cfg: dict):
    D = cfg.get("num_attention_heads", 24) * cfg.get("attention_head_dim", 128)
    return D, cfg.get("attention_head_dim", 128)


def root_linears(cfg: dict) -> list:
    """(name, in, out) of FluxTransformer2DModel's own linear layers (outside the blocks), all with a bias."""
    D, _ = _dims(cfg)
    c_in = cfg.get("in_channels", 64)
    c_out = (cfg.get("out_channels") or c_in) * cfg.get("patch_size", 1) ** 2
    embedders = ("timestep_embedder",) + ("guidance_embedder",) * bool(cfg.get("guidance_embeds", False))
    out = [(f"time_text_embed.{e}.{n}", i, D) for e in embedders for n, i in (("linear_1", 256), ("linear_2", D))]
    out += [("time_text_embed.text_embedder.linear_1", cfg.get("pooled_projection_dim", 768), D),
            ("time_text_embed.text_embedder.linear_2", D, D),
            ("context_embedder", cfg.get("joint_attention_dim", 4096), D), ("x_embedder", c_in, D),
            ("norm_out.linear", D, 2 * D), ("proj_out", D, c_out)]
    return out


def _block_linears(cfg: dict, table) -> list:
    D, _ = _dims(cfg)
    return [(n, i * D, o * D) for n, i, o in table]


def transformer_params(cfg: dict) -> dict:
    """Parameters of FluxTransformer2DModel(**cfg), counted from its config: {'double', 'single' (one block each),
    'root' (embedders, final norm and projection), 'total'}."""
    _, hd = _dims(cfg)
    lin = lambda layers: sum(i * o + o for _, i, o in layers)  # noqa: E731 - every linear layer has a bias
    double = lin(_block_linears(cfg, DOUBLE_LINEARS)) + 4 * hd  # + RMSNorm weights of q, k (both streams)
    single = lin(_block_linears(cfg, SINGLE_LINEARS)) + 2 * hd
    root = lin(root_linears(cfg))
    total = root + cfg.get("num_layers", 19) * double + cfg.get("num_single_layers", 38) * single
    return {"double": double, "single": single, "root": root, "total": total}


def _targeted(name: str, targets) -> bool:
    """peft's rule for a list of target_modules: the module's name is a target or ends with '.' + one."""
    return any(name == t or name.endswith("." + t) for t in targets)


def lora_params(cfg: dict, rank: int, targets=LORA_TARGETS) -> dict:
    """Adapter parameters (A: rank x in, B: out x rank per targeted linear layer): {'double', 'single' (one block
    each), 'root', 'total'}."""
    per = lambda layers, prefix: sum(rank * (i + o) for n, i, o in layers  # noqa: E731
                                     if _targeted(prefix + n, targets))
    double = per(_block_linears(cfg, DOUBLE_LINEARS), "transformer_blocks.0.")
    single = per(_block_linears(cfg, SINGLE_LINEARS), "single_transformer_blocks.0.")
    root = per(root_linears(cfg), "")
    return {"double": double, "single": single, "root": root,
            "total": root + cfg.get("num_layers", 19) * double + cfg.get("num_single_layers", 38) * single}


def rollout_rows(T: int, M, G: int, Lambda) -> int:
    """Rows of the rollout's widest batched call (rollout._continue_batched): G per distinct grid prefix of one
    depth, across the granularities (Eq. 10's strided grids; 3G for Lambda = {1, 2, 3})."""
    widest = 1
    for k in M:
        paths = []
        for lam in Lambda:
            j = k + 1
            paths.append(list(range(j, T, lam)) + [T])  # rollout.strided_grid(T, k, lam), fine_first=False
        depth = max(len(p) for p in paths)
        for d in range(depth - 1):
            widest = max(widest, len({tuple(p[:d + 1]) for p in paths if len(p) > d + 1}))
    return G * widest


# ------------------------------------------------------------------------------------------------
# The estimate
# ------------------------------------------------------------------------------------------------
@dataclass
class Estimate:
    """Per phase of one rank of one iteration: {component: bytes}; the peak phase and its total. `cfg` and `inputs`
    (estimate()'s arguments) let check_fits re-estimate alternatives; `derived`: rows, tokens, the copy's presence."""
    phases: dict
    cfg: dict = field(default_factory=dict)
    inputs: dict = field(default_factory=dict)
    derived: dict = field(default_factory=dict)

    def total(self, phase: str) -> int:
        return sum(self.phases[phase].values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.total)

    @property
    def peak(self) -> int:
        return self.total(self.peak_phase)

    def breakdown(self, phase: str = None) -> str:
        """'fp32 weights 44.3, gradients 44.3, ...' (GiB, the largest first, components under 0.05 GiB left out)."""
        parts = sorted(self.phases[phase or self.peak_phase].items(), key=lambda kv: -kv[1])
        return ", ".join(f"{k} {v / GiB:.1f}" for k, v in parts if v >= 0.05 * GiB)

    def line(self) -> str:
        return f"estimated peak {self.peak / GiB:.1f} GiB per GPU ({self.peak_phase}: {self.breakdown()})"


def estimate(cfg: dict, world: int = 1, replicas: int = 1, lora_rank: int = 0, lora_targets=LORA_TARGETS,
             mixed_precision: str = "bf16", activation_checkpointing: bool = False, rescore_batch: int = 1,
             G: int = 12, T: int = 16, M=range(8), Lambda=(1, 2, 3), prompts_per_rank: int = 1,
             height: int = 720, width: int = 720, seq_len: int = 512, vae_factor: int = 8,
             vae_params: int = FLUX_VAE_PARAMS, vae_channels: int = 128, reward_models=("hps",),
             text_encoder_params: int = T5_XXL_PARAMS + CLIP_L_PARAMS, encode_batch: int = 16,
             gathered_copy: bool = None, loads_whole_model: bool = False, trajectory: bool = False) -> Estimate:
    """One rank's memory per phase (train.py's order): load, encode, rollout, decode, reward, training (the pass
    --rescore-batch and --activation-checkpointing select), optimizer step. `cfg`: the transformer's config.json;
    the rest: train.Args (Table 4 defaults), the model folder's VAE (vae_factor = 2^(len(block_out_channels) - 1),
    vae_channels = block_out_channels[0]; vae_factor 1 and vae_params 0: pixel space) and reward names (or
    (name, parameters, bytes per parameter, ViT tokens x width) tuples). gathered_copy: None = as
    launch.sharding.shard_model (none at world size 1 under LoRA or fp32). trajectory: the --algo baselines (G + 1 rows per
    rollout call, G rows per trained step) instead of G2RPO."""
    inputs = {k: v for k, v in locals().items() if k != "cfg"}
    x = SimpleNamespace(**inputs)
    m = _held(cfg, x)
    z = _sizes(cfg, x, m)
    base, around, results = {m.w_name: m.weights, "AdamW": m.adamw}, z.around, z.results
    ph = {"load": {**_loading(x, m), **around}, "encode": {**base, **around, **_encoding(x, m)}}
    ph.update({p: {**base, **around, **m.gathered, **results, **c} for p, c in _sampling(x, m, z).items()})
    train, rows = _training(cfg, x, m, z)
    ph["training"] = {**base, **around, **results, **train}
    largest = max(m.D * 4 * m.D, m.D * 5 * m.D) if not lora_rank else 0  # AdamW's foreach temporaries: 3 tensors
    ph["optimizer step"] = {**base, **around, **results, "gradients": m.grads,
                            "temporaries": 3 * largest * 4 / m.shards}
    phases = {p: {k: int(v) for k, v in c.items() if v} for p, c in ph.items()}
    derived = dict(gathered_copy=m.gathered_copy, mode=m.mode, rows=rows, widest=z.widest, tokens=z.tokens,
                   params=m.P["total"], trained=m.trained)
    return Estimate(phases, dict(cfg), inputs, derived)


def _held(cfg: dict, x) -> SimpleNamespace:
    """What the rank holds of the transformer (estimate()'s settings `x`): its share of the weights, gradients and
    AdamW's moments, the gathered compute copy (or none: the plain module), the compute element size `e`, and which
    activation constants apply (`mode`)."""
    D, _ = _dims(cfg)
    bf16 = x.mixed_precision == "bf16"
    e = 2 if bf16 else 4  # compute element size
    P = transformer_params(cfg)
    L = lora_params(cfg, x.lora_rank, x.lora_targets) if x.lora_rank else {"double": 0, "single": 0, "root": 0,
                                                                           "total": 0}
    trained = L["total"] if x.lora_rank else P["total"]
    shards = max(1, x.world // max(1, x.replicas))
    gathered_copy = x.gathered_copy
    if gathered_copy is None:
        gathered_copy = not (x.world == 1 and (x.lora_rank or not bf16))
    base_bytes = 2 if (x.lora_rank and bf16) else 4  # a frozen base is held in the compute dtype
    w_name = "bf16 base + fp32 adapters" if x.lora_rank and bf16 else "fp32 weights" if not x.lora_rank else "weights"
    whole = (P["total"] + L["total"]) * e  # the compute copy
    adapters_default = x.lora_rank and set(x.lora_targets) == set(LORA_TARGETS)  # else: full fine-tuning's constants
    block = {"double": (P["double"] + L["double"]), "single": (P["single"] + L["single"])}
    n_double, n_single = cfg.get("num_layers", 19), cfg.get("num_single_layers", 38)
    return SimpleNamespace(
        D=D, bf16=bf16, e=e, P=P, L=L, trained=trained, shards=shards, gathered_copy=gathered_copy,
        base_bytes=base_bytes, w_name=w_name, weights=(P["total"] * base_bytes + L["total"] * 4) / shards,
        grads=trained * 4 / shards, adamw=trained * 8 / shards,
        gathered={f"gathered {'bf16' if bf16 else 'fp32'} copy": whole} if gathered_copy else {},
        mode=("lora plain" if not gathered_copy else "lora") if adapters_default else "full",
        vae_dtype=2 if x.lora_rank and bf16 else 4,  # the policy's dtype (train.set_up: base_dtype)
        n_double=n_double, n_single=n_single, block=block,
        biggest=max(block.values()) if n_double or n_single else 0)


def _sizes(cfg: dict, x, m) -> SimpleNamespace:
    """Tokens and one row's activation unit, the models around the transformer, the rollout's widest call, its
    results (kept until the update) and one prompt's decoded images."""
    img_tokens = (x.height // (2 * x.vae_factor)) * (x.width // (2 * x.vae_factor))
    tokens = img_tokens + x.seq_len
    c_in = cfg.get("in_channels", 64)
    rewards = [REWARD_MODELS[r] if isinstance(r, str) else tuple(r[1:]) for r in x.reward_models]
    # the rollout: one prompt at a time; results kept until the update
    S, G, Lambda = len(x.M), x.G, x.Lambda
    widest = (G + 1) if x.trajectory else rollout_rows(x.T, x.M, G, Lambda)
    states = (x.T + 1 + S * (1 + G + len(Lambda) * G)) if not x.trajectory else (x.T + 1) * (G + 1) + S * G
    images = len(Lambda) * S * G + 1 if not x.trajectory else G + 1
    return SimpleNamespace(
        img_tokens=img_tokens, tokens=tokens, unit=tokens * m.D * m.e,  # one row's unit
        io=C_IO * img_tokens * c_in * 4,  # per row
        rewards=rewards, around={"VAE": x.vae_params * m.vae_dtype, "reward models": sum(n * b for n, b, _ in rewards)},
        S=S, widest=widest, results={"rollout results": states * img_tokens * c_in * 4 * x.prompts_per_rank},
        images=images, image_bytes=images * 3 * x.height * x.width * 4)  # one prompt's, decoded, fp32 (scored, freed)


def _loading(x, m) -> dict:
    """train.load_model: the shard, filled tensor by tensor (the largest: 4 D x D): the rows read (bf16), their cast
    to fp32 and the next rows read, 9 bytes per parameter (3 without the cast: a bf16 base); simulated.
    `loads_whole_model`: the whole transformer first, as from_pretrained held it before that."""
    if x.loads_whole_model:
        return {"whole transformer": m.P["total"] * m.base_bytes + m.L["total"] * 4,
                "sharding (one block)": m.biggest * m.base_bytes / m.shards}
    return {m.w_name: m.weights, "reading": (9 if m.base_bytes == 4 else 3) * 4 * m.D * m.D / m.shards}


def _encoding(x, m) -> dict:
    """The prompts' encoding (set_up, before the first iteration; with AdamW's moments when resumed): T5's attention
    scores and probabilities (heads x S^2) and its gated feed-forward (3 d_ff) per token, per prompt of a batch (the
    encoders in the policy's dtype, as FluxPolicy.encode_prompts loads them; T5's `wo` stays fp32)."""
    enc_acts = x.encode_batch * x.seq_len * (T5_XXL["num_heads"] * x.seq_len * 2 + T5_XXL["d_ff"] * 3) * m.vae_dtype
    encoders = x.text_encoder_params * m.vae_dtype + (T5_XXL_FP32_PARAMS * 2 if m.vae_dtype == 2 and
                                                      x.text_encoder_params else 0)
    return {"text encoders": encoders, "activations": enc_acts}


def _sampling(x, m, z) -> dict:
    """What the rollout, the decode and the reward add to the weights, the gathered copy and the results."""
    c_roll = MODES[m.mode][0]
    vae_act = (min(8, z.images) * x.height * x.width * x.vae_channels * VAE_C * m.vae_dtype) if x.vae_factor > 1 else 0
    # the images pile up call by call (8 at a time), then torch.cat copies them: the last call or the copy
    rw_act = max([z.images * REWARD_C * tw * 4 for _, _, tw in z.rewards] or [0])
    return {"rollout": {"activations": z.widest * (c_roll * z.unit + z.io)},
            "decode": {"images": z.image_bytes, "activations": max(vae_act, z.image_bytes)},
            "reward": {"images": z.image_bytes, "activations": rw_act}}


def _training(cfg: dict, x, m, z):
    """The training pass (--rescore-batch, --activation-checkpointing): its gradients, activations and FSDP buffers
    -> (those components, the rows of the pass)."""
    group_rows = x.G if x.trajectory else 1
    groups = z.S * x.prompts_per_rank
    rows = min(x.rescore_batch or groups, groups) * group_rows
    _, c_d, c_s, c_temp, c_rec, fixed = MODES[m.mode]
    root_e = (m.P["root"] + m.L["root"]) * m.e
    e, biggest, lora = m.e, m.biggest, x.lora_rank
    if x.activation_checkpointing:
        acts = rows * (z.unit * ((m.n_double + m.n_single) * C_INPUT + c_rec) + z.io) + fixed * m.D * m.D
        # FSDP: the root and a block gathered, the next prefetched, a block's fp32 gradients to reduce-scatter
        fsdp = root_e + biggest * e + (0 if lora else biggest * e + biggest * 4)
    else:
        acts = rows * (z.unit * (m.n_double * c_d + m.n_single * c_s + c_temp) + z.io)
        single = m.block["single"] if m.n_single else m.block["double"]  # the backward starts in the last single block
        fsdp = root_e + single * e + (0 if lora else single * e + single * 4)
    if not m.gathered_copy:
        fsdp = 0.0  # a plain module: nothing gathered, nothing reduce-scattered
    one_pass_grads = (x.rescore_batch == 0 or x.rescore_batch >= groups)  # no gradient before the pass
    train_grads = m.grads if (x.activation_checkpointing or not one_pass_grads) else 0.0
    if not x.activation_checkpointing and one_pass_grads:
        # the end of the backward holds every gradient and few activations: whichever is larger
        train_grads, acts = (m.grads, 0.0) if m.grads > acts else (0.0, acts)
    return {"gradients": train_grads, "activations": acts, "FSDP buffers": fsdp}, rows


# ------------------------------------------------------------------------------------------------
# The verdict
# ------------------------------------------------------------------------------------------------
def _fits(est: Estimate, gpu_bytes: int, reserve: float) -> bool:
    return est.peak + reserve <= gpu_bytes


def check_fits(est: Estimate, gpu_bytes: int, reserve: float = RESERVE_GIB * GiB) -> str | None:
    """None when the estimated peak plus `reserve` (RESERVE_GIB: NCCL buffers, fragmentation) fits `gpu_bytes`;
    otherwise ONE line: the estimate, and the changes of the command line that would fit, each re-estimated with
    everything else as it was (only those that fit: single changes, else pairs; the fewest GPUs that fit)."""
    if _fits(est, gpu_bytes, reserve):
        return None
    head = f"{est.line()} + {reserve / GiB:.0f} GiB reserve > {gpu_bytes / GiB:.1f} GiB on this GPU"
    cfg, settings = est.cfg, est.inputs
    world, replicas = settings.get("world", 1), settings.get("replicas", 1)
    changes = []  # (what, the command line's flag or '', settings update)
    if not settings.get("activation_checkpointing"):
        changes.append(("--activation-checkpointing", "", dict(activation_checkpointing=True)))
    if settings.get("rescore_batch", 1) != 1:
        changes.append(("--rescore-batch 1", "", dict(rescore_batch=1)))
    if settings.get("prompts_per_rank", 1) > 1:
        changes.append(("--prompts-per-rank 1", "", dict(prompts_per_rank=1)))
    if not settings.get("lora_rank"):
        changes.append(("--lora-rank 32", "", dict(lora_rank=32)))
    for n in (2, 4, 8, 16, 32, 64):  # whole nodes of 8 beyond one node
        if n > world and n % replicas == 0:
            flag = f"--nproc_per_node {n}" if n <= 8 else f"--nnodes {n // 8} --nproc_per_node 8"
            changes.append((f"{n} GPUs", flag, dict(world=n)))
    tried = []
    for k in (1, 2):
        for combo in _combos(changes, k):
            new = {**settings}
            for *_, update in combo:
                new.update(update)
            tried.append((" + ".join(c[0] for c in combo), "".join(c[1] for c in combo), estimate(cfg, **new)))
        ok = _fewest_gpus([t for t in tried if _fits(t[2], gpu_bytes, reserve)])
        if ok:
            return head + ": use " + ", or ".join(f"{what} ({flag + ': ' if flag else ''}{alt.peak / GiB:.1f} GiB)"
                                                  for what, flag, alt in ok[:4])
    what, flag, alt = min(tried, key=lambda t: t[2].peak)
    return head + f": nothing tried fits (the closest: {what}, {alt.peak / GiB:.1f} GiB)"


def _combos(changes, k):
    """The single changes, or the pairs of them (at most one GPU count in a pair)."""
    if k == 1:
        return [[c] for c in changes]
    return [[a, b] for i, a in enumerate(changes) for b in changes[i + 1:] if not (a[1] and b[1])]


def _fewest_gpus(ok):
    """Of the fitting alternatives that differ only in their GPU count, the one with the fewest GPUs."""
    seen, out = set(), []
    for what, flag, alt in ok:
        key = tuple(p if "GPUs" not in p else "GPUs" for p in what.split(" + "))
        if key not in seen:
            seen.add(key)
            out.append((what, flag, alt))
    return out


def settings_from_args(a, world: int, cfg: dict, vae_cfg: dict = None, reward_names=None) -> dict:
    """estimate()'s keywords from a train.Args `a` (read by attribute: this file does not import train), the
    world size, the transformer's config and the VAE's config.json (None: pixel space, the small world)."""
    T, G = a.T, a.G
    M = list(a.sde_steps) or list(range(T // 2))
    S = a.sde_steps_per_iteration or len(M)
    names = reward_names if reward_names is not None else [r for r in a.reward.split("+") if r]
    if getattr(a, "probe_every", 0) and getattr(a, "probe_rewards", ""):
        names += [r for r in a.probe_rewards.split("+") if r and r not in names]
    local_judge = getattr(getattr(a, "rewards", None), "unifiedreward_local", "")
    rewards = [("unifiedreward", UNIFIEDREWARD_LOCAL_PARAMS, 2, 0) if r == "unifiedreward" and local_judge else
               r if r in REWARD_MODELS else (r, 0, 4, 0) for r in names]  # toy rewards: nothing on the GPU
    vae = dict(vae_factor=2 ** (len(vae_cfg["block_out_channels"]) - 1), vae_channels=vae_cfg["block_out_channels"][0],
               vae_params=FLUX_VAE_PARAMS) if vae_cfg else dict(vae_factor=1, vae_params=0, vae_channels=0)
    return dict(world=world, replicas=a.replicas, lora_rank=a.lora_rank, lora_targets=tuple(a.lora_targets),
                mixed_precision=a.mixed_precision, activation_checkpointing=a.activation_checkpointing,
                rescore_batch=a.rescore_batch, G=G, T=T, M=M[:S], Lambda=tuple(a.Lambda),
                prompts_per_rank=a.prompts_per_rank, height=a.height or 720, width=a.width or 720,
                reward_models=tuple(rewards), trajectory=not a.algo.startswith("g2rpo"), **vae)


def check_fits_args(a, world: int, cfg: dict, gpu_bytes: int, vae_cfg: dict = None, **kw) -> str | None:
    """train.py's pre-flight: estimate the run `a` would make on `world` GPUs and say, in one line, what would fit
    when it does not (None when it fits). `kw`: more of estimate()'s arguments (e.g. height, width)."""
    return check_fits(estimate(cfg, **{**settings_from_args(a, world, cfg, vae_cfg), **kw}), gpu_bytes)


def will_it_fit(a, world: int, device, is_main: bool):
    """On a GPU, before any weight is read: the estimated per-GPU peak of this run (launch/preflight.py, the
    accounting bench/scale.py simulates) against this GPU's memory; every rank stops with rank 0 saying, in one line,
    what would fit. On the CPU there is no fixed budget to check."""
    if device.type != "cuda" or not a.model:
        return
    import torch
    from launch.collectives import stop_if_any
    model = Path(a.model)
    family = json.loads((model / "model_index.json").read_text()).get("_class_name")
    if family != "FluxPipeline":  # the estimate's constants are fitted at FLUX.1's shapes
        if is_main:
            print(f"pre-flight: no estimate for a {family} model (it is fitted to FLUX.1 only); `python bench/scale.py "
                  "--family ...` simulates this family's released configuration", flush=True)
        return
    cfg = json.loads((model / "transformer" / "config.json").read_text())
    vae = json.loads((model / "vae" / "config.json").read_text()) if (model / "vae" / "config.json").is_file() else None
    memory = torch.cuda.get_device_properties(device).total_memory
    why = check_fits_args(a, world, cfg, memory, vae)  # the same on every rank
    stop_if_any(f"will not fit: {why} (--no-preflight runs it anyway)" if why else None, "train.py")
    if is_main:
        print(f"pre-flight: {estimate(cfg, **settings_from_args(a, world, cfg, vae)).line()}; this GPU has "
              f"{memory / 2**30:.1f} GiB", flush=True)

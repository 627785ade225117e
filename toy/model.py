"""The small world's base model: tiny FLUX parts, word-level tokenizers, pretraining on noisy captions.

The trainer cannot tell it from FLUX.1-dev: `base_model()` returns a folder that
`policy.flux.FluxPolicy.from_pretrained` loads.

Base    pretraining captions are WRONG for a fraction `wrong_caption` (40 %) of the images: exactly
        one attribute replaced by another value, as noisy web captions are. FluxTransformer2DModel
        in pixel space (the latent is the image in [-1, 1], packed 2 x 2, 12 channels), tiny CLIP
        and T5 text encoders with word-level vocabularies, all trained jointly by rectified flow
        matching: x_t = (1 - t) x_0 + t eps, target v = eps - x_0, t ~ logit-normal(0, 1), through
        FluxPolicy.velocity (the trainer's own call), 600 steps of 64 images; the EMA weights are saved.
        About 4-5 min on one thread of a busy 2-core CPU, then cached (~/.cache/g2rpo/toy-<hash>).
"""
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from policy.flux import Cond, FluxPolicy

from .world import TRAIN, TRAIN_PROMPTS, WORDS, world_batch

MAX_TOKENS = 8  # CLIP: <start> + 6 words + <end>; T5: 6 words + </s> + <pad>
WORLD_VERSION = 1  # bump when the world or the pretraining recipe changes (it keys the cache)


@dataclass(frozen=True)
class ToyConfig:
    """Everything that determines the base model; hashed (with the seed) into its folder name."""
    size: int = 16  # image side in pixels (even); the transformer sees (size / 2)^2 tokens
    wrong_caption: float = 0.4  # fraction of pretraining captions with one wrong attribute
    heads: int = 4  # transformer width = 16 x heads
    double_blocks: int = 2  # FluxTransformerBlock (text and image streams)
    single_blocks: int = 2  # FluxSingleTransformerBlock
    text_dim: int = 32  # CLIP hidden size (= pooled size) and T5 d_model (= joint_attention_dim)
    text_layers: int = 2  # layers of each text encoder
    steps: int = 600  # pretraining steps
    batch: int = 64  # images per step
    lr: float = 2e-3  # AdamW, 50 warm-up steps, cosine to 10 %
    ema: float = 0.99  # the saved weights are this exponential moving average of the trained ones


def word_tokenizers():
    """(CLIP BPE, T5 Unigram) tokenizers in which every word of the world is one token.
    CLIP: characters plus merges added left to right until each word is whole (other text still
    tokenizes, by characters); T5: whole words score above their spellings."""
    from transformers import CLIPTokenizer, T5Tokenizer
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab.update({ch: len(vocab), ch + "</w>": len(vocab) + 1})
    merges = []
    while True:
        tok = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=MAX_TOKENS)
        pairs = {tuple(t[:2]) for t in map(tok.tokenize, WORDS) if len(t) > 1}
        if not pairs:
            break
        for a, b in sorted(pairs):
            merges.append((a, b))
            vocab.setdefault(a + b, len(vocab))
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    pieces += [("\u2581" + w, -1.0) for w in WORDS] + [(ch, -5.0) for ch in "abcdefghijklmnopqrstuvwxyz"]
    return tok, T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=MAX_TOKENS)


def build(cfg: ToyConfig, seed: int):
    """Freshly initialised FluxPipeline (no VAE) of the toy model."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel
    tok, tok_2 = word_tokenizers()
    D = cfg.text_dim
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=D, intermediate_size=2 * D,
                                            num_hidden_layers=cfg.text_layers, num_attention_heads=D // 8,
                                            max_position_embeddings=MAX_TOKENS, bos_token_id=0, eos_token_id=1,
                                            pad_token_id=1))
        t5 = T5EncoderModel(T5Config(vocab_size=len(tok_2), d_model=D, d_ff=2 * D, d_kv=8, num_heads=D // 8,
                                     num_layers=cfg.text_layers, relative_attention_num_buckets=8,
                                     relative_attention_max_distance=MAX_TOKENS, dropout_rate=0.0))
        transformer = FluxTransformer2DModel(patch_size=1, in_channels=12, num_layers=cfg.double_blocks,
                                             num_single_layers=cfg.single_blocks, attention_head_dim=16,
                                             num_attention_heads=cfg.heads, joint_attention_dim=D,
                                             pooled_projection_dim=D, guidance_embeds=False, axes_dims_rope=(4, 6, 6))
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=None, text_encoder=clip,
                        tokenizer=tok, text_encoder_2=t5, tokenizer_2=tok_2, transformer=transformer)


def policy_of(pipe, size: int, root=".") -> FluxPolicy:
    """The in-memory FluxPolicy (fp32) of a toy pipeline; text goes through `encode`, not the disk."""
    return FluxPolicy(root, pipe.transformer, None, size, size, MAX_TOKENS, FluxPolicy.DEFAULTS["guidance"],
                      dtype=torch.float32)  # no guidance embedding: the guidance is unused


def encode(pipe, prompts) -> Cond:
    """Batched conditioning (B, S, D) + (B, P), as FluxPolicy.encode_prompts computes it, with gradients."""
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    ids_2 = pipe.tokenizer_2(prompts, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                             return_tensors="pt").input_ids
    return Cond(pipe.text_encoder_2(ids_2)[0], pipe.text_encoder(ids).pooler_output)


def pretrain(cfg: ToyConfig, seed: int = 0, log=print):
    """Rectified-flow matching of transformer + both text encoders on world_batch data -> FluxPipeline.
    Runs on one CPU thread: deterministic given (cfg, seed) on one machine, and on a small shared CPU
    faster than several threads (tiny matrices; spinning threads wait on each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pipe = build(cfg, seed)
        policy = policy_of(pipe, cfg.size)
        nets = [pipe.transformer, pipe.text_encoder, pipe.text_encoder_2]
        params = [p for n in nets for p in n.parameters()]
        opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / 50) * (
            0.1 + 0.45 * (1 + math.cos(math.pi * i / max(1, cfg.steps)))))
        g = torch.Generator().manual_seed(seed)
        index = {p: i for i, p in enumerate(TRAIN_PROMPTS)}  # captions are always training prompts
        ema = [p.detach().clone() for p in params]
        for n in nets:
            n.train()
        t0, avg = time.time(), None
        for step in range(cfg.steps):
            images, captions, _, _ = world_batch(cfg.batch, g, cfg.wrong_caption, cfg.size)
            x_0 = policy.pack(images * 2 - 1)  # (B, L, 12) the image in [-1, 1] is the latent
            eps = torch.randn(x_0.shape, generator=g)
            t = torch.sigmoid(torch.randn(cfg.batch, generator=g))  # logit-normal(0, 1)
            x_t = (1 - t[:, None, None]) * x_0 + t[:, None, None] * eps
            c = encode(pipe, TRAIN_PROMPTS)  # every training prompt once, then gathered per caption
            pick = torch.tensor([index[p] for p in captions])
            v = policy.velocity(Cond(c.prompt_embeds[pick], c.pooled[pick]))(x_t, t)  # (B, L, 12)
            loss = F.mse_loss(v, eps - x_0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - cfg.ema)
            avg = loss.item() if avg is None else 0.98 * avg + 0.02 * loss.item()
            if log and (step % 100 == 0 or step == cfg.steps - 1):
                log(f"pretrain step {step:4d}/{cfg.steps}  loss {avg:.4f}  {time.time() - t0:5.0f} s")
        with torch.no_grad():
            torch._foreach_copy_(params, ema)
        for n in nets:
            n.eval()
        return pipe
    finally:
        torch.set_num_threads(threads)


def config_hash(cfg: ToyConfig, seed: int) -> str:
    return hashlib.sha256(json.dumps([WORLD_VERSION, asdict(cfg), seed]).encode()).hexdigest()[:12]


def save(pipe, path, cfg: ToyConfig, seed: int):
    """FluxPipeline.save_pretrained layout (no VAE) + g2rpo.json (FluxPolicy defaults) + toy.json."""
    path = Path(path)
    pipe.save_pretrained(path)
    opts = {"height": cfg.size, "width": cfg.size, "max_sequence_length": MAX_TOKENS}
    (path / "g2rpo.json").write_text(json.dumps(opts, indent=1))
    meta = {"hash": config_hash(cfg, seed), "seed": seed, "world_version": WORLD_VERSION, "config": asdict(cfg)}
    (path / "toy.json").write_text(json.dumps(meta, indent=1))


def base_model(dir=None, seed: int = 0, cfg: ToyConfig = ToyConfig(), log=print) -> Path:
    """Folder of the pretrained toy model: pretrained on first use (minutes), reused after.
    Default: $G2RPO_CACHE (else ~/.cache/g2rpo) / toy-<hash of config and seed>. Written to a
    temporary sibling and renamed, so a half-written folder is never seen."""
    cache = Path(os.environ.get("G2RPO_CACHE", Path.home() / ".cache" / "g2rpo"))
    path = Path(dir) if dir is not None else cache / f"toy-{config_hash(cfg, seed)}"
    meta = path / "toy.json"
    if meta.is_file():
        found = json.loads(meta.read_text())["hash"]
        if found != config_hash(cfg, seed):
            raise ValueError(f"{path} holds the toy model {found}, not {config_hash(cfg, seed)} "
                             "(another config, seed or world version): pass another dir or delete it")
        return path
    if log:
        log(f"pretraining the toy base model into {path} ...")
    pipe = pretrain(cfg, seed, log)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        save(pipe, tmp, cfg, seed)
        os.rename(tmp, path)  # atomic; fails if another process finished first (then theirs is used)
    except OSError:
        if not meta.is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


"""The toy text-to-image world: coloured shapes, a deliberately imperfect base model, rule-based rewards.

Like nanoGPT's Shakespeare, this is the small default that runs on a laptop CPU. The trainer cannot
tell it from FLUX.1-dev: `base_model()` returns a folder that `flux.FluxPolicy.from_pretrained` loads.

World   16 x 16 RGB, black background, one anti-aliased shape, prompt "a {colour} {shape} {place}":
        colours red green blue yellow, shapes circle square triangle (all of area pi r^2, r drawn in
        [0.16, 0.21] x side), places on the left / on the right / at the top / at the bottom / in the
        centre (+- 0.04 x side jitter). 4 x 3 x 5 = 60 prompts, of 6 words each.
Split   HELD OUT: the 12 combinations with (colour + shape + place index) % 5 == 0. Pretraining never
        draws them, as images or as captions; every single attribute and every (colour, shape) pair
        is still seen (with 4 of the 5 places). TRAIN_PROMPTS: the other 48.
Base    pretraining captions are WRONG for a fraction `wrong_caption` (40 %) of the images: exactly
        one attribute replaced by another value, as noisy web captions are. FluxTransformer2DModel
        in pixel space (the latent is the image in [-1, 1], packed 2 x 2, 12 channels), tiny CLIP
        and T5 text encoders with word-level vocabularies, all trained jointly by rectified flow
        matching: x_t = (1 - t) x_0 + t eps, target v = eps - x_0, t ~ logit-normal(0, 1), through
        FluxPolicy.velocity (the trainer's own call), 600 steps of 64 images; the EMA weights are saved.
        About 4-5 min on one thread of a busy 2-core CPU, then cached (~/.cache/g2rpo/toy-<hash>).
Rewards (B, 3, H, W) in [0, 1] + prompts -> (B,), any H, W; no model, no gradient.
    toy-adherence  IN-DOMAIN, in [0, 1]: mean of colour (the share of the shape's mass in the prompt's
                   colour), shape (softmax over the IoU with each ideal shape of the world's sizes, at the
                   blob's centroid, and a 'no shape' option), place (Gaussian in the distance from the
                   blob's centroid to the place).
    toy-clean      OUT-OF-DOMAIN, in (0, 1]: exp(-(off-palette colour noise + excess edge blur)).
    toy-shape      OUT-OF-DOMAIN, in [0, 1]: IoU of the blob with the best ideal shape of its own
                   area at its own centroid (prompt-free).
"""
import argparse
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from flux import Cond, FluxPolicy  # noqa: E402
from sde import ode_step, sigma_grid  # noqa: E402

# ---------------------------------------------------------------------------------------------
# the world
# ---------------------------------------------------------------------------------------------
COLOURS = {"red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.1), "blue": (0.1, 0.2, 0.9), "yellow": (0.9, 0.85, 0.1)}
SHAPES = ("circle", "square", "triangle")
PLACES = {"left": ("on the left", 0.25, 0.5), "right": ("on the right", 0.75, 0.5), "top": ("at the top", 0.5, 0.25),
          "bottom": ("at the bottom", 0.5, 0.75), "centre": ("in the centre", 0.5, 0.5)}  # phrase, x, y
RADIUS, JITTER = (0.16, 0.21), 0.04  # fractions of the image side
COMBOS = [(c, s, p) for c in COLOURS for s in SHAPES for p in PLACES]
HELD_OUT = {(c, s, p) for i, c in enumerate(COLOURS) for j, s in enumerate(SHAPES) for k, p in enumerate(PLACES)
            if (i + j + k) % 5 == 0}
TRAIN = [a for a in COMBOS if a not in HELD_OUT]
GUIDANCE = 1.0  # written to g2rpo.json; unused, the toy transformer has no guidance embedding
MAX_TOKENS = 8  # CLIP: <start> + 6 words + <end>; T5: 6 words + </s> + <pad>
WORLD_VERSION = 1  # bump when the world or the pretraining recipe changes (it keys the cache)


def prompt(attrs) -> str:
    c, s, p = attrs
    return f"a {c} {s} {PLACES[p][0]}"


_GRAMMAR = re.compile(rf"a ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)}) ({'|'.join(v[0] for v in PLACES.values())})")
_PHRASE = {v[0]: k for k, v in PLACES.items()}


def parse(text: str):
    """'a red circle on the left' -> ('red', 'circle', 'left'); ValueError outside the grammar."""
    m = _GRAMMAR.fullmatch(" ".join(text.lower().split()))
    if m is None:
        raise ValueError(f"{text!r} is not a toy prompt 'a <colour> <shape> <place>' ({prompt(COMBOS[0])!r})")
    return m.group(1), m.group(2), _PHRASE[m.group(3)]


TRAIN_PROMPTS = [prompt(a) for a in TRAIN]
HELDOUT_PROMPTS = [prompt(a) for a in COMBOS if a in HELD_OUT]
WORDS = sorted({w for a in COMBOS for w in prompt(a).split()})


def _sdf(shape: torch.Tensor, dx, dy, r):
    """Signed distance in pixels (< 0 inside) of shapes of area pi r^2 centred (centroid) at 0.
    shape (B,) indices into SHAPES; dx, dy (B, H, W); r (B, 1, 1). Exact along edges."""
    circle = torch.hypot(dx, dy) - r
    square = torch.maximum(dx.abs(), dy.abs()) - r * math.sqrt(math.pi) / 2
    R = r * math.sqrt(4 * math.pi / (3 * math.sqrt(3)))  # circumradius of the equilateral triangle, apex up
    s3 = math.sqrt(3)
    triangle = torch.maximum(dy, torch.maximum((s3 * dx - dy) / 2, (-s3 * dx - dy) / 2)) - R / 2
    return torch.stack([circle, square, triangle], 1)[torch.arange(len(shape)), shape]  # (B, H, W)


def _grid(H, W):
    yy, xx = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    return xx, yy  # pixel centres, (H, W)


def _coverage(shape, cx, cy, r, H, W):
    """(B, H, W) anti-aliased coverage: the signed distance clipped to a one-pixel ramp."""
    xx, yy = _grid(H, W)
    sdf = _sdf(shape, xx - cx[:, None, None], yy - cy[:, None, None], r[:, None, None])
    return (0.5 - sdf).clamp(0, 1)


def render(attrs, size=16, r=None, offset=None) -> torch.Tensor:
    """Images (B, 3, size, size) in [0, 1] of the attributes; r (B,) pixels, offset (B, 2) pixels."""
    B = len(attrs)
    r = torch.full((B,), size * sum(RADIUS) / 2) if r is None else r
    offset = torch.zeros(B, 2) if offset is None else offset
    shape = torch.tensor([SHAPES.index(s) for _, s, _ in attrs])
    cx = torch.tensor([PLACES[p][1] * size for *_, p in attrs]) + offset[:, 0]
    cy = torch.tensor([PLACES[p][2] * size for *_, p in attrs]) + offset[:, 1]
    colour = torch.tensor([COLOURS[c] for c, _, _ in attrs])  # (B, 3)
    return _coverage(shape, cx, cy, r, size, size)[:, None] * colour[:, :, None, None]


def world_batch(n: int, generator: torch.Generator, wrong_caption=0.4, size=16):
    """n pretraining pairs from the TRAIN combinations: (images (n, 3, size, size), captions, truths, wrong (n,) bool).
    Exactly round(wrong_caption * n) captions have one attribute replaced (never by a held-out combination)."""
    g = generator
    truth = [TRAIN[i] for i in torch.randint(len(TRAIN), (n,), generator=g)]
    r = size * (RADIUS[0] + (RADIUS[1] - RADIUS[0]) * torch.rand(n, generator=g))
    offset = size * JITTER * (2 * torch.rand(n, 2, generator=g) - 1)
    images = render(truth, size, r, offset)
    wrong = torch.zeros(n, dtype=torch.bool)
    wrong[torch.randperm(n, generator=g)[: round(wrong_caption * n)]] = True
    options = (list(COLOURS), list(SHAPES), list(PLACES))
    captions = []
    for a, w in zip(truth, wrong.tolist()):
        b = a
        while w and (b == a or b in HELD_OUT):
            k = int(torch.randint(3, (1,), generator=g))
            b = a[:k] + (options[k][int(torch.randint(len(options[k]), (1,), generator=g))],) + a[k + 1:]
        captions.append(prompt(b))
    return images, captions, truth, wrong


# ---------------------------------------------------------------------------------------------
# the rewards (rule-based; prompts parsed with the world's grammar)
# ---------------------------------------------------------------------------------------------
TAU_COLOUR, TAU_SHAPE, IOU_NONE = 0.01, 0.05, 0.3  # colour softmax temperature; shape softmax; 'no shape' logit
PLACE_SLACK, PLACE_SCALE = JITTER * math.sqrt(2), 0.08  # fractions of the side: free radius, Gaussian width
OFF_TOL = 0.15  # residual colour distance at which a pixel counts e^-1 of its coverage
OFF_SCALE, BLUR_FREE, BLUR_SCALE = 0.02, 1.0, 0.5  # toy-clean: mean off-palette distance, edge-pixel budget


@torch.no_grad()
def analyse(images: torch.Tensor) -> dict:
    """Explain each pixel as alpha * palette colour on black: coverage alpha, colour weights, residual."""
    x = images.float().cpu().permute(0, 2, 3, 1)[..., None, :]  # (B, H, W, 1, 3)
    pal = torch.tensor(list(COLOURS.values()))  # (K, 3)
    a_k = ((x * pal).sum(-1) / (pal * pal).sum(-1)).clamp(0, 1)  # (B, H, W, K) best alpha per colour
    d_k = (x - a_k[..., None] * pal).norm(dim=-1)  # (B, H, W, K) distance to the segment black -> colour
    w = torch.softmax(-d_k**2 / TAU_COLOUR, -1)
    off = (w * d_k).sum(-1)  # (B, H, W)
    alpha = (w * a_k).sum(-1) * torch.exp(-(off / OFF_TOL) ** 2)  # pixels no palette colour explains do not count
    B, H, W = alpha.shape
    mass = alpha.sum((1, 2)).clamp_min(1e-6)  # (B,) area in pixels
    xx, yy = _grid(H, W)
    cx, cy = (alpha * xx).sum((1, 2)) / mass, (alpha * yy).sum((1, 2)) / mass  # centroid
    r = torch.sqrt(mass / math.pi)  # all ideal shapes have area pi r^2: r is the blob's own size
    r_world = r.clamp(RADIUS[0] * max(H, W), RADIUS[1] * max(H, W))  # the nearest size the world draws
    iou = {}
    for key, radius in (("iou", r), ("iou_world", r_world)):
        ideal = torch.stack([_coverage(torch.full((B,), s), cx, cy, radius, H, W) for s in range(len(SHAPES))], 1)
        a = alpha[:, None]
        iou[key] = torch.minimum(a, ideal).sum((2, 3)) / torch.maximum(a, ideal).sum((2, 3)).clamp_min(1e-6)  # (B, S)
    return dict(alpha=alpha, colour=w, off=off, mass=mass, cx=cx, cy=cy, **iou)


def adherence(images, prompts, parts=False):
    """IN-DOMAIN, [0, 1]: mean of colour, shape and place scores for the prompt (each in [0, 1])."""
    a = analyse(images)
    B, H, W = a["alpha"].shape
    attrs = [parse(p) for p in ([prompts] * B if isinstance(prompts, str) else prompts)]
    ci = torch.tensor([list(COLOURS).index(c) for c, _, _ in attrs])
    si = torch.tensor([SHAPES.index(s) for _, s, _ in attrs])
    colour = (a["alpha"] * a["colour"][torch.arange(B), :, :, ci]).sum((1, 2)) / a["mass"]
    logits = torch.cat([a["iou_world"], torch.full((B, 1), IOU_NONE)], 1) / TAU_SHAPE  # a dot is no shape
    shape = torch.softmax(logits, 1)[torch.arange(B), si]
    tx = torch.tensor([PLACES[p][1] * W for *_, p in attrs])
    ty = torch.tensor([PLACES[p][2] * H for *_, p in attrs])
    d = torch.hypot(a["cx"] - tx, a["cy"] - ty) / max(H, W)
    place = torch.exp(-F.relu(d - PLACE_SLACK) ** 2 / (2 * PLACE_SCALE**2))
    score = ((colour + shape + place) / 3).float().to(images.device)
    return (score, dict(colour=colour, shape=shape, place=place)) if parts else score


def clean(images, prompts=None):
    """OUT-OF-DOMAIN, (0, 1]: 1 for flat black background and a crisp one-colour shape.
    off: mean distance of a pixel to the nearest 'alpha * palette colour' (noise, colour mixing);
    blur: edge pixels 4 alpha (1 - alpha) per pixel of the ideal perimeter 2 sqrt(pi area), above
    the BLUR_FREE that a one-pixel anti-aliased edge needs (haze, soft edges, faint residue)."""
    a = analyse(images)
    off = a["off"].mean((1, 2))
    blur = (4 * a["alpha"] * (1 - a["alpha"])).sum((1, 2)) / (2 * torch.sqrt(math.pi * a["mass"]) + 1)
    return torch.exp(-off / OFF_SCALE - F.relu(blur - BLUR_FREE) / BLUR_SCALE).float().to(images.device)


def shape_quality(images, prompts=None):
    """OUT-OF-DOMAIN, [0, 1]: IoU of the blob with the best ideal shape of its area at its centroid."""
    return analyse(images)["iou"].max(1).values.float().to(images.device)


class ToyReward:
    """The reward interface of rewards.py: `name`, `score(images, prompts) -> (B,) float32`."""

    def __init__(self, name, fn):
        self.name, self._fn = name, fn

    def score(self, images, prompts):
        return self._fn(images, prompts)


TOY_REWARDS = {"toy-adherence": lambda: ToyReward("toy-adherence", adherence),
               "toy-clean": lambda: ToyReward("toy-clean", clean),
               "toy-shape": lambda: ToyReward("toy-shape", shape_quality)}


# ---------------------------------------------------------------------------------------------
# the base model: tiny FLUX parts, word-level tokenizers, pretraining on noisy captions
# ---------------------------------------------------------------------------------------------
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
    return FluxPolicy(root, pipe.transformer, None, size, size, MAX_TOKENS, GUIDANCE, dtype=torch.float32)


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
    opts = {"height": cfg.size, "width": cfg.size, "max_sequence_length": MAX_TOKENS, "guidance": GUIDANCE}
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


# ---------------------------------------------------------------------------------------------
# sampling, evaluation and the sample grid (any FluxPolicy: the toy or FLUX.1-dev)
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def sample(policy: FluxPolicy, prompts, seeds, T: int = 16, shift: float = 3.0, batch_size: int = 64):
    """ODE (Eq. 1) samples (B, 3, H, W) in [0, 1]; sample i starts from policy.noise(1, seed seeds[i])."""
    sigmas, out = sigma_grid(T, shift), []
    policy.encode_prompts(prompts)  # all new prompts in one pass (it loads the text encoders)
    for i in range(0, len(prompts), batch_size):
        ps, ss = prompts[i:i + batch_size], seeds[i:i + batch_size]
        x = torch.cat([policy.noise(1, torch.Generator().manual_seed(int(s))) for s in ss])  # (b, L, C)
        conds = [policy.embed(p) for p in ps]
        v = policy.velocity(Cond(torch.cat([c.prompt_embeds for c in conds]), torch.cat([c.pooled for c in conds])))
        for k in range(T):
            x = ode_step(x, v(x, sigmas[k].expand(len(ps))), sigmas[k], sigmas[k + 1])
        out.append(policy.decode(x))
    return torch.cat(out)


def reward_table(policy: FluxPolicy, n: int = 4, T: int = 16, seed: int = 0) -> dict:
    """Mean rewards of the policy (n samples per prompt) on TRAIN and HELD-OUT prompts, and of
    ground-truth renders and of pure-noise images (the reference rows)."""
    g = torch.Generator().manual_seed(seed)
    size = policy.height
    rows = {}
    for split, prompts in (("train", TRAIN_PROMPTS), ("held-out", HELDOUT_PROMPTS)):
        ps = [p for p in prompts for _ in range(n)]
        seeds = torch.randint(2**31, (len(ps),), generator=g).tolist()
        rows[f"model, {split}"] = (sample(policy, ps, seeds, T), ps)
    ps = [p for p in TRAIN_PROMPTS + HELDOUT_PROMPTS for _ in range(n)]
    attrs = [parse(p) for p in ps]
    r = size * (RADIUS[0] + (RADIUS[1] - RADIUS[0]) * torch.rand(len(ps), generator=g))
    rows["ground truth"] = (render(attrs, size, r, size * JITTER * (2 * torch.rand(len(ps), 2, generator=g) - 1)), ps)
    rows["pure noise"] = ((torch.randn(len(ps), 3, size, size, generator=g) / 2 + 0.5).clamp(0, 1), ps)
    return {k: {name: f().score(x, p).mean().item() for name, f in TOY_REWARDS.items()} for k, (x, p) in rows.items()}


GRID_PROMPTS = ["a red square at the top", "a green triangle in the centre", "a blue circle on the right",
                "a yellow square at the bottom",  # training prompts, then held-out ones:
                "a red circle on the left", "a green square at the bottom", "a blue triangle on the right",
                "a yellow circle at the top"]


def save_grid(images, prompts, n: int, path, scale: int = 4):
    """PNG of images (len(prompts) * n, 3, H, W) in [0, 1], prompt-major: one row per prompt (held-out
    toy prompts marked *), n columns, pixels enlarged x scale (nearest). Written atomically."""
    from PIL import Image, ImageDraw
    H, W = images.shape[2] * scale, images.shape[3] * scale
    label, pad = 190, 2
    grid = Image.new("RGB", (label + n * (W + pad), len(prompts) * (H + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for i, p in enumerate(prompts):
        text = p if len(p) <= 30 else p[:29] + "..."
        draw.text((4, i * (H + pad) + H // 2 - 5), text + (" *" if p in HELDOUT_PROMPTS else ""), fill="black")
        for j in range(n):
            x = (images[i * n + j].float().cpu().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
            grid.paste(Image.fromarray(x).resize((W, H), Image.NEAREST), (label + j * (W + pad), i * (H + pad)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    grid.save(tmp)
    os.replace(tmp, path)
    return path


def sample_grid(policy: FluxPolicy, path, prompts=GRID_PROMPTS, seeds=range(6), T: int = 16, scale: int = 4):
    """Samples of fixed prompts (rows) and seeds (columns) -> save_grid PNG."""
    seeds = list(seeds)
    images = sample(policy, [p for p in prompts for _ in seeds], seeds * len(prompts), T)
    return save_grid(images, prompts, len(seeds), path, scale)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Pretrain the toy base model (once), print its rewards, "
                                             "write a sample grid.")
    ap.add_argument("--dir", default=None, help="model folder (default: ~/.cache/g2rpo/toy-<hash>)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=ToyConfig.steps)
    ap.add_argument("--T", type=int, default=16, help="ODE sampling steps")
    ap.add_argument("--n", type=int, default=4, help="samples per prompt for the reward table")
    ap.add_argument("--grid", default="toy_samples.png", help="sample-grid PNG to write")
    args = ap.parse_args(argv)
    import diffusers
    import transformers
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest, and 10-20x faster on a busy 2-core CPU
    t0 = time.time()
    path = base_model(args.dir, args.seed, ToyConfig(steps=args.steps))
    print(f"base model: {path} ({time.time() - t0:.0f} s)")
    policy = FluxPolicy.from_pretrained(path, dtype=torch.float32)
    print(f"{'':16s}" + "".join(f"{k:>15s}" for k in TOY_REWARDS))
    for row, scores in reward_table(policy, args.n, args.T, args.seed).items():
        print(f"{row:16s}" + "".join(f"{v:15.3f}" for v in scores.values()))
    print(f"sample grid: {sample_grid(policy, args.grid, T=args.T)}")


if __name__ == "__main__":
    main()

"""ImageReward (Xu et al., 2023) as an evaluation metric, with plain torch modules and our dependencies.

    R(x, c) = (mlp(h_CLS(x, c)) - mean) / std,   mean = 0.16717362830052426, std = 1.0333394966054072

    code            meaning
    ----            -------
    visual_encoder  BLIP's ViT-L/16 (224 px, width 1024, 24 blocks, 16 heads, pre-norm, LayerNorm eps 1e-6):
                    f_img = its whole token sequence (B, 1 + 196, 1024) after the final LayerNorm
    text_encoder    BERT-base (width 768, 12 layers, 12 heads, LayerNorm eps 1e-12, word + position embeddings,
                    no token types) whose every layer also cross-attends to f_img (keys/values 1024 -> 768)
    h_CLS           the text encoder's output at the first token ([CLS]) of the prompt
    mlp             five Linear layers 768 -> 1024 -> 128 -> 64 -> 16 -> 1 with dropout and NO activation
                    between them (the released model has its ReLUs commented out)
    tokenizer       bert-base-uncased + '[DEC]' (bos) + '[ENC]', padded/truncated to 35 tokens
    preprocess      on a PIL image: resize the SHORTER side to 224 (PIL bicubic), centre crop 224, RGB,
                    to [0, 1], OpenAI CLIP mean/std

Route. The `image-reward` package pins timm==0.6.13 and fairscale and was written against transformers 4.x
(its BERT imports helpers that transformers 5 removed), so it cannot be installed beside our pins. Its model is
small, so we rebuild it here with plain torch modules whose parameter names ARE the keys of the released
ImageReward.pt (`blip.visual_encoder.*`, `blip.text_encoder.*`, `mlp.layers.*`): the checkpoint loads with no
key mapping, and a key we need but do not find is an error (the package loads with strict=False, which would
leave such a weight random). Keys the score never uses (`blip.vision_proj`, `blip.text_proj`, the position-id
buffer) are dropped; any other extra key is reported. Sizes are read from the checkpoint's tensors; the head
counts (not visible in shapes) come from med_config.json when given, else width / 64 (ViT-L: 16, BERT-base: 12).
tests/test_imagereward.py checks scores on tiny random weights in this key layout against numbers the original
package's own modules produced on the same weights, images and prompts.

Conventions. The package scores one PIL image at a time; we batch (the text padding mask keeps each sample
independent; batching only changes float rounding). A float image is turned into the uint8 PIL image the
package would read from a PNG (x * 255 rounded), so scoring a saved PNG and its float tensor agree exactly.
The self-attention mask adds -10000 at padding, as BLIP's BERT does.

Files (local paths only): ImageReward.pt and med_config.json (Hugging Face repo THUDM/ImageReward) and a
bert-base-uncased tokenizer folder (vocab.txt + tokenizer_config.json; repo google-bert/bert-base-uncased).
"""
import json
import math
import os
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import REWARDS
from .clip import OPENAI_MEAN, OPENAI_STD

MEAN, STD = 0.16717362830052426, 1.0333394966054072  # the released model's score normalisation
MAX_LENGTH = 35  # prompt tokens, [CLS] and [SEP] included
UNUSED = ("blip.vision_proj.", "blip.text_proj.", "blip.text_encoder.embeddings.position_ids")
ORIGIN = REWARDS["imagereward"].origin  # where the files come from (the registry's text)


def _attend(q, k, v, heads: int, mask=None):
    """Multi-head softmax(q k^T / sqrt(d) + mask) v. q (B, S, D), k/v (B, N, D), mask (B, 1, 1, N) additive."""
    B, S, D = q.shape
    split = lambda x: x.view(B, x.shape[1], heads, D // heads).transpose(1, 2)  # (B, h, *, d)
    out = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask)  # (B, h, S, d)
    return out.transpose(1, 2).reshape(B, S, D)


# ---------------------------------------------------------------------------------------------
# BLIP's ViT: pre-norm blocks, fused qkv, exact GELU, final LayerNorm over all tokens
# ---------------------------------------------------------------------------------------------
class _Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.proj(_attend(q, k, v, self.heads))


class _Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, dim, heads, eps):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=eps), _Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=eps), _Mlp(dim, 4 * dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _PatchEmbed(nn.Module):
    def __init__(self, patch, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)


class VisionTransformer(nn.Module):
    def __init__(self, image_size=224, patch=16, dim=1024, depth=24, heads=16, eps=1e-6):
        super().__init__()
        self.image_size = image_size
        self.patch_embed = _PatchEmbed(patch, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, (image_size // patch) ** 2 + 1, dim))
        self.blocks = nn.ModuleList(_Block(dim, heads, eps) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x):  # (B, 3, 224, 224) -> (B, 1 + N, dim)
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)  # (B, N, dim)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


# ---------------------------------------------------------------------------------------------
# BLIP's BERT with cross-attention (post-norm layers: self-attention, cross-attention, feed-forward)
# ---------------------------------------------------------------------------------------------
class _SelfAttn(nn.Module):
    def __init__(self, dim, kv_dim):
        super().__init__()
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(kv_dim, dim), nn.Linear(kv_dim, dim)


class _Dense(nn.Module):
    def __init__(self, d_in, d_out, eps=None):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        if eps is not None:
            self.LayerNorm = nn.LayerNorm(d_out, eps=eps)


class _BertAttention(nn.Module):
    def __init__(self, dim, kv_dim, heads, eps):
        super().__init__()
        self.heads, self.self, self.output = heads, _SelfAttn(dim, kv_dim), _Dense(dim, dim, eps)

    def forward(self, x, kv, mask=None):
        s = self.self
        h = _attend(s.query(x), s.key(kv), s.value(kv), self.heads, mask)
        return self.output.LayerNorm(self.output.dense(h) + x)


class _BertLayer(nn.Module):
    def __init__(self, dim, enc_dim, heads, ffn, eps):
        super().__init__()
        self.attention = _BertAttention(dim, dim, heads, eps)
        self.crossattention = _BertAttention(dim, enc_dim, heads, eps)
        self.intermediate, self.output = _Dense(dim, ffn), _Dense(ffn, dim, eps)

    def forward(self, x, mask, image):
        x = self.attention(x, x, mask)
        x = self.crossattention(x, image)  # every image token is attended to
        return self.output.LayerNorm(self.output.dense(F.gelu(self.intermediate.dense(x))) + x)


class _Embeddings(nn.Module):
    def __init__(self, vocab, dim, max_pos, eps):
        super().__init__()
        self.word_embeddings, self.position_embeddings = nn.Embedding(vocab, dim), nn.Embedding(max_pos, dim)
        self.LayerNorm = nn.LayerNorm(dim, eps=eps)

    def forward(self, ids):
        pos = torch.arange(ids.shape[1], device=ids.device)
        return self.LayerNorm(self.word_embeddings(ids) + self.position_embeddings(pos))


class _Encoder(nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.layer = nn.ModuleList(layers)


class TextEncoder(nn.Module):
    def __init__(self, vocab=30524, dim=768, depth=12, heads=12, ffn=3072, max_pos=512, enc_dim=1024, eps=1e-12):
        super().__init__()
        self.embeddings = _Embeddings(vocab, dim, max_pos, eps)
        self.encoder = _Encoder([_BertLayer(dim, enc_dim, heads, ffn, eps) for _ in range(depth)])

    def forward(self, ids, attention_mask, image):  # (B, S), (B, S), (B, N, enc_dim) -> (B, S, dim)
        mask = (1.0 - attention_mask[:, None, None, :].to(image.dtype)) * -10000.0  # (B, 1, 1, S)
        x = self.embeddings(ids)
        for layer in self.encoder.layer:
            x = layer(x, mask, image)
        return x


class ImageRewardModel(nn.Module):
    """The scoring network; its state_dict keys are those of ImageReward.pt (minus UNUSED)."""

    def __init__(self, vision: dict, text: dict):
        super().__init__()
        self.blip = nn.Module()
        self.blip.visual_encoder = VisionTransformer(**vision)
        self.blip.text_encoder = TextEncoder(**text, enc_dim=vision["dim"])
        d = text["dim"]
        self.mlp = nn.Module()
        self.mlp.layers = nn.Sequential(nn.Linear(d, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                        nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, pixels, input_ids, attention_mask):
        """pixels (B, 3, 224, 224) normalised, ids/mask (B, 35) -> (B,) ImageReward scores (fp32)."""
        image = self.blip.visual_encoder(pixels)  # (B, 1 + N, Dv)
        h = self.blip.text_encoder(input_ids, attention_mask, image)[:, 0]  # (B, D) at [CLS]
        r = self.mlp.layers(h).float().squeeze(-1)  # (B,)
        return (r - MEAN) / STD


def config_from_state(state: dict, med_config: dict = None) -> tuple:
    """(vision, text) sizes read from the checkpoint tensors; heads and eps from med_config when given."""
    med = med_config or {}
    pe = state["blip.visual_encoder.pos_embed"]  # (1, 1 + N, Dv)
    patch = state["blip.visual_encoder.patch_embed.proj.weight"].shape[-1]
    dim_v = pe.shape[-1]
    count = lambda prefix: len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})
    vision = dict(image_size=math.isqrt(pe.shape[1] - 1) * patch, patch=patch, dim=dim_v,
                  depth=count("blip.visual_encoder.blocks."), heads=max(1, dim_v // 64))
    vocab, dim_t = state["blip.text_encoder.embeddings.word_embeddings.weight"].shape
    text = dict(vocab=vocab, dim=dim_t, depth=count("blip.text_encoder.encoder.layer."),
                heads=med.get("num_attention_heads", max(1, dim_t // 64)),
                ffn=state["blip.text_encoder.encoder.layer.0.intermediate.dense.weight"].shape[0],
                max_pos=state["blip.text_encoder.embeddings.position_embeddings.weight"].shape[0],
                eps=med.get("layer_norm_eps", 1e-12))
    return vision, text


# ---------------------------------------------------------------------------------------------
# the metric: reward interface of rewards/__init__.py
# ---------------------------------------------------------------------------------------------
class ImageReward:
    """`score(images (B, 3, H, W) in [0, 1], prompts) -> (B,) float32`, like the rewards of rewards/clip.py."""

    name = "imagereward"

    def __init__(self, model: ImageRewardModel, tokenizer, device="cpu", dtype=torch.float32):
        from torchvision import transforms as T
        self.device, self.dtype, self.tokenizer = torch.device(device), dtype, tokenizer
        self.model = model.to(self.device, dtype).eval().requires_grad_(False)
        n = model.blip.visual_encoder.image_size
        self.preprocess = T.Compose([T.Resize(n, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(n),
                                     T.ToTensor(), T.Normalize(OPENAI_MEAN, OPENAI_STD)])

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """Float images -> the uint8 PIL images a PNG would hold -> the package's transform. (B, 3, n, n)."""
        from PIL import Image
        u8 = (images.detach().float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        return torch.stack([self.preprocess(Image.fromarray(a).convert("RGB")) for a in u8])

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts) -> torch.Tensor:
        B = images.shape[0]
        prompts = [prompts] * B if isinstance(prompts, str) else list(prompts)
        if len(prompts) != B:
            raise ValueError(f"imagereward: {B} images but {len(prompts)} prompts")
        tok = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=MAX_LENGTH,
                             return_tensors="pt")
        out = self.model(self.pixels(images).to(self.device, self.dtype), tok.input_ids.to(self.device),
                         tok.attention_mask.to(self.device))
        return out.float().to(images.device)


def load_tokenizer(path: str):
    """bert-base-uncased from a local folder, with the two tokens BLIP adds ([DEC] as bos, [ENC])."""
    from transformers import BertTokenizer
    tok = BertTokenizer.from_pretrained(path)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


def load(checkpoint: str, tokenizer: str, med_config: str = None, device="cpu", dtype=torch.float32) -> ImageReward:
    """ImageReward from local files: the ImageReward.pt state dict, a bert-base-uncased tokenizer folder and
    (optional) med_config.json for the head count and LayerNorm eps."""
    for what, path in (("checkpoint", checkpoint), ("tokenizer", tokenizer), ("med_config", med_config)):
        if path and not os.path.exists(path):
            raise FileNotFoundError(f"imagereward: {what} {path!r} does not exist; expected {ORIGIN}")
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    med = json.loads(open(med_config).read()) if med_config else None
    if "blip.visual_encoder.pos_embed" not in state:
        raise ValueError(f"imagereward: {checkpoint} has no 'blip.visual_encoder.pos_embed': not an ImageReward.pt "
                         f"state dict ({ORIGIN})")
    model = ImageRewardModel(*config_from_state(state, med))
    used = {k: v for k, v in state.items() if not k.startswith(UNUSED)}
    missing, unexpected = model.load_state_dict(used, strict=False)
    if missing:
        raise ValueError(f"imagereward: {checkpoint} lacks {len(missing)} weight(s) of the model, e.g. {missing[:3]}")
    if unexpected:
        warnings.warn(f"imagereward: ignoring {len(unexpected)} unknown key(s) of {checkpoint}, e.g. {unexpected[:3]}")
    return ImageReward(model, load_tokenizer(tokenizer), device, dtype)

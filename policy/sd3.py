"""Stable Diffusion 3.5 (Medium, Large) as the policy of G2RPO: the velocity v_theta(x_t, t, c) that Eqs. 1-3 step
with (policy/interface.py), guided by classifier-free guidance as StableDiffusion3Pipeline guides it.

The transformer is called exactly as diffusers' StableDiffusion3Pipeline calls it, so that sampling with sde.ode_step
on our grid reproduces the pipeline's own images (tests/test_sd3.py checks it in fp32).

    code            paper / meaning
    ----            ---------------
    x               x_t, unpacked latents (B, c, h, w), c = 16, h = H / f, w = W / f, f = 8 (the VAE's
                    downsampling); the transformer patchifies them itself (2x2: (h/2)(w/2) tokens)
    t               (B,) sigmas in [0, 1], t = 1 noise. The transformer gets timestep = 1000 t (the
                    pipeline passes scheduler.timesteps = 1000 sigma; SD3's time embedding does not
                    rescale, unlike FLUX's)
    cond            c: prompt_embeds (1, 77 + S, 4096) = [CLIP-L | CLIP-G] penultimate hidden states
                    (768 + 1280 wide) zero-padded to T5's width, then T5-XXL's S = max_sequence_length
                    tokens; pooled (1, 2048) = [CLIP-L | CLIP-G] projected pooled outputs. As
                    StableDiffusion3Pipeline.encode_prompt computes them (clip_skip None)
    guidance        w of v = v_u + w (v_c - v_u); v_u is conditioned on the empty prompt "" (the
                    pipeline's default negative prompt), in the same batched call, its rows first
                    (the pipeline's torch.cat([negative, positive]) and torch.cat([latents] * 2))
    f * p           height and width must be multiples of vae_scale_factor * patch_size (16)

Time shift: the static shift 3.0 of SD3.5's scheduler_config (FlowMatchEulerDiscreteScheduler, no dynamic
shifting), the same formula as sde.sigma_grid's: the scheduler given sigmas=linspace(1, 0, T + 1)[:-1] (it shifts
given sigmas too) steps on sigmas(T); its default grid (no sigmas given) is a slightly different one.
Decoding: vae.decode(x / scaling_factor + shift_factor) / 2 + 0.5 clamped to [0, 1] (1.5305 and 0.0609 for SD3.5).

Conventions chosen here, against StableDiffusion3Pipeline.__call__:
- DEFAULTS: 512 x 512 (Flow-GRPO's resolution for every SD3.5-M recipe, config/grpo.py; the pipeline's own default is
  sample_size * f = 1024), guidance 4.5 (the SD3.5 Medium model card's and Flow-GRPO's; the pipeline's default is 7.0),
  max_sequence_length 256 (the pipeline's default).
- CFG is always on, also at guidance <= 1 (the pipeline then drops the unconditional rows: at w = 1 the two agree up
  to rounding). Skip-layer guidance (off by default in the pipeline) is not supported.
- x stays float32 between steps and x_T is drawn in float32; only the transformer runs in `dtype`.
- A size that is not a multiple of f * p, or larger than the position table (pos_embed_max_size * p * f: 6144 px for
  3.5 Medium, 3072 for Large), is refused.
- The position table pos_embed.pos_embed is a persistent buffer that the checkpoint holds: it is read from the file,
  as from_pretrained reads it (policy.weights.load_transformer).
- T5 is required (the pipeline also runs without text_encoder_3, with zeros in its place).
"""
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5Tokenizer

from policy.interface import Policy, tokenize


@dataclass
class Cond:
    """The conditioning c of one prompt (batch 1)."""
    prompt_embeds: torch.Tensor  # (1, 77 + S, D): padded CLIP-L | CLIP-G sequence, then T5's
    pooled: torch.Tensor  # (1, P): CLIP-L | CLIP-G pooled


class SD3Policy(Policy):
    PIPELINE = "StableDiffusion3Pipeline"
    TRANSFORMER = SD3Transformer2DModel
    ENCODER_PARTS = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2", "tokenizer_3", "text_encoder_3")
    # the defaults of diffusers' SD3 DreamBooth-LoRA script (examples/dreambooth/train_dreambooth_lora_sd3.py): the
    # attention projections of both streams (not the MMDiT-X blocks' second attention, attn2)
    LORA_TARGETS = ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "attn.to_k",
                    "attn.to_out.0", "attn.to_q", "attn.to_v")
    DEFAULTS = {"height": 512, "width": 512, "max_sequence_length": 256, "guidance": 4.5}  # see the module docstring
    SHIFT = 3.0  # SD3.5's scheduler_config
    Cond = Cond
    NEGATIVE_PROMPT = ""

    def __init__(self, root, transformer, vae, height, width, max_sequence_length, guidance, device="cpu",
                 dtype=torch.bfloat16, cache_dir=None, embed_dtype=None):
        super().__init__(root, transformer, vae, height, width, max_sequence_length, guidance, device, dtype,
                         cache_dir, embed_dtype)
        if vae is None:
            raise ValueError(f"{self.root}: StableDiffusion3Pipeline needs a VAE (model_index.json names none)")
        cfg, self.c = transformer.config, vae.config.latent_channels
        self.f, p = 2 ** (len(vae.config.block_out_channels) - 1), cfg.patch_size
        if cfg.in_channels != self.c:
            raise ValueError(f"transformer in_channels={cfg.in_channels} but the VAE gives {self.c} channels")
        if height % (self.f * p) or width % (self.f * p):
            raise ValueError(f"height and width must be multiples of {self.f * p}, got {height}x{width}")
        if max(height, width) > cfg.pos_embed_max_size * p * self.f:
            raise ValueError(f"height and width must be at most {cfg.pos_embed_max_size * p * self.f} (the "
                             f"transformer's position table), got {height}x{width}")
        self.h, self.w = height // self.f, width // self.f

    @classmethod
    def load_vae(cls, root, dtype):
        return AutoencoderKL.from_pretrained(root, subfolder="vae", dtype=dtype) if cls.has_vae(root) else None

    @classmethod
    def size_multiple(cls, root) -> int:
        """vae_scale_factor * patch_size (16 for SD3.5), as the pipeline's check_inputs demands."""
        read = lambda part: json.loads((Path(root) / part / "config.json").read_text())  # noqa: E731
        return 2 ** (len(read("vae")["block_out_channels"]) - 1) * read("transformer")["patch_size"]

    @classmethod
    def max_size(cls, root) -> int:
        """pos_embed_max_size latent patches (192 for SD3.5: 3072 px): the transformer crops its position table."""
        cfg = json.loads((Path(root) / "transformer" / "config.json").read_text())
        return (cfg.get("pos_embed_max_size") or 0) * cls.size_multiple(root)

    # ---------------------------------------------------------------- the transformer call
    def forward(self, net, x, t, cond):
        """One call as StableDiffusion3Pipeline makes it: x (B, c, h, w), t (B,) sigmas, cond of B rows ->
        (B, c, h, w) float32."""
        out = net(hidden_states=x.to(self.dtype), timestep=t * 1000,
                  encoder_hidden_states=cond.prompt_embeds.to(self.device, self.dtype),
                  pooled_projections=cond.pooled.to(self.device, self.dtype), return_dict=False)[0]
        return out.float()

    # ---------------------------------------------------------------- latents and images
    def noise(self, n: int, generator=None) -> torch.Tensor:
        """(n, c, h, w) float32 x_T, drawn like StableDiffusion3Pipeline.prepare_latents (same generator, same x_T)."""
        return randn_tensor((n, self.c, self.h, self.w), generator=generator, device=self.device, dtype=torch.float32)

    @torch.no_grad()
    def decode(self, x0: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
        """Clean latents (B, c, h, w) -> images (B, 3, H, W) float32 in [0, 1], batch_size at a time."""
        cfg, images = self.vae.config, []
        for z in x0.split(batch_size):
            z = z.float() / cfg.scaling_factor + cfg.shift_factor
            img = self.vae.decode(z.to(self.device, self.vae.dtype), return_dict=False)[0].float()
            images.append((img / 2 + 0.5).clamp(0, 1))
        return torch.cat(images)

    # ---------------------------------------------------------------- prompt conditioning c
    def encode(self, prompts: list, batch_size: int = 16):
        """Yield each prompt's Cond as StableDiffusion3Pipeline.encode_prompt computes it. The three encoders are read
        onto the device in the policy's dtype, and freed at the end."""
        toks = [CLIPTokenizer.from_pretrained(self.root / "tokenizer"),
                CLIPTokenizer.from_pretrained(self.root / "tokenizer_2"),
                T5Tokenizer.from_pretrained(self.root / "tokenizer_3")]
        where = dict(dtype=self.dtype, device_map={"": self.device})
        clips = [CLIPTextModelWithProjection.from_pretrained(self.root / p, **where).eval()
                 for p in ("text_encoder", "text_encoder_2")]
        t5 = T5EncoderModel.from_pretrained(self.root / "text_encoder_3", **where).eval()
        n_clip = toks[0].model_max_length  # 77, for both CLIPs (the pipeline's tokenizer_max_length)
        try:
            for i in range(0, len(prompts), batch_size):
                batch = prompts[i:i + batch_size]
                seqs, pooled = [], []
                for tok, clip in zip(toks, clips):
                    out = clip(tokenize(tok, batch, n_clip).to(self.device), output_hidden_states=True)
                    seqs.append(out.hidden_states[-2])  # (b, 77, d): the penultimate layer
                    pooled.append(out[0])  # (b, p): the projected pooled output
                seq_t5 = t5(tokenize(toks[2], batch, self.max_sequence_length).to(self.device))[0]  # (b, S, D)
                seq = torch.cat(seqs, -1)
                seq = torch.nn.functional.pad(seq, (0, seq_t5.shape[-1] - seq.shape[-1]))  # (b, 77, D)
                seq, pooled = torch.cat([seq, seq_t5], -2).cpu(), torch.cat(pooled, -1).cpu()
                e = self.embed_dtype
                for j in range(len(batch)):
                    yield Cond(seq[j:j + 1].to(e).clone(), pooled[j:j + 1].to(e).clone())
        finally:
            del clips, t5

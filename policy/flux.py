"""FLUX.1-dev as the policy of G2RPO: the velocity v_theta(x_t, t, c) that Eqs. 1-3 step with (policy/interface.py).

The transformer is called exactly as diffusers' FluxPipeline calls it, so that sampling with sde.ode_step on our grid
reproduces the pipeline's own images (tests/test_flux.py checks it).

    code            paper / meaning
    ----            ---------------
    x               x_t, packed latents (B, L, C): 2x2 patches of the (c, h, w) latent as tokens,
                    L = (h/2)(w/2), C = 4c (c = 16 with the VAE -> C = 64; 720 px: L = 2025)
    t               (B,) sigmas in [0, 1], t = 1 noise; samples of one batch may differ. The
                    transformer gets timestep = t (it multiplies by 1000 inside); the reference
                    code feeds int(t * 1000) / 1000, which we do not
    cond            c: T5 sequence embeddings (1, S, 4096), S = max_sequence_length (512), and the
                    CLIP pooled embedding (1, 768), as FluxPipeline.encode_prompt computes them
    guidance        the distilled guidance scale (3.5) fed as an embedding; there is no CFG
    f               pixels per latent cell: 8 with the VAE, 1 in pixel-space mode
    img_ids, txt_ids  rotary position ids: (0, row, col) per packed token, zeros per text token

Time shift: the paper's static shift 3 (Table 4, the reference code; sde.sigma_grid), not FluxPipeline's
resolution-dependent one.

Pixel-space mode (the CPU toy world): when model_index.json names no VAE, the latent IS the RGB image in [-1, 1]
(c = 3, f = 1, C = 12) and decoding is (x + 1) / 2. With the VAE, decoding is
vae.decode(x / scaling_factor + shift_factor) / 2 + 0.5, both clamped to [0, 1].

The text encoders (9 GB for T5-XXL) are never kept: `encode` loads them, encodes what is missing and frees them again
(the interface stores the embeddings). Every weight is read straight onto the device in the dtype it runs in.
"""
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5Tokenizer

from policy.interface import Policy, tokenize


@dataclass
class Cond:
    """The conditioning c of one prompt (batch 1)."""
    prompt_embeds: torch.Tensor  # (1, S, D) T5 sequence
    pooled: torch.Tensor  # (1, P) CLIP pooled


class FluxPolicy(Policy):
    """FLUX.1 [dev] (and the small world's toy model, which is one). Conventions chosen here, against
    FluxPipeline.__call__ (which the parity test matches in fp32):
    - x stays float32 between steps and only the transformer runs in `dtype`; the pipeline keeps its latents in the
      model dtype (bf16 for FLUX.1-dev), rounding x after every step.
    - x_T is drawn in float32; the pipeline draws it in the text encoders' dtype.
    - default size 720x720 (the paper's training size; the pipeline's default is 1024), and a size that is not a
      multiple of 2f is refused (the pipeline silently rounds it down).
    """
    PIPELINE = "FluxPipeline"
    TRANSFORMER = FluxTransformer2DModel
    ENCODER_PARTS = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")
    # diffusers' FLUX DreamBooth-LoRA script: both streams' attention (single blocks' to_q/k/v included) and the
    # double blocks' feed-forward layers
    LORA_TARGETS = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                    "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                    "ff_context.net.2")
    DEFAULTS = {"height": 720, "width": 720, "max_sequence_length": 512, "guidance": 3.5}  # the paper's
    SHIFT = 3.0  # Table 4
    Cond = Cond

    def __init__(self, root, transformer, vae, height, width, max_sequence_length, guidance, device="cpu",
                 dtype=torch.bfloat16, cache_dir=None, embed_dtype=None):
        super().__init__(root, transformer, vae, height, width, max_sequence_length, guidance, device, dtype,
                         cache_dir, embed_dtype)
        self.c = 3 if vae is None else vae.config.latent_channels
        self.f = 1 if vae is None else 2 ** (len(vae.config.block_out_channels) - 1)
        if transformer.config.in_channels != 4 * self.c:
            raise ValueError(f"transformer in_channels={transformer.config.in_channels} but "
                             f"{'pixel space (no VAE)' if vae is None else 'the VAE'} gives 4 x {self.c}")
        if height % (2 * self.f) or width % (2 * self.f):
            raise ValueError(f"height and width must be multiples of {2 * self.f}, got {height}x{width}")
        self.h, self.w = height // self.f, width // self.f  # unpacked latent grid
        rows, cols = torch.meshgrid(torch.arange(self.h // 2), torch.arange(self.w // 2), indexing="ij")
        self.img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float().to(self.device)

    @classmethod
    def load_vae(cls, root, dtype):
        return AutoencoderKL.from_pretrained(root, subfolder="vae", dtype=dtype) if cls.has_vae(root) else None

    @classmethod
    def size_multiple(cls, root) -> int:
        """2 f: 2x2 patches of latent cells of f pixels (16 with FLUX's VAE, 2 in pixel space)."""
        if not cls.has_vae(root):
            return 2
        return 2 * 2 ** (len(json.loads((Path(root) / "vae" / "config.json").read_text())["block_out_channels"]) - 1)

    @classmethod
    def layout(cls) -> str:
        return "model_index.json, transformer/, vae/ (optional), " + "/, ".join(cls.ENCODER_PARTS) + "/"

    # ---------------------------------------------------------------- the transformer call
    def forward(self, net, x, t, cond):
        """One call as FluxPipeline makes it: x (B, L, C), t (B,) sigmas, cond of B rows -> (B, L, C) float32."""
        B = x.shape[0]
        enc = cond.prompt_embeds.to(self.device, self.dtype)  # (B, S, D), a no-op after embed()
        txt_ids = torch.zeros(enc.shape[1], 3, device=self.device)  # (S, 3)
        guidance = torch.full((B,), self.guidance, device=x.device) if self.transformer.config.guidance_embeds \
            else None
        out = net(hidden_states=x.to(self.dtype), timestep=t, guidance=guidance, encoder_hidden_states=enc,
                  pooled_projections=cond.pooled.to(self.device, self.dtype), txt_ids=txt_ids, img_ids=self.img_ids,
                  return_dict=False)[0]
        return out.float()  # (B, L, C)

    # ---------------------------------------------------------------- latents and images
    def noise(self, n: int, generator=None) -> torch.Tensor:
        """(n, L, C) float32 x_T, drawn like FluxPipeline.prepare_latents (same generator, same x_T)."""
        z = randn_tensor((n, self.c, self.h, self.w), generator=generator, device=self.device, dtype=torch.float32)
        return self.pack(z)

    def pack(self, z: torch.Tensor) -> torch.Tensor:
        """(B, c, h, w) -> (B, (h/2)(w/2), 4c): each 2x2 patch becomes one token (c, dy, dx order)."""
        B, c, h, w = z.shape
        z = z.view(B, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)  # (B, h/2, w/2, c, 2, 2)
        return z.reshape(B, (h // 2) * (w // 2), 4 * c)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, 4c) -> (B, c, h, w), the inverse of pack."""
        B = x.shape[0]
        x = x.view(B, self.h // 2, self.w // 2, self.c, 2, 2).permute(0, 3, 1, 4, 2, 5)  # (B, c, h/2, 2, w/2, 2)
        return x.reshape(B, self.c, self.h, self.w)

    @torch.no_grad()
    def decode(self, x0: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
        """Clean packed latents (B, L, C) -> images (B, 3, H, W) float32 in [0, 1], batch_size at a time."""
        images = []
        for x in x0.split(batch_size):
            z = self.unpack(x.float())  # (b, c, h, w)
            if self.vae is None:  # pixel space: z is the image in [-1, 1]
                img = z
            else:
                cfg = self.vae.config
                z = z / cfg.scaling_factor + (cfg.shift_factor or 0.0)
                img = self.vae.decode(z.to(self.device, self.vae.dtype), return_dict=False)[0].float()
            images.append((img / 2 + 0.5).clamp(0, 1))
        return torch.cat(images)

    # ---------------------------------------------------------------- prompt conditioning c
    def encode(self, prompts: list, batch_size: int = 16):
        """Yield each prompt's Cond as FluxPipeline.encode_prompt computes it: CLIP-L's pooled output, T5-XXL's
        sequence (max_sequence_length tokens). The encoders are read onto the device in the policy's dtype, and
        freed at the end."""
        tok = CLIPTokenizer.from_pretrained(self.root / "tokenizer")
        tok_2 = T5Tokenizer.from_pretrained(self.root / "tokenizer_2")
        # each weight read straight onto the device in the dtype they run in: never a whole copy in host memory
        where = dict(dtype=self.dtype, device_map={"": self.device})
        clip = CLIPTextModel.from_pretrained(self.root / "text_encoder", **where).eval()
        t5 = T5EncoderModel.from_pretrained(self.root / "text_encoder_2", **where).eval()
        try:
            for i in range(0, len(prompts), batch_size):
                batch = prompts[i:i + batch_size]
                ids = tokenize(tok, batch, tok.model_max_length)  # (b, 77)
                ids_2 = tokenize(tok_2, batch, self.max_sequence_length)  # (b, S)
                pooled = clip(ids.to(self.device), output_hidden_states=False).pooler_output.cpu()  # (b, P)
                seq = t5(ids_2.to(self.device), output_hidden_states=False)[0].cpu()  # (b, S, D)
                e = self.embed_dtype
                for j in range(len(batch)):
                    yield Cond(seq[j:j + 1].to(e).clone(), pooled[j:j + 1].to(e).clone())
        finally:
            del clip, t5


"""Qwen-Image as the policy of G2RPO: the velocity v_theta(x_t, t, c) that Eqs. 1-3 step with (policy/interface.py).

The transformer is called exactly as diffusers' QwenImagePipeline calls it, and guided as it guides, so that sampling
with sde.ode_step on sigmas(T) reproduces the pipeline's own images (tests/test_qwen_image.py checks it in fp32).

    code            paper / meaning
    ----            -------
    x               x_t, packed latents (B, L, C): 2x2 patches of the (c, h, w) latent as tokens, L = (h/2)(w/2),
                    C = 4c (c = 16 -> C = 64; 1328 px: h = 166, L = 6889), as the pipeline's _pack_latents
    t               (B,) sigmas in [0, 1], t = 1 noise. The transformer gets timestep = t; the pipeline passes
                    scheduler.timesteps / 1000 = float32(1000 sigma) / 1000 (equal to fp32 rounding)
    cond            c: the last hidden layer of Qwen2.5-VL-7B over the prompt put in the pipeline's chat template,
                    its first DROP = 34 tokens (the system part) dropped, (1, S, 3584) with S the prompt's own
                    length (<= max_sequence_length), and its mask (1, S), as QwenImagePipeline.encode_prompt
    guidance        w, the pipeline's true_cfg_scale (4.0): classifier-free guidance against NEGATIVE_PROMPT " "
    f               pixels per latent cell: 2 ** len(vae temperal_downsample) = 8, the pipeline's vae_scale_factor
    img_shapes      [(1, h/2, w/2)] per row: the rotary positions of the image tokens (frame, row, column)

Text lengths differ per prompt. The rows of several prompts (and the unconditional rows) go into one transformer call
padded with zeros to the longest, mask 0: the transformer drops masked keys from attention (a joint text + image mask)
and gives text token k the rotary position max(h/2, w/2) + k whatever the padding after it, so a padded row equals
its own unpadded call to fp32 rounding. An all-ones mask is passed as None, as the pipeline passes it.

Guidance (`guide`, the pipeline's true CFG): comb = v_u + w (v_c - v_u), rescaled per token to the conditional norm,
v = comb ||v_c|| / ||comb|| (norms over the C channels of each packed token). The pipeline guides only when it is given
a negative prompt and true_cfg_scale > 1; the model card's examples pass negative_prompt=" ", which is ours; with
guidance 1 the velocity is v_c (still two rows per sample).

Time shift (`sigmas`, shift 0): the pipeline's own schedule, read from scheduler/scheduler_config.json (else the
released Qwen/Qwen-Image values, SCHEDULER): sigmas linspace(1, 1/T, T); the dynamic exponential shift
e^mu / (e^mu + 1/s - 1) with mu = calculate_shift(L) (the static shift s e^mu / (1 + (e^mu - 1) s), shift = e^mu);
then stretched so that the last equals shift_terminal (0.02): 1 - (1 - s) (1 - 0.02) / (1 - s_T); then 0 appended;
computed in numpy float32 as the scheduler's set_timesteps computes it, so that it is pipe.scheduler.sigmas bit for
bit (T >= 2: T = 1 gives the scheduler NaN). A nonzero shift gives sde.sigma_grid(T, shift) instead.

Conventions chosen here, against QwenImagePipeline.__call__: x stays float32 between steps and x_T is drawn in
float32 (the pipeline keeps both in the text encoder's / model dtype); the guidance is computed in float32; a size
that is not a multiple of 2f is refused (the pipeline rounds it down). The text encoder (16 GB in bf16) is never
kept: `encode` loads it, encodes what is missing and frees it.
"""
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
from diffusers.utils.torch_utils import randn_tensor
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

from policy.interface import Policy
from sde import sigma_grid

# QwenImagePipeline.prompt_template_encode and prompt_template_encode_start_idx (tests check they still are)
TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
            "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
            "<|im_start|>assistant\n")
DROP = 34
TOKENIZER_MAX_LENGTH = 1024  # the pipeline's tokenizer_max_length: the prompt is cut at 1024 + DROP tokens
# scheduler/scheduler_config.json of Qwen/Qwen-Image as released (the values the schedule uses)
SCHEDULER = {"base_image_seq_len": 256, "max_image_seq_len": 8192, "base_shift": 0.5, "max_shift": 0.9,
             "shift": 1.0, "use_dynamic_shifting": True, "time_shift_type": "exponential", "shift_terminal": 0.02}


@dataclass
class Cond:
    """The conditioning c of one prompt (batch 1)."""
    prompt_embeds: torch.Tensor  # (1, S, D) Qwen2.5-VL last hidden layer, template dropped
    prompt_embeds_mask: torch.Tensor  # (1, S) int64, 1 for a token, 0 for padding (collate's)


class QwenImagePolicy(Policy):
    PIPELINE = "QwenImagePipeline"
    TRANSFORMER = QwenImageTransformer2DModel
    ENCODER_PARTS = ("tokenizer", "text_encoder")
    # diffusers' Qwen-Image DreamBooth-LoRA script (train_dreambooth_lora_qwen_image.py) default: the image stream's
    # attention projections (the text stream's add_*_proj and to_add_out are not adapted)
    LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")
    # the pipeline's defaults: 128 * vae_scale_factor = 1024 px, max_sequence_length 512, true_cfg_scale 4.0 (the
    # model card uses 4.0 too, at 1328 px for 1:1)
    DEFAULTS = {"height": 1024, "width": 1024, "max_sequence_length": 512, "guidance": 4.0}
    Cond = Cond
    NEGATIVE_PROMPT = " "
    MAX_SEQUENCE_LENGTH = TOKENIZER_MAX_LENGTH  # the pipeline's limit  # the model card's; without one the pipeline does no CFG

    def __init__(self, root, transformer, vae, height, width, max_sequence_length, guidance, device="cpu",
                 dtype=torch.bfloat16, cache_dir=None, embed_dtype=None):
        super().__init__(root, transformer, vae, height, width, max_sequence_length, guidance, device, dtype,
                         cache_dir, embed_dtype)
        if vae is None or transformer.config.guidance_embeds:
            raise ValueError("Qwen-Image needs its VAE and a transformer without guidance_embeds")
        self.c, self.f = vae.config.z_dim, 2 ** len(vae.config.temperal_downsample)
        if transformer.config.in_channels != 4 * self.c:
            raise ValueError(f"transformer in_channels={transformer.config.in_channels} but the VAE gives 4 x {self.c}")
        if height % (2 * self.f) or width % (2 * self.f):
            raise ValueError(f"height and width must be multiples of {2 * self.f}, got {height}x{width}")
        self.h, self.w = height // self.f, width // self.f  # unpacked latent grid
        file = self.root / "scheduler" / "scheduler_config.json"
        self.scheduler = {**SCHEDULER, **(json.loads(file.read_text()) if file.is_file() else {})}

    @classmethod
    def load_vae(cls, root, dtype):
        return AutoencoderKLQwenImage.from_pretrained(root, subfolder="vae", dtype=dtype)

    @classmethod
    def size_multiple(cls, root) -> int:
        """2 f: 2x2 patches of latent cells of f pixels (16 with Qwen-Image's VAE)."""
        return 2 * 2 ** len(json.loads((Path(root) / "vae" / "config.json").read_text())["temperal_downsample"])

    # ---------------------------------------------------------------- the transformer call
    def collate(self, rows: list):
        """One Cond of all rows; prompts of different lengths padded at the end (zeros, mask 0)."""
        S = max(c.prompt_embeds.shape[1] for c, _ in rows)
        if all(c.prompt_embeds.shape[1] == S for c, _ in rows):
            return super().collate(rows)
        pad = [(Cond(F.pad(c.prompt_embeds, (0, 0, 0, S - c.prompt_embeds.shape[1])),
                     F.pad(c.prompt_embeds_mask, (0, S - c.prompt_embeds.shape[1]))), n) for c, n in rows]
        return super().collate(pad)

    def forward(self, net, x, t, cond):
        """One call as QwenImagePipeline makes it: x (B, L, C), t (B,) sigmas, cond of B rows -> (B, L, C) float32."""
        mask = cond.prompt_embeds_mask.to(self.device)
        out = net(hidden_states=x.to(self.dtype), timestep=t, encoder_hidden_states=cond.prompt_embeds.to(
                  self.device, self.dtype), encoder_hidden_states_mask=None if mask.all() else mask,
                  img_shapes=[[(1, self.h // 2, self.w // 2)]] * x.shape[0], return_dict=False)[0]
        return out.float()

    def guide(self, v_uncond, v_cond):
        """The pipeline's true CFG: v_u + w (v_c - v_u), rescaled per token to ||v_c|| (norms over channels)."""
        comb = v_uncond + self.guidance * (v_cond - v_uncond)
        return comb * (v_cond.norm(dim=-1, keepdim=True) / comb.norm(dim=-1, keepdim=True))

    # ---------------------------------------------------------------- latents and images
    def noise(self, n: int, generator=None) -> torch.Tensor:
        """(n, L, C) float32 x_T, drawn like QwenImagePipeline.prepare_latents: (n, 1, c, h, w), then packed."""
        z = randn_tensor((n, 1, self.c, self.h, self.w), generator=generator, device=self.device, dtype=torch.float32)
        z = z.view(n, self.c, self.h // 2, 2, self.w // 2, 2).permute(0, 2, 4, 1, 3, 5)  # (n, h/2, w/2, c, 2, 2)
        return z.reshape(n, (self.h // 2) * (self.w // 2), 4 * self.c)

    @torch.no_grad()
    def decode(self, x0: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
        """Clean packed latents (B, L, C) -> images (B, 3, H, W) float32 in [0, 1], as the pipeline decodes: unpacked
        to (b, c, 1, h, w), z / (1 / latents_std) + latents_mean, vae.decode, frame 0, image / 2 + 0.5 clamped."""
        cfg, images = self.vae.config, []
        mean = torch.tensor(cfg.latents_mean).view(1, self.c, 1, 1, 1).to(self.device, self.vae.dtype)
        inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, self.c, 1, 1, 1).to(self.device, self.vae.dtype)
        for x in x0.split(batch_size):
            b = x.shape[0]
            z = x.view(b, self.h // 2, self.w // 2, self.c, 2, 2).permute(0, 3, 1, 4, 2, 5)  # (b, c, h/2, 2, w/2, 2)
            z = z.reshape(b, self.c, 1, self.h, self.w).to(self.device, self.vae.dtype)
            img = self.vae.decode(z / inv_std + mean, return_dict=False)[0][:, :, 0].float()
            images.append((img / 2 + 0.5).clamp(0, 1))
        return torch.cat(images)

    def sigmas(self, T: int, shift: float = 0.0) -> torch.Tensor:
        """(T + 1,) fp64 grid: the scheduler's schedule for the pipeline's call (shift 0), else sigma_grid(T, shift).
        Computed as set_timesteps computes it (numpy float32, its order of operations): its values are
        pipe.scheduler.sigmas bit for bit (an exact fp64 grid differs from them by up to an ulp, 1.2e-7)."""
        if shift:
            return sigma_grid(T, shift)
        cfg = self.scheduler
        if any(cfg.get(k) for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas")):
            raise ValueError(f"{self.root}/scheduler: karras/exponential/beta/inverted sigmas are not supported")
        if T < 2 and cfg.get("shift_terminal"):
            raise ValueError("T (sampling steps) must be >= 2 with shift_terminal (T = 1 gives the pipeline NaN)")
        s = np.linspace(1.0, 1 / T, T).astype(np.float32)  # the pipeline's sigmas, as the scheduler takes them
        if cfg["use_dynamic_shifting"]:
            L = (self.h // 2) * (self.w // 2)
            slope = (cfg["max_shift"] - cfg["base_shift"]) / (cfg["max_image_seq_len"] - cfg["base_image_seq_len"])
            mu = slope * L + (cfg["base_shift"] - slope * cfg["base_image_seq_len"])  # calculate_shift
            a = math.exp(mu) if cfg["time_shift_type"] == "exponential" else mu
            s = a / (a + (1 / s - 1))
        else:
            s = cfg["shift"] * s / (1 + (cfg["shift"] - 1) * s)
        if cfg.get("shift_terminal"):
            s = 1 - (1 - s) / ((1 - s[-1]) / (1 - cfg["shift_terminal"]))
        return torch.cat([torch.from_numpy(s).double(), torch.zeros(1, dtype=torch.float64)])

    # ---------------------------------------------------------------- prompt conditioning c
    def encode(self, prompts: list, batch_size: int = 16):
        """Yield each prompt's Cond as QwenImagePipeline.encode_prompt computes it: the template filled in, the last
        hidden layer over the prompt's tokens, the first DROP dropped, cut at max_sequence_length. The encoder is read
        onto the device in the policy's dtype, and freed at the end."""
        tok = Qwen2Tokenizer.from_pretrained(self.root / "tokenizer")
        encoder = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            self.root / "text_encoder", dtype=self.dtype, device_map={"": self.device}).eval()
        try:
            for i in range(0, len(prompts), batch_size):
                ids = tok([TEMPLATE.format(p) for p in prompts[i:i + batch_size]], padding=True, truncation=True,
                          max_length=TOKENIZER_MAX_LENGTH + DROP, return_tensors="pt").to(self.device)
                hidden = encoder(input_ids=ids.input_ids, attention_mask=ids.attention_mask,
                                 output_hidden_states=True).hidden_states[-1]
                for h, m in zip(hidden, ids.attention_mask.bool()):
                    h = h[m][DROP:]  # (S', D) the prompt and the template's end
                    if len(h) > self.max_sequence_length:
                        warnings.warn(f"a prompt has more than {self.max_sequence_length} tokens: truncated, as the "
                                      "pipeline does")
                    h = h[:self.max_sequence_length].to("cpu", self.embed_dtype).clone()[None]
                    yield Cond(h, torch.ones(h.shape[:2], dtype=torch.long))
        finally:
            del encoder

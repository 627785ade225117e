"""A tiny Stable Diffusion 3.5 (same classes, random weights, in-memory vocabularies) for the tests of policy/sd3.py.

Like SD3.5 Medium in kind, not in size: two CLIPTextModelWithProjection (CLIP-L, CLIP-G) and a T5 encoder, an
SD3Transformer2DModel with RMS q/k norms and one dual-attention (MMDiT-X) block, a 16-channel VAE with SD3.5's
scaling/shift factors, FlowMatchEulerDiscreteScheduler(shift=3.0). The CLIP widths (12 + 16) sum to less than T5's
(32), so the pipeline's zero padding of the CLIP sequence is exercised.

save_tiny_sd3(path) writes it in the layout StableDiffusion3Pipeline.save_pretrained gives the real model.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,  # noqa: E402
                       StableDiffusion3Pipeline)
from transformers import CLIPTextConfig, CLIPTextModelWithProjection  # noqa: E402

from tiny_flux import TEXT_DIM, clip_tokenizer, t5_encoder, t5_tokenizer  # noqa: E402

CLIP_L, CLIP_G = (12, 8), (16, 12)  # (hidden size, projection size) of the two CLIPs
POOLED_DIM = CLIP_L[1] + CLIP_G[1]
H = W = 32  # pixels: the VAE downsamples 2x, patches are 2x2 -> 8x8 = 64 tokens
SAMPLE_SIZE = 16  # latent cells: the pipeline's default size is SAMPLE_SIZE * 2 = 32 px


def clip_encoder(width, seed=0) -> CLIPTextModelWithProjection:
    torch.manual_seed(seed)
    hidden, projection = width
    cfg = CLIPTextConfig(vocab_size=len(clip_tokenizer()), hidden_size=hidden, projection_dim=projection,
                         intermediate_size=24, num_hidden_layers=3, num_attention_heads=2, max_position_embeddings=77,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return CLIPTextModelWithProjection(cfg).eval()


def transformer(seed=0) -> SD3Transformer2DModel:
    torch.manual_seed(seed)
    return SD3Transformer2DModel(sample_size=SAMPLE_SIZE, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                                 attention_head_dim=8, num_attention_heads=2, joint_attention_dim=TEXT_DIM,
                                 caption_projection_dim=16, pooled_projection_dim=POOLED_DIM, pos_embed_max_size=12,
                                 dual_attention_layers=(0,), qk_norm="rms_norm").eval()


def vae(seed=0) -> AutoencoderKL:
    """16 latent channels and SD3.5's scaling/shift factors, 2x downsampling (two blocks) instead of 8x."""
    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                         up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=(8, 16), layers_per_block=1,
                         latent_channels=16, norm_num_groups=4, sample_size=H, scaling_factor=1.5305,
                         shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False).eval()


def pipeline() -> StableDiffusion3Pipeline:
    return StableDiffusion3Pipeline(
        transformer=transformer(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae(),
        text_encoder=clip_encoder(CLIP_L, seed=1), tokenizer=clip_tokenizer(),
        text_encoder_2=clip_encoder(CLIP_G, seed=2), tokenizer_2=clip_tokenizer(),
        text_encoder_3=t5_encoder(seed=3), tokenizer_3=t5_tokenizer())


def save_tiny_sd3(path) -> StableDiffusion3Pipeline:
    pipe = pipeline()
    pipe.save_pretrained(path)
    return pipe

"""A tiny FLUX.1 (same classes, random weights, in-memory vocabularies) for the tests of policy/flux.py.

save_tiny_flux(path) writes it in the layout FluxPipeline.save_pretrained gives the real model.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline,  # noqa: E402
                       FluxTransformer2DModel)
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel,  # noqa: E402
                          T5Tokenizer)

WORDS = "a photo of cat dog red blue green house tree the on in sky with small big".split()
CHARS = sorted(set("".join(WORDS)))
TEXT_DIM, POOLED_DIM = 32, 24


def clip_tokenizer() -> CLIPTokenizer:
    """Byte-level BPE with single characters only (no merges); ids 0/1 are the BOS/EOS tokens."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in CHARS:
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def t5_tokenizer() -> T5Tokenizer:
    """Unigram with whole words and single characters; ids 0/1/2 are pad/eos/unk as in T5."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    pieces += [("\u2581" + w, -1.0) for w in WORDS] + [(ch, -5.0) for ch in CHARS]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def clip_encoder(seed=0) -> CLIPTextModel:
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=len(clip_tokenizer()), hidden_size=POOLED_DIM, intermediate_size=37,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return CLIPTextModel(cfg).eval()


def t5_encoder(seed=0) -> T5EncoderModel:
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=len(t5_tokenizer()), d_model=TEXT_DIM, d_ff=37, d_kv=8, num_layers=2,
                   num_heads=4, relative_attention_num_buckets=8)
    return T5EncoderModel(cfg).eval()


def transformer(in_channels=64, guidance_embeds=True, seed=0) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    return FluxTransformer2DModel(patch_size=1, in_channels=in_channels, num_layers=1, num_single_layers=1,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=TEXT_DIM,
                                  pooled_projection_dim=POOLED_DIM, guidance_embeds=guidance_embeds,
                                  axes_dims_rope=(4, 6, 6)).eval()


def vae(seed=0) -> AutoencoderKL:
    """16 latent channels like FLUX's VAE, 2x downsampling (two blocks) instead of 8x."""
    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                         up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=(8, 16), layers_per_block=1,
                         latent_channels=16, norm_num_groups=4, sample_size=32, scaling_factor=0.3611,
                         shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False).eval()


def pipeline(pixel_space=False, guidance_embeds=True, t5_seed=0) -> FluxPipeline:
    """The whole tiny pipeline. Its scheduler applies no shift, so sigmas=sde.sigma_grid(T)[:-1] is used as is."""
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False),
        vae=None if pixel_space else vae(),
        text_encoder=clip_encoder(), tokenizer=clip_tokenizer(),
        text_encoder_2=t5_encoder(t5_seed), tokenizer_2=t5_tokenizer(),
        transformer=transformer(12 if pixel_space else 64, guidance_embeds))


def save_tiny_flux(path, **kwargs) -> FluxPipeline:
    pipe = pipeline(**kwargs)
    pipe.save_pretrained(path)
    return pipe

"""A tiny Qwen-Image (same classes, random weights, an in-memory vocabulary) for the tests of policy/qwen_image.py.

save_tiny_qwen_image(path) writes it in the layout QwenImagePipeline.save_pretrained gives the real model. The
tokenizer is byte-level BPE with whole-word merges for the words of the pipeline's prompt template, so that the
template's system part is 34 tokens as with the real Qwen2 vocabulary (the pipeline drops exactly 34).
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,  # noqa: E402
                       QwenImageTransformer2DModel)
from tokenizers import AddedToken  # noqa: E402
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer  # noqa: E402

BARE = ("system", "user", "assistant", "Describe")  # the template's words not after a space
WORDS = ("the image by detailing color shape size texture quantity text spatial relationships of objects and "
         "background a photo cat dog red blue green house tree on in sky with small big").split()
SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
TEXT_DIM = 16
# the released Qwen/Qwen-Image scheduler/scheduler_config.json
SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, invert_sigmas=False, max_image_seq_len=8192, max_shift=0.9,
                 num_train_timesteps=1000, shift=1.0, shift_terminal=0.02, stochastic_sampling=False,
                 time_shift_type="exponential", use_beta_sigmas=False, use_dynamic_shifting=True,
                 use_exponential_sigmas=False, use_karras_sigmas=False)


def _byte_chars() -> list:
    """The 256 characters byte-level BPE writes bytes as (GPT-2's table)."""
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def tokenizer() -> Qwen2Tokenizer:
    """Single bytes, plus whole words built by left-to-right merges: first every word after a space ('Ġ' + word),
    then the template's bare words, so that no merge of one word splits another."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL)}
    for ch in _byte_chars():
        vocab.setdefault(ch, len(vocab))
    merges = []
    for w in ["\u0120" + w for w in WORDS] + list(BARE):
        for k in range(2, len(w) + 1):
            if w[:k] not in vocab:
                merges.append((w[:k - 1], w[k - 1]))
                vocab[w[:k]] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges)
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL[1:]], special_tokens=True)
    return tok


def text_encoder(seed=0) -> Qwen2_5_VLForConditionalGeneration:
    torch.manual_seed(seed)
    cfg = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=TEXT_DIM, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=len(tokenizer()), rope_theta=1e6, bos_token_id=0,
                         eos_token_id=0, pad_token_id=0,
                         rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=TEXT_DIM),
        hidden_size=TEXT_DIM, vocab_size=len(tokenizer()), bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return Qwen2_5_VLForConditionalGeneration(cfg).eval()


def vae(seed=0) -> AutoencoderKLQwenImage:
    """16 latent channels like Qwen-Image's VAE, 4x downsampling (two stages) instead of 8x; random statistics."""
    torch.manual_seed(seed)
    mean = (torch.rand(16) - 0.5).tolist()
    std = (torch.rand(16) + 0.5).tolist()
    return AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2, 2], num_res_blocks=1,
                                  temperal_downsample=[False, True], latents_mean=mean, latents_std=std).eval()


def transformer(seed=0) -> QwenImageTransformer2DModel:
    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=2,
                                       attention_head_dim=16, num_attention_heads=2, joint_attention_dim=TEXT_DIM,
                                       axes_dims_rope=(4, 6, 6)).eval()


def pipeline(encoder_seed=0) -> QwenImagePipeline:
    return QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=vae(),
                             text_encoder=text_encoder(encoder_seed), tokenizer=tokenizer(),
                             transformer=transformer())


def save_tiny_qwen_image(path, **kwargs) -> QwenImagePipeline:
    pipe = pipeline(**kwargs)
    pipe.save_pretrained(path)
    return pipe

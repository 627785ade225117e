"""The released configurations of the families bench/scale.py simulates besides FLUX.1-dev (whose configs are
launch/preflight.py's FLUX_DEV, FLUX_VAE, T5_XXL, CLIP_L), and each family's usual training setting.

One dict per component, as its config.json gives it (only the keys that differ from the class defaults, or matter);
each says where its numbers come from and how sure we are. The simulation builds the classes from these with random
(fake) weights: only the shapes matter.
"""

# ------------------------------------------------------------------------------------------------
# Stable Diffusion 3.5 (StableDiffusion3Pipeline: policy/sd3.py)
# ------------------------------------------------------------------------------------------------
# stabilityai/stable-diffusion-3.5-medium transformer/config.json (SD3Transformer2DModel, MMDiT-X: blocks 0-12 have a
# second attention). Checked against several public copies of the file (found with the search tool: identical
# values); sure.
SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                   num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                   pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
                   dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
# stabilityai/stable-diffusion-3.5-large transformer/config.json: 38 blocks of 38 x 64, no dual-attention blocks.
# Checked against several public copies (pos_embed 192^2 = 36864 positions in the checkpoint); sure.
SD35_LARGE = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
                  num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, dual_attention_layers=(),
                  qk_norm="rms_norm")
# vae/config.json of both SD3.5 releases (AutoencoderKL, 16 latent channels, 8x): FLUX.1's VAE architecture with
# SD3.5's scaling/shift factors (1.5305, 0.0609: policy/sd3.py's docstring and public copies); sure.
SD35_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609,
                use_quant_conv=False, use_post_quant_conv=False)
# text_encoder/config.json (CLIPTextModelWithProjection): OpenAI CLIP ViT-L/14's text tower, as FLUX's CLIP-L
# (launch/preflight.py CLIP_L) with its 768-wide projection; quick_gelu. Sure.
SD35_CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu")
# text_encoder_2/config.json (CLIPTextModelWithProjection): OpenCLIP ViT-bigG-14's text tower: hidden 1280, 32 layers,
# 20 heads, intermediate 5120, projection 1280, gelu (from memory and the task's brief; sure of the sizes, 694 M
# parameters with the projection).
SD35_CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                   num_attention_heads=20, max_position_embeddings=77, projection_dim=1280, hidden_act="gelu")
# text_encoder_3: T5-XXL's encoder, the same as FLUX.1's (launch/preflight.py T5_XXL; sure).

# The usual training setting. SD3.5 Medium: Flow-GRPO's every SD3.5-M recipe (yifan123/flow_grpo config/grpo.py,
# pickscore_sd3 / geneval_sd3 / general_ocr_sd3: resolution 512, guidance_scale 4.5, 10 sampling steps for training
# and 40 for evaluation, LoRA) - policy/sd3.py's DEFAULTS (512 px, guidance 4.5, max_sequence_length 256, the
# pipeline's default). We keep G2RPO's T = 16 (Table 4), not Flow-GRPO's 10, so that the families compare.
# SD3.5 Large: no public RL recipe found (Flow-GRPO trains only Medium); 1024 px, the resolution Large was trained
# and is released for (model card: ~1 megapixel), guidance 4.5 as for Medium (the Large model card suggests 3.5-4.5).
SD35_MEDIUM_SETTING = dict(height=512, width=512, seq_len=256, guidance=4.5)
SD35_LARGE_SETTING = dict(height=1024, width=1024, seq_len=256, guidance=4.5)

# ------------------------------------------------------------------------------------------------
# Qwen-Image (QwenImagePipeline: policy/qwen_image.py)
# ------------------------------------------------------------------------------------------------
# Qwen/Qwen-Image transformer/config.json (QwenImageTransformer2DModel): 60 double-stream blocks of 24 x 128, 20.4 B
# parameters. The class defaults of diffusers 0.42.1 are the released values (the family's author's notes,
# /tmp/notes/qwen.md: high confidence).
QWEN_IMAGE = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                  num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56))
# vae/config.json (AutoencoderKLQwenImage, a Wan-2.1-style causal 3-D VAE run on one frame, 8x): class defaults
# (high confidence, same notes); latents_mean / latents_std are the class defaults too.
QWEN_IMAGE_VAE = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                      temperal_downsample=[False, True, True], dropout=0.0)
# text_encoder/config.json (Qwen2_5_VLForConditionalGeneration = Qwen2.5-VL-7B-Instruct): the language model (hidden
# 3584, 28 layers, 28 query / 4 key-value heads, intermediate 18944, vocabulary 152064, untied lm_head) and the vision
# tower (32 blocks of 1280, intermediate 3420, 16 heads, merged to 3584), which QwenImagePipeline loads with it though
# text-to-image never runs it. From memory (the notes: high confidence for the sizes, +-2 % on the count: 8.3 B).
QWEN_VL_TEXT = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                    num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000, rms_norm_eps=1e-6,
                    rope_theta=1e6, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
                    tie_word_embeddings=False)
QWEN_VL_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                      fullatt_block_indexes=[7, 15, 23, 31], in_channels=3, hidden_act="silu")
# The usual training setting: 1024 x 1024, QwenImagePipeline's default (128 x vae_scale_factor) and
# policy/qwen_image.py's DEFAULTS, true CFG 4.0 against " " (the model card's). DanceGRPO / Flow-Factory settings for
# Qwen-Image were not found in the stored corpus (the family's notes say the same); verl's Flow-GRPO example trains it
# with LoRA rank 64 but names no resolution we could confirm. Text tokens: a prompt's own length, not a fixed 512
# (policy/qwen_image.py Cond): we assume 128 (the prompt + 5 template-suffix tokens; longer than most HPDv2 prompts,
# an assumption), the negative " " is 6 tokens, and the encoder reads the 34 template tokens before them.
QWEN_IMAGE_SETTING = dict(height=1024, width=1024, seq_len=128, negative_len=6, template_len=34, guidance=4.0)

"""The reward models R(x_0, c) of Eqs. 4, 8 and 11: HPS-v2.1, CLIP score and PickScore.

Every reward is an object with a `name` and `score(images, prompts) -> (B,) float32`, where
`images` is a float tensor (B, 3, H, W) in [0, 1] (any H, W) and `prompts` a list of B strings
(or one string for the whole batch). Scoring runs under torch.no_grad; the text features of a
prompt are computed once and kept in memory (a group of G images shares one prompt).

    name       model (local files)                       score R
    ----       -------------------                       -------
    hps        open_clip ViT-H-14 + HPS_v2.1 state dict  cos(f_img, f_txt), about 0.2-0.4
    clip       open_clip DFN5B CLIP ViT-H-14-378         cos(f_img, f_txt) (no x100)
    pickscore  transformers CLIPModel PickScore_v1       logit_scale.exp() * cos(f_img, f_txt), about 20-23
                                                         (Table 1's 0.22-0.24 read as this / 100)

    name       preprocessing of the float tensor
    hps        resize the LONGEST side to 224 (bicubic), zero-pad to a centred 224 x 224 square,
               OpenAI mean/std
    clip       the model's own preprocess_cfg (DFN5B: squash to 378 x 378, bicubic, OpenAI mean/std)
    pickscore  the CLIP-ViT-H-14 processor (shortest side 224, centre crop) without its 1/255 rescale

f_img, f_txt are the L2-normalised image and text embeddings. HPS's own validation transform is
not open_clip's default (resize the SHORTEST side, centre crop): it keeps the whole image and pads,
so non-square images score differently under the two. HPS applies it to the float tensor (ToTensor
comes first), so bicubic overshoot outside [0, 1] is kept, as here. The reference trainers score
images after a uint8 PIL round trip and HPS under fp16 autocast; we score the float tensor, in
`dtype` (default fp32): differences of the order of the 1/255 quantisation.

The registry that turns names ('hps+clip') into these objects is `rewards/__init__.py`.
"""
import os

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


# ---------------------------------------------------------------------------------------------
# preprocessing of a float batch (B, 3, H, W) in [0, 1]
# ---------------------------------------------------------------------------------------------
def resize_longest_pad(x: torch.Tensor, size: int, interpolation=InterpolationMode.BICUBIC) -> torch.Tensor:
    """HPS's resize: scale so the longest side is `size` (sides rounded), then zero-pad to a centred
    (size, size) square (left/top get the floor of half the padding). (B, 3, H, W) -> (B, 3, size, size).
    HPS skips the pad as well when the longest side is already `size`, which would hand the ViT a
    non-square input it cannot take; we always pad (identical for square inputs)."""
    H, W = x.shape[-2:]
    scale = size / max(H, W)
    h, w = round(H * scale), round(W * scale)
    if (h, w) != (H, W):
        x = TF.resize(x, [h, w], interpolation=interpolation, antialias=True)
    pad_h, pad_w = size - h, size - w
    return F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)


def preprocess(x: torch.Tensor, size: int, mean, std, resize_mode: str = "shortest",
               interpolation: str = "bicubic") -> torch.Tensor:
    """open_clip's three eval transforms on a float batch, then normalize: (x - mean) / std. (B, 3, size, size).
    'longest' is HPS's transform above; 'shortest' resizes the short side and centre-crops (open_clip's
    default); 'squash' resizes both sides to `size` (DFN5B)."""
    mode = InterpolationMode.BILINEAR if interpolation == "bilinear" else InterpolationMode.BICUBIC
    if resize_mode == "longest":
        x = resize_longest_pad(x, size, mode)
    elif resize_mode == "squash":
        x = TF.resize(x, [size, size], interpolation=mode, antialias=True)
    elif resize_mode == "shortest":
        x = TF.center_crop(TF.resize(x, size, interpolation=mode, antialias=True), [size, size])
    else:
        raise ValueError(f"resize_mode must be 'longest', 'squash' or 'shortest', got {resize_mode!r}")
    return normalize(x, mean, std)


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """(x - mean) / std per channel, mean and std as (3, 1, 1) tensors of x's dtype: torchvision's normalize (the
    same subtraction, then division: the same numbers) without its check that std != 0, a data-dependent branch
    that fake tensors (bench/scale.py) cannot answer."""
    return (x - x.new_tensor(mean)[:, None, None]) / x.new_tensor(std)[:, None, None]


def _square(size) -> int:
    if isinstance(size, (tuple, list)):
        if size[0] != size[1]:
            raise ValueError(f"only square model inputs are supported, got {tuple(size)}")
        size = size[0]
    return int(size)


# ---------------------------------------------------------------------------------------------
# the rewards
# ---------------------------------------------------------------------------------------------
class _Reward:
    """Shared plumbing: prompt handling and the per-prompt text-feature cache."""

    def _prompts(self, prompts, B: int) -> list:
        prompts = [prompts] * B if isinstance(prompts, str) else list(prompts)
        if len(prompts) != B:
            raise ValueError(f"{self.name}: {B} images but {len(prompts)} prompts")
        return prompts

    def text_features(self, prompts: list) -> torch.Tensor:
        """(N, D) fp32 normalised text features; each new prompt is encoded once, alone: in a batch its numbers
        would depend on its neighbours (padding, kernel choice), so a score would change with the world size."""
        for p in dict.fromkeys(p for p in prompts if p not in self._cache):
            self._cache[p] = F.normalize(self._encode_text([p]).float(), dim=-1)[0]
        return torch.stack([self._cache[p] for p in prompts])

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts) -> torch.Tensor:
        """images (B, 3, H, W) in [0, 1], prompts B strings (or one) -> (B,) float32 on images.device."""
        prompts = self._prompts(prompts, images.shape[0])
        x = images.to(self.device, torch.float32)
        f_img = F.normalize(self._encode_image(x).float(), dim=-1)  # (B, D)
        cos = (f_img * self.text_features(prompts)).sum(-1)  # (B,)
        return (self.scale * cos).float().to(images.device)


class OpenClipReward(_Reward):
    """cos(f_img, f_txt) of an open_clip model: HPS-v2.1 ('longest' preprocessing) and CLIP score."""

    scale = 1.0

    def __init__(self, name, model, tokenizer, size, mean=OPENAI_MEAN, std=OPENAI_STD,
                 resize_mode="shortest", interpolation="bicubic", device="cpu", dtype=torch.float32):
        self.name, self.tokenizer, self.device, self.dtype = name, tokenizer, torch.device(device), dtype
        self.model = model.to(self.device, dtype).eval().requires_grad_(False)
        self.size, self.mean, self.std = _square(size), tuple(mean), tuple(std)
        self.resize_mode, self.interpolation = resize_mode, interpolation
        self._cache = {}

    def _encode_image(self, x):
        x = preprocess(x, self.size, self.mean, self.std, self.resize_mode, self.interpolation)
        return self.model.encode_image(x.to(self.dtype))

    def _encode_text(self, prompts):
        return self.model.encode_text(self.tokenizer(prompts).to(self.device))


class PickScore(_Reward):
    """logit_scale.exp() * cos(f_img, f_txt) of a transformers CLIPModel with its CLIPProcessor."""

    name = "pickscore"

    def __init__(self, model, processor, device="cpu", dtype=torch.float32):
        self.processor, self.device, self.dtype = processor, torch.device(device), dtype
        self.model = model.to(self.device, dtype).eval().requires_grad_(False)
        self.scale = self.model.logit_scale.exp().float()
        self._cache = {}

    def _encode_image(self, x):
        # the processor's default rescale (x / 255) is for uint8 input: ours is already in [0, 1]
        pixels = self.processor.image_processor(list(x), do_rescale=False, input_data_format="channels_first",
                                                return_tensors="pt")["pixel_values"]
        return _features(self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype)))

    def _encode_text(self, prompts):
        tokens = self.processor.tokenizer(prompts, padding=True, truncation=True, max_length=77,
                                          return_tensors="pt")
        return _features(self.model.get_text_features(**tokens.to(self.device)))


def _features(out) -> torch.Tensor:
    # transformers < 5 returns the projected embedding, >= 5 an output whose pooler_output holds it
    return out if isinstance(out, torch.Tensor) else out.pooler_output


# ---------------------------------------------------------------------------------------------
# loaders (local files only)
# ---------------------------------------------------------------------------------------------
def load_hps(checkpoint: str, arch: str = "ViT-H-14", image_size=None, device="cpu", dtype=torch.float32):
    """HPS-v2.1: open_clip `arch` (no pretrained download) with the state dict of `checkpoint`
    ({"state_dict": ...} as released, or a plain state dict); image_size defaults to the model's (224)."""
    import open_clip

    model = open_clip.create_model(arch, pretrained=None)
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    size = image_size or model.visual.image_size
    return OpenClipReward("hps", model, open_clip.get_tokenizer(arch), size, OPENAI_MEAN, OPENAI_STD,
                          "longest", "bicubic", device, dtype)


def load_clip(model_path: str, arch: str = "ViT-H-14-378-quickgelu", preprocess_cfg=None, device="cpu",
              dtype=torch.float32):
    """CLIP score: an open_clip folder (open_clip_config.json + weights, e.g. DFN5B-CLIP-ViT-H-14-378),
    or a checkpoint file of architecture `arch`. Preprocessing: the model's preprocess_cfg, overridden by
    `preprocess_cfg` (a bare DFN5B checkpoint needs {'resize_mode': 'squash'})."""
    import open_clip

    name = "local-dir:" + model_path if os.path.isdir(model_path) else arch
    model = open_clip.create_model(name, pretrained=None if os.path.isdir(model_path) else model_path,
                                   force_preprocess_cfg=preprocess_cfg)
    cfg = model.visual.preprocess_cfg
    return OpenClipReward("clip", model, open_clip.get_tokenizer(name), cfg["size"], cfg["mean"], cfg["std"],
                          cfg["resize_mode"], cfg["interpolation"], device, dtype)


def load_pickscore(model_path: str, processor_path: str, device="cpu", dtype=torch.float32):
    """PickScore: transformers CLIPModel from `model_path` (PickScore_v1), processor from `processor_path`."""
    from transformers import AutoProcessor, CLIPModel

    return PickScore(CLIPModel.from_pretrained(model_path), AutoProcessor.from_pretrained(processor_path),
                     device, dtype)

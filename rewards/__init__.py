"""The reward models R(x_0, c) of Eqs. 4, 8 and 11, by name: one registry for training and evaluation.

    clip.py           HPS-v2.1, CLIP score, PickScore (open_clip / transformers CLIP)
    imagereward.py    ImageReward (BLIP) without its package
    unifiedreward.py  UnifiedReward judge (Qwen-VL), HTTP or local

Every reward is an object with a `name` and `score(images, prompts) -> (B,) float32` on images
(B, 3, H, W) in [0, 1]. `load_rewards("hps+clip", hps_checkpoint=..., clip_model=...)` returns one
object per name: the advantages are normalised per reward and then summed (Eq. 11). Names starting
with 'toy' are the small world's rule-based rewards (toy/rewards.py), imported only when asked for.
"""
import importlib
import os

import torch

from .clip import OPENAI_MEAN, OPENAI_STD, OpenClipReward, PickScore, load_clip, load_hps, load_pickscore, \
    preprocess, resize_longest_pad

# name -> (loader, {keyword: loader argument}, required keywords, where the files come from)
REWARDS = {
    "hps": (load_hps, {"hps_checkpoint": "checkpoint", "hps_arch": "arch"}, ("hps_checkpoint",),
            "HPS_v2.1_compressed.pt from the HPSv2 release (Hugging Face repo xswu/HPSv2)"),
    "clip": (load_clip, {"clip_model": "model_path", "clip_arch": "arch"}, ("clip_model",),
             "the DFN5B CLIP folder (Hugging Face repo apple/DFN5B-CLIP-ViT-H-14-378)"),
    "pickscore": (load_pickscore, {"pickscore_model": "model_path", "pickscore_processor": "processor_path"},
                  ("pickscore_model", "pickscore_processor"),
                  "the PickScore_v1 folder (Hugging Face repo yuvalkirstain/PickScore_v1) and the "
                  "CLIP-ViT-H-14 processor folder (laion/CLIP-ViT-H-14-laion2B-s32B-b79K)"),
}


def load_rewards(spec: str, device="cpu", dtype=torch.float32, **paths) -> list:
    """'hps+clip' -> [hps reward, clip reward]: one object per '+'-separated name, in order.
    paths: hps_checkpoint, hps_arch, clip_model, clip_arch, pickscore_model, pickscore_processor
    (None or '' = not given)."""
    known = {k for _, kw, _, _ in REWARDS.values() for k in kw}
    if set(paths) - known:
        raise TypeError(f"unknown reward option(s) {sorted(set(paths) - known)}; valid: {sorted(known)}")
    names = [n.strip() for n in spec.split("+")]
    if len(set(names)) != len(names):
        raise ValueError(f"reward spec {spec!r} names a reward twice")
    rewards = []
    for name in names:
        if name.startswith("toy"):
            toy = importlib.import_module("toy.rewards")  # lazy: the small CPU world's rule-based rewards
            if name not in toy.TOY_REWARDS:
                raise ValueError(f"unknown toy reward {name!r}; valid: {sorted(toy.TOY_REWARDS)}")
            rewards.append(toy.TOY_REWARDS[name]())
            continue
        if name not in REWARDS:
            raise ValueError(f"unknown reward {name!r} in {spec!r}; valid: {sorted(REWARDS)} "
                             f"or a 'toy-...' name (toy/rewards.py)")
        loader, keywords, required, origin = REWARDS[name]
        for key in required:
            path = paths.get(key)
            if not path:
                raise ValueError(f"reward '{name}' needs --{key.replace('_', '-')} ({key}=...): {origin}")
            if not os.path.exists(path):
                raise FileNotFoundError(f"reward '{name}': {key}={path!r} does not exist; expected {origin}")
        kwargs = {arg: paths[key] for key, arg in keywords.items() if paths.get(key)}
        rewards.append(loader(**kwargs, device=device, dtype=dtype))
    return rewards

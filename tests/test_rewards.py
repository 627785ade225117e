"""rewards/clip.py and the registry (rewards/__init__.py): HPS's transform against an independent PIL reference, the three scores against
hand computations on tiny random models loaded through the real path-based loaders, the
text-feature cache and the registry. No weights are downloaded."""
import dataclasses
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from hypothesis import assume, given, settings, strategies as st
from PIL import Image

import rewards

ROOT = Path(__file__).resolve().parent.parent
TINY = "tiny-ViT-test"  # a registered open_clip architecture: ViT-H-14's layout, thousands of times smaller
TINY_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
PROMPTS = ["a red cube on a table", "a watercolor fox", "a red cube on a table"]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    d = tmp_path_factory.mktemp("arch")
    (d / f"{TINY}.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(d / f"{TINY}.json")
    torch.manual_seed(0)
    return open_clip.create_model(TINY, pretrained=None).eval()


@pytest.fixture(scope="module")
def hps_ckpt(tiny_clip, tmp_path_factory):
    path = tmp_path_factory.mktemp("hps") / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": tiny_clip.state_dict()}, path)
    return str(path)


@pytest.fixture(scope="module")
def clip_dir(tiny_clip, tmp_path_factory):
    """An open_clip folder as the DFN5B release ships it: open_clip_config.json + weights."""
    d = tmp_path_factory.mktemp("dfn")
    pre = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "interpolation": "bicubic",
           "resize_mode": "squash"}
    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CFG, "preprocess_cfg": pre}))
    torch.save(tiny_clip.state_dict(), d / "open_clip_pytorch_model.bin")
    return str(d)


def images(B, H, W, seed=0):
    return torch.rand(B, 3, H, W, generator=torch.Generator().manual_seed(seed))


def by_hand_cos(model, x_pre, prompts):
    tok = open_clip.get_tokenizer(TINY)(prompts)
    with torch.no_grad():
        f_i = F.normalize(model.encode_image(x_pre), dim=-1)
        f_t = F.normalize(model.encode_text(tok), dim=-1)
    return (f_i * f_t).sum(-1)


# ---- HPS transform ------------------------------------------------------------------------------
def pil_hps_transform(x, size):
    """HPS's validation transform written step by step with PIL (float 'F' images, one per channel)."""
    B, C, H, W = x.shape
    scale = size / max(H, W)
    h, w = round(H * scale), round(W * scale)
    top, left = (size - h) // 2, (size - w) // 2
    out = np.zeros((B, C, size, size), np.float32)  # zero padding (before normalisation)
    for b in range(B):
        for c in range(C):
            im = Image.fromarray(x[b, c].numpy(), mode="F").resize((w, h), Image.BICUBIC)
            out[b, c, top:top + h, left:left + w] = np.asarray(im)
    mean, std = np.array(rewards.OPENAI_MEAN)[:, None, None], np.array(rewards.OPENAI_STD)[:, None, None]
    return torch.from_numpy(((out - mean) / std).astype(np.float32))


@settings(max_examples=12, deadline=None)
@given(H=st.integers(5, 90), W=st.integers(5, 90), size=st.sampled_from([16, 32, 224]))
def test_hps_transform_matches_pil_reference(H, W, size):
    assume(round(min(H, W) * size / max(H, W)) >= 2)  # a 1-pixel strip: torch and PIL differ there
    x = images(2, H, W, seed=H * 100 + W)
    ours = rewards.preprocess(x, size, rewards.OPENAI_MEAN, rewards.OPENAI_STD, "longest")
    assert ours.shape == (2, 3, size, size)
    torch.testing.assert_close(ours, pil_hps_transform(x, size), atol=1e-4, rtol=0)


def test_hps_transform_pads_centred_and_differs_from_open_clip_default():
    x = images(1, 48, 96)
    ours = rewards.resize_longest_pad(x, 32)  # 48 x 96 -> 16 x 32, 8 zero rows above and below
    assert ours[..., :8, :].abs().max() == 0 and ours[..., 24:, :].abs().max() == 0
    assert ours[..., 8:24, :].abs().min() > 0
    default = open_clip.image_transform(32, is_train=False)(x[0])  # shortest side + centre crop
    hps = rewards.preprocess(x, 32, rewards.OPENAI_MEAN, rewards.OPENAI_STD, "longest")[0]
    assert (default - hps).abs().max() > 0.5
    # for a square image the two agree
    sq = images(1, 64, 64)
    hps_sq = rewards.preprocess(sq, 32, rewards.OPENAI_MEAN, rewards.OPENAI_STD, "longest")[0]
    torch.testing.assert_close(open_clip.image_transform(32, is_train=False)(sq[0]), hps_sq)


# ---- HPS and CLIP score on a tiny open_clip model --------------------------------------------------
@pytest.mark.parametrize("plain", [False, True])
def test_hps_score_is_cosine_of_the_checkpoint_model(tiny_clip, hps_ckpt, tmp_path, plain):
    path = hps_ckpt
    if plain:  # a bare state dict is accepted too
        path = str(tmp_path / "plain.pt")
        torch.save(tiny_clip.state_dict(), path)
    hps = rewards.load_hps(path, arch=TINY)
    x = images(3, 42, 72)
    s = hps.score(x, PROMPTS)
    assert hps.name == "hps" and s.shape == (3,) and s.dtype == torch.float32
    expected = by_hand_cos(tiny_clip, pil_hps_transform(x, 32), PROMPTS)
    torch.testing.assert_close(s, expected, atol=1e-5, rtol=0)
    one_by_one = torch.cat([hps.score(x[i:i + 1], [p]) for i, p in enumerate(PROMPTS)])
    torch.testing.assert_close(s, one_by_one, atol=1e-5, rtol=0)


def test_reduced_precision_model_returns_fp32(hps_ckpt, pickscore_dirs):
    x = images(2, 42, 72)
    for load in (lambda **kw: rewards.load_hps(hps_ckpt, arch=TINY, **kw),
                 lambda **kw: rewards.load_pickscore(*pickscore_dirs, **kw)):
        r32, r16 = load(), load(dtype=torch.bfloat16)
        s32, s16 = r32.score(x, PROMPTS[:2]), r16.score(x, PROMPTS[:2])
        assert s16.dtype == torch.float32 and next(r16.model.parameters()).dtype == torch.bfloat16
        torch.testing.assert_close(s16 / r32.scale, s32 / r32.scale, atol=1e-2, rtol=0)  # cosines agree


def test_hps_image_size_parameter(hps_ckpt):
    hps = rewards.load_hps(hps_ckpt, arch=TINY, image_size=48)
    assert hps.size == 48
    with pytest.raises(RuntimeError):  # a 48 x 48 input does not fit the 32 x 32 ViT: the size is used
        hps.score(images(1, 40, 72), "x")
    assert rewards.load_hps(hps_ckpt, arch=TINY).size == 32


def test_clip_score_uses_the_folder_config(tiny_clip, clip_dir):
    clip = rewards.load_clip(clip_dir)
    x = images(2, 40, 72)
    s = clip.score(x, PROMPTS[:2])
    squash = TF.normalize(TF.resize(x, [32, 32], antialias=True, interpolation=TF.InterpolationMode.BICUBIC),
                          [0.5, 0.4, 0.3], [0.2, 0.25, 0.3])
    assert clip.name == "clip" and s.shape == (2,)
    torch.testing.assert_close(s, by_hand_cos(tiny_clip, squash, PROMPTS[:2]), atol=1e-5, rtol=0)
    # a checkpoint file plus an architecture name works as well; here with open_clip's default transform
    f = rewards.load_clip(os.path.join(clip_dir, "open_clip_pytorch_model.bin"), arch=TINY)
    default = open_clip.image_transform(32, is_train=False)(x)
    expected = by_hand_cos(tiny_clip, default, PROMPTS[:2])
    torch.testing.assert_close(f.score(x, PROMPTS[:2]), expected, atol=1e-5, rtol=0)


def test_text_features_are_cached(hps_ckpt):
    hps = rewards.load_hps(hps_ckpt, arch=TINY)
    calls = []
    encode = hps.model.encode_text
    hps.model.encode_text = lambda t, **kw: calls.append(len(t)) or encode(t, **kw)
    hps.score(images(3, 32, 32), PROMPTS)  # two distinct prompts: each encoded once, alone
    hps.score(images(2, 32, 32), "a watercolor fox")
    assert calls == [1, 1]


def test_a_prompts_features_do_not_depend_on_its_neighbours(hps_ckpt, pickscore_dirs):
    """evaluate.py's scores are the same on any world size only if a prompt's text features are: its batch
    neighbours (which prompts one rank meets first) must not change them (bitwise)."""
    for make in (lambda: rewards.load_hps(hps_ckpt, arch=TINY),
                 lambda: rewards.load_pickscore(*pickscore_dirs)):
        together, alone = make(), make()
        together.text_features(["a cat", "a much longer prompt about a red house on a hill"])
        assert torch.equal(together.text_features(["a cat"]), alone.text_features(["a cat"]))


# ---- PickScore on a tiny transformers CLIPModel ----------------------------------------------------
@pytest.fixture(scope="module")
def pickscore_dirs(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    d = tmp_path_factory.mktemp("pick")
    torch.manual_seed(1)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37,
                           num_hidden_layers=1, num_attention_heads=2),
        projection_dim=16, logit_scale_init_value=math.log(100.0))
    CLIPModel(cfg).eval().save_pretrained(d / "model")
    bpe = open_clip.tokenizer.SimpleTokenizer()  # CLIP's own BPE vocabulary, shipped with open_clip
    merges = [p for p, _ in sorted(bpe.bpe_ranks.items(), key=lambda kv: kv[1])]
    special = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}  # HF's spelling
    tok = CLIPTokenizer(vocab={special.get(k, k): v for k, v in bpe.encoder.items()}, merges=merges)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    proc = CLIPProcessor(image_processor=image_processor, tokenizer=tok)
    proc.save_pretrained(d / "processor")
    return str(d / "model"), str(d / "processor")


def test_pickscore_is_scaled_cosine(pickscore_dirs):
    from transformers import AutoProcessor, CLIPModel

    pick = rewards.load_pickscore(*pickscore_dirs)
    x = images(3, 40, 64)  # shortest side 40 -> 32: 32 x 51, centre crop columns 9..41
    s = pick.score(x, PROMPTS)
    model = CLIPModel.from_pretrained(pickscore_dirs[0]).eval()
    tok = AutoProcessor.from_pretrained(pickscore_dirs[1]).tokenizer
    ids = open_clip.get_tokenizer(TINY)(PROMPTS[:1])[0]
    assert tok(PROMPTS[0])["input_ids"] == ids[ids > 0].tolist()  # the same CLIP BPE ids as open_clip's
    pix = TF.resize(x, [32, 51], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)[..., 9:41]
    pix = TF.normalize(pix, list(rewards.OPENAI_MEAN), list(rewards.OPENAI_STD))  # [0, 1] input: no 1/255
    with torch.no_grad():
        f_i = F.normalize(rewards.clip._features(model.get_image_features(pixel_values=pix)), dim=-1)
        t = tok(PROMPTS, padding=True, return_tensors="pt")
        f_t = F.normalize(rewards.clip._features(model.get_text_features(**t)), dim=-1)
    expected = model.logit_scale.exp() * (f_i * f_t).sum(-1)
    assert s.shape == (3,) and s.dtype == torch.float32
    torch.testing.assert_close(s, expected.detach(), atol=1e-4, rtol=0)
    one_by_one = torch.cat([pick.score(x[i:i + 1], p) for i, p in enumerate(PROMPTS)])
    torch.testing.assert_close(s, one_by_one, atol=1e-4, rtol=0)
    calls = []
    encode = pick.model.get_text_features
    pick.model.get_text_features = lambda **kw: calls.append(1) or encode(**kw)
    pick.score(x, ["new prompt"] * 3)
    pick.score(x[:1], "new prompt")
    assert calls == [1]


# ---- registry -------------------------------------------------------------------------------------
def test_registry_order_and_errors(hps_ckpt, clip_dir):
    rs = rewards.load_rewards("hps+clip", hps_checkpoint=hps_ckpt, hps_arch=TINY, clip_model=clip_dir,
                              pickscore_model=None)
    assert [r.name for r in rs] == ["hps", "clip"]
    assert all(r.score(images(2, 24, 40), "a cat").shape == (2,) for r in rs)
    with pytest.raises(ValueError, match=r"--hps-checkpoint.*HPS_v2\.1_compressed\.pt.*HPSv2"):
        rewards.load_rewards("clip+hps", clip_model=clip_dir)
    with pytest.raises(ValueError, match=r"--pickscore-processor.*PickScore_v1.*CLIP-ViT-H-14"):
        rewards.load_rewards("pickscore", pickscore_model=clip_dir)
    with pytest.raises(FileNotFoundError, match=r"--clip-model /nowhere: no such file.*DFN5B"):
        rewards.load_rewards("clip", clip_model="/nowhere")
    with pytest.raises(ValueError, match=r"'hpsv2'.*\['clip', 'hps', 'imagereward', 'pickscore', 'unifiedreward'\]"):
        rewards.load_rewards("hpsv2", hps_checkpoint=hps_ckpt)
    with pytest.raises(TypeError, match="hps_ckpt"):
        rewards.load_rewards("hps", hps_ckpt=hps_ckpt)
    with pytest.raises(ValueError, match="twice"):
        rewards.load_rewards("hps+hps", hps_checkpoint=hps_ckpt, hps_arch=TINY)


# ---- parity with the `hpsv2` package's own scoring code (make venv installs it: requirements-nodeps.txt) ----
def test_matches_hpsv2_package(tiny_clip, hps_ckpt, tmp_path):
    spec = importlib.util.find_spec("hpsv2")
    assert spec, "hpsv2 is not installed: pip install --no-deps -r requirements-nodeps.txt (make venv does)"
    # hpsv2's wheel lacks the BPE file its tokenizer loads at import: import a copy of its
    # open_clip with open_clip's identical vocabulary added (and without hpsv2/__init__'s extras)
    shutil.copytree(os.path.join(os.path.dirname(spec.origin), "src", "open_clip"), tmp_path / "hps_open_clip")
    factory = tmp_path / "hps_open_clip" / "factory.py"  # an unused `from turtle import forward`: it needs Tk
    factory.write_text(factory.read_text().replace("from turtle import forward\n", "", 1))
    shutil.copy(os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz"),
                tmp_path / "hps_open_clip")
    sys.path.insert(0, str(tmp_path))
    try:
        import hps_open_clip as hoc
    finally:
        sys.path.remove(str(tmp_path))
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / f"{TINY}.json").write_text(json.dumps(TINY_CFG))
    hoc.add_model_config(tmp_path / "cfg" / f"{TINY}.json")
    model, _, preprocess_val = hoc.create_model_and_transforms(TINY, None, light_augmentation=True,
                                                               output_dict=True)
    model.load_state_dict(torch.load(hps_ckpt)["state_dict"])
    model.eval()
    x = (images(3, 42, 72) * 255).round() / 255  # uint8-exact, so the PIL round trip below is lossless
    pil = [Image.fromarray((xi.permute(1, 2, 0) * 255).round().byte().numpy()) for xi in x]
    with torch.no_grad():  # hpsv2.img_score.score, minus autocast: its transform, model and diagonal
        out = model(torch.stack([preprocess_val(im) for im in pil]), hoc.get_tokenizer(TINY)(PROMPTS))
        theirs = torch.diagonal(out["image_features"] @ out["text_features"].T)
    assert torch.equal(hoc.get_tokenizer(TINY)(PROMPTS), open_clip.get_tokenizer(TINY)(PROMPTS))
    ours = rewards.load_hps(hps_ckpt, arch=TINY).score(x, PROMPTS)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_one_registry_for_training_and_evaluation():
    """Table 1's metrics in order with their titles and display scale; what each needs (UnifiedReward: a URL OR a
    local folder); a given file that is absent is an error even when optional; a toy name resolves on demand."""
    assert list(rewards.REWARDS) == ["hps", "clip", "pickscore", "imagereward", "unifiedreward"]
    assert [s.title for s in rewards.REWARDS.values()] == ["HPS-v2.1", "CLIP", "PickScore", "ImageReward",
                                                          "UnifiedReward"]
    assert [s.scale for s in rewards.REWARDS.values()] == [1.0, 1.0, 0.01, 1.0, 1.0]  # PickScore / 100
    assert {f.name for f in dataclasses.fields(rewards.RewardOptions)} <= rewards.OPTIONS  # the flags are options
    assert rewards.needs("hps", {}) == f"--hps-checkpoint ({rewards.REWARDS['hps'].origin})"
    assert rewards.needs("unifiedreward", {}).startswith("--unifiedreward-url or --unifiedreward-local (a server")
    assert rewards.needs("unifiedreward", {"unifiedreward_url": "http://127.0.0.1:1/v1"}) == ""
    assert rewards.needs("imagereward", {"imagereward_checkpoint": __file__}).startswith(
        "--imagereward-checkpoint and --imagereward-tokenizer (ImageReward.pt")
    with pytest.raises(FileNotFoundError, match="--unifiedreward-local /nowhere: no such file or folder"):
        rewards.needs("unifiedreward", {"unifiedreward_local": "/nowhere"})
    with pytest.raises(FileNotFoundError, match="--imagereward-med-config"):
        rewards.needs("imagereward", {"imagereward_checkpoint": __file__, "imagereward_tokenizer": __file__,
                                      "imagereward_med_config": "/nowhere"})
    with pytest.raises(ValueError, match="unknown toy reward 'toy-nope'"):
        rewards.load_rewards("toy-nope")
    [toy_clean] = rewards.load_rewards("toy-clean", device="cpu")
    assert rewards.needs("toy-clean", {}) == "" and rewards.lookup("toy-clean").title == "toy-clean"
    assert toy_clean.name == "toy-clean"
    assert toy_clean.score(images(2, 16, 16), "a red circle on the right").shape == (2,)


def test_importing_rewards_imports_no_optional_model_nor_the_toy_world():
    lazy = ("toy", "toy.rewards", "rewards.imagereward", "rewards.unifiedreward")
    code = f"import sys, rewards; rewards.lookup('hps'); print([m for m in {lazy!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stderr[-2000:]

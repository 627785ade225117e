"""rewards/imagereward.py on tiny random weights written in ImageReward.pt's own key layout.

The weights, images and prompts below are made by seeded formulas that do not use rewards/imagereward.py. GOLDEN holds
the scores that the original `image-reward` 1.5 package's own modules (its BLIP ViT, its BLIP BERT with
cross-attention, its MLP and its `ImageReward.score`, run beside timm 0.6.13 and transformers 4.46 outside this
project) gave for exactly these weights, images and prompts. The tests load the same weights through the real
path-based loader and must reproduce them.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from rewards import imagereward  # noqa: E402

WORDS = "a photo of red blue green cat dog on the mat sky big small house tree with ##s".split()
DIM_V, DIM_T, DEPTH, FFN, MAX_POS = 128, 128, 2, 256, 40  # 2 heads of 64 in both towers (width / 64)
PROMPTS = ["A red cat on the mat", "a photo of a big blue house with trees",
           "dog " * 40,  # longer than 35 tokens: truncated
           "a zebra on the moon"]  # unknown words -> [UNK]
SIZES = [(256, 320), (224, 224), (300, 200), (240, 240)]  # (H, W) of each image


def write_tokenizer(path):
    """A bert-base-uncased style tokenizer folder (vocab.txt only); 5 special tokens first, as in BERT."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "vocab.txt"), "w") as f:
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    return path


def vocab_size():
    return 5 + len(WORDS) + 2  # + [DEC], [ENC] added by BLIP


def checkpoint_shapes() -> dict:
    """Key -> shape of an ImageReward.pt state dict, scaled down (the real one: 1024 / 768 wide, 24 / 12 deep)."""
    s = {"blip.visual_encoder.cls_token": (1, 1, DIM_V), "blip.visual_encoder.pos_embed": (1, 197, DIM_V),
         "blip.visual_encoder.patch_embed.proj.weight": (DIM_V, 3, 16, 16),
         "blip.visual_encoder.patch_embed.proj.bias": (DIM_V,),
         "blip.visual_encoder.norm.weight": (DIM_V,), "blip.visual_encoder.norm.bias": (DIM_V,)}
    for i in range(DEPTH):
        b = f"blip.visual_encoder.blocks.{i}."
        s.update({b + "norm1.weight": (DIM_V,), b + "norm1.bias": (DIM_V,), b + "norm2.weight": (DIM_V,),
                  b + "norm2.bias": (DIM_V,), b + "attn.qkv.weight": (3 * DIM_V, DIM_V),
                  b + "attn.qkv.bias": (3 * DIM_V,),
                  b + "attn.proj.weight": (DIM_V, DIM_V), b + "attn.proj.bias": (DIM_V,),
                  b + "mlp.fc1.weight": (4 * DIM_V, DIM_V), b + "mlp.fc1.bias": (4 * DIM_V,),
                  b + "mlp.fc2.weight": (DIM_V, 4 * DIM_V), b + "mlp.fc2.bias": (DIM_V,)})
    t = "blip.text_encoder."
    s.update({t + "embeddings.word_embeddings.weight": (vocab_size(), DIM_T),
              t + "embeddings.position_embeddings.weight": (MAX_POS, DIM_T),
              t + "embeddings.LayerNorm.weight": (DIM_T,), t + "embeddings.LayerNorm.bias": (DIM_T,)})
    for i in range(DEPTH):
        b = f"{t}encoder.layer.{i}."
        for att, kv in (("attention", DIM_T), ("crossattention", DIM_V)):
            s.update({f"{b}{att}.self.query.weight": (DIM_T, DIM_T), f"{b}{att}.self.query.bias": (DIM_T,),
                      f"{b}{att}.self.key.weight": (DIM_T, kv), f"{b}{att}.self.key.bias": (DIM_T,),
                      f"{b}{att}.self.value.weight": (DIM_T, kv), f"{b}{att}.self.value.bias": (DIM_T,),
                      f"{b}{att}.output.dense.weight": (DIM_T, DIM_T), f"{b}{att}.output.dense.bias": (DIM_T,),
                      f"{b}{att}.output.LayerNorm.weight": (DIM_T,), f"{b}{att}.output.LayerNorm.bias": (DIM_T,)})
        s.update({b + "intermediate.dense.weight": (FFN, DIM_T), b + "intermediate.dense.bias": (FFN,),
                  b + "output.dense.weight": (DIM_T, FFN), b + "output.dense.bias": (DIM_T,),
                  b + "output.LayerNorm.weight": (DIM_T,), b + "output.LayerNorm.bias": (DIM_T,)})
    dims = [DIM_T, 1024, 128, 64, 16, 1]
    for j, i in enumerate((0, 2, 4, 6, 7)):  # Linear positions in the Sequential (dropouts at 1, 3, 5)
        s.update({f"mlp.layers.{i}.weight": (dims[j + 1], dims[j]), f"mlp.layers.{i}.bias": (dims[j + 1],)})
    s.update({"blip.vision_proj.weight": (256, DIM_V), "blip.vision_proj.bias": (256,),  # unused by the score
              "blip.text_proj.weight": (256, DIM_T), "blip.text_proj.bias": (256,)})
    return s


def tiny_state(seed=0) -> dict:
    """Seeded random weights: norm gains near 1, small biases, N(0, 0.25) embedding tables, N(0, 1/fan_in)
    Linear and Conv weights."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, shape in checkpoint_shapes().items():
        x = torch.randn(shape, generator=g)
        module, kind = k.split(".")[-2].lower(), k.split(".")[-1]
        if "norm" in module and kind == "weight":
            x = 1 + 0.1 * x
        elif kind == "bias":
            x = 0.05 * x
        elif "embeddings" in module or kind in ("cls_token", "pos_embed"):
            x = 0.5 * x
        else:
            x = x / np.sqrt(np.prod(shape[1:]))
        state[k] = x.contiguous()
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(MAX_POS)[None]
    return state


def tiny_images():
    """Deterministic RGB uint8 images (H, W, 3) of several sizes: stripes, rings and a gradient."""
    out = []
    for n, (H, W) in enumerate(SIZES):
        y, x = np.mgrid[0:H, 0:W].astype(np.float64)
        r = 127.5 * (1 + np.sin(x / (7 + n) + y / 11))
        gch = 127.5 * (1 + np.cos(np.hypot(x - W / 2, y - H / 3) / (5 + 2 * n)))
        b = 255 * (x + y) / (H + W)
        out.append(np.stack([r, gch, b], -1).round().clip(0, 255).astype(np.uint8))
    return out


# Scores of the original package (ImageReward.score(prompt, PIL image), one call per pair) on tiny_state(0),
# tiny_images() and PROMPTS: GOLDEN[i][j] = image i, prompt j.
GOLDEN = [[0.6058352589607239, 0.028991838917136192, 0.678026556968689, 0.6610609292984009],
          [0.43863794207572937, -0.14698466658592224, 0.6408270597457886, 0.4714452028274536],
          [0.41297081112861633, -0.3067896366119385, 0.5290648937225342, 0.4272254705429077],
          [0.41696420311927795, -0.208890900015831, 0.7019044160842896, 0.44501999020576477]]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("imagereward")
    torch.save(tiny_state(0), d / "ImageReward.pt")
    return str(d / "ImageReward.pt"), write_tokenizer(str(d / "bert-base-uncased"))


def as_float(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a).permute(2, 0, 1)[None].float() / 255  # (1, 3, H, W)


def test_matches_the_original_package(files):
    reward = imagereward.load(*files)
    got = [[reward.score(as_float(img), p).item() for p in PROMPTS] for img in tiny_images()]
    assert np.allclose(got, GOLDEN, atol=2e-5, rtol=0), (got, GOLDEN)


def test_batch_equals_one_by_one_and_png_round_trip(files, tmp_path):
    """A batch of same-size images with prompts of different lengths: the padding mask keeps them apart."""
    reward = imagereward.load(*files)
    img = tiny_images()[3]
    Image.fromarray(img).save(tmp_path / "x.png")
    from_png = as_float(np.array(Image.open(tmp_path / "x.png")))
    batch = torch.cat([as_float(img)] * 3 + [from_png])
    prompts = PROMPTS[:3] + [PROMPTS[0]]
    together = reward.score(batch, prompts)
    alone = torch.cat([reward.score(batch[i:i + 1], p) for i, p in enumerate(prompts)])
    assert together.shape == (4,) and together.dtype == torch.float32
    assert torch.allclose(together, alone, atol=1e-5)
    assert together[3].item() == pytest.approx(together[0].item(), abs=1e-6)  # PNG and float give the same uint8 image
    assert len({round(v, 4) for v in together[:3].tolist()}) == 3  # the prompt matters


def test_architecture_is_read_from_the_checkpoint(files):
    model = imagereward.load(*files).model
    vit, bert = model.blip.visual_encoder, model.blip.text_encoder
    assert (len(vit.blocks), vit.blocks[0].attn.heads, vit.image_size) == (DEPTH, DIM_V // 64, 224)
    assert (len(bert.encoder.layer), bert.encoder.layer[0].attention.heads) == (DEPTH, DIM_T // 64)
    assert bert.embeddings.word_embeddings.num_embeddings == vocab_size()


def test_missing_and_unknown_keys(files, tmp_path):
    state = torch.load(files[0], weights_only=True)
    bad = dict(state)
    del bad["blip.text_encoder.encoder.layer.1.crossattention.self.key.weight"]
    torch.save(bad, tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="lacks 1 weight"):
        imagereward.load(str(tmp_path / "missing.pt"), files[1])
    torch.save({**state, "blip.extra_head.weight": torch.zeros(2)}, tmp_path / "extra.pt")
    with pytest.warns(UserWarning, match="blip.extra_head.weight"):
        imagereward.load(str(tmp_path / "extra.pt"), files[1])
    torch.save({"module." + k: v for k, v in state.items()}, tmp_path / "ddp.pt")  # a DDP-saved copy loads too
    imagereward.load(str(tmp_path / "ddp.pt"), files[1])
    with pytest.raises(FileNotFoundError, match="THUDM/ImageReward"):
        imagereward.load(str(tmp_path / "nope.pt"), files[1])


def test_normalisation_constants():
    """The released model's mean and std, as in the package's ImageReward.__init__."""
    assert (imagereward.MEAN, imagereward.STD) == (0.16717362830052426, 1.0333394966054072)
    assert imagereward.MAX_LENGTH == 35

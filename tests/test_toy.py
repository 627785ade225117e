"""The toy/ package: the world, its rule-based rewards, and the tiny base model's save / reload round trip."""
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from hypothesis import given, settings, strategies as st

import toy
from policy.flux import FluxPolicy

SIZE = 16
TINY = toy.ToyConfig(heads=2, double_blocks=1, single_blocks=1, text_dim=16, text_layers=1, steps=2, batch=4)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one thread


# ---------------------------------------------------------------- the world
def test_world_is_deterministic_by_seed():
    a = toy.world_batch(32, torch.Generator().manual_seed(3))
    b = toy.world_batch(32, torch.Generator().manual_seed(3))
    c = toy.world_batch(32, torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and a[1:3] == b[1:3] and torch.equal(a[3], b[3])
    assert not torch.equal(a[0], c[0])


def test_prompts_parse_back_and_the_split():
    assert [toy.parse(toy.prompt(a)) for a in toy.COMBOS] == toy.COMBOS
    assert toy.parse("  A Red circle  on the LEFT") == ("red", "circle", "left")
    for bad in ("a red dog on the left", "a red circle", "red circle on the left", "a red circle on the left!"):
        with pytest.raises(ValueError):
            toy.parse(bad)
    assert len(toy.TRAIN_PROMPTS) == 48 and len(toy.HELDOUT_PROMPTS) == 12
    assert not set(toy.TRAIN_PROMPTS) & set(toy.HELDOUT_PROMPTS)
    train = [toy.parse(p) for p in toy.TRAIN_PROMPTS]
    for k, values in enumerate((toy.COLOURS, toy.SHAPES, toy.PLACES)):  # every attribute value is trained
        assert {a[k] for a in train} == set(values)
    assert {a[:2] for a in train} == {(c, s) for c in toy.COLOURS for s in toy.SHAPES}
    assert set(toy.GRID_PROMPTS[:4]) <= set(toy.TRAIN_PROMPTS) and set(toy.GRID_PROMPTS[4:]) <= set(toy.HELDOUT_PROMPTS)


@pytest.mark.parametrize("wrong", [0.0, 0.3, 0.45, 1.0])
def test_wrong_caption_fraction_is_as_configured(wrong):
    n = 200
    _, captions, truth, flags = toy.world_batch(n, torch.Generator().manual_seed(0), wrong)
    assert int(flags.sum()) == round(wrong * n)
    for cap, a, w in zip(captions, truth, flags.tolist()):
        b = toy.parse(cap)
        assert sum(x != y for x, y in zip(a, b)) == (1 if w else 0)  # exactly one wrong attribute
        assert a not in toy.HELD_OUT and b not in toy.HELD_OUT  # held-out combinations never appear


def test_render_area_and_place():
    attrs = toy.COMBOS
    r = torch.full((len(attrs),), 3.0)
    a = toy.analyse(toy.render(attrs, SIZE, r))
    area = torch.full_like(a["mass"], torch.pi * 9)
    assert torch.allclose(a["mass"], area, rtol=0.05)  # area pi r^2 whatever the shape (pixel sampling: 5 %)
    tx = torch.tensor([toy.PLACES[p][1] * SIZE for *_, p in attrs])
    ty = torch.tensor([toy.PLACES[p][2] * SIZE for *_, p in attrs])
    assert (a["cx"] - tx).abs().max() < 0.1 and (a["cy"] - ty).abs().max() < 0.1  # centroid = the place


# ---------------------------------------------------------------- the rewards
def _nxt(values, v):
    values = list(values)
    return values[(values.index(v) + 1) % len(values)]


@pytest.fixture(scope="module")
def scenes():
    g = torch.Generator().manual_seed(1)
    attrs, n = toy.COMBOS, len(toy.COMBOS)
    r = SIZE * (toy.RADIUS[0] + (toy.RADIUS[1] - toy.RADIUS[0]) * torch.rand(n, generator=g))
    off = SIZE * toy.JITTER * (2 * torch.rand(n, 2, generator=g) - 1)
    draw = lambda a: toy.render(a, SIZE, r, off)  # noqa: E731
    good = draw(attrs)
    return dict(
        prompts=[toy.prompt(a) for a in attrs], good=good,
        wrong_colour=draw([(_nxt(toy.COLOURS, c), s, p) for c, s, p in attrs]),
        wrong_shape=draw([(c, _nxt(toy.SHAPES, s), p) for c, s, p in attrs]),
        wrong_place=draw([(c, s, _nxt(toy.PLACES, p)) for c, s, p in attrs]),
        noisy=(good + 0.05 * torch.randn(good.shape, generator=g)).clamp(0, 1),
        blurred=TF.gaussian_blur(good, [5, 5], [0.8, 0.8]),
        two_shapes=(good + draw([(c, s, _nxt(toy.PLACES, p)) for c, s, p in attrs])).clamp(0, 1),
        noise=(torch.randn(good.shape, generator=g) / 2 + 0.5).clamp(0, 1))


def test_adherence_prefers_the_right_image(scenes):
    good = toy.adherence(scenes["good"], scenes["prompts"])
    assert good.min() > 0.95
    for bad, margin in (("wrong_colour", 0.2), ("wrong_shape", 0.2), ("wrong_place", 0.2), ("two_shapes", 0.2),
                        ("noise", 0.5), ("noisy", 0.0), ("blurred", 0.0)):
        assert (good > toy.adherence(scenes[bad], scenes["prompts"]) + margin).all(), bad
    _, parts = toy.adherence(scenes["wrong_colour"], scenes["prompts"], parts=True)
    assert parts["colour"].max() < 0.1 and parts["shape"].min() > 0.8 and parts["place"].min() > 0.9
    _, parts = toy.adherence(scenes["wrong_shape"], scenes["prompts"], parts=True)
    assert parts["shape"].max() < 0.3 and parts["colour"].min() > 0.9
    _, parts = toy.adherence(scenes["wrong_place"], scenes["prompts"], parts=True)
    assert parts["place"].max() < 0.2 and parts["shape"].min() > 0.8
    assert toy.adherence(scenes["noise"], scenes["prompts"]).mean() < 0.3
    dots = toy.render(toy.COMBOS, SIZE, r=torch.full((60,), 1.0))  # right colour and place, but a dot
    big = toy.render(toy.COMBOS, SIZE, r=torch.full((60,), 6.0))
    for bad in (dots, big):
        _, parts = toy.adherence(bad, scenes["prompts"], parts=True)
        assert parts["shape"].max() < 0.4  # good images: > 0.9


def test_clean_and_shape_rank_degraded_images_lower(scenes):
    for fn, floor in ((toy.clean, 0.75), (toy.shape_quality, 0.9)):
        good = fn(scenes["good"])
        assert good.min() > floor, fn.__name__
        for bad in ("noisy", "blurred", "two_shapes", "noise"):
            assert (good > fn(scenes[bad])).all(), (fn.__name__, bad)
        assert fn(scenes["noise"]).max() < 0.3
    # a wrong attribute is not a quality defect: the out-of-domain rewards ignore the prompt
    for bad in ("wrong_colour", "wrong_shape", "wrong_place"):
        assert (toy.shape_quality(scenes[bad]) > 0.9).all() and (toy.clean(scenes[bad]) > 0.75).all()
    # cleanliness is monotone in the noise level and in the blur
    g = torch.Generator().manual_seed(2)
    levels = [toy.clean((scenes["good"] + s * torch.randn(scenes["good"].shape, generator=g)).clamp(0, 1)).mean()
              for s in (0.0, 0.01, 0.03, 0.1)]
    assert levels == sorted(levels, reverse=True)
    blurs = [toy.clean(TF.gaussian_blur(scenes["good"], [7, 7], [s, s])).mean() for s in (0.3, 0.6, 1.0, 1.5)]
    assert blurs == sorted(blurs, reverse=True)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), kind=st.sampled_from(["uniform", "binary", "dark", "render"]),
       size=st.sampled_from([8, 16, 24]))
def test_reward_ranges(seed, kind, size):
    g = torch.Generator().manual_seed(seed)
    shape = (3, 3, size, size)
    images = {"uniform": lambda: torch.rand(shape, generator=g),
              "binary": lambda: (torch.rand(shape, generator=g) > 0.5).float(),
              "dark": lambda: torch.zeros(shape),
              "render": lambda: toy.render([toy.COMBOS[(seed + i) % 60] for i in range(3)], size)}[kind]()
    prompts = [toy.prompt(toy.COMBOS[(seed + 7 * i) % 60]) for i in range(3)]
    for name, factory in toy.TOY_REWARDS.items():
        reward = factory()
        s = reward.score(images, prompts)
        assert reward.name == name and s.shape == (3,) and s.dtype == torch.float32
        assert torch.isfinite(s).all() and (s >= 0).all() and (s <= 1).all(), (name, s)


def test_registry_through_rewards_module(scenes):
    rewards = pytest.importorskip("rewards")
    got = rewards.load_rewards("toy-adherence+toy-clean+toy-shape")
    assert [r.name for r in got] == ["toy-adherence", "toy-clean", "toy-shape"]
    one = got[0].score(scenes["good"][:2], scenes["prompts"][0])  # one prompt for the whole batch
    assert one.shape == (2,)


# ---------------------------------------------------------------- the base model
def test_word_level_tokenizers():
    tok, tok_2 = toy.word_tokenizers()
    for w in toy.WORDS:
        assert len(tok.tokenize(w)) == 1 and len(tok_2.tokenize(w)) == 1, w
    ids = tok(toy.TRAIN_PROMPTS, padding="max_length", max_length=tok.model_max_length).input_ids
    assert max(map(len, ids)) == toy.MAX_TOKENS  # <start> + 6 words + <end>, no truncation
    assert tok.tokenize("a purple dog")  # words outside the world still tokenize (by characters)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("toy") / "model"
    assert toy.base_model(path, seed=5, cfg=TINY, log=None) == path
    return path


def test_saved_model_reloads_with_the_same_velocity(saved):
    pipe = toy.pretrain(TINY, seed=5, log=None)  # deterministic: the same weights as the saved model
    mem = toy.policy_of(pipe, TINY.size)
    disk = FluxPolicy.from_pretrained(saved, dtype=torch.float32)
    assert (disk.height, disk.width, disk.max_sequence_length, disk.vae) == (SIZE, SIZE, toy.MAX_TOKENS, None)
    prompts = [toy.TRAIN_PROMPTS[0], toy.HELDOUT_PROMPTS[0]]
    with torch.no_grad():
        c_mem = toy.encode(pipe, prompts)
    c_disk = [disk.embed(p) for p in prompts]
    assert torch.allclose(c_mem.prompt_embeds, torch.cat([c.prompt_embeds for c in c_disk]), atol=1e-6)
    assert torch.allclose(c_mem.pooled, torch.cat([c.pooled for c in c_disk]), atol=1e-6)
    g = torch.Generator().manual_seed(0)
    x, t = disk.noise(3, g), torch.tensor([1.0, 0.5, 0.1])
    with torch.no_grad():
        for j in range(2):
            cond = disk.embed(prompts[j])
            assert torch.allclose(mem.velocity(cond)(x, t), disk.velocity(cond)(x, t), atol=1e-6)
    assert disk.decode(x).shape == (3, 3, SIZE, SIZE)


def test_base_model_is_reused_not_retrained(saved, monkeypatch):
    monkeypatch.setattr(toy.model, "pretrain", lambda *a, **k: pytest.fail("pretrained again"))
    assert toy.base_model(saved, seed=5, cfg=TINY) == saved
    with pytest.raises(ValueError, match="holds the toy model"):
        toy.base_model(saved, seed=6, cfg=TINY)
    meta = json.loads((saved / "toy.json").read_text())
    assert meta["config"] == dataclasses.asdict(TINY) and meta["seed"] == 5
    assert not [p for p in saved.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_sample_grid_png(saved, tmp_path):
    from PIL import Image
    policy = FluxPolicy.from_pretrained(saved, dtype=torch.float32)
    from toy.__main__ import sample_grid
    out = sample_grid(policy, tmp_path / "grid.png", prompts=toy.GRID_PROMPTS[:2], seeds=[0, 1], T=2, scale=2)
    assert Image.open(out).size == (190 + 2 * (2 * SIZE + 2), 2 * (2 * SIZE + 2))
    attrs = [toy.parse(p) for p in toy.GRID_PROMPTS for _ in range(3)]
    truth = toy.render(attrs, SIZE, r=torch.linspace(2.5, 3.5, len(attrs)))  # every cell different
    from report.figures import save_grid
    out = save_grid(truth, toy.GRID_PROMPTS, 3, tmp_path / "truth.png", scale=1, marked=toy.HELDOUT_PROMPTS)
    png = torch.from_numpy(np.array(Image.open(out).convert("RGB"))).permute(2, 0, 1).float()  # (3, H, W)
    for i, j in ((0, 0), (1, 2), (7, 1)):  # (row = prompt, column)
        x, y = 190 + j * (SIZE + 2), i * (SIZE + 2)
        assert torch.equal(png[:, y:y + SIZE, x:x + SIZE], (truth[3 * i + j] * 255).round())


def test_committed_base_samples_png():
    from PIL import Image
    path = Path(__file__).resolve().parent.parent / "assets" / "toy_base_samples.png"
    assert path.is_file() and path.stat().st_size < 200_000
    assert Image.open(path).size[1] == len(toy.GRID_PROMPTS) * (4 * SIZE + 2)

"""The small world's images and prompts: coloured shapes on black, and the held-out split.

World   16 x 16 RGB, black background, one anti-aliased shape, prompt "a {colour} {shape} {place}":
        colours red green blue yellow, shapes circle square triangle (all of area pi r^2, r drawn in
        [0.16, 0.21] x side), places on the left / on the right / at the top / at the bottom / in the
        centre (+- 0.04 x side jitter). 4 x 3 x 5 = 60 prompts, of 6 words each.
Split   HELD OUT: the 12 combinations with (colour + shape + place index) % 5 == 0. Pretraining never
        draws them, as images or as captions; every single attribute and every (colour, shape) pair
        is still seen (with 4 of the 5 places). TRAIN_PROMPTS: the other 48.
"""
import math
import re

import torch

COLOURS = {"red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.1), "blue": (0.1, 0.2, 0.9), "yellow": (0.9, 0.85, 0.1)}
SHAPES = ("circle", "square", "triangle")
PLACES = {"left": ("on the left", 0.25, 0.5), "right": ("on the right", 0.75, 0.5), "top": ("at the top", 0.5, 0.25),
          "bottom": ("at the bottom", 0.5, 0.75), "centre": ("in the centre", 0.5, 0.5)}  # phrase, x, y
RADIUS, JITTER = (0.16, 0.21), 0.04  # fractions of the image side
COMBOS = [(c, s, p) for c in COLOURS for s in SHAPES for p in PLACES]
HELD_OUT = {(c, s, p) for i, c in enumerate(COLOURS) for j, s in enumerate(SHAPES) for k, p in enumerate(PLACES)
            if (i + j + k) % 5 == 0}
TRAIN = [a for a in COMBOS if a not in HELD_OUT]


def prompt(attrs) -> str:
    c, s, p = attrs
    return f"a {c} {s} {PLACES[p][0]}"


_GRAMMAR = re.compile(rf"a ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)}) ({'|'.join(v[0] for v in PLACES.values())})")
_PHRASE = {v[0]: k for k, v in PLACES.items()}


def parse(text: str):
    """'a red circle on the left' -> ('red', 'circle', 'left'); ValueError outside the grammar."""
    m = _GRAMMAR.fullmatch(" ".join(text.lower().split()))
    if m is None:
        raise ValueError(f"{text!r} is not a toy prompt 'a <colour> <shape> <place>' ({prompt(COMBOS[0])!r})")
    return m.group(1), m.group(2), _PHRASE[m.group(3)]


TRAIN_PROMPTS = [prompt(a) for a in TRAIN]
HELDOUT_PROMPTS = [prompt(a) for a in COMBOS if a in HELD_OUT]
WORDS = sorted({w for a in COMBOS for w in prompt(a).split()})


def _sdf(shape: torch.Tensor, dx, dy, r):
    """Signed distance in pixels (< 0 inside) of shapes of area pi r^2 centred (centroid) at 0.
    shape (B,) indices into SHAPES; dx, dy (B, H, W); r (B, 1, 1). Exact along edges."""
    circle = torch.hypot(dx, dy) - r
    square = torch.maximum(dx.abs(), dy.abs()) - r * math.sqrt(math.pi) / 2
    R = r * math.sqrt(4 * math.pi / (3 * math.sqrt(3)))  # circumradius of the equilateral triangle, apex up
    s3 = math.sqrt(3)
    triangle = torch.maximum(dy, torch.maximum((s3 * dx - dy) / 2, (-s3 * dx - dy) / 2)) - R / 2
    return torch.stack([circle, square, triangle], 1)[torch.arange(len(shape)), shape]  # (B, H, W)


def _grid(H, W):
    yy, xx = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    return xx, yy  # pixel centres, (H, W)


def _coverage(shape, cx, cy, r, H, W):
    """(B, H, W) anti-aliased coverage: the signed distance clipped to a one-pixel ramp."""
    xx, yy = _grid(H, W)
    sdf = _sdf(shape, xx - cx[:, None, None], yy - cy[:, None, None], r[:, None, None])
    return (0.5 - sdf).clamp(0, 1)


def render(attrs, size=16, r=None, offset=None) -> torch.Tensor:
    """Images (B, 3, size, size) in [0, 1] of the attributes; r (B,) pixels, offset (B, 2) pixels."""
    B = len(attrs)
    r = torch.full((B,), size * sum(RADIUS) / 2) if r is None else r
    offset = torch.zeros(B, 2) if offset is None else offset
    shape = torch.tensor([SHAPES.index(s) for _, s, _ in attrs])
    cx = torch.tensor([PLACES[p][1] * size for *_, p in attrs]) + offset[:, 0]
    cy = torch.tensor([PLACES[p][2] * size for *_, p in attrs]) + offset[:, 1]
    colour = torch.tensor([COLOURS[c] for c, _, _ in attrs])  # (B, 3)
    return _coverage(shape, cx, cy, r, size, size)[:, None] * colour[:, :, None, None]


def world_batch(n: int, generator: torch.Generator, wrong_caption=0.4, size=16):
    """n pretraining pairs from the TRAIN combinations: (images (n, 3, size, size), captions, truths, wrong (n,) bool).
    Exactly round(wrong_caption * n) captions have one attribute replaced (never by a held-out combination)."""
    g = generator
    truth = [TRAIN[i] for i in torch.randint(len(TRAIN), (n,), generator=g)]
    r = size * (RADIUS[0] + (RADIUS[1] - RADIUS[0]) * torch.rand(n, generator=g))
    offset = size * JITTER * (2 * torch.rand(n, 2, generator=g) - 1)
    images = render(truth, size, r, offset)
    wrong = torch.zeros(n, dtype=torch.bool)
    wrong[torch.randperm(n, generator=g)[: round(wrong_caption * n)]] = True
    options = (list(COLOURS), list(SHAPES), list(PLACES))
    captions = []
    for a, w in zip(truth, wrong.tolist()):
        b = a
        while w and (b == a or b in HELD_OUT):
            k = int(torch.randint(3, (1,), generator=g))
            b = a[:k] + (options[k][int(torch.randint(len(options[k]), (1,), generator=g))],) + a[k + 1:]
        captions.append(prompt(b))
    return images, captions, truth, wrong




GRID_PROMPTS = ["a red square at the top", "a green triangle in the centre", "a blue circle on the right",
                "a yellow square at the bottom",  # training prompts, then held-out ones:
                "a red circle on the left", "a green square at the bottom", "a blue triangle on the right",
                "a yellow circle at the top"]


"""The small world's rule-based rewards: (B, 3, H, W) in [0, 1] + prompts -> (B,), any H, W; no model,
no gradient. Prompts are parsed with the world's grammar.

    toy-adherence  IN-DOMAIN, in [0, 1]: mean of colour (the share of the shape's mass in the prompt's
                   colour), shape (softmax over the IoU with each ideal shape of the world's sizes, at the
                   blob's centroid, and a 'no shape' option), place (Gaussian in the distance from the
                   blob's centroid to the place).
    toy-clean      OUT-OF-DOMAIN, in (0, 1]: exp(-(off-palette colour noise + excess edge blur)).
    toy-shape      OUT-OF-DOMAIN, in [0, 1]: IoU of the blob with the best ideal shape of its own
                   area at its own centroid (prompt-free).
"""
import math

import torch
import torch.nn.functional as F

from .world import COLOURS, HELDOUT_PROMPTS, JITTER, PLACES, RADIUS, SHAPES, TRAIN_PROMPTS, _coverage, _grid, parse, render

TAU_COLOUR, TAU_SHAPE, IOU_NONE = 0.01, 0.05, 0.3  # colour softmax temperature; shape softmax; 'no shape' logit
PLACE_SLACK, PLACE_SCALE = JITTER * math.sqrt(2), 0.08  # fractions of the side: free radius, Gaussian width
OFF_TOL = 0.15  # residual colour distance at which a pixel counts e^-1 of its coverage
OFF_SCALE, BLUR_FREE, BLUR_SCALE = 0.02, 1.0, 0.5  # toy-clean: mean off-palette distance, edge-pixel budget


@torch.no_grad()
def analyse(images: torch.Tensor) -> dict:
    """Explain each pixel as alpha * palette colour on black: coverage alpha, colour weights, residual."""
    x = images.float().cpu().permute(0, 2, 3, 1)[..., None, :]  # (B, H, W, 1, 3)
    pal = torch.tensor(list(COLOURS.values()))  # (K, 3)
    a_k = ((x * pal).sum(-1) / (pal * pal).sum(-1)).clamp(0, 1)  # (B, H, W, K) best alpha per colour
    d_k = (x - a_k[..., None] * pal).norm(dim=-1)  # (B, H, W, K) distance to the segment black -> colour
    w = torch.softmax(-d_k**2 / TAU_COLOUR, -1)
    off = (w * d_k).sum(-1)  # (B, H, W)
    alpha = (w * a_k).sum(-1) * torch.exp(-(off / OFF_TOL) ** 2)  # pixels no palette colour explains do not count
    B, H, W = alpha.shape
    mass = alpha.sum((1, 2)).clamp_min(1e-6)  # (B,) area in pixels
    xx, yy = _grid(H, W)
    cx, cy = (alpha * xx).sum((1, 2)) / mass, (alpha * yy).sum((1, 2)) / mass  # centroid
    r = torch.sqrt(mass / math.pi)  # all ideal shapes have area pi r^2: r is the blob's own size
    r_world = r.clamp(RADIUS[0] * max(H, W), RADIUS[1] * max(H, W))  # the nearest size the world draws
    iou = {}
    for key, radius in (("iou", r), ("iou_world", r_world)):
        ideal = torch.stack([_coverage(torch.full((B,), s), cx, cy, radius, H, W) for s in range(len(SHAPES))], 1)
        a = alpha[:, None]
        iou[key] = torch.minimum(a, ideal).sum((2, 3)) / torch.maximum(a, ideal).sum((2, 3)).clamp_min(1e-6)  # (B, S)
    return dict(alpha=alpha, colour=w, off=off, mass=mass, cx=cx, cy=cy, **iou)


def adherence(images, prompts, parts=False):
    """IN-DOMAIN, [0, 1]: mean of colour, shape and place scores for the prompt (each in [0, 1])."""
    a = analyse(images)
    B, H, W = a["alpha"].shape
    attrs = [parse(p) for p in ([prompts] * B if isinstance(prompts, str) else prompts)]
    ci = torch.tensor([list(COLOURS).index(c) for c, _, _ in attrs])
    si = torch.tensor([SHAPES.index(s) for _, s, _ in attrs])
    colour = (a["alpha"] * a["colour"][torch.arange(B), :, :, ci]).sum((1, 2)) / a["mass"]
    logits = torch.cat([a["iou_world"], torch.full((B, 1), IOU_NONE)], 1) / TAU_SHAPE  # a dot is no shape
    shape = torch.softmax(logits, 1)[torch.arange(B), si]
    tx = torch.tensor([PLACES[p][1] * W for *_, p in attrs])
    ty = torch.tensor([PLACES[p][2] * H for *_, p in attrs])
    d = torch.hypot(a["cx"] - tx, a["cy"] - ty) / max(H, W)
    place = torch.exp(-F.relu(d - PLACE_SLACK) ** 2 / (2 * PLACE_SCALE**2))
    score = ((colour + shape + place) / 3).float().to(images.device)
    return (score, dict(colour=colour, shape=shape, place=place)) if parts else score


def clean(images, prompts=None):
    """OUT-OF-DOMAIN, (0, 1]: 1 for flat black background and a crisp one-colour shape.
    off: mean distance of a pixel to the nearest 'alpha * palette colour' (noise, colour mixing);
    blur: edge pixels 4 alpha (1 - alpha) per pixel of the ideal perimeter 2 sqrt(pi area), above
    the BLUR_FREE that a one-pixel anti-aliased edge needs (haze, soft edges, faint residue)."""
    a = analyse(images)
    off = a["off"].mean((1, 2))
    blur = (4 * a["alpha"] * (1 - a["alpha"])).sum((1, 2)) / (2 * torch.sqrt(math.pi * a["mass"]) + 1)
    return torch.exp(-off / OFF_SCALE - F.relu(blur - BLUR_FREE) / BLUR_SCALE).float().to(images.device)


def shape_quality(images, prompts=None):
    """OUT-OF-DOMAIN, [0, 1]: IoU of the blob with the best ideal shape of its area at its centroid."""
    return analyse(images)["iou"].max(1).values.float().to(images.device)


class ToyReward:
    """The reward interface of rewards/__init__.py: `name`, `score(images, prompts) -> (B,) float32`."""

    def __init__(self, name, fn):
        self.name, self._fn = name, fn

    def score(self, images, prompts):
        return self._fn(images, prompts)


TOY_REWARDS = {"toy-adherence": lambda: ToyReward("toy-adherence", adherence),
               "toy-clean": lambda: ToyReward("toy-clean", clean),
               "toy-shape": lambda: ToyReward("toy-shape", shape_quality)}



def reward_table(policy, n: int = 4, T: int = 16, seed: int = 0) -> dict:
    """Mean rewards of the policy (n samples per prompt) on TRAIN and HELD-OUT prompts, and of
    ground-truth renders and of pure-noise images (the reference rows)."""
    g = torch.Generator().manual_seed(seed)
    size = policy.height
    rows = {}
    for split, prompts in (("train", TRAIN_PROMPTS), ("held-out", HELDOUT_PROMPTS)):
        ps = [p for p in prompts for _ in range(n)]
        seeds = torch.randint(2**31, (len(ps),), generator=g).tolist()
        rows[f"model, {split}"] = (policy.sample(ps, seeds, T), ps)
    ps = [p for p in TRAIN_PROMPTS + HELDOUT_PROMPTS for _ in range(n)]
    attrs = [parse(p) for p in ps]
    r = size * (RADIUS[0] + (RADIUS[1] - RADIUS[0]) * torch.rand(len(ps), generator=g))
    rows["ground truth"] = (render(attrs, size, r, size * JITTER * (2 * torch.rand(len(ps), 2, generator=g) - 1)), ps)
    rows["pure noise"] = ((torch.randn(len(ps), 3, size, size, generator=g) / 2 + 0.5).clamp(0, 1), ps)
    return {k: {name: f().score(x, p).mean().item() for name, f in TOY_REWARDS.items()} for k, (x, p) in rows.items()}


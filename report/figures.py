"""Figures a run writes: the sample grid (fixed prompts x seeds) and the reward curve (the paper's Fig. 1a).

The comparison grid of several evaluated models (Fig. 4) is `evaluate.py`'s, next to the tables.
"""
import json
from pathlib import Path

import numpy as np

from report.files import atomic_write


def save_grid(images, prompts, n: int, path, scale: int = 4, marked=()):
    """PNG of images (len(prompts) * n, 3, H, W) in [0, 1], prompt-major: one row per prompt (prompts in
    `marked`, e.g. held-out ones, get a *), n columns, pixels enlarged x scale (nearest). Atomic."""
    from PIL import Image, ImageDraw
    H, W = images.shape[2] * scale, images.shape[3] * scale
    label, pad = 190, 2
    grid = Image.new("RGB", (label + n * (W + pad), len(prompts) * (H + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for i, p in enumerate(prompts):
        text = p if len(p) <= 30 else p[:29] + "..."
        draw.text((4, i * (H + pad) + H // 2 - 5), text + (" *" if p in marked else ""), fill="black")
        for j in range(n):
            x = (images[i * n + j].float().cpu().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
            grid.paste(Image.fromarray(x).resize((W, H), Image.NEAREST), (label + j * (W + pad), i * (H + pad)))
    return atomic_write(path, grid.save)


def plot_curve(metrics_file: Path, path: Path):
    """The paper's Fig. 1a: the deterministic anchor sample's reward per iteration (and a moving mean of 10)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    recs = [json.loads(l) for l in Path(metrics_file).read_text().splitlines()]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    its = [r["iteration"] for r in recs]
    for name in recs[0]["anchor_reward"]:
        y = np.array([r["anchor_reward"][name] for r in recs])
        avg = np.convolve(y, np.ones(10), "full")[: len(y)] / np.minimum(np.arange(1, len(y) + 1), 10)
        line, = ax.plot(its, y, alpha=0.3, lw=1)
        ax.plot(its, avg, color=line.get_color(), lw=2, label=f"{name} (mean of last 10)")
    ax.set_xlabel("iteration"), ax.set_ylabel("reward of the ODE sample"), ax.legend(), fig.tight_layout()
    atomic_write(path, fig.savefig)
    plt.close(fig)

"""Figures: the sample grid (fixed prompts x seeds), the reward curve (the paper's Fig. 1a) and the grid that
compares evaluated models (Fig. 4).
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


def moving_mean(y, n: int = 10) -> np.ndarray:
    """Means of the full windows of n consecutive values: len(y) - n + 1 of them (none for a shorter y).
    A partial window at the start would show the first, noisy values as the curve's start."""
    y = np.asarray(y, dtype=float)
    return np.convolve(y, np.ones(n) / n, "valid") if len(y) >= n else np.empty(0)


def plot_curve(metrics_file: Path, path: Path):
    """The paper's Fig. 1a: the deterministic anchor sample's reward per iteration, and its moving mean
    over 10 iterations from the 10th iteration on."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    recs = [json.loads(l) for l in Path(metrics_file).read_text().splitlines()]
    probes_file = Path(metrics_file).with_name("probes.jsonl")  # the reward-hacking guard's probes, if any
    probes = [json.loads(l) for l in probes_file.read_text().splitlines()] if probes_file.is_file() else []
    fig, ax = plt.subplots(figsize=(5.5, 3.6) if probes else (5, 3.2))
    its = [r["iteration"] for r in recs]
    for name in recs[0]["anchor_reward"]:
        y = np.array([r["anchor_reward"][name] for r in recs])
        line, = ax.plot(its, y, alpha=0.3, lw=1, label=f"{name}, each iteration")
        ax.plot(its[9:], moving_mean(y), color=line.get_color(), lw=2, label=f"{name}, mean of the last 10")
    for name in probes[0]["rewards"] if probes else []:
        ax.plot([p["iteration"] for p in probes], [p["rewards"][name] for p in probes], "o--", ms=3, lw=1,
                label=f"{name}, held-out probe")
    best = [p["iteration"] for p in probes if p["best"]]
    if best:
        ax.axvline(best[-1], color="grey", lw=0.8, ls=":", label=f"best by the guard (iteration {best[-1]})")
    ax.set_xlabel("iteration"), ax.set_ylabel("reward"), ax.legend(fontsize=6 if probes else None), fig.tight_layout()
    atomic_write(path, fig.savefig)
    plt.close(fig)


def comparison_grid(runs: list, path: Path, n_rows: int = 6):
    """Fig. 4 style, from evaluate.py's run folders: a row per prompt (the first image of evenly spaced prompts
    that every run has with the same seed), a column per run. Reads the PNGs of the cells only. Atomic; None
    when the runs share no such image."""
    from PIL import Image, ImageDraw
    manifests = [json.loads((r / "manifest.json").read_text()) for r in runs]
    firsts = [{(e["prompt"], e["seed"]): e for e in m["images"] if e["k"] == 0} for m in manifests]
    common = [e for e in manifests[0]["images"] if e["k"] == 0 and all((e["prompt"], e["seed"]) in f for f in firsts)]
    if not common:
        return None
    k = min(n_rows, len(common))
    rows = [common[round(i * (len(common) - 1) / max(1, k - 1))] for i in range(k)]  # distinct: k <= len(common)
    size = Image.open(runs[0] / rows[0]["file"]).size
    cell = 96 if max(size) < 96 else 256
    label, head, pad, chars = 200, 30, 4, cell // 6  # chars: what fits a cell's width in PIL's default font
    grid = Image.new("RGB", (label + len(runs) * (cell + pad), head + len(rows) * (cell + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for c, name in enumerate(m["name"] for m in manifests):  # the model's name on two lines at most
        draw.multiline_text((label + c * (cell + pad) + 2, 2), name[:chars] + "\n" + name[chars:2 * chars], "black")
    for r, e in enumerate(rows):
        y = head + r * (cell + pad)
        words, text = (e["prompt"] + (f" ({e['group']})" if e["group"] else "")).split(), [""]
        for w in words:
            text[-1:] = [text[-1] + " " + w] if len(text[-1]) + len(w) < 30 else [text[-1], w]
        draw.multiline_text((4, y + 4), "\n".join(t.strip() for t in text[:6]), fill="black")
        for c, (run, f) in enumerate(zip(runs, firsts)):
            img = Image.open(run / f[(e["prompt"], e["seed"])]["file"]).convert("RGB")
            w, h = (max(1, round(d * cell / max(img.size))) for d in img.size)  # fit the cell, keep the aspect
            img = img.resize((w, h), Image.NEAREST if max(img.size) < cell else Image.LANCZOS)
            grid.paste(img, (label + c * (cell + pad) + (cell - w) // 2, y + (cell - h) // 2))
    return atomic_write(path, grid.save)

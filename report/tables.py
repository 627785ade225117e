"""Tables of evaluated runs: Table 1's layout (a row per run and prompt group, a column per metric), the
95 % Student-t intervals over prompts behind its cells, and the comparison of several runs (Table 3).

A prompt's images are averaged first; a cell is the mean over prompts +- the half-width of the 95 %
Student-t interval over prompts, t_{0.975, n-1} s / sqrt(n) (with one image per prompt, as in the paper,
the usual interval over images). Metric titles, display scales (PickScore / 100) and the column order come from
the caller (`columns`: evaluate.py passes the reward registry's); a metric without one is shown by its name.
"""
import json
import math
from pathlib import Path

from scipy import stats

from report.files import write_text


def mean_ci(values, level: float = 0.95) -> dict:
    """mean, sample std (n - 1), and the Student-t interval mean +- t_{(1+level)/2, n-1} std / sqrt(n)."""
    v = [float(x) for x in values]
    n = len(v)
    mean = sum(v) / n if n else None
    if n < 2:
        return {"mean": mean, "std": None, "n": n, "half_width": None, "low": None, "high": None}
    std = math.sqrt(sum((x - mean) ** 2 for x in v) / (n - 1))
    h = float(stats.t.ppf((1 + level) / 2, n - 1)) * std / math.sqrt(n)
    return {"mean": mean, "std": std, "n": n, "half_width": h, "low": mean - h, "high": mean + h}


def summarise(records: list, metrics: list) -> dict:
    """records: one dict per image (prompt_index, metric -> score or None). Per metric: images of a prompt are
    averaged, then mean_ci over prompts; 'images' counts the scored images, 'missing' the unscored ones."""
    out = {}
    for m in metrics:
        per_prompt, missing = {}, 0
        for r in records:
            s = r.get(m)
            if s is None or (isinstance(s, float) and math.isnan(s)):
                missing += 1
            else:
                per_prompt.setdefault(r["prompt_index"], []).append(s)
        ci = mean_ci([sum(s) / len(s) for s in per_prompt.values()])
        n = ci.pop("n")
        out[m] = {**ci, "prompts": n, "images": sum(map(len, per_prompt.values())), "missing": missing}
    return out


def summarise_groups(rows: list, metrics: list) -> dict:
    """rows: scores.jsonl lines (prompt_index, group, scores) -> {"metrics": summarise over every prompt,
    "groups": {group: summarise over its prompts}} (no groups when no row has one)."""
    flat = [{"prompt_index": r["prompt_index"], **r["scores"]} for r in rows]
    groups = dict.fromkeys(r["group"] for r in rows if r["group"])
    return {"metrics": summarise(flat, metrics),
            "groups": {g: summarise([f for f, r in zip(flat, rows) if r["group"] == g], metrics) for g in groups}}


def _cell(stat: dict, scale: float, ref: dict = None) -> str:
    if stat is None or stat["mean"] is None:
        return "—"
    text = f"{stat['mean'] * scale:.3f}"
    if stat["half_width"] is not None:
        text += f" ± {stat['half_width'] * scale:.3f}"
    if ref is not None and ref.get("mean") is not None:
        text += f" ({(stat['mean'] - ref['mean']) * scale:+.3f})"
    return text


def render_table(runs: list, deltas: bool = False, columns: dict = None) -> str:
    """Markdown in Table 1's layout: a row per run (and per prompt group), a column per metric; deltas: each
    row's difference to the first run's row of the same group. runs: [(folder, results)]; columns: {metric: (title,
    display scale)} in column order (other metrics after them, by name)."""
    columns = columns or {}
    order = list(columns)
    metrics = sorted(dict.fromkeys(m for _, r in runs for m in r["metrics"]),
                     key=lambda m: order.index(m) if m in order else len(order))
    keys = ("steps", "height", "width", "guidance", "per_prompt", "prompts_file")
    differ = [k for k in keys if len({str(r["settings"].get(k)) for _, r in runs}) > 1]  # e.g. Table 3's steps
    groups = list(dict.fromkeys(g for _, r in runs for g in r["groups"]))
    first = runs[0][1]
    titles = [columns[m][0] if m in columns else m for m in metrics]
    lines = ["| model | " + " | ".join(titles) + " |", "|---|" + "---|" * len(metrics)]
    for _, r in runs:
        label = r["name"] + "".join(f", {k}={r['settings'].get(k)}" for k in differ)
        for g in [""] + list(r["groups"]):
            row = r["groups"][g] if g else r["metrics"]
            ref = (first["groups"].get(g, {}) if g else first["metrics"]) if deltas and r is not first else {}
            cells = [_cell(row.get(m), columns[m][1] if m in columns else 1.0, ref.get(m)) for m in metrics]
            lines.append(f"| {label}{' · ' + g if g else ''} | " + " | ".join(cells) + " |")
    n = "; ".join((g + ": " if g else "") + _prompt_counts(runs, g) for g in [""] + groups)
    lines += ["", f"mean ± half-width of the 95 % Student-t interval over prompts (n = {n})"
              + ("; PickScore shown / 100 as in Table 1" if "pickscore" in metrics else "")
              + ("; (±x.xxx) difference to the first row" if deltas and len(runs) > 1 else "")]
    skipped = {k: v for _, r in runs for k, v in r.get("skipped", {}).items() if k not in metrics}
    return "\n".join(lines + [f"not evaluated: {line}" for line in skipped.values()])


def _prompt_counts(runs: list, group: str) -> str:
    """The numbers of prompts behind the rows of one group ('' = all prompts)."""
    ns = {s["prompts"] for _, r in runs for s in (r["groups"].get(group, {}) if group else r["metrics"]).values()}
    return ", ".join(map(str, sorted(ns)))


def compare(paths: list, out: Path, n_rows: int = 6, columns: dict = None) -> str:
    """One table of several runs (differences to the first) -> stdout and out/comparison.md; out/grid.png.
    A path is a run folder (results.json) or a folder of runs (each, by name)."""
    from report.figures import comparison_grid
    runs = []
    for p in map(Path, paths):
        found = [p] if (p / "results.json").is_file() else sorted(q.parent for q in p.glob("*/results.json"))
        if not found:
            raise SystemExit(f"evaluate.py --compare: {p} holds no results.json (nor do its subfolders)")
        runs += [(q, json.loads((q / "results.json").read_text())) for q in found]
    text = render_table(runs, deltas=True, columns=columns)
    write_text(Path(out) / "comparison.md", text + "\n")
    print(text)
    if len(runs) > 1:
        grid = comparison_grid([q for q, _ in runs], Path(out) / "grid.png", n_rows)
        print(f"grid: {grid}" if grid else "grid: the runs share no prompt with the same seed")
    return text

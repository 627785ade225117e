"""An evaluated model's folder <out>/<name>/ as evaluate.py writes it, reads it back to resume, and
`--compare` (report/tables.py, report/figures.py) reads it:

    images/JJJJJ_KK.png     image k of prompt j, written atomically as it is made
    manifest.json           name, model (folder, checkpoint, fingerprint of the weights), settings, and
                            every image's index, file, prompt and seed
    scores.part<R>.jsonl    rank R's new scores as they come, one (image, metric) per line
    scores.jsonl            at the end: every image with every score known (the part files merged, removed)
    results.json, table.md  the statistics over prompts (report/tables.py)

A rerun of the same command reuses every image on disk and every score in these files. A folder made with other
settings, prompts or weights is refused when its evaluation finished (results.json: a result is never replaced
unasked), and set aside when it did not (a run stopped by a fault, then rerun after a fix): removed when it holds no
image yet, else moved to <name>.other-<time>/ beside it (its images are kept, but not reused: they are not this
model's). The hidden temporary files of atomic writes (report/files.py) that a kill leaves are removed.
"""
import json
import os
import shutil
import time
from pathlib import Path

from report.files import write_text
from report.tables import render_table, summarise_groups


def check_manifest(run: Path, manifest: dict) -> list:
    """What the evaluation in `run` differs in from `manifest`: [] when there is none (no manifest.json) or it is
    this one (a rerun resumes it); else ["settings", "images", "weights"] as they differ (["manifest"]: unreadable),
    for set_aside. SystemExit (one line, saying how to go on) when it differs and finished. Reads the files only, so
    every rank gets the same answer."""
    path = run / "manifest.json"
    if not path.is_file():
        return []
    try:
        prev = json.loads(path.read_text())
        diff = [k for k in ("settings", "images") if prev.get(k) != manifest[k]]
        diff += ["weights"] * (prev["model"]["fingerprint"] != manifest["model"]["fingerprint"])
    except (ValueError, KeyError, TypeError, AttributeError):  # edited by hand: no use to a resume
        diff = ["manifest"]
    if diff and (run / "results.json").is_file():
        what = "an unreadable manifest.json" if diff == ["manifest"] else f"other {' and '.join(diff)}"
        raise SystemExit(f"evaluate.py: {run} holds a finished evaluation with {what}: give this one another name "
                         f"(--names) or another --out, or delete {run} to replace it")
    return diff


def images(run: Path) -> list:
    """The images in `run` (not the hidden temporary files of atomic writes)."""
    return sorted(p for p in (run / "images").glob("*.png") if not p.name.startswith("."))


def set_aside(run: Path, diff: list) -> str:
    """Rank 0: move the unfinished evaluation in `run` of other settings or weights (check_manifest's `diff`) out of
    the way: removed when it holds no image, else renamed to <name>.other-<time>. Returns the line to print."""
    what = "an unreadable manifest.json" if diff == ["manifest"] else f"other {' and '.join(diff)}"
    n = len(images(run))
    if not n:
        shutil.rmtree(run)
        return f"{run}: an unfinished evaluation with {what} and no image yet: removed"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = run.with_name(f"{run.name}.other-{stamp}")
    for i in range(2, 1000):
        if not aside.exists():
            break
        aside = run.with_name(f"{run.name}.other-{stamp}-{i}")
    os.replace(run, aside)
    return f"{run}: an unfinished evaluation with {what} ({n} images): moved to {aside} (delete it when not needed)"


def tidy(run: Path):
    """Rank 0, before the ranks write into `run`: remove the hidden temporary files that killed atomic writes left."""
    for p in list(run.glob(".*.tmp*")) + list(run.glob("images/.*.tmp*")):
        if p.is_file():
            p.unlink(missing_ok=True)


def read_scores(run: Path) -> dict:
    """{index: {metric: score}} from scores.jsonl and every scores.part*.jsonl (a line cut by a kill is skipped)."""
    done = {}
    for f in [run / "scores.jsonl"] + sorted(run.glob("scores.part*.jsonl")):
        for line in f.read_text().splitlines() if f.is_file() else []:
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            scores = {r["metric"]: r["score"]} if "metric" in r else r["scores"]  # part file: one (image, metric)
            done.setdefault(r["index"], {}).update(scores)
    return done


def finish(run: Path, manifest: dict, done: dict, metrics: list, skipped: dict, columns: dict = None) -> dict:
    """scores.jsonl (the part files merged, then removed), results.json and table.md; returns the results."""
    rows = [{**image, "scores": done.get(image["index"], {})} for image in manifest["images"]]
    write_text(run / "scores.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    for f in run.glob("scores.part*.jsonl"):
        f.unlink()
    results = {"name": manifest["name"], "settings": manifest["settings"], "images": len(rows),
               "prompts": len({r["prompt_index"] for r in rows}), **summarise_groups(rows, metrics),
               "skipped": skipped}
    write_text(run / "results.json", json.dumps(results, indent=1))
    write_text(run / "table.md", render_table([(run, results)], columns=columns) + "\n")
    return results

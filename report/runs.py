"""An evaluated model's folder <out>/<name>/ as evaluate.py writes it, reads it back to resume, and
`--compare` (report/tables.py, report/figures.py) reads it:

    images/JJJJJ_KK.png     image k of prompt j, written atomically as it is made
    manifest.json           name, model (folder, checkpoint, fingerprint of the weights), settings, and
                            every image's index, file, prompt and seed
    scores.part<R>.jsonl    rank R's new scores as they come, one (image, metric) per line
    scores.jsonl            at the end: every image with every score known (the part files merged, removed)
    results.json, table.md  the statistics over prompts (report/tables.py)

A rerun of the same command reuses every image on disk and every score in these files; a folder made
with other settings, prompts or weights is refused.
"""
import json
from pathlib import Path

from report.files import write_text
from report.tables import render_table, summarise_groups


def check_manifest(run: Path, manifest: dict):
    """SystemExit if run/manifest.json exists and differs from `manifest` in settings, images or weights."""
    path = run / "manifest.json"
    if not path.is_file():
        return
    prev = json.loads(path.read_text())
    diff = [k for k in ("settings", "images") if prev.get(k) != manifest[k]]
    diff += ["weights"] * (prev["model"]["fingerprint"] != manifest["model"]["fingerprint"])
    if diff:
        raise SystemExit(f"evaluate.py: {run} holds a run with other {' and '.join(diff)}; use another --out "
                         "or --names (or delete it)")


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


def finish(run: Path, manifest: dict, done: dict, metrics: list, skipped: dict) -> dict:
    """scores.jsonl (the part files merged, then removed), results.json and table.md; returns the results."""
    rows = [{**image, "scores": done.get(image["index"], {})} for image in manifest["images"]]
    write_text(run / "scores.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    for f in run.glob("scores.part*.jsonl"):
        f.unlink()
    results = {"name": manifest["name"], "settings": manifest["settings"], "images": len(rows),
               "prompts": len({r["prompt_index"] for r in rows}), **summarise_groups(rows, metrics),
               "skipped": skipped}
    write_text(run / "results.json", json.dumps(results, indent=1))
    write_text(run / "table.md", render_table([(run, results)]) + "\n")
    return results

"""Write the HPDv2 prompt files a FLUX run reads: the training prompts and the 400 test prompts.

    python data/prepare_hpdv2.py --annotations DIR --out /data

DIR holds the two annotation files of the Hugging Face dataset `ymhao/HPDv2` (Apache-2.0), fetched with
    huggingface-cli download ymhao/HPDv2 train.json test.json --repo-type dataset --local-dir DIR
`train.json` (116 MB, stored with Git LFS: a `git clone` without LFS gives a pointer, refused here) is a
list of pairwise judgements {"prompt", "human_preference", the two images' paths}, so a prompt recurs
once per judgement; `test.json` (436 kB) is a list of {"prompt", "image_path", "rank", "raw_annotations"},
one record per prompt. Only "prompt" is read. The images (train.tar.gz, 31.7 GB) are not needed.

Rule, for each file: every record's prompt, normalised to one line (runs of tabs, line breaks and other
control characters -> one space, then stripped; a prompt left empty is dropped), exact duplicates of the
normalised text removed, in order of first appearance. The paper (after DanceGRPO and MixGRPO, whose prompt lists come from this
dataset) counts 103,700 training and 400 test prompts. Test: one record per prompt, so 400 with or
without the rule (MixGRPO's data/prompts_test.txt: 400 distinct lines). Train: about 645k judgements,
so only the distinct prompts can give 103,700. Neither count was checked on the real files here; a
count that differs from the paper's is flagged when written. Train and test are not made disjoint (an overlap is reported). The HPSv2 benchmark
prompts (benchmark/{anime,concept-art,paintings,photo}.json, 4 x 800 = 3,200) are another set.

Writes hpdv2_train_prompts.txt and hpdv2_test_prompts.txt (UTF-8, one prompt a line, each written to a
temporary file beside it and then renamed into place) after both annotation files have been read and
checked, and prints one line per file: its prompt count and the start of its sha256.
"""
import argparse
import hashlib
import json
import os
import re
import tempfile

SPLITS = {"train": "hpdv2_train_prompts.txt", "test": "hpdv2_test_prompts.txt"}  # <split>.json -> output
PAPER_COUNTS = {"train": 103_700, "test": 400}
DOWNLOAD = "huggingface-cli download ymhao/HPDv2 train.json test.json --repo-type dataset --local-dir DIR"
# every character that ends a line for str.splitlines() (what DanceGRPO's reader splits on) or a file read, tab, every
# other control character and the byte-order mark: what data/prompts.py refuses inside a prompt
_BREAKS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ufeff]+")


def normalise(prompt: str) -> str:
    """One line: runs of tabs, line breaks and control characters become one space; surrounding whitespace is
    stripped."""
    return _BREAKS.sub(" ", prompt).strip()


def _refuse(path, what):
    raise SystemExit(f"prepare_hpdv2.py: {path}: {what}")


def read_annotation(path: str) -> list:
    """The prompt of each record of an HPDv2 annotation file, raw; SystemExit (one line) if it is not one."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        _refuse(path, f"no such file (fetch it: {DOWNLOAD})")
    except (UnicodeDecodeError, IsADirectoryError) as e:
        _refuse(path, f"not a UTF-8 text file ({type(e).__name__})")
    if text.startswith("version https://git-lfs"):
        _refuse(path, f"a Git LFS pointer, not the file (fetch it: {DOWNLOAD})")
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        _refuse(path, f"not JSON ({e.msg} at line {e.lineno} column {e.colno})")
    if not isinstance(records, list) or not records:
        _refuse(path, f"expected a non-empty JSON list of records, got {type(records).__name__}"
                      f"{' (empty)' if records == [] else ''}")
    for i, r in enumerate(records):
        if not isinstance(r, dict) or not isinstance(r.get("prompt"), str):
            _refuse(path, f"record {i} is not an object with a string \"prompt\" (got {str(r)[:60]!r})")
        try:
            r["prompt"].encode("utf-8")
        except UnicodeEncodeError:
            _refuse(path, f"record {i}: its prompt is not encodable as UTF-8 (a lone surrogate)")
    return [r["prompt"] for r in records]


def unique_prompts(raw: list) -> list:
    """Normalised, non-empty, exact duplicates removed, in order of first appearance."""
    return list(dict.fromkeys(p for p in map(normalise, raw) if p))


def write_prompts(path: str, prompts: list) -> str:
    """Write one prompt a line, atomically (temporary file in the same folder, then os.replace); its sha256."""
    data = "".join(p + "\n" for p in prompts).encode("utf-8")
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=os.path.dirname(path) or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return hashlib.sha256(data).hexdigest()


def prepare(annotations: str, out: str) -> dict:
    """Read and check both annotation files, then write both prompt files; {split: (path, count, sha256)}."""
    prompts = {}
    for split in SPLITS:
        path = os.path.join(annotations, f"{split}.json")
        raw = read_annotation(path)
        prompts[split] = unique_prompts(raw)
        if not prompts[split]:
            _refuse(path, "holds no non-blank prompt")
        print(f"{path}: {len(raw):,} records, {len(prompts[split]):,} distinct prompts")
    os.makedirs(out, exist_ok=True)
    written = {}
    for split, name in SPLITS.items():
        path = os.path.join(out, name)
        sha = write_prompts(path, prompts[split])
        written[split] = (path, len(prompts[split]), sha)
        note = "" if len(prompts[split]) == PAPER_COUNTS[split] else f" (the paper counts {PAPER_COUNTS[split]:,})"
        print(f"wrote {path}: {len(prompts[split]):,} prompts{note}, sha256 {sha[:12]}")
    overlap = len(set(prompts["train"]) & set(prompts["test"]))
    if overlap:
        print(f"note: {overlap:,} test prompts also appear in the training prompts (kept in both)")
    return written


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--annotations", required=True, help="folder with HPDv2's train.json and test.json")
    ap.add_argument("--out", required=True, help="folder to write hpdv2_train_prompts.txt and hpdv2_test_prompts.txt")
    a = ap.parse_args(argv)
    prepare(a.annotations, a.out)


if __name__ == "__main__":
    main()

"""data/prepare_hpdv2.py: HPDv2's train.json / test.json -> the two prompt files train.py and evaluate.py read."""
import hashlib
import json
import os
import subprocess
import sys
import tempfile

import pytest
from hypothesis import given, settings, strategies as st

from data.prepare_hpdv2 import normalise, prepare, unique_prompts
from data.prompts import prompt_file_errors, read_prompts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def judgement_record(prompt):  # the shape of HPDv2's train.json: one pairwise judgement
    return {"human_preference": [1, 0], "prompt": prompt, "file_path": ["00001.jpg", "00002.jpg"]}


def eval_record(prompt):  # the shape of HPDv2's test.json: one prompt, its ranked images
    return {"prompt": prompt, "image_path": ["a.jpg", "b.jpg"], "rank": [2, 1],
            "raw_annotations": [{"rank": [2, 1], "user_hash": "u"}]}


def annotations(folder, train, test, ensure_ascii=True):
    os.makedirs(folder, exist_ok=True)
    files = {"train.json": [judgement_record(p) for p in train], "test.json": [eval_record(p) for p in test]}
    for name, records in files.items():
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            json.dump(records, f, ensure_ascii=ensure_ascii)
    return folder


def test_distinct_prompts_in_order_of_first_appearance_and_the_counts_printed(tmp_path, capsys):
    train = ["a red fox", "a blue whale", "a red fox", "  a blue whale\t", "A red fox", "a castle"]
    ann = annotations(tmp_path / "ann", train, ["t1", "t2", "t3"])
    written = prepare(ann, tmp_path / "out")
    expected = ["a red fox", "a blue whale", "A red fox", "a castle"]
    assert read_prompts(tmp_path / "out" / "hpdv2_train_prompts.txt") == expected
    assert read_prompts(tmp_path / "out" / "hpdv2_test_prompts.txt") == ["t1", "t2", "t3"]
    out = capsys.readouterr().out
    assert "6 records, 4 distinct prompts" in out and "3 records, 3 distinct prompts" in out
    for split, n in (("train", 4), ("test", 3)):
        path, count, sha = written[split]
        with open(path, "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == sha and count == n
        assert f"wrote {path}: {n} prompts (the paper counts " in out and f"sha256 {sha[:12]}" in out


def test_duplicates_are_exact_matches_of_the_normalised_text():
    raw = ["a cat", " a cat ", "a cat\n", "a  cat", "A cat", "a cat\r\n", "a\tcat", "a cat"]
    assert unique_prompts(raw) == ["a cat", "a  cat", "A cat"]  # whitespace inside is kept, case is kept


def test_an_embedded_line_break_becomes_one_space_and_blank_prompts_are_dropped(tmp_path):
    train = ["a dog\non a hill", "two\r\nlines", "para\u2028sep", "tab\there", " \n\t ", "", "last"]
    ann = annotations(tmp_path / "ann", train, ["x"])
    prepare(ann, tmp_path / "out")
    path = tmp_path / "out" / "hpdv2_train_prompts.txt"
    expected = ["a dog on a hill", "two lines", "para sep", "tab here", "last"]
    assert read_prompts(path) == expected
    assert path.read_text(encoding="utf-8").splitlines() == expected  # DanceGRPO's reader splits on more


def test_unicode_prompts_round_trip(tmp_path):
    train = ["café au lait", "東京の夜景、ネオン", "🦊 in the snow", "naïve\u00a0façade"]
    for ensure_ascii in (True, False):  # \u escapes or raw UTF-8 in the JSON
        ann = annotations(tmp_path / f"ann{ensure_ascii}", train, ["Ωmega"], ensure_ascii)
        prepare(ann, tmp_path / f"out{ensure_ascii}")
        assert read_prompts(tmp_path / f"out{ensure_ascii}" / "hpdv2_train_prompts.txt") == train
        assert read_prompts(tmp_path / f"out{ensure_ascii}" / "hpdv2_test_prompts.txt") == ["Ωmega"]


@pytest.mark.parametrize("content, says", [
    ('{"prompt": "a cat"}', "expected a non-empty JSON list of records, got dict"),
    ("[]", "expected a non-empty JSON list of records, got list (empty)"),
    ('["a cat", "a dog"]', 'record 0 is not an object with a string "prompt"'),
    ('[{"prompt": "a cat"}, {"caption": "a dog"}]', 'record 1 is not an object with a string "prompt"'),
    ('[{"prompt": 3}]', 'record 0 is not an object with a string "prompt"'),
    ('[{"prompt": "\\ud800"}]', "record 0: its prompt is not encodable as UTF-8"),
    ('[{"prompt": " "}, {"prompt": "\\n"}]', "holds no non-blank prompt"),
    ('[{"prompt": "a cat"},', "not JSON (Expecting value at line 1"),
    ("version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 1\n", "a Git LFS pointer, not the file"),
    (None, "no such file (fetch it: huggingface-cli download ymhao/HPDv2 train.json test.json"),
])
@pytest.mark.parametrize("bad", ["train.json", "test.json"])
def test_a_wrong_annotation_file_is_refused_in_one_line_and_nothing_is_written(tmp_path, content, says, bad):
    ann = annotations(tmp_path / "ann", ["a cat"], ["a dog"])
    if content is None:
        os.remove(ann / bad)
    else:
        (ann / bad).write_text(content, encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()
    (out / "hpdv2_test_prompts.txt").write_text("an older file\n", encoding="utf-8")
    with pytest.raises(SystemExit) as e:
        prepare(ann, out)
    msg = str(e.value)
    assert msg == f"prepare_hpdv2.py: {ann / bad}: {msg.split(': ', 2)[2]}" and says in msg and "\n" not in msg
    assert sorted(os.listdir(out)) == ["hpdv2_test_prompts.txt"]  # no new file, no temporary file
    assert (out / "hpdv2_test_prompts.txt").read_text(encoding="utf-8") == "an older file\n"


def test_the_files_pass_the_prompt_file_checks_and_replace_older_ones(tmp_path):
    out = tmp_path / "out"
    prepare(annotations(tmp_path / "a1", ["old"], ["old test"]), out)
    prepare(annotations(tmp_path / "a2", ["new one", "new two"], ["new test"]), out)
    assert sorted(os.listdir(out)) == ["hpdv2_test_prompts.txt", "hpdv2_train_prompts.txt"]  # no temporary left
    for name, expected in (("hpdv2_train_prompts.txt", ["new one", "new two"]), ("hpdv2_test_prompts.txt", ["new test"])):
        assert prompt_file_errors(str(out / name)) == [] and read_prompts(out / name) == expected


def test_the_command_line(tmp_path):
    ann = annotations(tmp_path / "ann", ["a cat", "a cat", "a dog"], ["t"])
    run = subprocess.run([sys.executable, "data/prepare_hpdv2.py", "--annotations", str(ann), "--out", str(tmp_path / "o")],
                         cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr
    assert f"wrote {tmp_path / 'o' / 'hpdv2_train_prompts.txt'}: 2 prompts" in run.stdout
    os.remove(ann / "test.json")
    run = subprocess.run([sys.executable, "data/prepare_hpdv2.py", "--annotations", str(ann), "--out", str(tmp_path / "o")],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 1 and run.stderr.strip().splitlines() == [
        f"prepare_hpdv2.py: {ann / 'test.json'}: no such file (fetch it: huggingface-cli download ymhao/HPDv2 "
        "train.json test.json --repo-type dataset --local-dir DIR)"]


tricky = st.text(alphabet="ab é\t\n\r\x0b\x0c\x1c\x1d\x1e\x1f\x85\u2028\u2029\u00a0\u3000東🦊")


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(st.text(), tricky), max_size=12), st.booleans())
def test_any_prompts_round_trip_through_the_files_as_their_normalised_distinct_lines(prompts, ensure_ascii):
    with tempfile.TemporaryDirectory() as d:
        ann = annotations(os.path.join(d, "ann"), prompts + ["fallback"], ["t"], ensure_ascii)
        prepare(ann, os.path.join(d, "out"))
        path = os.path.join(d, "out", "hpdv2_train_prompts.txt")
        got = read_prompts(path)
        with open(path, encoding="utf-8") as f:
            assert f.read().splitlines() == got  # one prompt a line for str.splitlines() too, no blank line
    expected = list(dict.fromkeys(p for p in (normalise(q) for q in prompts + ["fallback"]) if p))
    assert got == expected and len(set(got)) == len(got)
    assert all(p == p.strip() and p == normalise(p) for p in got)

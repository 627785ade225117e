"""Prompt files (data/prompts.py) are read the way people write them and refused, in one short line, when they
are not text; a prompt list is checked against what the rewards can score (rewards/__init__.py, prompt_errors)."""
import os
import tempfile

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from data.prompts import MAX_PROMPT_CHARS, numbered_prompts, prompt_file_errors, read_prompts, short
from rewards import lookup, prompt_errors

FLAG = "--probe-prompts"  # not the default: each line must name the flag it was given
ENCODINGS = {"utf-8": b"", "utf-8 with BOM": b"\xef\xbb\xbf", "utf-16-le": b"\xff\xfe", "utf-16-be": b"\xfe\xff",
             "utf-32-le": b"\xff\xfe\x00\x00", "utf-32-be": b"\x00\x00\xfe\xff"}


def encode(text: str, encoding: str) -> bytes:
    """The bytes a text editor writes for `text` in `encoding` (a byte-order mark first, where it has one)."""
    return ENCODINGS[encoding] + text.encode(encoding.split()[0])


def errors_of(tmp_path, content: bytes, name="prompts.txt"):
    path = tmp_path / name
    path.write_bytes(content)
    return path, prompt_file_errors(str(path), FLAG)


def assert_one_short_line(errors, path, *says):
    """Exactly one problem, opening with the flag and the path, on one line of < 300 characters."""
    assert len(errors) == 1, errors
    line = errors[0]
    assert line.startswith(f"{FLAG} {path}: ") and "\n" not in line and len(line) < 300, line
    for part in says:
        assert part in line, (part, line)


# ---- read the way people write them -----------------------------------------------------------------------------
prompt_text = st.text(st.characters(exclude_categories=("Cs", "Cc", "Zl", "Zp"), include_characters="\t"),
                      min_size=1, max_size=40).filter(
    lambda p: p == p.strip() and p and not p.startswith(("\ufeff", "[", "{", "version https://git-lfs")))


def numbered(content: bytes) -> list:
    """numbered_prompts of a file holding `content` (which passes the checks, and read_prompts agrees)."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "p.txt")
        with open(path, "wb") as f:
            f.write(content)
        assert prompt_file_errors(path, FLAG) == []
        found = numbered_prompts(path)
        assert read_prompts(path) == [p for _, p in found]
        return found


ENDINGS, PADS = ["\n", "\r\n", "\r"], ["", " ", "\t ", "\u3000"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(prompt_text, st.sampled_from(ENDINGS), st.sampled_from(PADS), st.booleans()), min_size=1,
                max_size=8), st.sampled_from(sorted(ENCODINGS)), st.booleans())
def test_any_printable_prompts_read_back_as_written_in_any_accepted_encoding_and_line_ending(lines, encoding, last):
    text = "".join(pad + p + pad + end + (end if blank else "") for p, end, pad, blank in lines)
    text = text if last else text.rstrip("\r\n")  # with or without a line break at the end
    assert [p for _, p in numbered(encode(text, encoding))] == [p for p, *_ in lines]


def test_what_people_write_is_read():
    notepad = encode("a cat\r\n\r\n  a dog on a mat  \r\nthe end", "utf-16-le")  # Windows Notepad's "Unicode"
    assert numbered(notepad) == [(1, "a cat"), (3, "a dog on a mat"), (4, "the end")]
    assert numbered(b"a cat\r\ra dog\r") == [(1, "a cat"), (3, "a dog")]  # old Mac
    joined = encode("a cat\n", "utf-8 with BOM") + encode("a dog\n", "utf-8 with BOM")  # cat a.txt b.txt
    assert numbered(joined) == [(1, "a cat"), (2, "a dog")]
    mixed = "caf\u00e9 \t au  lait\r\n\u6771\u4eac\r\U0001F98A\n".encode()  # tabs and runs of spaces kept
    assert numbered(mixed) == [(1, "caf\u00e9 \t au  lait"), (2, "\u6771\u4eac"), (3, "\U0001F98A")]


# ---- refused, in one short line that names the flag, the file and the line --------------------------------------
@pytest.mark.parametrize("content,says", [
    (b"a cat\ncaf\xe9 au lait\n", ["not a UTF-8 text file", "line 2, column 4", "0xe9", "iconv -f cp1252 -t utf-8"]),
    ("a cat\nthe dog\n".encode("utf-16-le"), ["NUL", "line 1", "UTF-16 without a byte-order mark"]),  # no BOM
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", ["NUL", "line 3"]),  # binary
    ("a cat\nred \x1b[31m text\n".encode(), ["line 2, column 5", "U+001B"]),  # a terminal escape
    ("a cat\nx\x7fy\n".encode(), ["line 2, column 2", "U+007F"]),  # DEL
    ("a cat\r\nx\u0085y\r\n".encode(), ["line 2, column 2", "U+0085"]),  # C1 NEXT LINE
    ("a cat\na dog\u2028a bird\n".encode(), ["line 2, column 6", "U+2028"]),  # Unicode line separator
    ("a cat\n\u2029\n".encode(), ["line 2, column 1", "U+2029"]),
    ("a cat\fpage two\n".encode(), ["line 1, column 6", "U+000C"]),  # form feed
    (encode("a cat\n\x00\n", "utf-16-le"), ["line 2, column 1", "U+0000"]),  # NUL inside UTF-16 text
    (b"\xff\xfe" + "a cat".encode("utf-16-le") + b"x", ["UTF-16-LE", "line 1"]),  # half a character at the end
    (b"a cat\n" + b"x" * 100_000 + b"\n", ["line 2", "100,000 characters", f"{MAX_PROMPT_CHARS}"]),
    (b"a\x01\nb\x02\nc\x03\n", ["line 1, column 2", "U+0001", "2 more refused lines"]),
    (b'[\n {"prompt": "a cat"},\n {"prompt": "a dog"}\n]\n', ["a JSON file"]),
    (b'{"prompt": "a cat"}\n{"prompt": "a dog"}\n', ["a JSON Lines file"]),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 12\n", ["Git LFS pointer"]),
    (b"", ["holds no prompt"]), (b"  \n\r\n\t\r", ["holds no prompt"])])
def test_a_file_that_is_not_prompts_is_refused_in_one_short_line(tmp_path, content, says):
    path, errors = errors_of(tmp_path, content)
    assert_one_short_line(errors, path, *says)
    if "holds no prompt" not in says:
        with pytest.raises(ValueError, match=f"^{path}: "):  # read_prompts alone: the same line without the flag
            read_prompts(path)


def test_a_long_line_is_shown_abbreviated(tmp_path):
    path, errors = errors_of(tmp_path, b"a cat\n" + "\u00e9".encode() * 50_000)
    assert_one_short_line(errors, path, "line 2", "50,000 characters", "\u00e9" * 30 + "\u2026")


def test_a_folder_and_a_missing_file_are_named(tmp_path):
    assert_one_short_line(prompt_file_errors(str(tmp_path), FLAG), tmp_path, "a folder")
    assert_one_short_line(prompt_file_errors(str(tmp_path / "nope.txt"), FLAG), tmp_path / "nope.txt", "no such file")
    assert prompt_file_errors(str(tmp_path / "nope.txt")) == [f"--prompts {tmp_path / 'nope.txt'}: no such file"]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(ENCODINGS.values())), st.binary(max_size=64) | st.text(max_size=32).map(str.encode))
def test_any_bytes_give_prompts_or_one_short_line(bom, body):
    content = bom + body
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "p.txt")
        with open(path, "wb") as f:
            f.write(content)
        errors = prompt_file_errors(path, FLAG)
        if errors:
            assert_one_short_line(errors, path)
        else:
            prompts = read_prompts(path)
            assert prompts and all(p == p.strip() and 0 < len(p) <= MAX_PROMPT_CHARS for p in prompts)


def test_short_shows_at_most_the_limit_with_control_characters_escaped():
    assert short("a cat") == "'a cat'"
    assert short("x" * 100) == "'" + "x" * 60 + "\u2026'"
    assert short("red \x1b[31m\u2028") == "'red \\x1b[31m\\u2028'"  # never the raw escape
    assert len(short("\x00" * 1000)) <= 60 + 3


# ---- every prompt against what the rewards can score -------------------------------------------------------------
def test_prompts_outside_the_small_worlds_grammar_are_refused_for_toy_adherence_before_any_work():
    prompts = ["a red circle on the left", "a photo of a cat", "A  Blue square AT the top", "x" * 5000]
    errors = prompt_errors("toy-adherence+toy-clean", prompts, "--prompts p.txt", lines=[1, 3, 4, 7])
    assert len(errors) == 1 and len(errors[0]) < 300, errors
    assert errors[0].startswith("--prompts p.txt: 2 of 4 prompts are not what toy-adherence scores")
    assert "'a <colour> <shape> <place>'" in errors[0] and errors[0].endswith("the first, line 3: 'a photo of a cat'")
    long = prompt_errors("toy-adherence", prompts[:1] * 3 + ["x" * 5000], FLAG)  # no lines: counted from 1
    assert len(long) == 1 and len(long[0]) < 300 and long[0].endswith("prompt 4: '" + "x" * 60 + "\u2026'")
    assert prompt_errors("toy-adherence", prompts[:1] + prompts[2:3]) == []  # the grammar as parse reads it
    for spec in ("toy-clean", "toy-shape+toy-clean", "hps+clip", "no-such-reward", "toy-adherence+toy-adherence"):
        assert prompt_errors(spec, prompts) == []  # no rule, or a spec reward_spec_errors names


def test_the_rule_is_exactly_what_each_toy_reward_can_score():
    images = torch.rand(1, 3, 16, 16)
    for prompt in ("a red circle on the left", "a  YELLOW triangle in the centre ", "a photo of a cat",
                   "a purple circle on the left", "a red circle on the left at night", ""):
        for name in ("toy-adherence", "toy-clean", "toy-shape"):
            spec = lookup(name)
            refused = bool(prompt_errors(name, [prompt]))
            try:
                spec.load().score(images, [prompt])
                scored = True
            except ValueError:
                scored = False
            assert scored != refused, (name, prompt)

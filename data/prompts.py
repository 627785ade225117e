"""The prompt stream of a training run: the prompt file, the seeded sampler, what a run will consume.

A prompt file is one prompt a line, read the way people write them and checked before any work:

    encoding     UTF-8, with or without a byte-order mark; UTF-16 or UTF-32, little- or big-endian, with a
                 byte-order mark (Windows Notepad's "Unicode" is UTF-16 LE with one). A file with a NUL
                 byte and no byte-order mark is refused (UTF-16 without one, or not text), and so is one
                 that is not valid in its encoding (a Windows-1252 file, say): the line, the column, the
                 byte, and how to convert (iconv -f cp1252 -t utf-8 OLD > NEW).
    lines        end with LF, CRLF or CR (old Mac), mixed freely. Each line is stripped of surrounding
                 whitespace (str.strip) and of a byte-order mark at its start (files joined with `cat`);
                 blank lines are skipped. Inside a prompt, tabs, runs of spaces and every other character
                 are kept as written (tokenizers normalise whitespace); no Unicode normalisation.
    refused      a line holding a control character other than tab (C0, DEL, C1 such as U+0085 NEXT
                 LINE) or U+2028 / U+2029 (Unicode line and paragraph separators): the line, the column,
                 the code point. A prompt longer than MAX_PROMPT_CHARS (4096) characters: the line and its
                 length (FLUX reads 512 T5 tokens, about 2,000 English characters; such a line is almost
                 always a file without line breaks). A JSON or JSON Lines file, and a Git LFS pointer.

Every refusal is one line that names the file, the line where it applies, and at most ~60 characters of
a prompt (`short`); a file with several bad lines names the first and counts the others. What a reward
can score (the small world's grammar) is checked in rewards/__init__.py (prompt_errors).

The sampler is deterministic (seed, epoch-shuffled, strided over ranks), so its position is all a
checkpoint needs, and the prompts of every future iteration are known in advance: a run encodes
exactly those (each rank its own), not the whole file.
"""
import json
import os
import re
import unicodedata

import torch

MAX_PROMPT_CHARS = 4096  # longer is no prompt: FLUX's T5 reads 512 tokens (~2,000 characters), CLIP 77
SNIFF_BYTES = 1 << 16  # a file with a NUL byte here (and no byte-order mark) is refused unread beyond it
BOMS = ((b"\xff\xfe\x00\x00", "utf-32-le"), (b"\x00\x00\xfe\xff", "utf-32-be"), (b"\xff\xfe", "utf-16-le"),
        (b"\xfe\xff", "utf-16-be"), (b"\xef\xbb\xbf", "utf-8"))  # UTF-32 LE before UTF-16 LE: same first bytes
_BREAK = re.compile(r"\r\n|\r|\n")
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")  # refused in a line (tab is kept)


class PromptFileError(ValueError):
    """A file that is not one prompt a line of text; str(e) is one line that starts with the file's path."""


def short(text: str, limit: int = 60) -> str:
    """`text` quoted for a message: at most `limit` characters, non-printable ones escaped, '…' where cut."""
    out, n = [], 0
    for ch in text:
        piece = ch if ch.isprintable() else ascii(ch)[1:-1]
        if n + len(piece) > limit:
            out.append("…")
            break
        out.append(piece)
        n += len(piece)
    return "'" + "".join(out) + "'"


def _encoding(data: bytes) -> tuple:
    """(codec, length of its byte-order mark) of a file starting with `data`; UTF-8 without a mark."""
    return next(((codec, len(bom)) for bom, codec in BOMS if data.startswith(bom)), ("utf-8", 0))


def _read(path) -> bytes:
    """The bytes of the file; only its first SNIFF_BYTES when these already hold a NUL without a byte-order
    mark (the file is refused, and a 30 GB weight file given by mistake is not read whole)."""
    with open(path, "rb") as f:
        head = f.read(SNIFF_BYTES)
        return head if b"\0" in head and _encoding(head)[0] == "utf-8" else head + f.read()


def _place(before: str) -> str:
    """'line L, column C' of the character that follows the text `before`."""
    lines = _BREAK.split(before)
    return f"line {len(lines)}, column {len(lines[-1]) + 1}"


def _decode(path, data: bytes) -> str:
    """The text of the file's bytes; PromptFileError for a NUL byte without a byte-order mark or invalid bytes."""
    codec, skip = _encoding(data)
    body = data[skip:]
    if codec == "utf-8" and b"\0" in body:
        at = _place(body[:body.index(b"\0")].decode("utf-8", "replace"))
        raise PromptFileError(f"{path}: not a UTF-8 text file: a NUL byte at {at}: UTF-16 without a byte-order "
                              "mark (iconv -f utf-16le -t utf-8 OLD > NEW) or not text at all")
    try:
        return body.decode(codec)
    except UnicodeDecodeError as e:
        at = _place(body[:e.start].decode(codec, "replace"))
        if codec == "utf-8":
            raise PromptFileError(f"{path}: not a UTF-8 text file: byte 0x{body[e.start]:02x} at {at}; convert it "
                                  "from its encoding, e.g. iconv -f cp1252 -t utf-8 OLD > NEW") from None
        raise PromptFileError(f"{path}: not valid {codec.upper()} text, as its byte-order mark says ({e.reason} "
                              f"at {at}); save it as UTF-8") from None


def _line_problem(n: int, line: str) -> str:
    """Why line n (its text, without the line break) holds no prompt, or ''."""
    if m := _CONTROL.search(line):
        name = unicodedata.name(m.group(), "")
        return (f"line {n}, column {m.start() + 1}: control character U+{ord(m.group()):04X}"
                f"{f' {name}' if name else ''}, which a prompt may not hold (only tab; end lines with LF, CRLF or CR)")
    if len(prompt := line.strip()) > MAX_PROMPT_CHARS:
        return (f"line {n}: {len(prompt):,} characters, more than the {MAX_PROMPT_CHARS} a prompt may have (FLUX "
                f"reads 512 T5 tokens): a file without line breaks? It starts {short(prompt, 40)}")
    return ""


def _format(text: str) -> str:
    """'JSON' or 'JSON Lines' when the text is a JSON list or object, or its first line a JSON object with keys;
    else '' (a prompt may well start with '[' or '{')."""
    text = text.lstrip("\ufeff \t\r\n")
    if not text.startswith(("[", "{")):
        return ""
    for kind, doc, wanted in (("JSON", text, (list, dict)), ("JSON Lines", _BREAK.split(text, 1)[0], dict)):
        try:
            found = json.loads(doc)
        except ValueError:
            continue
        if isinstance(found, wanted) and (found or kind == "JSON"):  # '{}' alone on line 1 may be a prompt
            return kind
    return ""


def numbered_prompts(path) -> list:
    """[(line number, prompt)] of a prompt file, in order (the module's docstring says what is read).
    PromptFileError (one line, starting with the path) for a file that is not one prompt a line of text;
    OSError (FileNotFoundError, IsADirectoryError, ...) when it cannot be read."""
    text = _decode(path, _read(path))
    if text.startswith("version https://git-lfs"):
        raise PromptFileError(f"{path}: a Git LFS pointer, not the file (fetch it: git lfs pull)")
    if kind := _format(text):
        raise PromptFileError(f"{path}: a {kind} file, not one prompt a line (for HPDv2's annotation files "
                              "data/prepare_hpdv2.py writes them)")
    prompts, problems = [], []
    for n, line in enumerate(_BREAK.split(text), 1):
        if problem := _line_problem(n, line):
            problems.append(problem)
        elif prompt := line.lstrip("\ufeff").strip():
            prompts.append((n, prompt))
    if problems:
        more = f" (and {len(problems) - 1:,} more refused lines)" if len(problems) > 1 else ""
        raise PromptFileError(f"{path}: {problems[0]}{more}")
    return prompts


def read_prompts(path) -> list:
    """The prompts of a prompt file: its non-blank lines, stripped (numbered_prompts without the numbers)."""
    return [prompt for _, prompt in numbered_prompts(path)]


def prompt_file_errors(path, flag: str = "--prompts") -> list:
    """One line per problem of the prompt file given with `flag` (e.g. --probe-prompts), each starting with
    '<flag> <path>: ': missing, a folder, unreadable, not one prompt a line of text (numbered_prompts), or
    no prompt in it. [] when read_prompts(path) returns at least one prompt."""
    where = f"{flag} {path}"
    if not os.path.exists(path):
        return [f"{where}: no such file"]
    if os.path.isdir(path):
        return [f"{where}: a folder, not a file of prompts (one a line)"]
    try:
        prompts = read_prompts(path)
    except PromptFileError as e:
        return [f"{flag} {e}"]
    except OSError as e:
        return [f"{where}: cannot be read ({e.strerror or type(e).__name__})"]
    return [] if prompts else [f"{where}: holds no prompt (empty or blank lines only)"]


class PromptSampler:
    """Seeded, epoch-shuffled, rank-strided prompts; its position is part of the checkpoint."""

    def __init__(self, prompts, seed, rank, world, per_rank):
        self.prompts, self.seed, self.rank, self.world, self.per_rank = prompts, seed, rank, world, per_rank
        self.position = 0  # global prompt index consumed so far (same on every rank)

    def next(self):
        """[(global prompt index, prompt)] of this rank for one iteration."""
        out = []
        for j in range(self.per_rank):
            g = self.position + self.rank * self.per_rank + j
            epoch, i = divmod(g, len(self.prompts))
            perm = torch.randperm(len(self.prompts), generator=torch.Generator().manual_seed(self.seed + epoch))
            out.append((g, self.prompts[perm[i]]))
        self.position += self.world * self.per_rank
        return out


def future_prompts(sampler: PromptSampler, iterations: int) -> list:
    """The distinct prompts `sampler` hands this rank in the next `iterations` iterations (it is not moved)."""
    copy = PromptSampler(sampler.prompts, sampler.seed, sampler.rank, sampler.world, sampler.per_rank)
    copy.position = sampler.position
    return list(dict.fromkeys(p for _ in range(iterations) for _, p in copy.next()))


def encoding_share(needs: list, rank: int) -> list:
    """The prompts rank `rank` encodes into a shared prompt cache, given every rank's list of the prompts it needs
    (needs[r]): each distinct prompt goes to exactly one of the ranks that need any (round robin in order of first
    need), so no two ranks ever write one cache file and no rank loads the text encoders for others only."""
    distinct = list(dict.fromkeys(p for need in needs for p in need))
    workers = [r for r, need in enumerate(needs) if need]
    return distinct[workers.index(rank)::len(workers)] if rank in workers else []

"""How an exported folder is written (policy.weights.save_model_folder, policy.lora.save_lora): its bytes are a function
of the weights and settings alone, and it is never seen half-written or half-deleted under its final name.

Bytes. safetensors' writer lays the tensors out in one order (by dtype, then name), but holds the file's
`__metadata__` in a Rust hash map whose order is drawn anew in every process: a file with two metadata entries
(diffusers' LoRA export has "format" and "lora_adapter_metadata") comes out with them in either order, so two
identical runs wrote different bytes. `sort_header` rewrites the header of a written file in one order:
`__metadata__` first with its keys sorted, then the tensors in the order of their data, as compact JSON padded
with spaces to a multiple of 8 bytes (the format's alignment). The writer's header is compact JSON too, so the
sorted one has its length and only the header's bytes are rewritten, in place (a header of another length, from
another writer, costs a copy of the file).

Whole. The folder is written as `path.tmp` (a leftover one from a killed run is removed first, so none of its
files can mix into the new export), then swapped in: the old export is renamed aside to `path.old`, the new one
renamed to `path`, and only then is the old one deleted. Each rename is atomic, so a kill at any moment leaves
at `path` the whole old export, the whole new one, or nothing (killed between the two renames: the old one is
whole at `path.old`, the new one whole at `path.tmp`); never a folder being written or being deleted.
"""
import json
import os
import shutil
import struct
from pathlib import Path


def fresh(path) -> Path:
    """`path` + ".tmp", empty: whatever an interrupted export left there is removed. Returns it."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    _remove(tmp)
    tmp.mkdir(parents=True)
    return tmp


def swap_in(tmp, path) -> Path:
    """Put the finished folder `tmp` at `path`; the export it replaces is renamed aside, then deleted."""
    path = Path(path)
    old = path.with_name(path.name + ".old")
    _remove(old)
    if path.is_symlink() or path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)  # the export is in place: a leftover here is cleared by the next one
    return path


def _remove(p: Path):
    if p.is_symlink() or p.is_file():
        p.unlink()
    elif p.exists():
        shutil.rmtree(p)


def sort_header(file):
    """Rewrite the header of the safetensors `file` in one order (see the module's docstring); the tensors, their
    metadata and the data stay as they are."""
    with open(file, "r+b") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        ordered = {"__metadata__": dict(sorted(header.pop("__metadata__").items()))} if "__metadata__" in header else {}
        ordered.update(sorted(header.items(), key=lambda item: (item[1]["data_offsets"], item[0])))
        text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
        text += b" " * (-len(text) % 8)
        if len(text) == n:  # the writer's compact JSON: the same entries in another order have the same length
            f.seek(8)
            f.write(text)
            return
        # another writer's spacing: the whole file is written anew, the data copied after the new header
        tmp = Path(f"{file}.sorting")
        with open(tmp, "wb") as g:
            g.write(struct.pack("<Q", len(text)) + text)
            shutil.copyfileobj(f, g, 16 << 20)
    os.replace(tmp, file)


def sort_headers(folder):
    """sort_header on every *.safetensors file in `folder` (not below it, and no link: the linked parts of a model
    folder are the base model's own files)."""
    for file in sorted(Path(folder).glob("*.safetensors")):
        if file.is_file() and not file.is_symlink():
            sort_header(file)

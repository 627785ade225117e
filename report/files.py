"""Atomic files: a reader (or a resumed run) never sees a half-written file.

Every file a run writes whole (images, grids, plots, JSON) goes through `atomic_write`: the
content is written to a hidden temporary sibling, then renamed over the target (rename is atomic
on POSIX within one folder).
"""
import os
import secrets
from pathlib import Path


def atomic_write(path, write):
    """write(tmp_path) then rename tmp_path to `path`; the folder is created. Returns the Path.
    The temporary name keeps the suffix, so writers that infer the format from it (PIL, matplotlib)
    work; a failed write leaves nothing behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{secrets.token_hex(8)}{path.suffix}")  # unique across hosts (pids are not)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text(path, text: str):
    """Atomically write a text file."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def save_png(img, path):
    """(H, W, 3) uint8 array -> PNG, atomically (a file named *.png is always complete)."""
    from PIL import Image
    return atomic_write(path, Image.fromarray(img).save)


def load_png(path):
    """PNG -> (H, W, 3) uint8 array."""
    import numpy as np
    from PIL import Image
    return np.array(Image.open(path).convert("RGB"))

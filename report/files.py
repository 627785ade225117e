"""Atomic files: a reader (or a resumed run) never sees a half-written file; and the file system's errors said in
one line (which path, what is wrong: full, read-only, a file where a folder should be).

Every file a run writes whole (images, grids, plots, JSON) goes through `atomic_write`: the
content is written to a hidden temporary sibling, then renamed over the target (rename is atomic
on POSIX within one folder).
"""
import contextlib
import errno
import os
import secrets
import shutil
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


# ------------------------------------------------------------------------------------------------
# The file system's errors in one line
# ------------------------------------------------------------------------------------------------
CAUSES = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
          errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
          errno.EPERM: "operation not permitted", errno.ENOTDIR: "a file is where a folder should be",
          errno.EEXIST: "something else is already there", errno.EISDIR: "a folder is where a file should be",
          errno.ENAMETOOLONG: "the name is too long", errno.EIO: "an input/output error (the disk or the network)",
          errno.ESTALE: "a stale network file handle (the file system was remounted)", errno.EFBIG: "the file is too large"}
FULL_BELOW = 64 << 20  # bytes free under which a failed write is blamed on a full disk


def os_errors(e: BaseException) -> list:
    """The OSErrors inside `e`: itself, its causes and contexts, and the per-rank failures a
    torch.distributed.checkpoint CheckpointException carries."""
    found, todo, seen = [], [e], set()
    while todo:
        x = todo.pop(0)
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and not isinstance(x, ConnectionError):  # a peer's socket is not the file system
            found.append(x)
        todo += [x.__cause__, x.__context__]
        for failure in (getattr(x, "failures", None) or {}).values():  # CheckpointException: rank -> (exc, tb)
            todo.append(failure[0] if isinstance(failure, tuple) else failure)
    return found


def why_not_written(e: BaseException, path) -> str:
    """One line: why writing at `path` failed. An OSError's errno in words with the file it names; a library's
    error without one (torch.save reports a full disk as `RuntimeError: ... file write failed`) is blamed on a full
    disk when the file system of `path` has under 64 MiB free; else its first line."""
    errors = os_errors(e)
    if errors:
        x = errors[0]
        cause = CAUSES.get(x.errno, x.strerror or type(x).__name__)
        return f"{x.filename or path}: {cause}" + (f" ({x.strerror})" if x.strerror and x.errno in CAUSES else "")
    free = free_bytes(path)
    if free is not None and free < FULL_BELOW:
        return f"{path}: the disk is full ({free >> 20} MiB free; {type(e).__name__})"
    return f"{path}: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"


def free_bytes(path):
    """Bytes free on the file system that holds `path` (or its nearest existing folder); None if unknown."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def folder_errors(path, flag: str) -> list:
    """Why `path` cannot be a folder this process creates and writes into (one line each, naming `flag`), checked
    without writing anything: a file where the folder (or a parent) should be, a read-only file system, no
    permission."""
    p = Path(path).absolute()
    if p.exists() and not p.is_dir():
        return [f"{flag} {path} is a file, not a folder: give a folder"]
    q = p
    while not q.exists():
        q = q.parent
    if not q.is_dir():
        return [f"{flag} {path}: {q} is a file, not a folder: give a folder"]
    if os.statvfs(q).f_flag & os.ST_RDONLY:
        return [f"{flag} {path}: {q} is on a read-only file system: give a writable folder"]
    if not os.access(q, os.W_OK | os.X_OK):
        return [f"{flag} {path}: no permission to write in {q}"]
    return []


@contextlib.contextmanager
def file_errors_in_one_line(who: str, folder):
    """Around a whole run writing into `folder`: a file-system error anywhere (an OSError, or a library's error while
    the disk of `folder` is full) ends the process with one line naming the path and the cause, not a traceback."""
    try:
        yield
    except BaseException as e:  # noqa: BLE001 - re-raised unless it is the file system's (DCP's error is a BaseException)
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        free = free_bytes(folder)
        if not os_errors(e) and (free is None or free >= FULL_BELOW):
            raise
        raise SystemExit(f"{who}: {why_not_written(e, folder)}") from None

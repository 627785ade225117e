"""Every rank must see the same output folder: checkpoint shards, images and scores are written by every
rank and read by rank 0 (or by all of them on --resume).

With node-local disks, two nodes each have their own `--out`: node 1's checkpoint shards never reach node 0,
a checkpoint folder stays `ckpt_N.tmp` there, a --resume silently passes it over, and a fresh run is refused on
one node only. `check_shared` proves the folder is one: rank 0 writes a random token into it, every rank reads
it back, and every rank stops together (rank 0 says which hosts do not see it) if any rank cannot.
"""
import os
import secrets
import socket
import time
from pathlib import Path

from launch.collectives import all_gather_objects, world_size

TOKEN = ".shared-check"


def check_shared(out: Path, rank: int, who: str = "train.py"):
    """SystemExit(1) on every rank (the reason printed by rank 0) unless every rank reads rank 0's token in `out`.
    A world of one has nothing to check."""
    if world_size() == 1:
        return
    out, token = Path(out), secrets.token_hex(16) if rank == 0 else None
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / TOKEN).write_text(token)
    token = all_gather_objects(token)[0]  # after rank 0 wrote it
    views = all_gather_objects((_reads(out / TOKEN, token), socket.gethostname()))  # after every rank read it
    if rank == 0:
        (out / TOKEN).unlink(missing_ok=True)
    blind = [r for r, (ok, _) in enumerate(views) if not ok]
    if blind:
        hosts = sorted({views[r][1] for r in blind})
        raise SystemExit(f"{who}: --out {out} is not one folder for every rank: ranks {_spans(blind)} (host "
                         f"{', '.join(hosts)}) do not see the file rank 0 ({views[0][1]}) wrote there; every rank "
                         f"writes into --out: give a folder on a file system that every node mounts" if rank == 0 else 1)


PATIENCE = float(os.environ.get("G2RPO_SHARED_CHECK_SECONDS", "20"))  # how long a rank looks for rank 0's token


def _reads(path: Path, token: str, patience: float = None) -> bool:
    """Whether `path` holds `token`, asked again for `patience` seconds (PATIENCE): a network file system may answer
    from a stale directory cache for a few seconds after another host created the file."""
    patience = PATIENCE if patience is None else patience
    deadline = time.monotonic() + patience
    while True:
        try:
            if path.read_text() == token:
                return True
        except OSError:
            pass
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)


def _spans(ranks: list) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'"""
    spans, start = [], ranks[0]
    for a, b in zip(ranks, ranks[1:] + [None]):
        if b != a + 1:
            spans.append(f"{start}-{a}" if a > start else f"{a}")
            start = b
    return ", ".join(spans)

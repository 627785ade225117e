"""A training run's folder --out as train.py writes it, and the rules that keep it one run's:

    .lock                 held (flock) by rank 0 for the whole run: a second run into the folder stops
    args.json             the settings of the run (and its world size), written when it starts
    resumes.jsonl         one line per --resume: the iteration it continued from and its settings
    metrics.jsonl         one line per iteration; cut back to the checkpoint a --resume continues from
    ckpt_NNNNNN/          sharded checkpoints (renamed into place when complete), the newest --keep-checkpoints
    samples_NNNNNN.png, reward_curve.png, final/ (the exported model), prompt_cache/
    probes.jsonl, probes/ one line and one image grid per probe of the reward-hacking guard (--probe-every);
                          cut back like metrics.jsonl on --resume
    best/                 the best model by the guard's criterion (exported like final/)

A folder that holds a run is continued only with --resume, and only with the same algorithm-defining
settings; --overwrite clears it first (the prompt cache is kept). Everything here reads the file
system only, so every rank reaches the same answer without a collective.
"""
import atexit
import fcntl
import json
import os
import shutil
import socket
from pathlib import Path

RUN_FILES = ("args.json", "resumes.jsonl", "metrics.jsonl", "reward_curve.png", "final", "final.tmp", "probes.jsonl",
             "probes", "best", "best.tmp")
# settings that a --resume must keep: they define the algorithm, the data stream or the numbers
DEFINING = ("model", "algo", "reward", "prompts", "prompts_per_rank", "G", "T", "eta", "schedule", "shift", "Lambda",
            "sde_steps", "fine_first", "train_fraction", "window", "window_shift_every", "lr", "weight_decay",
            "max_grad_norm", "clip_range", "adv_clip", "step_per_k", "seed", "sampler_seed", "mixed_precision",
            "height", "width", "world_size", "lora_rank", "lora_alpha", "lora_targets")


def holds_run(out: Path) -> bool:
    return any((out / f).exists() for f in RUN_FILES) or bool(scan(out))


def ownership_errors(out: Path, settings: dict, resume: bool, overwrite: bool) -> list:
    """Problems with starting into `out` (one line each): a run there needs --resume or --overwrite, and a
    --resume must keep the DEFINING settings of args.json."""
    if resume and overwrite:
        return ["--resume and --overwrite contradict each other: choose one"]
    if not out.is_dir() or overwrite:
        return []
    if not resume:
        held = holds_run(out)
        return [f"--out {out} holds a run: --resume continues it, --overwrite replaces it, or choose another --out"] * held
    saved = out / "args.json"
    if not saved.is_file():
        return []
    before = json.loads(saved.read_text())
    changed = [k for k in DEFINING if k in before and _same(before[k]) != _same(settings.get(k))]
    return [f"--resume with other settings than the run in {out}: " + ", ".join(
        f"{k} {before[k]!r} -> {settings.get(k)!r}" for k in changed) + " (start a new --out instead)"] if changed else []


def _same(v):
    return list(v) if isinstance(v, (tuple, list)) else v


def start(out: Path, settings: dict, resume: bool, iteration: int):
    """args.json for a new run; for a --resume, a line of resumes.jsonl instead (the run keeps its own
    record); metrics.jsonl cut back to what the checkpoint continued from has seen."""
    if (out / "args.json").exists() and resume:
        with open(out / "resumes.jsonl", "a") as f:
            f.write(json.dumps({"iteration": iteration, "args": settings}) + "\n")
    else:
        (out / "args.json").write_text(json.dumps(settings, indent=1))
    for log in (out / "metrics.jsonl", out / "probes.jsonl"):
        if log.exists():
            keep = [line for line in log.read_text().splitlines() if json.loads(line)["iteration"] <= iteration]
            log.write_text("".join(line + "\n" for line in keep))


def append(out: Path, record: dict):
    """One iteration's record: a line of metrics.jsonl, and the reward curve redrawn (report/figures.py)."""
    from report.figures import plot_curve
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    plot_curve(out / "metrics.jsonl", out / "reward_curve.png")


def append_probe(out: Path, record: dict):
    """One probe of the guard: a line of probes.jsonl (the reward curve draws them at its next redraw)."""
    with open(out / "probes.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def probes(out: Path, upto: int) -> list:
    """The probes.jsonl records up to iteration `upto` (a --resume replays them into the guard)."""
    log = Path(out) / "probes.jsonl"
    recs = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    return [r for r in recs if r["iteration"] <= upto]


def take_lock(out: Path, overwrite: bool = False):
    """Rank 0: an exclusive lock on out/.lock for the life of the process; SystemExit if another run holds it.
    overwrite=True: then remove the previous run's files (clear), under the lock. Where the file system has no
    flock (Lustre mounted without -o flock, some NFS: OSError), an owner file made with O_EXCL instead."""
    out.mkdir(parents=True, exist_ok=True)
    handle = open(out / ".lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        raise SystemExit(f"train.py: --out {out} is in use by another run ({handle.read().strip() or '?'}); "
                         "wait for it or choose another --out")
    except OSError as e:
        handle.close()
        handle = owner_lock(out, e)
    else:
        handle.seek(0), handle.truncate(), handle.write(_me()), handle.flush()
    if overwrite:
        clear(out)
    return handle  # keep it referenced: closing it releases the lock


def _me() -> str:
    return f"host {socket.gethostname()} pid {os.getpid()}"


class OwnerLock:
    """out/.lock.owner, created exclusively (O_EXCL works on every POSIX and network file system) and removed at
    exit. Unlike flock it survives a kill -9: a leftover owner file of this host whose process is gone is taken
    over; one of another host cannot be checked from here and is named for the user to delete."""

    def __init__(self, path: Path):
        self.path = path
        atexit.register(self.release)

    def release(self):
        if self.path.is_file() and self.path.read_text() == _me():
            self.path.unlink(missing_ok=True)


def owner_lock(out: Path, why: OSError) -> OwnerLock:
    path = out / ".lock.owner"
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            holder = path.read_text().strip() if path.is_file() else "?"
            host, _, pid = holder.removeprefix("host ").partition(" pid ")
            if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
                path.unlink(missing_ok=True)  # stale: its run is gone
                continue
            raise SystemExit(f"train.py: --out {out} is in use by another run ({holder}, in {path}: this file system "
                             f"has no flock: {why.strerror or why}); if no run uses the folder, delete {path}")
        with os.fdopen(fd, "w") as f:
            f.write(_me())
        return OwnerLock(path)
    raise SystemExit(f"train.py: --out {out}: could not take {path}; delete it if no run uses the folder")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clear(out: Path):
    """--overwrite: remove the previous run's files (the prompt cache stays: it depends on the prompts only)."""
    paths = [out / name for name in RUN_FILES] + list(scan(out)) + list(out.glob("samples_*.png"))
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def scan(out: Path) -> dict:
    """ckpt_* folder -> '' if it is whole, else what is wrong with it (problems()); oldest first."""
    return {p: problems(p) for p in sorted(Path(out).glob("ckpt_*")) if p.is_dir()}


def problems(ckpt: Path) -> str:
    """'' when the checkpoint folder is whole, else what is wrong: a .tmp folder (interrupted), no state.json,
    unreadable DCP metadata, a file shorter than the metadata says (truncated), a missing rng file."""
    if ckpt.name.endswith(".tmp"):
        return "unfinished (.tmp)"
    if not (ckpt / "state.json").is_file():
        return "no state.json"
    try:
        from torch.distributed.checkpoint import FileSystemReader
        meta = FileSystemReader(str(ckpt)).read_metadata()
        state = json.loads((ckpt / "state.json").read_text())
    except Exception as e:  # noqa: BLE001 - any unreadable metadata makes the folder unusable
        return f"unreadable metadata ({type(e).__name__}: {e})"
    need = {}
    for info in meta.storage_data.values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(need.items()):
        have = (ckpt / name).stat().st_size if (ckpt / name).is_file() else -1
        if have < size:
            return f"{name} is {'missing' if have < 0 else f'truncated ({have} of {size} bytes)'}"
    for r in range(state.get("world_size", 1)):
        if not (ckpt / f"rng_{r}.pt").is_file():
            return f"rng_{r}.pt is missing"
    return ""


def prune(out: Path, keep: int):
    """Delete all but the newest `keep` whole checkpoints, and any broken one older than the newest whole one."""
    found = scan(out)
    whole = [p for p, why in found.items() if not why]
    for path in found:
        if whole and path.name < whole[-1].name and path not in whole[-keep:]:
            shutil.rmtree(path, ignore_errors=True)

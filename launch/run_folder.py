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

from report.files import write_text

RUN_FILES = ("args.json", "resumes.jsonl", "metrics.jsonl", "reward_curve.png", "final", "final.tmp", "final.old",
             "probes.jsonl", "probes", "best", "best.tmp", "best.old")
# settings that a --resume must keep: they define the algorithm, the data stream or the numbers; the digests of the
# files behind --model and --prompts are among them (the same path with other content is another run)
DEFINING = ("model", "algo", "reward", "rewards", "prompts", "prompts_per_rank", "G", "T", "eta", "schedule", "shift",
            "guidance", "Lambda", "sde_steps", "fine_first", "sde_steps_per_iteration", "lambda_weights",
            "train_fraction", "window", "window_shift_every", "lr", "weight_decay", "max_grad_norm", "clip_range",
            "adv_clip", "step_per_k", "seed", "sampler_seed", "mixed_precision", "height", "width", "world_size",
            "lora_rank", "lora_alpha", "lora_targets", "probe_rewards", "probe_prompts", "probe_seeds",
            "probe_max_prompts", "model_digest", "prompts_digest", "probe_prompts_digest")


def holds_run(out: Path) -> bool:
    return any((out / f).exists() for f in RUN_FILES) or bool(scan(out))


def ownership_errors(out: Path, settings: dict, resume: bool, overwrite: bool) -> list:
    """Problems with starting into `out` (one line each): a run there needs --resume or --overwrite; a --resume
    must keep the DEFINING settings of the run (args.json, or its newest whole checkpoint's when args.json is
    damaged) and cannot ask for fewer --iterations than its checkpoint has done."""
    if resume and overwrite:
        return ["--resume and --overwrite contradict each other: choose one"]
    if not out.is_dir() or overwrite:
        return []
    if not resume:
        held = holds_run(out)
        return [f"--out {out} holds a run: --resume continues it, --overwrite replaces it, or choose another --out"] * held
    whole = [p for p, why in scan(out).items() if not why]
    state = json.loads((whole[-1] / "state.json").read_text()) if whole else {}
    errors = []
    if state.get("iteration", 0) > settings.get("iterations", float("inf")):
        errors.append(f"--iterations {settings['iterations']}: the run in {out} has done {state['iteration']} already "
                      f"({whole[-1].name}): give --iterations {state['iteration']} or more, or start a new --out")
    before = read_json(out / "args.json") or state.get("settings") or {}
    changed = [k for k in DEFINING if k in before and _same(before[k]) != _same(settings.get(k))]
    if changed:
        errors.append(f"--resume with other settings than the run in {out}: " + ", ".join(
            f"{k} {_short(before[k])} -> {_short(settings.get(k))}" for k in changed) + " (start a new --out instead)")
    return errors


def read_json(path: Path):
    """The JSON in `path`, or None when it is missing or damaged (cut short by a kill, edited by hand)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _short(v) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


def _same(v):
    return list(v) if isinstance(v, (tuple, list)) else v


def start(out: Path, settings: dict, resume: bool, iteration: int):
    """args.json for a new run (or in place of a damaged one); for a --resume, a line of resumes.jsonl instead (the run
    keeps its own record); metrics.jsonl and probes.jsonl cut back to what the checkpoint continued from has seen (a
    line cut short by a kill is dropped)."""
    if resume and read_json(out / "args.json") is not None:
        with open(out / "resumes.jsonl", "a") as f:
            f.write(json.dumps({"iteration": iteration, "args": settings}) + "\n")
    else:
        write_text(out / "args.json", json.dumps(settings, indent=1))
    for log in (out / "metrics.jsonl", out / "probes.jsonl"):
        if log.exists():
            keep = [json.dumps(r) for r in records(log) if r["iteration"] <= iteration]
            write_text(log, "".join(line + "\n" for line in keep))


def records(log: Path) -> list:
    """The whole records of a .jsonl log (a line cut short by a kill, or not a record, is left out)."""
    recs = []
    for line in log.read_text().splitlines() if log.is_file() else []:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("iteration"), int):
            recs.append(rec)
    return recs


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
    return [r for r in records(Path(out) / "probes.jsonl") if r["iteration"] <= upto]


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
    """'' when the checkpoint folder is whole, else what is wrong. Every file a resume reads is verified: the
    folder is not a .tmp (interrupted); state.json is a record of this iteration; the DCP metadata reads; every
    data file is as long as the metadata says; every rank's RNG state loads and holds every generator."""
    if ckpt.name.endswith(".tmp"):
        return "unfinished (.tmp)"
    if not (ckpt / "state.json").is_file():
        return "no state.json"
    state = read_json(ckpt / "state.json")
    if not isinstance(state, dict) or not all(isinstance(state.get(k), int) for k in ("iteration", "world_size")) \
            or f"ckpt_{state['iteration']:06d}" != ckpt.name:
        return "state.json is damaged"
    if why := shards_problem(ckpt):
        return why
    for r in range(state["world_size"]):
        if why := rng_problem(ckpt / f"rng_{r}.pt"):
            return why
    return ""


def shards_problem(ckpt: Path) -> str:
    """'' when the DCP part of the checkpoint folder `ckpt` reads (its .metadata, and every data file as long as the
    metadata says), else what is wrong, naming the file: all evaluate.py reads; a resume also needs problems()'s."""
    from torch.distributed.checkpoint import FileSystemReader
    try:
        meta = FileSystemReader(str(ckpt)).read_metadata()
    except Exception as e:  # noqa: BLE001 - an unreadable pickle can raise almost anything
        return f".metadata is unreadable ({type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:100]})"
    need = {}
    for info in (getattr(meta, "storage_data", None) or {}).values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    if not need:
        return ".metadata names no data files"
    for name, size in sorted(need.items()):
        have = (ckpt / name).stat().st_size if (ckpt / name).is_file() else -1
        if have < size:
            return f"{name} is {'missing' if have < 0 else f'truncated ({have} of {size} bytes)'}"
    return ""


RNG_KEYS = ("torch", "numpy", "python", "cuda")


def rng_problem(path: Path) -> str:
    """'' when `path` holds a rank's generator states (launch/checkpoints.py writes them), else what is wrong."""
    import torch
    if not path.is_file():
        return f"{path.name} is missing"
    try:
        rng = torch.load(path, weights_only=False, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - a damaged pickle can raise almost anything
        return f"{path.name} is damaged ({type(e).__name__})"
    missing = [k for k in RNG_KEYS if not isinstance(rng, dict) or k not in rng]
    return f"{path.name} is damaged (no {', '.join(missing)} state)" if missing else ""


def prune(out: Path, keep: int):
    """Delete all but the newest `keep` whole checkpoints, and every broken one."""
    found = scan(out)
    whole = [p for p, why in found.items() if not why]
    for path, why in found.items():
        if why or path not in whole[-keep:]:
            shutil.rmtree(path, ignore_errors=True)


LEFTOVERS = ("final.tmp", "final.old", "best.tmp", "best.old")  # policy/export_folder.py's unfinished exports


def tidy(out: Path) -> list:
    """Rank 0, holding the lock, before a run starts in `out`: remove what an interrupted run left that is not whole -
    unfinished or damaged checkpoints, unfinished exports (final.tmp, best.tmp), atomic writes' hidden temporary
    files - so that nothing is reused as if whole and nothing is in the way of the new writes. Returns one line per
    thing removed (printed once)."""
    said = []
    for path, why in scan(out).items():
        if why:
            said.append(f"{path.name}: {why}: removed (a resume continues from the newest whole checkpoint)")
            shutil.rmtree(path, ignore_errors=True)
    for path in [out / n for n in LEFTOVERS] + [p for p in out.rglob(".*.tmp*") if p.is_file()]:
        if path.is_dir():
            said.append(f"{path.name}: an export cut short: removed")
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists():
            path.unlink(missing_ok=True)
    return said

"""The process group, and every collective train.py and evaluate.py issue themselves, in one place.

Why one place: NCCL takes CUDA tensors only. A CPU tensor in an all_reduce under NCCL raises
`No backend type associated with device type cpu`, and on FLUX.1-dev that happens after the first
iteration's minutes of 8 GPUs; gloo takes CPU tensors, so a CPU run never shows it. Every function
here therefore moves its tensors to `backend_device()` (the device the group's backend is registered
for) and hands back Python values, or tensors on the caller's device: a caller cannot pass the wrong
device. Object collectives (pickled) carry CPU tensors only: a pickled CUDA tensor would unpickle onto
the sender's GPU index on the receiver. tests/test_collectives.py holds every caller to this module
(no `dist.<collective>` elsewhere) and runs each function under a CUDA-only group.

Without a process group (a plain `python evaluate.py`) every function is the world-of-one answer.

    init()              torchrun's RANK/LOCAL_RANK/WORLD_SIZE -> (rank, world, device); the backend
                        (NCCL on CUDA, gloo on the CPU), `device_id` bound at init (NCCL then knows
                        each rank's GPU for barriers), and a timeout long enough for rank-0-only work
    all_true(flag)      every rank's flag is True (a skipped update must be skipped everywhere)
    mean_over_ranks(d)  {name: tensor} -> the same-shaped means, in ONE all_reduce
    all_gather_objects  [obj of rank 0, ..., obj of rank W-1] on every rank
    gather_objects      the same on rank 0 only (None elsewhere)
    barrier()
    stop_if_any(error)  every rank stops together when any rank has an error; rank 0 says the first one
    peers_stop_quietly  a rank whose collective fails because another rank has stopped exits without a
                        traceback (the rank that stopped said why)
    run_then_exit(main) a script's entry point: once a group was started, the process ends without Python's
                        interpreter shutdown, which gloo's worker threads can abort (see its docstring)
"""
import atexit
import contextlib
import datetime
import os
import sys

import torch
import torch.distributed as dist
from torch.utils._pytree import tree_map

# The collective timeout (NCCL's watchdog) must outlast the longest step one rank does while the others wait
# in a collective: rank 0 alone writes the exported model (FLUX.1-dev in fp32: 47.6 GB, ~4 min at 200 MB/s on a
# shared file system, `final/` and every new `best/`), probe grids, and clears an --overwrite'n run folder.
# PyTorch's default for NCCL is 10 minutes; 60 leaves room for a slow disk and still ends a hung job.
DEFAULT_TIMEOUT_MIN = 60.0


def init(device_pref: str = "", timeout_min: float = DEFAULT_TIMEOUT_MIN, who: str = "train.py",
         group_of_one: bool = True):
    """Start the process group from torchrun's environment. A plain `python` run is a world of one, with a
    group of one when `group_of_one` (FSDP2 and DCP need one) and none otherwise. Returns (rank, world,
    device). Under torchrun a rank stops (SIGTERM) when its launcher dies, instead of running on as an orphan.
    Stops with one line when the ranks cannot each have their own GPU (NCCL refuses two ranks on one)."""
    if "RANK" in os.environ and sys.platform == "linux":
        import ctypes
        import signal
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: signal us when the parent exits
        if os.getppid() == 1:  # the launcher died before we asked
            raise SystemExit(f"{who}: the launcher (torchrun) is gone")
    rank, local, world = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
    use_cuda = (device_pref or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    if use_cuda:
        n = torch.cuda.device_count()
        if local >= n:  # NCCL: "Duplicate GPU detected"
            raise SystemExit(f"{who}: local rank {local} needs GPU {local}, but {n} {'is' if n == 1 else 'are'} "
                             f"visible: start one process per GPU (--nproc_per_node {n}), or run on --device cpu")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:  # small CPU matmuls: one thread per process beats oversubscribed spinning
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    if world > 1 or group_of_one:
        # a world of one without torchrun: an in-process store, so no port is taken (two such runs never collide)
        alone = {} if "RANK" in os.environ else dict(store=dist.HashStore(), rank=0, world_size=1)
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=timeout_min),
                                device_id=device if use_cuda else None, **alone)
        global _group_started
        _group_started = True
    return rank, world, device


_group_started = False  # init() started a process group in this process: run_then_exit ends it with os._exit


def backend_device() -> torch.device:
    """Where this process's collectives run: the CPU when the group's backend takes CPU tensors (gloo), else
    this rank's GPU (NCCL, or any group registered for CUDA only). Read from the group, not assumed."""
    if "cpu" in {part.split(":")[0] for part in dist.get_backend_config().split(",")}:
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def all_true(flag: bool) -> bool:
    """True on every rank iff `flag` is True on every rank."""
    if world_size() == 1:
        return bool(flag)
    t = torch.tensor([0.0 if flag else 1.0], device=backend_device())
    dist.all_reduce(t)
    return t.item() == 0


def mean_over_ranks(parts: dict) -> dict:
    """{name: tensor (any device)} -> {name: the same-shaped mean over ranks, float32 on the CPU}, in ONE
    all_reduce on the backend's device."""
    flat = torch.cat([t.detach().flatten().float().to(backend_device() if world_size() > 1 else "cpu")
                      for t in parts.values()])
    if world_size() > 1:
        dist.all_reduce(flat)
        flat /= world_size()
    flat = flat.cpu()
    return {k: v.view(t.shape) for (k, t), v in zip(parts.items(), flat.split([t.numel() for t in parts.values()]))}


def _on_cpu(obj):
    return tree_map(lambda x: x.detach().cpu() if isinstance(x, torch.Tensor) else x, obj)


def all_gather_objects(obj) -> list:
    """[obj of rank 0, ..., obj of rank W-1] on every rank (tensors inside come back on the CPU)."""
    if world_size() == 1:
        return [_on_cpu(obj)]
    out = [None] * world_size()
    dist.all_gather_object(out, _on_cpu(obj))
    return out


def gather_objects(obj) -> list:
    """[obj of rank 0, ..., obj of rank W-1] on rank 0, None on the others (tensors inside on the CPU)."""
    if world_size() == 1:
        return [_on_cpu(obj)]
    out = [None] * world_size() if dist.get_rank() == 0 else None
    dist.gather_object(_on_cpu(obj), out, dst=0)
    return out


def barrier():
    if world_size() > 1:
        dist.barrier()


def stop_if_any(error, who: str):
    """Every rank calls this at the same point with its own error (a one-line str) or None. If any rank has one,
    every rank ends with exit status 1, and rank 0 prints the first (a rank alone never stops first: the others
    would be left waiting in their next collective, or print a traceback when it goes). Under torchrun rank 0
    prints before any rank exits: torchrun ends the other ranks as soon as one has exited."""
    errors = [e for e in all_gather_objects(error) if e]
    if not errors:
        return
    if world_size() == 1:
        raise SystemExit(f"{who}: {errors[0]}")
    if dist.get_rank() == 0:
        print(f"{who}: {errors[0]}", file=sys.stderr, flush=True)
    dist.barrier()
    dist.destroy_process_group()
    raise SystemExit(1)


# what gloo and the TCP store raise in a rank whose peer is gone (NCCL's ranks wait for torchrun's SIGTERM instead)
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Socket Timeout",
             "failed to recv", "Failed to recv")


@contextlib.contextmanager
def peers_stop_quietly(who: str):
    """Around a rank's whole run: when another rank stops (a clear error of its own, or a crash), this rank's next
    collective fails; it then exits with status 1 and no traceback: the rank that stopped has said why (and torchrun's
    summary names it). Rank 0 adds one line so that its log is not silent. Any other error goes on as it is."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - re-raised unless it is a peer's absence
        if not any(p in str(e) for p in PEER_GONE):
            raise
        rank = int(os.environ.get("RANK", "0"))
        raise SystemExit(f"{who}: rank 0 stops: another rank has stopped (its message, or torchrun's summary, says "
                         "why)" if rank == 0 else 1) from None


def run_then_exit(main, *args):
    """A script's entry point (`if __name__ == "__main__": run_then_exit(main)`). When `main` started a process
    group, the process ends with os._exit once main has returned or raised, after the atexit handlers (the run
    folder's lock, logging) have run and stdout/stderr are flushed: Python's interpreter shutdown is skipped.

    Why: gloo's worker threads (pt_gloo_runloop) outlive destroy_process_group (FSDP2 keeps the group referenced),
    and a worker lets go of a collective's tensors a moment after the collective has returned. Letting go of a tensor
    that Python also holds takes the GIL: the worker checks that Python is running, then waits for the GIL. If
    Python's shutdown begins in between, the worker is ended from inside a C++ destructor and the process aborts
    ("terminate called without an active exception", SIGABRT) after a run that succeeded: 2 of 90 two-rank
    train.py runs on a loaded 2-core host, and once in CI. tests/test_collectives.py stages it for certain, and
    shows this exit without it. The same exit is used under NCCL (not yet run on a GPU).

    The exit status is Python's: 0 on return, SystemExit's code (a message is printed to stderr, status 1), 1
    after an uncaught exception (its traceback printed by sys.excepthook: torch's adds "[rankN]:"), and Ctrl-C ends
    the process by SIGINT as Python does. C stdio buffers are flushed too (NCCL_DEBUG's log). What os._exit skips
    beyond that: joining non-daemon threads (train.py and evaluate.py have none left at their end) and closing files
    left open (they write with `with`). Without a group (a bad flag, a plain `python evaluate.py`) main runs and
    Python exits as it always does."""
    interrupted = False
    try:
        main(*args)
        code = 0
    except SystemExit as e:
        if not _group_started:
            raise
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except BaseException as e:  # noqa: BLE001 - reported as Python would, then the same exit
        if not _group_started:
            raise
        sys.excepthook(type(e), e, e.__traceback__)
        code, interrupted = 1, isinstance(e, KeyboardInterrupt)
    atexit._run_exitfuncs()  # what Python's shutdown would have run (CPython's own hook for this)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    try:
        import ctypes
        ctypes.CDLL(None).fflush(None)  # C-level stdio buffers (libraries' logs), which exit() would flush
    except (OSError, AttributeError):
        pass
    if interrupted:
        import signal
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(code & 0xFF)

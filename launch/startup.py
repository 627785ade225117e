"""Everything train.py does before any work, in order: the arguments (launch/arguments.py), the process group
(launch/collectives.py), whether the run fits the GPU (launch/preflight.py), one --out for every rank
(launch/shared_folder.py), and rank 0's lock on it with what an interrupted run left there removed
(launch/run_folder.py). A problem stops every rank, rank 0 saying why in one line.
"""
import sys
from pathlib import Path

from launch import collectives, run_folder
from launch.arguments import check_all
from launch.collectives import stop_if_any
from launch.preflight import will_it_fit
from launch.shared_folder import check_shared
from report.files import why_not_written


def quiet():
    """Silence what is known to be harmless, so that the progress bar and real warnings stay visible."""
    import warnings
    import diffusers
    import transformers
    diffusers.utils.logging.disable_progress_bar()  # weight-loading bars
    transformers.utils.logging.disable_progress_bar()
    # FSDP2 warns that the transformer returns a view; an in-place op on it would skip a hook, but
    # every family's Policy.forward only ever copies it (.float()) before anything else touches it
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")


def start(a, is_main: bool):
    """Before any work: the arguments, the process group, whether the run fits the GPU, one --out for every rank
    (two nodes: a shared one), and rank 0's lock on it. Returns (rank, world, device, the lock or None)."""
    check_all(a, is_main)
    quiet()
    rank, world, device = collectives.init(a.device, a.collective_timeout)
    if a.preflight:
        will_it_fit(a, world, device, is_main)  # before any weight is read
    check_shared(Path(a.out), rank)
    lock, error = None, None
    if is_main:  # rank 0 alone takes the lock; every rank stops with its answer
        try:
            lock = run_folder.take_lock(Path(a.out), overwrite=a.overwrite)
            for line in run_folder.tidy(Path(a.out)):  # what an interrupted run left that is not whole
                print(f"train.py: {line}", file=sys.stderr, flush=True)
        except SystemExit as e:
            error = str(e.code).removeprefix("train.py: ")
        except OSError as e:
            error = f"--out: {why_not_written(e, a.out)}"
    stop_if_any(error, "train.py")
    return rank, world, device, lock

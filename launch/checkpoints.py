"""Sharded checkpoints of a training run (torch.distributed.checkpoint, DCP), with every rank's random state.

    ckpt_NNNNNN/      .metadata and *.distcp   the trained parameters and their AdamW state, one file per rank
                      rng_<rank>.pt            torch, numpy, python (and CUDA) generator states of that rank
                      state.json               iteration, prompt-sampler position, world size, the run's settings

A checkpoint is written as ckpt_NNNNNN.tmp and renamed by rank 0 only when every rank's files are written: a folder
named ckpt_NNNNNN is whole, and report/run_folder.problems verifies every file a resume reads before it is trusted.
A write that fails (a full disk, a read-only mount) stops every rank together with one line naming the cause; the
unfinished folder is removed and the previous whole checkpoint stays the one to --resume from.
"""
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

from launch.collectives import all_gather_objects, barrier, stop_if_any
from launch import run_folder
from report.files import why_not_written


def trained_only(strict=True):
    """Checkpoints hold the trained parameters and their optimizer state: all of them in full fine-tuning,
    the adapters under LoRA (the frozen base is the model folder's, so loading does not ask for it; a
    trained parameter missing from the checkpoint still stops dcp.load)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(ignore_frozen_params=True, strict=strict)


class ReproducibleWriter(FileSystemWriter):
    """DCP's file writer without the StorageMeta it pickles into .metadata: the folder's path as passed and a random
    save id (uuid4), which nothing reads back. The same run then writes the same bytes (tests/test_faults.py)."""

    def storage_meta(self):
        return None


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def save(out: Path, it: int, model, optim, sampler_state, rank: int, settings: dict, who: str = "train.py"):
    """The checkpoint after `it` iterations. Every rank writes its shard and RNG state into ckpt_NNNNNN.tmp; when all
    have, rank 0 writes state.json and renames the folder. On any rank's failure every rank stops (SystemExit)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    final, tmp = out / f"ckpt_{it:06d}", out / f"ckpt_{it:06d}.tmp"
    if rank == 0:  # a leftover of a save that was killed, or a damaged folder of the same iteration
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    error = None
    try:
        msd, osd = get_state_dict(model, optim, options=trained_only())
        dcp.save({"model": msd, "optim": osd}, storage_writer=ReproducibleWriter(str(tmp)))
        torch.save(rng_state(), tmp / f"rng_{rank}.pt")
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - said in one line below, on every rank
        error = why_not_written(e, tmp)
    errors = [e for e in all_gather_objects(error) if e]
    if rank == 0 and not errors:
        try:
            defining = {k: settings[k] for k in run_folder.DEFINING if k in settings}  # not --resume, --out, ...
            (tmp / "state.json").write_text(json.dumps({"iteration": it, "sampler": sampler_state, "world_size":
                                                        settings["world_size"], "settings": defining}, indent=1))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)  # atomic: a folder named ckpt_* is always whole
        except OSError as e:
            errors = [why_not_written(e, tmp)]
    if rank == 0 and errors:
        shutil.rmtree(tmp, ignore_errors=True)
        whole = [p.name for p, why in run_folder.scan(out).items() if not why]
        errors = [f"checkpoint {final.name} not written: {errors[0]}; " + (
            f"the newest whole checkpoint is {whole[-1]}: make room, then --resume" if whole else
            "no whole checkpoint yet: make room, then start again")]
    stop_if_any(errors[0] if rank == 0 and errors else None, who)


def load(out: Path, model, optim, rank: int):
    """(iteration, sampler position) of the newest whole checkpoint in `out`, loaded into `model`, `optim` and this
    rank's generators; (0, None) if there is none. Damaged ones were removed before (report/run_folder.tidy)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    whole = [p for p, why in run_folder.scan(out).items() if not why]
    if not whole:
        return 0, None
    msd, osd = get_state_dict(model, optim, options=trained_only())
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(whole[-1]))
    set_state_dict(model, optim, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=trained_only(strict=False))
    rng = torch.load(whole[-1] / f"rng_{rank}.pt", weights_only=False)
    torch.set_rng_state(rng["torch"]), np.random.set_state(rng["numpy"]), random.setstate(rng["python"])
    if rng["cuda"] is not None:
        torch.cuda.set_rng_state_all(rng["cuda"])
    meta = json.loads((whole[-1] / "state.json").read_text())
    return meta["iteration"], meta["sampler"]

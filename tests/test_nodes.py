"""Two nodes on real file systems: one --out for every rank, temporary names unique across hosts, a lock where the
file system has no flock, one writer per prompt-cache file."""
import errno
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from data.prompts import encoding_share
from launch import run_folder
from report.files import atomic_write
from test_train import TINY
from conftest import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def test_two_nodes_with_their_own_out_are_stopped_before_any_work(tiny_model, tmp_path):
    """Two torchrun 'nodes' (one process each) whose relative --out resolves to a folder of their own, as on
    node-local disks: both stop in one line, before the model is loaded or anything is written."""
    port = str(free_port())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "G2RPO_SHARED_CHECK_SECONDS": "2"}
    procs = []
    for node in (0, 1):
        (tmp_path / f"node{node}").mkdir()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", port, str(ROOT / "train.py"),
               "--model", str(tiny_model[0]), "--prompts", str(tiny_model[1]), "--out", "run", *TINY,
               "--iterations", "1"]
        procs.append(subprocess.Popen(cmd, cwd=tmp_path / f"node{node}", env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    results = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode != 0 for p in procs)
    err = results[0][1]
    assert f"--out run is not one folder for every rank: ranks 1 (host {socket.gethostname()})" in err, err[-3000:]
    assert "Traceback" not in err.split("is not one folder")[0][-300:]
    for node in (0, 1):  # nothing of a run was started in either folder
        assert sorted(p.name for p in (tmp_path / f"node{node}" / "run").glob("*") if p.name != ".lock") == []


def test_a_file_system_without_flock_gets_an_owner_file(tmp_path, monkeypatch):
    def no_flock(*a):
        raise OSError(errno.ENOSYS, "Function not implemented")
    monkeypatch.setattr(run_folder.fcntl, "flock", no_flock)
    out = tmp_path / "run"
    held = run_folder.take_lock(out)
    owner = out / ".lock.owner"
    assert owner.read_text() == f"host {socket.gethostname()} pid {os.getpid()}"
    with pytest.raises(SystemExit, match=r"in use by another run .*no flock: Function not implemented.*delete"):
        run_folder.take_lock(out)  # this process holds it: alive
    held.release()
    assert not owner.exists()
    owner.write_text(f"host {socket.gethostname()} pid {_dead_pid()}")  # a killed run of this host: taken over
    run_folder.take_lock(out).release()
    owner.write_text("host another-node pid 7")  # another host's cannot be checked from here: named, not taken
    with pytest.raises(SystemExit, match="another-node"):
        run_folder.take_lock(out)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_temporary_names_do_not_collide_across_hosts(tmp_path, monkeypatch):
    """Two writers of one file with the same pid (two containers on two hosts): neither loses its write. The
    inner write happens while the outer one's temporary file exists."""
    monkeypatch.setattr(os, "getpid", lambda: 1)
    target, done = tmp_path / "f.txt", threading.Event()

    def outer(tmp):
        tmp.write_text("outer")
        atomic_write(target, lambda t: t.write_text("inner"))  # the other host, mid-write
        done.set()
    atomic_write(target, outer)
    assert done.is_set() and target.read_text() == "outer" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]


@given(st.lists(st.lists(st.sampled_from("abcdefgh"), max_size=6), min_size=1, max_size=5))
def test_every_needed_prompt_has_exactly_one_writer(needs):
    shares = [encoding_share(needs, r) for r in range(len(needs))]
    written = [p for share in shares for p in share]
    assert sorted(written) == sorted(set(p for need in needs for p in need))  # each once, none missing
    assert all(not share for share, need in zip(shares, needs) if not need)  # only ranks that need prompts load

"""Faults a user meets end in one clear line and lose nothing (README, "Reliability"): damaged or unfinished files in a
run folder never block a rerun, settings that contradict the disk and flags a library would refuse are stopped before
any work, the file system's errors are named, one rank's clear error leaves the others quiet, and the same run writes
the same bytes. Real train.py runs (one process; torchrun where ranks matter) on the tiny toy model."""
import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import train
from launch import arguments, collectives
from launch import run_folder
from report import files
from conftest import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--reward", "toy-adherence", "--G", "3", "--T", "4", "--Lambda", "1", "2", "--sde-steps", "0", "1",
        "--lr", "1e-3", "--clip-range", "0.05", "--mixed-precision", "fp32", "--device", "cpu", "--num-samples", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def argv(model, out, *extra):
    return ["--model", str(model[0]), "--prompts", str(model[1]), "--out", str(out), *TINY, *extra]


def train_py(model, out, *extra, nproc=0, wrap=(), wait=True):
    """train.py in a subprocess (one process, or torchrun with nproc ranks); `wrap` prefixes the command.
    wait=False: the Popen, for done()."""
    cmd = [sys.executable, str(ROOT / "train.py")] if not nproc else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
        str(free_port()), str(ROOT / "train.py")]
    proc = subprocess.Popen([*wrap, *cmd, *argv(model, out, *extra)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    return done(proc) if wait else proc


def done(proc) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def ok(r):
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def sha256s(folder: Path, pattern="**/*") -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.glob(pattern)) if p.is_file() and not p.is_symlink()}


def one_line(r) -> str:
    """The run stopped with exit 1 and said why in one line of its own, with no traceback through our code (torchrun
    adds its own summary, a traceback of the launcher)."""
    assert r.returncode != 0 and f'File "{ROOT}' not in r.stderr and "[rank" not in r.stderr, r.stderr[-4000:]
    lines = [line for line in r.stderr.splitlines() if line.startswith("train.py: ")]
    assert len(lines) == 1, r.stderr[-4000:]
    return lines[0]


@pytest.fixture(scope="module")
def straight(tiny_model, tmp_path_factory):
    """A 6-iteration run with checkpoints at 2, 4 and 6 (all kept), and the same run again in another folder, at the
    same time: the reference a resumed run must equal, and the bytes a second run must repeat."""
    tmp = tmp_path_factory.mktemp("faults")
    runs = [train_py(tiny_model, tmp / name, "--iterations", "6", "--checkpoint-every", "2", "--keep-checkpoints", "3",
                     wait=False) for name in ("straight", "again")]  # a world of one takes no port: side by side
    for r in runs:
        ok(done(r))
    return tmp / "straight", {d: sha256s(tmp / "again" / d) for d in ("final", "ckpt_000002", "ckpt_000006",
                                                                       "prompt_cache")}


def test_the_same_run_writes_the_same_bytes(straight):
    out, again = straight
    for d, sums in again.items():
        assert sums and sha256s(out / d) == sums, d  # the export, the checkpoints (shards, metadata, RNG, state),
        # the prompt cache


def damaged_copy(straight, tmp_path, damage) -> Path:
    """The straight run as it stood after iteration 4 (checkpoints 2 and 4), with ckpt_000004 damaged."""
    src, run = straight[0], tmp_path / "run"
    shutil.copytree(src, run, symlinks=True, ignore=shutil.ignore_patterns("ckpt_000006", "final", "samples_000006.png"))
    ckpt = run / "ckpt_000004"
    if damage == "shard":
        shard = next(ckpt.glob("*.distcp"))
        shard.write_bytes(shard.read_bytes()[:100])
    elif damage == "rng":  # a kill while torch.save wrote it: undetected before it was loaded, once
        (ckpt / "rng_0.pt").write_bytes((ckpt / "rng_0.pt").read_bytes()[:50])
    # and what a killed run leaves besides: an unfinished next checkpoint and export, a hidden temporary file
    (run / "ckpt_000006.tmp").mkdir()
    (run / "ckpt_000006.tmp" / "__0_0.distcp").write_bytes(b"x" * 10)
    (run / "final.tmp" / "transformer").mkdir(parents=True)
    (run / "final.tmp" / "transformer" / "extra.safetensors").write_bytes(b"x")
    (run / ".reward_curve.tmp0123.png").write_bytes(b"x")
    with open(run / "metrics.jsonl", "a") as log:  # a line cut short by the kill
        log.write('{"iteration": 7, "anchor_rew')
    return run


DAMAGES = ["shard", "rng"]  # a damaged state.json: test_problems_verify_every_file_a_resume_reads


@pytest.fixture(scope="module")
def damaged_resumes(tiny_model, straight, tmp_path_factory):
    """Each damage of DAMAGES in its own copy, resumed (side by side)."""
    runs = {d: damaged_copy(straight, tmp_path_factory.mktemp(d), d) for d in DAMAGES}
    resume = ["--iterations", "6", "--checkpoint-every", "2", "--keep-checkpoints", "3", "--resume"]
    first = {d: train_py(tiny_model, run, *resume, wait=False) for d, run in runs.items()}
    return {d: (run, ok(done(first[d]))) for d, run in runs.items()}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_newest_checkpoint_never_blocks_a_resume(damaged_resumes, straight, damage):
    run, r = damaged_resumes[damage]
    said = [line for line in r.stderr.splitlines() if line.startswith("train.py: ckpt_000004")]
    assert len(said) == 1 and "removed" in said[0], r.stderr[-3000:]
    assert not list(run.glob("*.tmp")) and not list(run.glob(".*.tmp*"))
    assert [json.loads(line)["iteration"] for line in (run / "metrics.jsonl").read_text().splitlines()] == list(range(1, 7))
    assert sha256s(run / "final") == straight[1]["final"]  # resumed from ckpt_000002: equal to the straight run
    assert not (run / "final" / "transformer" / "extra.safetensors").exists()
    assert run_folder.tidy(run) == []  # the next start finds nothing to remove


def test_problems_verify_every_file_a_resume_reads(straight, tmp_path):
    import torch
    ckpt = tmp_path / "ckpt_000004"
    shutil.copytree(straight[0] / "ckpt_000002", tmp_path / "ckpt_000002")
    assert run_folder.problems(tmp_path / "ckpt_000002") == ""
    damages = {"rng-keys": ("rng_0.pt is damaged (no numpy", lambda: torch.save({"torch": torch.get_rng_state()},
                                                                                 ckpt / "rng_0.pt")),
               "rng-cut": ("rng_0.pt is damaged", lambda: (ckpt / "rng_0.pt").write_bytes(b"PK\x03\x04")),
               "state-cut": ("state.json is damaged", lambda: (ckpt / "state.json").write_text('{"iteration": 4, "sa')),
               "metadata": (".metadata is unreadable", lambda: (ckpt / ".metadata").write_bytes(b"\x80\x04garbage"))}
    for damage, (why, do) in damages.items():
        shutil.rmtree(ckpt, ignore_errors=True)
        shutil.copytree(tmp_path / "ckpt_000002", ckpt)
        assert "state.json is damaged" in run_folder.problems(ckpt)  # ckpt_000002's record in the folder of iteration 4
        state = json.loads((ckpt / "state.json").read_text())
        (ckpt / "state.json").write_text(json.dumps({**state, "iteration": 4}))
        assert run_folder.problems(ckpt) == ""
        do()
        assert why in run_folder.problems(ckpt), damage


def test_settings_that_contradict_the_disk_are_refused_before_any_work(tiny_model, straight, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(straight[0], out, symlinks=True)
    before = sha256s(out)

    def refused(*extra, model=tiny_model):
        with pytest.raises(SystemExit) as e:
            arguments.check_all(train.parse_args(argv(model, out, "--resume", "--checkpoint-every", "2", *extra)), True)
        return str(e.value.code)
    assert "--iterations 4: the run in" in refused("--iterations", "4") and "has done 6" in refused("--iterations", "4")
    assert "sde_steps_per_iteration 0 -> 1" in refused("--iterations", "8", "--sde-steps-per-iteration", "1")
    prompts = tmp_path / "prompts.txt"  # the same path, other prompts: another run
    prompts.write_text(tiny_model[1].read_text().replace("red", "blue"))
    assert "prompts_digest" in refused("--iterations", "8", model=(tiny_model[0], prompts))
    (out / "args.json").write_text('{"G": 3, "T"')  # damaged: the checkpoint's own record of the settings decides
    assert "G 3 -> 4" in refused("--iterations", "8", "--G", "4")
    assert sha256s(out) == {**before, "args.json": sha256s(out)["args.json"]}  # nothing written


@pytest.mark.parametrize("extra,says", [
    (["--height", "17"], "--height 17: must be a multiple of 2"),
    (["--lora-rank", "4", "--lora-targets", "attn.to_qq"], "--lora-targets attn.to_qq: no linear layer"),
    (["--device", "tpu"], "--device tpu"),
    (["--out", "MODEL/run"], "is inside --model"),
])
def test_flags_a_library_would_refuse_stop_before_any_work(tiny_model, tmp_path, extra, says):
    out = tmp_path / "run"
    extra = [str(tiny_model[0] / "run") if x == "MODEL/run" else x for x in extra]
    with pytest.raises(SystemExit, match=says):
        arguments.check_all(train.parse_args(argv(tiny_model, out, *extra)), True)
    assert not out.exists() and not (tiny_model[0] / "run").exists()  # nothing left behind


def test_a_run_folder_that_cannot_be_written_is_named(tiny_model, tmp_path):
    (tmp_path / "file").write_text("x")
    for out, says in ((tmp_path / "file", "is a file, not a folder"), (tmp_path / "file" / "run", "is a file")):
        with pytest.raises(SystemExit, match=says):
            arguments.check_all(train.parse_args(argv(tiny_model, out)), True)


def test_file_system_errors_are_said_in_one_line(tmp_path, monkeypatch):
    from torch.distributed.checkpoint.api import CheckpointException
    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "ckpt_000002.tmp" / "__0_0.distcp"))
    wrapped = CheckpointException("save failed", {1: (full, None)})
    assert files.why_not_written(wrapped, tmp_path).endswith("__0_0.distcp: the disk is full (No space left on device)")
    ro = OSError(errno.EROFS, "Read-only file system", "/x/args.json")
    assert files.why_not_written(ro, "/x") == "/x/args.json: the file system is read-only (Read-only file system)"
    cut = RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0")
    monkeypatch.setattr(files, "free_bytes", lambda p: 1 << 20)  # torch.save says no errno: the free space decides
    assert "the disk is full (1 MiB free" in files.why_not_written(cut, tmp_path)
    with pytest.raises(SystemExit, match="the disk is full"), files.file_errors_in_one_line("train.py", tmp_path):
        raise cut
    monkeypatch.setattr(files, "free_bytes", lambda p: 1 << 40)
    with pytest.raises(RuntimeError), files.file_errors_in_one_line("train.py", tmp_path):
        raise cut  # not the file system's: the traceback stays
    with pytest.raises(ConnectionResetError), files.file_errors_in_one_line("train.py", tmp_path):
        raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")  # a peer's socket, not a file


def mount_namespace():
    """A private mount namespace (tmpfs and read-only mounts without touching the machine's), or skip."""
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True)
    if probe.returncode:
        pytest.skip(f"no private mount namespace here (unshare: {probe.stderr.decode().strip()[:100]})")
    return ["unshare", "--user", "--map-root-user", "--mount", "--", "sh", "-c"]


def test_a_full_disk_stops_in_one_line_and_the_last_whole_checkpoint_resumes(tiny_model, straight, tmp_path):
    ns, disk, out = mount_namespace(), tmp_path / "disk", tmp_path / "disk" / "run"
    disk.mkdir()
    cmd = [sys.executable, str(ROOT / "train.py"), *argv(tiny_model, out, "--iterations", "6", "--checkpoint-every",
                                                         "2", "--keep-checkpoints", "3")]
    script = (f"mount -t tmpfs -o size=3m tmpfs {disk} && {' '.join(cmd)}; rc=$?; mkdir {tmp_path}/kept && "
              f"cp -a {out}/. {tmp_path}/kept/ && ls {out} > {tmp_path}/listing; exit $rc")
    r = subprocess.run([*ns, script], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    line = one_line(r)
    assert "checkpoint ckpt_0000" in line and "the disk is full" in line and "make room, then --resume" in line, line
    kept = tmp_path / "kept"  # the folder as the full disk left it, moved to a disk with room
    assert not list(kept.glob("*.tmp")) and [p.name for p, why in run_folder.scan(kept).items() if not why]
    ok(train_py(tiny_model, kept, "--iterations", "6", "--checkpoint-every", "2", "--keep-checkpoints", "3",
                "--resume"))
    assert sha256s(kept / "final") == straight[1]["final"]


def test_a_read_only_run_folder_is_named_before_any_work(tiny_model, tmp_path):
    ns, out = mount_namespace(), tmp_path / "ro"
    out.mkdir()
    cmd = [sys.executable, str(ROOT / "train.py"), *argv(tiny_model, out / "run", "--iterations", "1")]
    script = f"mount --bind -o ro {out} {out} && mount -o remount,bind,ro {out}; {' '.join(cmd)}"
    r = subprocess.run([*ns, script], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert "read-only file system" in one_line(r)


def test_a_rank_that_loses_its_peer_stops_quietly():
    import torch.distributed as dist
    assert not dist.is_initialized()
    with pytest.raises(SystemExit) as e, collectives.peers_stop_quietly("train.py"):
        raise RuntimeError("[gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:31157")
    assert "another rank has stopped" in str(e.value.code)
    with pytest.raises(ValueError), collectives.peers_stop_quietly("train.py"):
        raise ValueError("a bug of our own keeps its traceback")


def test_one_rank_stops_with_a_clear_line_and_the_other_quietly(tiny_model, tmp_path):
    import fcntl
    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".lock", "a+") as held:  # another run holds the folder: rank 0 finds out alone
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        r = train_py(tiny_model, out, "--iterations", "1", nproc=2)
    assert "is in use by another run" in one_line(r) and "[rank1]" not in r.stderr, r.stderr[-3000:]

"""No collective meets a tensor its backend does not take (launch/collectives.py).

Under NCCL every collective needs CUDA tensors; gloo takes CPU ones, so a CPU run never shows a CPU tensor in an
all_reduce, which stops every GPU run after its first iteration. Two tests together hold the whole class:
1. every collective that train.py, evaluate.py and what they import issue goes through launch/collectives.py
   (a source scan: a new `dist.all_reduce(...)` anywhere else fails it);
2. every tensor collective of launch/collectives.py, and the loop's own functions that feed them
   (train.sample_prompt -> launch.metrics.record, train.clip_and_step, launch.bookkeeping.write_samples), run under
   a process group registered for CUDA only, on fake CUDA tensors (no GPU needed), with the backend's device check
   NCCL makes (`No backend type associated with device type cpu`) reproduced at the dispatcher.
"""
import ast
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

ROOT = Path(__file__).resolve().parent.parent
COLLECTIVES = {"all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "reduce_scatter",
               "reduce_scatter_tensor", "broadcast", "broadcast_object_list", "gather", "gather_object", "scatter",
               "scatter_object_list", "reduce", "barrier", "monitored_barrier", "all_to_all", "all_to_all_single",
               "send", "recv", "isend", "irecv", "batch_isend_irecv", "all_reduce_coalesced"}


def shipped_files():
    """train.py, evaluate.py and every module of the folders they (and the benchmarks' drivers) import."""
    files = [ROOT / "train.py", ROOT / "evaluate.py"]
    for folder in ("launch", "guard", "report", "policy", "data", "rewards", "baselines", "toy"):
        files += sorted((ROOT / folder).glob("*.py"))
    return [f for f in files if f != ROOT / "launch" / "collectives.py"]


def direct_collectives(path: Path) -> list:
    """'file:line name' of each call of a torch.distributed collective outside launch/collectives.py."""
    tree, found = ast.parse(path.read_text()), []
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "torch.distributed":
            imported |= {a.asname or a.name for a in node.names if a.name in COLLECTIVES}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
        via_dist = isinstance(f, ast.Attribute) and ast.unparse(f.value) in ("dist", "torch.distributed")
        if name in COLLECTIVES and via_dist or isinstance(f, ast.Name) and name in imported:
            found.append(f"{path.name}:{node.lineno} {name}")
    return found


def test_every_collective_goes_through_launch_collectives():
    found = [hit for f in shipped_files() for hit in direct_collectives(f)]
    assert not found, ("collectives outside launch/collectives.py (whose functions put tensors on the device the "
                       f"backend takes): {found}")


def test_the_scan_sees_a_direct_collective(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import torch.distributed as dist\nfrom torch.distributed import barrier as b\n"
                   "def f(x):\n    dist.all_reduce(x.cpu())\n    b()\n")
    assert [h.split()[1] for h in direct_collectives(bad)] == ["all_reduce", "b"]


class BackendDevices(TorchDispatchMode):
    """The backend's device check at the dispatcher: a c10d op on a tensor of a device type the group has no
    backend for raises what ProcessGroup raises under NCCL. Fake tensors hold no values: .item() answers 1."""

    def __init__(self, accepted=("cuda",)):
        super().__init__()
        self.accepted, self.seen = accepted, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace in ("c10d", "_c10d_functional"):
            for t in tree_flatten((args, kwargs))[0]:
                if isinstance(t, torch.Tensor):
                    self.seen.append((func.name(), t.device.type))
                    if t.device.type not in self.accepted:
                        raise RuntimeError(f"No backend type associated with device type {t.device.type}")
        if func is torch.ops.aten._local_scalar_dense.default and isinstance(args[0], FakeTensor):
            return True if args[0].dtype == torch.bool else 1
        return func(*args, **kwargs)


@pytest.fixture()
def cuda_only_group(monkeypatch):
    """A 2-rank group whose backend is registered for CUDA tensors only (as NCCL), on fake CUDA tensors."""
    from torch.testing._internal.distributed.fake_pg import FakeStore
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)  # the GPU this rank would be bound to
    dist.init_process_group("cuda:fake", store=FakeStore(), rank=0, world_size=2)
    yield
    dist.destroy_process_group()


def test_a_cpu_tensor_fails_under_the_cuda_only_group(cuda_only_group):
    """The check itself: what train.mean_over_ranks did before launch/collectives.py (all_reduce on the CPU)."""
    with FakeTensorMode(allow_non_fake_inputs=True), BackendDevices():
        with pytest.raises(RuntimeError, match="No backend type associated with device type cpu"):
            dist.all_reduce(torch.ones(3))
        dist.all_reduce(torch.ones(3, device="cuda"))


def test_collectives_take_any_device_under_the_cuda_only_group(cuda_only_group):
    from launch import collectives
    check = BackendDevices()
    with FakeTensorMode(allow_non_fake_inputs=True), check:
        assert collectives.backend_device().type == "cuda"
        means = collectives.mean_over_ranks({"a": torch.ones(2, 3), "b": torch.zeros(1, device="cuda")})
        assert means["a"].shape == (2, 3) and means["a"].device.type == "cpu"  # results for .item() / logs
        collectives.all_true(True)  # its answer is a fake tensor's .item(): nothing to check but the device
    assert {op for op, _ in check.seen} >= {"c10d::allreduce_"} and {d for _, d in check.seen} == {"cuda"}


def test_objects_cross_on_the_cpu():
    from launch.collectives import _on_cpu
    obj = ([1, 2], torch.ones(2, requires_grad=True) * 2, {"x": torch.zeros(1)})
    moved = _on_cpu(obj)
    assert moved[0] == [1, 2] and all(t.device.type == "cpu" and not t.requires_grad
                                      for t in (moved[1], moved[2]["x"]))


def test_the_loop_under_a_cuda_only_group(cuda_only_group, tmp_path):
    """One iteration's collectives on the objects the loop makes: the rollout (train.sample_prompt, rewards that
    score on the CPU as the toy ones do), Eqs. 8/11, the step (train.clip_and_step -> all_true), the
    record (launch.metrics.record -> mean_over_ranks), the sample grid's finiteness (launch.bookkeeping.write_samples)."""
    import train
    from launch import metrics
    from launch.bookkeeping import write_samples
    from advantage import mixed_advantage
    from policy.flux import FluxPolicy
    from rewards import load_rewards
    from sde import sigma_grid
    from tiny_flux import save_tiny_flux, transformer as tiny_transformer
    save_tiny_flux(tmp_path / "flux", pixel_space=True)
    cpu = FluxPolicy.from_pretrained(tmp_path / "flux", dtype=torch.float32, height=16, width=16)
    cpu.encode_prompts(["a red circle on the left"])  # the in-memory prompt cache, copied to the fake policy
    a = replace(train.parse_args(["--model", str(tmp_path / "flux"), "--prompts", "x", "--G", "2", "--T", "2",
                                  "--Lambda", "1", "--sde-steps", "0", "--num-samples", "1"]), mixed_precision="fp32")
    rewards = load_rewards("toy-adherence", device="cpu")
    check = BackendDevices()
    with FakeTensorMode(allow_non_fake_inputs=True), check:
        with torch.device("cuda"):
            net = tiny_transformer(in_channels=12)
        policy = FluxPolicy(cpu.root, net, None, 16, 16, cpu.max_sequence_length, cpu.guidance, device="cuda",
                            dtype=torch.float32)
        policy._memory = cpu._memory
        plan = train.make_plan(a, sigma_grid(a.T, a.shift or 3.0).to("cuda"))
        gen = torch.Generator().manual_seed(0)
        s = train.sample_prompt(plan, policy, net, rewards, "a red circle on the left", 0, gen)
        As = [mixed_advantage(s.R, adv_clip=a.adv_clip)]
        optim = torch.optim.AdamW(net.parameters(), lr=a.lr)
        for p in net.parameters():  # the update's gradients (the autograd engine needs a real GPU for backward)
            p.grad = torch.ones_like(p)
        norm, _ = train.clip_and_step(net, optim, a.max_grad_norm)
        stats = {"loss": 0.0, "grad_norm": norm, "optimizer_steps": 1}
        costs = dict(gathered_rollout=0, gathered_train=0, sec_rollout=0.0, sec_train=0.0, peak_mem_gb=0.0)
        rec = metrics.record(0, [s], As, stats, plan.Lambda, rewards, True, costs)
        write_samples(policy, ["a red circle on the left"], (), a, tmp_path / "grid.png", False)
    assert "toy-adherence@1" in rec["reward_per_lambda"] and "grad_norm" in stats  # (fake values: no numbers)
    assert len(check.seen) >= 3 and {d for _, d in check.seen} == {"cuda"}


# Two gloo ranks (torchrun's environment, collectives.init). Rank 0's gloo worker finishes an all_reduce while Python's
# last exit handler holds the GIL (~1 s in C), so the worker, about to drop the all_reduce's tensor (which Python holds
# too), has checked that Python is running and waits for the GIL, which it gets only once Python has begun to shut
# down. That is the race that aborted a finished train.py on a loaded host (seen there in an FSDP all-gather's work),
# made certain.
LATE_WORK = """
import atexit
atexit.register(sum, range(10**8))  # registered first, so run last: ~1 s in C with the GIL held
import os, sys, time
import torch, torch.distributed as dist
sys.path.insert(0, {root!r})
from launch import collectives

def main():
    rank = collectives.init("cpu")[0]
    if rank == 1:  # joins rank 0's all_reduce late, then leaves at once
        time.sleep(0.5)
        dist.all_reduce(torch.ones(4))
        os._exit(0)
    global t
    t = torch.ones(4)
    dist.all_reduce(t, async_op=True)
    atexit.register(print, "exit handler ran")
    print("main returned", flush=True)

collectives.run_then_exit(main) if sys.argv[1] == "run_then_exit" else main()
"""


def test_exit_is_not_aborted_by_gloo_workers(tmp_path):
    """Python's own shutdown aborts (SIGABRT, "terminate called without an active exception") when a gloo worker
    takes the GIL during it to drop a tensor; collectives.run_then_exit, the way train.py and evaluate.py end (checked
    here too), exits 0 with its output flushed and its exit handlers run. What this cannot stage is a worker that
    starts waiting for the GIL after run_then_exit's last line: os._exit is what leaves that no shutdown to meet."""
    for script in ("train.py", "evaluate.py"):
        main_block = (ROOT / script).read_text().split('if __name__ == "__main__":')[1]
        assert main_block.strip().startswith("collectives.run_then_exit(main)"), f"{script} ends with Python's shutdown"
    import os
    import subprocess
    import sys
    from conftest import free_port
    script = tmp_path / "late_work.py"
    script.write_text(LATE_WORK.format(root=str(ROOT)))
    procs = {}
    for how in ("python", "run_then_exit"):
        env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # so that a lost flush shows
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   OMP_NUM_THREADS="1")
        procs[how] = [subprocess.Popen([sys.executable, str(script), how], env={**env, "RANK": str(r),
                                                                                 "LOCAL_RANK": str(r)},
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    out = {how: [p.communicate(timeout=120) + (p.returncode,) for p in ps] for how, ps in procs.items()}
    (py_out, py_err, py_rc), (_, _, peer_rc) = out["python"]
    assert peer_rc == 0 and py_out.startswith("main returned\n")
    assert py_rc == -6 and "terminate called without an active exception" in py_err, (
        f"Python's shutdown did not abort here (status {py_rc}): {py_err[-2000:]}")
    (ok_out, ok_err, ok_rc), (_, _, peer_rc) = out["run_then_exit"]
    assert peer_rc == 0 and ok_rc == 0 and ok_out == "main returned\nexit handler ran\n" and not ok_err, ok_err[-2000:]


ENDINGS = """
import sys
sys.path.insert(0, {root!r})
from launch import collectives

def main():
    collectives.init("cpu")  # a group of one (no torchrun): run_then_exit then ends with os._exit
    print("output before the end", end="")  # left in the buffer: the end must flush it
    how = sys.argv[1]
    if how == "message":
        raise SystemExit("train.py: a clear line")
    if how == "error":
        raise RuntimeError("boom")
    if how == "interrupt":
        raise KeyboardInterrupt
    raise SystemExit(int(how))

collectives.run_then_exit(main)
"""


def test_run_then_exit_ends_as_python_would(tmp_path):
    """Exit status, message and traceback as Python gives them: SystemExit's code (257 -> 1, as the OS truncates it)
    or message (status 1), an error's traceback through sys.excepthook (torch's, with its rank prefix) and status 1,
    Ctrl-C as death by SIGINT; buffered output flushed in every case."""
    import os
    import signal
    import subprocess
    import sys
    script = tmp_path / "endings.py"
    script.write_text(ENDINGS.format(root=str(ROOT)))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONUNBUFFERED", "RANK", "WORLD_SIZE")}
    cases = {"message": 1, "error": 1, "interrupt": -signal.SIGINT, "0": 0, "3": 3, "257": 1}
    procs = {how: subprocess.Popen([sys.executable, str(script), how], env={**env, "OMP_NUM_THREADS": "1"},
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for how in cases}
    for how, p in procs.items():
        out, err = p.communicate(timeout=120)
        assert (p.returncode, out) == (cases[how], "output before the end"), (how, p.returncode, out, err[-2000:])
        if how == "message":
            assert err == "train.py: a clear line\n"
        if how == "error":
            assert "Traceback (most recent call last)" in err and "[rank0]: RuntimeError: boom" in err, err

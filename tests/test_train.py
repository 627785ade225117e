"""train.py: real torchrun runs (2 gloo processes) of the real script on a tiny toy model."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from launch import arguments
from conftest import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--reward", "toy-adherence", "--G", "3", "--T", "4", "--Lambda", "1", "2", "--sde-steps", "0", "1",
        "--eta", "0.7", "--lr", "1e-3", "--clip-range", "0.05", "--mixed-precision", "fp32",
        "--device", "cpu", "--num-samples", "2"]


def launch(nproc, out, model, extra=(), check=True, wait=True):
    """train.py on the tiny model: one process, or torchrun with nproc ranks. wait=False: the Popen (finished())."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(free_port()), str(ROOT / "train.py")]
    else:
        cmd = [sys.executable, str(ROOT / "train.py")]
    cmd += ["--model", str(model[0]), "--prompts", str(model[1]), "--out", str(out), *TINY, *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return finished(proc, check) if wait else proc


def finished(proc, check=True) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=600)
    r = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    if check:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return r


def metrics(out):
    return [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def weights(out):
    from safetensors.torch import load_file
    return load_file(str(next((Path(out) / "final" / "transformer").glob("*.safetensors"))))


def resumed_copy(src: Path, dst: Path, at: int) -> Path:
    """The run folder `src` as it stood when killed right after checkpoint `at`: its later checkpoints and its export
    gone, its logs still running ahead (a --resume cuts them back)."""
    import shutil
    shutil.copytree(src, dst, symlinks=True, ignore=lambda d, names: [
        n for n in names if Path(d) == src and (n in ("final", "best") or n.startswith("ckpt_") and int(n[5:]) > at)])
    return dst


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    """The torchrun runs several tests read (launched once): 2 ranks x 4 iterations with a checkpoint after each and
    the guard probing every iteration; the same killed after checkpoint 2, then resumed; 2 ranks, one pass per update
    (--rescore-batch 0); one rank with both prompts."""
    tmp = tmp_path_factory.mktemp("train_runs")
    guard = ["--probe-every", "1", "--probe-prompts", str(tiny_model[1]), "--probe-seeds", "1"]
    straight, one_pass, one = tmp / "straight", tmp / "two-one-pass", tmp / "one"
    alone = launch(0, one, tiny_model, ["--iterations", "1", "--checkpoint-every", "0", "--prompts-per-rank", "2"],
                   wait=False)  # beside the torchrun runs (a world of one takes no port)
    r = launch(2, straight, tiny_model, ["--iterations", "4", "--checkpoint-every", "1", "--keep-checkpoints", "4",
                                         *guard])
    resumed = resumed_copy(straight, tmp / "resumed", at=2)
    launch(2, resumed, tiny_model, ["--iterations", "4", "--checkpoint-every", "1", "--keep-checkpoints", "2",
                                    "--resume", *guard])
    launch(2, one_pass, tiny_model, ["--iterations", "1", "--checkpoint-every", "0", "--rescore-batch", "0"])
    finished(alone)
    return {"straight": straight, "stdout": r.stdout, "stderr": r.stderr, "resumed": resumed, "one_pass": one_pass,
            "one": one}


def test_smoke_two_processes(runs, tiny_model):
    out = runs["straight"]
    assert "world size 2" in runs["stdout"] and "model evaluations per prompt" in runs["stdout"]
    m = metrics(out)
    assert [x["iteration"] for x in m] == [1, 2, 3, 4]
    for rec in m:
        for key in ("anchor_reward", "reward_per_lambda", "loss", "grad_norm", "clip_frac", "ratio_drift_mean",
                    "adv_abs_mean", "sec_rollout", "sec_train", "model_evaluations", "peak_mem_gb",
                    "gathered_bytes_rollout"):
            assert key in rec, key
        assert set(rec["reward_per_lambda"]) == {"toy-adherence@1", "toy-adherence@2"}
        assert rec["optimizer_steps"] == 1 and rec["gathered_bytes_rollout"] > 0
    assert m[0]["ratio_drift_max"] < 1e-4  # first update: the policy is the rollout policy
    ck = out / "ckpt_000002"
    assert (ck / "state.json").exists() and not list(out.glob("*.tmp"))
    from diffusers import FluxPipeline, FluxTransformer2DModel
    t = FluxTransformer2DModel.from_pretrained(out / "final" / "transformer")
    pipe = FluxPipeline.from_pretrained(out / "final", transformer=t, vae=None)  # the toy has no VAE
    assert pipe.transformer is t and (out / "samples_000000.png").exists() and (out / "samples_000004.png").exists()
    from policy.flux import FluxPolicy
    base, tuned = (FluxPolicy.from_pretrained(p, dtype=torch.float32) for p in (tiny_model[0], out / "final"))
    diff = [(x - y).abs().max().item() for x, y in zip(base.transformer.parameters(), tuned.transformer.parameters())]
    assert max(diff) > 0  # the export holds the trained weights, not the base ones


def checkpoint_weights(ckpt: Path, model_dir: Path) -> dict:
    """The transformer weights a train.py checkpoint holds, read as evaluate.py reads them."""
    import evaluate
    from launch import eval_models
    ref = eval_models.resolve_model(str(ckpt), str(model_dir))
    policy = evaluate.load_policy(ref, evaluate.Args(dtype="fp32", device="cpu"), torch.device("cpu"), torch.float32,
                                  None)
    return policy.transformer.state_dict()


def test_fsdp_two_processes_equal_one_process(runs, tiny_model):
    """Same two prompts: 2 ranks x 1 prompt under FSDP == 1 rank x 2 prompts; and training in one pass
    (--rescore-batch 0) == one forward/backward per k, with |M| = 2 times fewer bytes all-gathered (measured)."""
    a, b, c = runs["straight"], runs["one"], runs["one_pass"]
    per_k, one_pass = metrics(a)[0]["gathered_bytes_train"], metrics(c)[0]["gathered_bytes_train"]
    assert one_pass > 0 and per_k == 2 * one_pass
    wa, wb, wc = checkpoint_weights(a / "ckpt_000001", tiny_model[0]), weights(b), weights(c)
    base = weights_of_base(tiny_model[0])
    moved = max((wb[k] - base[k]).abs().max().item() for k in wb)
    assert moved > 1e-4  # the update did something
    for other in (wb, wc):
        diff = max((wa[k] - other[k]).abs().max().item() for k in other)
        assert diff < 1e-5 * max(1.0, moved * 100), (diff, moved)
    assert metrics(a)[0]["anchor_reward"] == pytest.approx(metrics(b)[0]["anchor_reward"], abs=1e-6)


def weights_of_base(model_dir):
    from safetensors.torch import load_file
    return load_file(str(next((Path(model_dir) / "transformer").glob("*.safetensors"))))


def test_resume_equals_straight_run(runs):
    """Killed after checkpoint 2 with its logs run ahead to 4, then resumed: the same probes (a resumed guard
    replays probes.jsonl), metrics and weights as the straight run."""
    a, b = runs["straight"], runs["resumed"]
    pa, pb = ([{k: v for k, v in json.loads(l).items() if k != "sec"} for l in (out / "probes.jsonl").open()]
              for out in (a, b))
    assert [p["iteration"] for p in pb] == [0, 1, 2, 3, 4] and pa == pb  # iterations 3-4's probes were cut back
    ma, mb = metrics(a), metrics(b)
    assert [x["iteration"] for x in mb] == [1, 2, 3, 4]
    assert [json.loads(l)["iteration"] for l in (b / "resumes.jsonl").read_text().splitlines()] == [2]
    assert sorted(p.name for p in b.glob("ckpt_*")) == ["ckpt_000003", "ckpt_000004"]  # --keep-checkpoints 2
    for x, y in zip(ma, mb):
        assert x["anchor_reward"] == pytest.approx(y["anchor_reward"], abs=1e-6)
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-6)
    wa, wb = weights(a), weights(b)
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-6


@pytest.mark.parametrize("argv,msg", [
    (["--G", "1"], "--G 1"), (["--Lambda"], "--Lambda"), (["--Lambda", "0", "1"], "--Lambda"),
    (["--Lambda", "1", "1"], "--Lambda"), (["--T", "8", "--sde-steps", "0", "8"], "--sde-steps"),
    (["--eta", "-0.1"], "--eta"), (["--model", "/no/such/flux", "--prompts", __file__], "not a diffusers model folder"),
    (["--model", __file__], "--prompts FILE is required"),
    (["--algo", "dancegrpo", "--Lambda", "1", "2"], "drop --Lambda"),
    (["--algo", "g2rpo-no-mgai", "--Lambda", "1", "2"], "g2rpo-no-mgai"),
    (["--reward", "foo"], "unknown reward 'foo'"), (["--reward", "toy-adherence+"], "distinct reward names"),
    (["--probe-every", "5", "--probe-rewards", "toy-clean+toy-adherence"], "toy-adherence: trained on already"),
    (["--probe-every", "5", "--probe-tolerance", "-1"], "--probe-tolerance -1.0"),
    (["--probe-every", "5", "--probe-rewards", "foo"], "--probe-rewards unknown reward 'foo'"),
    (["--sde-steps-per-iteration", "5"], "--sde-steps-per-iteration 5"),
    (["--step-per-k", "--rescore-batch", "0"], "needs --rescore-batch 1"),
    (["--reward", "hps"], "needs --hps-checkpoint"), (["--reward", "clip", "--clip-model", "/no/clip"], "/no/clip")])
def test_bad_arguments_stop_with_a_clear_message(argv, msg):
    with pytest.raises(SystemExit) as e:
        arguments.check_args(train.parse_args(argv))
    assert msg in str(e.value)


@pytest.mark.parametrize("argv,flag", [(["--schedule", "ddim"], "--schedule"), (["--algo", "ppo"], "--algo"),
                                       (["--Lambda", "x"], "--Lambda"), (["--mixed-precision", "fp8"], "--mixed-precision")])
def test_malformed_flags_are_refused_by_the_parser(argv, flag, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(argv)
    assert flag in capsys.readouterr().err


def test_defaults_are_table_4(tmp_path):
    a = train.parse_args(["--model", str(tmp_path), "--prompts", __file__])
    from policy.flux import FluxPolicy
    assert a.shift == 0 and FluxPolicy.SHIFT == 3.0  # 0: the family's time shift, FLUX.1's is Table 4's
    assert a.guidance == 0 and FluxPolicy.DEFAULTS["guidance"] == 3.5
    assert (a.preset, a.G, a.T, a.eta, a.shift or FluxPolicy.SHIFT, a.Lambda, a.lr, a.weight_decay, a.max_grad_norm, a.clip_range,
            a.adv_clip, a.seed, a.sampler_seed, a.mixed_precision, a.iterations) == \
        ("paper", 12, 16, 0.7, 3.0, (1, 2, 3), 2e-6, 1e-4, 1.0, 1e-4, 5.0, 42, 1223627, "bf16", 300)
    assert train.parse_args(["--model", str(tmp_path)]) == train.Args(model=str(tmp_path))  # Table 4 IS Args()
    assert arguments.sde_steps(a) == list(range(8))  # M = the first half of the steps


def test_presets_are_the_defaults_help_shows(capsys):
    """No --model: the small world's preset, and --help shows exactly its values (and the algo's own)."""
    a = train.parse_args([])
    assert (a.preset, a.G, a.T, a.lr, a.iterations, a.reward) == ("toy", 8, 8, 1e-4, 50, "toy-adherence")
    assert train.parse_args(["--preset", "paper"]).G == 12 and train.parse_args(["--G", "5"]).G == 5
    d = train.parse_args(["--algo", "dancegrpo"])
    assert (d.schedule, d.eta, d.Lambda, d.G) == ("constant", 0.3, (1,), 8)
    for argv, shown in (([], ["--G INT", "(default: 8)", "(default: toy)"]),
                        (["--preset", "paper"], ["(default: 12)", "(default: 300)"]),
                        (["--algo", "dancegrpo"], ["(default: constant)", "(default: 0.3)"])):
        with pytest.raises(SystemExit):
            train.parse_args(argv + ["--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert all(s in text for s in shown), (argv, shown)


def test_non_finite_gradient_never_reaches_the_weights():
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        net = torch.nn.Linear(3, 2)
        opt = torch.optim.AdamW(net.parameters(), lr=0.1)
        before = [p.detach().clone() for p in net.parameters()]
        a = train.Args(max_grad_norm=1.0)
        net(torch.randn(4, 3)).sum().mul(float("nan")).backward()
        norm, ok = train.clip_and_step(net, opt, a.max_grad_norm)
        assert not ok and all(torch.equal(p, q) for p, q in zip(net.parameters(), before))
        net(torch.randn(4, 3)).sum().backward()
        norm, ok = train.clip_and_step(net, opt, a.max_grad_norm)
        assert ok and not all(torch.equal(p, q) for p, q in zip(net.parameters(), before))
    finally:
        dist.destroy_process_group()


BASELINE_RUNS = ["g2rpo-no-mgai", "dancegrpo", "flowgrpo", "mixgrpo"]


@pytest.fixture(scope="module")
def baseline_runs(tiny_model, tmp_path_factory):
    """One iteration of each algorithm, the four processes at once."""
    tmp, procs = tmp_path_factory.mktemp("baselines"), {}
    for algo in BASELINE_RUNS:
        extra = ["--window", "2", "--sde-steps"] if algo != "g2rpo-no-mgai" else []  # baselines plan their own steps
        procs[algo] = launch(0, tmp / algo, tiny_model, ["--algo", algo, "--iterations", "1", "--checkpoint-every",
                                                         "0", "--no-export", "--Lambda", "1", *extra], wait=False)
    return {algo: (tmp / algo, finished(p)) for algo, p in procs.items()}


@pytest.mark.parametrize("algo", BASELINE_RUNS)
def test_baselines_run_in_the_same_harness(baseline_runs, algo):
    out, r = baseline_runs[algo]
    images = {"g2rpo-no-mgai": "images scored/iteration 6 ", "mixgrpo": "2 forward/backward of batch 3"}
    assert images.get(algo, "4 forward/backward of batch 3" if algo == "flowgrpo" else "of batch 3") in r.stdout
    rec = metrics(out)[0]
    assert list(rec["reward_per_lambda"]) == ["toy-adherence@1"] and rec["optimizer_steps"] == 1
    if algo != "g2rpo-no-mgai":
        assert rec["model_evaluations"] == 4 * (3 + 1)  # T (G + 1): G trajectories + the anchor


# ---- robustness: arguments, prompt files, the run folder, resume, divergence, the launcher ------
@pytest.mark.parametrize("argv,msg", [
    (["--eta", "0"], "--eta 0.0: must be > 0"), (["--sde-steps", "0", "0"], "--sde-steps 0 0"),
    (["--clip-range", "-0.1"], "--clip-range"), (["--adv-clip", "-1"], "--adv-clip"), (["--lr", "-1e-4"], "--lr"),
    (["--lr", "nan"], "--lr nan"), (["--weight-decay", "-1"], "--weight-decay"), (["--shift", "-1"], "--shift"),
    (["--algo", "mixgrpo", "--T", "8", "--window", "9"], "--window 9"), (["--keep-checkpoints", "0"], "--keep"),
    (["--algo", "dancegrpo", "--train-fraction", "0"], "--train-fraction")])
def test_every_numeric_flag_has_its_range(argv, msg):
    with pytest.raises(SystemExit, match=re.escape(msg)):
        arguments.check_args(train.parse_args(argv))


def test_flags_of_other_algorithms_are_not_checked():
    for argv in (["--T", "3"], ["--window", "99"], ["--train-fraction", "7"]):  # MixGRPO / DanceGRPO only
        arguments.check_args(train.parse_args(argv))


@pytest.mark.parametrize("content,msg", [(b"", "holds no prompt"), (b"  \n\n \t\n", "holds no prompt"),
                                         (b"caf\xe9 au lait\n", "not a UTF-8 text file"),
                                         (b"a photo of a cat\n", "1 of 1 prompts are not what toy-adherence scores")])
def test_bad_prompt_files_are_named(tmp_path, content, msg):
    f = tmp_path / "prompts.txt"
    f.write_bytes(content)
    with pytest.raises(SystemExit, match=re.escape(f"--prompts {f}: {msg}")):
        arguments.check_args(train.parse_args(["--prompts", str(f)]))


def test_model_must_be_a_model_folder(tmp_path):
    f = tmp_path / "weights.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(SystemExit, match="not a diffusers model folder"):
        arguments.check_args(train.parse_args(["--model", str(f), "--prompts", __file__]))


def test_the_run_folder_has_one_owner(tiny_model, tmp_path):
    """A run's folder is refused to a second run (checked before any work: nothing in it changes), to a --resume
    with other settings, and to anyone while its lock is held; --overwrite clears it (the prompt cache stays)."""
    import fcntl
    from launch import run_folder
    out = tmp_path / "run"
    launch(0, out, tiny_model, ["--iterations", "1", "--checkpoint-every", "0", "--no-export"])
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    def refused(*extra):
        a = train.parse_args(["--model", str(tiny_model[0]), "--prompts", str(tiny_model[1]), "--out", str(out),
                              *TINY, *extra])
        with pytest.raises(SystemExit) as e:
            arguments.check_all(a, True)
        return str(e.value.code)
    assert "holds a run: --resume continues it, --overwrite replaces it" in refused("--iterations", "1")
    said = refused("--iterations", "2", "--resume", "--G", "4")
    assert "--resume with other settings" in said and "G 3 -> 4" in said
    with open(out / ".lock", "a+") as held:  # another run holds the folder (flock: per open file, so in-process too)
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(SystemExit, match="is in use by another run"):
            run_folder.take_lock(out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # refused before touching anything
    run_folder.take_lock(out, overwrite=True).close()  # what --overwrite does, under the lock: the run's files go
    assert not run_folder.holds_run(out) and list((out / "prompt_cache").iterdir())  # the prompt cache stays


def test_a_diverged_run_stops_and_exports_nothing(tiny_model, tmp_path):
    out = tmp_path / "run"
    r = launch(0, out, tiny_model, ["--iterations", "8", "--checkpoint-every", "0", "--lr", "1e10",
                                    "--max-skipped", "2"], check=False)
    assert r.returncode == 1 and "2 iterations in a row without an update" in r.stderr
    assert not (out / "final").exists() and len(metrics(out)) < 8


def test_one_error_message_under_torchrun_and_quiet_loading(runs, tiny_model, tmp_path):
    r = launch(2, tmp_path / "bad", tiny_model, ["--eta", "0"], check=False)
    assert r.returncode != 0 and (r.stdout + r.stderr).count("--eta 0.0: must be > 0") == 1
    assert "Loading weights" not in runs["stderr"] and "returned a view tensor" not in runs["stderr"]


def test_ranks_stop_when_the_launcher_dies(tiny_model, tmp_path):
    import signal
    import time
    out = tmp_path / "orphans"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), str(ROOT / "train.py"), "--model", str(tiny_model[0]), "--prompts",
           str(tiny_model[1]), "--out", str(out), *TINY, "--iterations", "500", "--checkpoint-every", "0"]
    launcher = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (out / "metrics.jsonl").exists() and time.time() < deadline:
            time.sleep(0.5)
        assert (out / "metrics.jsonl").exists(), "the run did not start"
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        deadline = time.time() + 30
        while ranks_writing(out) and time.time() < deadline:
            time.sleep(0.5)
        assert not ranks_writing(out), "ranks kept running after their launcher was killed"
    finally:
        launcher.kill()


def ranks_writing(out) -> list:
    """Processes whose command line names `out` (the ranks of that run)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(out) in (proc / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


class KeepGrads(torch.optim.SGD):
    """An optimizer that only records the gradient it is given."""

    def step(self, closure=None):
        self.grads = [p.grad.detach().clone() for g in self.param_groups for p in g["params"]]


@pytest.mark.parametrize("algo", ["g2rpo", "dancegrpo"])
def test_one_pass_gives_the_gradient_of_one_pass_per_k(tiny_model, algo):
    """--rescore-batch 0 (every trained step of both prompts in one forward/backward) and 2 (chunks across the
    prompts) give today's gradient (--rescore-batch 1: one forward/backward per k), in fp32 to float rounding."""
    import torch.distributed as dist
    from policy.flux import FluxPolicy
    from sde import sigma_grid
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        policy = FluxPolicy.from_pretrained(tiny_model[0], dtype=torch.float32)
        a = train.parse_args(["--model", str(tiny_model[0]), "--prompts", str(tiny_model[1]), *TINY, "--algo", algo,
                              *(["--Lambda", "1"] if algo != "g2rpo" else []), "--max-grad-norm", "1e9"])
        a = train.replace(a, sde_steps=(0, 1, 2) if algo == "g2rpo" else ())
        plan = train.make_plan(a, sigma_grid(a.T, a.shift or 3.0))
        results, As = [], []
        for i, prompt in enumerate(tiny_model[1].read_text().splitlines()[:2]):
            gen = torch.Generator().manual_seed(i)
            cond = policy.embed(prompt)
            with torch.no_grad():
                ro = plan.rollout(policy.velocity(cond), policy.noise(1, generator=gen), 0, gen)
            results.append(train.Sampled(prompt, cond, ro, None, None, 0.0))
            As.append(torch.randn(len(ro.groups), a.G, generator=gen))
        grads, losses = {}, {}
        for batch in (1, 0, 2):
            opt = KeepGrads([p for p in policy.transformer.parameters()], lr=0.0)
            stats = train.update(policy, policy.transformer, opt, results, As, train.replace(a, rescore_batch=batch))
            grads[batch], losses[batch] = opt.grads, stats["loss"]
        assert sum(g.abs().sum() for g in grads[1]) > 0
        for batch in (0, 2):
            assert losses[batch] == pytest.approx(losses[1], rel=1e-5, abs=1e-9)
            for g1, g in zip(grads[1], grads[batch]):
                torch.testing.assert_close(g, g1, rtol=1e-4, atol=1e-7)
    finally:
        dist.destroy_process_group()


def test_hsdp_2x2_equals_one_process(tiny_model, tmp_path):
    """--replicas 2 on 4 processes (shard over 2, replicate over 2), 1 prompt each, trains as one process with the
    same 4 prompts does (and so as FSDP over 4: test_fsdp_two_processes_equal_one_process)."""
    r = launch(4, tmp_path / "hsdp", tiny_model, ["--iterations", "1", "--checkpoint-every", "0", "--replicas", "2"])
    assert "HSDP 2 x 2" in r.stdout  # read from the sharded parameters' device mesh
    launch(0, tmp_path / "one", tiny_model, ["--iterations", "1", "--checkpoint-every", "0", "--prompts-per-rank", "4"])
    hsdp, one, base = weights(tmp_path / "hsdp"), weights(tmp_path / "one"), weights_of_base(tiny_model[0])
    moved = max((one[k] - base[k]).abs().max().item() for k in base)
    diff = max((one[k] - hsdp[k]).abs().max().item() for k in base)
    assert moved > 1e-4 and diff < 1e-5 * max(1.0, moved * 100), (diff, moved)
    m1, m2 = metrics(tmp_path / "one")[0], metrics(tmp_path / "hsdp")[0]
    assert m1["anchor_reward"] == pytest.approx(m2["anchor_reward"], abs=1e-6)

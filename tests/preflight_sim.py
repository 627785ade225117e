"""bench/scale.py's simulation as launch/preflight.py's estimate is pinned to it (tests/test_preflight.py).

    python tests/preflight_sim.py --reference tests/preflight_reference.json   # FLUX.1-dev: W = 8 and 1, LoRA too
    python tests/preflight_sim.py --world 8 --blocks 2 3 --json out.json      # FLUX.1-dev's width, 2 + 3 blocks

`--reference` runs the FLUX.1-dev simulations in parallel (1.5 to 3 min of CPU each, 6 min on 2 cores) and writes
their per-phase peaks, the JSON fixture the tests read (`--runs` to redo some).
`--blocks D S` is FLUX.1-dev's transformer width (24 heads x 128) with D double and S single blocks at the paper's
shapes (720x720, 512 T5 tokens, G = 12, T = 16, |M| = 8, Lambda = {1, 2, 3}), with a tiny VAE (8x, 16 latent
channels), text encoders and reward model: about 15 s of CPU.

Two corrections to bench/scale.py's accounting, applied here by patching it for the run (both are what a
GPU would hold; bench/scale.py itself is left as it is):
  1. replay: a model call whose first run gathered the parameters and left them gathered (the rollout's first
     call, under launch.sharding.Gathered) is not replayed. Its recorded excess holds the gathered model, which each replay of
     that call (the anchor's batch-1 steps) adds a second time: at FLUX.1-dev scale bench/scale.py's rollout shows
     22.7 GiB of activations (22.2 of them the bf16 model again) where its widest call (36 rows) needs 9.3.
  2. the models around the transformer: the trackers leave the VAE's and the reward model's weights out of their
     totals (FSDPMemTracker has no kind for what track_external is given; bench.measure.plain_tracker, at world size
     1 without FSDP, is not given them), and then count some of them as activations once an op makes a view of
     them (linear weights: 1.1 GiB of HPS's 3.7 GiB before the reward phase, 2.7 GiB after). Here they count in
     full, from the start, filed as "Buffer", in every tracker bench/scale.py gives anything to track.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

# FLUX.1-dev as the reference runs it: (world, LoRA rank). Each run records the code it ran and what
# launch/preflight.estimate must assume of it (a gathered copy or the plain module, how the load holds the model)
REFERENCE_RUNS = {"world8": (8, 0), "world1": (1, 0), "world1-lora32": (1, 32), "world8-lora32": (8, 32)}
GATHERED = ("Unsharded Param", "All Gather")  # FSDPMemTracker's kinds of gathered parameters


@contextmanager
def corrected():
    """bench/scale.py with the two corrections of the docstring, for the duration (its instruments and builders are
    bench/measure.py's)."""
    from bench import measure
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker, _FSDPRefType
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType
    orig_replayed = measure.Recorder.replayed

    def replayed(self, fn, key, label, replay=True):
        call = orig_replayed(self, fn, key, label, replay)
        memo = self.calls[label]

        def gathered():  # bytes of gathered parameters held now
            return sum(v for k, v in self.current().items() if getattr(k, "value", k) in GATHERED)

        def once_gathered_is_not_a_template(*a, **k):
            sig = key(*a, **k)
            fresh, before = sig not in memo, gathered()
            out = call(*a, **k)
            if fresh and sig in memo and gathered() > before:
                del memo[sig]  # it gathered the parameters: the next call of this shape is run and recorded
            return out
        return once_gathered_is_not_a_template

    around = []  # the VAE and the reward model, as bench/scale.py builds them

    def build_reward(*a, **k):
        reward = orig_reward(*a, **k)
        around.append(reward.model)
        return reward

    def build_policy(*a, **k):
        policy, model = orig_policy(*a, **k)
        around.append(policy.vae)
        return policy, model

    def counting(cls, kind):
        orig = cls.__dict__["track_external"]

        def track_external(self, *external):
            orig(self, *external)
            for module in around:  # counted from the start, as the GPU holds them
                for t in list(module.parameters()) + list(module.buffers()):
                    self._update_and_maybe_create_winfos(t, kind)
        return orig, track_external

    trackers = [(cls, *counting(cls, kind)) for cls, kind in ((MemTracker, _MemRefType.BUFFER),
                                                               (FSDPMemTracker, _FSDPRefType.BUFFER))
                if "track_external" in cls.__dict__]  # FSDPMemTracker has its own
    orig_reward, orig_policy = measure.build_reward, measure.build_policy
    measure.Recorder.replayed, measure.build_reward, measure.build_policy = replayed, build_reward, build_policy
    for cls, _, patched in trackers:
        cls.track_external = patched
    try:
        yield
    finally:
        measure.Recorder.replayed, measure.build_reward, measure.build_policy = orig_replayed, orig_reward, orig_policy
        for cls, orig, _ in trackers:
            cls.track_external = orig


def flux_width(double: int, single: int, lora_rank: int = 0):
    """FLUX.1-dev's transformer width with `double` + `single` blocks at the paper's shapes; tiny VAE (8x, 16 latent
    channels), text encoders (at the widths the transformer reads) and reward model."""
    import scale
    from launch.preflight import FLUX_DEV
    tiny = scale.tiny_setting()
    return replace(tiny, transformer=dict(FLUX_DEV, num_layers=double, num_single_layers=single),
                   vae=dict(tiny.vae, down_block_types=["DownEncoderBlock2D"] * 4,
                            up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=(4, 4, 4, 4)),
                   t5=dict(tiny.t5, d_model=FLUX_DEV["joint_attention_dim"]),
                   clip_text=dict(tiny.clip_text, hidden_size=FLUX_DEV["pooled_projection_dim"]),
                   height=720, width=720, seq_len=512, T=16, G=12, M=tuple(range(8)), Lambda=(1, 2, 3),
                   lora_rank=lora_rank)


def summary(result: dict) -> dict:
    """What the tests read of one simulated rank: per phase the peak (total and by kind) and the bytes at its
    start, in bytes; the load's peak; the parameter counts."""
    phases = {name: {"peak": int(p["peak"]["Total"]), "start": int(p["start_bytes"]),
                     "kinds": {k: int(v) for k, v in p["peak"].items() if k != "Total" and v}}
              for name, p in result["phases"].items()}
    import train
    keep = ("world", "lora_rank", "params", "trained", "load_peak", "param_shard_bytes", "bf16_bytes")
    # what launch/preflight.estimate must be told of the code simulated: whether FSDP gathered a copy for the
    # rollout, whether the load held the whole transformer (before train.load_model) or only this rank's shard
    assumptions = {"gathered_copy": "Unsharded Param" in phases["rollout"]["kinds"],
                   "loads_whole_model": not hasattr(train, "load_model")}
    return {**{k: result[k] for k in keep if k in result}, "assumptions": assumptions, "phases": phases}


def simulate(setting, world: int) -> dict:
    """One rank of a fake process group of `world` ranks (once per process), corrected; the summary."""
    import torch
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore
    import scale
    torch.set_num_threads(1)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        with corrected():
            return summary(scale.simulate(setting, fake=True))
    finally:
        dist.destroy_process_group()


TINY = dict(size=96, heads=4, head_dim=32)  # tests/test_scale.py's tiny config: 576 image tokens, width 128


def measure_tiny() -> dict:
    """The tiny config (bench.scale.tiny_setting(**TINY)) run for real: one process, a gloo world of 1, real
    tensors, every call run (no replay); FSDPMemTracker's peaks per phase, corrected as above (the VAE and the reward
    model counted)."""
    import torch
    import torch.distributed as dist
    import scale
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with corrected():
            return summary(scale.simulate(scale.tiny_setting(**TINY), fake=False, full=True))
    finally:
        dist.destroy_process_group()


def run(argv: list, timeout: float = 1200) -> dict:
    """This file as a subprocess (a fake process group is set up once per process) -> its summary."""
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "sim.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        proc = subprocess.run([sys.executable, __file__, *argv, "--json", str(out)], env=env, capture_output=True,
                              text=True, timeout=timeout)
        if proc.returncode:
            raise RuntimeError(f"preflight_sim {' '.join(argv)} failed:\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def code_version() -> str:
    """The last commit of the simulated code, and whether the working tree changes it."""
    git = lambda *a: subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, text=True).stdout.strip()  # noqa
    parts = ("bench/scale.py", "bench/measure.py", "train.py", "policy")
    dirty = git("status", "--porcelain", "--", *parts)
    return (git("log", "-1", "--format=%h", "--", *parts) or "?") + (" + uncommitted changes" if dirty else "")


def reference(path: Path, names=None):
    """FLUX.1-dev (bench/scale.py's Setting) for the REFERENCE_RUNS `names` (default: all), in parallel; each
    replaces its entry of the fixture at `path` (others are kept) and records the code it ran."""
    t0 = time.time()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    jobs = {}
    for name in names or REFERENCE_RUNS:
        world, lora = REFERENCE_RUNS[name]
        js = path.with_name(f"{path.stem}-{name}.tmp.json")
        jobs[name] = (js, subprocess.Popen([sys.executable, __file__, "--world", str(world), "--lora", str(lora),
                                            "--flux", "--json", str(js)], env=env, stderr=subprocess.PIPE, text=True))
    fixture = json.loads(path.read_text()) if path.is_file() else {}
    runs = fixture.get("runs", {})
    for name, (js, proc) in jobs.items():
        _, err = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"preflight_sim: {name} failed:\n{err[-3000:]}")
        runs[name] = {"code": code_version(), **json.loads(js.read_text())}
        js.unlink()
    path.write_text(json.dumps({
        "made_by": "python tests/preflight_sim.py --reference tests/preflight_reference.json [--runs NAME ...]",
        "corrections": "replay of a call that gathered; external models counted (tests/preflight_sim.py)",
        "runs": runs}, indent=1) + "\n")
    print(f"written: {path} ({time.time() - t0:.0f} s)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reference", help="write the FLUX.1-dev fixture (JSON) here")
    p.add_argument("--runs", nargs="*", choices=list(REFERENCE_RUNS), help="--reference: only these runs")
    p.add_argument("--world", type=int, default=8)
    p.add_argument("--lora", type=int, default=0, help="LoRA rank (alpha = 2 rank), 0: full fine-tuning")
    p.add_argument("--blocks", type=int, nargs=2, metavar=("DOUBLE", "SINGLE"), default=(1, 2))
    p.add_argument("--flux", action="store_true", help="FLUX.1-dev itself (bench/scale.py's Setting), not --blocks")
    p.add_argument("--tiny-real", action="store_true", help="the tiny config on real tensors (measure_tiny)")
    p.add_argument("--json", help="write this run's summary here")
    a = p.parse_args(argv)
    if a.reference:
        return reference(Path(a.reference).resolve(), a.runs)
    import scale
    t0 = time.process_time()
    if a.tiny_real:
        result = measure_tiny()
    else:
        setting = scale.Setting(lora_rank=a.lora) if a.flux else flux_width(*a.blocks, lora_rank=a.lora)
        result = simulate(setting, a.world)
    result["cpu_seconds"] = round(time.process_time() - t0, 1)
    Path(a.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

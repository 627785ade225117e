"""What a training run records: one line of metrics.jsonl per iteration (rewards averaged over prompts and ranks,
the update's diagnostics, what the iteration cost), the start-up line, the progress bar. Rank 0 writes; every rank
takes part in the one all-reduce of the record.
"""
import contextlib
import time

import torch
import torch.distributed as dist

from launch import peak_memory, run_folder
from launch.collectives import mean_over_ranks
from policy.lora import trainable


class Costs:
    """What one iteration costs, measured where it is spent: the bytes FSDP all-gathers into this rank (counted at
    the collective), the seconds of each phase, the peak memory of the iteration."""

    def __init__(self, device):
        self.device, self.bytes, self.values = device, 0, {}
        for name in ("all_gather_into_tensor", "all_gather_single"):  # FSDP2 uses one or the other
            if hasattr(dist, name):
                setattr(dist, name, self._counted(getattr(dist, name)))

    def _counted(self, fn):
        def counted(output_tensor, input_tensor, *a, **kw):
            self.bytes += output_tensor.numel() * output_tensor.element_size()
            return fn(output_tensor, input_tensor, *a, **kw)
        return counted

    def start(self):
        """A new iteration: its peak memory from here (peak_mem_gb is this iteration's)."""
        peak_memory.reset(self.device)
        self.values, self.bytes = {}, 0

    @contextlib.contextmanager
    def phase(self, name: str):
        """gathered_bytes_<name> and sec_<name> of the code inside."""
        t0, self.bytes = time.time(), 0
        yield
        self.values[f"gathered_{name}"], self.values[f"sec_{name}"] = self.bytes, time.time() - t0

    def take(self) -> dict:
        return {**self.values, "peak_mem_gb": peak_memory.gib(self.device)}


def record(it, results, As, stats, Lambda, rewards, finite, costs) -> dict:
    """One line of metrics.jsonl: rewards averaged over prompts and ranks, the update's diagnostics,
    and `costs` (gathered bytes, the seconds of the rollout with rewards and of the update)."""
    mean = mean_over_ranks({
        "R": torch.stack([s.R.mean((2, 3)) for s in results]).mean(0),  # (n_r, L); |k| may differ per prompt
        "anchor": torch.stack([s.anchor_reward for s in results]).mean(0),  # (n_r,)
        "loss": torch.tensor([stats.get("loss", 0.0)])})
    names = [r.name for r in rewards]
    A = torch.cat([A.flatten() for A in As])
    sec_reward = sum(s.sec_reward for s in results)
    return {"iteration": it + 1,
            "anchor_reward": {n: v.item() for n, v in zip(names, mean["anchor"])},
            "reward_per_lambda": {f"{n}@{lam}": mean["R"][i, j].item()
                                  for i, n in enumerate(names) for j, lam in enumerate(Lambda)},
            "loss": mean["loss"].item(), "grad_norm": stats.get("grad_norm", float("nan")),
            "optimizer_steps": stats.get("optimizer_steps", 0), "skipped": not finite,
            **{k: stats[k] for k in ("clip_frac", "ratio_drift_mean", "ratio_drift_max") if k in stats},
            "adv_abs_mean": A.abs().mean().item(), "adv_std": A.std().item(),
            "reward_std_in_group": torch.stack([s.R.std(-1).mean() for s in results]).mean().item(),
            "model_evaluations": sum(s.rollout.evals for s in results),  # counted at the model calls
            "batched_calls": sum(s.rollout.calls for s in results),
            "gathered_bytes_rollout": costs["gathered_rollout"], "gathered_bytes_train": costs["gathered_train"],
            "sec_reward": sec_reward, "sec_rollout": costs["sec_rollout"] - sec_reward, "sec_train": costs["sec_train"],
            "peak_mem_gb": costs["peak_mem_gb"]}


def start_log(a, plan, model, world, device, out, start, settings, policy=None):
    """Rank 0: the derived numbers of this run (the mesh as FSDP2 built it, or none: shard_model); args.json (or
    resumes.jsonl) and metrics.jsonl (launch/run_folder.py). Under classifier-free guidance (policy.rows_per_sample
    2) every model evaluation is two transformer rows, and the line says so."""
    P, n_trained = world * a.prompts_per_rank, sum(p.numel() for p in trainable(model))
    param = next(model.parameters())
    shape = tuple(param.device_mesh.shape) if hasattr(param, "device_mesh") else ()
    mesh = "one process, no FSDP" if not shape else f"FSDP over {shape[0]}" if len(shape) == 1 else \
        f"HSDP {shape[0]} x {shape[1]} (replicas x shards)"
    rows = getattr(policy, "rows_per_sample", 1)
    cfg = f" (x{rows} transformer rows: classifier-free guidance, {rows * plan.evals:g} rows)" if rows > 1 else ""
    print(f"{a.algo} | preset {a.preset} | world size {world} | prompts/iteration {P} | images scored/iteration "
          f"{P * plan.images_per_prompt} | model evaluations per prompt {plan.evals:g}{cfg} in {plan.calls:g} batched "
          f"calls + {plan.train_passes} | Lambda={plan.Lambda} G={a.G} T={a.T} | trained parameters {n_trained:,}"
          f"{f' (LoRA rank {a.lora_rank})' if a.lora_rank else ''} | {mesh} | device {device}", flush=True)
    run_folder.start(out, settings, a.resume, start)


def write_log(rec, out, bar):
    """Rank 0: the record into metrics.jsonl and the reward curve (run_folder.append), and onto the progress bar."""
    run_folder.append(out, rec)
    bar.set_postfix({**{k: f"{v:.4f}" for k, v in rec["anchor_reward"].items()},
                     "loss": f"{rec['loss']:+.2e}", "drift": f"{rec.get('ratio_drift_mean', 0):.1e}"})
    if rec["skipped"]:
        bar.write(f"iteration {rec['iteration']}: non-finite reward or advantage, update skipped")

"""python -m toy: pretrain the small world's base model (once), print its rewards, write a sample grid.

    python -m toy --T 8 --n 16 --grid runs/base_samples.png           # the base model
    python -m toy --dir runs/demo/final --T 8 --n 16                   # a trained one
"""
import argparse
import time

import torch

from policy.flux import FluxPolicy
from report.figures import save_grid

from .model import ToyConfig, base_model
from .rewards import TOY_REWARDS, reward_table
from .world import GRID_PROMPTS, HELDOUT_PROMPTS


def sample_grid(policy, path, prompts=GRID_PROMPTS, seeds=range(6), T: int = 16, scale: int = 4):
    """Samples of fixed prompts (rows) and seeds (columns) -> save_grid PNG."""
    seeds = list(seeds)
    images = policy.sample([p for p in prompts for _ in seeds], seeds * len(prompts), T)
    return save_grid(images, prompts, len(seeds), path, scale, marked=HELDOUT_PROMPTS)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Pretrain the toy base model (once), print its rewards, "
                                             "write a sample grid.")
    ap.add_argument("--dir", default=None, help="model folder (default: ~/.cache/g2rpo/toy-<hash>)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=ToyConfig.steps)
    ap.add_argument("--T", type=int, default=16, help="ODE sampling steps")
    ap.add_argument("--n", type=int, default=4, help="samples per prompt for the reward table")
    ap.add_argument("--grid", default="toy_samples.png", help="sample-grid PNG to write")
    args = ap.parse_args(argv)
    import diffusers
    import transformers
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest, and 10-20x faster on a busy 2-core CPU
    t0 = time.time()
    path = base_model(args.dir, args.seed, ToyConfig(steps=args.steps))
    print(f"base model: {path} ({time.time() - t0:.0f} s)")
    policy = FluxPolicy.from_pretrained(path, dtype=torch.float32)
    print(f"{'':16s}" + "".join(f"{k:>15s}" for k in TOY_REWARDS))
    for row, scores in reward_table(policy, args.n, args.T, args.seed).items():
        print(f"{row:16s}" + "".join(f"{v:15.3f}" for v in scores.values()))
    print(f"sample grid: {sample_grid(policy, args.grid, T=args.T)}")


if __name__ == "__main__":
    main()

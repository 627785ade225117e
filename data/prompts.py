"""The prompt stream of a training run: the prompt file, the seeded sampler, what a run will consume.

The sampler is deterministic (seed, epoch-shuffled, strided over ranks), so its position is all a
checkpoint needs, and the prompts of every future iteration are known in advance: a run encodes
exactly those (each rank its own), not the whole file.
"""
import torch


def read_prompts(path: str) -> list:
    """The non-blank lines of a UTF-8 text file, stripped."""
    with open(path, encoding="utf-8") as f:
        return [p for p in (line.strip() for line in f) if p]


def prompt_file_errors(path: str) -> list:
    """One line per problem of a --prompts file: missing, not UTF-8 text, no prompt in it."""
    try:
        prompts = read_prompts(path)
    except FileNotFoundError:
        return [f"--prompts {path}: no such file"]
    except (UnicodeDecodeError, IsADirectoryError) as e:
        return [f"--prompts {path}: not a UTF-8 text file ({type(e).__name__}); give one prompt per line"]
    return [] if prompts else [f"--prompts {path}: holds no prompt (empty or blank lines only)"]


class PromptSampler:
    """Seeded, epoch-shuffled, rank-strided prompts; its position is part of the checkpoint."""

    def __init__(self, prompts, seed, rank, world, per_rank):
        self.prompts, self.seed, self.rank, self.world, self.per_rank = prompts, seed, rank, world, per_rank
        self.position = 0  # global prompt index consumed so far (same on every rank)

    def next(self):
        """[(global prompt index, prompt)] of this rank for one iteration."""
        out = []
        for j in range(self.per_rank):
            g = self.position + self.rank * self.per_rank + j
            epoch, i = divmod(g, len(self.prompts))
            perm = torch.randperm(len(self.prompts), generator=torch.Generator().manual_seed(self.seed + epoch))
            out.append((g, self.prompts[perm[i]]))
        self.position += self.world * self.per_rank
        return out


def future_prompts(sampler: PromptSampler, iterations: int) -> list:
    """The distinct prompts `sampler` hands this rank in the next `iterations` iterations (it is not moved)."""
    copy = PromptSampler(sampler.prompts, sampler.seed, sampler.rank, sampler.world, sampler.per_rank)
    copy.position = sampler.position
    return list(dict.fromkeys(p for _ in range(iterations) for _, p in copy.next()))


def encoding_share(needs: list, rank: int) -> list:
    """The prompts rank `rank` encodes into a shared prompt cache, given every rank's list of the prompts it needs
    (needs[r]): each distinct prompt goes to exactly one of the ranks that need any (round robin in order of first
    need), so no two ranks ever write one cache file and no rank loads the text encoders for others only."""
    distinct = list(dict.fromkeys(p for need in needs for p in need))
    workers = [r for r, need in enumerate(needs) if need]
    return distinct[workers.index(rank)::len(workers)] if rank in workers else []

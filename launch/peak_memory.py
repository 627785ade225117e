"""This process's peak memory since the last `reset`: the CUDA allocator's peak on a GPU, the resident set's high
water mark on the CPU (Linux: VmHWM, restarted through /proc/self/clear_refs; elsewhere the lifetime peak).

train.py resets at the start of every iteration, so metrics.jsonl's peak_mem_gb is that iteration's peak, not the
run's so far (a one-off peak, e.g. loading, would otherwise hide every later change).
"""
import resource
from pathlib import Path

import torch


def reset(device: torch.device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS (Linux >= 4.0)
    except OSError:
        pass  # not Linux, or not allowed: the lifetime peak


def gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 2**30
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30

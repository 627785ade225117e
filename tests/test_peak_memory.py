"""metrics.jsonl's peak_mem_gb is the iteration's peak: launch/peak_memory.py restarts the high-water mark."""
import sys

import pytest
import torch

from launch import peak_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the CPU's resettable peak is Linux's VmHWM")
def test_a_freed_peak_is_forgotten_after_reset():
    cpu = torch.device("cpu")
    x = torch.ones(2**27)  # 512 MiB, resident
    x.add_(1)
    high = peak_memory.gib(cpu)
    del x  # a large block goes back to the system
    peak_memory.reset(cpu)
    assert peak_memory.gib(cpu) < high - 0.4

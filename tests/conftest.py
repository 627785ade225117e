import os
import sys

# tests import the shipped top-level modules (flat layout)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny toy FLUX folder and a 6-prompt file, built once for the whole session (train, LoRA, guard, nodes)."""
    import toy
    d = tmp_path_factory.mktemp("toy") / "model"
    toy.base_model(d, seed=0, cfg=toy.ToyConfig(steps=3, batch=8, heads=2, double_blocks=1, single_blocks=1),
                   log=None)
    prompts = d.parent / "prompts.txt"
    prompts.write_text("\n".join(toy.TRAIN_PROMPTS[:6]) + "\n")
    return d, prompts


@pytest.fixture()
def one_rank_group(tmp_path):
    """A gloo process group of one, in this process (FSDP2 and DCP need a group even at world size 1)."""
    import torch.distributed as dist
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one thread is fastest, and threads only contend for the cores (idle ones spin-wait). A test file
    of tiny models uses it for all its tests: pytestmark = pytest.mark.usefixtures("one_thread")."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def free_port() -> int:
    """A TCP port nobody listens on now (the OS picks it): for a torchrun or a process group of a test, so that tests
    running side by side (pytest -n) never share one."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The test files that take longest (real train.py runs), started first: `make test` runs files side by side
# (pytest -n auto --dist loadfile), and a long file started last would leave the other cores idle at the end.
LONGEST_FIRST = ("test_train.py", "test_faults.py", "test_families.py", "test_lora.py", "test_scale.py",
                 "test_preflight.py", "test_gpu_smoke.py", "test_evaluate.py", "test_guard.py", "test_gpu_check.py",
                 "test_evaluate_faults.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: within a file, its own order


def capture_kwargs(module) -> list:
    """Record the keyword arguments of every forward call of `module` (what a pipeline passes its transformer)."""
    calls = []
    module.register_forward_pre_hook(lambda m, args, kwargs: calls.append(kwargs), with_kwargs=True)
    return calls


class CountingLoads:
    """Counts the from_pretrained calls of the class `name` that `module` (a policy file) imported: how often the
    text encoders are loaded, i.e. whether the prompt cache was used."""

    def __init__(self, monkeypatch, module, name):
        cls, self.n = getattr(module, name), 0

        def counted(*args, **kwargs):
            self.n += 1
            return cls.from_pretrained(*args, **kwargs)
        monkeypatch.setattr(module, name, type(name, (), {"from_pretrained": staticmethod(counted)}))

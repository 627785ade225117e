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

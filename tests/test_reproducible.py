"""The same weights write the same bytes (policy/export_folder.py): a full model folder (policy.weights.save_model_folder)
and a LoRA adapter (policy.lora.save_lora) exported by two processes are equal file by file, and still load; a
leftover path.tmp of a killed export never mixes into the new one."""
import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import FluxTransformer2DModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from policy.export_folder import sort_header

ROOT = Path(__file__).resolve().parent.parent
LORA_COPIES = 4  # safetensors' writer draws its metadata order per file: 2 orders, so 8 files all alike by chance: 1/128

EXPORT = f"""
import sys
from pathlib import Path
from diffusers import FluxTransformer2DModel
from policy.flux import FluxPolicy
from policy.weights import save_model_folder
from policy.lora import add_lora, save_lora
model, out = Path(sys.argv[1]), Path(sys.argv[2])
t = FluxTransformer2DModel.from_pretrained(model / "transformer")
save_model_folder(out / "full", t.state_dict(), t.config, model, FluxTransformer2DModel)
add_lora(t, 4, 8, FluxPolicy.LORA_TARGETS, seed=0)
for i in range({LORA_COPIES}):
    save_lora(out / f"lora{{i}}", t.state_dict(), t, model)
"""


def digests(folder: Path) -> dict:
    """{relative path: sha256 of a file, or the target of a link} of everything under `folder`."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(folder))
            if p.is_symlink():
                found[rel] = "-> " + os.readlink(p)
            elif p.is_file():
                found[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return found


def export_in_processes(model_dir, outs):
    """EXPORT into each of `outs`, each in a process of its own with its own PYTHONHASHSEED, all at once."""
    runs = [subprocess.Popen([sys.executable, "-c", EXPORT, str(model_dir), str(out)], cwd=ROOT,
                             env=dict(os.environ, PYTHONHASHSEED=str(i + 1), PYTHONPATH=str(ROOT)),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i, out in enumerate(outs)]
    for run in runs:
        output, _ = run.communicate(timeout=300)
        assert run.returncode == 0, output


def test_two_processes_write_the_same_bytes(tiny_model, tmp_path):
    model_dir = tiny_model[0]
    a, b = tmp_path / "a", tmp_path / "b"
    export_in_processes(model_dir, [a, b])
    full = digests(a / "full")
    assert "transformer/diffusion_pytorch_model.safetensors" in full and "transformer/config.json" in full
    assert full == digests(b / "full")
    loras = [digests(out / f"lora{i}") for out in (a, b) for i in range(LORA_COPIES)]
    assert set(loras[0]) == {"pytorch_lora_weights.safetensors", "lora.json"}
    assert all(d == loras[0] for d in loras), "LoRA exports of one adapter differ"
    assert not [p.name for p in a.iterdir() if p.name.endswith((".tmp", ".old"))]
    # what was written still loads: the transformer with from_pretrained, the adapter with its metadata
    base = FluxTransformer2DModel.from_pretrained(model_dir / "transformer").state_dict()
    again = FluxTransformer2DModel.from_pretrained(a / "full" / "transformer").state_dict()
    assert set(again) == set(base) and all(torch.equal(again[k], base[k]) for k in base)
    assert "_name_or_path" not in json.loads((a / "full" / "transformer" / "config.json").read_text())
    with safe_open(a / "lora0" / "pytorch_lora_weights.safetensors", framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt" and json.loads(meta["lora_adapter_metadata"])["transformer.r"] == 4
    from diffusers import FluxPipeline
    pipe = FluxPipeline.from_pretrained(model_dir, vae=None)
    pipe.load_lora_weights(str(a / "lora0"))
    assert pipe.transformer.peft_config["default_0"].lora_alpha == 8


def test_a_header_in_any_order_or_spacing_is_rewritten_to_one(tmp_path):
    tensors = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(3, dtype=torch.float16), "z": torch.zeros(0)}
    meta = {"format": "pt", "other": "x\ny \u00e9"}
    first, second = tmp_path / "first.safetensors", tmp_path / "second.safetensors"
    save_file(tensors, first, metadata=meta)
    # another writer's file of the same content: metadata keys reversed, tensors in another order, indented
    raw = first.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    shuffled = {k: header[k] for k in reversed(list(header))}
    shuffled["__metadata__"] = dict(reversed(list(header["__metadata__"].items())))
    text = json.dumps(shuffled, indent=3).encode()
    text += b" " * (-len(text) % 8)
    second.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])
    assert second.read_bytes() != first.read_bytes()
    sort_header(first), sort_header(second)
    assert second.read_bytes() == first.read_bytes()
    assert len(first.read_bytes()) == len(raw) and struct.unpack("<Q", first.read_bytes()[:8])[0] % 8 == 0
    loaded = load_file(first)
    assert set(loaded) == set(tensors) and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    with safe_open(first, framework="pt") as f:
        assert f.metadata() == meta


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_a_leftover_of_a_killed_export_does_not_mix_in(tiny_model, tmp_path, kind):
    from policy.flux import FluxPolicy
    from policy.lora import add_lora, save_lora
    from policy.weights import save_model_folder
    model_dir = tiny_model[0]
    t = FluxTransformer2DModel.from_pretrained(model_dir / "transformer")
    final = tmp_path / "final"

    def export():
        if kind == "full":
            save_model_folder(final, t.state_dict(), t.config, model_dir, FluxTransformer2DModel)
        else:
            save_lora(final, t.state_dict(), t, model_dir)

    if kind == "lora":
        add_lora(t, 4, 0, FluxPolicy.LORA_TARGETS, seed=0)
    export()
    clean = digests(final)
    # a killed run's leftovers: a half-written final.tmp with a shard of another save, and a final.old (killed
    # between the renames); and the export to be replaced holds a file of its own
    (tmp_path / "final.tmp" / "transformer").mkdir(parents=True)
    (tmp_path / "final.tmp" / "transformer" / "diffusion_pytorch_model-00002-of-00002.safetensors").write_bytes(b"x")
    (tmp_path / "final.tmp" / "stale.txt").write_text("stale")
    (tmp_path / "final.old").mkdir()
    (final / "old.txt").write_text("old")
    export()
    assert digests(final) == clean
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]

"""Loading holds one shard, not the whole model, per rank (train.load_model, policy.weights.load_transformer).

The transformer is built on the meta device, adapted and sharded there, and each rank then reads only its own
rows from the safetensors files. Checked here: the weights equal diffusers' from_pretrained (one file and a sharded
folder; fp32 and bf16; the LoRA adapters equal those add_lora gives a loaded model), and on 2 real gloo processes
the resident memory a rank adds while loading stays within its shard plus one block, below the whole fp32 model
that every rank used to hold (measured: 0.65x the whole model, its half and 30 MB in flight; the earlier path,
from_pretrained then shard_model: 1.28x)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import FluxTransformer2DModel

from policy.flux import FluxPolicy
from policy.weights import WeightFiles, load_transformer
from policy.lora import add_lora
from tiny_flux import save_tiny_flux
from conftest import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# 2 double + 8 single blocks at width 512: 57 M parameters, 227 MB in fp32; the largest block 38 MB
WIDE = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=8, attention_head_dim=64,
            num_attention_heads=8, joint_attention_dim=128, pooled_projection_dim=64, guidance_embeds=True,
            axes_dims_rope=(16, 24, 24))
MB = 1e6


@pytest.mark.parametrize("sharded", [False, True])
def test_loaded_weights_equal_from_pretrained(tmp_path, sharded):
    save_tiny_flux(tmp_path)
    if sharded:  # diffusers' sharded layout: several files and diffusion_pytorch_model.safetensors.index.json
        FluxTransformer2DModel.from_pretrained(tmp_path / "transformer").save_pretrained(
            tmp_path / "transformer", max_shard_size="40KB")
        assert (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
        assert len(list((tmp_path / "transformer").glob("*.safetensors"))) > 2
    for dtype in (torch.float32, torch.bfloat16):
        ref = FluxTransformer2DModel.from_pretrained(tmp_path / "transformer", dtype=dtype)
        ours = load_transformer(WeightFiles(tmp_path / "transformer", FluxTransformer2DModel), "cpu", dtype)
        assert_same(ours.state_dict(), ref.state_dict())
        add_lora(ref, 4, 8, FluxPolicy.LORA_TARGETS, seed=3)  # a LoRA base built on the meta device gets the adapters a loaded one gets
        ours = load_transformer(WeightFiles(tmp_path / "transformer", FluxTransformer2DModel), "cpu", dtype, prepare=with_lora)
        assert_same(ours.state_dict(), ref.state_dict())
        assert [n for n, p in ours.named_parameters() if p.requires_grad] == \
            [n for n, p in ref.named_parameters() if p.requires_grad]
    policy = FluxPolicy.from_pretrained(tmp_path, dtype=torch.float32)  # FluxPolicy on its own reads it the same way
    assert_same(policy.transformer.state_dict(),
                FluxTransformer2DModel.from_pretrained(tmp_path / "transformer").state_dict())


def with_lora(transformer):
    add_lora(transformer, 4, 8, FluxPolicy.LORA_TARGETS, seed=3)
    return transformer


def assert_same(ours: dict, ref: dict):
    assert set(ours) == set(ref)
    for k, v in ref.items():
        assert ours[k].dtype == v.dtype and torch.equal(ours[k], v), k


def worker(folder: str, out: str):
    """One rank of a gloo world of 2: the resident memory train.load_model adds (the kernel's VmHWM above VmRSS)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import torch.distributed as dist
    import torch.distributed.fsdp  # noqa: F401 - imported before the measurement
    import train
    from scale import _proc_status, _reset_peak_rss
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    a = train.Args(mixed_precision="fp32")  # full fine-tuning: fp32 master weights, as the paper's run
    weights = WeightFiles(folder, FluxTransformer2DModel)
    start = _reset_peak_rss()
    model = train.load_model(a, weights, torch.device("cpu"), torch.float32, FluxPolicy.LORA_TARGETS)
    peak = _proc_status("VmHWM")
    blocks = list(model.transformer_blocks) + list(model.single_transformer_blocks)
    result = dict(added=peak - start, shard=sum(p.to_local().nbytes for p in model.parameters()),
                  whole=sum(p.numel() * 4 for p in model.parameters()),
                  block=max(sum(p.numel() * 4 for p in b.parameters()) for b in blocks))
    Path(out.format(rank=dist.get_rank())).write_text(json.dumps(result))
    dist.destroy_process_group()


def test_each_rank_holds_its_shard_not_the_whole_model(tmp_path):
    torch.manual_seed(0)
    FluxTransformer2DModel(**WIDE).save_pretrained(tmp_path / "transformer")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "WORLD_SIZE": "2", "PYTHONPATH": str(ROOT),
           "MALLOC_MMAP_THRESHOLD_": "65536",  # large blocks straight from and back to the kernel: RSS follows them
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    cmd = [sys.executable, __file__, str(tmp_path / "transformer"), str(tmp_path / "rank{rank}.json")]
    procs = [subprocess.Popen(cmd, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stderr=subprocess.PIPE)
             for r in (0, 1)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-3000:]
    for r in (0, 1):
        m = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert m["whole"] > 200 * MB and abs(m["shard"] - m["whole"] / 2) < 0.01 * m["whole"]
        # its shard, one block's rows in flight (the mapped file and a copy), some MB of Python and FSDP objects
        assert m["shard"] <= m["added"] <= m["shard"] + m["block"] + 20 * MB, {k: v / MB for k, v in m.items()}
        assert m["added"] < 0.75 * m["whole"]  # the path before held the whole fp32 model: added >= whole


if __name__ == "__main__":
    worker(*sys.argv[1:])

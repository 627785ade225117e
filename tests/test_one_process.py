"""World size 1 without FSDP (launch.sharding.shard_model): LoRA on one GPU holds no second, unsharded copy of the base.

At world size 1 FSDP2 has nothing to shard but still keeps an unsharded copy of the parameters in the compute dtype
beside them (22.3 GiB for FLUX.1-dev in bf16). shard_model returns the plain module where no copy is needed (fp32,
or a frozen LoRA base held in bf16); under bf16 the fp32 adapters then compute in fp32, where FSDP2 runs them in
bf16. Pinned here: the two paths give the same velocity before the update (the adapters start at B = 0), the same
update within bf16 rounding, and velocities within bf16 rounding after it; and the simulation of the one-GPU LoRA
recipe (bench/scale.py) holds no gathered copy."""
import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

import train
from policy.flux import FluxPolicy
from policy.weights import WeightFiles, load_transformer
from policy.lora import add_lora, trainable
from tiny_flux import save_tiny_flux

ROOT = Path(__file__).resolve().parent.parent
BF16_STEP = 2 ** -8  # relative spacing of bf16 numbers


def full(t):
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().float().clone()


def test_one_process_lora_without_fsdp_equals_it_with_fsdp(one_rank_group, tmp_path):
    save_tiny_flux(tmp_path)
    a = train.Args(lora_rank=4, lora_alpha=8, mixed_precision="bf16", lr=1e-3)
    cpu, weights = torch.device("cpu"), WeightFiles(tmp_path / "transformer", FluxPolicy.TRANSFORMER)
    plain = train.load_model(a, weights, cpu, torch.bfloat16, FluxPolicy.LORA_TARGETS).train()  # as train.set_up builds it

    def with_fsdp(t):  # train.load_model's preparation, FSDP2 kept at world size 1
        add_lora(t, a.lora_rank, a.lora_alpha, FluxPolicy.LORA_TARGETS, seed=a.seed)
        return train.shard_model(t, cpu, a.mixed_precision, False, plain_alone=False)
    sharded = load_transformer(weights, cpu, torch.bfloat16, with_fsdp).train()
    assert isinstance(sharded, FSDPModule) and not isinstance(plain, FSDPModule)
    assert not any(isinstance(p, DTensor) for p in plain.parameters())
    assert {p.dtype for p in plain.parameters() if not p.requires_grad} == {torch.bfloat16}  # no fp32 master, no copy

    policy = FluxPolicy.from_pretrained(tmp_path, dtype=torch.bfloat16, transformer=plain, height=32, width=32,
                                        max_sequence_length=16)
    cond, g = policy.embed("a red cat on the blue house"), torch.Generator().manual_seed(0)
    x, t = policy.noise(3, generator=g), torch.tensor([0.9, 0.5, 0.2])
    w = torch.randn(x.shape, generator=g)
    before, grads, steps, after = {}, {}, {}, {}
    for name, model in (("plain", plain), ("fsdp", sharded)):
        start = {n: full(p) for n, p in model.named_parameters() if p.requires_grad}
        optim = torch.optim.AdamW(trainable(model), lr=a.lr, weight_decay=a.weight_decay, eps=1e-8)
        v = policy.velocity(cond, model)
        with torch.no_grad():
            before[name] = v(x, t)
        (v(x, t) * w).mean().backward()
        grads[name] = {n: full(p.grad) for n, p in model.named_parameters() if p.grad is not None}
        norm, ok = train.clip_and_step(model, optim, a.max_grad_norm)
        assert ok and norm > 0
        steps[name] = {n: full(p) - start[n] for n, p in model.named_parameters() if p.requires_grad}
        with torch.no_grad():
            after[name] = v(x, t)
    assert torch.equal(before["plain"], before["fsdp"])  # B = 0: both are the bf16 base
    assert set(grads["plain"]) == set(grads["fsdp"]) == set(steps["plain"])
    for n, g_fsdp in grads["fsdp"].items():  # fp32 adapters against bf16 ones: within bf16 rounding, per tensor
        diff = (grads["plain"][n] - g_fsdp).norm()
        assert diff <= 4 * BF16_STEP * g_fsdp.norm() + 1e-12, (n, diff, g_fsdp.norm())
        # AdamW's first step is lr g / (|g| + eps): the same wherever g is clear of its rounding (near 0 its sign
        # is the rounding's)
        clear = g_fsdp.abs() > 4 * BF16_STEP * g_fsdp.abs().max()
        torch.testing.assert_close(steps["plain"][n][clear], steps["fsdp"][n][clear], rtol=0, atol=1e-2 * a.lr)
    assert sum(s.abs().max() > 0.5 * a.lr for s in steps["plain"].values()) > 0  # the step moved the adapters
    moved = (after["fsdp"] - before["fsdp"]).abs().max()
    assert moved > 0 and (after["plain"] - after["fsdp"]).abs().max() <= 2 * BF16_STEP * after["fsdp"].abs().max()


def test_the_one_gpu_lora_simulation_holds_no_gathered_copy():
    """bench/scale.py's W = 1 LoRA row on the tiny config: the model is the plain one, nothing is gathered in any
    phase, and its parameters are the bf16 base and fp32 adapters, once."""
    sys.path.insert(0, str(ROOT / "bench"))
    import scale
    from torch.testing._internal.distributed.fake_pg import FakeStore
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=1)
    try:
        r = scale.simulate(replace(scale.tiny_setting(), lora_rank=4), fake=True, full=True, checkpointing=(False,))
    finally:
        dist.destroy_process_group()
    assert r["sharded"] is False
    trained = r["trained"]
    model_bytes = (r["params"] - trained) * 2 + trained * 4  # the bf16 base, the fp32 adapters
    assert r["param_shard_bytes"] == model_bytes
    for name, p in r["phases"].items():
        kinds = scale.breakdown(p["peak"])
        assert kinds["gathered"] == 0, name
        assert kinds["params"] * scale.GiB == model_bytes, name

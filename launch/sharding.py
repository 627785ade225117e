"""FSDP2 for train.py: the transformer sharded one unit per block plus the root (shard_model), its root's inputs cast
under bf16 as the pipelines pass them (cast_root_inputs), and its parameters gathered once per rollout (Gathered).
"""
from functools import partial

import torch
import torch.distributed as dist


def shard_model(transformer, device, mixed_precision: str, activation_checkpointing: bool, replicas: int = 1,
                plain_alone: bool = True, fp32_inputs=("timestep", "guidance")):
    """FSDP2: one unit per transformer block plus the root; fp32 master weights, bf16 compute. replicas > 1: HSDP on a
    2-D mesh (replicas, world / replicas): sharded within a group of consecutive ranks (a node), only the gradient
    shards all-reduced across groups. World size 1 with LoRA or fp32 (plain_alone): the plain module, no FSDP2 copy of
    the parameters (22.3 GiB for FLUX.1-dev in bf16); the fp32 adapters then compute in fp32 (peft casts their input),
    the same within bf16 rounding (tests/test_one_process.py). Full fine-tuning under bf16 keeps FSDP2 at world size
    1: its bf16 copy is the compute copy bf16 needs anyway."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from policy.weights import blocks
    world = dist.get_world_size()
    if activation_checkpointing:
        transformer.enable_gradient_checkpointing()
    frozen_base = any(not p.requires_grad for p in transformer.parameters())  # LoRA
    if plain_alone and world == 1 and (mixed_precision == "fp32" or frozen_base):
        return transformer
    mesh = init_device_mesh(device.type, (world,)) if replicas == 1 else \
        init_device_mesh(device.type, (replicas, world // replicas), mesh_dim_names=("replicate", "shard"))
    # bf16: the root casts the model's inputs to bf16 as the pipelines pass them (cast_root_inputs), all but
    # `fp32_inputs` (the family's FP32_INPUTS: the timestep and the guidance), which each transformer casts itself
    # where its pipeline does (FLUX.1 and Qwen-Image to bf16; SD3 embeds 1000 t in fp32); the blocks cast nothing: the rotary tables the root computes from the
    # position ids stay fp32 inside every block, as in the pipelines and an unsharded bf16 model (FSDP2's default
    # would cast each block's inputs, the tables included, to bf16). Position ids are integers < 256: exact in bf16
    # up to 4096 px.
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False) \
        if mixed_precision == "bf16" else MixedPrecisionPolicy(cast_forward_inputs=False)
    for block in blocks(transformer):
        fully_shard(block, mesh=mesh, mp_policy=mp)
    if mixed_precision == "bf16":  # FSDP2 casts parameters, not buffers: a bf16 model's (SD3's position table) too
        for m in transformer.modules():
            for n, buf in m._buffers.items():
                if buf is not None and buf.is_floating_point():
                    m._buffers[n] = buf.to(torch.bfloat16)
        transformer.register_forward_pre_hook(partial(cast_root_inputs, keep=tuple(fp32_inputs)), with_kwargs=True)
    return fully_shard(transformer, mesh=mesh, mp_policy=mp)


def cast_root_inputs(module, args, kwargs, keep=("timestep", "guidance")):
    """The sharded root's inputs under bf16: every floating tensor to bf16 but the keyword inputs named in `keep`."""
    def cast(name, x):
        kept = name in keep or not (torch.is_tensor(x) and x.is_floating_point())
        return x if kept else x.to(torch.bfloat16)
    return tuple(cast("", x) for x in args), {k: cast(k, v) for k, v in kwargs.items()}


class Gathered:
    """Keep the sharded parameters gathered for a whole rollout: ONE all-gather per iteration,
    not one per forward (reshard_after_forward is switched off inside, then everything reshards). A plain
    module (world size 1, shard_model) has nothing to gather."""

    def __init__(self, model):
        self.units = [m for m in model.modules() if hasattr(m, "reshard")]

    def __enter__(self):
        for u in self.units:
            u.set_reshard_after_forward(False, recurse=False)

    def __exit__(self, *exc):
        for u in self.units:
            u.reshard()
            u.set_reshard_after_forward(True, recurse=False)

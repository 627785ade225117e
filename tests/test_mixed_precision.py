"""Training, evaluation and the exported model compute the same function under bf16 (the GPU issue's item 2).

FSDP2's MixedPrecisionPolicy casts each sharded module's floating inputs to param_dtype by default: sharded per
block, that would hand every FLUX block bf16 rotary tables, while evaluate.py, FluxPipeline and an unsharded
bf16 transformer keep them fp32. launch.sharding.shard_model casts only the root's inputs, and of those not the timestep (SD3
embeds it in fp32, as StableDiffusion3Pipeline passes it); this pins it."""
import torch

from launch.sharding import shard_model
from policy.flux import FluxPolicy
from tiny_flux import save_tiny_flux


def test_sharded_bf16_transformer_equals_the_unsharded_bf16_model(one_rank_group, tmp_path):
    """The same bf16 inputs into the FSDP2 bf16 transformer (fp32 master weights, launch.sharding.shard_model) and into the
    unsharded bf16 transformer that evaluate.py and FluxPipeline run: bitwise the same velocity, fp32 rotary
    tables in every block. (Through FluxPolicy.velocity the two differ by one bf16 step in places only because
    the unsharded call gets the prompt embedding expanded with stride 0, which picks another CPU matmul path.)"""
    save_tiny_flux(tmp_path / "flux")
    fp32 = FluxPolicy.from_pretrained(tmp_path / "flux", dtype=torch.float32, height=32, width=32)  # fp32 master
    bf16 = FluxPolicy.from_pretrained(tmp_path / "flux", dtype=torch.bfloat16, height=32, width=32)  # evaluate.py
    seen = []
    for block in list(fp32.transformer.transformer_blocks) + list(fp32.transformer.single_transformer_blocks):
        block.register_forward_pre_hook(lambda m, args, kw: seen.append(kw["image_rotary_emb"][0].dtype),
                                        with_kwargs=True)
    model = shard_model(fp32.transformer, torch.device("cpu"), "bf16", False)
    root = []
    model.register_forward_pre_hook(lambda m, args, kw: root.append((kw["hidden_states"].dtype, kw["timestep"].dtype,
                                                                     kw["encoder_hidden_states"].dtype)), with_kwargs=True)
    cond = bf16.embed("a red cat on the blue house")
    B = 3
    inputs = dict(hidden_states=fp32.noise(B, generator=torch.Generator().manual_seed(0)).bfloat16(),
                  timestep=torch.tensor([0.9, 0.5, 0.2]), guidance=torch.full((B,), 3.5),
                  encoder_hidden_states=cond.prompt_embeds.expand(B, -1, -1).contiguous(),
                  pooled_projections=cond.pooled.expand(B, -1).contiguous(),
                  txt_ids=torch.zeros(cond.prompt_embeds.shape[1], 3), img_ids=fp32.img_ids, return_dict=False)
    with torch.no_grad():
        as_fp32 = {k: v.float() if k in ("hidden_states", "encoder_hidden_states", "pooled_projections") else v
                   for k, v in inputs.items()}  # the trainer's fp32 inputs: the root casts them (bf16 -> fp32 exact)
        v_sharded, v_plain = model(**as_fp32)[0], bf16.transformer(**inputs)[0]
    assert len(seen) == 2 and set(seen) == {torch.float32}, f"the blocks got {seen} rotary tables"
    assert root == [(torch.bfloat16, torch.float32, torch.bfloat16)], root  # the timestep is the transformer's to cast
    assert v_sharded.dtype == v_plain.dtype == torch.bfloat16
    assert torch.equal(v_sharded, v_plain), (v_sharded - v_plain).abs().max()


def test_sharded_bf16_sd3_equals_the_unsharded_bf16_model(one_rank_group, tmp_path):
    """SD3 under FSDP2 bf16 (fp32 master weights) computes what StableDiffusion3Pipeline's bf16 transformer computes,
    bitwise: its timestep (1000 t) reaches the time embedding in fp32, and its position table (a buffer, which FSDP2
    does not cast) is the bf16 model's."""
    from policy.sd3 import SD3Policy
    from tiny_sd3 import save_tiny_sd3
    save_tiny_sd3(tmp_path / "sd3")
    fp32 = SD3Policy.from_pretrained(tmp_path / "sd3", dtype=torch.float32, height=32, width=32)
    bf16 = SD3Policy.from_pretrained(tmp_path / "sd3", dtype=torch.bfloat16, height=32, width=32)
    seen = []
    fp32.transformer.time_text_embed.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    model = shard_model(fp32.transformer, torch.device("cpu"), "bf16", False,
                        fp32_inputs=SD3Policy.FP32_INPUTS)
    one = bf16.collate([(bf16.embed("a red cat on the blue house"), 3)])
    cond = type(one)(one.prompt_embeds.contiguous(), one.pooled.contiguous())  # one matmul path for both (stride 0
    # and dense inputs take different CPU kernels, a bf16 step apart in places)
    x, t = fp32.noise(3, generator=torch.Generator().manual_seed(0)), torch.tensor([0.9, 0.5, 0.2])
    with torch.no_grad():
        v_sharded = fp32.forward(model, x.bfloat16().float(), t, cond)  # fp32 in: the root casts it
        v_plain = bf16.forward(bf16.transformer, x, t, cond)
    assert seen == [torch.float32], seen
    assert torch.equal(v_sharded, v_plain), (v_sharded - v_plain).abs().max()

"""LoRA (train.py --lora-rank, policy/lora.py): only the adapters train, the base stays frozen (bf16 under
bf16), FSDP2 on 2 ranks equals 1 rank, a resumed run equals a straight one, and the exported adapter (diffusers'
LoRA format) reloads to the trained policy's outputs, through evaluate.py and through FluxPipeline."""
import json
from pathlib import Path

import pytest
import torch
from diffusers import FluxTransformer2DModel

import evaluate
from launch import eval_models
from policy.flux import FluxPolicy
from policy.lora import add_lora, adapter_state, trainable
from test_train import launch, metrics, resumed_copy

LORA = ["--lora-rank", "4", "--lora-alpha", "8", "--lr", "1e-2"]
CFG = dict(patch_size=1, in_channels=12, num_layers=1, num_single_layers=1, attention_head_dim=8,
           num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8, axes_dims_rope=(2, 2, 4))


def call(t, seed=0):
    g, bf = torch.Generator().manual_seed(seed), torch.bfloat16
    return t(hidden_states=torch.randn(2, 16, 12, generator=g).to(bf), timestep=torch.tensor([0.3, 0.8]).to(bf),
             encoder_hidden_states=torch.randn(2, 5, 16, generator=g).to(bf),
             pooled_projections=torch.randn(2, 8, generator=g).to(bf), txt_ids=torch.zeros(5, 3),
             img_ids=torch.zeros(16, 3), return_dict=False)[0]


def test_only_the_adapters_train_and_the_base_stays_bf16():
    torch.manual_seed(0)
    t = FluxTransformer2DModel(**CFG).to(torch.bfloat16)
    base = {k: v.clone() for k, v in t.state_dict().items()}
    n = add_lora(t, 4, 8, FluxPolicy.LORA_TARGETS)
    params = trainable(t)
    assert n == sum(p.numel() for p in params) and 0 < n < sum(p.numel() for p in t.parameters()) / 2
    assert all(p.dtype == torch.float32 for p in params)
    assert call(t).float().sub(call_base(base)).abs().max() == 0  # B = 0: the adapted policy starts as the base
    opt = torch.optim.AdamW(params, lr=1e-2)
    call(t).float().square().mean().backward()
    opt.step()
    after = t.state_dict()
    for k, v in base.items():
        name = k if k in after else k.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert after[name].dtype == torch.bfloat16 and torch.equal(after[name], v), k
    assert any(v.abs().max() > 0 for k, v in adapter_state(t).items() if "lora_B" in k)


def call_base(state):
    t = FluxTransformer2DModel(**CFG).to(torch.bfloat16)
    t.load_state_dict(state)
    return call(t).float()


def adapter(path, model_dir) -> dict:
    """The adapter weights of a train.py output (ckpt_* or final/), loaded as evaluate.py loads models."""
    ref = eval_models.resolve_model(str(path), str(model_dir))
    a = evaluate.Args(dtype="fp32", device="cpu")
    policy = evaluate.load_policy(ref, a, torch.device("cpu"), torch.float32, None)
    return adapter_state(policy.transformer), policy


def test_lora_runs_resumes_and_exports(tiny_model, tmp_path):
    model_dir = tiny_model[0]
    straight, resumed, one = tmp_path / "straight", tmp_path / "resumed", tmp_path / "one"
    r = launch(2, straight, tiny_model, LORA + ["--iterations", "4", "--checkpoint-every", "1", "--keep-checkpoints", "4"])
    assert "(LoRA rank 4)" in r.stdout
    # the checkpoint holds the adapters and their optimizer state only, not the frozen base
    from torch.distributed.checkpoint import FileSystemReader
    keys = FileSystemReader(str(straight / "ckpt_000002")).read_metadata().state_dict_metadata
    model_keys = [k for k in keys if k.startswith("model.")]
    assert model_keys and all(".lora_" in k for k in model_keys)
    # resume == straight: the straight run as it stood when killed after checkpoint 2, resumed
    resumed_copy(straight, resumed, at=2)
    launch(2, resumed, tiny_model, LORA + ["--iterations", "4", "--checkpoint-every", "1", "--keep-checkpoints", "4",
                                           "--resume"])
    for x, y in zip(metrics(straight), metrics(resumed), strict=True):
        assert x["anchor_reward"] == pytest.approx(y["anchor_reward"], abs=1e-6)
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-6)
    final, policy = adapter(straight / "final", model_dir)
    again, _ = adapter(resumed / "final", model_dir)
    assert max((final[k] - again[k]).abs().max().item() for k in final) < 1e-6
    # 2 ranks x 1 prompt == 1 rank x 2 prompts (the first iteration)
    launch(0, one, tiny_model, LORA + ["--iterations", "1", "--checkpoint-every", "1", "--prompts-per-rank", "2"])
    two_ranks, _ = adapter(straight / "ckpt_000001", model_dir)
    one_rank, _ = adapter(one / "final", model_dir)
    moved = max(v.abs().max().item() for k, v in one_rank.items() if "lora_B" in k)
    assert moved > 1e-4  # the update did something
    assert max((two_ranks[k] - one_rank[k]).abs().max().item() for k in one_rank) < 1e-5 * max(1.0, moved * 100)
    # the export reloads to the trained policy: the same adapter as the last checkpoint, the same outputs
    last, trained = adapter(straight / "ckpt_000004", model_dir)
    assert set(last) == set(final) and all(torch.equal(last[k], final[k]) for k in final)
    x, t = torch.randn(2, *policy.img_ids.shape[:1], policy.transformer.config.in_channels), torch.tensor([0.9, 0.4])
    cond = policy.embed(tiny_model[1].read_text().splitlines()[0])
    with torch.no_grad():
        assert torch.equal(policy.velocity(cond)(x, t), trained.velocity(cond)(x, t))
    # ... and FluxPipeline.load_lora_weights reads it (the toy has no VAE)
    from diffusers import FluxPipeline
    pipe = FluxPipeline.from_pretrained(model_dir, vae=None)
    pipe.load_lora_weights(str(straight / "final"))
    piped = {k.replace(".default_0.", ".default."): v for k, v in adapter_state(pipe.transformer).items()}
    assert set(piped) == set(final) and all(torch.equal(piped[k].float(), final[k]) for k in final)
    assert pipe.transformer.peft_config["default_0"].lora_alpha == 8  # the scale alpha / r travels in the file
    assert json.loads((straight / "final" / "lora.json").read_text())["base"] == str(Path(model_dir).resolve())

"""policy/sd3.py against diffusers' own StableDiffusion3Pipeline, on a tiny random SD3.5 saved to disk and loaded
back."""
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import tiny_sd3  # noqa: E402
from policy import families, lora, sd3  # noqa: E402
from policy.weights import WeightFiles, load_transformer  # noqa: E402
from sde import ode_step  # noqa: E402

PROMPT = "a photo of a red cat on the house"
H, W = tiny_sd3.H, tiny_sd3.W
MAX_LEN = 16
TOL = 1e-5  # fp32 on both sides; what remains is fp32 rounding (the scheduler shifts the grid in float32)

from conftest import CountingLoads, capture_kwargs  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one thread


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_sd3")
    tiny_sd3.save_tiny_sd3(path)
    return path


@pytest.fixture(scope="module")
def pipe(model_dir):
    pipe = StableDiffusion3Pipeline.from_pretrained(model_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load(path, **kw):
    kw = {"height": H, "width": W, "max_sequence_length": MAX_LEN, "dtype": torch.float32, **kw}
    return sd3.SD3Policy.from_pretrained(path, **kw)


def run_pipe(pipe, T, guidance, output_type, seed=7):
    """The pipeline on our grid: it shifts the sigmas it is given (shift 3.0), so it gets the unshifted linspace."""
    sigmas = torch.linspace(1, 0, T + 1, dtype=torch.float64)[:-1]
    return pipe(PROMPT, height=H, width=W, num_inference_steps=T, sigmas=list(sigmas.numpy()), guidance_scale=guidance,
                max_sequence_length=MAX_LEN, generator=torch.Generator().manual_seed(seed),
                output_type=output_type).images


def test_parity_with_sd3_pipeline(model_dir, pipe):
    policy = load(model_dir)
    assert policy.guidance == 4.5 and policy.NEGATIVE_PROMPT == ""
    T = 4
    pipe.scheduler.set_timesteps(sigmas=torch.linspace(1, 0, T + 1, dtype=torch.float64)[:-1].numpy())
    torch.testing.assert_close(pipe.scheduler.sigmas.double(), policy.sigmas(T), atol=1e-7, rtol=0)

    # conditioning: our cached encodings are encode_prompt's, the negative prompt's included
    with torch.no_grad():
        seq, neg_seq, pooled, neg_pooled = pipe.encode_prompt(PROMPT, None, None, max_sequence_length=MAX_LEN)
    cond, neg = policy.embed(PROMPT), policy.embed("")
    assert cond.prompt_embeds.shape == (1, 77 + MAX_LEN, tiny_sd3.TEXT_DIM)
    assert cond.pooled.shape == (1, tiny_sd3.POOLED_DIM)
    for ours, theirs in ((cond.prompt_embeds, seq), (cond.pooled, pooled), (neg.prompt_embeds, neg_seq),
                         (neg.pooled, neg_pooled)):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)

    images = policy.sample([PROMPT], [7], T=T)  # (1, 3, H, W)
    ref = run_pipe(pipe, T, 4.5, "pt")
    assert images.shape == (1, 3, H, W) and ((images > 0) & (images < 1)).float().mean() > 0.5  # not saturated
    torch.testing.assert_close(images, ref, atol=TOL, rtol=0)


def test_guidance_one_equals_the_pipeline_without_cfg(model_dir, pipe):
    """At guidance 1 the pipeline drops the unconditional rows; ours still runs them: u + 1 (c - u) = c."""
    policy, T = load(model_dir, guidance=1.0), 3
    v, sigmas = policy.velocity(policy.embed(PROMPT)), policy.sigmas(T)
    x = policy.noise(1, torch.Generator().manual_seed(7))  # (1, 16, h, w)
    for k in range(T):
        x = ode_step(x, v(x, sigmas[k].expand(1)), sigmas[k], sigmas[k + 1])
    ref = run_pipe(pipe, T, 1.0, "latent")
    assert (ref - policy.noise(1, torch.Generator().manual_seed(7))).abs().mean() > 0.1  # it did move
    torch.testing.assert_close(x, ref, atol=TOL, rtol=0)
    assert (ref - run_pipe(pipe, T, 4.5, "latent")).abs().max() > 1e-3  # guidance matters


def test_one_batched_call_unconditional_first(model_dir):
    policy = load(model_dir)
    calls = capture_kwargs(policy.transformer)
    cond, neg = policy.embed(PROMPT), policy.embed("")
    x, t = policy.noise(3, torch.Generator().manual_seed(1)), torch.tensor([0.9, 0.5, 0.2], dtype=torch.float64)
    v = policy.velocity(cond)(x, t)
    assert len(calls) == 1 and v.shape == x.shape == (3, 16, H // 2, W // 2) and v.dtype == torch.float32
    kw = calls[0]
    assert torch.equal(kw["hidden_states"], torch.cat([x, x]))
    assert torch.equal(kw["timestep"], torch.cat([t, t]).float() * 1000)  # 1000 sigma, as the pipeline passes it
    enc, pooled = kw["encoder_hidden_states"], kw["pooled_projections"]
    assert torch.equal(enc[:3], neg.prompt_embeds.expand(3, -1, -1))  # unconditional rows first
    assert torch.equal(enc[3:], cond.prompt_embeds.expand(3, -1, -1))
    assert torch.equal(pooled[:3], neg.pooled.expand(3, -1)) and torch.equal(pooled[3:], cond.pooled.expand(3, -1))
    out = policy.transformer(**kw)[0]
    torch.testing.assert_close(v, out[:3] + 4.5 * (out[3:] - out[:3]), atol=0, rtol=0)  # v_u + w (v_c - v_u)


def test_prompt_cache_round_trips(model_dir, tmp_path, monkeypatch):
    fresh = load(model_dir)
    want = {p: fresh.embed(p) for p in ("a cat", "")}  # in memory
    assert fresh.encode_prompts(["a cat"]) == 0  # the negative prompt was stored along
    t5 = CountingLoads(monkeypatch, sd3, "T5EncoderModel")
    cache = tmp_path / "cache"
    assert load(model_dir, cache_dir=cache).encode_prompts(["a cat"]) == 2 and t5.n == 1  # the prompt and ""
    assert len(list(cache.glob("*.pt"))) == 2
    again = load(model_dir, cache_dir=cache)  # a fresh process reads the files
    for p, cond in want.items():
        got = again.embed(p)
        assert torch.equal(got.prompt_embeds, cond.prompt_embeds) and torch.equal(got.pooled, cond.pooled)
    assert t5.n == 1


def test_loading_and_folder_checks(model_dir, tmp_path):
    ref = SD3Transformer2DModel.from_pretrained(model_dir, subfolder="transformer", dtype=torch.float32)
    ours = load_transformer(WeightFiles(model_dir / "transformer", SD3Transformer2DModel), "cpu", torch.float32)
    a, b = ref.state_dict(), ours.state_dict()
    assert "pos_embed.pos_embed" in a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # a checkpoint whose stored position table is not what __init__ computes (converted, held in half precision):
    # from_pretrained uses the file's, and so must we
    copy = tmp_path / "copy"
    shutil.copytree(model_dir, copy)
    file = copy / "transformer" / "diffusion_pytorch_model.safetensors"
    weights = load_file(file)
    weights["pos_embed.pos_embed"] = weights["pos_embed.pos_embed"].half().float()
    save_file(weights, file, metadata={"format": "pt"})
    ref = SD3Transformer2DModel.from_pretrained(copy, subfolder="transformer", dtype=torch.float32)
    got = load(copy).transformer.pos_embed.pos_embed
    assert torch.equal(got, ref.pos_embed.pos_embed) and not torch.equal(got, a["pos_embed.pos_embed"])

    assert families.family_of(model_dir) is sd3.SD3Policy and sd3.SD3Policy.size_multiple(model_dir) == 4
    with pytest.raises(ValueError, match="multiples? of 4"):
        load(model_dir, height=30)
    with pytest.raises(ValueError, match="at most 48"):  # pos_embed_max_size 12 x patch 2 x f 2
        load(model_dir, height=64)
    shutil.rmtree(copy / "text_encoder_3")
    assert "has no text_encoder_3/ subfolder" in families.folder_problem(copy)
    with pytest.raises(FileNotFoundError, match=r"has no text_encoder_3/ subfolder.*save_pretrained"):
        sd3.SD3Policy.from_pretrained(copy)


def test_lora_export_loads_in_the_pipeline(model_dir, tmp_path):
    """Written against save_lora(path, state_dict, transformer, base_dir) picking the pipeline from the base
    folder's family; StableDiffusion3Pipeline.load_lora_weights must reproduce our adapted transformer."""
    policy = load(model_dir)
    net = policy.transformer
    assert lora.add_lora(net, 4, 8, sd3.SD3Policy.LORA_TARGETS, seed=0) > 0
    adapted = [n for n, _ in net.named_modules() if n.endswith(".lora_A")]
    assert any(".attn.add_q_proj." in n for n in adapted) and not any(".attn2." in n for n in adapted)
    with torch.no_grad():
        for n, p in net.named_parameters():
            if ".lora_B" in n:
                p.copy_(torch.randn_like(p) * 0.1)
    lora.save_lora(tmp_path / "lora", net.state_dict(), net, model_dir)

    pipe = StableDiffusion3Pipeline.from_pretrained(model_dir, dtype=torch.float32)
    kw = dict(hidden_states=policy.noise(2, torch.Generator().manual_seed(3)), timestep=torch.tensor([900.0, 300.0]),
              encoder_hidden_states=policy.embed(PROMPT).prompt_embeds.expand(2, -1, -1),
              pooled_projections=policy.embed(PROMPT).pooled.expand(2, -1), return_dict=False)
    with torch.no_grad():
        base = pipe.transformer(**kw)[0]
        pipe.load_lora_weights(tmp_path / "lora")
        theirs, ours = pipe.transformer(**kw)[0], net(**kw)[0]
    assert (theirs - base).abs().max() > 1e-3  # the adapter changed something
    torch.testing.assert_close(theirs, ours, atol=1e-6, rtol=0)


def test_bf16_transformer_returns_float32(model_dir):
    ref, policy = load(model_dir), load(model_dir, dtype=torch.bfloat16)
    plain = SD3Transformer2DModel.from_pretrained(model_dir, subfolder="transformer", dtype=torch.bfloat16)
    assert policy.transformer.pos_embed.pos_embed.dtype == torch.bfloat16
    assert torch.equal(policy.transformer.pos_embed.pos_embed, plain.pos_embed.pos_embed)
    calls = capture_kwargs(policy.transformer)
    x, t = ref.noise(2, torch.Generator().manual_seed(4)), torch.tensor([0.9, 0.4])
    v = policy.velocity(policy.embed(PROMPT))(x, t)
    assert calls[-1]["hidden_states"].dtype == calls[-1]["encoder_hidden_states"].dtype == torch.bfloat16
    assert v.dtype == torch.float32
    v_ref = ref.velocity(ref.embed(PROMPT))(x, t)
    assert (v - v_ref).abs().mean() < 0.1 * v_ref.abs().mean()

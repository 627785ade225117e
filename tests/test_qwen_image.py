"""policy/qwen_image.py against diffusers' own QwenImagePipeline, on a tiny random Qwen-Image saved to disk."""
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import QwenImagePipeline, QwenImageTransformer2DModel  # noqa: E402

from policy import qwen_image  # noqa: E402
from policy.qwen_image import QwenImagePolicy  # noqa: E402
import tiny_qwen_image  # noqa: E402

PROMPT = "a photo of a red cat on the house"
H = W = 32  # the tiny VAE downsamples 4x: latent 8x8, 16 tokens of 64 channels
TOL = 1e-5  # fp32 on both sides; what remains is fp32 rounding (the pipeline passes float32(1000 sigma) / 1000)

from conftest import CountingLoads, capture_kwargs  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one thread


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_qwen_image")
    tiny_qwen_image.save_tiny_qwen_image(path)
    return path


@pytest.fixture(scope="module")
def pipe(model_dir):
    p = QwenImagePipeline.from_pretrained(model_dir, dtype=torch.float32)
    p.set_progress_bar_config(disable=True)
    return p


def load(path, **kw):
    return QwenImagePolicy.from_pretrained(path, **{"height": H, "width": W, "dtype": torch.float32, **kw})


def test_parity_with_qwen_image_pipeline(model_dir, pipe):
    policy, T = load(model_dir), 4
    assert (qwen_image.TEMPLATE, qwen_image.DROP) == (pipe.prompt_template_encode, pipe.prompt_template_encode_start_idx)
    for p in (PROMPT, " "):  # conditioning: our cached encoding is encode_prompt's (the negative prompt's too)
        ref, ref_mask = pipe.encode_prompt(p, max_sequence_length=512)
        cond = policy.embed(p)
        assert ref_mask is None and cond.prompt_embeds_mask.eq(1).all()  # one prompt: no padding
        torch.testing.assert_close(cond.prompt_embeds, ref, atol=1e-6, rtol=0)
    assert policy.embed(" ").prompt_embeds.shape[1] < policy.embed(PROMPT).prompt_embeds.shape[1]

    kw = dict(negative_prompt=" ", true_cfg_scale=QwenImagePolicy.DEFAULTS["guidance"], height=H, width=W,
              num_inference_steps=T)
    latents = pipe(PROMPT, output_type="latent", generator=torch.Generator().manual_seed(7), **kw).images
    assert torch.equal(pipe.scheduler.sigmas, policy.sigmas(T).float())  # its own schedule, bit for bit
    assert pipe.scheduler.sigmas[-2] == pytest.approx(0.02)  # shift_terminal
    images = pipe(PROMPT, output_type="pt", generator=torch.Generator().manual_seed(7), **kw).images

    x0 = policy.noise(1, torch.Generator().manual_seed(7))
    v, sigmas = policy.velocity(policy.embed(PROMPT)), policy.sigmas(T)
    for k in range(T):
        x0 = x0 + v(x0, sigmas[k].expand(1)) * float(sigmas[k + 1] - sigmas[k])
    assert (latents - policy.noise(1, torch.Generator().manual_seed(7))).abs().mean() > 0.1  # it did move
    torch.testing.assert_close(x0, latents, atol=TOL, rtol=0)
    ours = policy.sample([PROMPT], [7], T=T)  # the interface's sampler: noise, grid, guidance, decode
    assert ours.shape == (1, 3, H, W) and ((ours > 0) & (ours < 1)).float().mean() > 0.5
    torch.testing.assert_close(ours, images, atol=TOL, rtol=0)


def test_static_shift_and_size_multiple(model_dir):
    policy = load(model_dir)
    assert torch.equal(policy.sigmas(5, shift=3.0), qwen_image.sigma_grid(5, 3.0))
    with pytest.raises(ValueError, match="T .* must be >= 2"):
        policy.sigmas(1)  # shift_terminal: the scheduler gives NaN
    assert QwenImagePolicy.size_multiple(model_dir) == 8 and policy.noise(2).shape == (2, 16, 64)
    with pytest.raises(ValueError, match="multiples? of 8"):
        load(model_dir, height=36)


def test_one_batched_call_equals_the_pipelines_two(model_dir):
    """Unconditional rows first, padded to the prompt's length, in ONE call: equal to the pipeline's two calls
    (each unpadded, no mask) and its guidance."""
    policy = load(model_dir, guidance=3.0)
    cond, neg = policy.embed(PROMPT), policy.embed(" ")
    calls = capture_kwargs(policy.transformer)
    x, t = policy.noise(2, torch.Generator().manual_seed(1)), torch.tensor([0.9, 0.3])
    v = policy.velocity(cond)(x, t)
    assert len(calls) == 1 and calls[0]["hidden_states"].shape[0] == 4
    mask = calls[0]["encoder_hidden_states_mask"]
    S, s = cond.prompt_embeds.shape[1], neg.prompt_embeds.shape[1]
    assert mask.shape == (4, S) and mask[:2, s:].eq(0).all() and mask[:2, :s].eq(1).all() and mask[2:].eq(1).all()
    assert torch.equal(calls[0]["timestep"], torch.cat([t, t]))
    with torch.no_grad():
        def call(c):  # as QwenImagePipeline.__call__ calls it
            return policy.transformer(hidden_states=x, timestep=t, encoder_hidden_states=c.prompt_embeds.expand(2, -1, -1),
                                      encoder_hidden_states_mask=None, img_shapes=[[(1, 4, 4)]] * 2,
                                      return_dict=False)[0]
        v_c, v_u = call(cond), call(neg)
    comb = v_u + 3.0 * (v_c - v_u)
    expected = comb * (torch.norm(v_c, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))
    torch.testing.assert_close(v, expected, atol=TOL, rtol=0)
    assert (comb - expected).abs().max() > 1e-3  # the rescale matters
    one = load(model_dir, guidance=1.0)
    torch.testing.assert_close(one.velocity(one.embed(PROMPT))(x, t), v_c, atol=TOL, rtol=0)  # w = 1: unguided


def test_rows_of_prompts_of_different_lengths(model_dir):
    policy = load(model_dir)
    prompts = ["a cat", "a big blue house with a tree", "a dog"]
    conds = [policy.embed(p) for p in prompts]
    assert len({c.prompt_embeds.shape[1] for c in conds}) == 2
    x, t = policy.noise(4, torch.Generator().manual_seed(5)), torch.tensor([0.8, 0.6, 0.4, 0.2])
    batched = policy.rows_velocity([(conds[0], 1), (conds[1], 2), (conds[2], 1)])(x, t)
    alone = [policy.velocity(c) for c in conds]
    separate = torch.cat([alone[0](x[:1], t[:1]), alone[1](x[1:3], t[1:3]), alone[2](x[3:], t[3:])])
    torch.testing.assert_close(batched, separate, atol=TOL, rtol=0)
    c = policy.collate([(conds[0], 2), (conds[1], 1)])
    assert c.prompt_embeds[:2, conds[0].prompt_embeds.shape[1]:].eq(0).all()


def test_prompt_cache_on_disk_and_in_memory(model_dir, tmp_path, monkeypatch):
    loads = CountingLoads(monkeypatch, qwen_image, "Qwen2_5_VLForConditionalGeneration")
    fresh = load(model_dir)  # in memory
    a = fresh.embed("a cat")
    assert loads.n == 1 and torch.equal(fresh.embed("a cat").prompt_embeds, a.prompt_embeds) and loads.n == 1
    cache = tmp_path / "cache"
    policy = load(model_dir, cache_dir=cache)
    assert policy.encode_prompts(["a cat", "a red house", "a cat"]) == 3 and loads.n == 2  # + the negative " "
    assert len(list(cache.glob("*.pt"))) == 3
    again = load(model_dir, cache_dir=cache)  # a fresh process reads the files
    for p in ("a cat", "a red house", " "):
        got, ref = again.embed(p), fresh.embed(p)
        assert torch.equal(got.prompt_embeds, ref.prompt_embeds) and torch.equal(got.prompt_embeds_mask, ref.prompt_embeds_mask)
        assert got.prompt_embeds_mask.dtype == torch.long
    assert loads.n == 3  # only `fresh` encoded " " and "a red house" (one pass), `again` nothing


def test_load_transformer_equals_from_pretrained(model_dir):
    from policy.weights import WeightFiles, load_transformer
    for dtype in (torch.float32, torch.bfloat16):
        ours = load_transformer(WeightFiles(model_dir / "transformer", QwenImageTransformer2DModel), "cpu", dtype)
        ref = QwenImageTransformer2DModel.from_pretrained(model_dir, subfolder="transformer", dtype=dtype)
        a, b = ours.state_dict(), ref.state_dict()
        assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
        for name in ("pos_freqs", "neg_freqs"):  # rotary tables: plain tensors built by __init__, must be real
            mine, theirs = getattr(ours.pos_embed, name), getattr(ref.pos_embed, name)
            assert not mine.is_meta and mine.dtype == theirs.dtype and torch.equal(mine, theirs)


def test_folder_problem(model_dir, tmp_path):
    assert QwenImagePolicy.folder_problem(model_dir) == ""
    from policy.families import family_of
    assert family_of(model_dir) is QwenImagePolicy
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    shutil.rmtree(broken / "tokenizer")
    assert "no tokenizer/" in QwenImagePolicy.folder_problem(broken)
    with pytest.raises(FileNotFoundError, match="no tokenizer/"):
        QwenImagePolicy.from_pretrained(broken)


def test_lora_export_loads_in_the_pipeline(model_dir, tmp_path):
    """Adapters on the default targets, exported by policy.lora.save_lora, give the same transformer outputs when
    QwenImagePipeline.load_lora_weights reads them into a fresh pipeline."""
    from policy.lora import add_lora, save_lora
    policy = load(model_dir)
    net = policy.transformer
    assert add_lora(net, 4, 8, QwenImagePolicy.LORA_TARGETS, seed=0) > 0
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(hash(name) % 1000))
    save_lora(tmp_path / "lora", net.state_dict(), net, model_dir)
    fresh = QwenImagePipeline.from_pretrained(model_dir, dtype=torch.float32)
    fresh.load_lora_weights(tmp_path / "lora", weight_name="pytorch_lora_weights.safetensors")
    cond = policy.embed(PROMPT)
    x, t = policy.noise(2, torch.Generator().manual_seed(3)), torch.tensor([0.7, 0.2])
    with torch.no_grad():
        ours = policy.forward(net, x, t, policy.collate([(cond, 2)]))
        theirs = policy.forward(fresh.transformer, x, t, policy.collate([(cond, 2)]))
        base = policy.forward(QwenImagePipeline.from_pretrained(model_dir).transformer, x, t, policy.collate([(cond, 2)]))
    assert (ours - base).abs().max() > 1e-3  # the adapter changes the model
    torch.testing.assert_close(theirs, ours, atol=TOL, rtol=0)

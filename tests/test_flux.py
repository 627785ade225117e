"""policy/flux.py against diffusers' own FluxPipeline, on a tiny random FLUX saved to disk and loaded back."""
import json
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import FluxPipeline  # noqa: E402

from policy import flux  # noqa: E402
import tiny_flux  # noqa: E402
from sde import ode_step, sigma_grid  # noqa: E402

PROMPT = "a photo of a red cat on the house"
H = W = 32  # tiny VAE downsamples 2x: latent 16x16, 64 tokens of 64 channels
MAX_LEN = 16
TOL = 1e-5  # fp32 on both sides; what remains is fp32 rounding (the pipeline passes sigma*1000/1000)

from conftest import CountingLoads, capture_kwargs  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one thread


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_flux")
    tiny_flux.save_tiny_flux(path)
    return path


def load(path, **kw):
    kw = {"height": H, "width": W, "max_sequence_length": MAX_LEN, "dtype": torch.float32, **kw}
    return flux.FluxPolicy.from_pretrained(path, **kw)


def sample(policy, cond, sigmas, generator):
    v = policy.velocity(cond)
    x = policy.noise(1, generator=generator)  # (1, L, C)
    for i in range(len(sigmas) - 1):
        x = ode_step(x, v(x, sigmas[i].expand(1)), sigmas[i], sigmas[i + 1])  # Eq. 1
    return x


def test_parity_with_flux_pipeline(model_dir):
    policy = load(model_dir)
    pipe = FluxPipeline.from_pretrained(model_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    T = 6
    grid = sigma_grid(T)  # (T + 1,) shift 3
    pipe.scheduler.set_timesteps(sigmas=grid[:-1].numpy())  # the scheduler appends t = 0 itself
    torch.testing.assert_close(pipe.scheduler.sigmas, grid.float(), atol=1e-7, rtol=0)

    # conditioning: our cached encoding is encode_prompt's
    cond = policy.embed(PROMPT)
    ref_seq, ref_pooled, _ = pipe.encode_prompt(PROMPT, max_sequence_length=MAX_LEN)
    torch.testing.assert_close(cond.prompt_embeds, ref_seq, atol=1e-6, rtol=0)
    torch.testing.assert_close(cond.pooled, ref_pooled, atol=1e-6, rtol=0)

    ours = sample(policy, cond, grid, torch.Generator().manual_seed(7))
    kw = dict(height=H, width=W, num_inference_steps=T, sigmas=list(grid[:-1].numpy()), guidance_scale=3.5,
              max_sequence_length=MAX_LEN)
    theirs = pipe(PROMPT, output_type="latent", generator=torch.Generator().manual_seed(7), **kw).images
    assert (theirs - policy.noise(1, torch.Generator().manual_seed(7))).abs().mean() > 0.1  # it did move
    torch.testing.assert_close(ours, theirs, atol=TOL, rtol=0)

    image = policy.decode(ours)  # (1, 3, H, W)
    ref_image = pipe(PROMPT, output_type="pt", generator=torch.Generator().manual_seed(7), **kw).images
    assert image.shape == (1, 3, H, W) and ((image > 0) & (image < 1)).float().mean() > 0.5  # not saturated
    torch.testing.assert_close(image, ref_image, atol=TOL, rtol=0)


def test_guidance_and_timestep_reach_the_transformer(model_dir):
    policy = load(model_dir, guidance=2.0)
    calls = capture_kwargs(policy.transformer)
    x = policy.noise(2, torch.Generator().manual_seed(0))
    policy.velocity(policy.embed(PROMPT))(x, torch.tensor([0.25, 0.75], dtype=torch.float64))
    kw = calls[-1]
    assert torch.equal(kw["guidance"], torch.tensor([2.0, 2.0]))
    assert torch.equal(kw["timestep"], torch.tensor([0.25, 0.75]))  # sigma, not 1000 sigma
    assert kw["img_ids"].shape == (x.shape[1], 3) and kw["img_ids"][:, 0].eq(0).all()
    assert torch.equal(kw["img_ids"][1], torch.tensor([0.0, 0.0, 1.0]))  # (0, row, col), row-major


def test_bf16_transformer_returns_float32(model_dir):
    ref, policy = load(model_dir), load(model_dir, dtype=torch.bfloat16)
    calls = capture_kwargs(policy.transformer)
    x, t = ref.noise(2, torch.Generator().manual_seed(4)), torch.tensor([0.9, 0.4])
    v = policy.velocity(policy.embed(PROMPT))(x, t)
    assert calls[-1]["hidden_states"].dtype == torch.bfloat16 and v.dtype == torch.float32
    assert calls[-1]["encoder_hidden_states"].dtype == torch.bfloat16
    v_ref = ref.velocity(ref.embed(PROMPT))(x, t)
    assert (v - v_ref).abs().mean() < 0.1 * v_ref.abs().mean()  # bf16 text encoders + transformer: ~3.5 %


def test_pixel_space_mode(tmp_path):
    tiny_flux.save_tiny_flux(tmp_path, pixel_space=True, guidance_embeds=False)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["vae"] == [None, None] and not (tmp_path / "vae").exists()
    (tmp_path / "g2rpo.json").write_text(json.dumps({"height": 8, "width": 12, "max_sequence_length": 12}))
    policy = flux.FluxPolicy.from_pretrained(tmp_path, dtype=torch.float32)
    assert (policy.height, policy.width, policy.max_sequence_length) == (8, 12, 12)  # from g2rpo.json
    assert policy.vae is None and policy.noise(2).shape == (2, 4 * 6, 12)

    image = torch.rand(2, 3, 8, 12)
    torch.testing.assert_close(policy.decode(policy.pack(image * 2 - 1)), image, atol=1e-6, rtol=0)
    assert policy.decode(torch.full((1, 24, 12), 3.0)).eq(1).all()  # clamped
    assert policy.pack(image)[0, 0].tolist() == image[0, :, :2, :2].reshape(-1).tolist()  # (c, dy, dx) order

    calls = capture_kwargs(policy.transformer)
    v = policy.velocity(policy.embed(PROMPT))(policy.noise(2), torch.tensor([1.0, 0.5]))
    assert v.shape == (2, 24, 12) and v.dtype == torch.float32
    assert calls[-1]["guidance"] is None  # guidance_embeds=False


def test_branches_share_one_uncopied_prompt(model_dir):
    policy = load(model_dir)
    cond = policy.embed(PROMPT)
    v = policy.velocity(cond)
    calls = capture_kwargs(policy.transformer)
    x = policy.noise(3, torch.Generator().manual_seed(1))
    t = torch.full((3,), 0.6)
    batched = v(x, t)
    enc, pooled = calls[-1]["encoder_hidden_states"], calls[-1]["pooled_projections"]
    assert enc.shape[0] == 3 and enc.stride(0) == 0 and enc.data_ptr() == cond.prompt_embeds.data_ptr()
    assert pooled.shape[0] == 3 and pooled.stride(0) == 0 and pooled.data_ptr() == cond.pooled.data_ptr()
    separate = torch.cat([v(x[i:i + 1], t[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, separate, atol=1e-5, rtol=0)


def test_per_sample_t_equals_separate_calls(model_dir):
    policy = load(model_dir)
    v = policy.velocity(policy.embed(PROMPT))
    x = policy.noise(3, torch.Generator().manual_seed(2))
    t = torch.tensor([0.95, 0.5, 0.1], dtype=torch.float64)
    batched = v(x, t)
    separate = torch.cat([v(x[i:i + 1], t[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, separate, atol=1e-5, rtol=0)
    assert (batched[0] - batched[2]).abs().mean() > 1e-3  # t matters


def test_one_prompt_per_sample(model_dir):
    policy = load(model_dir)
    conds = [policy.embed(p) for p in ("a cat", "a blue house")]
    both = flux.Cond(torch.cat([c.prompt_embeds for c in conds]), torch.cat([c.pooled for c in conds]))
    x, t = policy.noise(2, torch.Generator().manual_seed(5)), torch.tensor([0.7, 0.2])
    separate = torch.cat([policy.velocity(c)(x[i:i + 1], t[i:i + 1]) for i, c in enumerate(conds)])
    torch.testing.assert_close(policy.velocity(both)(x, t), separate, atol=1e-5, rtol=0)


def test_gradients_flow_through_a_given_module(model_dir):
    policy = load(model_dir)
    wrapped = torch.nn.Module()
    wrapped.inner, wrapped.calls = policy.transformer, 0

    def forward(**kwargs):
        wrapped.calls += 1
        return wrapped.inner(**kwargs)
    wrapped.forward = forward
    v = policy.velocity(policy.embed(PROMPT), transformer=wrapped)
    x = policy.noise(2, torch.Generator().manual_seed(3)).requires_grad_()
    with torch.no_grad(), torch.enable_grad():
        v(x, torch.tensor([0.8, 0.3])).square().mean().backward()
    assert wrapped.calls == 1
    assert x.grad.abs().sum() > 0 and policy.transformer.x_embedder.weight.grad.abs().sum() > 0


def test_prompt_cache_on_disk(model_dir, tmp_path, monkeypatch):
    clip, t5 = CountingLoads(monkeypatch, flux, "CLIPTextModel"), CountingLoads(monkeypatch, flux, "T5EncoderModel")
    cache = tmp_path / "cache"
    policy = load(model_dir, cache_dir=cache)
    assert policy.encode_prompts(["a cat", "a dog", "a cat"]) == 2 and (clip.n, t5.n) == (1, 1)
    assert len(list(cache.glob("*.pt"))) == 2
    assert policy.encode_prompts(["a dog"]) == 0
    a = load(model_dir, cache_dir=cache).embed("a cat")  # a fresh process reads the file
    assert (clip.n, t5.n) == (1, 1)

    # another T5 with other weights but the same config and file sizes: another fingerprint
    other = tmp_path / "other"
    shutil.copytree(model_dir, other)
    tiny_flux.t5_encoder(seed=1).save_pretrained(other / "text_encoder_2")
    policy_b = load(other, cache_dir=cache)
    assert policy_b.fingerprint() != policy.fingerprint()
    b = policy_b.embed("a cat")  # a miss: recomputed, not taken from policy's entry
    assert (clip.n, t5.n) == (2, 2) and not torch.allclose(a.prompt_embeds, b.prompt_embeds)
    torch.testing.assert_close(a.pooled, b.pooled)  # same CLIP

    # an entry of model A under model B's key (e.g. copied caches): refused, never used
    shutil.copy(policy._path(policy._key("a dog")), policy_b._path(policy_b._key("a dog")))
    with pytest.raises(ValueError, match="another text encoder"):
        policy_b.embed("a dog")
    # the max length is part of the key
    load(model_dir, cache_dir=cache, max_sequence_length=8).embed("a cat")
    assert t5.n == 3


def test_prompt_cache_in_memory(model_dir, monkeypatch):
    t5 = CountingLoads(monkeypatch, flux, "T5EncoderModel")
    policy = load(model_dir)
    first = policy.embed("a cat")
    assert t5.n == 1 and torch.equal(policy.embed("a cat").prompt_embeds, first.prompt_embeds) and t5.n == 1
    assert first.prompt_embeds.shape == (1, MAX_LEN, tiny_flux.TEXT_DIM)
    assert first.pooled.shape == (1, tiny_flux.POOLED_DIM)
    with pytest.warns(UserWarning, match="truncated"):
        policy.embed("a big red cat " * 10)  # more than MAX_LEN T5 tokens


def test_fingerprint_samples_large_weight_files(model_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(model_dir, copy)
    shard = copy / "text_encoder_2" / "model-00002-of-00002.safetensors"  # stand-in for a 5 GB shard
    data = bytearray(6 << 20)
    shard.write_bytes(data)

    def fingerprint():
        return flux.FluxPolicy.from_pretrained(copy, height=H, width=W, dtype=torch.float32).fingerprint()
    before = fingerprint()
    data[3 << 20] = 1  # the middle slice is hashed
    shard.write_bytes(data)
    assert fingerprint() != before
    data[3 << 20], data[1 << 20] = 0, 1  # outside the three slices: not seen (the stated limit)
    shard.write_bytes(data)
    assert fingerprint() == before


def test_clear_errors_for_missing_parts(model_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*model_index.json.*text_encoder_2/"):
        flux.FluxPolicy.from_pretrained(tmp_path / "nowhere")
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(FileNotFoundError, match=r"has no text_encoder_2/ subfolder.*save_pretrained"):
        flux.FluxPolicy.from_pretrained(broken)
    shutil.rmtree(broken / "vae")  # model_index.json still names a VAE
    with pytest.raises(FileNotFoundError, match=r"has no vae/ subfolder"):
        flux.FluxPolicy.from_pretrained(broken)
    with pytest.raises(ValueError, match="multiples? of 4"):
        load(model_dir, height=30)


def test_fingerprint_value_is_pinned(tmp_path):
    """FluxPolicy.fingerprint keys every existing prompt cache: its value for a fixed folder must never change
    (small files whole, a 5 MiB one by three 1 MiB slices, other folders than the encoders' ignored).
    fingerprint_files, which it uses, also identifies the weights in evaluate.py's manifest."""
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "text_encoder" / "sub").mkdir(parents=True)
    (tmp_path / "transformer").mkdir()
    (tmp_path / "tokenizer" / "vocab.txt").write_text("a b c\n")
    (tmp_path / "text_encoder" / "config.json").write_text("{}")
    (tmp_path / "text_encoder" / "sub" / "w.bin").write_bytes(bytes(i * 7 % 251 for i in range(5 << 20)))
    (tmp_path / "transformer" / "x.bin").write_bytes(b"not an encoder")
    policy = flux.FluxPolicy.__new__(flux.FluxPolicy)
    policy.root, policy._fingerprint = tmp_path, None
    assert policy.fingerprint() == "a355b7af6857f5696ece2f5570e03c93"


def test_embeddings_are_stored_in_the_precision_they_are_used_in(model_dir, tmp_path):
    """Training under bf16 mixed precision casts the fp32 embeddings to bf16 at the model's input:
    storing them in bf16 halves the cache and changes nothing the model sees."""
    full = load(model_dir, dtype=torch.float32, cache_dir=tmp_path / "fp32").embed("a red house")
    half = load(model_dir, dtype=torch.float32, cache_dir=tmp_path / "bf16", embed_dtype=torch.bfloat16)
    cond = half.embed("a red house")
    assert cond.prompt_embeds.dtype == torch.bfloat16 and full.prompt_embeds.dtype == torch.float32
    assert torch.equal(cond.prompt_embeds, full.prompt_embeds.bfloat16()) and torch.equal(cond.pooled, full.pooled.bfloat16())
    stored = torch.load(next((tmp_path / "bf16").glob("*.pt")), weights_only=True)  # what the disk holds
    assert stored["prompt_embeds"].dtype == stored["pooled"].dtype == torch.bfloat16 and stored["dtype"] == "torch.bfloat16"


def test_the_encoders_precision_is_part_of_the_key(model_dir, tmp_path, monkeypatch):
    """A LoRA run under bf16 runs its text encoders in bf16, a full run in fp32 (its master weights); both store bf16.
    In one run folder (--overwrite keeps the prompt cache) each must get its own embeddings, not the other's."""
    t5 = CountingLoads(monkeypatch, flux, "T5EncoderModel")
    cache = tmp_path / "cache"
    full = load(model_dir, dtype=torch.float32, cache_dir=cache, embed_dtype=torch.bfloat16).embed("a red house")
    lora = load(model_dir, dtype=torch.bfloat16, cache_dir=cache, embed_dtype=torch.bfloat16).embed("a red house")
    fresh = load(model_dir, dtype=torch.bfloat16, embed_dtype=torch.bfloat16).embed("a red house")  # no cache
    assert t5.n == 3 and len(list(cache.glob("*.pt"))) == 2
    assert torch.equal(lora.prompt_embeds, fresh.prompt_embeds) and torch.equal(lora.pooled, fresh.pooled)
    assert not torch.equal(lora.prompt_embeds, full.prompt_embeds)  # the two precisions differ: sharing would show

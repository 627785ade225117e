"""launch/preflight.py: the pre-flight memory estimate, pinned three ways.

  (1) its parameter counts equal the modules' (FluxTransformer2DModel at the tiny config and FLUX.1-dev's on the
      meta device, the LoRA adapters peft adds, the VAE, text encoders and HPS);
  (2) the simulation (bench/scale.py on fake tensors, corrected as tests/preflight_sim.py says): FLUX.1-dev
      itself from the stored fixture tests/preflight_reference.json (`python tests/preflight_sim.py --reference
      tests/preflight_reference.json`, 1.5-3 min of CPU per run: too slow for make test), every phase within 5 %; and
      a simulation run here at FLUX.1-dev's width with 2 double + 3 single blocks (not among the configurations the
      constants were fitted on), within 10 % (the load: or 0.25 GiB; checkpointed training: the estimate may be up
      to 25 % above, never more than 5 % below: with one or two double blocks the simulated peak falls where no
      block is prefetched);
  (3) memory measured on real tensors (FSDPMemTracker, the tiny config of tests/test_scale.py, a gloo world of one),
      every phase within 12 % (checkpointed training: up to 25 % above, 5 % below). At this size (tens of MB) the
      weights, AdamW and the models around the transformer are half of every phase.
  (4) check_fits refuses FLUX.1-dev full fine-tuning on one 80 GB GPU and names what fits; 8 GPUs fit.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))
from launch import preflight as pf  # noqa: E402
import preflight_sim  # noqa: E402

GiB = 2**30
REFERENCE = ROOT / "tests" / "preflight_reference.json"
FLUX_DEV = pf.FLUX_DEV  # black-forest-labs/FLUX.1-dev transformer/config.json
# simulated phase -> (the estimate's phase, the settings that select it)
# (the simulation encodes one prompt: bench/measure.encode)
PHASES = {"encode": ("encode", dict(encode_batch=1)), "rollout": ("rollout", {}),
          "decode": ("decode", {}), "reward": ("reward", {}), "optimizer step": ("optimizer step", {}),
          "train per-k": ("training", dict(rescore_batch=1)), "train one-pass": ("training", dict(rescore_batch=0)),
          "train per-k AC": ("training", dict(rescore_batch=1, activation_checkpointing=True)),
          "train one-pass AC": ("training", dict(rescore_batch=0, activation_checkpointing=True))}
TRAINING = {"per-k": ("train per-k", "optimizer step"), "one pass": ("train one-pass", "optimizer step"),
            "per-k AC": ("train per-k AC", "optimizer step AC"),
            "one pass AC": ("train one-pass AC", "optimizer step AC")}


def compare(sim: dict, cfg: dict, **settings) -> dict:
    """{simulated phase: (estimated bytes, simulated bytes)}, and 'load' when the simulation tracked it."""
    out = {}
    for name, (phase, extra) in PHASES.items():
        est = pf.estimate(cfg, world=sim["world"], lora_rank=sim["lora_rank"], **{**settings, **extra})
        out[name] = (est.total(phase), sim["phases"][name]["peak"])
    if not (sim["lora_rank"] and settings.get("loads_whole_model")):  # bench/scale.py before train.load_model
        # did not track the load under LoRA (its docstring then)
        out["load"] = (pf.estimate(cfg, world=sim["world"], lora_rank=sim["lora_rank"], **settings).total("load"),
                       sim["load_peak"])
    return out


# what a phase adds to what its start holds (the rest was there before it): the estimate's components
BUILT = {"encode": ("text encoders", "activations"),
         "rollout": ("gathered bf16 copy", "rollout results", "activations"), "decode": ("images", "activations"),
         "reward": ("activations",), "optimizer step": ("temporaries",), "training": ("activations", "FSDP buffers")}


def added(sim: dict, cfg: dict, **settings) -> dict:
    """{simulated phase: (bytes the estimate's phase adds, the simulated peak minus the phase's start)}. One pass
    starts without gradients, per k (from its second k on) with them."""
    out = {}
    for name, (phase, extra) in PHASES.items():
        est = pf.estimate(cfg, world=sim["world"], lora_rank=sim["lora_rank"], **{**settings, **extra})
        built = BUILT[phase] + (("gradients",) if "one-pass" in name else ())
        out[name] = (sum(v for k, v in est.phases[phase].items() if k in built),
                     sim["phases"][name]["peak"] - sim["phases"][name]["start"])
    return out


def off(pairs: dict) -> dict:
    return {k: round((e - s) / s, 3) for k, (e, s) in pairs.items()}


# ------------------------------------------------------------------------------------------------ (1) counts
def test_parameter_counts_equal_the_modules():
    import torch
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel
    import open_clip
    import tiny_flux
    from policy.flux import FluxPolicy
    from policy.lora import add_lora
    TARGETS = FluxPolicy.LORA_TARGETS
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    tiny = tiny_flux.transformer()
    cfg = dict(tiny.config)
    assert pf.transformer_params(cfg)["total"] == n(tiny)
    assert pf.transformer_params(cfg)["double"] == n(tiny.transformer_blocks[0])
    assert pf.transformer_params(cfg)["single"] == n(tiny.single_transformer_blocks[0])
    unguided = tiny_flux.transformer(guidance_embeds=False)
    assert pf.transformer_params(dict(cfg, guidance_embeds=False))["total"] == n(unguided)
    assert pf.LORA_TARGETS == TARGETS
    for rank, targets in ((4, TARGETS), (2, ("attn.to_q", "ff.net.2", "proj_out"))):
        t = tiny_flux.transformer()
        assert add_lora(t, rank, 0, targets) == pf.lora_params(cfg, rank, targets)["total"], targets
    with torch.device("meta"):
        flux = FluxTransformer2DModel(**FLUX_DEV)
        assert pf.transformer_params(dict(flux.config))["total"] == n(flux) == 11_901_408_320
        assert pf.FLUX_VAE_PARAMS == n(AutoencoderKL(**pf.FLUX_VAE))
        t5 = T5EncoderModel(T5Config(**pf.T5_XXL))
        assert pf.T5_XXL_PARAMS == n(t5)
        assert pf.T5_XXL_FP32_PARAMS == sum(n(m) for name, m in t5.named_modules()
                                            if name.rsplit(".", 1)[-1] in T5EncoderModel._keep_in_fp32_modules)
        assert pf.CLIP_L_PARAMS == n(CLIPTextModel(CLIPTextConfig(**pf.CLIP_L)))
        assert pf.REWARD_MODELS["hps"][0] == n(open_clip.CLIP(**open_clip.get_model_config("ViT-H-14")))
    runs = json.loads(REFERENCE.read_text())["runs"]  # what the simulation built: FLUX.1-dev and its adapters
    assert runs["world8"]["params"] == 11_901_408_320
    assert runs["world1-lora32"]["trained"] == pf.lora_params(FLUX_DEV, 32)["total"] == 89_653_248


def test_widest_rollout_call_is_what_the_rollout_makes():
    import torch
    import rollout
    from sde import sigma_grid
    for T, M, G, Lambda in ((16, range(8), 12, (1, 2, 3)), (16, range(8), 12, (1, 2)), (8, [0, 5, 6], 3, (1, 4)),
                            (16, range(8), 12, (1,)), (4, [2], 5, (1, 2, 3))):  # the last: one grid for all
        seen = []
        v = lambda x, t: (seen.append(x.shape[0]), torch.zeros_like(x))[1]  # noqa: E731
        rollout.singular_rollout(v, torch.zeros(1, 4), sigma_grid(T), list(M), G, Lambda,
                                 generator=torch.Generator().manual_seed(0))
        assert pf.rollout_rows(T, M, G, Lambda) == max(seen), (T, list(M), G, Lambda)
    assert pf.rollout_rows(16, range(8), 12, (1, 2, 3)) == 36


# ------------------------------------------------------------------------------------------------ (2) simulation
@pytest.mark.parametrize("run", list(json.loads(REFERENCE.read_text())["runs"]))
def test_estimate_matches_the_flux_simulation(run):
    """Every phase within 5 % of the corrected simulation of FLUX.1-dev (the stored fixture; measured: 2 % at most),
    and each training variant's peak (the README's table: W = 8 per k, one pass with and without checkpointing, W = 1
    under LoRA). What each phase adds to its start: within 5 % or 0.5 GiB (measured: 3 %); with checkpointing the
    estimate may be up to 25 % (or 0.75 GiB) above, as it is on few blocks (measured: 4-23 %, 0.1-2.3 GiB)."""
    ref = json.loads(REFERENCE.read_text())
    sim = ref["runs"][run]
    pairs = compare(sim, FLUX_DEV, **sim["assumptions"])
    assert all(abs(e - s) <= 0.05 * s for e, s in pairs.values()), off(pairs)
    grown = added(sim, FLUX_DEV, **sim["assumptions"])
    for name, (e, s) in grown.items():
        low, high = max(0.05 * s, 0.5 * GiB), max((0.25 if name.endswith("AC") else 0.05) * s,
                                                 (0.75 if name.endswith("AC") else 0.5) * GiB)
        assert -low <= e - s <= high, (name, e / GiB, s / GiB, off(grown))
    for variant, (train, step) in TRAINING.items():
        phases = ("encode", "rollout", "decode", "reward", train, step)
        sim_peak = max(sim["phases"][p]["peak"] for p in phases)
        extra = PHASES[train][1]
        est = pf.estimate(FLUX_DEV, world=sim["world"], lora_rank=sim["lora_rank"], encode_batch=1,
                          **sim["assumptions"], **extra)
        est_peak = max(total for phase, total in ((p, est.total(p)) for p in est.phases) if phase != "load")
        assert abs(est_peak - sim_peak) <= 0.05 * sim_peak, (variant, est.line(), sim_peak / GiB)


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """In parallel: the fast simulation at FLUX.1-dev's width (2 + 3 blocks, W = 8) and the tiny config run for real."""
    import os
    tmp = tmp_path_factory.mktemp("preflight")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    jobs = {"fast": ["--world", "8", "--blocks", "2", "3"], "tiny": ["--tiny-real"]}
    procs = {k: subprocess.Popen([sys.executable, preflight_sim.__file__, *argv, "--json", str(tmp / f"{k}.json")],
                                 env=env, stderr=subprocess.PIPE, text=True) for k, argv in jobs.items()}
    out = {}
    for k, p in procs.items():
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        out[k] = json.loads((tmp / f"{k}.json").read_text())
    return out


def test_estimate_matches_a_simulation_at_flux_width(measured):
    sim = measured["fast"]
    cfg = dict(FLUX_DEV, num_layers=2, num_single_layers=3)
    assert sim["params"] == pf.transformer_params(cfg)["total"]
    tiny = dict(vae_params=0, vae_channels=4, reward_models=(("tiny", 0, 4, 0),), text_encoder_params=0)
    pairs = compare(sim, cfg, **tiny, **sim["assumptions"])  # the simulation's tiny VAE, reward and encoders
    del pairs["encode"]  # tiny text encoders (the fixture checks the encoding at FLUX.1-dev scale)
    for name, (e, s) in pairs.items():
        if name.endswith("AC"):
            assert -0.05 * s <= e - s <= 0.25 * s, (name, off(pairs))
        elif name == "load":  # train.load_model's transient (tensor by tensor) is modelled coarsely: 0.25 GiB
            assert abs(e - s) <= max(0.10 * s, 0.25 * GiB), (name, off(pairs))
        else:
            assert abs(e - s) <= 0.10 * s, (name, off(pairs))


# ------------------------------------------------------------------------------------------------ (3) measured
def test_estimate_matches_memory_measured_on_the_tiny_config(measured):
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel
    import scale
    real = measured["tiny"]
    s = scale.tiny_setting(**preflight_sim.TINY)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    with torch.device("meta"):
        vae = n(AutoencoderKL(**s.vae))
        text = n(T5EncoderModel(T5Config(**s.t5))) + n(CLIPTextModel(CLIPTextConfig(**s.clip_text)))
    vision = s.reward.visual  # open_clip: tokens x width of its ViT
    tokens = (s.reward_size // vision.patch_size[0]) ** 2 + 1
    settings = dict(G=s.G, T=s.T, M=s.M, Lambda=s.Lambda, height=s.height, width=s.width, seq_len=s.seq_len,
                    vae_factor=2 ** (len(s.vae["block_out_channels"]) - 1), vae_channels=s.vae["block_out_channels"][0],
                    vae_params=vae, reward_models=(("tiny", n(s.reward), 4, tokens * vision.transformer.width),),
                    text_encoder_params=text)
    pairs = compare(real, s.transformer, **settings, **real["assumptions"])
    for name, (e, s) in pairs.items():  # measured: within 11 %, checkpointed training 8 and 16 % above
        if name.endswith("AC"):
            assert -0.05 * s <= e - s <= 0.25 * s, (name, off(pairs))
        else:
            assert abs(e - s) <= 0.12 * s, (name, off(pairs))


# ------------------------------------------------------------------------------------------------ (4) the verdict
def test_check_fits_refuses_full_fine_tuning_on_one_gpu_and_names_what_fits():
    h100 = 80 * 10**9
    settings = dict(world=1)
    est = pf.estimate(FLUX_DEV, **settings)
    assert est.peak > 190 * 10**9  # fp32 weights, gradients and AdamW alone: 16 B x 11.9 B
    line = pf.check_fits(est, h100)
    assert line is not None and "\n" not in line
    assert line.startswith(f"estimated peak {est.peak / GiB:.1f} GiB per GPU")
    assert "fp32 weights 44.3" in line and "gradients 44.3" in line and "AdamW 88.7" in line
    assert "4 GiB reserve" in line and "74.5 GiB on this GPU" in line
    assert "--lora-rank 32" in line and "8 GPUs (--nproc_per_node 8" in line
    assert "4 GPUs" not in line  # the fewest GPUs that fit, not every count that does
    # every alternative named fits once re-estimated, with the reserve
    assert pf.estimate(FLUX_DEV, world=1, lora_rank=32).peak + 4 * GiB <= h100
    assert pf.estimate(FLUX_DEV, world=8).peak + 4 * GiB <= h100
    assert pf.estimate(FLUX_DEV, world=4).peak + 4 * GiB > h100
    assert pf.check_fits(pf.estimate(FLUX_DEV, world=8), h100) is None  # the paper's setting fits
    assert pf.check_fits(pf.estimate(FLUX_DEV, world=1, lora_rank=32), h100) is None


def test_check_fits_one_pass_suggests_checkpointing_or_per_k():
    h100 = 80 * 10**9
    settings = dict(world=8, rescore_batch=0)
    est = pf.estimate(FLUX_DEV, **settings)
    assert est.peak_phase == "training" and est.peak > 150 * GiB
    line = pf.check_fits(est, h100)
    assert "--activation-checkpointing (" in line and "--rescore-batch 1 (" in line, line
    assert "--lora-rank" not in line  # one change fits: no pair is offered


def test_check_fits_args_reads_train_args():
    import train
    a = train.Args()
    vae = dict(block_out_channels=(128, 256, 512, 512))
    assert pf.settings_from_args(a, 8, FLUX_DEV, vae)["M"] == list(range(8))
    assert pf.check_fits_args(a, 8, FLUX_DEV, 80 * 10**9, vae) is None
    line = pf.check_fits_args(a, 1, FLUX_DEV, 80 * 10**9, vae)
    assert line and "--lora-rank 32" in line
    same = pf.estimate(FLUX_DEV, **pf.settings_from_args(a, 8, FLUX_DEV, vae))
    assert same.phases == pf.estimate(FLUX_DEV, world=8).phases  # Table 4's defaults are estimate()'s

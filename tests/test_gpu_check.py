"""bench/gpu_check.py in its CPU mode (--device cpu --tiny): the numbers it writes, its FLOP counts against
FlopCounterMode on the real tensors, and the PPO ratio at the first update (~25 s of CPU time on 2 cores)."""
import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import gpu_check  # noqa: E402

TINY = ["--device", "cpu", "--tiny", "--peak-tflops", "0.1", "--warmup", "1", "--repeats", "1", "--T", "4",
        "--rollout-batches", "12", "--train-batches", "1,2"]


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    torch.manual_seed(0)
    returned = gpu_check.main(TINY + ["--out", str(out)])
    assert (out / "results.md").read_text().count("\n|") >= 2 + 4 + 2 + 4  # two tables: headers and rows
    return returned, json.loads((out / "results.json").read_text())


def _numbers(x):
    if isinstance(x, dict):
        return [n for v in x.values() for n in _numbers(v)]
    if isinstance(x, list):
        return [n for v in x for n in _numbers(v)]
    return [x] if isinstance(x, (int, float)) and not isinstance(x, bool) else []


def test_json_numbers_finite_and_complete(result):
    _, res = result
    assert all(math.isfinite(n) for n in _numbers(res))
    names = [r["name"] for r in res["rows"]]
    assert names == ["rollout B=12", "train B=1", "train B=2", "train B=2 +AC"]
    for r in res["rows"]:
        for key in ("sec", "flops", "tflops_s", "mfu", "pred_sec", "pred_gib", "full_flops", "full_sec", "full_gib"):
            assert r[key] is not None and r[key] > 0, (r["name"], key)
        assert r["peak_gib"] is None  # the CUDA allocator's peak: not measured on the CPU
    assert len(res["drift"]) == 4


def test_fake_tensor_flops_equal_flop_counter_on_real_tensors(result):
    # the prediction counts FLOPs on fake tensors; the measurement with FlopCounterMode on the real ones
    _, res = result
    for r in res["rows"]:
        assert r["pred_flops"] == r["flops"], r["name"]


def test_attention_is_counted(result):
    # CPU attention needs the formula gpu_check registers: 4 B H (L + S)^2 d per block (QK^T and PV)
    _, res = result
    cfg = res["config"]
    n = res["tokens"] + res["text_len"]
    blocks = cfg["num_layers"] + cfg["num_single_layers"]
    row = res["rows"][0]  # rollout B=12
    attention = row["flops_by_op"]["aten._scaled_dot_product_flash_attention_for_cpu"]
    assert attention == 4 * 12 * cfg["num_attention_heads"] * n**2 * cfg["attention_head_dim"] * blocks


def test_ratio_is_exactly_one_at_batch_1_in_fp32(result):
    # the rollout's old log-prob and rescore's new one come from the same batch-1 forward at x_k with the same
    # weights: bit-identical (also in bf16 on this CPU); batching the |M| states changes the GEMM shapes
    _, res = result
    d = {(x["precision"], x["train_batch"]): x for x in res["drift"]}
    assert d["fp32", 1]["ratio_drift_max"] == 0.0 and d["fp32", 1]["v_max_abs_diff"] == 0.0
    assert d["bf16", 1]["ratio_drift_max"] == 0.0
    assert d["bf16", 2]["ratio_drift_max"] < gpu_check.CLIP_RANGE  # within the clip range: no clipped sample
    assert all(x["clip_frac"] == 0.0 for x in res["drift"])


def test_full_model_extrapolation_is_affine_in_blocks():
    # predict_full from 1 + 1 blocks to 2 + 3 equals counting 2 + 3 blocks directly (FLOPs exactly)
    a = gpu_check.parse_args(["--device", "cpu", "--tiny"])
    dev = torch.device("cpu")
    cfg = dict(gpu_check.TINY, num_layers=1, num_single_layers=1)
    for kind, B in (("train", 2),):
        pred = gpu_check.predict(cfg, dev, kind, B, a)
        via = gpu_check.predict_full(cfg, dev, kind, B, a, False, pred, blocks=(2, 3))
        direct = gpu_check.predict(dict(cfg, num_layers=2, num_single_layers=3), dev, kind, B, a)
        assert via["flops"] == direct["flops"]
        assert via["gib"] == pytest.approx(direct["gib"], rel=0.02)


def test_rescore_batched_equals_rescore_per_k():
    # the one-pass training forward (rescore_groups, stacked: the train rows and Table 2's batch |M|) scores the
    # same log-probs as rollout.rescore, one k at a time (fp64 velocity; sde.log_prob averages in fp32 by design, so
    # a batched mean may round differently from a per-k one: one float32 step, seen on a 2-core x86 CPU)
    from rollout import Group, rescore, rescore_groups
    from sde import sde_step, sigma_grid
    torch.manual_seed(0)
    W = torch.randn(4, 4, dtype=torch.float64) / 2
    v = lambda x, t: x @ W + t.to(x.dtype)[:, None]  # noqa: E731  (B, 4), (B,) -> (B, 4)
    sigmas, G = sigma_grid(8).double(), 3
    groups = []
    for k in range(4):
        x_k = torch.randn(1, 4, dtype=torch.float64)
        x_next, logp, _, _ = sde_step(x_k.expand(G, -1), v(x_k, sigmas[k:k + 1]).expand(G, -1), sigmas[k],
                                      sigmas[k + 1], gpu_check.ETA)
        groups.append(Group(k=k, x_k=x_k, x_next=x_next, log_prob=logp, images={}))
    one_pass = torch.stack(rescore_groups(v, groups, sigmas, gpu_check.ETA))
    per_k = torch.stack([rescore(v, g, sigmas, gpu_check.ETA) for g in groups])
    torch.testing.assert_close(one_pass, per_k, rtol=2e-7, atol=2e-7)
    torch.testing.assert_close(per_k, torch.stack([g.log_prob for g in groups]), rtol=2e-7, atol=2e-7)


def test_bad_input_is_one_line(capsys):
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--rollout-batches", "1,x"])
    assert "comma-separated integers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--train-batches", "1,16", "--T", "16"])
    assert "train batches must be <= |M|" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA GPU"):
            gpu_check.resolve_device("cuda")
    with pytest.raises(SystemExit, match="unknown device"):
        gpu_check.resolve_device("gpu0")


def test_cpu_attention_formulas_are_the_gpu_kernels():
    # gpu_check counts CPU attention with its own copy of torch's formulas for the GPU kernels (a FlopCounterMode
    # custom_mapping, public): they must stay equal to torch's
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count
    for b, h, s_q, s_k, d_q, d_v in ((12, 2, 96, 96, 16, 16), (3, 24, 2537, 512, 128, 64)):
        q, k, v, out = (b, h, s_q, d_q), (b, h, s_k, d_q), (b, h, s_k, d_v), (b, h, s_q, d_v)
        assert gpu_check._attention(q, k, v) == sdpa_flop_count(q, k, v)
        assert gpu_check._attention_backward(out, q, k, v) == sdpa_backward_flop_count(out, q, k, v)


def test_live_bytes_counts_each_storage_once_until_it_is_freed():
    live = gpu_check.LiveBytes()
    with live:
        x = torch.ones(1000)  # 4000 bytes
        y = x.view(10, 100)  # the same storage
        z = x * 2  # 8000 live
        del x, y, z
        w = torch.ones(500)  # 2000 live
    assert (live.peak, live.live) == (8000, 2000)
    del w
    assert live.live == 0

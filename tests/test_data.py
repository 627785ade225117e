"""The prompt stream (data/prompts.py) and the run folder's rules (report/run_folder.py)."""
import json

import numpy as np
import pytest

from data.prompts import PromptSampler, future_prompts, read_prompts
from launch import run_folder
from report.figures import moving_mean


def test_future_prompts_are_exactly_what_the_sampler_will_hand_out():
    prompts = [f"p{i}" for i in range(7)]
    for rank in (0, 1):
        s = PromptSampler(prompts, seed=3, rank=rank, world=2, per_rank=2)
        s.next()  # a resumed run: the position is not 0
        predicted = future_prompts(s, 5)
        seen = [p for _ in range(5) for _, p in s.next()]
        assert predicted == list(dict.fromkeys(seen)) and s.position == 2 * 2 * 6
    assert set(future_prompts(PromptSampler(prompts, 3, 0, 1, 1), 2)) < set(prompts)  # not the whole file


def test_read_prompts_strips_and_drops_blank_lines(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("  a cat \n\n\t\nthe dog\n", encoding="utf-8")
    assert read_prompts(f) == ["a cat", "the dog"]


def test_moving_mean_uses_full_windows_only():
    y = np.arange(12.0)
    assert np.allclose(moving_mean(y), [4.5, 5.5, 6.5]) and len(moving_mean(y[:9])) == 0


def test_resume_compares_the_defining_settings(tmp_path):
    (tmp_path / "args.json").write_text(json.dumps({"G": 12, "lr": 2e-6, "Lambda": [1, 2, 3], "iterations": 300}))
    same = {"G": 12, "lr": 2e-6, "Lambda": (1, 2, 3), "iterations": 600}  # more iterations: allowed
    assert run_folder.ownership_errors(tmp_path, same, resume=True, overwrite=False) == []
    errs = run_folder.ownership_errors(tmp_path, {**same, "Lambda": (1,)}, resume=True, overwrite=False)
    assert len(errs) == 1 and "Lambda [1, 2, 3] -> (1,)" in errs[0]
    assert "holds a run" in run_folder.ownership_errors(tmp_path, same, resume=False, overwrite=False)[0]
    assert run_folder.ownership_errors(tmp_path, same, resume=False, overwrite=True) == []
    assert "contradict" in run_folder.ownership_errors(tmp_path, same, resume=True, overwrite=True)[0]


@pytest.mark.parametrize("damage,why", [("nothing", ""), ("state", "no state.json"), ("rng", "rng_1.pt is missing"),
                                        ("tmp", "unfinished")])
def test_checkpoint_problems_are_found_from_the_files(tmp_path, damage, why):
    import torch
    import torch.distributed.checkpoint as dcp
    ckpt = tmp_path / ("ckpt_000002.tmp" if damage == "tmp" else "ckpt_000002")
    dcp.save({"w": torch.arange(10.0)}, checkpoint_id=str(ckpt), no_dist=True)
    for r in range(2):
        torch.save({"torch": torch.get_rng_state(), "numpy": None, "python": None, "cuda": None}, ckpt / f"rng_{r}.pt")
    (ckpt / "state.json").write_text(json.dumps({"iteration": 2, "sampler": 4, "world_size": 2}))
    if damage == "state":
        (ckpt / "state.json").unlink()
    if damage == "rng":
        (ckpt / "rng_1.pt").unlink()
    assert (why in run_folder.problems(ckpt)) and (run_folder.problems(ckpt) == "") == (damage == "nothing")
    shard = next(ckpt.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:20])
    assert "truncated" in run_folder.problems(ckpt) or damage != "nothing"

"""train.py's pre-flight (launch.preflight.will_it_fit): on a GPU, before any weight is read, a run
that cannot fit stops in one line that says what would; one that fits prints its estimate. The GPU is simulated
(its memory size), the model is FLUX.1-dev's released configs (only config.json files: nothing is loaded)."""
import json
from types import SimpleNamespace

import pytest
import torch

import train
from launch.preflight import will_it_fit
from launch.preflight import FLUX_DEV, FLUX_VAE


@pytest.fixture()
def flux_folder(tmp_path):
    for part, cfg in (("transformer", FLUX_DEV), ("vae", FLUX_VAE)):
        (tmp_path / "flux" / part).mkdir(parents=True)
        (tmp_path / "flux" / part / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "flux" / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    return tmp_path / "flux"


def test_full_fine_tuning_on_one_80gb_gpu_is_refused_with_what_fits(one_rank_group, flux_folder, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=80 * 10**9))
    a = train.parse_args(["--model", str(flux_folder), "--prompts", "p.txt"])
    with pytest.raises(SystemExit) as e:
        will_it_fit(a, 1, torch.device("cuda", 0), True)
    line = str(e.value)
    assert "\n" not in line and line.startswith("train.py: will not fit: estimated peak")
    assert "--lora-rank 32" in line and "--nproc_per_node 8" in line and "--no-preflight" in line


def test_lora_on_one_gpu_and_eight_gpus_full_fit(flux_folder, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=80 * 10**9))
    for argv, world in ((["--lora-rank", "32", "--lora-alpha", "64"], 1), ([], 8)):
        a = train.parse_args(["--model", str(flux_folder), "--prompts", "p.txt", *argv])
        will_it_fit(a, world, torch.device("cuda", 0), True)
        assert capsys.readouterr().out.startswith("pre-flight: estimated peak")


def test_the_cpu_has_no_budget_to_check(flux_folder):
    a = train.parse_args(["--model", str(flux_folder), "--prompts", "p.txt"])
    will_it_fit(a, 1, torch.device("cpu"), True)  # returns: nothing to check, no GPU properties asked

"""Stable Diffusion 3.5 and Qwen-Image through the real train.py and evaluate.py (policy/families.py).

One tiny folder per family, written by its pipeline's own save_pretrained (tests/tiny_sd3.py, tests/tiny_qwen_image.py),
shared by every test here. Each family: a LoRA run of 2 iterations on 2 gloo ranks (FSDP2, bf16, classifier-free
guidance), checkpointed after each; the same killed after checkpoint 1 and resumed; evaluate.py on its export; the
export read by the family's own pipeline (load_lora_weights); a full fine-tuning export read by the pipeline. The
parity of each policy with its pipeline is in tests/test_sd3.py and tests/test_qwen_image.py.
"""
import hashlib
import importlib
import json
import re
from pathlib import Path

import pytest
import torch

from test_train import finished, launch, metrics, resumed_copy

FAMILIES = {  # family: (tiny builder module, its save function, the pipeline class)
    "sd3": ("tiny_sd3", "save_tiny_sd3", "StableDiffusion3Pipeline"),
    "qwen_image": ("tiny_qwen_image", "save_tiny_qwen_image", "QwenImagePipeline"),
}
PROMPTS = ["a photo of a red cat", "a small blue house", "a big green tree in the sky", "a dog on the house"]
FLAGS = ["--reward", "toy-clean", "--G", "3", "--Lambda", "1", "2", "--T", "3", "--sde-steps", "0", "1", "--lr", "1e-2",
         "--mixed-precision", "bf16", "--lora-rank", "4", "--checkpoint-every", "1", "--keep-checkpoints", "3"]
SIZE = 32


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{family: (tiny model folder, prompt file)}: each written by its pipeline's save_pretrained, plus g2rpo.json."""
    tmp = tmp_path_factory.mktemp("families")
    prompts = tmp / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = {}
    for family, (module, save, _) in FAMILIES.items():
        folder = tmp / family
        getattr(importlib.import_module(module), save)(folder)
        (folder / "g2rpo.json").write_text(json.dumps({"height": SIZE, "width": SIZE, "max_sequence_length": 16}))
        out[family] = (folder, prompts)
    return out


@pytest.fixture(scope="module")
def runs(folders, tmp_path_factory):
    """{family: {"straight", "resumed", "stdout"}}: both families' runs side by side, then both resumes."""
    tmp = tmp_path_factory.mktemp("family_runs")
    procs = {f: launch(2, tmp / f"{f}-straight", folders[f], FLAGS + ["--iterations", "2"], wait=False)
             for f in FAMILIES}
    done = {f: finished(p) for f, p in procs.items()}
    resumed = {f: resumed_copy(tmp / f"{f}-straight", tmp / f"{f}-resumed", at=1) for f in FAMILIES}
    procs = {f: launch(2, resumed[f], folders[f], FLAGS + ["--iterations", "2", "--resume"], wait=False)
             for f in FAMILIES}
    for p in procs.values():
        finished(p)
    return {f: {"straight": tmp / f"{f}-straight", "resumed": resumed[f], "stdout": done[f].stdout} for f in FAMILIES}


def digests(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("family", FAMILIES)
def test_two_ranks_train_the_guided_policy(runs, family):
    """2 iterations on 2 ranks: every update lands, the first re-scoring is the rollout's own policy, the start-up line
    counts the guided evaluations twice, and the adapters moved."""
    r = runs[family]
    assert "world size 2" in r["stdout"] and "x2 transformer rows: classifier-free guidance" in r["stdout"]
    m = metrics(r["straight"])
    assert [x["iteration"] for x in m] == [1, 2] and all(x["optimizer_steps"] == 1 for x in m)
    assert all(torch.isfinite(torch.tensor(x["loss"])) for x in m)
    assert m[0]["ratio_drift_max"] < 1e-3  # bf16: the rollout's and the update's forwards agree to rounding
    from safetensors.torch import load_file
    adapter = load_file(str(r["straight"] / "final" / "pytorch_lora_weights.safetensors"))
    assert adapter and any(v.abs().max() > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at 0


@pytest.mark.parametrize("family", FAMILIES)
def test_resume_is_exact(runs, family):
    """Killed after checkpoint 1 and resumed: the export has the same bytes, the logs the same numbers."""
    r = runs[family]
    assert digests(r["resumed"] / "final") == digests(r["straight"] / "final")
    strip = lambda rec: {k: v for k, v in rec.items() if not k.startswith("sec_") and k != "peak_mem_gb"}  # noqa: E731
    assert [strip(x) for x in metrics(r["resumed"])] == [strip(x) for x in metrics(r["straight"])]


@pytest.mark.parametrize("family", FAMILIES)
def test_the_pipeline_reads_the_adapter(runs, folders, family):
    """The exported adapter, loaded by the family's own pipeline (load_lora_weights), gives the transformer our policy
    trained (policy.lora.load_lora onto the base), and it is not the base."""
    import diffusers
    from policy.families import family_of
    from policy.lora import load_lora
    folder, _ = folders[family]
    final = runs[family]["straight"] / "final"
    pipe = getattr(diffusers, FAMILIES[family][2]).from_pretrained(folder, dtype=torch.float32)
    pipe.load_lora_weights(final)
    policy = family_of(folder).from_pretrained(folder, dtype=torch.float32)
    cond = policy.embed(PROMPTS[0])
    x = policy.noise(2, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.9, 0.4])
    with torch.no_grad():
        base = policy.forward(policy.transformer, x, t, policy.collate([(cond, 2)]))
        load_lora(policy.transformer, final)
        ours = policy.forward(policy.transformer, x, t, policy.collate([(cond, 2)]))
        theirs = policy.forward(pipe.transformer, x, t, policy.collate([(cond, 2)]))
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-6)
    assert (ours - base).abs().max() > 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_evaluate_reads_the_export(runs, folders, family, tmp_path):
    """evaluate.py on the LoRA export (base + adapter, named by its lora.json): images and finite scores."""
    import evaluate
    _, prompts = folders[family]
    out = tmp_path / "eval"
    (run, results), = evaluate.main(["--model", str(runs[family]["straight"] / "final"), "--prompts", str(prompts),
                                     "--metrics", "toy-clean", "--steps", "2", "--out", str(out), "--device", "cpu"])
    assert len(list((run / "images").glob("*.png"))) == len(PROMPTS)
    assert torch.isfinite(torch.tensor(results["metrics"]["toy-clean"]["mean"]))


@pytest.mark.parametrize("family", FAMILIES)
def test_a_full_export_is_a_folder_its_pipeline_loads(folders, family, tmp_path):
    """policy.weights.save_model_folder with the family's transformer class: the pipeline loads the folder, and its
    transformer holds the weights written."""
    import diffusers
    from policy.families import family_of
    from policy.weights import save_model_folder
    folder, _ = folders[family]
    cls = family_of(folder).TRANSFORMER
    t = cls.from_pretrained(folder / "transformer")
    with torch.no_grad():
        for p in t.parameters():
            p.add_(0.01)
    save_model_folder(tmp_path / "final", t.state_dict(), t.config, folder, cls)
    pipe = getattr(diffusers, FAMILIES[family][2]).from_pretrained(tmp_path / "final", dtype=torch.float32)
    for (k, a), (_, b) in zip(sorted(t.state_dict().items()), sorted(pipe.transformer.state_dict().items())):
        assert torch.equal(a, b), k


def test_an_unsupported_family_is_one_line_naming_those_that_are(tmp_path):
    """A folder of another pipeline: refused before any work, the supported pipelines named."""
    from launch.arguments import model_errors
    import train
    (tmp_path / "transformer").mkdir()
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    errors = model_errors(train.Args(model=str(tmp_path)))
    assert len(errors) == 1 and "StableDiffusionXLPipeline" in errors[0], errors
    for name in ("FluxPipeline", "StableDiffusion3Pipeline", "QwenImagePipeline"):
        assert name in errors[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_missing_part_is_named(folders, family, tmp_path):
    """The folder's parts come from its family: a missing text encoder is named, with the layout expected."""
    import shutil
    from policy.families import family_of, folder_problem
    folder, _ = folders[family]
    copy = tmp_path / "model"
    shutil.copytree(folder, copy, symlinks=True)
    part = family_of(folder).ENCODER_PARTS[-1]
    shutil.rmtree(copy / part)
    assert f"has no {part}/ subfolder" in folder_problem(copy), folder_problem(copy)
    assert folder_problem(folder) == ""



@pytest.mark.parametrize("family", FAMILIES)
def test_a_text_length_beyond_the_encoder_is_refused(folders, family):
    """max_sequence_length is checked once, by the interface, against the family's MAX_SEQUENCE_LENGTH."""
    from policy.families import family_of
    folder, _ = folders[family]
    cls = family_of(folder)
    with pytest.raises(ValueError, match=rf"max_sequence_length \d+ .*must be in \[1, {cls.MAX_SEQUENCE_LENGTH}\]"):
        cls.from_pretrained(folder, dtype=torch.float32, max_sequence_length=cls.MAX_SEQUENCE_LENGTH + 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_bad_g2rpo_json_stops_train_and_evaluate_before_any_weight_is_read(folders, family, tmp_path, monkeypatch):
    """The options a folder's g2rpo.json sets are checked from the configs (Policy.options), by train.py's and
    evaluate.py's argument checks and by from_pretrained before it reads the transformer."""
    import evaluate
    import train
    from launch import eval_models
    from launch.arguments import model_errors
    from policy.families import family_of
    folder, _ = folders[family]
    cls, copy = family_of(folder), tmp_path / "model"
    copy.mkdir()
    for part in folder.iterdir():  # the same model (linked), its own g2rpo.json
        if part.name != "g2rpo.json":
            (copy / part.name).symlink_to(part)
    m, top = cls.size_multiple(folder), cls.MAX_SEQUENCE_LENGTH
    ok = {"height": SIZE, "width": SIZE}  # the tiny model's size (the families' defaults exceed tiny SD3's table)
    cases = {  # g2rpo.json -> what the error names
        json.dumps({**ok, "height": SIZE + m // 2}): rf"height {SIZE + m // 2} \(.*g2rpo.json\): must be a positive "
                                                     rf"multiple of {m}",
        json.dumps({**ok, "max_sequence_length": top + 1}): rf"max_sequence_length {top + 1} \(.*g2rpo.json\).*"
                                                            rf"\[1, {top}\]",
        json.dumps({**ok, "guidance": -1}): r"guidance -1 \(.*g2rpo.json\): must be a finite number >= 0",
        json.dumps({**ok, "hieght": SIZE}): r"g2rpo.json must be a JSON object with some of height, width.*'hieght'",
        "{height: 32}": r"g2rpo.json is not JSON",
    }
    if limit := cls.max_size(folder):  # SD3: its position table (12 cells of 2x2 patches in the tiny one: 48 px)
        cases[json.dumps({**ok, "width": limit + m})] = rf"width {limit + m} \(.*g2rpo.json\): must be at most {limit}"
    import policy.weights  # from_pretrained imports it when called
    monkeypatch.setattr(policy.weights, "load_transformer", lambda *a, **k: pytest.fail("weights read"))
    for text, pattern in cases.items():
        (copy / "g2rpo.json").write_text(text)
        errors = model_errors(train.Args(model=str(copy)))
        assert len(errors) == 1 and re.search(pattern, errors[0]), (text, errors)
        ref = eval_models.ModelRef(name="m", folder=copy)
        assert re.search(pattern, eval_models.size_errors(evaluate.Args(), [ref]) or ""), text
        with pytest.raises(ValueError, match=pattern):
            cls.from_pretrained(copy, dtype=torch.float32)
    (copy / "g2rpo.json").write_text(json.dumps({**ok, "height": SIZE + m // 2}))  # a flag overrides the file
    assert model_errors(train.Args(model=str(copy), height=SIZE)) == []
    assert cls.options(copy, height=SIZE)["height"] == SIZE

"""The README's copy-out example runs from the four equation files alone, flat and as a package."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORE = ("sde.py", "rollout.py", "advantage.py", "loss.py")


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- copy-example -->\n```python\n(.*?)```\n<!-- /copy-example -->", text, re.S)
    assert m, "README.md lost its copy-example block"
    return m.group(1)


def run(folder: Path, code: str) -> str:
    (folder / "example.py").write_text(code)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # only the copied files are importable
    r = subprocess.run([sys.executable, "example.py"], cwd=folder, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_readme_example_runs_from_the_four_files_flat_and_as_a_package(tmp_path):
    code = readme_example()
    flat, pkg = tmp_path / "flat", tmp_path / "pkg" / "g2rpo_core"
    for folder in (flat, pkg):
        folder.mkdir(parents=True)
        for name in CORE:
            shutil.copy(ROOT / name, folder / name)
    (pkg / "__init__.py").write_text("")
    out_flat = run(flat, code)
    as_pkg = re.sub(r"^from (sde|rollout|advantage|loss) import", r"from g2rpo_core.\1 import", code, flags=re.M)
    assert as_pkg.count("from g2rpo_core.") == 4
    out_pkg = run(pkg.parent, as_pkg)
    grad = [float(x) for x in re.findall(r"-?\d+\.\d+(?:e-?\d+)?", out_flat)]
    assert out_flat == out_pkg and len(grad) == 4 and any(abs(g) > 1e-4 for g in grad)  # a real gradient


def test_the_four_files_import_nothing_but_torch_and_each_other():
    allowed = {"torch", "math", "dataclasses", "typing"} | {n[:-3] for n in CORE}
    for name in CORE:
        src = (ROOT / name).read_text()
        mods = set(re.findall(r"^\s*(?:from|import) \.?(\w+)", src, re.M))
        assert mods <= allowed, (name, mods - allowed)


FAMILY = """
import torch
from policy.sd3 import SD3Policy
from sde import sigma_grid
from rollout import rescore, singular_rollout, stack_images
from advantage import mixed_advantage
from loss import g2rpo_loss

policy = SD3Policy.from_pretrained("model", dtype=torch.float32, height=32, width=32)  # its pipeline's folder
v = policy.velocity(policy.embed("a red cat"))  # the guided velocity of one prompt: v(x, t)
sigmas = policy.sigmas(T=4)
x_T = policy.noise(1, torch.Generator().manual_seed(0))
ro = singular_rollout(v, x_T, sigmas, M=[0, 1], G=3, Lambda=(1, 2), generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    images = policy.decode(stack_images(ro).flatten(0, 2))  # (|Lambda| |M| G, 3, H, W)
R = images.mean((1, 2, 3)).reshape(1, 2, 2, 3)  # a stand-in reward: brightness
A = mixed_advantage(R)
for j, group in enumerate(ro.groups):
    logp = rescore(v, group, sigmas, eta=0.7)
    loss, _ = g2rpo_loss(logp, group.log_prob, A[j], clip_range=1e-4)
    (loss / len(ro.groups)).backward()
print(sum(p.grad.abs().sum() for p in policy.transformer.parameters() if p.grad is not None).item())
"""


def test_one_update_of_a_family_from_the_copied_files(tmp_path):
    """The README's claim for one's own model: the four equation files, policy/interface.py and one family file (with
    policy/weights.py to load from a folder, report/files.py for a disk cache) copied out, one G2RPO update of a tiny
    Stable Diffusion 3.5 runs there and reaches the transformer's weights."""
    from tiny_sd3 import save_tiny_sd3
    for name in CORE + ("policy/interface.py", "policy/weights.py", "policy/sd3.py", "report/files.py"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        shutil.copy(ROOT / name, tmp_path / name)
    save_tiny_sd3(tmp_path / "model")
    grad = float(run(tmp_path, FAMILY).split()[-1])
    assert grad > 0

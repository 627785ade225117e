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

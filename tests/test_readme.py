"""README.md stays true to the tree: the layout table lists every module with its real line count."""
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def layout_rows():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- layout -->\n(.*?)<!-- /layout -->", text, re.S)
    assert block, "README.md lost its layout table"
    return re.findall(r"^\| `([^`]+)` \| (.*?) \| (\d+) \|$", block.group(1), re.M)


def modules():
    """Every Python file of the project that is not a test (tracked by git, or on disk outside git)."""
    try:
        files = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True,
                               check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        files = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py")]
    return sorted(f for f in files if not f.startswith("tests/") and (ROOT / f).is_file())


def test_layout_table_lists_every_module_with_its_line_count():
    rows = layout_rows()
    listed = {path: int(n) for path, _, n in rows}
    real = {f: (ROOT / f).read_text().count("\n") for f in modules()}
    wrong = {f: (listed.get(f), n) for f, n in real.items() if listed.get(f) != n}
    extra = set(listed) - set(real)
    assert not wrong and not extra, (
        f"README layout table out of date (file: (README, real)): {wrong}; listed but absent: {sorted(extra)}. "
        "Regenerate the counts with: python tests/test_readme.py")


if __name__ == "__main__":  # rewrite the counts in place
    text = (ROOT / "README.md").read_text()
    for path, concept, n in layout_rows():
        real = (ROOT / path).read_text().count("\n")
        text = text.replace(f"| `{path}` | {concept} | {n} |", f"| `{path}` | {concept} | {real} |")
    (ROOT / "README.md").write_text(text)

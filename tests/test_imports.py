"""The house's import graph (README, "The layout"): the supporting folders never import the scripts that use them
(train.py, evaluate.py), and no chain of imports between folders comes back to where it started. Read from the
source (every import statement, those inside functions included, and importlib.import_module of a literal name), so
a new line that closes a loop fails here."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = sorted(p.name for p in ROOT.iterdir() if p.is_dir() and any(p.glob("*.py")) and p.name not in ("tests", "bench"))
SCRIPTS = ("train", "evaluate")


def imported(path: Path) -> set:
    """The first part of every module `path` imports (relative imports are its own folder)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add(path.parent.name if node.level else node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module" and node.args \
                and isinstance(node.args[0], ast.Constant):  # importlib.import_module("toy.rewards")
            names.add(node.args[0].value.split(".")[0])
    return names


def folder_graph() -> dict:
    """folder -> the other folders and top-level modules its files import."""
    tops = {p.stem for p in ROOT.glob("*.py")}
    return {f: {n for p in (ROOT / f).glob("*.py") for n in imported(p) if n != f and (n in FOLDERS or n in tops)}
            for f in FOLDERS}


def cycles(graph: dict) -> list:
    found, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"
    for f in sorted(graph):
        if f not in state:
            visit(f, [f])
    return found


def test_no_folder_imports_the_scripts():
    graph = folder_graph()
    assert {f: graph[f] & set(SCRIPTS) for f in graph if graph[f] & set(SCRIPTS)} == {}


def test_no_loop_ties_folders():
    assert cycles(folder_graph()) == []


def test_the_check_sees_a_loop():
    assert cycles({"report": {"rewards"}, "rewards": {"toy"}, "toy": {"report"}}) == [["report", "rewards", "toy",
                                                                                        "report"]]

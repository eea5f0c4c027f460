"""The package's architecture, checked: imports point only down the layer list (module- and function-level
imports counted), there is no import cycle, and the cheap entry points load no model stack."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
# Each layer may import itself and the layers before it, never one after it. Nothing imports cli.
LAYERS = [
    {"lmlab", "lmlab.errors", "lmlab.console", "lmlab.environment"},  # leaves
    {"lmlab.recipe"}, {"lmlab.workspace"}, {"lmlab.data"}, {"lmlab.models"}, {"lmlab.tasks"}, {"lmlab.training"},
    {"lmlab.generation"}, {"lmlab.evaluation"}, {"lmlab.export"}, {"lmlab.serve"}, {"lmlab.analysis"},
    {"lmlab.cli", "lmlab.__main__"},
]
HEAVY = ("torch", "transformers", "accelerate", "peft", "mlflow", "fsspec", "s3fs", "botocore")  # + object storage


def modules() -> dict[str, Path]:
    found = {}
    for f in (SRC / "lmlab").rglob("*.py"):
        rel = f.relative_to(SRC).with_suffix("")
        found[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = f
    return found


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """lmlab modules `name` imports anywhere in its body (functions included, TYPE_CHECKING blocks not).
    `from pkg import sub` counts as importing the submodule `pkg.sub` (and not pkg's __init__)."""
    tree = ast.parse(path.read_text())
    skip = {id(c) for n in ast.walk(tree) if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test)
            for c in ast.walk(n)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
            targets = subs if len(subs) == len(node.names) else [base]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t.startswith("lmlab") and t != name:
                out.add(t)
    return out


def layer(module: str) -> int:
    for i, group in enumerate(LAYERS):
        if any(module == g or (g != "lmlab" and module.startswith(g + ".")) for g in group):
            return i
    raise AssertionError(f"{module} is in no layer: put it in a package of the layer list (or add it)")


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def test_every_import_points_down_the_layer_list():
    upward = [f"{m} (layer {layer(m)}) imports {d} (layer {layer(d)})"
              for m, deps in import_graph().items() for d in sorted(deps) if layer(d) > layer(m)]
    assert not upward, "imports pointing up the layers:\n" + "\n".join(upward)


def test_no_import_cycles():
    graph = import_graph()
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def strong(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            strong(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_checker_sees_a_cycle_and_an_upward_import(tmp_path, monkeypatch):
    """The two tests above can fail: a planted recipe → cli import is both upward and, with cli → recipe, a cycle."""
    pkg = tmp_path / "lmlab"
    (pkg / "recipe").mkdir(parents=True)
    (pkg / "cli").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "recipe" / "__init__.py").write_text("def f():\n    from lmlab.cli import main\n")
    (pkg / "cli" / "__init__.py").write_text("from lmlab.recipe import f\ndef main():\n    pass\n")
    monkeypatch.setattr(sys.modules[__name__], "SRC", tmp_path)
    with pytest.raises(AssertionError, match="lmlab.recipe .layer 1. imports lmlab.cli"):
        test_every_import_points_down_the_layer_list()
    with pytest.raises(AssertionError, match="import cycles"):
        test_no_import_cycles()


@pytest.mark.parametrize("statement", ["import lmlab.recipe", "import lmlab.cli", "import lmlab",
                                       "import lmlab.workspace.runs", "import lmlab.analysis.diff",
                                       "import lmlab.workspace.storage", "import lmlab.workspace.mirror"])
def test_light_imports_load_no_model_stack(statement):
    code = f"import sys; {statement}; print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert loaded == [], f"`{statement}` loads {loaded}"


def test_the_public_api_loads_on_first_use():
    code = ("import sys, lmlab; assert 'torch' not in sys.modules; from lmlab import load_recipe, train; "
            "assert 'torch' in sys.modules and callable(train) and train.__module__ == 'lmlab.training.loop'; "
            "import lmlab.training.loop; from lmlab import train as again; assert again is train; print('ok')")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "ok"

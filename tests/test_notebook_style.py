"""Structural rules of the notebooks that nbdev's docs build relies on (cheap; no execution).

nbdev re-executes, when it builds the docs, every cell that contains an import. A cell that mixes imports with
other code (training, plotting) would be re-run there and fail or take long; STYLE.md asks for imports in their
own cells. `show_doc` cells hold only that call.
"""
import ast
import json
from pathlib import Path

import pytest

NBS = Path(__file__).resolve().parents[1] / "nbs"
NOTEBOOKS = sorted(p for p in NBS.glob("*.ipynb") if not p.name.startswith("_"))
DIRECTIVES_EXECUTED_ANYWAY = {"export", "exports", "exporti", "exec_doc"}


def code_cells(nb):
    for i, cell in enumerate(json.loads(nb.read_text())["cells"]):
        if cell["cell_type"] == "code":
            yield i, "".join(cell["source"])


def directives(src):
    return {l.strip()[2:].strip().split(":")[0].split()[0] for l in src.splitlines()
            if l.strip().startswith("#|") and l.strip()[2:].strip()}


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_imports_are_not_mixed_with_other_code(nb):
    bad = []
    for i, src in code_cells(nb):
        if directives(src) & DIRECTIVES_EXECUTED_ANYWAY:  # definitions: run in the docs build anyway
            continue
        try:
            tree = ast.parse("\n".join(l for l in src.splitlines() if not l.lstrip().startswith(("%", "!"))))
        except SyntaxError:
            continue
        kinds = [isinstance(n, (ast.Import, ast.ImportFrom)) for n in tree.body]
        nested = any(isinstance(n, (ast.Import, ast.ImportFrom)) for top in tree.body
                     if not isinstance(top, (ast.Import, ast.ImportFrom)) for n in ast.walk(top))
        if (any(kinds) and not all(kinds)) or nested:
            bad.append(f"cell {i}: {src.splitlines()[0][:60]!r}")
    assert not bad, f"{nb.name}: cells mixing imports with other code (split them): {bad}"


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_no_committed_outputs(nb):
    cells = json.loads(nb.read_text())["cells"]
    assert not [i for i, c in enumerate(cells) if c.get("outputs")], f"{nb.name} has committed outputs"

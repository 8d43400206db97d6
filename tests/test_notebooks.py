"""Every notebook in nbs/ is an executable test: run it through papermill with its default parameters.

The executed copies go to runs/test-notebooks/ (git-ignored), never back into nbs/.
"""
import json
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / "nbs"
OUT = ROOT / "runs" / "test-notebooks"
NOTEBOOKS = sorted(p for p in NBS.glob("*.ipynb") if not p.name.startswith("_"))


def kernel_name() -> str:
    "The project's kernel (installed by `make install`), else the default python3 kernel."
    from jupyter_client.kernelspec import KernelSpecManager
    return "scdeep_nb" if "scdeep_nb" in KernelSpecManager().find_kernel_specs() else "python3"


def parameter_cells(path: Path) -> int:
    cells = json.loads(path.read_text())["cells"]
    return sum("parameters" in c.get("metadata", {}).get("tags", []) for c in cells)


def test_notebooks_found():
    assert len(NOTEBOOKS) >= 10, [p.name for p in NOTEBOOKS]


@pytest.mark.parametrize("nb", [p for p in NOTEBOOKS if p.name != "index.ipynb"], ids=lambda p: p.stem)
def test_has_one_parameters_cell(nb):
    assert parameter_cells(nb) == 1, f"{nb.name} must have exactly one cell tagged 'parameters'"


@pytest.mark.notebooks
@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(nb):
    import papermill as pm
    OUT.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    pm.execute_notebook(str(nb), str(OUT / nb.name), kernel_name=kernel_name(), cwd=str(NBS),
                        progress_bar=False, execution_timeout=600)
    print(f"{nb.name}: {time.perf_counter() - t0:.1f}s")

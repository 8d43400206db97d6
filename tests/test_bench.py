"""Tests of the benchmark runner `scdeep_nb.bench`: grid expansion, resume (finished runs skipped), the collected
table, a failing notebook or a failing method recorded instead of stopping the benchmark, the command line, and the
shipped configs (smoke, cpu) valid against the task notebooks."""
import json
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest

from scdeep_nb import bench
from scdeep_nb.base import REGISTRY

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / "nbs"

# A stand-in task notebook (no training and no heavy imports: the runner is what is tested). It writes a
# results.csv with the benchmark's columns; `fail=True` makes the whole notebook fail.
STUB_SOURCE = [
    ("code", "import csv, os", []),
    ("code", "dataset = 'd'\nseeds = [0]\nscale = 1.0\nfail = False\noutput_dir = None\ndevice = 'cpu'\n"
             "cache_dir = None", ["parameters"]),
    ("code", "if fail:\n    raise RuntimeError('this notebook fails on purpose')\n"
             f"columns = {bench.COLUMNS!r}\n"
             "rows = [dict(task='toy', dataset=dataset, method=m, kind=k, metric='ari', value=v * scale,\n"
             "             higher_is_better=True, seed=s, setting='default', default_setting=True, params='{}',\n"
             "             runtime_s=0.1, peak_memory_mb=1.0, status='ok', error='')\n"
             "        for s in seeds for m, k, v in (('pca+leiden', 'classical', 0.5), ('dca+leiden', 'deep', 0.7))]\n"
             "with open(os.path.join(output_dir, 'results.csv'), 'w', newline='') as f:\n"
             "    w = csv.DictWriter(f, columns); w.writeheader(); w.writerows(rows)", []),
]


def write_stub(path: Path):
    nb = nbformat.v4.new_notebook()
    for kind, src, tags in STUB_SOURCE:
        cell = nbformat.v4.new_code_cell(src) if kind == "code" else nbformat.v4.new_markdown_cell(src)
        cell.metadata["tags"] = tags
        nb.cells.append(cell)
    nb.metadata["kernelspec"] = dict(name="python3", display_name="Python 3", language="python")
    nbformat.write(nb, str(path))


@pytest.fixture
def stub_config(tmp_path):
    write_stub(tmp_path / "stub.ipynb")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        "name: t\nnotebook_dir: .\nkernel: python3\nparameters: {seeds: [0, 1], unknown_common: 3}\n"
        "tasks:\n"
        "  good: {notebook: stub.ipynb, datasets: [a, b], sweep: {scale: [1.0, 2.0]}}\n"
        "  bad: {notebook: stub.ipynb, datasets: [c], parameters: {fail: true}}\n"
        "report: false\n")
    return cfg


def test_grid_points_and_method_settings():
    assert bench.grid_points({"lr_factor": [1.0, 0.3], "n_latent": [5, 10]}) == [
        {"lr_factor": 1.0, "n_latent": 5}, {"lr_factor": 1.0, "n_latent": 10},
        {"lr_factor": 0.3, "n_latent": 5}, {"lr_factor": 0.3, "n_latent": 10}]
    assert bench.grid_points({}) == [{}]
    f = bench.fits("x", [0, 1], {"lr_factor": [1.0, 0.3]})
    assert [(d["seed"], d["default_setting"]) for d in f] == [(0, True), (1, True), (0, False), (1, False)]
    own = bench.fits("x", [0], {"lr_factor": [1.0, 0.3]}, {"x": {"grid": {"n_latent": [4, 8, 16]}}})
    assert [d["point"] for d in own] == [{"n_latent": 4}, {"n_latent": 8}, {"n_latent": 16}]
    with pytest.raises(ValueError, match="unknown keys"):
        bench.method_settings({"x": {"epochs": 3}}, "x")


def test_expand_config(stub_config, tmp_path):
    runs = bench.expand_config(bench.load_config(stub_config), out=tmp_path / "out")
    ids = [f"{r.task}/{r.run_id}" for r in runs]
    assert ids == ["good/a-scale=1.0", "good/a-scale=2.0", "good/b-scale=1.0", "good/b-scale=2.0", "bad/c"]
    good = runs[1]
    assert good.parameters["scale"] == 2.0 and good.parameters["seeds"] == [0, 1]
    assert "unknown_common" not in good.parameters  # common parameters a notebook lacks are dropped ...
    assert good.parameters["output_dir"] == str((tmp_path / "out" / "good" / "a-scale=2.0").resolve())
    cfg = bench.load_config(stub_config)
    cfg["tasks"]["good"]["parameters"] = {"no_such_parameter": 1}  # ... a task's own unknown parameter is an error
    with pytest.raises(ValueError, match="no_such_parameter"):
        bench.expand_config(cfg, out=tmp_path / "out")
    cfg["tasks"]["good"] = {"notebook": "missing.ipynb"}
    with pytest.raises(FileNotFoundError, match="missing.ipynb"):
        bench.expand_config(cfg, out=tmp_path / "out")


def test_run_resume_collect_and_failures(stub_config, tmp_path):
    out = tmp_path / "out"
    first = bench.run_benchmark(stub_config, out=out, jobs=2, progress=False)
    status = dict(zip(first["runs"].run_id, first["runs"].status))
    assert status == {"good/a-scale=1.0": "ok", "good/a-scale=2.0": "ok", "good/b-scale=1.0": "ok",
                      "good/b-scale=2.0": "ok", "bad/c": "failed"}  # the failing notebook did not stop the others
    assert "this notebook fails on purpose" in (out / "bad" / "c" / "log.txt").read_text()
    assert "fails on purpose" in first["runs"].set_index("run_id").loc["bad/c", "error"]
    table = pd.read_csv(out / "results.csv")
    assert list(table.columns) == bench.COLUMNS
    assert set(table.dataset) == {"a", "b"}  # the failed notebook left no table
    assert len(table) == 4 * 2 * 2  # 4 runs x 2 seeds x 2 methods
    assert sorted(table[(table.dataset == "b") & (table.method == "dca+leiden")]["value"].round(3)) == [0.7, 0.7, 1.4, 1.4]
    assert (out / "good" / "a-scale=1.0" / "stub.ipynb").exists()  # the executed notebook is kept
    assert (out / "runs.csv").exists()
    # resume: finished runs are skipped (not rerun), the failed one is retried; the collected table is the same
    mtime = (out / "good" / "a-scale=1.0" / "results.csv").stat().st_mtime
    second = bench.run_benchmark(stub_config, out=out, jobs=2, progress=False)
    status = dict(zip(second["runs"].run_id, second["runs"].status))
    assert status["bad/c"] == "failed"
    assert {v for k, v in status.items() if k.startswith("good")} == {"skipped (done)"}
    assert (out / "good" / "a-scale=1.0" / "results.csv").stat().st_mtime == mtime
    pd.testing.assert_frame_equal(pd.read_csv(out / "results.csv"), table)
    # changed parameters: the runs are not done any more; a half-written run (no run.json) is not done either
    cfg = bench.load_config(stub_config)
    cfg["parameters"]["seeds"] = [0]
    assert not any(r.is_done() for r in bench.expand_config(cfg, out=out) if r.task == "good")
    (out / "good" / "a-scale=1.0" / "run.json").unlink()
    assert not bench.expand_config(bench.load_config(stub_config), out=out)[0].is_done()


def test_command_line_list_and_exit_code(stub_config, tmp_path, capsys):
    out = tmp_path / "cli"
    assert bench.main([str(stub_config), "--out", str(out), "--list"]) == 0
    assert "todo  good/a-scale=1.0  stub.ipynb" in capsys.readouterr().out
    assert bench.main([str(stub_config), "--out", str(out), "--only", "bad", "--no-report"]) == 1  # a failed run


def test_failing_method_is_a_row_not_a_crash():
    "A registered method that raises in training becomes a failed row; the task goes on."
    from anndata import AnnData

    @bench_register
    class Broken:
        def __init__(self, adata, layer=None):
            self.adata = adata

        def train(self, **kw):
            raise RuntimeError("training diverged")

        def get_latent_representation(self):
            return np.zeros((self.adata.n_obs, 2))

    try:
        assert bench.select_methods("embed", methods=["_test_broken"]) == ["_test_broken"]
        r = bench.Results("clustering", "toy", verbose=False)
        adata = AnnData(np.ones((10, 3), dtype=np.float32))
        for seed in (0, 1):
            with r.attempt("_test_broken", seed=seed):
                bench.fit_method("_test_broken", adata, seed=seed, outputs=("latent",))
        r.add("pca+leiden", {"ari": 0.4}, kind="classical")
        t = r.table
        assert t.status.tolist() == ["failed", "failed", "ok"]
        assert t.error.iloc[0] == "RuntimeError: training diverged" and t.kind.iloc[0] == "deep"
        winners = bench.task_winners(t)  # the report still has a winner: only the classical method ran
        assert winners.winner.tolist() == ["classical"] and winners.deep_method.tolist() == [None]
        assert "Failed runs: _test_broken" in bench.task_summaries(t)["clustering"]
    finally:
        REGISTRY.pop("_test_broken", None)


def bench_register(cls):
    from scdeep_nb.base import register_model
    return register_model("_test_broken", ("embed",))(cls)


def test_report_summaries_from_a_table():
    "Who won, by how much, and the rank table, on a hand-made table with a known answer."
    rows = []
    for dataset, (deep, classical) in {"d1": (0.8, 0.6), "d2": (0.3, 0.5)}.items():
        for seed, jitter in enumerate([-0.01, 0.0, 0.01]):
            for method, kind, v in (("scvi+leiden", "deep", deep), ("scvi", "deep", deep - 0.1),
                                    ("pca+leiden", "classical", classical)):
                rows.append(dict(task="clustering", dataset=dataset, method=method, kind=kind, metric="ari",
                                 value=v + jitter, higher_is_better=True, seed=seed, setting="default",
                                 default_setting=True, params="{}", runtime_s=1.0, peak_memory_mb=1.0, status="ok",
                                 error=""))
    t = pd.DataFrame(rows, columns=bench.COLUMNS)
    w = bench.task_winners(t).set_index("dataset")
    assert w.loc["d1", "winner"] == "deep" and w.loc["d2", "winner"] == "classical"
    assert np.isclose(w.loc["d1", "difference"], 0.2) and np.isclose(w.loc["d2", "relative"], -0.4)
    assert w.loc["d1", "beyond_seed_spread"]
    ranks = bench.rank_table(t)
    assert ranks.loc["scvi", "clustering"] == 1.5 and ranks.loc["pca+leiden", "clustering"] == 1.5
    text = bench.task_summaries(t)["clustering"]
    assert "split the wins" in text and "scvi+leiden (deep, 0.8) beat pca+leiden (classical, 0.6)" in text


@pytest.mark.parametrize("name", ["smoke", "cpu"])
def test_shipped_configs_expand(name):
    "Every task notebook of the shipped configs exists and takes the parameters the config gives it."
    cfg = bench.load_config(NBS / "bench" / f"{name}.yaml")
    runs = bench.expand_config(cfg, out=Path("/tmp/unused"))
    assert {r.task for r in runs} >= {"denoising", "integration", "clustering", "visualisation", "classification",
                                      "generation"}
    for r in runs:
        accepted = bench.notebook_parameters(r.notebook)
        assert set(r.parameters) <= accepted, (r.run_id, set(r.parameters) - accepted)
        assert r.parameters.get("dataset") in bench.DATASETS, r.run_id

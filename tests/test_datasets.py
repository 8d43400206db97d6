"""Tests of scdeep_nb.datasets: simulate() reproduces its pinned output bit for bit; add_batch_effect() makes a
known, separable technical batch on real counts without touching the input or the cell-type labels."""
import hashlib
import json

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from scdeep_nb.datasets import add_batch_effect, pbmc68k, simulate


# ---- simulate(): pinned fingerprints ---------------------------------------------------------------------------

def _digest(*arrays) -> str:
    "First 16 hex digits of the sha256 of the arrays' dtypes, shapes and bytes."
    h = hashlib.sha256()
    for x in arrays:
        x = np.ascontiguousarray(x)
        h.update(str(x.dtype).encode()), h.update(str(x.shape).encode()), h.update(x.tobytes())
    return h.hexdigest()[:16]


def _table_digest(df: pd.DataFrame) -> str:
    return hashlib.sha256((df.to_csv() + str(df.dtypes.astype(str).to_dict())).encode()).hexdigest()[:16]


def fingerprint(adata) -> dict:
    "Hashes of every matrix (CSR data, indices and indptr), the obs and var tables and the recorded parameters."
    def csr(m):
        assert sp.isspmatrix_csr(m)
        return _digest(m.data, m.indices, m.indptr.astype(np.int64))
    return dict(X=csr(adata.X), counts=csr(adata.layers["counts"]), true_counts=csr(adata.layers["true_counts"]),
                cell_means=_digest(adata.layers["cell_means"]), obs=_table_digest(adata.obs),
                var=_table_digest(adata.var),
                params=hashlib.sha256(json.dumps(adata.uns["simulate"]["params"], sort_keys=True).encode()
                                      ).hexdigest()[:16])


CASES = {
    "default": dict(n_cells=300, n_genes=200, seed=0),
    "groups_batches": dict(n_cells=300, n_genes=200, n_groups=3, n_batches=2, seed=1, group_prob=[0.2, 0.3, 0.5]),
    "paths": dict(n_cells=300, n_genes=200, n_groups=3, seed=2, path=True, path_from=[0, 1, 1], path_n_steps=50),
    "paths_skew": dict(n_cells=200, n_genes=100, n_groups=2, seed=3, path=True, path_skew=[0.0, 1.0],
                       path_n_steps=[10, 20], bcv_df=np.inf),
    "dropout_experiment": dict(n_cells=300, n_genes=200, n_groups=2, seed=4, dropout_type="experiment", dropout_mid=3),
    "dropout_batch": dict(n_genes=150, batch_cells=[120, 80], seed=5, dropout_type="batch", dropout_mid=[1, 5],
                          lib_loc=9),
    "dropout_group": dict(n_cells=250, n_genes=120, n_groups=3, seed=6, dropout_type="group", dropout_mid=[0, 2, 4],
                          dropout_shape=[-1, -0.5, -2]),
    "dropout_cell": dict(n_cells=50, n_genes=80, seed=7, dropout_type="cell", dropout_mid=list(np.linspace(0, 4, 50))),
    # one block of cells (20k x 200 = 4.0 M entries < 2**22), many cache-sized slices
    "block_20k_x_200": dict(n_cells=20_000, n_genes=200, n_groups=4, n_batches=2, seed=8, lib_loc=8),
    # two blocks (one random stream each) and dropout, with one thread and with two
    "blocks_25k_x_400_dropout": dict(n_cells=25_000, n_genes=400, n_groups=3, n_batches=3, seed=9, lib_loc=8.5,
                                     dropout_type="experiment", dropout_mid=2),
    "blocks_25k_x_400_dropout_jobs2": dict(n_cells=25_000, n_genes=400, n_groups=3, n_batches=3, seed=9, lib_loc=8.5,
                                           dropout_type="experiment", dropout_mid=2, n_jobs=2),
}

# Computed by running `fingerprint(simulate(**CASES[case]))` on the code as it was BEFORE simulate() was split into
# documented steps (scdeep_nb/datasets.py as of commit 58ebaf4; numpy 2.4.6, x86-64). The refactor had to reproduce
# them bit for bit, and any later change that moves a random draw or changes the arithmetic will fail here: that
# changes what a seed means for every benchmark, so it must be deliberate (then recompute and say so in the commit).
# A NumPy release that changes its Generator streams would also fail here; that is the same message.
EXPECTED = {
    "default": dict(
        X="ae0d3562c6dbc325", counts="ae0d3562c6dbc325", true_counts="ae0d3562c6dbc325", cell_means="a09c3c694ed478d1",
        obs="ff941fd9f7d27f57", var="b751528310a29944", params="877d74b72f5671ca"),
    "groups_batches": dict(
        X="ee4aee1d3167c068", counts="ee4aee1d3167c068", true_counts="ee4aee1d3167c068", cell_means="e949605cf4ee4106",
        obs="542b9d9d5e6e100e", var="c021e44947526d7b", params="885292b2c963eeb9"),
    "paths": dict(
        X="a1a8a5f4fefcdb78", counts="a1a8a5f4fefcdb78", true_counts="a1a8a5f4fefcdb78", cell_means="5e5d76fa8637f712",
        obs="61e50a9546431799", var="61eeffb633d2a7a4", params="37a89a85cfe27c80"),
    "paths_skew": dict(
        X="003cf1fa602259b3", counts="003cf1fa602259b3", true_counts="003cf1fa602259b3", cell_means="4caec5057c89b5c1",
        obs="1ca30db8ca25732f", var="6f274fe0ddb13db6", params="9ec931f8c131e0de"),
    "dropout_experiment": dict(
        X="14a21d6900389d15", counts="14a21d6900389d15", true_counts="ad5f318a1531f491", cell_means="e3da7577be65c3c0",
        obs="53d46c397e006022", var="a59b114a8f5c62f6", params="6a0ebbb7a4ce3788"),
    "dropout_batch": dict(
        X="e6c91b2008a3f19a", counts="e6c91b2008a3f19a", true_counts="91bd9dcee9afaa2c", cell_means="deb35a40bc56a77e",
        obs="314d350e10607cf5", var="7cacddaec19ae73c", params="e72f5f8ceedbb85a"),
    "dropout_group": dict(
        X="eb48ce16c07f3ccd", counts="eb48ce16c07f3ccd", true_counts="d9924b6a5f7d88d9", cell_means="271b9db66d22e533",
        obs="ebef0c891c0d2b82", var="a945340ba2c7e50f", params="735c374107703afc"),
    "dropout_cell": dict(
        X="38053f716dc81704", counts="38053f716dc81704", true_counts="d6ddd17091c3f95a", cell_means="0d9d518e6050e56b",
        obs="bb729fcf642db0c2", var="91a45ef5932d8f8b", params="f556633b0640946f"),
    "block_20k_x_200": dict(
        X="2e6b6778637fd3da", counts="2e6b6778637fd3da", true_counts="2e6b6778637fd3da", cell_means="f17c35ae82894349",
        obs="74e28cd07e6dfbb6", var="b4182c30a9aaa558", params="84ad7d017f53a667"),
    "blocks_25k_x_400_dropout": dict(
        X="d29f44e73cce868a", counts="d29f44e73cce868a", true_counts="6715cd2922dbf79f", cell_means="50eb8df2fd33931c",
        obs="653c2998109fc5f1", var="92d07aaebe3fc281", params="b5be397aa6ff0b30"),
    "blocks_25k_x_400_dropout_jobs2": dict(
        X="d29f44e73cce868a", counts="d29f44e73cce868a", true_counts="6715cd2922dbf79f", cell_means="50eb8df2fd33931c",
        obs="653c2998109fc5f1", var="92d07aaebe3fc281", params="b5be397aa6ff0b30"),}


@pytest.mark.parametrize("case", list(CASES))
def test_simulate_reproduces_pinned_output(case):
    got = fingerprint(simulate(**CASES[case]))
    assert got == EXPECTED[case], {k: (got[k], EXPECTED[case][k]) for k in got if got[k] != EXPECTED[case][k]}


# ---- add_batch_effect() ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pbmc():
    return pbmc68k()


@pytest.fixture(scope="module")
def batched(pbmc):
    return add_batch_effect(pbmc, n_batches=2, seed=0)


def batch_accuracy(counts, labels, n_pcs=20) -> float:
    "5-fold cross-validated accuracy of a logistic regression on standardised PCs of log1p(counts per 10k)."
    counts = sp.csr_matrix(counts)
    norm = counts.multiply(1e4 / np.asarray(counts.sum(axis=1))).tocsr()
    norm.data = np.log1p(norm.data)
    pcs = PCA(n_pcs, random_state=0).fit_transform(norm.toarray())
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    return float(cross_val_score(classifier, pcs, labels, cv=5).mean())


def test_input_is_not_modified(pbmc):
    before = dict(X=pbmc.X.copy(), counts=pbmc.layers["counts"].copy(), obs=pbmc.obs.copy(), var=pbmc.var.copy(),
                  layers=list(pbmc.layers), obsm=list(pbmc.obsm), uns=list(pbmc.uns))
    out = add_batch_effect(pbmc, n_batches=3, fac_loc=0.3, seed=1)
    assert out is not pbmc and out.X is not pbmc.X
    assert (pbmc.X != before["X"]).nnz == 0 and (pbmc.layers["counts"] != before["counts"]).nnz == 0
    pd.testing.assert_frame_equal(pbmc.obs, before["obs"])
    pd.testing.assert_frame_equal(pbmc.var, before["var"])
    assert (list(pbmc.layers), list(pbmc.obsm), list(pbmc.uns)) == (before["layers"], before["obsm"], before["uns"])
    # the output's matrices are independent of each other and of the input
    out.X.data[:] = -1
    assert out.layers["counts"].data.min() >= 0 and out.layers["counts_without_batch"].data.min() >= 0
    assert pbmc.X.data.min() >= 0


def test_labels_kept_batches_balanced_and_recorded(pbmc, batched):
    assert batched.obs_names.equals(pbmc.obs_names) and batched.var_names.equals(pbmc.var_names)
    pd.testing.assert_series_equal(batched.obs["cell_type"], pbmc.obs["cell_type"])
    assert list(batched.obs["batch"].cat.categories) == ["Batch1", "Batch2"]
    assert batched.obs["batch"].value_counts().tolist() == [350, 350]
    # random split, not contiguous: both batches appear among the first 100 cells
    assert batched.obs["batch"].iloc[:100].nunique() == 2
    assert set(batched.layers) == {"counts", "counts_without_batch"} and not batched.obsm
    assert batched.uns["add_batch_effect"]["params"]["n_batches"] == 2
    assert batched.uns["add_batch_effect"]["source"] == "layers['counts']"
    # Splat's factor generator with sel_prob 1 and neg_prob 0.5: every gene has a factor, about half below 1
    fac = batched.var[["batch_fac_Batch1", "batch_fac_Batch2"]].values
    assert (fac != 1).all() and 0.4 < (fac < 1).mean() < 0.6
    keep = batched.var[["batch_keep_Batch1", "batch_keep_Batch2"]].values
    np.testing.assert_allclose(keep, fac / fac.max(axis=1, keepdims=True))
    assert (keep.max(axis=1) == 1).all()


def test_thinning_is_binomial_with_the_kept_fraction(batched):
    before = batched.layers["counts_without_batch"].toarray()
    after = batched.layers["counts"].toarray()
    assert (after <= before).all() and (after[before == 0] == 0).all()
    assert np.array_equal(after, np.round(after)) and (batched.X != batched.layers["counts"]).nnz == 0
    code = batched.obs["batch"].cat.codes.values
    keep = batched.var[["batch_keep_Batch1", "batch_keep_Batch2"]].values
    full = keep[:, code].T == 1  # the cell's batch holds the gene's largest factor: counts unchanged
    assert np.array_equal(after[full], before[full]) and (after[~full] < before[~full]).any()
    # summed over a batch's cells the kept molecules are Binomial(N, p): standardised deviations ~ N(0, 1)
    z = []
    for b in range(2):
        n_total, n_kept, p = before[code == b].sum(0), after[code == b].sum(0), keep[:, b]
        ok = (p < 1) & (n_total > 0)
        z.append((n_kept[ok] - n_total[ok] * p[ok]) / np.sqrt(n_total[ok] * p[ok] * (1 - p[ok])))
    z = np.concatenate(z)
    assert z.size > 500
    assert abs(z.mean()) < 0.15 and 0.8 < (z ** 2).mean() < 1.25 and np.abs(z).max() < 5.5


def test_batches_become_separable_and_cell_types_stay(pbmc, batched):
    code = batched.obs["batch"].cat.codes.values
    chance = batch_accuracy(batched.layers["counts_without_batch"], code)
    default = batch_accuracy(batched.layers["counts"], code)
    strong = add_batch_effect(pbmc, fac_loc=0.2, fac_scale=0.2, seed=0)
    stronger = batch_accuracy(strong.layers["counts"], strong.obs["batch"].cat.codes.values)
    assert abs(chance - 0.5) < 0.1, chance  # measured 0.46: the random split carries no signal
    assert default > 0.75 and default > chance + 0.25, (chance, default)  # measured 0.88
    assert stronger > default, (default, stronger)  # measured 0.99
    cell_type = batched.obs["cell_type"].cat.codes.values
    ct_before = batch_accuracy(batched.layers["counts_without_batch"], cell_type)
    ct_after = batch_accuracy(batched.layers["counts"], cell_type)
    assert ct_after > ct_before - 0.05, (ct_before, ct_after)  # measured 0.81 and 0.80


def test_no_effect_settings_leave_counts_unchanged(pbmc):
    for out in (add_batch_effect(pbmc, fac_loc=0.0, fac_scale=0.0), add_batch_effect(pbmc, n_batches=1)):
        assert (out.X != pbmc.layers["counts"]).nnz == 0
        assert (out.var.filter(like="batch_keep_").values == 1).all()


def test_reproducible_and_dense_input_matches_sparse():
    sim = simulate(200, 60, n_groups=2, seed=3, lib_loc=8)  # has its own obs["batch"] (one batch): use another key
    first = add_batch_effect(sim, n_batches=3, seed=5, key_added="tech")
    again = add_batch_effect(sim, n_batches=3, seed=5, key_added="tech")
    other = add_batch_effect(sim, n_batches=3, seed=6, key_added="tech")
    assert (first.X != again.X).nnz == 0 and first.obs["tech"].equals(again.obs["tech"])
    assert not first.obs["tech"].equals(other.obs["tech"])
    assert first.obs["batch"].equals(sim.obs["batch"]) and first.obs["group"].equals(sim.obs["group"])
    dense = sim.copy()
    dense.X = sim.layers["counts"].toarray()
    del dense.layers["counts"]
    from_dense = add_batch_effect(dense, n_batches=3, seed=5, layer=None, key_added="tech")
    assert isinstance(from_dense.X, np.ndarray) and np.array_equal(from_dense.X, first.X.toarray())
    assert from_dense.uns["add_batch_effect"]["source"] == "X"
    fresh = add_batch_effect(sim, seed=None, key_added="tech")
    assert isinstance(fresh.uns["add_batch_effect"]["params"]["seed"], int)


def test_errors_say_what_to_pass(pbmc, batched):
    lognorm = pbmc.copy()
    lognorm.X = sp.csr_matrix(np.log1p(pbmc.X.toarray()))
    with pytest.raises(ValueError, match="must hold raw counts"):
        add_batch_effect(lognorm, layer=None)
    with pytest.raises(ValueError, match="already has a column 'batch'"):
        add_batch_effect(batched)
    with pytest.raises(KeyError, match="not in adata.layers"):
        add_batch_effect(pbmc, layer="raw")
    with pytest.raises(ValueError, match="positive integer"):
        add_batch_effect(pbmc, n_batches=0)
    with pytest.raises(ValueError, match="larger than the number of cells"):
        add_batch_effect(pbmc[:3].copy(), n_batches=4)
    with pytest.raises(ValueError, match="one value per batch"):
        add_batch_effect(pbmc, n_batches=3, fac_loc=[0.1, 0.2])
    with pytest.raises(ValueError, match="fac_scale must be >= 0"):
        add_batch_effect(pbmc, fac_scale=-0.1)

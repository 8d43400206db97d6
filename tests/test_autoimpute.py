"""Library-level tests of AutoImpute: gene selection, the masked loss, imputation, outputs, save/load, bad input."""
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from scdeep_nb.models import REGISTRY
from scdeep_nb.models.autoimpute import AutoImpute, AutoImputeModule, autoimpute_genes


def two_type_counts(n=160, g=40, seed=0):
    "Counts of two cell types with different expression programmes, with extra zeros."
    rng = np.random.default_rng(seed)
    types = rng.integers(0, 2, n)
    means = rng.gamma(2.0, 4.0, size=(2, g))
    X = rng.poisson(means[types] * rng.uniform(0.6, 1.4, size=(n, 1))).astype(np.float32)
    X[rng.random(X.shape) < 0.2] = 0
    X[:, 0] += 1  # no empty cell
    X[0, :] += 1  # no empty gene
    a = ad.AnnData(sp.csr_matrix(X))
    a.var_names = [f"g{i}" for i in range(g)]
    a.obs["type"] = pd.Categorical(types.astype(str))
    a.layers["counts"] = a.X.copy()
    return a


def hide_nonzeros(X, fraction=0.1, seed=0):
    "Set a random fraction of the non-zero entries to 0; return the masked matrix and the hidden positions."
    X = sp.csr_matrix(X, copy=True)
    rows, cols = X.nonzero()
    pick = np.random.default_rng(seed).choice(len(rows), int(fraction * len(rows)), replace=False)
    rows, cols = rows[pick], cols[pick]
    dense = X.toarray()
    dense[rows, cols] = 0
    return sp.csr_matrix(dense), rows, cols


@pytest.fixture(scope="module")
def masked_fit():
    a = two_type_counts()
    masked_counts, rows, cols = hide_nonzeros(a.layers["counts"])
    masked = a.copy()
    masked.layers["counts"] = masked_counts
    model = AutoImpute(masked, layer="counts", n_hidden=512)
    model.train(max_epochs=150, progress_bar=False, seed=0)
    return a, masked, model, rows, cols


def test_registered():
    info = REGISTRY["autoimpute"]
    assert info.cls is AutoImpute
    assert set(info.capabilities) == {"denoise", "embed"}


def test_gene_filter_is_strict_on_both_sides():
    X = np.zeros((6, 4), dtype=np.float32)
    X[:4, 0] = 3  # count 3 (> 2) in 4 (> 3) cells: kept
    X[:3, 1] = 9  # only 3 cells: dropped
    X[:, 2] = 2  # count 2 is not above 2: dropped
    X[:5, 3] = [3, 5, 8, 4, 6]
    table = autoimpute_genes(ad.AnnData(X))
    assert table.passes_filter.tolist() == [True, False, False, True]
    with pytest.raises(ValueError, match="min_count=0, min_cells=0"):
        autoimpute_genes(ad.AnnData(X), min_count=10)


def test_selection_takes_top_absolute_normalized_dispersion():
    a = two_type_counts()
    table = autoimpute_genes(a, n_top_genes=10)
    assert table.selected.sum() == 10
    passing = table[table.passes_filter]
    assert (passing.dispersion_norm >= 0).all()  # an absolute value
    assert passing[passing.selected].dispersion_norm.min() >= passing[~passing.selected].dispersion_norm.max()
    model = AutoImpute(a, layer="counts", n_top_genes=10, n_hidden=8)
    assert list(model.selected_genes) == list(table.index[table.selected])


def test_loss_ignores_zero_entries():
    torch.manual_seed(0)
    module = AutoImputeModule([0, 1, 2], np.ones(3, np.float32), target_library=10.0, n_hidden=16, n_cells=3)
    counts = torch.tensor([[4.0, 0.0, 6.0], [3.0, 0.0, 5.0], [2.0, 0.0, 7.0]])  # gene 1 never observed
    module.loss({"x": counts}).loss.backward()
    assert module.decoder.bias.grad[1] == 0  # nothing pulls the prediction of an unobserved entry
    assert module.decoder.bias.grad[0] != 0 and module.decoder.bias.grad[2] != 0


def test_paper_init_is_standard_normal_and_xavier_is_not():
    a = two_type_counts()
    torch.manual_seed(0)
    paper = AutoImpute(a, layer="counts", init="paper", n_hidden=500).module
    xavier = AutoImpute(a, layer="counts", n_hidden=500).module
    assert abs(paper.encoder.weight.std().item() - 1) < 0.05 and paper.encoder.bias.abs().sum() > 0
    assert xavier.encoder.weight.std().item() < 0.1 and xavier.encoder.bias.abs().sum() == 0
    with pytest.raises(ValueError, match=r"init='normal' is not supported; choose one of \['xavier', 'paper'\]"):
        AutoImpute(a, layer="counts", init="normal")


def test_imputes_hidden_entries_better_than_baselines(masked_fit):
    a, masked, model, rows, cols = masked_fit
    library = model.get_library()
    selected = model.var_names.get_indexer(model.selected_genes)
    keep = np.isin(cols, selected)
    r, c = rows[keep], cols[keep]
    truth = np.log2(a.layers["counts"].toarray()[r, c] / library[r] * model.target_library + 1)
    observed = np.log2(masked.layers["counts"].toarray() / library[:, None] * model.target_library + 1)
    imputed = model.get_normalized_expression(scale="log2")[r, c]
    mae = lambda est: np.abs(est - truth).mean()
    assert mae(imputed) < mae(observed.mean(0)[c])  # the gene mean
    assert mae(imputed) < mae(np.zeros_like(truth))  # no imputation
    assert model.history.train_reconstruction.iloc[-1] < model.history.train_reconstruction.iloc[0]


def test_outputs_have_all_genes_and_pass_through_others(masked_fit):
    a, masked, model, *_ = masked_fit
    n, g = masked.shape
    full = model.get_normalized_expression()
    assert full.shape == (n, g) and np.all(full >= 0)
    other = ~model.var_names.isin(model.selected_genes)
    np.testing.assert_allclose(full[:, other], masked.layers["counts"].toarray()[:, other], atol=1e-3)
    log2 = model.get_normalized_expression(scale="log2", genes="selected")
    assert log2.shape == (n, len(model.selected_genes))
    kept = model.get_normalized_expression(scale="log2", genes="selected", keep_observed=True)
    sel = model.var_names.get_indexer(model.selected_genes)
    x = masked.layers["counts"].toarray()[:, sel]
    np.testing.assert_allclose(kept[x == 0], log2[x == 0], atol=1e-5)
    assert model.get_latent_representation().shape == (n, 512)
    with pytest.raises(ValueError, match=r"scale='log' is not supported; choose one of \['counts', 'normalized', 'log2'\]"):
        model.get_normalized_expression(scale="log")
    with pytest.raises(ValueError, match=r"genes='some' is not supported"):
        model.get_normalized_expression(genes="some")


def test_save_load_keeps_the_selection(masked_fit, tmp_path):
    _, masked, model, *_ = masked_fit
    model.save(tmp_path / "m")
    loaded = AutoImpute.load(tmp_path / "m", masked)
    np.testing.assert_allclose(loaded.get_normalized_expression(), model.get_normalized_expression(), atol=1e-4)
    few = masked[:12].copy()  # too few cells to re-run the filter: the saved selection is used
    assert list(AutoImpute.load(tmp_path / "m", few).selected_genes) == list(model.selected_genes)
    with pytest.raises(ValueError, match="genes differ"):
        AutoImpute.load(tmp_path / "m", masked[:, 3:].copy())


def test_non_integer_input_is_refused_with_the_override_named():
    a = two_type_counts()
    a.layers["counts"] = np.log1p(a.layers["counts"].toarray())
    with pytest.raises(ValueError, match="allow_non_integer=True"):
        AutoImpute(a, layer="counts")
    AutoImpute(a, layer="counts", allow_non_integer=True, n_hidden=8)


def test_minibatch_training():
    a = two_type_counts()
    model = AutoImpute(a, layer="counts", n_hidden=32)
    model.train(max_epochs=2, batch_size=40, progress_bar=False)
    assert len(model.history) == 2 and np.isfinite(model.history.train_loss).all()


def test_fixed_seed_reproduces_the_pre_contract_outputs(fixed_counts):
    """The migration to the core contract (issue 6) did not change the maths: same selection, losses and outputs.

    Recorded with the code of commit a0a98a3 (before the migration: `git worktree add /tmp/old a0a98a3`, then
    `PYTHONPATH=/tmp/old python` running the same calls, one torch thread; there `early_stopping=False` switched the
    old stop rule off, here `tolerance=None` switches the new one off). The migrated code reproduces every value to
    the 6 significant digits recorded.
    """
    a = fixed_counts
    model = AutoImpute(a, layer="counts", n_hidden=64, n_top_genes=30, min_count=1, min_cells=3)
    model.train(max_epochs=20, seed=0, progress_bar=False, tolerance=None)
    assert list(model.selected_genes) == [f"g{i}" for i in (0, 3, 4, 7, 8, 9, 10, 11, 12, 13, 14, 16, 17, 19, 20,
                                                             21, 22, 24, 25, 26, 27, 28, 29, 30, 31, 33, 34, 35, 38, 39)]
    assert len(model.history) == 20
    np.testing.assert_allclose(model.history.train_loss.iloc[[0, -1]], [161.798, 149.179], rtol=1e-5)
    log2 = model.get_normalized_expression(scale="log2", genes="selected")
    np.testing.assert_allclose(log2[:2, :5].ravel(), [-0.854881, 1.60367, 0.721658, 1.3655, -0.842678,
                                                      -1.30005, 1.35123, 1.03997, 1.02949, -1.01336], rtol=1e-5)
    np.testing.assert_allclose(log2.mean(), 0.188669, rtol=1e-5)
    np.testing.assert_allclose(model.get_latent_representation().mean(), 0.494942, rtol=1e-5)


def test_reference_training_defaults():
    kw = AutoImpute.default_train_kwargs
    assert (kw["optimizer"], kw["lr"], kw["max_epochs"], kw["validation_fraction"]) == ("rmsprop", 1e-4, 7000, 0.0)
    assert kw["optimizer_kwargs"] == dict(alpha=0.9, eps=1e-10)  # TF1 RMSProp
    # the reference's rule: stop when the per-cell loss changes by <= 1e-4 between iterations; no early stopping
    assert (kw["tolerance"], kw["tolerance_every"], kw["monitor"]) == (1e-4, 1, "train_reconstruction")
    assert kw["early_stopping"] is False


def test_stops_at_the_first_iteration_whose_loss_change_is_within_tolerance():
    "The reference's loop: |loss per cell - previous| <= threshold stops (a rise larger than it does not)."
    a = two_type_counts()
    tolerance = 0.05  # a coarse threshold, to reach the rule in few iterations (the default is 1e-4)
    model = AutoImpute(a, layer="counts", n_hidden=64).train(max_epochs=3000, lr=1e-3, progress_bar=False,
                                                              tolerance=tolerance)
    change = np.abs(np.diff(model.history.train_reconstruction.to_numpy()))
    assert len(model.history) < 3000 and model.trainer.stopped_early
    assert change[-1] <= tolerance and (change[:-1] > tolerance).all()
    assert "kl_weight" not in model.history.columns  # no KL term, nothing logged for it


def test_per_cell_loss_terms(masked_fit):
    _, masked, model, *_ = masked_fit
    terms = model.get_loss_terms()
    assert list(terms.columns) == ["reconstruction"] and len(terms) == masked.n_obs  # the penalty is not per cell
    batch = model.data.get_batch(np.arange(masked.n_obs))
    with torch.no_grad():
        out = model.module.loss(batch)
    np.testing.assert_allclose(float(out.loss), terms.reconstruction.mean() + float(out.terms["regularization"]),
                               rtol=1e-5)


def test_outputs_need_training_and_follow_the_users_gene_order(masked_fit, tmp_path):
    _, masked, model, *_ = masked_fit
    untrained = AutoImpute(masked, layer="counts", n_hidden=8)
    for getter in ("get_library", "get_normalized_expression", "get_latent_representation"):
        with pytest.raises(RuntimeError, match="not trained"):
            getattr(untrained, getter)()
    model.save(tmp_path / "m")
    flipped = AutoImpute.load(tmp_path / "m", masked[:, ::-1].copy())
    np.testing.assert_allclose(flipped.get_normalized_expression(), model.get_normalized_expression()[:, ::-1],
                               atol=1e-4)
    # genes="selected": the columns are `selected_genes`, whatever the AnnData's order
    np.testing.assert_allclose(flipped.get_normalized_expression(genes="selected", scale="log2"),
                               model.get_normalized_expression(genes="selected", scale="log2"), atol=1e-5)
    np.testing.assert_allclose(flipped.get_library(), model.get_library(), rtol=1e-6)


def test_never_detected_genes_are_passed_through_as_zeros():
    a = two_type_counts()
    X = a.layers["counts"].toarray()
    X[:, [2, 5, 7]] = 0
    a.layers["counts"] = sp.csr_matrix(X)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = AutoImpute(a, layer="counts", n_hidden=32)
    assert sum("3 of 40 genes have zero counts" in str(w.message) for w in caught) == 1
    model.train(max_epochs=5, progress_bar=False)
    assert not model.var_names[[2, 5, 7]].isin(model.selected_genes).any()
    for scale in ("counts", "normalized", "log2"):
        out = model.get_normalized_expression(scale=scale)
        assert np.isfinite(out).all() and (out[:, [2, 5, 7]] == 0).all()


def test_few_cells_name_the_filter_and_the_fix_works():
    a = two_type_counts()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*genes have zero counts")
        for n in (1, 3):
            few = a[:n].copy()
            with pytest.raises(ValueError, match=r"more than 3 cells.*min_count=0, min_cells=0"):
                AutoImpute(few, layer="counts")
            model = AutoImpute(few, layer="counts", n_hidden=8, min_count=0, min_cells=0)
            model.train(max_epochs=3, progress_bar=False)
            assert np.isfinite(model.get_normalized_expression()).all()
        AutoImpute(a, layer="counts", n_hidden=8).train(max_epochs=2, batch_size=1, progress_bar=False)  # no batch-norm

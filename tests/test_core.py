"""Library-level tests of the shared core: data checks, training engine, base model life cycle."""
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from torch import nn

from scdeep_nb.base import REGISTRY, BaseModel, read_saved, register_model
from scdeep_nb.checks import ToyModel
from scdeep_nb.data import SingleCellData, size_factors, validate_counts
from scdeep_nb.train import BaseModule, LossOutput, Trainer, TrainingPlan


def counts_adata(n=120, g=25, seed=0, sparse=True):
    rng = np.random.default_rng(seed)
    X = rng.poisson(rng.gamma(2.0, 2.0, size=(n, g))).astype(np.float32)
    X[:, 0] += 1
    X[0, :] += 1
    a = ad.AnnData(sp.csr_matrix(X) if sparse else X)
    a.var_names = [f"g{i}" for i in range(g)]
    a.obs["batch"] = pd.Categorical(rng.choice(["b1", "b2"], n))
    a.layers["counts"] = a.X.copy()
    return a


class Tiny(ToyModel):
    "The toy model with a 2-factor default (the core tests' model)."
    def __init__(self, adata, layer=None, batch_key=None, *, allow_non_integer=False):
        super().__init__(adata, layer, batch_key, n_latent=2, allow_non_integer=allow_non_integer)


def test_counts_found_in_layer_then_X():
    a = counts_adata()
    a.X = np.log1p(a.X.toarray())
    assert SingleCellData(a).source == "layers['counts']"
    del a.layers["counts"]
    with pytest.raises(ValueError, match="allow_non_integer=True"):
        SingleCellData(a)
    assert SingleCellData(a, allow_non_integer=True).source == "X"


@pytest.mark.parametrize("bad, message", [(-1.0, "negative"), (np.nan, "NaN"), (np.inf, "infinite"), (0.5, "non-integer")])
def test_bad_values_raise(bad, message):
    X = counts_adata(sparse=False).X.copy()
    X[3, 4] = bad
    with pytest.raises(ValueError, match=message):
        validate_counts(X)


def test_zero_genes_and_cells_counted():
    X = counts_adata(sparse=False).X.copy()
    X[:, 5] = 0
    X[:, 7] = 0
    with pytest.raises(ValueError, match="2 genes have zero counts.*filter_genes"):
        validate_counts(X)
    with pytest.warns(UserWarning, match="2 of 25 genes have zero counts in every cell. They are kept"):
        validate_counts(X, check_zero_genes="warn")
    X = counts_adata(sparse=False).X.copy()
    X[4] = 0
    with pytest.raises(ValueError, match="1 cells have zero total counts.*filter_cells"):
        validate_counts(X)


def test_view_dense_csc_and_no_mutation():
    a = counts_adata()
    before = a.layers["counts"].copy()
    view = a[10:60]
    d = SingleCellData(view, batch_key="batch")
    assert view.is_view and d.n_obs == 50
    assert (a.layers["counts"] != before).nnz == 0
    dense = SingleCellData(counts_adata(sparse=False))
    assert not dense.is_sparse
    with pytest.warns(UserWarning, match="CSC"):
        c = ad.AnnData(sp.csc_matrix(before))
        assert SingleCellData(c).X.format == "csr"


def test_missing_keys_are_clear():
    a = counts_adata()
    with pytest.raises(KeyError, match="available"):
        SingleCellData(a, layer="spliced")
    with pytest.raises(KeyError, match="batch_key='donor'"):
        SingleCellData(a, batch_key="donor")


def test_minibatches_cover_training_cells_once_and_never_hold_one_cell():
    d = SingleCellData(counts_adata(n=65))
    seen = np.concatenate([b["index"].numpy() for b in d.loader(batch_size=32, shuffle=True)])
    assert sorted(seen) == list(range(65))
    assert min(len(b["x"]) for b in d.loader(batch_size=32)) > 1


def test_size_factor_kinds():
    X = counts_adata().X
    lib = np.asarray(X.sum(1)).ravel()
    np.testing.assert_allclose(size_factors(X, "per10k"), lib / 1e4, rtol=1e-6)
    assert np.isclose(np.median(size_factors(X)), 1.0)


def test_training_reduces_loss_and_saves_loads(tmp_path):
    a = counts_adata()
    m = Tiny(a, batch_key="batch").train(max_epochs=10, progress_bar=False)
    assert m.history.train_loss.iloc[-1] < m.history.train_loss.iloc[0]
    m.save(tmp_path / "m")
    m2 = Tiny.load(tmp_path / "m", a)
    np.testing.assert_allclose(m2.get_latent_representation(), m.get_latent_representation(), atol=1e-6)
    with pytest.raises(ValueError, match=r"read_saved\(.*\)\.var_names"):
        Tiny.load(tmp_path / "m", a[:, :10].copy())
    # the fix the message names runs as written
    saved_genes = read_saved(tmp_path / "m").var_names
    assert list(Tiny.load(tmp_path / "m", a[:, saved_genes].copy()).var_names) == list(a.var_names)


def test_same_seed_same_model():
    a = counts_adata()
    z1 = Tiny(a).train(max_epochs=3, progress_bar=False, seed=1).get_latent_representation()
    z2 = Tiny(a).train(max_epochs=3, progress_bar=False, seed=1).get_latent_representation()
    np.testing.assert_allclose(z1, z2, atol=1e-6)


def test_nan_loss_stops_with_explanation():
    class Nan(BaseModule):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(1))

        def loss(self, b, *, kl_weight=1.0):
            return LossOutput(self.w * float("nan"))

    with pytest.raises(FloatingPointError, match="learning rate"):
        Trainer(2, device="cpu", progress_bar=False).fit(TrainingPlan(Nan()), [dict(x=torch.ones(2, 1))])


def test_registry_refuses_a_second_class_under_a_taken_name():
    @register_model("tmp_unique_name", capabilities=("embed",))
    class A(Tiny):
        pass
    try:
        with pytest.raises(ValueError, match="already registered"):
            @register_model("tmp_unique_name", capabilities=("embed",))
            class B(Tiny):
                pass
    finally:
        REGISTRY.pop("tmp_unique_name", None)


def test_models_registry_lists_methods():
    import scdeep_nb.models as models
    assert models.REGISTRY is REGISTRY
    for name, info in REGISTRY.items():
        assert info.cls.name == name
        for cap, method in info.outputs.items():
            assert callable(getattr(info.cls, method))


def test_continued_training_keeps_the_optimiser_and_numbers_epochs_on():
    a = counts_adata()
    once = Tiny(a).train(max_epochs=6, progress_bar=False, seed=2, validation_fraction=0, early_stopping=False)
    twice = Tiny(a).train(max_epochs=3, progress_bar=False, seed=2, validation_fraction=0, early_stopping=False)
    twice.train(max_epochs=3, progress_bar=False, seed=2, validation_fraction=0, early_stopping=False)
    assert list(twice.history.epoch) == list(range(6))
    # same optimiser state and same step count: the second half continues the first (minibatch order restarts
    # from the seed, so the losses differ slightly but the epoch numbering and steps carry on)
    assert twice.trainer.state["step"] == once.trainer.state["step"]


def test_fixed_seed_reproduces_outputs_and_loss_terms_are_per_cell():
    a = counts_adata()
    m = Tiny(a).train(max_epochs=3, progress_bar=False, seed=5)
    terms = m.get_loss_terms()
    assert list(terms.columns) == ["reconstruction"] and len(terms) == a.n_obs
    batch = m.data.get_batch(np.arange(a.n_obs))
    with torch.no_grad():
        whole = m.module.eval().loss(batch).loss.item()
    assert np.isclose(terms.reconstruction.mean(), whole, rtol=1e-5)
    again = Tiny(a).train(max_epochs=3, progress_bar=False, seed=5)
    np.testing.assert_allclose(again.get_latent_representation(), m.get_latent_representation(), atol=1e-6)


def test_module_contract_is_enforced():
    class NoLoss(nn.Module):
        def forward(self, x):
            return x
    with pytest.raises(TypeError, match="module contract"):
        TrainingPlan(NoLoss())

    class ReturnsFloat(BaseModule):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(1))

        def loss(self, b, *, kl_weight=1.0):
            return (self.w ** 2).sum()
    with pytest.raises(TypeError, match="LossOutput"):
        Trainer(1, device="cpu", progress_bar=False).fit(TrainingPlan(ReturnsFloat()), [dict(x=torch.ones(2, 1))])


def test_monitor_that_does_not_exist_is_an_error():
    with pytest.raises(KeyError, match="monitor='validation_nll'"):
        Tiny(counts_adata()).train(max_epochs=2, progress_bar=False, monitor="validation_nll")


def test_unseen_batch_is_refused_with_the_seen_ones():
    a = counts_adata()
    a.obs["batch"] = pd.Categorical(a.obs["batch"].astype(str), categories=["b1", "b2", "b3"])
    m = Tiny(a, batch_key="batch").train(max_epochs=1, progress_bar=False)
    assert m.seen_batches == ["b1", "b2"]
    assert m.batch_code("b2") == 1
    with pytest.raises(ValueError, match=r"no cells in the training data.*\['b1', 'b2'\]"):
        m.batch_code("b3")
    with pytest.raises(ValueError, match="not a batch of this model"):
        m.batch_code("b9")


def test_tl_wrappers_have_the_methods_signatures_and_document_the_keys():
    import inspect
    import pydoc
    import scdeep_nb as sd
    params = inspect.signature(sd.tl.scvi).parameters
    for name in ("batch_key", "n_latent", "gene_likelihood", "max_epochs", "copy", "key_added"):
        assert name in params, name
    text = pydoc.render_doc(sd.tl.scvi, renderer=pydoc.plaintext)
    assert "n_latent" in text and "obsm['X_scvi']" in text and "layers['scvi_denoised']" in text
    a = counts_adata()
    with pytest.raises(TypeError, match=r"DCA does not take.*DCA takes: layer"):
        sd.tl.dca(a, batch_key="batch")


def test_tl_records_where_the_counts_came_from():
    import scdeep_nb as sd
    from scdeep_nb.tl import make_wrapper
    register_model("tmp_tl_toy", capabilities=("embed", "denoise"))(Tiny)
    try:
        a = counts_adata()
        make_wrapper(REGISTRY["tmp_tl_toy"])(a, max_epochs=2, progress_bar=False)
        assert a.uns["tmp_tl_toy"]["params"]["layer"] == "counts"
        assert a.obsm["X_tmp_tl_toy"].shape == (a.n_obs, 2)
        del a.layers["counts"]
        make_wrapper(REGISTRY["tmp_tl_toy"])(a, max_epochs=2, progress_bar=False, key_added="again")
        assert a.uns["again"]["params"]["layer"] is None and a.uns["again"]["params"]["counts_source"] == "X"
    finally:
        REGISTRY.pop("tmp_tl_toy", None)

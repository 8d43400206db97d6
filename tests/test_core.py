"""Library-level tests of the shared core: data checks, training engine, base model life cycle."""
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from torch import nn

from scdeep_nb.base import REGISTRY, BaseModel, register_model
from scdeep_nb.data import SingleCellData, size_factors, validate_counts
from scdeep_nb.train import LossOutput, Trainer, TrainingPlan


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


class PoissonFactor(nn.Module):
    def __init__(self, g):
        super().__init__()
        self.enc, self.dec = nn.Linear(g, 2), nn.Linear(2, g)

    def encode(self, x):
        return self.enc(torch.log1p(x))

    def rate(self, b):
        return b["library"] * torch.softmax(self.dec(self.encode(b["x"])), -1)

    def loss(self, b):
        r = self.rate(b)
        return LossOutput((r - b["x"] * torch.log(r + 1e-8)).sum(-1).mean(), {}, len(r))


class Tiny(BaseModel):
    default_train_kwargs = dict(BaseModel.default_train_kwargs, batch_size=32, lr=1e-2)

    def __init__(self, adata, layer=None, batch_key=None, *, allow_non_integer=False):
        super().__init__(adata, layer, batch_key, allow_non_integer=allow_non_integer)

    def _build_module(self):
        return PoissonFactor(self.data.n_vars)

    def get_latent_representation(self, adata=None):
        return self._forward_batches(lambda b: self.module.encode(b["x"]), adata)


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
    with pytest.raises(ValueError, match="genes"):
        Tiny.load(tmp_path / "m", a[:, :10].copy())


def test_same_seed_same_model():
    a = counts_adata()
    z1 = Tiny(a).train(max_epochs=3, progress_bar=False, seed=1).get_latent_representation()
    z2 = Tiny(a).train(max_epochs=3, progress_bar=False, seed=1).get_latent_representation()
    np.testing.assert_allclose(z1, z2, atol=1e-6)


def test_nan_loss_stops_with_explanation():
    class Nan(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(1))

        def loss(self, b):
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

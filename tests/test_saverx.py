"""Library-level tests of `scdeep_nb.models.saverx` (SAVER-X, Wang et al. 2019): the three stages, transfer, bad input."""
import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from scdeep_nb.base import REGISTRY
from scdeep_nb.datasets import simulate
from scdeep_nb.models.saverx import SAVERX, SAVERXModule, poisson_gamma_shrinkage

SMALL = dict(hidden_sizes=(16, 8, 16))
FAST = dict(max_epochs=3, progress_bar=False, device="cpu")


def _drop_zero_genes(a):
    return a[:, np.asarray(a.layers["counts"].sum(0)).ravel() > 0].copy()


@pytest.fixture(scope="module")
def sim():
    return simulate(n_cells=260, n_genes=50, n_groups=3, seed=3, lib_loc=8.0, de_fac_loc=1.0, de_prob=0.2,
                    dropout_type="experiment", dropout_mid=0.0, dropout_shape=-1.0)


@pytest.fixture(scope="module")
def ref(sim):
    return _drop_zero_genes(sim[:200, :40])


@pytest.fixture(scope="module")
def tgt(sim):
    return _drop_zero_genes(sim[200:, 10:50])  # 30 genes shared with ref, 10 target-only genes


@pytest.fixture(scope="module")
def trained(ref):
    return SAVERX(ref, layer="counts", **SMALL).train(**FAST)


def test_registered_and_reference_defaults():
    info = REGISTRY["saverx"]
    assert info.cls is SAVERX and set(info.capabilities) == {"embed", "denoise"}
    kw = SAVERX.default_train_kwargs
    assert (kw["optimizer"], kw["lr"], kw["max_epochs"], kw["grad_clip_value"]) == ("rmsprop", 1e-3, 300, 5.0)
    assert kw["patience"] == 6 and kw["scheduler_kwargs"]["patience"] == 4 and kw["restore_best"]
    assert kw["validation_fraction"] == 0.1 and SAVERX.size_factor_kind == "per10k"


def test_shrinkage_recovers_variance_form_and_posterior():
    rng = np.random.default_rng(1)
    n = 800
    s = rng.uniform(0.5, 2.0, n)
    mu = rng.uniform(1, 20, size=(n, 2))
    lam = np.column_stack([rng.gamma(1 / 0.3, 0.3 * mu[:, 0]), rng.gamma(mu[:, 1] / 2.0, 2.0)])
    x = rng.poisson(s[:, None] * lam)
    res = poisson_gamma_shrinkage(sp.csr_matrix(x), mu, s)
    assert list(res["table"].prior_form) == ["cv", "fano"]
    a = 1 / res["table"].prior_parameter[0]
    np.testing.assert_allclose(res["posterior_mean"][:, 0], (x[:, 0] + a) / (s + a / mu[:, 0]), rtol=1e-8)
    np.testing.assert_allclose(res["posterior_variance"][:, 0], (x[:, 0] + a) / (s + a / mu[:, 0]) ** 2, rtol=1e-8)
    assert ((res["posterior_mean"] - lam) ** 2).mean() < ((x / s[:, None] - lam) ** 2).mean()
    with pytest.raises(ValueError, match="choose one or more"):
        poisson_gamma_shrinkage(x, mu, s, forms=("poisson",))


def test_masked_loss_ignores_unmeasured_network_genes():
    torch.manual_seed(0)
    m = SAVERXModule(4, np.array([2, 0]), np.ones(2), hidden_sizes=(3, 2, 3))
    x = torch.tensor([[3.0, 1.0], [0.0, 2.0], [1.0, 1.0]])
    batch = dict(x=x, size_factors=x.sum(1, keepdim=True) / 1e4)
    base = float(m.loss(batch).loss.detach())
    m.mean_head.bias.data[[1, 3]] += 5.0  # change only the predictions of network genes the data do not measure
    assert float(m.loss(batch).loss.detach()) == pytest.approx(base)


def test_stages_shapes_and_filter(trained, ref):
    n, g = ref.shape
    auto, filt, shrunk = (trained.get_normalized_expression(stage=s) for s in ("autoencoder", "filtered", "shrunk"))
    assert auto.shape == filt.shape == shrunk.shape == (n, g)
    assert trained.get_latent_representation().shape == (n, 8)
    var = trained.get_posterior_variance()
    assert var.shape == (n, g) and (var >= 0).all()
    table = trained.get_gene_table()
    kept = table.use_autoencoder.to_numpy()
    np.testing.assert_allclose(filt[:, kept], auto[:, kept], rtol=1e-5)
    s = np.asarray(ref.layers["counts"].sum(1)).ravel() / 1e4
    const = s[:, None] * trained.module.gene_constant.numpy()
    np.testing.assert_allclose(filt[:, ~kept], const[:, ~kept], rtol=1e-4)
    assert (table.error_autoencoder[kept] <= table.error_constant[kept]).all()
    assert (table.error_autoencoder[~kept] > table.error_constant[~kept]).all()
    # the posterior mean lies between each cell's counts and the filtered prediction
    x = ref.layers["counts"].toarray()
    lo, hi = np.minimum(x, filt), np.maximum(x, filt)
    assert ((shrunk >= lo - 1e-3 * (1 + hi)) & (shrunk <= hi + 1e-3 * (1 + hi))).all()


def test_cv_filter_and_no_filter(ref):
    m = SAVERX(ref, layer="counts", gene_filter="cv", cv_folds=4, cv_rounds=2, **SMALL).train(max_epochs=2,
                                                                                               progress_bar=False)
    t = m.get_gene_table()
    assert np.isfinite(t.error_autoencoder).all() and t.use_autoencoder.dtype == bool
    m0 = SAVERX(ref, layer="counts", gene_filter=None, **SMALL).train(**FAST)
    assert m0.module.use_autoencoder.all()
    with pytest.raises(ValueError, match="gene_filter='cv'"):
        SAVERX(ref, layer="counts", **SMALL).train(validation_fraction=0, **FAST)


def test_transfer_partial_overlap_save_load(trained, ref, tgt, tmp_path):
    trained.save(tmp_path / "pre")
    with pytest.warns(UserWarning, match="not in the pretrained model"):
        ft = SAVERX.from_pretrained(tmp_path / "pre", tgt, layer="counts")
    assert ft.network_genes == list(ref.var_names)
    # the fine-tuning starts from the pretrained weights
    for k, v in trained.module.network_state_dict().items():
        assert torch.equal(ft.module.state_dict()[k], v)
    ft.train(**FAST)
    table = ft.get_gene_table()
    outside = table.network_gene.isna().to_numpy()
    assert outside.sum() == len(set(tgt.var_names) - set(ref.var_names)) and not table.use_autoencoder[outside].any()
    out = ft.get_normalized_expression()
    assert out.shape == tgt.shape and np.isfinite(out).all()
    ft.save(tmp_path / "ft")
    loaded = SAVERX.load(tmp_path / "ft", tgt)
    np.testing.assert_allclose(loaded.get_normalized_expression(), out, rtol=1e-4, atol=1e-5)
    assert loaded.network_genes == ft.network_genes
    with pytest.raises(ValueError, match="from_pretrained"):
        SAVERX.load(tmp_path / "ft", ref)
    # a model built from a fine-tuned one keeps the original network genes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = SAVERX.from_pretrained(ft, tgt)
    assert again.network_genes == list(ref.var_names)


def test_transfer_orthologs_and_no_overlap(trained, tgt):
    mouse = tgt.copy()
    mouse.var_names = [g.lower() for g in tgt.var_names]
    table = pd.DataFrame({"source": list(tgt.var_names), "target": list(mouse.var_names)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = SAVERX.from_pretrained(trained, tgt)
        b = SAVERX.from_pretrained(trained, mouse, orthologs=table)
    assert torch.equal(a.module.network_index, b.module.network_index)
    with pytest.raises(ValueError, match="pass orthologs="):
        SAVERX.from_pretrained(trained, mouse)
    with pytest.raises(TypeError, match="pretrained model"):
        SAVERX.from_pretrained(trained, tgt, hidden_sizes=(4, 2, 4))


def test_bad_input(ref):
    dense = ref.layers["counts"].toarray()
    bad = ref.copy(); bad.layers["counts"] = dense + 0.5
    with pytest.raises(ValueError, match="allow_non_integer=True"):
        SAVERX(bad, layer="counts")
    with pytest.raises(ValueError, match="gene_filter"):
        SAVERX(ref, gene_filter="kfold")
    with pytest.raises(ValueError, match="prior_variance_forms"):
        SAVERX(ref, prior_variance_forms=("lognormal",))
    with pytest.raises(RuntimeError, match="not trained"):
        SAVERX(ref, **SMALL).get_normalized_expression()

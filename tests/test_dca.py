"""Library-level tests of `scdeep_nb.models.dca` (DCA, Eraslan et al. 2019): behaviour and bad input."""
import numpy as np
import pytest
import scipy.sparse as sp
import scipy.stats as st
import torch
from anndata import AnnData

from scdeep_nb.base import REGISTRY
from scdeep_nb.datasets import simulate
from scdeep_nb.metrics import denoising_error
from scdeep_nb.models.dca import DCA, DCA_LOSSES, DCAModule, knn_smooth

SMALL = dict(hidden_sizes=(16, 8, 16))


@pytest.fixture(scope="module")
def adata():
    a = simulate(n_cells=200, n_genes=60, n_groups=3, seed=1, lib_loc=8.0, dropout_type="experiment",
                 dropout_mid=1.0, dropout_shape=-1.0)
    return a[:, np.asarray(a.layers["counts"].sum(0)).ravel() > 0].copy()


@pytest.fixture(scope="module")
def trained(adata):
    return DCA(adata, layer="counts", **SMALL).train(max_epochs=3, progress_bar=False)


def with_counts(adata, counts):
    bad = adata.copy()
    bad.layers["counts"] = counts
    return bad


def test_registered():
    info = REGISTRY["dca"]
    assert info.cls is DCA and set(info.capabilities) == {"embed", "denoise"}


def test_reference_training_defaults():
    kw = DCA.default_train_kwargs
    assert (kw["optimizer"], kw["lr"], kw["batch_size"], kw["max_epochs"]) == ("rmsprop", 1e-3, 32, 300)
    assert kw["grad_clip_value"] == 5 and kw["validation_fraction"] == 0.1 and kw["patience"] == 15
    assert kw["scheduler"] == "plateau" and kw["scheduler_kwargs"]["patience"] == 10


def test_bad_input(adata):
    dense = adata.layers["counts"].toarray()
    with pytest.raises(ValueError, match="allow_non_integer=True"):
        DCA(with_counts(adata, dense + 0.5), layer="counts")
    DCA(with_counts(adata, dense + 0.5), layer="counts", allow_non_integer=True)
    DCA(with_counts(adata, dense + 0.5), layer="counts", loss="normal")  # squared error: integers not needed
    neg = dense.copy(); neg[0, 0] = -1
    for loss in ("zinb-conddisp", "normal"):
        with pytest.raises(ValueError, match="negative"):
            DCA(with_counts(adata, neg), layer="counts", loss=loss)
    nan = dense.copy(); nan[2, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        DCA(with_counts(adata, nan), layer="counts")
    zero = dense.copy(); zero[:, 5] = 0
    with pytest.raises(ValueError, match="zero counts"):
        DCA(with_counts(adata, zero), layer="counts")
    with pytest.raises(ValueError, match="unknown"):
        DCA(adata, layer="counts", loss="zinb_conddisp")


def test_load_onto_other_genes(trained, adata, tmp_path):
    trained.save(tmp_path / "m")
    with pytest.raises(ValueError, match="genes"):
        DCA.load(tmp_path / "m", adata[:, :30].copy())
    loaded = DCA.load(tmp_path / "m", adata)
    np.testing.assert_allclose(loaded.get_normalized_expression(), trained.get_normalized_expression(), rtol=1e-5)
    # the input transform (per-gene mean / std) travels with the weights
    assert torch.equal(loaded.module.gene_std.cpu(), trained.module.gene_std.cpu())


def test_architecture(trained, adata):
    mod = trained.module
    bns = [m for m in mod.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert len(bns) == 3 and all(not bn.weight.requires_grad and torch.all(bn.weight == 1) for bn in bns)
    z = trained.get_latent_representation()
    assert z.shape == (adata.n_obs, 8)
    assert (z < 0).any()  # centre layer before BN/ReLU, not a ReLU output
    batch = trained.data.get_batch(np.arange(5))
    with torch.no_grad():
        _, pre = mod.hidden((torch.log1p(batch["x"] / batch["size_factors"]) - mod.gene_mean) / mod.gene_std,
                            return_pre=True)
    np.testing.assert_allclose(z[:5], pre[1].numpy(), rtol=1e-5, atol=1e-6)


def test_denoised_is_size_factor_times_mean(trained):
    batch = trained.data.get_batch(np.arange(10))
    with torch.no_grad():
        out = trained.module(batch)
    mu = trained.get_normalized_expression()[:10]
    np.testing.assert_allclose(mu, (batch["size_factors"] * out["mean"]).numpy(), rtol=1e-5)
    assert out["mean"].min() >= 1e-5 and out["theta"].min() >= 1e-4 and out["theta"].max() <= 1e4


def test_zinb_loss_is_reference_mean_over_elements():
    torch.manual_seed(0)
    mod = DCAModule(4, np.zeros(4), np.ones(4), ridge_lambda=0.3).eval()
    batch = dict(x=torch.tensor([[0.0, 3, 1, 0], [5, 0, 0, 2]]), size_factors=torch.tensor([[0.7], [1.3]]))
    out = mod(batch)
    x, mu, th, pi = (t.detach().double().numpy() for t in (batch["x"], out["mu"], out["theta"], out["pi"]))
    nb = st.nbinom.pmf(x, th, th / (th + mu))
    expected = (-np.log(np.where(x == 0, pi + (1 - pi) * nb, (1 - pi) * nb)) + 0.3 * pi ** 2).mean()
    np.testing.assert_allclose(float(mod.loss(batch).loss.detach()), expected, rtol=1e-4)


@pytest.mark.parametrize("loss", DCA_LOSSES)
def test_every_loss_trains(adata, loss):
    model = DCA(adata, layer="counts", loss=loss, **SMALL).train(max_epochs=2, progress_bar=False)
    assert model.get_normalized_expression().shape == adata.shape
    assert np.isfinite(model.history["train_loss"]).all()
    if loss in ("poisson", "normal"):
        with pytest.raises(ValueError, match="has no dispersion"):
            model.get_dispersions()
    else:
        theta = model.get_dispersions()
        assert theta.shape == adata.shape
        if loss in ("nb", "zinb"):  # gene-wise: identical rows
            np.testing.assert_allclose(theta, np.broadcast_to(theta[:1], theta.shape))
    if loss.startswith("zinb"):
        pi = model.get_dropout_probabilities()
        assert ((pi > 0) & (pi < 1)).all()
    else:
        with pytest.raises(ValueError, match="loss='zinb-conddisp'"):
            model.get_dropout_probabilities()


def test_denoising_beats_observed_counts():
    a = simulate(n_cells=300, n_genes=100, n_groups=3, seed=2, lib_loc=7.5, dropout_type="experiment",
                 dropout_mid=1.0, dropout_shape=-1.0)
    a = a[:, np.asarray(a.layers["counts"].sum(0)).ravel() > 0].copy()
    counts, truth = a.layers["counts"].toarray(), np.asarray(a.layers["cell_means"])
    model = DCA(a, layer="counts").train(max_epochs=40, progress_bar=False, seed=0)
    err_dca = denoising_error(model.get_normalized_expression(), truth)["mse_log1p"]
    assert err_dca < 0.25 * denoising_error(counts, truth)["mse_log1p"]


def test_knn_smooth():
    x = np.random.default_rng(0).poisson(4, size=(40, 15)).astype(np.float32)
    np.testing.assert_allclose(knn_smooth(sp.csr_matrix(x), n_neighbors=1), x, rtol=1e-6)
    s = x.sum(1) / np.median(x.sum(1))
    everyone = knn_smooth(x, n_neighbors=40) / s[:, None]
    np.testing.assert_allclose(everyone, np.broadcast_to((x / s[:, None]).mean(0), x.shape), rtol=1e-6)
    with pytest.raises(ValueError, match="n_neighbors"):
        knn_smooth(x, n_neighbors=41)

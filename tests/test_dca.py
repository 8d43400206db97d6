"""Library-level tests of `scdeep_nb.models.dca` (DCA, Eraslan et al. 2019): behaviour and bad input."""
import warnings

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import scipy.stats as st
import torch

from scdeep_nb.base import REGISTRY
from scdeep_nb.baselines import knn_smooth
from scdeep_nb.datasets import simulate
from scdeep_nb.metrics import denoising_error
from scdeep_nb.models.dca import DCA, DCA_LOSSES, DCAModule

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
    assert kw["early_stopping"] and kw["min_delta"] == 0  # Keras EarlyStopping(patience=15)
    # Keras ReduceLROnPlateau(patience=10) with its defaults factor=0.1, min_delta=1e-4, counted as Keras counts
    assert kw["scheduler"] == "keras_plateau"
    assert kw["scheduler_kwargs"] == dict(factor=0.1, patience=10, min_delta=1e-4)


def test_fixed_seed_reproduces_the_pre_contract_outputs(fixed_counts):
    """The migration to the core contract (issue 6) did not change the maths.

    The literals were recorded with the code of commit a0a98a3 (before the migration: `git worktree add /tmp/old
    a0a98a3`, then `PYTHONPATH=/tmp/old python` running exactly the calls below, one torch thread). Five epochs with
    the default loss and settings, so neither the early stopping nor the learning-rate schedule (whose counting
    changed from PyTorch's to Keras') can act: the lr stays 1e-3 in both versions.

    With the core's plain likelihood forms the migrated code reproduces every literal to 6 significant digits. The
    core's fast likelihood kernels (commit 8a5e6ec) give the same loss and gradients up to float32 rounding (relative
    2e-7); RMSprop's first steps, which divide by a tiny running mean square, amplify that rounding to at most 0.4 %
    in the outputs below after 20 steps. The tolerances admit that and nothing larger (a changed initialisation,
    reduction or architecture moves these values by tens of percent).
    """
    a = fixed_counts
    model = DCA(a, layer="counts").train(max_epochs=5, seed=0, progress_bar=False)
    np.testing.assert_allclose(model.history.train_loss, [4.2294, 3.77179, 3.55119, 3.3793, 3.26925], rtol=1e-4)
    assert (model.history.lr == 1e-3).all()
    z, mu = model.get_latent_representation(), model.get_normalized_expression()
    np.testing.assert_allclose(z[:2, :4].ravel(), [-0.099043, 0.330886, -0.23861, 0.0748056,
                                                   0.547348, -0.539035, 0.679738, -0.127304], rtol=1e-2, atol=1e-3)
    np.testing.assert_allclose([z.mean(), np.abs(z).mean()], [0.0399833, 0.611026], rtol=1e-2)
    np.testing.assert_allclose(mu[:2, :5].ravel(), [1.8144, 1.8552, 1.61897, 1.6519, 1.67461,
                                                    1.07254, 1.15331, 0.947555, 1.46447, 2.06338], rtol=1e-2)
    np.testing.assert_allclose(mu.mean(), 1.40322, rtol=1e-3)


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
    with pytest.raises(ValueError, match=r"loss='zinb_conddisp' is not supported; choose one of"):
        DCA(adata, layer="counts", loss="zinb_conddisp")
    with pytest.raises(ValueError, match=r"zero_genes='drop' is not supported"):
        DCA(adata, layer="counts", zero_genes="drop")


def test_never_detected_genes_warn_by_default_and_error_on_request(adata):
    zero = adata.layers["counts"].toarray()
    zero[:, [5, 9]] = 0
    bad = with_counts(adata, zero)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        DCA(bad, layer="counts", **SMALL)
    messages = [str(w.message) for w in caught if "zero counts in every cell" in str(w.message)]
    assert len(messages) == 1 and messages[0].startswith("2 of")
    with pytest.raises(ValueError, match="2 genes have zero counts in every cell.*filter_genes"):
        DCA(bad, layer="counts", zero_genes="error")  # the reference's behaviour


def test_never_detected_genes_are_denoised_near_zero():
    "A subset of cells in which some genes are never seen: finite outputs, near zero for those genes (issue 7)."
    a = simulate(n_cells=60, n_genes=120, n_groups=3, seed=4, lib_loc=7.5, dropout_type="experiment",
                 dropout_mid=1.0, dropout_shape=-1.0)
    absent = np.asarray(a.layers["counts"].sum(0)).ravel() == 0
    assert absent.sum() >= 3
    for loss in ("zinb-conddisp", "nb-conddisp"):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*genes have zero counts")
            model = DCA(a, layer="counts", loss=loss).train(max_epochs=100, progress_bar=False, seed=0)
        mu = model.get_normalized_expression()
        assert np.isfinite(mu).all() and np.isfinite(model.get_latent_representation()).all()
        # measured: mean 0.045 (zinb) / 0.024 (nb) for the never-detected genes against 6-7 for the others
        assert mu[:, absent].mean() < 0.05 * mu[:, ~absent].mean(), (loss, mu[:, absent].mean())
        assert mu[:, absent].max() < 0.5


def test_tiny_inputs_name_the_limit_and_a_fix_that_works(adata):
    with pytest.raises(ValueError, match=r"batch-norm.*use batch_size >= 2"):
        DCA(adata, layer="counts", **SMALL).train(max_epochs=1, batch_size=1, progress_bar=False)
    DCA(adata, layer="counts", **SMALL).train(max_epochs=1, batch_size=2, progress_bar=False)
    one = adata[:1].copy()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*genes have zero counts")
        with pytest.raises(ValueError, match=r"batch-norm.*at least 2 training cell"):
            DCA(one, layer="counts", **SMALL).train(max_epochs=1, validation_fraction=0, progress_bar=False)
        model = DCA(one, layer="counts", batch_norm=False, **SMALL)
        model.train(max_epochs=2, validation_fraction=0, progress_bar=False)
        assert np.isfinite(model.get_normalized_expression()).all()
        # a few cells with the default 10 % validation split: it rounds to no validation cell and trains
        DCA(adata[:5].copy(), layer="counts", **SMALL).train(max_epochs=2, progress_bar=False)
        # a training set of 33 cells with batch_size=32 would leave a last minibatch of one cell: it is folded in
        DCA(adata[:33].copy(), layer="counts", **SMALL).train(max_epochs=2, validation_fraction=0, progress_bar=False)


def test_load_onto_other_genes(trained, adata, tmp_path):
    trained.save(tmp_path / "m")
    with pytest.raises(ValueError, match=r"genes.*read_saved\("):
        DCA.load(tmp_path / "m", adata[:, :30].copy())
    loaded = DCA.load(tmp_path / "m", adata)
    np.testing.assert_allclose(loaded.get_normalized_expression(), trained.get_normalized_expression(), rtol=1e-5)
    # the input transform (per-gene mean / std) travels with the weights
    assert torch.equal(loaded.module.gene_std.cpu(), trained.module.gene_std.cpu())
    # the same genes in another order: every per-gene output comes back in the AnnData's order
    flipped = DCA.load(tmp_path / "m", adata[:, ::-1].copy())
    for getter in ("get_normalized_expression", "get_dispersions", "get_dropout_probabilities"):
        np.testing.assert_allclose(getattr(flipped, getter)(), getattr(trained, getter)()[:, ::-1], rtol=1e-5)
    np.testing.assert_allclose(flipped.get_latent_representation(), trained.get_latent_representation(), rtol=1e-5)


def test_outputs_need_training(adata):
    model = DCA(adata, layer="counts", **SMALL)
    for getter in ("get_latent_representation", "get_normalized_expression", "get_dispersions",
                   "get_dropout_probabilities"):
        with pytest.raises(RuntimeError, match="not trained"):
            getattr(model, getter)()


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
    nll = -np.log(np.where(x == 0, pi + (1 - pi) * nb, (1 - pi) * nb))
    result = mod.loss(batch)
    np.testing.assert_allclose(float(result.loss.detach()), (nll + 0.3 * pi ** 2).mean(), rtol=1e-4)
    # per-cell terms (the contract): the mean over genes of each cell's entries
    np.testing.assert_allclose(result.terms["reconstruction"].detach().numpy(), nll.mean(1), rtol=1e-4)
    np.testing.assert_allclose(result.terms["ridge"].detach().numpy(), (0.3 * pi ** 2).mean(1), rtol=1e-4)
    assert result.n_obs == 2


def test_history_and_loss_terms(trained, adata):
    h = trained.history
    assert "kl_weight" not in h.columns  # no KL term: nothing to warm up or log
    assert {"train_loss", "train_reconstruction", "validation_loss", "lr"} <= set(h.columns)
    terms = trained.get_loss_terms()
    assert list(terms.columns) == ["reconstruction"] and len(terms) == adata.n_obs
    assert (terms.reconstruction > 0).all()


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


def test_denoising_beats_observed_counts_and_zinb_beats_nb_under_dropout():
    a = simulate(n_cells=300, n_genes=100, n_groups=3, seed=2, lib_loc=7.5, dropout_type="experiment",
                 dropout_mid=1.0, dropout_shape=-1.0)
    a = a[:, np.asarray(a.layers["counts"].sum(0)).ravel() > 0].copy()
    counts, truth = a.layers["counts"].toarray(), np.asarray(a.layers["cell_means"])
    errors = {}
    for loss in ("zinb-conddisp", "nb-conddisp"):
        model = DCA(a, layer="counts", loss=loss).train(max_epochs=40, progress_bar=False, seed=0)
        errors[loss] = denoising_error(model.get_normalized_expression(), truth)["mse_log1p"]
    assert errors["zinb-conddisp"] < 0.25 * denoising_error(counts, truth)["mse_log1p"]
    # the paper's zero-inflated loss beats the package's NB on data with dropout (measured ratio zinb / nb: 0.65 here,
    # 0.61-0.65 over simulation seeds 2, 3, 5; 0.35-0.43 with the full reference schedule on 1,000 cells)
    assert errors["zinb-conddisp"] < 0.8 * errors["nb-conddisp"], errors


def test_knn_smooth_baseline_is_the_core_one():
    x = np.random.default_rng(0).poisson(4, size=(40, 15)).astype(np.float32)
    np.testing.assert_allclose(knn_smooth(sp.csr_matrix(x), n_neighbors=1), x, rtol=1e-6)
    s = x.sum(1) / np.median(x.sum(1))
    everyone = knn_smooth(x, n_neighbors=40) / s[:, None]
    np.testing.assert_allclose(everyone, np.broadcast_to((x / s[:, None]).mean(0), x.shape), rtol=1e-6)
    with pytest.raises(ValueError, match="n_neighbors"):
        knn_smooth(x, n_neighbors=41)
    import scdeep_nb.models.dca as dca_module
    assert not hasattr(dca_module, "knn_smooth")  # one copy, in scdeep_nb.baselines

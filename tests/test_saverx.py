"""Library-level tests of `scdeep_nb.models.saverx` (SAVER-X, Wang et al. 2019): the three stages, transfer, bad input,
the pre-contract outputs at a fixed seed, and users' data (tiny inputs, never-detected genes, SAVER's prior rescaling)."""
import re
import tempfile
import warnings

import anndata as ad
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
    # the reference is Keras: ReduceLROnPlateau(patience 4) counted the Keras way, EarlyStopping(patience 6)
    assert kw["scheduler"] == "keras_plateau" and kw["scheduler_kwargs"]["patience"] == 4
    assert kw["patience"] == 6 and kw["restore_best"]
    assert kw["validation_fraction"] == 0.1 and SAVERX.size_factor_kind == "per10k"
    assert SAVERX.needs_validation and not SAVERX(_counts(0, 40, 10), gene_filter=None).needs_validation


def test_shrinkage_recovers_variance_form_and_posterior():
    rng = np.random.default_rng(1)
    n = 800
    s = rng.uniform(0.5, 2.0, n)
    mu = rng.uniform(1, 20, size=(n, 2))
    lam = np.column_stack([rng.gamma(1 / 0.3, 0.3 * mu[:, 0]), rng.gamma(mu[:, 1] / 2.0, 2.0)])
    x = rng.poisson(s[:, None] * lam)
    res = poisson_gamma_shrinkage(sp.csr_matrix(x), mu, s)
    assert list(res["table"].prior_form) == ["cv", "fano"]
    a, prior = 1 / res["table"].prior_parameter[0], res["prior_mean"]  # the prior after SAVER's rescaling
    np.testing.assert_allclose(res["posterior_mean"][:, 0], (x[:, 0] + a) / (s + a / prior[:, 0]), rtol=1e-8)
    np.testing.assert_allclose(res["posterior_variance"][:, 0], (x[:, 0] + a) / (s + a / prior[:, 0]) ** 2, rtol=1e-8)
    assert ((res["posterior_mean"] - lam) ** 2).mean() < ((x / s[:, None] - lam) ** 2).mean()
    with pytest.raises(ValueError, match="choose one of"):
        poisson_gamma_shrinkage(x, mu, s, forms=("poisson",))


def test_saver_prior_rescaling():
    "SAVER's calc.estimate.mean: prior * mean(x / s) / mean(prior) per gene; a prior averaging 0 becomes mean(x / s)."
    rng = np.random.default_rng(2)
    n = 400
    s = rng.uniform(0.5, 2.0, n)
    mu = rng.uniform(1, 10, size=(n, 3))
    lam = rng.gamma(1 / 0.2, 0.2 * mu)
    x = rng.poisson(s[:, None] * lam)
    y_mean = (x / s[:, None]).mean(0)
    off = mu * np.array([4.0, 0.25, 1.0])
    off[:, 2] = 0.0  # a prior that averages 0
    res = poisson_gamma_shrinkage(x, off, s)
    np.testing.assert_allclose(res["prior_mean"][:, :2], mu[:, :2] * y_mean[:2] / mu[:, :2].mean(0), rtol=1e-12)
    np.testing.assert_allclose(res["prior_mean"][:, 2], np.full(n, y_mean[2]), rtol=1e-12)
    np.testing.assert_allclose(res["prior_mean"].mean(0), y_mean, rtol=1e-12)
    # so the posterior does not depend on a per-gene scale of the prior
    np.testing.assert_allclose(res["posterior_mean"][:, :2], poisson_gamma_shrinkage(x, mu, s)["posterior_mean"][:, :2],
                               rtol=1e-6)
    # without the rescaling, a prior at the wrong level is used as given, and the estimate is worse
    plain = poisson_gamma_shrinkage(x[:, :2], off[:, :2], s, rescale_prior=False)
    np.testing.assert_allclose(plain["prior_mean"], off[:, :2])
    err = lambda r: ((r["posterior_mean"][:, :2] - lam[:, :2]) ** 2).mean()
    assert err(res) < 0.9 * err(plain), (err(res), err(plain))


def test_model_stage3_uses_the_rescaling_option(trained, ref):
    s = np.asarray(ref.layers["counts"].sum(1)).ravel() / 1e4
    prior = trained.get_normalized_expression(stage="filtered").astype(np.float64) / s[:, None]
    manual = poisson_gamma_shrinkage(ref.layers["counts"], prior, s)["posterior_mean"] * s[:, None]
    np.testing.assert_allclose(trained.get_normalized_expression(), manual, rtol=1e-5, atol=1e-6)
    plain = SAVERX(ref, layer="counts", rescale_prior=False, **SMALL).train(**FAST)
    manual_plain = poisson_gamma_shrinkage(ref.layers["counts"], prior, s, rescale_prior=False)["posterior_mean"]
    np.testing.assert_allclose(plain.get_normalized_expression(), manual_plain * s[:, None], rtol=1e-5, atol=1e-6)
    assert not np.allclose(plain.get_normalized_expression(), trained.get_normalized_expression(), rtol=1e-3)


def test_masked_loss_ignores_unmeasured_network_genes():
    torch.manual_seed(0)
    m = SAVERXModule(4, np.array([2, 0]), np.ones(2), hidden_sizes=(3, 2, 3))
    x = torch.tensor([[3.0, 1.0], [0.0, 2.0], [1.0, 1.0]])
    batch = dict(x=x, size_factors=x.sum(1, keepdim=True) / 1e4)
    out = m.loss(batch)
    base = float(out.loss.detach())
    assert out.terms["nll_observed"].shape == (3,)  # a per-cell term
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
    # the posterior mean lies between each cell's counts and the (rescaled) filtered prediction
    x = ref.layers["counts"].toarray()
    prior = poisson_gamma_shrinkage(x, filt / s[:, None], s)["prior_mean"] * s[:, None]
    lo, hi = np.minimum(x, prior), np.maximum(x, prior)
    assert ((shrunk >= lo - 1e-3 * (1 + hi)) & (shrunk <= hi + 1e-3 * (1 + hi))).all()
    # per-cell loss terms through the core; no KL weight logged for a model without a KL term
    terms = trained.get_loss_terms()
    assert list(terms.columns) == ["nll_observed"] and len(terms) == n and np.isfinite(terms.values).all()
    assert "kl_weight" not in trained.history.columns


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
    # the same genes in another order: outputs in the AnnData's order
    rev = tgt[:, ::-1].copy()
    np.testing.assert_allclose(SAVERX.load(tmp_path / "ft", rev).get_normalized_expression(), out[:, ::-1],
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="from_pretrained") as e:
        SAVERX.load(tmp_path / "ft", ref)
    assert "read_saved(" in str(e.value)
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


# --- issue 7: users' data --------------------------------------------------------------------------------------

def _suggested(message: str) -> dict:
    "The train() fix a message names ('use validation_fraction >= X' / 'use batch_size >= N'), as the shared harness reads it."
    m = re.search(r"use (batch_size|validation_fraction) ?(>=|=) ?([0-9.]+)", message)
    assert m, f"no runnable fix in: {message}"
    return {m.group(1): int(float(m.group(3))) if m.group(1) == "batch_size" else float(m.group(3))}


def test_tiny_inputs_name_a_fix_that_works(ref):
    few = ref[:5].copy()
    # the default 10 % validation split of 5 cells rounds to 0 cells, which the default gene filter needs
    with pytest.raises(ValueError) as e:
        SAVERX(few, layer="counts", **SMALL).train(**FAST)
    msg = str(e.value)
    assert "validation" in msg and "gene_filter=None" in msg and "concatenate" not in msg
    fix = _suggested(msg)
    m = SAVERX(few, layer="counts", **SMALL).train(**FAST, **fix)  # the fix in the message works
    assert np.isfinite(m.get_normalized_expression()).all()
    # validation_fraction=0 with the default filter: the same kind of message, naming a fraction that works
    with pytest.raises(ValueError) as e:
        SAVERX(ref[:30].copy(), layer="counts", **SMALL).train(validation_fraction=0, **FAST)
    SAVERX(ref[:30].copy(), layer="counts", **SMALL).train(**FAST, **_suggested(str(e.value)))
    # batch-norm needs two cells per minibatch: the core's message, and its fix works
    with pytest.raises(ValueError) as e:
        SAVERX(ref[:40].copy(), layer="counts", **SMALL).train(batch_size=1, **FAST)
    SAVERX(ref[:40].copy(), layer="counts", **SMALL).train(**FAST, **_suggested(str(e.value)))
    # one cell: a clear error, no raw library error
    with pytest.raises(ValueError, match="too few"):
        SAVERX(ref[:1].copy(), layer="counts", **SMALL).train(validation_fraction=0, **FAST)
    # the k-fold filter with too few cells: refused before training
    with pytest.raises(ValueError, match="too few for gene_filter='cv'"):
        SAVERX(few, layer="counts", gene_filter="cv", **SMALL).train(**FAST)
    # without a filter the split may be empty
    SAVERX(few, layer="counts", gene_filter=None, **SMALL).train(validation_fraction=0, **FAST)


def test_never_detected_genes(ref, tmp_path):
    zero = ref.copy()
    c = zero.layers["counts"].tolil(); c[:, :4] = 0; zero.layers["counts"] = c.tocsr()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        m = SAVERX(zero, layer="counts", **SMALL)
    assert sum("zero counts in every cell" in str(x.message) for x in w) == 1
    m.train(**FAST)
    for stage in SAVERX.STAGES:
        assert np.isfinite(m.get_normalized_expression(stage=stage)).all()
    assert np.isfinite(m.get_posterior_variance()).all() and np.isfinite(m.get_latent_representation()).all()
    np.testing.assert_array_equal(m.get_normalized_expression()[:, :4], 0)  # SAVER: estimate 0 without counts
    np.testing.assert_array_equal(m.get_posterior_variance()[:, :4], 0)
    np.testing.assert_array_equal(m.get_normalized_expression(stage="filtered")[:, :4], 0)  # the constant 0 wins
    table = m.get_gene_table()
    assert not table.detected[:4].any() and table.detected[4:].all() and not table.use_autoencoder[:4].any()
    assert np.isfinite(table.error_autoencoder).all() and np.isfinite(table.error_constant).all()
    # a model trained with all genes detected, loaded onto a query where some are never detected
    full = SAVERX(ref, layer="counts", **SMALL).train(**FAST)
    full.save(tmp_path / "full")
    q = SAVERX.load(tmp_path / "full", zero)
    out = q.get_normalized_expression()
    assert np.isfinite(out).all() and (out[:, :4] == 0).all()
    # the k-fold filter handles them too
    cv = SAVERX(zero, layer="counts", gene_filter="cv", cv_folds=3, cv_rounds=1, **SMALL).train(**FAST)
    assert np.isfinite(cv.get_normalized_expression()).all() and not cv.get_gene_table().use_autoencoder[:4].any()


# --- the migration to the core contract (issue 6) changed no result ---------------------------------------------

def _counts(seed: int, n_cells: int, n_genes: int, n_groups: int = 3) -> ad.AnnData:
    "NB counts with groups from numpy's PCG64 alone (independent of the simulator): every gene detected, no empty cell."
    rng = np.random.default_rng(seed)
    base = rng.lognormal(0.0, 1.0, n_genes)
    fold = np.exp(rng.normal(0, 1.0, (n_groups, n_genes)) * (rng.random((n_groups, n_genes)) < 0.3))
    group = rng.integers(0, n_groups, n_cells)
    lib = rng.lognormal(0.0, 0.3, n_cells)
    mean = lib[:, None] * base[None] * fold[group]
    x = rng.negative_binomial(5, 5 / (5 + mean)).astype(np.float32)
    x[0, x.sum(0) == 0] = 1; x[x.sum(1) == 0, 0] = 1
    a = ad.AnnData(sp.csr_matrix(x)); a.layers["counts"] = a.X.copy()
    a.obs_names = [f"c{i}" for i in range(n_cells)]; a.var_names = [f"g{j}" for j in range(n_genes)]
    return a


def test_same_outputs_as_before_the_core_contract():
    """Outputs at a fixed seed equal those of the pre-contract code (commit a0a98a3), where the maths did not change.

    The literals were made by running the same calls with a worktree of a0a98a3 on PYTHONPATH (CPU, one torch thread):
    stage 3 there had no prior rescaling, so the new code runs with rescale_prior=False; 4 epochs never trigger the
    learning-rate plateau (PyTorch's counting there, Keras' here); dropout is 0 (the k-fold filter's trainer seed moved
    from seed + 1 + r to seed + r, which only dropout would see). Tolerances: the stage-2 and stage-3 outputs, the
    filter's errors and the fine-tuned outputs agree to < 1e-4; the bottleneck and the raw autoencoder output to 5e-3,
    because the Dense bias before each batch-norm has a zero gradient in exact arithmetic, so RMSprop moves it by
    rounding noise (which the core's faster NB likelihood of 8a5e6ec changed) and eval-mode batch-norm sees the drift.
    """
    ref, tgt = _counts(0, 150, 40), _counts(1, 60, 40)[:, 8:].copy()
    m = SAVERX(ref, layer="counts", rescale_prior=False, **SMALL).train(max_epochs=4, progress_bar=False, device="cpu",
                                                                        seed=0)
    close = lambda got, want, rtol=1e-4: np.testing.assert_allclose(got, want, rtol=rtol, atol=1e-7)
    h = m.history
    assert (h.lr == 1e-3).all() and len(h) == 4
    close(h.train_loss, [7.68629539, 7.56858388, 7.48775214, 7.419562], 1e-5)
    expected = dict(
        autoencoder=(56.90217056, [0.00156790344, 0.00185501308, 0.00414854661, 0.00613147486, 0.0111771245,
                                   0.0192584097, 0.00405667536, 0.00995188113, 0.00754131423], 5e-3),
        filtered=(9063.103808, [0.689788878, 0.498317689, 1.13381064, 2.67015052, 1.92897165, 4.38894415, 1.04580891,
                                0.755513847, 1.7190032], 1e-4),
        shrunk=(9085.206543, [0.594081342, 0.516654789, 1.11713648, 1.64456677, 2.06611824, 4.60603094, 1.42942369,
                              0.823201835, 1.94639099], 1e-4))
    for stage, (total, corner, rtol) in expected.items():
        out = m.get_normalized_expression(stage=stage).astype(np.float64)
        close(out.sum(), total, rtol); close(out[:3, :3].ravel(), corner, rtol)
    var = m.get_posterior_variance().astype(np.float64)
    close(var.sum(), 3709.067613)
    close(var[:2, :3].ravel(), [0.0824281871, 0.0188843757, 0.139206454, 0.631665111, 0.264569134, 1.63636148])
    lat = m.get_latent_representation().astype(np.float64)
    close(np.abs(lat).sum(), 1875.144746, 5e-3)
    close(lat[0], [-0.651630759, -0.168850258, 0.943566561, 4.58876038, 0.312734604, 3.47935271, 3.15214014,
                   2.58341169], 5e-3)
    table = m.get_gene_table()
    assert list(np.flatnonzero(table.use_autoencoder)) == [12]
    close(table.error_autoencoder[:5], [8.52671385, 5.44350035, 15.2492468, 7.18196122, 1.85707793])
    assert list(table.prior_form[:8]) == ["cv", "variance", "variance", "cv", "variance", "variance", "cv", "cv"]
    # the k-fold filter (now trained through the core's fit_module)
    cv = SAVERX(ref, layer="counts", gene_filter="cv", cv_folds=4, cv_rounds=2, rescale_prior=False, **SMALL).train(
        max_epochs=2, progress_bar=False, device="cpu", seed=0)
    tc = cv.get_gene_table()
    close(tc.error_autoencoder[:5], [17.4312789, 12.5415099, 41.1348232, 22.7203206, 4.68524581])
    close(tc.error_constant[:5], [3.25381974, 2.45969097, 4.16900765, 3.57293211, 1.67650006])
    # fine-tuning from the saved model (now read with read_saved)
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m.save(d + "/m")
        ft = SAVERX.from_pretrained(d + "/m", tgt, layer="counts", rescale_prior=False).train(
            max_epochs=3, progress_bar=False, device="cpu", seed=0)
        filt, shrunk = (ft.get_normalized_expression(stage=s).astype(np.float64) for s in ("filtered", "shrunk"))
    close(filt.sum(), 3249.723024)
    close(filt[:2, :4].ravel(), [1.02917635, 1.13821781, 1.09391069, 2.17101121, 1.30103433, 1.43887913, 1.38286817,
                                 2.74448609])
    close(shrunk.sum(), 3252.871545)
    close(shrunk[:2, :4].ravel(), [1.41011608, 0.979879916, 1.07643092, 1.05120468, 1.23105061, 1.87330544,
                                   1.52127314, 1.74339437])

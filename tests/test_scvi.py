"""Library-level behaviour tests of scdeep_nb.models.scvi (fast: one small fit shared by the tests)."""
import inspect
import warnings

import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp
import torch
from sklearn.metrics import roc_auc_score

from scdeep_nb.checks import tiny_data
from scdeep_nb.datasets import simulate
from scdeep_nb.metrics import batch_asw, ilisi, leiden_ari
from scdeep_nb.models import REGISTRY
from scdeep_nb.models.scvi import (SCVI, SCVIModule, bayes_factor_de, estimate_pseudocounts, pair_samples,
                                   scvi_max_epochs)


@pytest.fixture(scope="module")
def sim():
    adata = simulate(n_cells=500, n_genes=200, n_groups=3, n_batches=2, seed=1, lib_loc=9.0, batch_fac_loc=0.15,
                     batch_fac_scale=0.15, de_prob=0.2, de_fac_loc=0.8, de_fac_scale=0.3)
    return adata[:, np.asarray((adata.layers["counts"] > 0).sum(0)).ravel() >= 3].copy()


@pytest.fixture(scope="module")
def fitted(sim):
    return SCVI(sim, layer="counts", batch_key="batch").train(max_epochs=250, progress_bar=False, device="cpu")


def test_registered():
    assert REGISTRY["scvi"].cls is SCVI
    assert set(REGISTRY["scvi"].capabilities) == {"embed", "denoise"}


def test_training_defaults(sim):
    model = SCVI(sim, layer="counts", batch_key="batch")
    assert model.default_train_kwargs["optimizer_kwargs"] == {"eps": 0.01}
    assert model.default_train_kwargs["weight_decay"] == 1e-6 and model.default_train_kwargs["batch_size"] == 128
    assert scvi_max_epochs(600) == 400 and scvi_max_epochs(40_000) == 200
    model.train(max_epochs=3, progress_bar=False, device="cpu")
    # KL warm-up counted in steps and never longer than training (scvi-tools #1569): here 3 epochs' worth
    steps_per_epoch = int(np.ceil((sim.n_obs - round(0.1 * sim.n_obs)) / 128))
    assert model.kl_warmup_steps == 3 * steps_per_epoch
    assert model.history.kl_weight.iloc[-1] == pytest.approx(1 - 1 / model.kl_warmup_steps)
    # early stopping (off by default) monitors the validation ELBO at KL weight 1
    assert model.default_train_kwargs["early_stopping"] is False
    model = SCVI(sim, layer="counts", batch_key="batch").train(max_epochs=4, early_stopping=True, patience=1,
                                                               progress_bar=False, device="cpu")
    assert "validation_neg_elbo" in model.history and model.trainer.monitor == "validation_neg_elbo"


def test_latent_mixes_batches_and_keeps_groups(sim, fitted):
    z = fitted.get_latent_representation()
    pca = sim.copy()
    pca.X = pca.layers["counts"].copy()
    sc.pp.normalize_total(pca, target_sum=1e4)
    sc.pp.log1p(pca)
    sc.pp.pca(pca, n_comps=z.shape[1], random_state=0)
    batch, group = sim.obs["batch"].to_numpy(), sim.obs["group"].to_numpy()
    e_pca = pca.obsm["X_pca"]
    assert ilisi(z, batch) > ilisi(e_pca, batch)
    assert batch_asw(z, batch, group) > batch_asw(e_pca, batch, group)
    assert leiden_ari(z, group) >= leiden_ari(e_pca, group) - 0.05


def test_de_defaults_are_scvi_tools(sim):
    "Defaults of scvi-tools 1.4.2's differential_expression / get_bayes_factors (vanilla, delta 0.25, three-form...)."
    defaults = {k: p.default for k, p in inspect.signature(SCVI.differential_expression).parameters.items()}
    assert defaults["mode"] == "vanilla" and defaults["delta"] == 0.25 and defaults["test_mode"] == "three"
    assert defaults["pseudocounts"] is None and defaults["threshold_counts"] == 0.01
    assert defaults["n_samples_overall"] == 5000 and defaults["use_permutation"] is False
    assert defaults["m_permutation"] == 10000 and defaults["batch_correction"] is False
    assert defaults["fdr_target"] == 0.05 and defaults["all_stats"] is True
    assert inspect.signature(bayes_factor_de).parameters["mode"].default == "vanilla"
    # three-form test: P(up) = 0.6, P(down) = 0.3 gives proba_de = max = 0.6 (two-form: the sum, 0.9)
    lfc = np.r_[np.full(60, 1.0), np.full(30, -1.0), np.zeros(10)]
    s1, s2 = np.full((100, 1), 0.01) * 2.0 ** lfc[:, None], np.full((100, 1), 0.01)
    assert bayes_factor_de(s1, s2, mode="change")["proba_de"][0] == pytest.approx(0.6)
    assert bayes_factor_de(s1, s2, mode="change", test_mode="two")["proba_de"][0] == pytest.approx(0.9)
    # pseudocount rule: 90th percentile of the largest sampled rho of not-expressed genes, / n_genes, >= 1e-10
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0, 1e-3, (50, 10)), rng.uniform(0, 2e-3, (50, 10))
    off = np.arange(10) < 4
    assert estimate_pseudocounts(a, b, off, off) == pytest.approx(np.quantile(b.max(0)[:4], 0.9) / 10)
    assert estimate_pseudocounts(a, b, ~off & False, ~off & False) == 1e-10
    # default pairing: the i-th samples; with equal decoding batches, only within a batch
    i1, i2 = pair_samples(5, 7)
    assert (i1 == np.arange(5)).all() and (i2 == np.arange(5)).all()
    b1, b2 = np.array(["a", "b", "a", "b"]), np.array(["b", "b", "a", "a"])
    i1, i2 = pair_samples(4, 4, b1, b2)
    assert (b1[i1] == b2[i2]).all() and len(i1) == 4


def test_de_table_like_scvi_tools(sim, fitted):
    genes = set(sim.var_names)
    de = fitted.differential_expression("group", n_samples_overall=1000)
    assert list(de.columns) == ["proba_m1", "proba_m2", "bayes_factor", "scale1", "scale2", "raw_mean1", "raw_mean2",
                                "non_zeros_proportion1", "non_zeros_proportion2", "raw_normalized_mean1",
                                "raw_normalized_mean2", "expressed", "comparison", "group1", "group2"]
    change = fitted.differential_expression("group", mode="change", n_samples_overall=1000)
    assert {"proba_de", "proba_not_de", "pseudocounts", "delta", "lfc_mean", "lfc_median", "lfc_std",
            "is_de_fdr_0.05"} <= set(change.columns)
    for table, key in ((de, "bayes_factor"), (change, "proba_de")):
        for g in sim.obs["group"].cat.categories:
            block = table[table.group1 == g]
            assert set(block.index) == genes and block.index.is_unique  # indexed by gene name
            assert block.group2.eq("Rest").all() and block.comparison.eq(f"{g} vs Rest").all()
            assert block[key].is_monotonic_decreasing
    assert (change.pseudocounts > 0).all() and change.delta.eq(0.25).all()
    np.testing.assert_allclose(de.proba_m1 + de.proba_m2, 1.0)
    two = fitted.differential_expression("group", group1="Group1", group2="Group2", n_samples_overall=500)
    assert two.comparison.eq("Group1 vs Group2").all() and len(two) == sim.n_vars
    with pytest.raises(ValueError, match="batch_correction=True"):
        fitted.differential_expression("group", batchid1=["Batch1"])
    with pytest.raises(ValueError, match="Batch1"):
        fitted.differential_expression("group", batch_correction=True, batchid1=["Batch9"])


def test_de_ranks_true_markers(sim, fitted):
    "On strong, clean markers every ranking beats chance by far and stays within 0.05 of Wilcoxon's AUROC."
    # measured (seed 1, 250 epochs): ours 0.86-0.92 per group and ranking, Wilcoxon 0.86-0.89; worst gap -0.022
    lognorm = sim.copy()
    lognorm.X = lognorm.layers["counts"].copy()
    sc.pp.normalize_total(lognorm, target_sum=1e4)
    sc.pp.log1p(lognorm)
    sc.tl.rank_genes_groups(lognorm, "group", method="wilcoxon")
    tables = {"vanilla": (fitted.differential_expression("group", n_samples_overall=2000), "bayes_factor"),
              "change": (fitted.differential_expression("group", mode="change", n_samples_overall=2000), "proba_de"),
              "batch_correction": (fitted.differential_expression("group", batch_correction=True,
                                                                  n_samples_overall=2000), "bayes_factor")}
    for g in sim.obs["group"].cat.categories:
        truth = sim.var[f"is_de_{g}"]
        wilcoxon = roc_auc_score(truth, sc.get.rank_genes_groups_df(lognorm, g).set_index("names")
                                 .loc[sim.var_names, "scores"].abs())
        for name, (table, key) in tables.items():
            values = table[table.group1 == g].loc[sim.var_names, key]
            auc = roc_auc_score(truth, values.abs() if key == "bayes_factor" else values)
            assert auc > 0.8, (g, name, auc)
            assert auc > wilcoxon - 0.05, (g, name, auc, wilcoxon)


def test_outputs_and_save_load(sim, fitted, tmp_path):
    rho = fitted.get_normalized_expression(library_size=1.0)
    np.testing.assert_allclose(rho.sum(1), 1.0, atol=1e-4)
    assert fitted.posterior_predictive_sample(n_samples=2).shape == (*sim.shape, 2)
    sub = np.arange(40)
    assert fitted.get_marginal_ll(indices=sub, n_mc_samples=20) > -fitted.get_elbo(indices=sub)
    fitted.save(tmp_path / "m")
    loaded = SCVI.load(tmp_path / "m", sim)
    np.testing.assert_allclose(loaded.get_latent_representation(), fitted.get_latent_representation(), atol=1e-5)
    np.testing.assert_allclose(loaded.get_normalized_expression(transform_batch="Batch2"),
                               fitted.get_normalized_expression(transform_batch="Batch2"), rtol=1e-4, atol=1e-3)


def test_bad_input(sim):
    logged = sim.copy()
    sc.pp.normalize_total(logged, target_sum=1e4, layer="counts")
    sc.pp.log1p(logged, layer="counts")
    with pytest.raises(ValueError, match="allow_non_integer=True"):
        SCVI(logged, layer="counts", batch_key="batch")
    SCVI(logged, layer="counts", batch_key="batch", allow_non_integer=True)  # the override works
    with pytest.raises(ValueError, match="labels_key"):
        SCVI(sim, layer="counts", dispersion="gene-label")
    with pytest.raises(ValueError, match="gene_likelihood"):
        SCVI(sim, layer="counts", gene_likelihood="gaussian")
    with pytest.raises(KeyError, match="no_such"):
        SCVI(sim, layer="counts", batch_key="no_such")


def test_module_options_and_bayes_factor():
    x = torch.poisson(torch.rand(12, 30) * 4) + (torch.arange(30) == 0).float()
    b = dict(x=x, batch=torch.randint(0, 2, (12,)), labels=torch.randint(0, 3, (12,)))
    for disp in ("gene", "gene-batch", "gene-label", "gene-cell"):
        for lik in ("zinb", "nb", "poisson"):
            for observed in (True, False):
                m = SCVIModule(30, 2, 3, n_hidden=8, n_latent=3, gene_likelihood=lik, dispersion=disp,
                               use_observed_lib_size=observed, library_log_means=[3.0, 3.0],
                               library_log_vars=[0.5, 0.5])
                out = m.loss(b)
                assert torch.isfinite(out.loss)
                assert out.terms["reconstruction"].shape == (12,)  # per-cell terms
                assert bool((out.terms["kl_library"] == 0).all()) == observed
    rng = np.random.default_rng(0)
    s1, s2 = np.full((300, 5), 0.2) * np.exp(rng.normal(0, 0.05, (300, 5))), np.full((300, 5), 0.2)
    s1[:, 0] *= 3
    res = bayes_factor_de(s1, s2, mode="change")
    assert res["proba_de"][0] > 0.99 and res["proba_de"][1:].max() < 0.5


# --- the core contract (issue 6) and users' data (issue 7) --------------------------------------------------------

def test_fixed_seed_same_outputs_as_before_the_migration():
    "Values recorded with the pre-contract code (commit 851550f): the maths did not change, nor the seeded training."
    adata = simulate(n_cells=120, n_genes=40, n_groups=2, n_batches=2, seed=3, lib_loc=8.0)
    adata = adata[:, np.asarray((adata.layers["counts"] > 0).sum(0)).ravel() > 0].copy()
    model = SCVI(adata, layer="counts", batch_key="batch", n_hidden=16, n_latent=3)
    model.train(max_epochs=5, seed=0, device="cpu", progress_bar=False, batch_size=32)
    np.testing.assert_allclose(model.get_latent_representation()[:3],
                               [[-0.32204401, 0.43358365, 0.24661878], [-0.08260752, 0.5833093, 0.37605846],
                                [-0.35018626, 0.2921761, 0.42291036]], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(model.get_normalized_expression()[:2, :4],
                               [[65.71364, 106.12939, 110.08399, 65.30403], [65.37577, 104.14602, 110.48668, 64.51397]],
                               rtol=1e-4)
    np.testing.assert_allclose(model.get_normalized_expression(transform_batch="Batch2", library_size=1.0)[:2, :4],
                               [[0.022350082, 0.022980476, 0.023749117, 0.024886724],
                                [0.022054084, 0.022979558, 0.023258273, 0.024869654]], rtol=1e-4)
    np.testing.assert_allclose(model.history.train_loss.iloc[-1], 231.22278114601417, rtol=1e-5)


@pytest.fixture(scope="module")
def tiny():
    return tiny_data(n_cells=120, n_genes=40, seed=2)


def test_never_detected_genes(tiny):
    "Issue 7 section 1: kept with one warning, normal training, finite near-zero outputs, DE rows marked."
    zero = tiny.copy()
    for key in ("counts",):
        counts = zero.layers[key].toarray()
        counts[:, :3] = 0
        zero.layers[key] = sp.csr_matrix(counts)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = SCVI(zero, layer="counts", batch_key="batch", n_hidden=16)
    assert sum("3 of" in str(w.message) and "zero counts in every cell" in str(w.message) for w in caught) == 1
    model.train(max_epochs=50, batch_size=32, progress_bar=False, device="cpu")
    assert not model.module.gene_detected[:3].any() and model.module.gene_detected[3:].all()
    rho = model.get_normalized_expression()
    assert np.isfinite(rho).all() and np.isfinite(model.get_latent_representation()).all()
    assert np.isfinite(model.get_marginal_ll(n_mc_samples=5)) and np.isfinite(model.get_elbo())
    # near zero next to the detected genes (measured 0.09 after these 50 epochs; ZINB without the rule: 1.7)
    assert rho[:, :3].mean() < 0.2 * rho[:, 3:].mean()
    de = model.differential_expression("group", n_samples_overall=300)
    assert np.isfinite(de.select_dtypes("number").to_numpy()).all()
    assert not de.loc[zero.var_names[:3], "expressed"].any() and de.loc[zero.var_names[3:], "expressed"].all()
    change = model.differential_expression("group", mode="change", n_samples_overall=300)
    assert not change.loc[zero.var_names[:3], "expressed"].any() and (change.pseudocounts > 1e-10).all()


def test_tiny_inputs(tiny):
    "Issue 7 section 2: batch-norm limits are clear errors whose suggested fix works."
    with pytest.raises(ValueError, match="batch_size >= 2"):
        SCVI(tiny, layer="counts", n_hidden=8).train(max_epochs=1, batch_size=1, progress_bar=False, device="cpu")
    SCVI(tiny, layer="counts", n_hidden=8).train(max_epochs=1, batch_size=2, progress_bar=False, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one cell: most of its genes have no count
        one = SCVI(tiny[:1].copy(), layer="counts", n_hidden=8)
    with pytest.raises(ValueError, match="too few|at least 2"):
        one.train(max_epochs=1, validation_fraction=0.0, progress_bar=False, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        few = SCVI(tiny[:5].copy(), layer="counts", n_hidden=8)
    few.train(max_epochs=2, progress_bar=False, device="cpu")  # 5 cells, default split: trains
    assert np.isfinite(few.get_latent_representation()).all()


def test_batches_without_training_cells(tiny):
    "Issue 7 section 3: decoding in, or correcting towards, an unused batch category is an error naming the seen ones."
    unused = tiny.copy()
    unused.obs["batch"] = pd.Categorical(unused.obs["batch"].astype(str),
                                         categories=sorted(unused.obs["batch"].astype(str).unique()) + ["never_seen"])
    model = SCVI(unused, layer="counts", batch_key="batch", n_hidden=16).train(max_epochs=5, progress_bar=False,
                                                                                device="cpu")
    seen = ["Batch1", "Batch2"]
    assert model.seen_batches == seen
    for call in (lambda: model.get_normalized_expression(transform_batch="never_seen"),
                 lambda: model.get_normalized_expression(transform_batch=["Batch1", "never_seen"]),
                 lambda: model.differential_expression("group", batch_correction=True, batchid1=["never_seen"])):
        with pytest.raises(ValueError, match=r"never_seen.*\['Batch1', 'Batch2'\]"):
            call()
    # batch-corrected DE decodes in the seen batches only: the same table as naming them explicitly
    auto = model.differential_expression("group", batch_correction=True, n_samples_overall=400)
    named = model.differential_expression("group", batch_correction=True, batchid1=seen, batchid2=seen,
                                          n_samples_overall=400)
    pd.testing.assert_frame_equal(auto, named)


def test_reordered_genes_and_query_with_undetected_genes(tiny, tmp_path):
    "Issue 7 section 4: the same genes in another order work (outputs in the user's order); zero genes in a query."
    model = SCVI(tiny, layer="counts", batch_key="batch", n_hidden=16).train(max_epochs=5, progress_bar=False,
                                                                              device="cpu")
    model.save(tmp_path / "m")
    reversed_genes = tiny[:, ::-1].copy()
    loaded = SCVI.load(tmp_path / "m", reversed_genes)
    np.testing.assert_allclose(loaded.get_normalized_expression(), model.get_normalized_expression()[:, ::-1],
                               rtol=1e-5)
    np.testing.assert_allclose(loaded.posterior_predictive_sample().shape, tiny.shape)
    de1 = model.differential_expression("group", n_samples_overall=300)
    de2 = loaded.differential_expression("group", n_samples_overall=300)
    pd.testing.assert_frame_equal(de1, de2)  # indexed by gene name: same rows whatever the column order
    assert list(SCVI.saved_var_names(tmp_path / "m")) == list(tiny.var_names)
    query = tiny.copy()
    counts = query.layers["counts"].toarray()
    counts[:, :2] = 0
    query.layers["counts"] = sp.csr_matrix(counts)
    on_query = SCVI.load(tmp_path / "m", query)
    assert np.isfinite(on_query.get_normalized_expression()).all()
    assert np.isfinite(on_query.get_latent_representation()).all()
    with pytest.raises(ValueError, match="read_saved"):
        SCVI.load(tmp_path / "m", tiny[:, :10].copy())


def test_loss_terms_are_per_cell(tiny):
    "Issue 6: get_elbo / get_reconstruction_error are means of the loss's per-cell terms."
    model = SCVI(tiny, layer="counts", batch_key="batch", n_hidden=16).train(max_epochs=3, progress_bar=False,
                                                                              device="cpu")
    torch.manual_seed(0)
    terms = model.get_loss_terms()
    assert list(terms.index) == list(tiny.obs_names)
    assert {"reconstruction", "kl_z", "kl_library", "neg_elbo"} <= set(terms.columns)
    np.testing.assert_allclose(terms.neg_elbo, terms.reconstruction + terms.kl_z + terms.kl_library, rtol=1e-5)
    torch.manual_seed(0)
    assert model.get_elbo() == pytest.approx(float(terms.neg_elbo.mean()), rel=1e-5)

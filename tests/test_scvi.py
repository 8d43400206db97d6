"""Library-level behaviour tests of scdeep_nb.models.scvi (fast: one small fit shared by the tests)."""
import numpy as np
import pytest
import scanpy as sc
import torch
from sklearn.metrics import roc_auc_score

from scdeep_nb.datasets import simulate
from scdeep_nb.metrics import batch_asw, ilisi, leiden_ari
from scdeep_nb.models import REGISTRY
from scdeep_nb.models.scvi import SCVI, SCVIModule, bayes_factor_de, scvi_max_epochs


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


def test_de_ranks_true_markers(sim, fitted):
    de = fitted.differential_expression("group", n_samples=1000, m_permutation=5000)
    assert {"proba_de", "bayes_factor", "lfc_mean", "lfc_median", "group1", "group2", "gene"} <= set(de.columns)
    for g in sim.obs["group"].cat.categories:
        res = de[de.group1 == g]
        assert res.group2.eq("rest").all() and res.proba_de.is_monotonic_decreasing
        res = res.set_index("gene").loc[sim.var_names]
        assert roc_auc_score(sim.var[f"is_de_{g}"], res.proba_de) > 0.75


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
                assert (out.terms["kl_library"].item() == 0) == observed
    rng = np.random.default_rng(0)
    s1, s2 = np.full((300, 5), 0.2) * np.exp(rng.normal(0, 0.05, (300, 5))), np.full((300, 5), 0.2)
    s1[:, 0] *= 3
    res = bayes_factor_de(s1, s2)
    assert res["proba_de"][0] > 0.99 and res["proba_de"][1:].max() < 0.5

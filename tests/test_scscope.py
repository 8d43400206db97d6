"""Behaviour tests of scdeep_nb.models.scscope: imputation vs raw counts against the truth, clustering vs Leiden on PCA,
batch offsets, the loss, documented errors."""
import numpy as np
import pytest
import torch

from scdeep_nb.baselines import leiden, pca
from scdeep_nb.checks import tiny_data
from scdeep_nb.datasets import simulate
from scdeep_nb.metrics import ari, denoising_error
from scdeep_nb.models import REGISTRY
from scdeep_nb.models.scscope import ScScope, ScScopeModule, ScScopePlan, scalable_cluster
from scdeep_nb.train import StepContext


@pytest.fixture(scope="module")
def sim():
    adata = simulate(n_cells=400, n_genes=200, n_groups=4, seed=2, lib_loc=8.5, de_prob=0.2, de_fac_loc=0.3,
                     dropout_type="experiment", dropout_mid=0.0)
    return adata[:, np.asarray((adata.layers["counts"] > 0).sum(0)).ravel() >= 3].copy()


@pytest.fixture(scope="module")
def fitted(sim):
    return ScScope(sim, layer="counts").train(max_epochs=100, lr=1e-3, progress_bar=False, device="cpu")


def _log_scaled(M):
    M = np.asarray(M, dtype=np.float64)
    return np.log1p(M / M.sum(1, keepdims=True) * 1e4)


def test_registered():
    info = REGISTRY["scscope"]
    assert info.cls is ScScope and set(info.capabilities) == {"embed", "denoise", "cluster"}
    assert ScScope.default_train_kwargs["lr"] == 1e-4 and ScScope.default_train_kwargs["batch_size"] == 64
    assert ScScope.default_train_kwargs["optimizer_kwargs"]["betas"][0] == 0.05


def test_imputation_beats_raw_counts(sim, fitted):
    "Against the simulation's truth: imputed dropout entries are closer than the zeros, and so is the whole matrix"
    " when the observed counts are kept (the reference output, y_T everywhere, is not: see the notebook)."
    counts, truth = sim.layers["counts"].toarray(), np.asarray(sim.layers["cell_means"])
    dropout = (counts == 0) & (sim.layers["true_counts"].toarray() > 0)
    err = lambda est: float(((_log_scaled(est) - _log_scaled(truth))[dropout] ** 2).mean())
    imputed = fitted.get_normalized_expression()
    assert err(imputed) < 0.8 * err(counts), (err(imputed), err(counts))
    kept = fitted.get_normalized_expression(keep_observed=True)
    assert denoising_error(kept, truth)["mse_log1p"] < denoising_error(counts, truth)["mse_log1p"]


def test_clusters_at_least_as_well_as_leiden_on_pca(sim, fitted):
    """scScope's own clustering (predict) against Leiden on PCA, resolution 1.0. Measured at this setting (400 cells,
    100 epochs, lr 1e-3), simulation seeds 2/3/4: scScope ARI 0.714/0.953/0.535, Leiden on PCA 0.721/0.511/0.411.
    On this seed the two tie (-0.007), so "at least as well" is asserted within 0.05 ARI. (At 2 000 cells x 500 genes,
    seed 3, Leiden on PCA wins, 0.90 against 0.82: see the notebook.)"""
    truth = sim.obs["group"].to_numpy()
    scscope_ari = ari(truth, fitted.predict())
    pca_ari = ari(truth, leiden(pca(sim, n_comps=50, layer="counts"), 1.0))
    assert scscope_ari >= pca_ari - 0.05, (scscope_ari, pca_ari)


def test_loss_is_the_masked_frobenius_norm_summed_over_passes():
    module = ScScopeModule(5, n_latent=3, T=2)
    batch = dict(x=torch.tensor([[1.0, 0, 2, 0, 4], [0, 3, 0, 1, 0]]), size_factors=torch.ones(2, 1),
                 batch=torch.zeros(2, dtype=torch.long))
    with torch.no_grad():
        out, x = module(batch), batch["x"]
        expected = sum(torch.linalg.norm((y - x) * (x != 0)) for y in out["outputs"])  # not squared
        torch.testing.assert_close(module.loss(batch).loss, expected)
        u1, u2 = out["inputs"]
        assert torch.equal(u2[x != 0], x[x != 0]) and torch.equal(u1, x)  # only zeros are imputed


def test_batch_offsets_start_at_zero_and_get_their_own_update():
    module = ScScopeModule(4, n_latent=3, n_batches=2)
    assert torch.equal(module.batch_offsets.detach(), torch.zeros(2, 4))
    plan = ScScopePlan(module, optimizer="adam", lr=0.01)
    assert sorted(plan.configure_optimizers()) == ["batch_offsets", "network"]
    assert all(p is not module.batch_offsets for p in plan.optimizers["network"].param_groups[0]["params"])
    batch = dict(x=torch.tensor([[1.0, 0, 3, 2], [0, 2, 1, 1]]), size_factors=torch.ones(2, 1),
                 batch=torch.tensor([0, 1]))
    plan.training_step(batch, StepContext())
    assert (module.batch_offsets != 0).any()
    assert sorted(ScScopePlan(ScScopeModule(4)).configure_optimizers()) == ["network"]


def test_unknown_batch_at_inference_is_a_clear_error():
    tiny = tiny_data()
    model = ScScope(tiny, layer="counts", batch_key="batch", n_latent=4).train(max_epochs=2, lr=1e-3,
                                                                                progress_bar=False)
    assert model.get_batch_offsets().shape == (2, tiny.n_vars)
    other = tiny.copy()
    other.obs["batch"] = other.obs["batch"].astype(str).replace("Batch2", "Batch9")
    for getter in (model.get_latent_representation, model.get_normalized_expression, model.predict):
        with pytest.raises(ValueError, match="Batch9"):
            getter(other)
    plain = ScScope(tiny, layer="counts", n_latent=4).train(max_epochs=1, progress_bar=False)
    with pytest.raises(ValueError, match="without batches"):
        plain.get_batch_offsets()


def test_scalable_cluster_finds_separated_groups():
    rng = np.random.default_rng(0)
    blobs = np.concatenate([rng.normal(c, 0.3, (200, 4)) for c in (0, 6, 12)])
    labels = scalable_cluster(blobs, n_subsets=2, n_centroids=15)
    assert ari(np.repeat([0, 1, 2], 200), labels) == 1.0
    with pytest.raises(ValueError, match="n_subsets"):
        scalable_cluster(blobs, n_subsets=10_000)

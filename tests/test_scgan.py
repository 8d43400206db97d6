"""scGAN / cscGAN and Ghahramani et al.'s GAN (scdeep_nb.models.scgan): behaviour on a simulation with known cell
types, against an untrained generator and the classical per-cluster NB sampler, plus round-trips and errors.

Margins were measured with the settings below (seed 0); see nbs/21_models.scgan.ipynb for the larger runs.
"""
import tempfile
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from scdeep_nb.checks import tiny_data
from scdeep_nb.datasets import simulate
from scdeep_nb.metrics import classifier_auc, knn_accuracy, mmd
from scdeep_nb.models.scgan import (SCGAN, GANTrainingError, GhahramaniGAN, WGANTrainingPlan, sample_nb_clusters,
                                    scgan_preprocess)

torch.set_num_threads(1)
SMALL = dict(latent_dim=32, generator_sizes=(64, 128), critic_sizes=(128, 64))
GH_SMALL = dict(latent_dim=32, generator_sizes=(128, 128), critic_sizes=(64, 64))


def _log_lsn(X, total):
    X = X.toarray() if sp.issparse(X) else np.asarray(X, dtype=np.float64)
    return np.log1p(X * (total / np.maximum(X.sum(1, keepdims=True), 1)))


@pytest.fixture(scope="module")
def sim():
    "Three cell types, 600 cells x 150 genes; one third held out (never seen by any generator)."
    a = simulate(n_cells=600, n_genes=150, n_groups=3, group_prob=[0.4, 0.35, 0.25], seed=0, lib_loc=8.0,
                 de_prob=0.3, de_fac_loc=0.5)
    a = scgan_preprocess(a, layer="counts")
    perm = np.random.default_rng(0).permutation(a.n_obs)
    test, train = a[np.sort(perm[: a.n_obs // 3])].copy(), a[np.sort(perm[a.n_obs // 3:])].copy()
    lib = float(a.n_vars)
    return dict(train=train, test=test, lib=lib, real_test=_log_lsn(test.layers["counts"], lib))


def _untrained_mmd(model, real, n, lsn=True):
    "MMD to `real` of cells from an untrained generator of the same model (fresh weights from build_module)."
    torch.manual_seed(0)
    m0 = model.build_module().eval()
    with torch.no_grad():
        if lsn:
            p = np.asarray(model.label_counts, dtype=float)
            y = torch.as_tensor(np.random.default_rng(0).choice(len(p), n, p=p / p.sum()))
            return mmd(real, np.log1p(m0.generate(m0.noise(n, torch.device("cpu")), y).numpy()), seed=0)
        return mmd(real, m0.unscale(m0.generate(m0.noise(n, torch.device("cpu")))).numpy(), seed=0)


@pytest.fixture(scope="module")
def cscgan(sim):
    "A cscGAN trained for 40 epochs of 32 cells (~480 critic steps) with the CPU run's settings of the notebook."
    m = SCGAN(sim["train"], layer="counts", labels_key="group", library_size=sim["lib"], output_bias_init="mean",
              **SMALL)
    first = _untrained_mmd(m, sim["real_test"], sim["test"].n_obs)
    m.train(max_epochs=40, lr=1e-3, batch_size=32, seed=0, progress_bar=False)
    return dict(model=m, first_mmd=first)


def test_cscgan_training_improves_realism_but_loses_to_per_cluster_nb(sim, cscgan):
    m, n = cscgan["model"], sim["test"].n_obs
    gen = np.log1p(m.sample(n, seed=0).X.toarray())
    last = mmd(sim["real_test"], gen, seed=0)
    nb = np.log1p(sample_nb_clusters(sim["train"], n, "group", "counts", library_size=sim["lib"], seed=0).X.toarray())
    nb_mmd = mmd(sim["real_test"], nb, seed=0)
    # measured (seed 0): MMD 1 epoch ~0.5, after 60 epochs ~0.1; per-cluster NB ~0.02
    assert last < 0.5 * cscgan["first_mmd"], (cscgan["first_mmd"], last)
    # the classical sampler wins on this budget (Splat is a per-group NB model): documented, not hidden
    assert nb_mmd < 0.5 * last, (nb_mmd, last)
    assert classifier_auc(sim["real_test"], nb, seed=0) < 0.8


def test_conditional_samples_carry_their_labels_marker_profile(sim, cscgan):
    "The mean profile of cells generated for a label correlates best with that label's real marker profile."
    m, test, real = cscgan["model"], sim["test"], sim["real_test"]
    y = test.obs["group"].astype(str).to_numpy()
    gen_mean = np.log1p(m.sample(600, seed=0).X.toarray()).mean(0)
    for name in m.labels:
        g = np.log1p(m.sample(200, label=name, seed=0).X.toarray()).mean(0) - gen_mean
        r = {b: np.corrcoef(g, real[y == b].mean(0) - real.mean(0))[0, 1] for b in m.labels}
        # measured (seed 0): own label 0.53-0.64, every other label <= -0.04
        assert r[name] > 0.3 and r[name] > max(v for b, v in r.items() if b != name) + 0.3, (name, r)


def test_sample_labels_scale_and_save_load_roundtrip(sim, cscgan):
    m = cscgan["model"]
    out = m.sample({"Group2": 4, "Group1": 3}, seed=5)
    assert out.obs["group"].tolist() == ["Group2"] * 4 + ["Group1"] * 3
    assert list(out.var_names) == list(sim["train"].var_names)
    np.testing.assert_allclose(np.asarray(out.X.sum(1)).ravel(), sim["lib"], rtol=1e-4)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*genes have zero counts")
        m.save(tmp + "/m")
        loaded = SCGAN.load(tmp + "/m", sim["test"][sim["test"].obs["group"] == "Group1"].copy())
        assert loaded.label_counts == m.label_counts and loaded.labels == m.labels
        np.testing.assert_array_equal(loaded.sample(20, label="Group3", seed=1).X.toarray(),
                                      m.sample(20, label="Group3", seed=1).X.toarray())


def test_documented_errors():
    tiny = tiny_data(n_cells=60, n_genes=30, seed=0, n_batches=1)
    kw = dict(latent_dim=8, generator_sizes=(16,), critic_sizes=(16,), library_size=30.0)
    cond = SCGAN(tiny, layer="counts", labels_key="group", **kw).train(max_epochs=1, progress_bar=False)
    with pytest.raises(ValueError, match=r"choose one of \['Group1', 'Group2', 'Group3'\]"):
        cond.sample(3, label="B cells")
    with pytest.raises(ValueError, match="not both"):
        cond.sample({"Group1": 2}, label="Group1")
    with pytest.raises(ValueError, match="n_cells=-2"):
        cond.sample(-2)
    plain = SCGAN(tiny, layer="counts", **kw)
    with pytest.raises(Exception, match="train"):
        plain.sample(3)  # not trained yet
    plain.train(max_epochs=1, progress_bar=False)
    with pytest.raises(ValueError, match="labels_key="):
        plain.sample(3, label="Group1")
    bad = tiny.copy(); bad.obs["group"] = bad.obs["group"].astype(object); bad.obs.iloc[0, 0] = np.nan
    with pytest.raises(ValueError, match="missing values"):
        SCGAN(bad, layer="counts", labels_key="group")
    with pytest.raises(ValueError, match="choose one of"):
        SCGAN(tiny, layer="counts", output_bias_init="data")
    with pytest.raises(ValueError, match="choose from"):
        sample_nb_clusters(tiny, {"Group9": 3}, "group", "counts")
    with pytest.raises(ValueError, match="too few"):
        scgan_preprocess(tiny, layer="counts", min_genes=10_000)
    boom = SCGAN(tiny, layer="counts", gp_weight=0.0, monitor_every=5, **kw)
    with pytest.raises(GANTrainingError, match="exploded"):
        boom.train(max_epochs=50, lr=0.05, progress_bar=False)


def test_plan_takes_n_critic_steps_per_generator_step_and_decays_lr():
    tiny = tiny_data(n_cells=80, n_genes=20, seed=0, n_batches=1)
    m = SCGAN(tiny, layer="counts", n_critic=5, latent_dim=4, generator_sizes=(8,), critic_sizes=(8,),
              library_size=20.0, generator_steps=10)
    calls = []
    original = m.build_module

    def counted():
        module = original()
        g = module.generator_loss
        module.generator_loss = lambda b: (calls.append(1), g(b))[1]
        return module
    m.build_module = counted
    m.train(max_epochs=5, batch_size=8, validation_fraction=0, progress_bar=False)  # 10 steps/epoch: 50 critic steps
    assert m.trainer.state["step"] == 50
    assert len(calls) == 11  # one generator step after every 5th critic step, plus one at the first (logged loss)
    lr = m.history["lr"].to_numpy()  # the reference's exponential decay over generator_steps=10 generator steps
    assert np.all(np.diff(lr) < 0) and lr[-1] == pytest.approx(1e-4 * 0.1 ** (9 / 10), rel=1e-6)
    plan = WGANTrainingPlan(m.module, n_critic=5, lr=1e-4, lr_decay_steps=10, final_lr_ratio=0.1)
    assert plan.decayed_lr(50) == pytest.approx(1e-5)  # 10 generator steps: the whole decay


def test_ghahramani_gan_learns_embeds_and_interpolates(sim):
    train, test = sim["train"], sim["test"]
    m = GhahramaniGAN(train, layer="counts", target_sum=sim["lib"], prior="normal", **GH_SMALL)
    first = _untrained_mmd(m, sim["real_test"], test.n_obs, lsn=False)
    m.train(max_epochs=25, lr=5e-4, seed=0, progress_bar=False)
    gen = m.sample(test.n_obs, seed=0)
    last = mmd(sim["real_test"], gen.X, seed=0)
    assert last < 0.5 * first, (first, last)  # measured: 2.44 -> 0.59 (the reference's prior: only -> 1.68)
    y = test.obs["group"].astype(str).to_numpy()
    emb = m.get_latent_representation(test)
    assert emb.shape == (test.n_obs, 64)
    chance = max(np.mean(y == c) for c in np.unique(y))
    assert knn_accuracy(emb, y, seed=0) > chance + 0.2
    path = m.interpolate(gen.obsm["z"][0], gen.obsm["z"][1], n_steps=4)
    np.testing.assert_allclose(path.X[[0, -1]], gen.X[:2], atol=1e-5)
    with tempfile.TemporaryDirectory() as tmp:
        m.save(tmp + "/g")
        loaded = GhahramaniGAN.load(tmp + "/g", test[:, ::-1].copy())  # same genes, another order
        np.testing.assert_allclose(loaded.get_latent_representation(test), emb, atol=1e-5)
        np.testing.assert_allclose(loaded.sample(5, seed=3).X, m.sample(5, seed=3).X, atol=1e-6)
    with pytest.raises(ValueError, match="latent_dim"):
        m.generate(np.zeros((2, 5)))
    with pytest.raises(ValueError, match="n_steps=1"):
        m.interpolate(gen.obsm["z"][0], gen.obsm["z"][1], n_steps=1)
    with pytest.raises(ValueError, match="choose one of"):
        GhahramaniGAN(train, layer="counts", prior="uniform")

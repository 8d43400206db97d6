"""Library-level tests of `scdeep_nb.models.magan` (MAGAN, Amodio & Krishnaswamy 2018): claim, losses, sampling,
monitoring, two-AnnData life cycle, bad input."""
import warnings

import numpy as np
import pytest
import torch

from scdeep_nb.base import REGISTRY
from scdeep_nb.baselines import knn_classifier
from scdeep_nb.datasets import simulate
from scdeep_nb.models.magan import (MAGAN, GANTrainingError, MAGANModule, MAGANTrainingPlan, _bce,
                                    simulate_protein_panel)

TINY_NETS = dict(generator_sizes=(16, 8), discriminator_sizes=(16, 8))
QUARTER_NETS = dict(generator_sizes=(50, 25, 12), discriminator_sizes=(200, 100, 50, 25, 12))


def two_modalities(n_cells, n_genes, n_proteins, seed):
    "RNA of one random half of the cells, a protein panel of the other half, and the panel of the RNA half (truth)."
    sim = simulate(n_cells=n_cells, n_genes=n_genes, n_groups=4, seed=seed)
    sim = sim[:, np.asarray(sim.layers["counts"].sum(0)).ravel() > 0].copy()
    panel = simulate_protein_panel(sim, n_proteins=n_proteins, seed=seed)
    half = np.random.default_rng(seed).permutation(sim.n_obs) < sim.n_obs // 2
    pairs = [(g, p) for g, p in zip(panel.var["gene"], panel.var_names)]
    return sim[half].copy(), panel[~half].copy(), panel[half].copy(), pairs


@pytest.fixture(scope="module")
def small():
    return two_modalities(240, 40, 4, seed=3)


@pytest.fixture(scope="module")
def trained(small):
    rna, prot, _, pairs = small
    return MAGAN(rna, prot, correspondence=pairs, layer="counts", layer_b="counts", **TINY_NETS).train(
        max_epochs=3, batch_size=32, progress_bar=False)


def test_registered_with_tl_output():
    from scdeep_nb.tl import output_keys
    info = REGISTRY["magan"]
    assert info.cls is MAGAN and info.capabilities == ("align",)
    assert output_keys(MAGAN, "magan") == [("obsm", "X_magan_mapped", "map_a_to_b")]


def test_reference_defaults():
    kw = MAGAN.default_train_kwargs
    assert (kw["optimizer"], kw["lr"], kw["optimizer_kwargs"]["betas"], kw["batch_size"]) == ("adam", 1e-3,
                                                                                              (0.5, 0.99), 100)
    import inspect
    sig = inspect.signature(MAGAN.__init__).parameters
    assert sig["generator_sizes"].default == (200, 100, 50)
    assert sig["discriminator_sizes"].default == (800, 400, 200, 100, 50)
    assert sig["correspondence_weight"].default == 1.0 and sig["cycle_discriminator"].default is False


def test_correspondence_beats_a_plain_cycle_gan():
    """The paper's claim on RNA vs a simulated protein panel (different cells): with the correspondence, labels
    transfer better both ways and corresponding features correlate better than with the same networks without it.
    Measured over seeds 0-2 (800 cells, 80 genes, 6 proteins, quarter-width networks, 25 epochs): label transfer
    a->b 0.82-0.95 vs 0.20-0.32, b->a 0.59-0.65 vs 0.11-0.25; feature correlations 0.77-0.90 vs -0.34..0.03."""
    rna, prot, truth, pairs = two_modalities(800, 80, 6, seed=0)
    scores = {}
    for weight in (1.0, 0.0):
        m = MAGAN(rna, prot, correspondence=pairs, correspondence_weight=weight, layer="counts", layer_b="counts",
                  **QUARTER_NETS).train(max_epochs=25, progress_bar=False)
        za, zb = m.standardized_a(rna), m.standardized_b(prot)
        ab, ba = m.align(rna, prot)
        la, lb = rna.obs["group"].astype(str).to_numpy(), prot.obs["group"].astype(str).to_numpy()
        ia = m.var_names.get_indexer([g for g, _ in pairs])
        ib = m.var_names_b.get_indexer([p for _, p in pairs])
        corr = lambda x, y: np.mean([np.corrcoef(x[:, j], y[:, j])[0, 1] for j in range(x.shape[1])])
        scores[weight] = dict(a_to_b=(knn_classifier(zb, lb, ab) == la).mean(),
                              b_to_a=(knn_classifier(za, la, ba) == lb).mean(),
                              gene_protein=corr(za[:, ia], ab[:, ib]), protein_gene=corr(zb[:, ib], ba[:, ia]),
                              true_protein=corr(ab, m.standardized_b(truth)))
    for key in scores[1.0]:
        assert scores[1.0][key] > scores[0.0][key] + 0.2, (key, scores)
    assert min(scores[1.0]["a_to_b"], scores[1.0]["b_to_a"]) > 0.5, scores  # 4 types: chance is 0.25


def test_losses_follow_the_reference():
    torch.manual_seed(0)
    m = MAGANModule(5, 3, [0, 2], [1, 0], (np.zeros(5), np.ones(5)), (np.zeros(3), np.ones(3)), normalize_a="none",
                    normalize_b="none", **TINY_NETS)
    za, zb = torch.randn(7, 5), torch.randn(9, 3)
    fb, fa = m.g_ab(za), m.g_ba(zb)
    terms = [_bce(m.d_a(fa), 1), _bce(m.d_b(fb), 1), ((za - m.g_ba(fb)) ** 2).mean(), ((zb - m.g_ab(fa)) ** 2).mean(),
             ((za[:, [0, 2]] - fb[:, [1, 0]]) ** 2).mean(0).sum(), ((zb[:, [1, 0]] - fa[:, [0, 2]]) ** 2).mean(0).sum()]
    torch.testing.assert_close(m.generator_loss(za, zb).loss, torch.stack(terms).mean())
    d_terms = [_bce(m.d_a(za), 1), _bce(m.d_b(zb), 1), _bce(m.d_a(fa), 0), _bce(m.d_b(fb), 0)]
    torch.testing.assert_close(m.discriminator_loss(za, zb), torch.stack(d_terms).mean())
    # the paper's option: cycled cells scored as fake too (6 D terms; 8 G terms)
    m.cycle_discriminator = True
    ca, cb = m.g_ba(fb), m.g_ab(fa)
    torch.testing.assert_close(m.discriminator_loss(za, zb),
                               torch.stack(d_terms + [_bce(m.d_a(ca), 0), _bce(m.d_b(cb), 0)]).mean())
    torch.testing.assert_close(m.generator_loss(za, zb).loss,
                               torch.stack(terms[:2] + [_bce(m.d_a(ca), 1), _bce(m.d_b(cb), 1)] + terms[2:]).mean())


def test_independent_reshuffled_sampling_of_domain_b(small):
    rna, prot, _, pairs = small
    model = MAGAN(rna, prot, correspondence=pairs, **TINY_NETS)
    plan = MAGANTrainingPlan(model.module, data_b=model.data_b, rows_b=np.arange(prot.n_obs), batch_size_b=40)
    torch.manual_seed(0)
    plan.configure_optimizers()
    n_per_pass = prot.n_obs // 40
    first = [sorted(plan.next_b("cpu")["index"].tolist()) for _ in range(n_per_pass)]
    assert len(set().union(*first)) == n_per_pass * 40 == prot.n_obs  # one pass: every cell once
    second = [sorted(plan.next_b("cpu")["index"].tolist()) for _ in range(n_per_pass)]
    assert len(set().union(*second)) == prot.n_obs and first != second  # reshuffled for the next pass


def test_unequal_domains_and_small_batches_warn(small):
    rna, prot, _, pairs = small
    with pytest.warns(UserWarning, match="adata_b has 30 cells, fewer than batch_size=64"):
        m = MAGAN(rna, prot[:30].copy(), correspondence=pairs, **TINY_NETS).train(max_epochs=2, batch_size=64,
                                                                                   progress_bar=False)
    assert m.map_b_to_a().shape == (30, rna.n_vars)


def test_monitor_stops_collapse_and_explosion(small):
    rna, prot, _, pairs = small
    collapsed = MAGAN(rna, prot, correspondence=pairs, monitor_every=1, **TINY_NETS)
    with torch.no_grad():
        collapsed.module.g_ba.layers[0]["linear"].weight.zero_()  # b -> a maps every cell to one point
    with pytest.raises(GANTrainingError, match="b -> a generator has collapsed"):
        collapsed.train(max_epochs=2, batch_size=32, seed=None, progress_bar=False)
    assert not collapsed.is_trained
    exploded = MAGAN(rna, prot, correspondence=pairs, monitor_every=1, **TINY_NETS)
    with torch.no_grad():
        exploded.module.d_a.layers[-1]["linear"].bias.fill_(-1e3)  # D_a calls everything fake
    with pytest.raises(GANTrainingError, match="loss is"):
        exploded.train(max_epochs=2, batch_size=32, seed=None, progress_bar=False)
    # a healthy run is not stopped
    MAGAN(rna, prot, correspondence=pairs, monitor_every=1, **TINY_NETS).train(max_epochs=2, batch_size=32,
                                                                               progress_bar=False)


def test_monitor_rule_caps_the_discriminator_not_the_generator(small):
    "A large generator adversarial loss (non-saturating, D rejects every fake) is allowed; a large D loss or NaN is not."
    from scdeep_nb.train import StepContext
    rna, prot, _, pairs = small
    model = MAGAN(rna, prot, correspondence=pairs, **TINY_NETS)
    plan = MAGANTrainingPlan(model.module, data_b=model.data_b, rows_b=np.arange(prot.n_obs), batch_size_b=32,
                             max_loss=25.0)
    ok = dict(loss=1.0, discriminator=0.7, adversarial=0.7, cycle=0.5, correspondence=0.5, diversity_ab=0.8,
              diversity_ba=0.8)
    ctx = StepContext(epoch=3, step=99)
    plan.check({k: torch.tensor(v) for k, v in ok.items()}, ctx)
    plan.check({k: torch.tensor(v) for k, v in {**ok, "adversarial": 60.0, "loss": 25.0}.items()}, ctx)
    with pytest.raises(GANTrainingError, match="at step 100 .*discriminator loss is 30"):
        plan.check({k: torch.tensor(v) for k, v in {**ok, "discriminator": 30.0}.items()}, ctx)
    with pytest.raises(GANTrainingError, match="the cycle loss is nan"):
        plan.check({k: torch.tensor(v) for k, v in {**ok, "cycle": float("nan")}.items()}, ctx)
    with pytest.raises(GANTrainingError, match="a -> b generator has collapsed"):
        plan.check({k: torch.tensor(v) for k, v in {**ok, "diversity_ab": 0.001}.items()}, ctx)


def test_save_load_both_domains(trained, small, tmp_path):
    rna, prot, _, _ = small
    ab, ba = trained.align()
    trained.save(tmp_path / "m")
    with pytest.raises(TypeError, match="adata_b="):
        MAGAN.load(tmp_path / "m", rna)
    loaded = MAGAN.load(tmp_path / "m", rna[:, ::-1].copy(), adata_b=prot[:, ::-1].copy())
    np.testing.assert_allclose(loaded.map_a_to_b(), ab, atol=1e-5)
    np.testing.assert_allclose(loaded.map_b_to_a(), ba, atol=1e-5)
    with pytest.raises(ValueError, match="adata_b.*read_saved"):
        MAGAN.load(tmp_path / "m", rna, adata_b=prot[:, :2].copy())
    with pytest.raises(ValueError, match="read_saved"):
        MAGAN.load(tmp_path / "m", rna[:, :10].copy(), adata_b=prot)


def test_bad_input(small):
    rna, prot, _, pairs = small
    with pytest.raises(TypeError, match="adata_b"):
        MAGAN(rna, correspondence=pairs)
    with pytest.raises(ValueError, match="empty"):
        MAGAN(rna, prot, correspondence=[])
    with pytest.raises(ValueError, match="correspondence_weight=0"):
        MAGAN(rna, prot)
    with pytest.raises(ValueError, match=r"\['CD3E'\] not in adata_a.var_names; \['CD3'\] not in adata_b"):
        MAGAN(rna, prot, correspondence=[pairs[0], ("CD3E", "CD3")])
    with pytest.raises(ValueError, match="normalize_a='clr'"):
        MAGAN(rna, prot, correspondence=pairs, normalize_a="clr")
    frac = prot.copy()
    frac.X = frac.X + 0.5
    del frac.layers["counts"]
    with pytest.raises(ValueError, match="adata_b: .*allow_non_integer_b=True"):
        MAGAN(rna, frac, correspondence=pairs)
    MAGAN(rna, frac, correspondence=pairs, normalize_b="arcsinh")  # cytometry-like values need no integers


def test_protein_panel_is_a_monotone_readout():
    sim = simulate(n_cells=200, n_genes=50, n_groups=3, seed=2)
    panel = simulate_protein_panel(sim, n_proteins=4, noise=0.0, seed=2)
    t = np.asarray(sim.layers["cell_means"], dtype=np.float64)
    expr = np.log1p(t / t.sum(1, keepdims=True) * 1e4)[:, sim.var_names.get_indexer(panel.var["gene"])]
    for j in range(4):
        means = panel.layers["protein_means"][np.argsort(expr[:, j], kind="stable"), j]
        assert (np.diff(means) >= -1e-4 * means.max()).all()
    assert np.array_equal(panel.X, np.round(panel.X)) and list(panel.var_names) == [f"{g}_protein"
                                                                                   for g in panel.var["gene"]]

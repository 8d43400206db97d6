"""The fast count log-likelihoods (log_poisson, log_nb, log_zinb, log_zinb_prob) against their plain autograd
forms, scipy and torch.distributions: values, gradients, every code path, dtypes and edge cases."""
import math

import numpy as np
import pytest
import scipy.stats as st
import torch

import scdeep_nb.distributions as D
from scdeep_nb.distributions import log_nb, log_poisson, log_zinb, log_zinb_prob

F64 = torch.float64
GENE_THETAS = [1e-4, 0.05, 1.0, 9.9, 10.1, 300.0, 1e4, 1e8]
GENE_COUNTS = [0.0, 1.0, 2.0, 31.0, 32.0, 33.0, 5000.0, 7.0]  # around the table size K = 32 and far above it


def make_batch(n=48, dtype=F64, seed=0, mean_scale=3.0):
    "Whole counts (some rows fixed around K), means from 1e-8 to 1e4, logits; one column per GENE_THETAS entry."
    g = torch.Generator().manual_seed(seed)
    x = torch.poisson(torch.full((n, len(GENE_THETAS)), mean_scale, dtype=F64), generator=g)
    x[:2] = torch.tensor(GENE_COUNTS, dtype=F64)
    x[2] = 0.0
    mu = 10 ** (torch.rand(x.shape, generator=g, dtype=F64) * 12 - 8)
    mu[3] = 1e-8  # tiny means
    logits = torch.randn(x.shape, generator=g, dtype=F64) * 3
    logits[4] = torch.tensor([-30.0, 30.0] * 4, dtype=F64)
    return x.to(dtype), mu.to(dtype), torch.tensor(GENE_THETAS, dtype=dtype), logits.to(dtype)


def call(name, impl, x, mu, theta, logits, per_gene=True):
    "Evaluate likelihood `name` ('poisson', 'nb', 'zinb', 'zinb_prob') with the fast or plain ('ref') form."
    th = theta.expand(x.shape) if per_gene else theta
    if name == "poisson":
        fn = log_poisson if impl == "fast" else (lambda x, m: x * torch.log(m + 1e-8) - m - torch.lgamma(x + 1))
        return fn(x, mu)
    if name == "nb":
        return (log_nb if impl == "fast" else D._log_nb_reference)(x, mu, th)
    if name == "zinb":
        return (log_zinb if impl == "fast" else D._log_zinb_reference)(x, mu, th, logits)
    return (log_zinb_prob if impl == "fast" else D._log_zinb_prob_reference)(x, mu, th, torch.sigmoid(logits))


def value_and_grads(name, impl, x, mu, theta, logits, per_gene=True):
    "Value and gradients of the summed log-likelihood w.r.t. (mu, theta, logits) (None when unused)."
    leaves = [a.detach().clone().requires_grad_() for a in (mu, theta, logits)]
    out = call(name, impl, x, *leaves, per_gene=per_gene)
    out.sum().backward()
    return out.detach(), [leaf.grad for leaf in leaves]


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


NAMES = ["poisson", "nb", "zinb", "zinb_prob"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("per_gene", [True, False])
@pytest.mark.parametrize("offset", [0.0, 0.25])  # whole counts, then non-integer counts
def test_fast_matches_plain_float64(name, per_gene, offset):
    x, mu, theta, logits = make_batch()
    if not per_gene:  # a different theta in every entry (DCA's dispersion head)
        theta = theta * (1 + mu / 1e4)
    x = x + offset * (x > 0)
    v_fast, g_fast = value_and_grads(name, "fast", x, mu, theta, logits, per_gene)
    v_ref, g_ref = value_and_grads(name, "ref", x, mu, theta, logits, per_gene)
    assert torch.isfinite(v_fast).all()
    assert rel(v_fast, v_ref) < 1e-12
    for gf, gr in zip(g_fast, g_ref):
        assert (gf is None) == (gr is None)
        if gr is not None:
            assert torch.isfinite(gf).all()
            assert rel(gf, gr) < 1e-9


@pytest.mark.parametrize("name", NAMES)
def test_float32_as_accurate_as_plain(name):
    "In float32 the fast form's error against float64 truth is no worse than the plain form's (values, gradients)."
    x, mu, theta, logits = make_batch(dtype=torch.float32, mean_scale=20.0)
    truth_v, truth_g = value_and_grads(name, "ref", x.double(), mu.double(), theta.double(), logits.double())
    v_fast, g_fast = value_and_grads(name, "fast", x, mu, theta, logits)
    v_ref, g_ref = value_and_grads(name, "ref", x, mu, theta, logits)
    assert v_fast.dtype == torch.float32
    scale = truth_v.abs().max()
    err_fast, err_ref = (v_fast.double() - truth_v).abs().max(), (v_ref.double() - truth_v).abs().max()
    assert err_fast <= 2 * err_ref + 1e-6 * scale, (err_fast, err_ref)
    for gf, gr, gt in zip(g_fast, g_ref, truth_g):
        if gt is not None:
            assert rel(gf.double(), gt) <= 2 * rel(gr.double(), gt) + 1e-6


def test_against_scipy_and_torch():
    x, mu, theta, logits = make_batch()
    mu = mu.clamp_min(1e-3)
    th = theta.expand(x.shape)
    ok = (mu / th > 1e-6).numpy()  # where scipy's (n, p) parametrisation is well conditioned
    nb_scipy = st.nbinom.logpmf(x.numpy(), th.numpy(), (th / (th + mu)).numpy())
    np.testing.assert_allclose(log_nb(x, mu, th, eps=0.0).numpy()[ok], nb_scipy[ok], rtol=1e-8, atol=1e-9)  # scipy: ~1e-9
    np.testing.assert_allclose(log_poisson(x, mu, eps=0.0).numpy(), st.poisson.logpmf(x.numpy(), mu.numpy()),
                               rtol=1e-9, atol=1e-9)
    torch_nb = torch.distributions.NegativeBinomial(total_count=th, logits=torch.log(mu / th))
    sel = (th < 1e6) & (mu / th > 1e-6)  # torch's logits form loses digits near the Poisson limit
    torch.testing.assert_close(log_nb(x, mu, th, eps=0.0)[sel], torch_nb.log_prob(x)[sel], rtol=1e-7, atol=1e-7)
    # zero inflation built by hand from scipy
    pi = torch.sigmoid(logits).numpy()
    nb_pmf = np.exp(nb_scipy)
    with np.errstate(divide="ignore"):
        expected = np.log(np.where(x.numpy() == 0, pi + (1 - pi) * nb_pmf, (1 - pi) * nb_pmf))
    sel = ok & np.isfinite(expected) & (np.abs(logits.numpy()) < 20)
    np.testing.assert_allclose(log_zinb(x, mu, th, logits, eps=0.0).numpy()[sel], expected[sel], rtol=1e-7, atol=1e-7)
    np.testing.assert_allclose(log_zinb_prob(x, mu, th, torch.from_numpy(pi), eps=0.0).numpy()[sel], expected[sel],
                               rtol=1e-6, atol=1e-6)


def test_zero_counts_closed_form_bitwise():
    "Zero entries are exactly log NB(0) = -theta log1p(mu / theta), as in the plain form, in both dtypes."
    for dtype in (torch.float32, F64):
        x, mu, theta, logits = make_batch(dtype=dtype)
        th = theta.expand(x.shape)
        zero = x == 0
        closed = -th * torch.log1p(mu / th)
        assert torch.equal(log_nb(x, mu, th)[zero], closed[zero])
        assert torch.equal(log_nb(x, mu, th * (1 + mu))[zero], (-(th * (1 + mu)) * torch.log1p(mu / (th * (1 + mu))))[zero])
        assert torch.equal(log_nb(x, mu, th)[zero], D._log_nb_reference(x, mu, th)[zero])
        # the zero-inflated form: softplus(log NB(0) - logit) - softplus(-logit), to rounding
        torch.testing.assert_close(log_zinb(x, mu, th, logits)[zero], D._log_zinb_reference(x, mu, th, logits)[zero])
    # mu = 0 with eps = 0: the closed form is exact (0), where x * log(mu) would be NaN
    assert log_nb(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(3).expand(2, 3), eps=0.0).abs().max() == 0


def test_large_count_paths_agree(monkeypatch):
    "Counts above the table size K: the gathered and the dense evaluation give the same values and gradients."
    x, mu, theta, logits = make_batch(mean_scale=40.0)  # most counts above K = 32
    results = []
    for fraction in (1.1, 0.0):  # always gather; always dense
        monkeypatch.setattr(D, "_DENSE_FRACTION", fraction)
        results.append(value_and_grads("zinb", "fast", x, mu, theta, logits))
    (va, ga), (vb, gb) = results
    assert rel(va, vb) < 1e-14
    for a, b in zip(ga, gb):
        assert rel(a, b) < 1e-12


def test_dense_branches_equal_gathered_branches():
    "The GPU path (both branches densely, masked) equals the CPU path (each branch on its own entries)."
    g = torch.Generator().manual_seed(1)
    x = torch.poisson(torch.full((200,), 4.0, dtype=F64), generator=g)
    theta = 10 ** (torch.rand(200, generator=g, dtype=F64) * 8 - 3)
    r1, d1 = D._ratio_branches(x, theta, True, gather=True)
    r2, d2 = D._ratio_branches(x, theta, True, gather=False)
    torch.testing.assert_close(r1, r2, rtol=0, atol=0)
    torch.testing.assert_close(d1, d2, rtol=0, atol=0)
    assert (r1[x == 0] == 0).all() and (d1[x == 0] == 0).all()


def test_gradcheck_every_path():
    "Finite differences in float64, small inputs: table form (incl. counts > K), general form, non-integer counts."
    x = torch.tensor([[0.0, 3.0, 40.0], [1.0, 0.0, 2.0]], dtype=F64)
    mu = torch.tensor([[0.5, 2.0, 35.0], [0.1, 4.0, 1e-3]], dtype=F64, requires_grad=True)
    theta_gene = torch.tensor([0.2, 15.0, 1e6], dtype=F64, requires_grad=True)
    theta_cell = torch.tensor([[0.2, 15.0, 1e6], [3.0, 0.05, 50.0]], dtype=F64, requires_grad=True)
    logits = torch.tensor([[-1.0, 0.3, 2.0], [0.5, -2.0, 1.0]], dtype=F64, requires_grad=True)
    for xx in (x, x + 0.3):
        assert torch.autograd.gradcheck(lambda m, t: log_nb(xx, m, t.expand(2, 3)), (mu, theta_gene))
        assert torch.autograd.gradcheck(lambda m, t: log_nb(xx, m, t), (mu, theta_cell))
        assert torch.autograd.gradcheck(lambda m, t, z: log_zinb(xx, m, t.expand(2, 3), z), (mu, theta_gene, logits))
        assert torch.autograd.gradcheck(lambda m, t, z: log_zinb(xx, m, t, z), (mu, theta_cell, logits))
        assert torch.autograd.gradcheck(lambda m, t, z: log_zinb_prob(xx, m, t, torch.sigmoid(z)),
                                        (mu, theta_cell, logits))
        assert torch.autograd.gradcheck(lambda m: log_poisson(xx, m), (mu,))


def test_zero_threshold_and_non_integer_counts():
    "Counts below 1e-8 are zeros in the zero-inflated forms; non-integer counts take the general path."
    x = torch.tensor([[0.0, 5e-9, 2.5, 3.0]], dtype=F64).expand(3, 4)
    mu = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=F64).expand(3, 4)
    theta = torch.tensor([0.5, 2.0, 20.0, 1e5], dtype=F64).expand(3, 4)
    logits = torch.zeros(3, 4, dtype=F64)
    torch.testing.assert_close(log_zinb(x, mu, theta, logits), D._log_zinb_reference(x, mu, theta, logits))
    pi = torch.full((3, 4), 0.3, dtype=F64)
    torch.testing.assert_close(log_zinb_prob(x, mu, theta, pi), D._log_zinb_prob_reference(x, mu, theta, pi))
    torch.testing.assert_close(log_nb(x, mu, theta), D._log_nb_reference(x, mu, theta))
    assert not D._is_counts(x) and D._is_counts(x.round())
    assert not D._is_counts(-x.round() - 1)


def test_broadcasting_dtypes_and_autograd_modes():
    x = torch.tensor([[0.0, 3.0], [7.0, 1.0]])
    mu = torch.tensor([[1.0, 2.0], [3.0, 0.5]])
    ref = D._log_nb_reference(x, mu, torch.tensor(4.0))
    torch.testing.assert_close(log_nb(x, mu, 4.0), ref)  # a Python number
    torch.testing.assert_close(log_nb(x, mu, torch.tensor([4.0, 4.0])), ref)  # a per-gene vector
    assert log_nb(x[:, None], mu, 2.0).shape == (2, 2, 2)  # broadcasting to 3-d
    torch.testing.assert_close(log_nb(x[None].expand(3, 2, 2), mu, torch.full((2,), 4.0)), ref.expand(3, 2, 2))
    assert log_nb(x.double(), mu, 4.0).dtype == F64  # promoted like the plain form
    assert log_nb(x.long(), mu, 4.0).dtype == torch.float32  # integer counts
    half = log_nb(x.half(), mu.half(), torch.tensor(4.0, dtype=torch.float16))
    assert half.dtype == torch.float32  # 16-bit inputs are evaluated in float32
    torch.testing.assert_close(half, ref)
    with torch.no_grad():
        torch.testing.assert_close(log_zinb(x, mu, 4.0, torch.zeros(2, 2)), D._log_zinb_reference(x, mu, 4.0, torch.zeros(2, 2)))
    assert log_nb(torch.zeros(0, 2), torch.ones(0, 2), 1.0).shape == (0, 2)


def test_counts_that_need_a_gradient_use_the_plain_form():
    x = torch.tensor([[0.0, 2.0, 5.0]], requires_grad=True)
    mu = torch.tensor([[1.0, 2.0, 3.0]])
    out = log_nb(x, mu, torch.tensor([0.5, 5.0, 50.0]).expand(1, 3))
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_retain_graph_and_double_backward():
    x = torch.tensor([[0.0, 4.0, 40.0]])
    mu = torch.tensor([[1.0, 2.0, 30.0]], requires_grad=True)
    theta = torch.tensor([0.5, 5.0, 50.0], requires_grad=True)
    out = log_zinb(x, mu, theta.expand(1, 3), torch.zeros(1, 3)).sum()
    g1 = torch.autograd.grad(out, (mu, theta), retain_graph=True)
    g2 = torch.autograd.grad(out, (mu, theta))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)
    out = log_nb(x, mu, theta.expand(1, 3)).sum()
    (gmu,) = torch.autograd.grad(out, mu, create_graph=True)
    with pytest.raises(RuntimeError):  # first derivatives only; use D._log_nb_reference for higher ones
        gmu.sum().backward()
    out = D._log_nb_reference(x, mu, theta).sum()
    (gmu,) = torch.autograd.grad(out, mu, create_graph=True)
    gmu.sum().backward()
    assert torch.isfinite(mu.grad).all()


def test_edge_values_finite_float32():
    "Zero / one / huge counts x tiny / moderate / huge means x tiny / moderate / huge dispersions, per-gene theta."
    xs, ms, ts = (t.reshape(-1) for t in torch.meshgrid(
        torch.tensor([0.0, 1.0, 1e4]), torch.tensor([1e-8, 3.0, 1e4]), torch.tensor([1e-4, 2.0, 1e8]), indexing="ij"))
    x, mu = xs.reshape(3, 9), ms.reshape(3, 9)
    theta = ts.reshape(3, 9)[0]
    for logit in (-30.0, 0.0, 30.0):
        m, t = mu.clone().requires_grad_(), theta.clone().requires_grad_()
        z = torch.full_like(mu, logit, requires_grad=True)
        for out in (log_nb(x, m, t.expand(3, 9)), log_zinb(x, m, t.expand(3, 9), z),
                    log_zinb_prob(x, m, t.expand(3, 9), torch.sigmoid(z)), log_poisson(x, m)):
            assert torch.isfinite(out).all()
            assert (out <= 1e-4).all()
            for leaf in (m, t, z):
                leaf.grad = None
            out.sum().backward()
            for leaf in (m, t, z):
                assert leaf.grad is None or torch.isfinite(leaf.grad).all()


def test_lgamma_of_counts_is_exactly_lgamma():
    for dtype in (torch.float32, F64):
        x = torch.tensor([[0.0, 1.0, 2.0, 31.0, 4096.0], [4097.0, 2.5e4, 7.0, 0.0, 3.0]], dtype=dtype)
        assert torch.equal(D._lgamma_counts(x), torch.lgamma(x + 1))
        assert torch.equal(D._lgamma_counts(x + 0.5), torch.lgamma(x + 1.5))


def test_gene_tables_are_the_sums_they_claim():
    theta = torch.tensor([1e-3, 0.7, 12.0, 1e7], dtype=F64)
    table, dtable = D._gene_tables(theta, grad=True)
    K = D._TABLE_K
    k = torch.arange(K + 1, dtype=F64)[:, None]
    exact = torch.lgamma(k + theta) - torch.lgamma(theta) - k * torch.log(theta) - torch.lgamma(k + 1)
    sel = theta < 1e3  # where the lgamma difference itself is accurate
    torch.testing.assert_close(table[:, sel], exact[:, sel], rtol=1e-12, atol=1e-10)
    d_exact = torch.digamma(k + theta) - torch.digamma(theta) - k / theta
    torch.testing.assert_close(dtable[:, sel], d_exact[:, sel], rtol=1e-9, atol=1e-9)
    assert (table[:2] == 0).all() and (dtable[:2] == 0).all()

"""Mixture math: densities against scipy, samplers against their target distributions."""
import math

import numpy as np
import pytest
import torch
from scipy import special, stats

from models import gmm
from models.gmm import (gmm_log_prob, gmm_nll, sample_gmm, sample_gmm_cfg,
                        split_gmm_params, tempered)
from tests.reference import assert_all_fit

MU = torch.tensor([-2.0, 0.5, 1.5, 4.0])
LOGVAR = torch.log(torch.tensor([0.3, 0.05, 1.0, 0.5]) ** 2)
LOGITS = torch.tensor([0.2, 1.0, -0.5, 0.3])
# an unconditional mixture that differs from the conditional one
MU_U = torch.tensor([-1.0, 0.0, 2.0, 3.0])
LOGVAR_U = torch.log(torch.tensor([1.0, 0.8, 1.2, 1.5]) ** 2)
LOGITS_U = torch.tensor([0.0, 0.5, 0.0, -0.2])


def mixture_cdf(mu, logvar, logits, temperature=1.0):
    w = torch.softmax(logits, -1).numpy()
    sd = (torch.exp(0.5 * logvar) / temperature).numpy()
    return lambda x: sum(wk * stats.norm.cdf(x, m, s) for wk, m, s in zip(w, mu.numpy(), sd))


def batch(n, *tensors):
    return [t.expand(n, -1).contiguous() for t in tensors]


def test_split_layout_and_fp32():
    out = torch.arange(12, dtype=torch.bfloat16).reshape(1, 12)
    mu, logvar, logits = split_gmm_params(out, 4)
    assert mu.dtype == logvar.dtype == logits.dtype == torch.float32
    assert mu.tolist() == [[0, 1, 2, 3]] and logvar.tolist() == [[4, 5, 6, 7]] and logits.tolist() == [[8, 9, 10, 11]]


def test_log_prob_and_nll_match_scipy():
    x = torch.linspace(-5, 7, 101)
    w = torch.softmax(LOGITS, -1).numpy()
    sd = torch.exp(0.5 * LOGVAR).numpy()
    expected = np.log(sum(wk * stats.norm.pdf(x.numpy(), m, s) for wk, m, s in zip(w, MU.numpy(), sd)))
    mix = batch(101, MU, LOGVAR, LOGITS)
    np.testing.assert_allclose(gmm_log_prob(x, *mix).numpy(), expected, rtol=1e-5, atol=1e-5)
    # the training loss omits the 0.5*log(2*pi) constant
    np.testing.assert_allclose(gmm_nll(x, *mix).numpy(), -expected - 0.5 * math.log(2 * math.pi), rtol=1e-5, atol=1e-5)


def test_sample_gmm_matches_mixture_ks():
    torch.manual_seed(0)
    samples = sample_gmm(*batch(20000, MU, LOGVAR, LOGITS))
    assert stats.kstest(samples.numpy(), mixture_cdf(MU, LOGVAR, LOGITS)).pvalue > 0.01


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_divides_std(temperature):
    torch.manual_seed(1)
    samples = sample_gmm(*batch(20000, MU, LOGVAR, LOGITS), temperature=temperature).numpy()
    assert stats.kstest(samples, mixture_cdf(MU, LOGVAR, LOGITS, temperature)).pvalue > 0.01
    # the opposite convention (temperature multiplies the std) is clearly rejected
    assert stats.kstest(samples, mixture_cdf(MU, LOGVAR, LOGITS, 1 / temperature)).pvalue < 1e-6
    # a single Gaussian: the std is exactly divided
    single = sample_gmm(torch.zeros(20000, 1), torch.zeros(20000, 1), torch.zeros(20000, 1), temperature)
    assert abs(single.std().item() - 1 / temperature) < 0.02 / temperature


def mixture_logpdf(x, mu, logvar, logits, temperature=1.0):
    """log of sum_k w_k N(x; mu_k, (std_k / T)^2) with scipy, in float64; x [N] -> [N]."""
    w = torch.softmax(logits.double(), -1).numpy()
    sd = (torch.exp(0.5 * logvar.double()) / temperature).numpy()
    return special.logsumexp(np.log(w) + stats.norm.logpdf(np.asarray(x, np.float64)[:, None], mu.numpy(), sd), axis=-1)


def log_target(x, cfg, temperature):
    """The spec's guided target, unnormalised: log q_T(x) + (w - 1) (log p_cond(x) - log p_uncond(x)),
    q_T the conditional mixture with every std divided by T (= p_cond^w / p_uncond^(w-1) at T = 1)."""
    return (mixture_logpdf(x, MU, LOGVAR, LOGITS, temperature)
            + (cfg - 1) * (mixture_logpdf(x, MU, LOGVAR, LOGITS) - mixture_logpdf(x, MU_U, LOGVAR_U, LOGITS_U)))


def target_cdf(cfg, temperature):
    """Normalised CFG target by numerical integration on a fine grid."""
    grid = np.linspace(-12, 14, 200001)
    log_t = log_target(grid, cfg, temperature)
    dens = np.exp(log_t - log_t.max())
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (dens[1:] + dens[:-1]) * np.diff(grid))])
    return grid, cdf / cdf[-1], dens / cdf[-1]


@pytest.mark.parametrize("cfg,temperature", [(1.5, 1.0), (3.0, 1.0), (4.5, 1.0), (3.9, 1.1), (2.0, 0.8)])
def test_cfg_sir_matches_target_density(cfg, temperature):
    torch.manual_seed(3)
    n = 4000
    samples = sample_gmm_cfg(batch(n, MU, LOGVAR, LOGITS), batch(n, MU_U, LOGVAR_U, LOGITS_U), cfg, temperature)
    assert samples.shape == (n,)
    grid, cdf, dens = target_cdf(cfg, temperature)
    assert stats.kstest(samples.numpy(), lambda v: np.interp(v, grid, cdf)).pvalue > 0.001
    # histogram against the integrated target density, bin by bin
    edges = np.linspace(-4, 6, 21)
    expected = np.diff(np.interp(edges, grid, cdf)) * n
    observed, _ = np.histogram(samples.numpy(), edges)
    keep = expected > 20
    assert np.all(np.abs(observed[keep] - expected[keep]) < 5 * np.sqrt(expected[keep]) + 10)
    # and it is not simply the unguided tempered conditional
    plain = mixture_cdf(MU, LOGVAR, LOGITS, temperature)
    assert stats.kstest(samples.numpy(), plain).pvalue < 1e-4


def test_cfg_accepts_per_row_scale():
    torch.manual_seed(4)
    n = 3000
    cond, uncond = batch(2 * n, MU, LOGVAR, LOGITS), batch(2 * n, MU_U, LOGVAR_U, LOGITS_U)
    scales = torch.cat([torch.full((n,), 1.0), torch.full((n,), 4.5)])
    samples = sample_gmm_cfg(cond, uncond, scales, 1.0)
    grid, cdf, _ = target_cdf(4.5, 1.0)
    assert_all_fit([stats.kstest(samples[:n].numpy(), mixture_cdf(MU, LOGVAR, LOGITS)).pvalue,
                    stats.kstest(samples[n:].numpy(), lambda v: np.interp(v, grid, cdf)).pvalue], alpha=0.001)


def test_tempered_logvar():
    assert torch.allclose(torch.exp(0.5 * tempered(torch.zeros(1), 2.0)), torch.tensor([0.5]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_tensor_temperature_tempers_as_the_float_does(dtype):
    """A captured graph passes T as a float64 0-d tensor: the float's values, bit for bit, in logvar's dtype
    (float64 not narrowed), and numpy's lv - 2 log T rounded to it."""
    logvar = torch.randn(10_000, generator=torch.Generator().manual_seed(0), dtype=dtype)
    for t in (0.3, 0.7, 0.95, 1.0, 1.3, 2.5, 0.123456):
        by_tensor = tempered(logvar, torch.tensor(t, dtype=torch.float64))
        assert by_tensor.dtype == dtype and torch.equal(by_tensor, tempered(logvar, t))
        expected = torch.from_numpy(logvar.double().numpy() - 2 * np.log(t))
        torch.testing.assert_close(by_tensor.double(), expected, rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-15)


# ----------------------------------------------------------------------------- guided draws in row slices
def test_row_slices_cut_at_the_device_cap(monkeypatch):
    monkeypatch.setitem(gmm.MAX_CANDIDATE_VALUES, "cpu", 1 << 18)
    mix = lambda rows: batch(rows, MU, LOGVAR, LOGITS)  # noqa: E731
    assert gmm.row_slices(mix(262), mix(262), 4.5, 1000) is None  # 262,000 values: one call
    slices = gmm.row_slices(mix(1000), mix(1000), 4.5, 1000)
    assert [c[0].shape[0] for c, _, _ in slices] == [262, 262, 262, 214]
    # whole-token mixtures: mu [rows, K, C], logits [rows, K]; values per row are M * C
    token = [torch.zeros(100, 4, 16), torch.zeros(100, 4, 16), torch.zeros(100, 4)]
    assert [c[2].shape[0] for c, _, _ in gmm.row_slices(token, token, 4.5, 1000 * 16)] == [16] * 6 + [4]


def narrow_rows(rows, features=None):
    """Mixtures whose row i is (almost) a point mass at i + 0.25 (+ 0.01 * feature), so a draw names its
    row whatever the random numbers; the unconditional side is wide, so guidance only sharpens."""
    mean = torch.arange(rows, dtype=torch.float64)[:, None].expand(rows, 4) + 0.25
    logits = torch.tensor([0.0, -40.0, -40.0, -40.0], dtype=torch.float64).expand(rows, 4)
    if features:
        mean = mean[..., None] + 0.01 * torch.arange(features, dtype=torch.float64)
    cond = (mean, torch.full_like(mean, -40.0), logits)
    uncond = (torch.zeros_like(mean), torch.full_like(mean, 2.0), logits)
    return cond, uncond


SLICED = [(gmm.sample_gmm_cfg, None), (gmm.sample_gmm_cfg_exact, None), (gmm.sample_diag_gmm_cfg, 3)]


@pytest.mark.parametrize("sampler, features", SLICED, ids=["sir", "exact", "token"])
def test_sliced_guided_draws_keep_rows_and_their_scales(sampler, features, monkeypatch):
    """Rows drawn in slices of 3 (of 10) come back in order, each with its own mixture and scale:
    the draws equal the same sampler called on each slice by hand, and name their rows."""
    monkeypatch.setitem(gmm.MAX_CANDIDATE_VALUES, "cpu", 1)  # a slice of one row per call
    cond, uncond = narrow_rows(10, features)
    cfg = torch.linspace(1.5, 6.0, 10, dtype=torch.float64)
    torch.manual_seed(0)
    one_by_one = sampler(cond, uncond, cfg, 1.0)
    expected = cond[0][:, 0]
    assert one_by_one.dtype == torch.float64
    torch.testing.assert_close(one_by_one, expected, rtol=0, atol=1e-6)
    monkeypatch.setitem(gmm.MAX_CANDIDATE_VALUES, "cpu", 3 * (512 if sampler is gmm.sample_gmm_cfg_exact
                                                              else 1000 * (features or 1)))
    torch.manual_seed(1)
    sliced = sampler(cond, uncond, cfg, 1.0)
    monkeypatch.setitem(gmm.MAX_CANDIDATE_VALUES, "cpu", 1 << 40)
    torch.manual_seed(1)
    by_hand = torch.cat([sampler(tuple(t[i:i + 3] for t in cond), tuple(t[i:i + 3] for t in uncond), cfg[i:i + 3], 1.0)
                         for i in range(0, 10, 3)])
    torch.testing.assert_close(sliced, by_hand, rtol=0, atol=0)
    torch.testing.assert_close(sliced, expected, rtol=0, atol=1e-6)

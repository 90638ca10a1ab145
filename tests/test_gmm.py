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


# ----------------------------------------------------------------------------- mutation guards (issue: heads)
def test_inverse_cdf_pick_literal_values():
    """Bugs: the rounding clamp letting index K through (probabilities that sum to a little under 1, u above
    their sum: a gather out of range), the count of cdf entries below u off by one."""
    probs = torch.tensor([[0.2, 0.3, 0.5]], dtype=torch.float64).expand(7, -1)
    u = torch.tensor([0.0, 0.1999, 0.2001, 0.4999, 0.5001, 0.9999, 1.0], dtype=torch.float64)
    assert gmm.inverse_cdf_pick(probs, u).squeeze(-1).tolist() == [0, 0, 1, 1, 2, 2, 2]
    short = torch.full((3, 3), 0.3)  # cdf ends at 0.9: u beyond it still names the last component
    assert gmm.inverse_cdf_pick(short, torch.tensor([0.95, 0.999, 0.1])).squeeze(-1).tolist() == [2, 2, 0]


def scipy_mixture_logpdf(x, mu, logvar, logits):
    """Row-wise log sum_k w_k N(x; mu_k, exp(logvar_k)) in float64 by scipy: x [R, M], mixture [R, K]."""
    mu, logvar, logits = (np.asarray(t, np.float64)[:, None, :] for t in (mu, logvar, logits))
    log_w = logits - special.logsumexp(logits, axis=-1, keepdims=True)
    return special.logsumexp(log_w + stats.norm.logpdf(np.asarray(x, np.float64)[..., None], mu,
                                                       np.exp(0.5 * logvar)), axis=-1)


def test_stacked_log_probs_match_scipy_row_by_row():
    """Bugs: the weights' log-softmax over the wrong axis, the exponent floor raised (e^-8 instead of
    e^-80 shows as 3e-4 where a second component is e^-8..e^-12 below the first), rows mixed up.
    Each row has its own mixture; the points reach far into every component's tails."""
    gen = torch.Generator().manual_seed(11)
    rows, m = 6, 400
    mixtures = [(torch.randn(rows, 4, generator=gen, dtype=torch.float64) * 3,
                 torch.randn(rows, 4, generator=gen, dtype=torch.float64) - 1,
                 torch.randn(rows, 4, generator=gen, dtype=torch.float64) * 2) for _ in range(2)]
    x = torch.linspace(-14, 14, m, dtype=torch.float64).expand(rows, -1)
    got = gmm.stacked_log_probs(x, mixtures)
    assert got.shape == (2, rows, m) and got.dtype == torch.float64
    for i, mix in enumerate(mixtures):
        np.testing.assert_allclose(got[i].numpy(), scipy_mixture_logpdf(x.numpy(), *(t.numpy() for t in mix)),
                                   rtol=1e-12, atol=1e-10)
    # the gmm_log_prob path agrees too (one row's mixture broadcast over its points)
    np.testing.assert_allclose(gmm_log_prob(x[1], *(t[1].expand(m, -1) for t in mixtures[0])).numpy(),
                               got[0, 1].numpy(), rtol=1e-12, atol=1e-10)


def numpy_exact_cfg(cond, uncond, w, temperature, u, points_per_scale=64, half_width=8.0):
    """The exact CFG sampler from its docstring, numpy float64: per row, a grid of points_per_scale points over
    +-half_width of std/T and of std/sqrt(T^2 + w - 1) around every conditional component and of std/sqrt(w)
    around every unconditional one, the target q_T (p_c/p_u)^(w-1) by scipy on the sorted grid, trapezoid cell
    masses, the cell whose cumulative mass first reaches u * total, and the linear position inside it."""
    mu, logvar, logits = (t.double().numpy() for t in cond)
    std = np.exp(0.5 * logvar)
    w = np.broadcast_to(np.asarray(w, np.float64), mu.shape[:1])[:, None, None]
    scales = np.stack([std / temperature, std / np.sqrt(temperature ** 2 + np.maximum(w[..., 0] - 1, 0))], -1)
    offsets = np.linspace(-half_width, half_width, points_per_scale)
    mu_u, std_u = uncond[0].double().numpy(), np.exp(0.5 * uncond[1].double().numpy())
    around_uncond = mu_u[..., None] + (std_u / np.sqrt(w[..., 0]))[..., None] * offsets
    grid = np.sort(np.concatenate([(mu[..., None, None] + scales[..., None] * offsets).reshape(len(mu), -1),
                                   around_uncond.reshape(len(mu), -1)], axis=-1), axis=-1)
    log_q = scipy_mixture_logpdf(grid, mu, logvar - 2 * np.log(temperature), logits)
    log_f = log_q + (w[:, :, 0] - 1) * (scipy_mixture_logpdf(grid, *(t.double().numpy() for t in cond))
                                        - scipy_mixture_logpdf(grid, *(t.double().numpy() for t in uncond)))
    density = np.exp(log_f - log_f.max(-1, keepdims=True))
    mass = 0.5 * (density[:, 1:] + density[:, :-1]) * np.diff(grid, axis=-1)
    cdf = np.cumsum(mass, axis=-1)
    out = []
    for r in range(len(mu)):
        target = u[r] * cdf[r, -1]
        cell = min(np.searchsorted(cdf[r], target), cdf.shape[1] - 1)
        frac = np.clip((target - cdf[r, cell] + mass[r, cell]) / mass[r, cell], 0, 1)
        out.append(grid[r, cell] + frac * (grid[r, cell + 1] - grid[r, cell]))
    return np.array(out)


def random_mixtures_64(rows, seed):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, 4, generator=gen, dtype=torch.float64) * 2,
            torch.randn(rows, 4, generator=gen, dtype=torch.float64) - 1,
            torch.randn(rows, 4, generator=gen, dtype=torch.float64))


@pytest.mark.parametrize("cfg, temperature", [(2.9, 1.1), ("per row", 0.95)])
def test_float64_exact_cfg_sampler_matches_numpy_from_its_docstring(cfg, temperature):
    """Bugs: any float32 step in a float64 draw (the CFG scale 2.9 through a float32 tensor, the grid
    offsets or the uniform made in float32, the log-densities rounded: each moves a draw by 1e-8..1e-6),
    the grid's second width, the trapezoid rule, the position inside the chosen cell. The uniform is the
    sampler's one draw per row, read back from the seed."""
    rows = 40
    cond, uncond = random_mixtures_64(rows, 12), random_mixtures_64(rows, 13)
    if cfg == "per row":
        cfg = torch.linspace(1.3, 6.1, rows, dtype=torch.float64)
    torch.manual_seed(14)
    u = torch.rand(rows, 1, dtype=torch.float64).squeeze(-1).numpy()
    torch.manual_seed(14)
    got = gmm.sample_gmm_cfg_exact(cond, uncond, cfg, temperature)
    assert got.dtype == torch.float64 and got.shape == (rows,)
    expected = numpy_exact_cfg(cond, uncond, cfg.numpy() if torch.is_tensor(cfg) else cfg, temperature, u)
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("sampler", ["plain", "sir", "exact"])
def test_float64_draws_carry_float64_noise(sampler):
    """Bug: the uniforms or normals of a float64 draw made in float32 (softmax(logits.float()), a float32
    `like`): with mean 0 and std 1 the draws would then be float32 numbers."""
    rows = 500
    zeros = torch.zeros(rows, 2, dtype=torch.float64)
    mixture = (zeros, zeros, zeros)
    torch.manual_seed(15)
    if sampler == "plain":
        out = gmm.sample_gmm(*mixture)
    else:
        wide = (zeros, zeros + 2.0, zeros)
        out = gmm.CFG_SAMPLERS[sampler](mixture, wide, 2.0, 1.0)
    assert out.dtype == torch.float64
    assert (out.float().double() != out).double().mean() > 0.99


@pytest.mark.parametrize("sampler, values_per_row", [(sample_gmm_cfg, 1000), (gmm.sample_gmm_cfg_exact, 3 * 4 * 64)],
                         ids=["sir", "exact"])
def test_guided_draws_stay_under_the_candidate_cap(sampler, values_per_row, monkeypatch):
    """Bug: a sampler telling row_slices fewer values per row than it makes (the exact sampler's grid is (2 widths x K
    conditional + K unconditional components) x 64 points = 768 per row, not K x 64), so its slices, and its
    memory, run over MAX_CANDIDATE_VALUES. Every density evaluation must see at most the cap's values, all rows
    once."""
    cap = 3 * values_per_row + values_per_row // 2  # room for 3 rows a call
    monkeypatch.setitem(gmm.MAX_CANDIDATE_VALUES, "cpu", cap)
    shapes, real = [], gmm.stacked_log_probs
    monkeypatch.setattr(gmm, "stacked_log_probs",
                        lambda x, mixtures: shapes.append(tuple(x.shape)) or real(x, mixtures))
    out = sampler(batch(10, MU, LOGVAR, LOGITS), batch(10, MU_U, LOGVAR_U, LOGITS_U), 3.0, 1.0)
    assert out.shape == (10,)
    assert shapes == [(3, values_per_row)] * 3 + [(1, values_per_row)]


@pytest.mark.parametrize("sampler", sorted(gmm.CFG_SAMPLERS))
def test_a_narrow_unconditional_component_leaves_a_dip_no_sampler_fills(sampler):
    """p_cond = N(0, 1), p_uncond = N(0, 1)/2 + N(0.3, 0.01^2)/2, w = 3: dividing by p_uncond^2 digs a dip
    about 0.006 wide at 0.3 that holds 1e-5 of the target's mass. The exact sampler's grid, laid around the
    conditional components alone, stepped over it and put 1.6% of its draws there (KS p 1e-8)."""
    n = 20000
    row = lambda *v: torch.tensor(v, dtype=torch.float64).expand(n, -1)  # noqa: E731
    cond = (row(0.0, 0.0), row(0.0, 0.0), row(0.0, -50.0))
    uncond = (row(0.0, 0.3), row(0.0, 2 * math.log(0.01)), row(0.0, 0.0))
    grid = np.linspace(-8, 8, 2_000_001)
    density = stats.norm.pdf(grid) ** 3 / (0.5 * stats.norm.pdf(grid) + 0.5 * stats.norm.pdf(grid, 0.3, 0.01)) ** 2
    cdf = np.cumsum(density) / density.sum()
    torch.manual_seed(0)
    samples = gmm.CFG_SAMPLERS[sampler](cond, uncond, 3.0, 1.0).numpy()
    assert np.mean(np.abs(samples - 0.3) < 0.02) < 0.001
    assert stats.kstest(samples, lambda v: np.interp(v, grid, cdf)).pvalue > 0.001


# ----------------------------------------------------------------------------- mutation guards, second pass
def test_a_scale_below_one_is_guided_too():
    """Bug: is_guided reading `cfg > 1`, so a scale below 1 (a draw pulled toward the unconditional law)
    is taken for unguided and both halves of the batch are drawn as separate rows. (The families refuse
    --cfg below 1; a head or sampler called directly takes any scale.)"""
    assert gmm.is_guided(0.5) and gmm.is_guided(0.0) and gmm.is_guided(1.5) and gmm.is_guided(4.5)
    assert not gmm.is_guided(1.0) and not gmm.is_guided(1)
    assert gmm.is_guided(torch.tensor(1.0)) and gmm.is_guided(torch.full((3,), 1.0))


def test_row_slices_count_the_further_leading_axes_of_a_row():
    """Bug: row_slices sizing a slice by the candidates of one mixture, ignoring that a row may hold several
    (logits [rows, 8, K]: 8 mixtures of 1000 candidates each), so a slice makes 8x the device cap."""
    rows = [torch.zeros(100, 8, 4), torch.zeros(100, 8, 4), torch.zeros(100, 8, 4)]
    cap = gmm.MAX_CANDIDATE_VALUES["cpu"]  # 2^18: 32 rows of 8 x 1000 values
    assert cap == 1 << 18
    slices = gmm.row_slices(rows, rows, 4.5, 1000)
    assert [c[2].shape[0] for c, _, _ in slices] == [32, 32, 32, 4]
    assert gmm.row_slices([t[:32] for t in rows], [t[:32] for t in rows], 4.5, 1000) is None


def test_sir_pick_never_names_a_component_past_the_last_when_the_weights_sum_below_one():
    """Bug: the component found by searchsorted over the whole cdf rather than its first K-1 entries: a float32
    softmax can sum to 1 - 1.2e-7, and a uniform of 1 - 6e-8 (torch.rand's largest) then names component K, a
    gather out of range. Every row's draw must be its last component (a point mass at 3 + 100 * row)."""
    rows, k, m = 2000, 4, 5
    logits = torch.randn(rows, k, generator=torch.Generator().manual_seed(31)) * 2
    u = torch.full((rows, m), 1 - 2 ** -24)
    assert (torch.softmax(logits, -1).cumsum(-1)[:, -1] < u[:, 0]).any()  # the case arises in these rows
    mu = torch.arange(k, dtype=torch.float32) + 100 * torch.arange(rows, dtype=torch.float32)[:, None]
    cond = (mu, torch.full((rows, k), -40.0), logits)
    uncond = (torch.zeros(rows, k), torch.zeros(rows, k), torch.zeros(rows, k))
    x = gmm.sir_pick(cond, uncond, 3.0, 1.0, u, torch.zeros(rows, m), torch.rand(rows, m))
    torch.testing.assert_close(x, mu[:, -1], rtol=0, atol=0)


def test_sir_draws_from_the_tempered_target_where_guidance_is_mild():
    """Bug: the resampling's proposals drawn from the untempered conditional mixture. At the scales of the
    parametrised test above, the guidance's own sharpening (precision T^2 + w - 1) hides the temperature
    (KS p 0.05..0.14); at w = 1.5, T = 0.5 it is plain."""
    torch.manual_seed(3)
    n, cfg, temperature = 4000, 1.5, 0.5
    samples = sample_gmm_cfg(batch(n, MU, LOGVAR, LOGITS), batch(n, MU_U, LOGVAR_U, LOGITS_U), cfg, temperature).numpy()
    grid, cdf, _ = target_cdf(cfg, temperature)
    assert stats.kstest(samples, lambda v: np.interp(v, grid, cdf)).pvalue > 0.001
    grid, cdf, _ = target_cdf(cfg, 1.0)
    assert stats.kstest(samples, lambda v: np.interp(v, grid, cdf)).pvalue < 1e-8


def test_exact_sampler_at_scale_zero_draws_the_unconditional_mixture():
    """Bugs: the exact sampler's grid widths std / sqrt(T^2 + w - 1) and std_u / sqrt(w) without their clamps
    (w - 1 at least 0, w at least 1): at w = 0, T = 1 both divide by zero and the draws come back NaN. The
    target there, q_1 (p_cond / p_uncond)^-1, is the unconditional mixture itself. (Below 1 only by a direct
    call: the families refuse --cfg < 1.)"""
    torch.manual_seed(0)
    n = 1500
    samples = gmm.sample_gmm_cfg_exact(batch(n, MU, LOGVAR, LOGITS), batch(n, MU_U, LOGVAR_U, LOGITS_U), 0.0, 1.0)
    assert torch.isfinite(samples).all()
    assert stats.kstest(samples.numpy(), mixture_cdf(MU_U, LOGVAR_U, LOGITS_U)).pvalue > 0.001
    assert stats.kstest(samples.numpy(), mixture_cdf(MU, LOGVAR, LOGITS)).pvalue < 1e-8


def test_float64_plain_draw_matches_numpy_from_its_docstring():
    """Bug: the component's uniform made in float32 in a float64 draw (torch.rand without dtype): the choice is
    then resolved to 2^-24 only, and the draws leave the float64 stream. From the docstring: one uniform per
    draw picks the component by inverse CDF of the weights, then mu + (std / T) * N(0, 1); both read back
    from the seed."""
    rows, temperature = 300, 0.9
    mu, logvar, logits = random_mixtures_64(rows, 16)
    torch.manual_seed(17)
    u, eps = torch.rand(rows, dtype=torch.float64).numpy(), torch.randn(rows, dtype=torch.float64).numpy()
    torch.manual_seed(17)
    got = gmm.sample_gmm(mu, logvar, logits, temperature)
    assert got.dtype == torch.float64
    cdf = np.cumsum(special.softmax(logits.numpy(), axis=-1), axis=-1)
    k = np.minimum((cdf < u[:, None]).sum(-1), 3)
    rows_ = np.arange(rows)
    expected = mu.numpy()[rows_, k] + np.exp(0.5 * logvar.numpy()[rows_, k]) / temperature * eps
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-12)

"""Diffusion math (models/diffusion.py) against independently computed numbers."""
import math

import numpy as np
import pytest
import torch
from scipy import stats

from models.diffusion import (Schedule, cosine_betas, discretized_gaussian_log_likelihood, normal_kl, p_mean_variance,
                              q_posterior, q_sample, space_timesteps, table_at)


def numpy_cosine_alpha_bar(steps=1000):
    s = np.arange(steps + 1, dtype=np.float64) / steps
    return np.cos((s + 0.008) / 1.008 * np.pi / 2) ** 2


def test_cosine_betas_match_formula_and_clamp():
    ab = numpy_cosine_alpha_bar()
    expected = np.minimum(1 - ab[1:] / ab[:-1], 0.999)
    betas = cosine_betas(1000)
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    np.testing.assert_allclose(betas, expected, rtol=1e-12, atol=0)
    assert betas[-1] == 0.999  # alpha_bar(1) ~ 0: the last step would be beta ~ 1 without the clamp
    assert (betas[:-1] < 0.999).all() and betas[0] == pytest.approx(4.1e-5, rel=0.05)


def test_space_timesteps_one_section():
    kept = space_timesteps(1000, 100)
    assert len(kept) == 100 and kept[0] == 0 and kept[-1] == 999
    assert kept[:11] == [0, 10, 20, 30, 40, 50, 61, 71, 81, 91, 101]
    assert kept == np.round(np.linspace(0, 999, 100)).astype(int).tolist()
    assert set(np.diff(kept)) == {10, 11}
    assert space_timesteps(1000, 1000) == list(range(1000))
    with pytest.raises(ValueError):
        space_timesteps(1000, 1001)


def test_respaced_schedule_keeps_alpha_bar_at_kept_steps():
    kept = space_timesteps(1000, 100)
    respaced = Schedule.respaced(cosine_betas(1000), kept)
    full_ab = np.cumprod(1 - cosine_betas(1000))
    assert respaced.timesteps.tolist() == kept
    # alpha_bar_i of the respaced chain is sqrt_alpha_bar_i ** 2
    np.testing.assert_allclose(respaced.sqrt_alpha_bar ** 2, full_ab[kept], rtol=1e-10)


def test_q_sample_and_posterior_against_bayes():
    betas = cosine_betas(1000)
    schedule = Schedule(betas)
    ab = np.cumprod(1 - betas)
    gen = torch.Generator().manual_seed(0)
    t = torch.tensor([1, 2, 10, 500, 998, 999])
    x0, noise, x_t = (torch.randn(6, 3, generator=gen, dtype=torch.float64) for _ in range(3))
    a = ab[t.numpy()][:, None]
    np.testing.assert_allclose(q_sample(schedule, x0, t, noise).numpy(),
                               np.sqrt(a) * x0.numpy() + np.sqrt(1 - a) * noise.numpy(), rtol=1e-12)
    # q(x_{t-1} | x_t, x_0) ∝ N(x_{t-1}; sqrt(ab_prev) x0, 1 - ab_prev) * N(x_t; sqrt(1 - beta) x_{t-1}, beta)
    ab_prev, beta = ab[t.numpy() - 1][:, None], betas[t.numpy()][:, None]
    precision = 1 / (1 - ab_prev) + (1 - beta) / beta
    mean = (np.sqrt(ab_prev) * x0.numpy() / (1 - ab_prev) + np.sqrt(1 - beta) * x_t.numpy() / beta) / precision
    got_mean, got_log_var = q_posterior(schedule, x0, x_t, t)
    np.testing.assert_allclose(got_mean.numpy(), mean, rtol=1e-9)
    np.testing.assert_allclose(got_log_var.numpy(), np.log(1 / precision), rtol=1e-9)
    # step 0's posterior variance (0) is replaced by step 1's
    assert schedule.posterior_log_variance[0] == schedule.posterior_log_variance[1]


def test_p_mean_variance_learned_range():
    schedule = Schedule(cosine_betas(1000))
    gen = torch.Generator().manual_seed(1)
    t = torch.tensor([3, 40, 700])
    x0, noise = (torch.randn(3, 4, generator=gen, dtype=torch.float64) for _ in range(2))
    x_t = q_sample(schedule, x0, t, noise)
    ones = torch.ones_like(x0)
    # the true noise as eps recovers x0, so the model mean is the true posterior mean
    mean, log_var = p_mean_variance(schedule, noise, -ones, x_t, t)
    true_mean, true_log_var = q_posterior(schedule, x0, x_t, t)
    np.testing.assert_allclose(mean.numpy(), true_mean.numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(log_var.numpy(), true_log_var.expand(3, 4).numpy(), rtol=1e-12)
    _, log_var = p_mean_variance(schedule, noise, ones, x_t, t)
    np.testing.assert_allclose(log_var.numpy(), np.log(cosine_betas(1000)[t.numpy()])[:, None].repeat(4, 1))
    _, log_var = p_mean_variance(schedule, noise, 0 * ones, x_t, t)
    expected = 0.5 * np.log(cosine_betas(1000)[t.numpy()]) + 0.5 * true_log_var[:, 0].numpy()
    np.testing.assert_allclose(log_var[:, 0].numpy(), expected, rtol=1e-12)


def test_table_at_keeps_dtype_and_gives_floats_for_int_steps(monkeypatch):
    schedule = Schedule(np.array([0.1, 0.2, 0.3]))
    assert isinstance(table_at(schedule, "log_betas", 2, torch.zeros(1)), float)
    assert table_at(schedule, "log_betas", 2, torch.zeros(1)) == math.log(0.3)
    wide = table_at(schedule, "log_betas", torch.tensor([1, 0]), torch.zeros(2, 2, dtype=torch.float64))
    assert wide.dtype == torch.float64 and wide[:, 0].tolist() == [math.log(0.2), math.log(0.1)]
    # the table reaches a device once: a host copy per training step would wait for the GPU's queued work
    monkeypatch.setattr(torch, "as_tensor", lambda *a, **k: pytest.fail("table copied again"))
    narrow = table_at(schedule, "log_betas", torch.tensor([1]), torch.zeros(1, 2))
    assert narrow.dtype == torch.float32 and narrow.item() == pytest.approx(math.log(0.2), rel=1e-7)


def test_normal_kl_closed_form():
    m1, m2, s1, s2 = 0.3, -0.4, 0.7, 1.3
    expected = math.log(s2 / s1) + (s1 ** 2 + (m1 - m2) ** 2) / (2 * s2 ** 2) - 0.5
    got = normal_kl(*(torch.tensor(v, dtype=torch.float64) for v in (m1, 2 * math.log(s1), m2, 2 * math.log(s2))))
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_discretized_log_likelihood_is_bin_mass():
    mean = torch.tensor([0.1, -0.2, 0.5, -0.9, 0.8], dtype=torch.float64)
    std = torch.tensor([0.05, 0.1, 0.3, 0.2, 0.2], dtype=torch.float64)
    x = torch.tensor([0.12, -0.25, 0.3, -1.0, 1.0], dtype=torch.float64)
    got = discretized_gaussian_log_likelihood(x, mean, std.log()).exp().numpy()
    m, s, xv = mean.numpy(), std.numpy(), x.numpy()
    expected = stats.norm.cdf(xv + 1 / 255, m, s) - stats.norm.cdf(xv - 1 / 255, m, s)
    expected[3] = stats.norm.cdf(-1 + 1 / 255, m[3], s[3])  # the edge bins are open
    expected[4] = stats.norm.sf(1 - 1 / 255, m[4], s[4])
    # ADM's tanh CDF approximation is good to ~3e-4 absolute
    np.testing.assert_allclose(got, expected, rtol=0.02)


def test_tables_are_made_once_per_device():
    """Bug: the table cache keyed by name alone, so a schedule used on one device hands that device's table
    to the next (a model moved to the GPU after a CPU call)."""
    schedule = Schedule(np.array([0.1, 0.2, 0.3]))
    cpu = schedule.tensor("log_betas", "cpu")
    meta = schedule.tensor("log_betas", "meta")
    assert cpu.device.type == "cpu" and meta.device.type == "meta" and meta.shape == (3,)
    assert schedule.tensor("log_betas", torch.device("cpu")) is cpu
    assert schedule.tensor("sqrt_alpha_bar", "cpu").tolist() == pytest.approx(np.sqrt(np.cumprod([0.9, 0.8, 0.7])))


def test_too_few_steps_are_refused():
    """Bugs: space_timesteps keeping 0 steps (an empty schedule, silently) or a one-step Schedule accepted
    (an IndexError deep in the posterior tables instead of the one-line error)."""
    with pytest.raises(ValueError, match="cannot keep 0 of 1000"):
        space_timesteps(1000, 0)
    assert space_timesteps(1000, 1) == [0] and space_timesteps(1000, 2) == [0, 999]
    with pytest.raises(ValueError, match="at least 2 steps"):
        Schedule(np.array([0.5]))
    assert len(Schedule(np.array([0.1, 0.5]))) == 2


def test_discretized_log_likelihood_far_tails_keep_adm_floor():
    """Bugs: a coarser floor than ADM's 1e-12 on a bin's mass (e.g. 1e-6), which caps the t = 0 decoder NLL of
    a token far from the model's mean; the open edge bins starting inside +-0.999 (e.g. at +-0.99). Masses
    ~1e-7 (open lower bin, open upper bin, an inner bin) must come out exact; one far below 1e-12 is floored
    at exactly log(1e-12); bins at +-0.995 are closed. Oracle: ADM's tanh CDF in numpy."""
    def cdf(u):
        return 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u ** 3)))

    # the last two: inner bins just inside the open edges (|x| < 0.999), whose mass is not the tail's
    x = np.array([-1.0, 1.0, 0.0, -1.0, 0.3, -0.995, 0.995])
    mean = np.array([0.0, 0.0, 0.05, 0.9, 0.3, 0.0, 0.0])
    std = np.array([0.2, 0.2, 0.01, 0.1, 0.0005, 0.5, 0.5])
    plus, minus = cdf((x - mean + 1 / 255) / std), cdf((x - mean - 1 / 255) / std)
    expected = np.log(np.array([plus[0], 1 - minus[1], plus[2] - minus[2], 1e-12, plus[4] - minus[4],
                                plus[5] - minus[5], plus[6] - minus[6]]))
    assert (np.exp(expected[:3]) < 1e-6).all() and (np.exp(expected[:3]) > 1e-10).all()  # between the floors
    assert plus[3] < 1e-12
    got = discretized_gaussian_log_likelihood(*(torch.tensor(v, dtype=torch.float64) for v in (x, mean, np.log(std))))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-9)

"""Oracles for the CFG samplers, written from the spec: fixed mixtures and the guided target's CDF
integrated numerically in float64 (independent of models.gmm's log-density code)."""
import functools

import numpy as np
import torch
from scipy import stats

# one feature's mixtures (mu, logvar, logits): a conditional one with a narrow component, and an
# unconditional one that differs from it
REF_COND = (torch.tensor([-2.0, 0.5, 1.5, 4.0]), torch.log(torch.tensor([0.3, 0.05, 1.0, 0.5]) ** 2),
            torch.tensor([0.2, 1.0, -0.5, 0.3]))
REF_UNCOND = (torch.tensor([-1.0, 0.0, 2.0, 3.0]), torch.log(torch.tensor([1.0, 0.8, 1.2, 1.5]) ** 2),
              torch.tensor([0.0, 0.5, 0.0, -0.2]))


def reference_mixtures(rows):
    """(cond, uncond): REF_COND and REF_UNCOND repeated over `rows` rows, as the samplers take them."""
    return tuple(tuple(t.expand(rows, -1) for t in mix) for mix in (REF_COND, REF_UNCOND))


def mixture_pdf(x, mu, logvar, logits, temperature=1.0):
    """Mixture density by scipy, float64: weights softmax(logits), std exp(logvar/2)/temperature."""
    mu, std = mu.double().numpy(), np.exp(0.5 * logvar.double().numpy()) / temperature
    w = np.exp(logits.double().numpy() - logits.double().numpy().max())
    w /= w.sum()
    return sum(w[k] * stats.norm.pdf(x, mu[k], std[k]) for k in range(len(w)))


@functools.lru_cache(maxsize=None)
def target_cdf(cfg, temperature, lo=-15.0, hi=17.0, points=400001):
    """CDF of q_T(x) * (p_cond(x) / p_uncond(x))^(cfg-1) for REF_COND/REF_UNCOND (spec section 4)."""
    grid = np.linspace(lo, hi, points)
    with np.errstate(divide="ignore"):
        log_f = (np.log(mixture_pdf(grid, *REF_COND, temperature)) + (cfg - 1) *
                 (np.log(mixture_pdf(grid, *REF_COND)) - np.log(mixture_pdf(grid, *REF_UNCOND))))
    density = np.exp(log_f - log_f.max())
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (density[1:] + density[:-1]) * np.diff(grid))])
    cdf /= cdf[-1]
    return lambda x: np.interp(x, grid, cdf)


def random_mixtures(rows, seed):
    """`rows` random 4-component mixtures (mu, logvar, logits), reproducible from `seed`."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, 4, generator=gen) * 2, torch.randn(rows, 4, generator=gen) - 1,
            torch.randn(rows, 4, generator=gen))


def assert_all_fit(pvalues, alpha=0.01):
    """A family of goodness-of-fit checks at family-wise level alpha (Bonferroni: every p > alpha / m), so a
    harmless change of the draws fails one of the m checks by chance with probability at most alpha."""
    pvalues = np.asarray(list(pvalues), dtype=np.float64)
    assert pvalues.min() > alpha / len(pvalues), f"p-values {np.round(pvalues, 6).tolist()} (alpha {alpha})"

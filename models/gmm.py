"""Gaussian-mixture math for ARINAR's per-feature densities.

Pure functions on tensors. A mixture over K components is given by three tensors of the same
shape [..., K]: means `mu`, natural-log variances `logvar`, and unnormalised weight `logits`.
Everything here runs in float32 whatever the caller's autocast dtype: the transformer may run in
bf16, but log-densities of sharp Gaussians and the CFG weights need the extra precision.
"""
import math

import torch
import torch.nn.functional as F

LOG_2PI = math.log(2 * math.pi)


def split_gmm_params(head_out, num_gaussians):
    """Split the inner head's output [..., 3K] laid out as [means | log-variances | logits]."""
    head_out = head_out.float()
    mu, logvar, logits = head_out.split(num_gaussians, dim=-1)
    return mu, logvar, logits


def _component_log_probs(x, mu, logvar, logits):
    """log w_k + log N(x; mu_k, exp(logvar_k)), without the -0.5*log(2*pi) constant."""
    x = x.float().unsqueeze(-1)
    return F.log_softmax(logits, dim=-1) - 0.5 * ((x - mu) ** 2 * torch.exp(-logvar) + logvar)


def gmm_nll(x, mu, logvar, logits):
    """Training loss of the release: mixture negative log-likelihood without the log(2*pi)/2 constant.

    x: [...], mixture tensors: [..., K]. Returns [...].
    """
    return -torch.logsumexp(_component_log_probs(x, mu, logvar, logits), dim=-1)


def gmm_log_prob(x, mu, logvar, logits):
    """Full mixture log-density log p(x), constant included. x broadcasts against mixture[..., 0]."""
    return torch.logsumexp(_component_log_probs(x, mu, logvar, logits), dim=-1) - 0.5 * LOG_2PI


def tempered(logvar, temperature):
    """ARINAR's temperature divides each component's std: logvar - 2*log(T)."""
    return logvar - 2.0 * math.log(temperature)


def sample_gmm(mu, logvar, logits, temperature=1.0, num_samples=None):
    """Draw from the temperature-scaled mixture; one sample per row, or [..., num_samples].

    Component choice by inverse CDF on the weights (one uniform per draw), then mu + std*eps.
    """
    probs = torch.softmax(logits.float(), dim=-1)
    shape = probs.shape[:-1] + ((num_samples,) if num_samples else ())
    cdf = probs.cumsum(-1)
    u = torch.rand(shape, device=probs.device)
    if num_samples:
        cdf, mu, logvar = cdf.unsqueeze(-2), mu.unsqueeze(-2), logvar.unsqueeze(-2)
    # count of cdf entries below u = chosen component; clamp guards u > cdf[-1] from rounding
    k = (cdf < u.unsqueeze(-1)).sum(-1, keepdim=True).clamp_max(probs.shape[-1] - 1)
    mu_k = mu.float().expand(*shape, -1).gather(-1, k).squeeze(-1)
    std_k = torch.exp(0.5 * tempered(logvar.float(), temperature)).expand(*shape, -1).gather(-1, k).squeeze(-1)
    return mu_k + std_k * torch.randn(shape, device=probs.device)


def cfg_log_target(x, cond, uncond, cfg, temperature=1.0):
    """Unnormalised log-density ARINAR's CFG sampler targets, for mixtures cond/uncond = (mu, logvar, logits).

    log q_T(x) + (w-1) * (log p_cond(x) - log p_uncond(x)), q_T the tempered conditional mixture;
    at T = 1 this is p_cond^w / p_uncond^(w-1). x: [..., M], mixtures [..., K]; cfg scalar or [...].
    """
    mu_c, lv_c, lg_c = (t.float().unsqueeze(-2) for t in cond)
    mu_u, lv_u, lg_u = (t.float().unsqueeze(-2) for t in uncond)
    w = torch.as_tensor(cfg, dtype=torch.float32, device=x.device)
    if w.dim() > 0:
        w = w.unsqueeze(-1)
    log_q = gmm_log_prob(x, mu_c, tempered(lv_c, temperature), lg_c)
    return log_q + (w - 1) * (gmm_log_prob(x, mu_c, lv_c, lg_c) - gmm_log_prob(x, mu_u, lv_u, lg_u))


def sample_gmm_cfg(cond, uncond, cfg, temperature=1.0, num_candidates=1000):
    """The release's CFG sampler: sampling-importance-resampling with `num_candidates` proposals.

    Proposals come from the tempered conditional mixture; each gets weight
    softmax((w-1) * (log p_cond - log p_uncond)) and one is picked. Returns one value per row.
    """
    candidates = sample_gmm(*cond, temperature=temperature, num_samples=num_candidates)  # [..., M]
    mu_c, lv_c, lg_c = (t.float().unsqueeze(-2) for t in cond)
    mu_u, lv_u, lg_u = (t.float().unsqueeze(-2) for t in uncond)
    w = torch.as_tensor(cfg, dtype=torch.float32, device=candidates.device)
    if w.dim() > 0:
        w = w.unsqueeze(-1)
    log_ratio = gmm_log_prob(candidates, mu_c, lv_c, lg_c) - gmm_log_prob(candidates, mu_u, lv_u, lg_u)
    pick = torch.multinomial(torch.softmax((w - 1) * log_ratio, dim=-1).reshape(-1, num_candidates), 1)
    return candidates.reshape(-1, num_candidates).gather(-1, pick).reshape(candidates.shape[:-1])

"""Gaussian-mixture math for ARINAR's per-feature densities.

Pure functions on tensors. A mixture over K components is given by three tensors of the same
shape [..., K]: means `mu`, natural-log variances `logvar`, and unnormalised weight `logits`.
A diagonal mixture over C-dim vectors (the `diag_*` functions) has mu, logvar [..., K, C] and
logits [..., K]. Everything here runs in at least float32 whatever the caller's autocast dtype (the
transformer may run in bf16, but log-densities of sharp Gaussians and the CFG weights need the extra
precision), and float64 inputs stay float64.
"""
import math

import torch
import torch.nn.functional as F

LOG_2PI = math.log(2 * math.pi)

# Most candidate values ([rows, M] for one feature, [rows, M, C] for a whole token) one guided draw
# makes at once, per device type; its temporaries are a few times this (8 planes for the release's
# sampler). Larger calls run in slices of rows: the scale-wise family sends every token of a scale
# through the head at once (65,536 rows at batch 256 on 16x16: 2 GiB a plane in one call). On a CPU,
# slices that stay in cache are also faster (scale-wise demo, batch 500: 1.5x, and a quarter of the
# memory); on CUDA, 2^22 leaves MAR's steps at ARINAR-B size in one call and still fills the GPU.
MAX_CANDIDATE_VALUES = {"cpu": 1 << 18, "cuda": 1 << 22}


def at_least_fp32(x):
    """x in float32, or in its own dtype when that is wider (float64 is never narrowed)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def split_gmm_params(head_out, num_gaussians):
    """Split the inner head's output [..., 3K] laid out as [means | log-variances | logits]."""
    mu, logvar, logits = at_least_fp32(head_out).split(num_gaussians, dim=-1)
    return mu, logvar, logits


def _log_kernel(x, mu, logvar):
    """log N(x; mu, exp(logvar)) without the -0.5*log(2*pi) constant, elementwise."""
    return -0.5 * ((x - mu) ** 2 * torch.exp(-logvar) + logvar)


def _component_log_probs(x, mu, logvar, logits):
    """log w_k + log N(x; mu_k, exp(logvar_k)), without the -0.5*log(2*pi) constant."""
    return F.log_softmax(logits, dim=-1) + _log_kernel(at_least_fp32(x).unsqueeze(-1), mu, logvar)


def gmm_nll(x, mu, logvar, logits):
    """Training loss of the release: mixture negative log-likelihood without the log(2*pi)/2 constant.

    x: [...], mixture tensors: [..., K]. Returns [...].
    """
    return -torch.logsumexp(_component_log_probs(x, mu, logvar, logits), dim=-1)


def gmm_log_prob(x, mu, logvar, logits):
    """Full mixture log-density log p(x), constant included. x broadcasts against mixture[..., 0]."""
    return torch.logsumexp(_component_log_probs(x, mu, logvar, logits), dim=-1) - 0.5 * LOG_2PI


def tempered(logvar, temperature):
    """ARINAR's temperature divides each component's std: logvar - 2*log(T). T: a float, or a 0-d tensor
    (a captured graph's static input, read on every replay)."""
    if torch.is_tensor(temperature):  # doubling is exact: the float path's value, one kernel more
        return logvar.sub(torch.log(temperature), alpha=2.0)
    return logvar - 2.0 * math.log(temperature)


def sample_gmm(mu, logvar, logits, temperature=1.0):
    """One draw per row from the temperature-scaled mixture (mu, logvar, logits [..., K]) -> [...].

    Component choice by inverse CDF on the weights (one uniform per draw), then mu + std*eps.
    """
    probs = torch.softmax(at_least_fp32(logits), dim=-1)
    u = torch.rand(probs.shape[:-1], device=probs.device, dtype=probs.dtype)
    k = inverse_cdf_pick(probs, u)
    mu_k = at_least_fp32(mu).gather(-1, k).squeeze(-1)
    std_k = torch.exp(0.5 * tempered(at_least_fp32(logvar), temperature)).gather(-1, k).squeeze(-1)
    return mu_k + std_k * torch.randn(probs.shape[:-1], device=probs.device, dtype=probs.dtype)


def inverse_cdf_pick(probs, u):
    """Component index [..., 1] drawn from probs [..., K] with one uniform u [...] per draw."""
    # count of cdf entries below u = chosen component; clamp guards u > cdf[-1] from rounding
    return (probs.cumsum(-1) < u.unsqueeze(-1)).sum(-1, keepdim=True).clamp_max(probs.shape[-1] - 1)


def race_pick(logit, u):
    """Index [..., 1] drawn from softmax(logit) over the last axis, given uniforms u of logit's shape.

    An exponential race, argmax(logit - log E) with E = -log U ~ Exp(1): the law of
    torch.multinomial on the softmax without its host-side checks, so CUDA graphs can capture it
    (and without exponential_, which is slow on CPU).
    """
    return (logit - u.log().neg_().log_()).argmax(dim=-1, keepdim=True)


def is_guided(cfg):
    """Whether a head's rows come as [cond; uncond]: cfg != 1, or any tensor cfg (CUDA-graph capture)."""
    return torch.is_tensor(cfg) or cfg != 1.0


def guidance_scale(cfg, like):
    """The CFG scale as a tensor of like's dtype and device; a per-row [...] scale broadcasts over [..., M].

    A Python float goes straight to like's dtype: through a float32 tensor first, a float64 run would
    use 2.9000000953674316 for 2.9."""
    w = torch.as_tensor(cfg, dtype=like.dtype, device=like.device)
    return w.unsqueeze(-1) if w.dim() > 0 else w


def stacked_log_probs(x, mixtures):
    """Full log-densities of several mixtures at x, at once: [len(mixtures), ..., M] for x [..., M].

    gmm_log_prob laid out for speed: components on a leading axis, so the K-way log-sum-exp is
    elementwise over [..., M] planes rather than a reduction over a trailing axis of 4, and
    exponents floored at -80 (CPU exp is many times slower where its result underflows; e^-80
    vanishes next to the leading term, which is 1).
    """
    mu, logvar, logits = (torch.stack([at_least_fp32(m[i]) for m in mixtures]).movedim(-1, 1).unsqueeze(-1)
                          for i in range(3))
    # per-component constants first, so the [..., M] planes see only three passes
    base = F.log_softmax(logits, dim=1) - 0.5 * logvar
    comp = torch.addcmul(base, (x - mu).square_(), torch.exp(-logvar), value=-0.5)
    peak = comp.amax(dim=1)
    # in place: comp is this function's own temporary, and the largest
    return comp.sub_(peak.unsqueeze(1)).clamp_min_(-80.0).exp_().sum(dim=1).log_().add_(peak) - 0.5 * LOG_2PI


def row_slices(cond, uncond, cfg, values_per_row):
    """The guided draw's arguments cut along dim 0 into slices that make at most the device's
    MAX_CANDIDATE_VALUES candidate values each; None when one call may make them all. Rows are
    drawn independently, so slicing changes only which random numbers a row gets, not its law."""
    logits = cond[2]  # [..., K] in both layouts; its leading axes are the rows
    if logits.dim() < 2:
        return None
    values_per_row *= logits[0].shape[:-1].numel()  # rows may have further leading axes
    cap = MAX_CANDIDATE_VALUES.get(logits.device.type, MAX_CANDIDATE_VALUES["cuda"])
    step = max(1, cap // max(1, values_per_row))
    if logits.shape[0] <= step:
        return None
    per_row_cfg = torch.is_tensor(cfg) and cfg.dim() > 0
    return [(tuple(t[i:i + step] for t in cond), tuple(t[i:i + step] for t in uncond),
             cfg[i:i + step] if per_row_cfg else cfg) for i in range(0, logits.shape[0], step)]


def sample_gmm_cfg(cond, uncond, cfg, temperature=1.0, num_candidates=1000):
    """The release's CFG sampler (sampling-importance-resampling): one value per row.

    `num_candidates` proposals come from the tempered conditional mixture; each gets the weight
    softmax((w-1) * (log p_cond - log p_uncond)) and one is picked. The draws are made here, in the
    release's order for the proposals (component uniforms, then normals), then uniforms U for the
    pick; the arithmetic is the pure function sir_pick. The pick is an exponential race,
    argmax(weight logit - log E) with E = -log U: a draw from the softmax weights, like
    torch.multinomial, but without its host-side checks, so CUDA graphs can capture it.
    """
    if (slices := row_slices(cond, uncond, cfg, num_candidates)) is not None:
        return torch.cat([sample_gmm_cfg(c, u, w, temperature, num_candidates) for c, u, w in slices])
    like = at_least_fp32(cond[0])
    shape = like.shape[:-1] + (num_candidates,)
    u = torch.rand(shape, device=like.device, dtype=like.dtype)
    eps = torch.randn(shape, device=like.device, dtype=like.dtype)
    u_pick = torch.rand(shape, device=like.device, dtype=like.dtype)
    return sir_pick(cond, uncond, cfg, temperature, u, eps, u_pick)


def sir_pick(cond, uncond, cfg, temperature, u, eps, u_pick):
    """The arithmetic of sample_gmm_cfg given its draws u, eps, u_pick [..., M]: one value per row."""
    mu_c, lv_c, lg_c = (at_least_fp32(t) for t in cond)
    cdf = torch.softmax(lg_c, dim=-1).cumsum(dim=-1)
    # chosen component = count of the first K-1 cdf entries below u (a cumsum of weights never decreases):
    # one kernel, where a comparison per component took two
    k = torch.searchsorted(cdf[..., :-1].contiguous(), u.contiguous())  # (fresh draws are: no copy)
    std = torch.exp(0.5 * tempered(lv_c, temperature))
    x = mu_c.gather(-1, k) + std.gather(-1, k) * eps  # [..., M]
    log_p = stacked_log_probs(x, (cond, uncond))
    logit = (guidance_scale(cfg, x) - 1) * (log_p[0] - log_p[1])
    return x.gather(-1, race_pick(logit, u_pick)).squeeze(-1)


def sample_gmm_cfg_exact(cond, uncond, cfg, temperature=1.0, points_per_scale=64, half_width=8.0):
    """CFG sampler by inverse CDF of the 1-D target on an adaptive grid (exact as the grid refines).

    Around every conditional component the grid holds `points_per_scale` evenly spaced points over
    +-`half_width` of two widths: its tempered std (where the proposal puts its mass) and the
    narrower std of the guided target's peak, std / sqrt(T^2 + w - 1) (guidance multiplies the
    component by p_cond^(w-1), which sharpens it); around every unconditional component, as many over
    +-`half_width` of its std / sqrt(w): dividing by p_uncond^(w-1) digs a dip of about that width
    where that component is narrow, which a grid laid around the conditional components alone would
    step over (and put mass in). The target, log q_T + (w - 1) (log p_cond - log p_uncond)
    with q_T the tempered conditional mixture (p_cond^w / p_uncond^(w-1) at T = 1), is taken as
    piecewise constant on the sorted grid's cells (trapezoid masses) and inverted with one uniform
    per row; the CDF error shrinks as the square of the spacing. Fixed shapes and no host syncs,
    so it can be captured in a CUDA graph.
    """
    grid_points = (2 * cond[0].shape[-1] + uncond[0].shape[-1]) * points_per_scale
    if (slices := row_slices(cond, uncond, cfg, grid_points)) is not None:
        return torch.cat([sample_gmm_cfg_exact(c, u, w, temperature, points_per_scale, half_width)
                          for c, u, w in slices])
    mu, std = at_least_fp32(cond[0]), torch.exp(0.5 * at_least_fp32(cond[1]))
    mu_u, std_u = at_least_fp32(uncond[0]), torch.exp(0.5 * at_least_fp32(uncond[1]))
    w = guidance_scale(cfg, mu)
    scales = torch.stack([std / temperature, std / torch.sqrt(temperature ** 2 + (w - 1).clamp_min(0))], dim=-1)
    offsets = torch.linspace(-half_width, half_width, points_per_scale, device=mu.device, dtype=mu.dtype)
    around_cond = (mu[..., None, None] + scales[..., None] * offsets).flatten(-3)  # [..., 2 K P]
    around_uncond = (mu_u[..., None] + (std_u / torch.sqrt(w.clamp_min(1.0)))[..., None] * offsets).flatten(-2)
    grid = torch.cat([around_cond, around_uncond], dim=-1).sort(dim=-1).values  # [..., G]
    proposal = (cond[0], tempered(at_least_fp32(cond[1]), temperature), cond[2])
    log_p = stacked_log_probs(grid, (proposal, cond, uncond))
    log_f = log_p[0] + (w - 1) * (log_p[1] - log_p[2])
    density = (log_f - log_f.amax(dim=-1, keepdim=True)).clamp_min_(-80.0).exp_()
    mass = 0.5 * (density[..., 1:] + density[..., :-1]) * grid.diff(dim=-1)  # [..., G-1]
    cdf = mass.cumsum(dim=-1)
    u = torch.rand(cdf.shape[:-1] + (1,), device=cdf.device, dtype=cdf.dtype) * cdf[..., -1:]
    cell = torch.searchsorted(cdf, u).clamp_max_(cdf.shape[-1] - 1)  # first cell whose cdf reaches u
    cell_mass = mass.gather(-1, cell)
    left = grid.gather(-1, cell)
    # where the draw falls inside the chosen cell, reusing the same uniform
    frac = (u - cdf.gather(-1, cell) + cell_mass) / cell_mass.clamp_min(torch.finfo(mass.dtype).tiny)
    return (left + frac.clamp(0.0, 1.0) * (grid.gather(-1, cell + 1) - left)).squeeze(-1)


def diag_gmm_log_prob(x, mu, logvar, logits):
    """Full log-density of x [..., C] under a diagonal mixture (mu, logvar [..., K, C], logits [..., K])."""
    x, mu, logvar = (at_least_fp32(t) for t in (x, mu, logvar))
    comp = F.log_softmax(logits.to(mu.dtype), dim=-1) + _log_kernel(x.unsqueeze(-2), mu, logvar).sum(-1)
    return torch.logsumexp(comp, dim=-1) - 0.5 * x.shape[-1] * LOG_2PI


def sample_diag_gmm(mu, logvar, logits, temperature=1.0, num_samples=None):
    """Whole vectors [..., C] (or [..., num_samples, C]) from a diagonal mixture whose stds are divided
    by the temperature: one component per vector (so features share it), then mu + std * N(0, I)."""
    probs = torch.softmax(at_least_fp32(logits), dim=-1)
    if num_samples:
        probs, mu, logvar = probs.unsqueeze(-2), mu.unsqueeze(-3), logvar.unsqueeze(-3)
    shape = probs.shape[:-1] if not num_samples else probs.shape[:-2] + (num_samples,)
    k = inverse_cdf_pick(probs, torch.rand(shape, device=probs.device, dtype=probs.dtype))  # [..., 1]
    index = k.unsqueeze(-1).expand(*shape, 1, mu.shape[-1])
    mu_k = at_least_fp32(mu).expand(*shape, -1, -1).gather(-2, index).squeeze(-2)
    logvar_k = tempered(at_least_fp32(logvar), temperature).expand(*shape, -1, -1).gather(-2, index).squeeze(-2)
    return mu_k + torch.exp(0.5 * logvar_k) * torch.randn(mu_k.shape, device=mu_k.device, dtype=mu_k.dtype)


def sample_diag_gmm_cfg(cond, uncond, cfg, temperature=1.0, num_candidates=1000):
    """The release's resampling CFG sampler over whole vectors: target p_cond^w / p_uncond^(w-1).

    `num_candidates` proposals [..., M, C] from the tempered conditional mixture, weights
    softmax((w-1) * (log p_cond - log p_uncond)) over the whole vector, one pick by an exponential
    race (no host sync). cond/uncond = (mu, logvar, logits); cfg scalar, 0-d or per-row [...].
    """
    # candidate values per row: M vectors of C features
    if (slices := row_slices(cond, uncond, cfg, num_candidates * cond[0].shape[-1])) is not None:
        return torch.cat([sample_diag_gmm_cfg(c, u, w, temperature, num_candidates) for c, u, w in slices])
    candidates = sample_diag_gmm(*cond, temperature=temperature, num_samples=num_candidates)

    def log_prob(mixture):
        mu, logvar, logits = mixture
        return diag_gmm_log_prob(candidates, mu.unsqueeze(-3), logvar.unsqueeze(-3), logits.unsqueeze(-2))

    log_ratio = log_prob(cond) - log_prob(uncond)  # [..., M]
    logit = (guidance_scale(cfg, log_ratio) - 1) * log_ratio
    pick = race_pick(logit, torch.rand_like(logit))
    return candidates.gather(-2, pick.unsqueeze(-1).expand(*pick.shape, candidates.shape[-1])).squeeze(-2)


# --cfg_sampler choices: the release's resampling is the faithful default
CFG_SAMPLERS = {"sir": sample_gmm_cfg, "exact": sample_gmm_cfg_exact}

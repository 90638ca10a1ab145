"""Straightforward reference paths, the yardstick for the fast ones.

Written from the spec (section 4), not from the fast code: the inner model recomputes its whole
prefix for every feature, mixtures are torch.distributions objects, CFG is the release's
1000-candidate resampling, and the outer loop runs one step at a time. Only the model's modules
and weights are reused (model.condition for the outer network, arhead.run for the inner blocks).
`release_style_loss` is the release's training loss: the inner model on every token, loss masked.
`target_cdf` integrates the guided 1-D target numerically, the yardstick for the CFG samplers.
"""
import functools
import math

import numpy as np
import torch
from torch.distributions import Categorical, MixtureSameFamily, Normal

from models.gmm import cfg_log_target, split_gmm_params

# one feature's mixtures (mu, logvar, logits): a conditional one with a narrow component, and an
# unconditional one that differs from it
REF_COND = (torch.tensor([-2.0, 0.5, 1.5, 4.0]), torch.log(torch.tensor([0.3, 0.05, 1.0, 0.5]) ** 2),
            torch.tensor([0.2, 1.0, -0.5, 0.3]))
REF_UNCOND = (torch.tensor([-1.0, 0.0, 2.0, 3.0]), torch.log(torch.tensor([1.0, 0.8, 1.2, 1.5]) ** 2),
              torch.tensor([0.0, 0.5, 0.0, -0.2]))


def reference_mixtures(rows):
    """(cond, uncond): REF_COND and REF_UNCOND repeated over `rows` rows, as the samplers take them."""
    return tuple(tuple(t.expand(rows, -1) for t in mix) for mix in (REF_COND, REF_UNCOND))


@functools.lru_cache(maxsize=None)
def target_cdf(cfg, temperature, lo=-15.0, hi=17.0, points=400001):
    """CDF of the normalised exp(cfg_log_target) for REF_COND/REF_UNCOND, trapezoid-integrated on a grid."""
    grid = torch.linspace(lo, hi, points, dtype=torch.float64)
    log_f = cfg_log_target(grid[None].float(), *reference_mixtures(1), cfg, temperature)[0].double()
    density = torch.exp(log_f - log_f.max())
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64), (0.5 * (density[1:] + density[:-1]) * grid.diff()).cumsum(0)])
    cdf = (cdf / cdf[-1]).numpy()
    return lambda x: np.interp(x, grid.numpy(), cdf)


def random_mixtures(rows, seed):
    """`rows` random 4-component mixtures (mu, logvar, logits), reproducible from `seed`."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, 4, generator=gen) * 2, torch.randn(rows, 4, generator=gen) - 1,
            torch.randn(rows, 4, generator=gen))


def mixture(mu, logvar, logits, temperature=1.0):
    """The per-feature mixture as a distribution; temperature divides each component's std."""
    return MixtureSameFamily(Categorical(logits=logits), Normal(mu, torch.exp(0.5 * logvar) / temperature))


def draw_feature(cond, uncond, cfg, temperature, num_candidates):
    """One value per row from the tempered conditional mixture, resampled for CFG when cfg != 1."""
    proposal = mixture(*cond, temperature=temperature)
    if uncond is None:
        return proposal.sample()
    candidates = proposal.sample((num_candidates,))  # [M, n]
    log_ratio = mixture(*cond).log_prob(candidates) - mixture(*uncond).log_prob(candidates)
    pick = Categorical(logits=((cfg - 1) * log_ratio).T).sample()  # [n]
    return candidates.T.gather(1, pick[:, None]).squeeze(1)


@torch.no_grad()
def reference_inner_sample(inner, z, temperature=1.0, cfg=1.0, num_candidates=1000):
    """InnerAR sampling without a cache: every feature reruns the transformer on the full prefix.

    z: [N, C], rows [cond; uncond] when cfg != 1. Returns float32 [n, D].
    """
    guided = cfg != 1.0
    n = z.shape[0] // 2 if guided else z.shape[0]
    mods = inner.modulations(z)
    inputs = [inner.cond_proj(z).unsqueeze(1) + inner.start_token]  # position 0
    features = []
    for t in range(inner.token_dim):
        prefix = torch.cat(inputs, dim=1) + inner.pos_embedding[:, :t + 1]
        mu, logvar, logits = split_gmm_params(inner.run(prefix, mods)[:, -1], inner.num_gaussians)
        if guided:
            x = draw_feature((mu[:n], logvar[:n], logits[:n]), (mu[n:], logvar[n:], logits[n:]),
                             cfg, temperature, num_candidates)
        else:
            x = draw_feature((mu, logvar, logits), None, cfg, temperature, num_candidates)
        features.append(x.float())
        x_in = torch.cat([x, x]) if guided else x
        inputs.append(inner.input_proj(x_in[:, None, None].to(inputs[0].dtype)))
    return torch.stack(features, dim=1)


def masked_after_step(seq_len, num_iter, step, still_masked):
    """Tokens still masked after 0-based `step` of the cosine schedule (spec section 4)."""
    if step == num_iter - 1:
        return 0
    count = math.floor(seq_len * math.cos(math.pi / 2 * (step + 1) / num_iter))
    return max(1, min(still_masked - 1, count))


@torch.no_grad()
def reference_sample_tokens(model, bsz, num_iter=64, cfg=1.0, labels=None, temperature=1.0,
                            cfg_schedule="linear", num_candidates=1000, inner_sample=None):
    """MAR-style outer loop, one step at a time -> latents [bsz, C, h, w].

    inner_sample(z, temperature, cfg) defaults to `reference_inner_sample`; passing the model's own
    sampler checks this loop against `model.sample_tokens` (same random draws in the same order).
    """
    if inner_sample is None:
        def inner_sample(z, t, w):
            return reference_inner_sample(model.arhead, z, t, w, num_candidates)
    guided = cfg != 1.0
    seq_len, device = model.seq_len, model.fake_latent.device
    fake = model.fake_latent.expand(bsz, -1)
    class_vec = model.class_emb(labels.to(device)) if labels is not None else fake
    if guided:
        class_vec = torch.cat([class_vec, fake])
    tokens = torch.zeros(bsz, seq_len, model.token_embed_dim, device=device)
    mask = torch.ones(bsz, seq_len, dtype=torch.bool, device=device)
    orders = torch.argsort(torch.rand(bsz, seq_len, device=device), dim=1)
    still_masked = seq_len
    for step in range(num_iter):
        doubled = (lambda t: torch.cat([t, t])) if guided else (lambda t: t)
        z = model.condition(doubled(tokens), doubled(mask), class_vec)
        remaining = masked_after_step(seq_len, num_iter, step, still_masked)
        new_mask = torch.zeros_like(mask)
        new_mask.scatter_(1, orders[:, :remaining], True)
        chosen = mask & ~new_mask
        mask, still_masked = new_mask, remaining
        if not chosen.any():
            continue
        # linear schedule on the clamped count (the last step counts one token still masked)
        unmasked = seq_len - max(remaining, 1)
        scale = 1 + (cfg - 1) * unmasked / seq_len if cfg_schedule == "linear" else cfg
        tokens[chosen] = inner_sample(z[doubled(chosen)], temperature, scale if guided else 1.0)
    return model.unpatchify(tokens)


def release_style_loss(model, latents, labels, mask=None):
    """The release's training loss: inner NLL on every token, then the mean over masked tokens.

    Draws the mask and label dropout in the same order as MAR.forward, so with the same seed the
    two losses agree; only the amount of inner-model work differs.
    """
    tokens = model.patchify(latents)
    b = tokens.shape[0]
    mask = model.random_mask(b, tokens.device) if mask is None else mask.bool()
    class_vec = model.class_embedding(labels, b, drop_labels=model.training)
    z = model.condition(tokens, mask, class_vec)
    nll = model.arhead.nll(tokens.reshape(-1, tokens.shape[-1]), z.reshape(-1, z.shape[-1])).view(b, -1)
    weights = mask.float()
    return (nll * weights).sum() / weights.sum()

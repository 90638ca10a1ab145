"""The ARINAR release's costs, as the benchmarks' baseline (written from the release's facts).

Sampling does per feature step what the public release does:
- the inner model's KV cache grows by concatenation (torch.cat of every block's keys/values);
- every block's AdaLN modulation and the pre-head one are recomputed from z at each of the
  16 feature steps (the release calls `ada_lin(z)` inside every block forward);
- the CFG draw goes through torch.distributions: 1000 candidates from a MixtureSameFamily of
  the tempered conditional mixture ([1000, rows]), weights from the two mixtures' log_prob, and a
  Categorical pick;
- the outer loop runs one step at a time with the full decoder (z for all 256 positions).
Only the model's modules and weights are shared with our engine. `release_style_loss` is the
release's training loss (the inner model on every token, the loss masked) for bench_train.
"""

import torch
import torch.nn.functional as F
from torch.distributions import Categorical, MixtureSameFamily, Normal

from models.families.common import cosine_schedule


def mixture(mu, logvar, logits, temperature=1.0):
    """One feature's mixture as the release builds it; temperature divides each component's std."""
    return MixtureSameFamily(Categorical(logits=logits), Normal(mu, torch.exp(0.5 * logvar) / temperature))


def draw_feature(cond, uncond, cfg, temperature, num_candidates=1000):
    """One value per row: a tempered draw, or the release's CFG resampling over `num_candidates`."""
    proposal = mixture(*cond, temperature=temperature)
    if uncond is None:
        return proposal.sample()
    candidates = proposal.sample((num_candidates,))  # [M, rows]
    log_ratio = mixture(*cond).log_prob(candidates) - mixture(*uncond).log_prob(candidates)
    pick = Categorical(logits=((cfg - 1) * log_ratio).T).sample()  # [rows]
    return candidates.T.gather(1, pick[:, None]).squeeze(1)


def modulate(x, scale, shift):
    return F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale) + shift


def block_step(block, x, z, cache):
    """One AdaLN block on the newest position x [N, 1, W]; cache = [k, v] grown by concatenation."""
    gamma1, gamma2, scale1, scale2, shift1, shift2 = block.ada_lin(z).unsqueeze(1).chunk(6, dim=-1)
    attn = block.attn
    n, _, width = x.shape
    bias = torch.cat([attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias])
    q, k, v = F.linear(modulate(x, scale1, shift1), attn.mat_qkv.weight, bias).view(
        n, 1, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    if cache:
        k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
    cache[:] = [k, v]
    out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
    x = x + gamma1 * attn.proj(out.transpose(1, 2).reshape(n, 1, width))
    return x + gamma2 * block.ffn(modulate(x, scale2, shift2))


@torch.no_grad()
def release_inner_sample(inner, z, temperature=1.0, cfg=1.0, num_candidates=1000):
    """ARINAR's inner sampling at the release's cost. z: [N, C], rows [cond; uncond] when cfg != 1."""
    guided = cfg != 1.0
    n = z.shape[0] // 2 if guided else z.shape[0]
    caches = [[] for _ in inner.blocks]
    h = inner.cond_proj(z).unsqueeze(1) + inner.start_token
    features = []
    for t in range(inner.token_dim):
        x = h + inner.pos_embedding[:, t:t + 1]
        for block, cache in zip(inner.blocks, caches):
            x = block_step(block, x, z, cache)
        scale, shift = inner.head_nm.ada_lin(z).unsqueeze(1).chunk(2, dim=-1)
        out = inner.head(modulate(x, scale, shift))[:, -1].float()
        mu, logvar, logits = out.split(inner.num_gaussians, dim=-1)
        if guided:
            value = draw_feature((mu[:n], logvar[:n], logits[:n]), (mu[n:], logvar[n:], logits[n:]), cfg,
                                 temperature, num_candidates)
        else:
            value = draw_feature((mu, logvar, logits), None, cfg, temperature)
        features.append(value)
        fed = torch.cat([value, value]) if guided else value
        h = inner.input_proj(fed[:, None, None].to(inner.input_proj.weight.dtype))
    return torch.stack(features, dim=1)


@torch.no_grad()
def release_sample_tokens(model, bsz, num_iter=64, cfg=1.0, labels=None, temperature=1.0, cfg_schedule="linear",
                          inner_sample=None):
    """MAR's outer loop, one step at a time with the full decoder -> latents [bsz, C, h, w].

    inner_sample(z, temperature, cfg) defaults to release_inner_sample; passing the model's own
    head sampler checks this loop against our engine (same random draws in the same order).
    """
    inner_sample = inner_sample or (lambda z, t, w: release_inner_sample(model.arhead, z, t, w))
    guided = cfg != 1.0
    seq_len, device = model.seq_len, model.fake_latent.device
    fake = model.fake_latent.expand(bsz, -1)
    class_vec = model.class_emb(labels.to(device)) if labels is not None else fake
    if guided:
        class_vec = torch.cat([class_vec, fake])
    doubled = (lambda t: torch.cat([t, t])) if guided else (lambda t: t)
    tokens = torch.zeros(bsz, seq_len, model.token_embed_dim, device=device)
    mask = torch.ones(bsz, seq_len, dtype=torch.bool, device=device)
    orders = torch.argsort(torch.rand(bsz, seq_len, device=device), dim=1)
    for step, (remaining, scale) in enumerate(cosine_schedule(seq_len, num_iter, cfg, cfg_schedule)):
        remaining = 0 if step == num_iter - 1 else remaining
        z = model.condition(doubled(tokens), doubled(mask), class_vec)
        new_mask = torch.zeros_like(mask).scatter_(1, orders[:, :remaining], True)
        chosen = mask & ~new_mask
        mask = new_mask
        if chosen.any():
            tokens[chosen] = inner_sample(z[doubled(chosen)], temperature, scale if guided else 1.0).to(tokens.dtype)
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

"""The outer sampling loop: cosine schedule, random order, CFG batching, partial canvases.

It knows nothing about which head it drives or how: `backend.condition(...)` runs the outer
model and `backend.sample_head(...)` the per-token head (sampling/backends.py). A partial canvas
(`keep` True = a given token) is the general case; plain sampling keeps nothing.
"""
import torch
from tqdm import tqdm

from models.mar import CFG_SCHEDULES, sampling_schedule


def check_sampling_settings(num_iter, cfg, temperature, cfg_schedule):
    if num_iter < 1:
        raise ValueError(f"num_iter must be >= 1; got {num_iter}")
    if cfg < 1:
        raise ValueError(f"cfg must be >= 1 (1 = no guidance); got {cfg}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (it divides each Gaussian's std); got {temperature}")
    if cfg_schedule not in CFG_SCHEDULES:
        raise ValueError(f"cfg_schedule must be one of {CFG_SCHEDULES}; got {cfg_schedule!r}")


def canvas(model, bsz, known, keep, device):
    """(tokens [bsz, L, D] holding the kept tokens, keep [bsz, L] bool); float32, or float64 for a float64 model."""
    dtype = torch.promote_types(model.fake_latent.dtype, torch.float32)
    tokens = torch.zeros(bsz, model.seq_len, model.token_embed_dim, device=device, dtype=dtype)
    if keep is None:
        return tokens, torch.zeros(bsz, model.seq_len, dtype=torch.bool, device=device)
    keep = torch.as_tensor(keep, device=device)
    if keep.dtype != torch.bool or tuple(keep.shape) != (bsz, model.seq_len):
        raise ValueError(f"keep must be a bool [bsz, seq_len] = [{bsz}, {model.seq_len}] mask (True = keep the "
                         f"token); got {keep.dtype} {list(keep.shape)}")
    if known is None:
        raise ValueError("keep needs known=LATENTS: the latents whose kept tokens are copied")
    model.check_latents(known)
    if known.shape[0] != bsz:
        raise ValueError(f"known holds {known.shape[0]} canvases for bsz {bsz}")
    given = model.patchify(known.to(device=device, dtype=dtype))
    return torch.where(keep[..., None], given, tokens), keep


@torch.no_grad()
def sample_tokens(model, backend, bsz, num_iter=64, cfg=1.0, cfg_schedule="linear", labels=None, temperature=1.0,
                  known=None, keep=None, progress=False):
    """Latents [bsz, C, h, w]: the tokens not kept are generated, the kept ones copied bit for bit.

    Each image gets a random order over its tokens to generate; the cosine schedule spreads them
    over `num_iter` outer steps. Rows that generate different numbers of tokens run as separate
    groups (the encoder needs the same count of visible tokens in every row).
    """
    check_sampling_settings(num_iter, cfg, temperature, cfg_schedule)
    guided = cfg != 1.0
    if guided and labels is None:
        raise ValueError("cfg > 1 needs class labels (pass labels=...) or use cfg=1.0")
    device = model.fake_latent.device
    with backend.autocast():
        class_vec = model.class_embedding(labels.to(device) if labels is not None else None, bsz)
        tokens, keep = canvas(model, bsz, known, keep, device)
        unknown = (~keep).sum(1)
        for count in unknown.unique().tolist():
            if count == 0:
                continue  # nothing to generate in these rows
            rows = (unknown == count).nonzero().squeeze(1)
            tokens[rows] = fill(model, backend, tokens[rows], keep[rows], class_vec[rows], count, num_iter, cfg,
                                cfg_schedule, temperature, progress)
    return model.unpatchify(tokens)


def fill(model, backend, tokens, keep, class_vec, num_unknown, num_iter, cfg, cfg_schedule, temperature, progress):
    """Generate the `num_unknown` tokens that `keep` leaves open in every row of `tokens` [b, L, D]."""
    b, guided = tokens.shape[0], cfg != 1.0
    both = (lambda t: torch.cat([t, t])) if guided else (lambda t: t)
    if guided:
        class_vec = torch.cat([class_vec, model.fake_latent.expand(b, -1).to(class_vec.dtype)])
    # a random order per image; kept tokens sort last, so the first `masked` entries are still to generate
    scores = torch.rand(b, model.seq_len, device=tokens.device)
    orders = torch.argsort(scores.masked_fill(keep, 2.0), dim=1)
    masked = num_unknown
    schedule = sampling_schedule(num_unknown, num_iter, cfg, cfg_schedule, seq_len=model.seq_len)
    for step, (mask_len, cfg_scale) in enumerate(tqdm(schedule, disable=not progress, desc="sampling")):
        if step == num_iter - 1:
            mask_len = 0
        if mask_len == masked:
            continue  # fewer tokens to generate than steps
        visible = orders[:, masked:].sort(dim=1).values
        predict = orders[:, mask_len:masked].sort(dim=1).values
        z = backend.condition(both(tokens), both(visible), class_vec, both(predict))  # [rows, P, D]
        features = backend.sample_head(z.flatten(0, 1), temperature, cfg_scale if guided else 1.0)
        tokens = tokens.scatter(1, predict.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]),
                                features.view(b, -1, tokens.shape[-1]).to(tokens.dtype))
        masked = mask_len
    return tokens

"""Multi-scale residual latents for scale-wise generation (VAR on continuous tokens), as pure functions.

A token grid f [B, D, n, n] (each token's D features as channels) is written as a sum of residuals
over the scales p_1 < ... < p_S = n: with f_hat = 0, for each scale k < S
    h_k = resize(f - f_hat, p_k);  f_hat += resize(h_k, n);  input_{k+1} = resize(f_hat, p_{k+1}),
and h_S = f - f_hat. `resize` is bicubic interpolation (align_corners=False, no antialiasing: the
ARINAR release's F.interpolate default). The network at scale k sees input_k (the first scale sees
the class instead) and learns h_k; a sampler rebuilds f_hat from the h_k it draws.
"""
import torch
import torch.nn.functional as F

# VAR's schedule for a 16 x 16 grid (10 steps, 680 tokens); other sides rescale it (scales_for)
VAR_SCALES_16 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


def scales_for(side):
    """The scales (sides p_k) for an n x n token grid: VAR's 16-side schedule rescaled to n.

    p = floor(v * n / 16 + 1/2) (rounding halves up, in integers) for each v of VAR_SCALES_16,
    floored at 1, duplicates dropped. 16 -> VAR's own (1, 2, 3, 4, 5, 6, 8, 10, 13, 16);
    4 -> (1, 2, 3, 4); 8 -> (1, 2, 3, 4, 5, 7, 8); 32 -> (1, 2, 4, 6, ..., 26, 32). The last scale
    is always n and the first always 1 (the class token's slot).
    """
    if not isinstance(side, int) or side < 1:
        raise ValueError(f"the token grid side must be an integer >= 1 (img_size / (vae_stride x patch_size)); "
                         f"got {side!r}")
    rescaled = (max(1, (2 * v * side + 16) // 32) for v in VAR_SCALES_16)
    return tuple(sorted({1, *rescaled}))


def scale_bounds(scales):
    """[(start, end)] of each scale's tokens in the scale-ordered sequence (raster order inside a scale)."""
    bounds, start = [], 0
    for p in scales:
        bounds.append((start, start + p * p))
        start += p * p
    return bounds


def scale_ids(scales, device=None):
    """[L] long: the scale index of every position of the scale-ordered sequence."""
    return torch.cat([torch.full((p * p,), k, dtype=torch.long, device=device) for k, p in enumerate(scales)])


def resize(x, side):
    """Bicubic resize of a grid [B, D, h, w] to side x side (align_corners=False, no antialias)."""
    if x.shape[-1] == side and x.shape[-2] == side:
        return x  # the identity exactly (bicubic at the same size would only add rounding)
    return F.interpolate(x, size=(side, side), mode="bicubic", align_corners=False)


def residuals(f, scales):
    """Teacher-forced targets and inputs of a grid f [B, D, n, n] (n = scales[-1]).

    Returns (targets, inputs): targets[k] = h_k [B, D, p_k, p_k] for every scale; inputs[k] =
    resize(f_hat after scale k, p_{k+1}) [B, D, p_{k+1}, p_{k+1}] for k < S-1 (the input of scale k+1).
    """
    side = f.shape[-1]
    if scales[-1] != side or f.shape[-2] != side:
        raise ValueError(f"the grid must be {scales[-1]} x {scales[-1]} for scales {scales}; got {list(f.shape)}")
    f_hat = torch.zeros_like(f)
    targets, inputs = [], []
    for k, p in enumerate(scales[:-1]):
        h = resize(f - f_hat, p)
        f_hat = f_hat + resize(h, side)
        targets.append(h)
        inputs.append(resize(f_hat, scales[k + 1]))
    targets.append(f - f_hat)
    return targets, inputs


def accumulate(f_hat, h):
    """f_hat + resize(h, f_hat's side): the sampler's update after drawing scale residual h."""
    return f_hat + resize(h.to(f_hat.dtype), f_hat.shape[-1])


def grid_to_seq(x):
    """[B, D, p, p] -> [B, p*p, D] (raster order)."""
    return x.flatten(2).transpose(1, 2)


def seq_to_grid(x, side):
    """[B, p*p, D] -> [B, D, p, p]."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)


def kept_residual(f_hat, known, keep_grid, side):
    """Editing: scale `side`'s residual of the kept region measured against the sampler's own f_hat,
    resize(known - f_hat on kept positions, 0 elsewhere; side). f_hat, known [B, D, n, n], keep_grid
    [B, 1, n, n] bool. Against f_hat as sampled (not against the ground truth's own coarse scales, which
    the sampler did not draw), f_hat over the kept region follows the teacher-forced path from the
    first forced scale on; nothing outside keep_grid is read."""
    return resize(torch.where(keep_grid, known - f_hat, 0.0), side)


def covered(keep_grid, side):
    """[B, 1, p, p] bool: the scale-p cells whose whole footprint on the n x n grid is kept.

    keep_grid: [B, 1, n, n] bool. A cell counts as known only when every grid position its (adaptive,
    possibly overlapping) pooling region covers is kept, so forcing it never asserts a value over an
    unknown position's region.
    """
    share = F.adaptive_avg_pool2d(keep_grid.to(torch.float32), side)
    return share == 1.0

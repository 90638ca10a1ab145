"""2-D rotary position embedding (RoPE) over a token grid, the way ARPG turns its queries and keys.

A head's features are cut in two halves: the first half turns with the token's row, the second
with its column. Inside a half, features (2j, 2j+1) are one pair, turned by the angle
pos * base^(-4j / head_dim), j = 0 .. head_dim/4 - 1. The angle table has one row per token of a
row-major grid, after a first all-zero row: the class token, which is not turned.
"""
import torch


def grid_angles(seq_h, seq_w, head_dim, base=10000.0):
    """Angles [1 + seq_h * seq_w, head_dim / 2] in float64: row 0 the class token (0), row 1 + p the
    grid position p = row * seq_w + col."""
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs a head width divisible by 4; got {head_dim}")
    quarter = head_dim // 4
    freqs = base ** (-torch.arange(quarter, dtype=torch.float64) / quarter)
    rows = torch.arange(seq_h, dtype=torch.float64).repeat_interleave(seq_w)
    cols = torch.arange(seq_w, dtype=torch.float64).repeat(seq_h)
    grid = torch.cat([rows[:, None] * freqs, cols[:, None] * freqs], dim=1)
    return torch.cat([grid.new_zeros(1, 2 * quarter), grid])


def rotation(angles, dtype):
    """What rotate turns by, from angles [..., n, head_dim / 2]: (cos, sin) laid out per feature
    [..., n, head_dim] in dtype, cos repeated over each pair and sin as (-sin, +sin). A model forms it
    once per step and every block reuses it."""
    angles = angles.to(dtype)
    sin = torch.sin(angles)
    return torch.cos(angles).repeat_interleave(2, dim=-1), torch.stack([-sin, sin], dim=-1).flatten(-2)


def rotate(x, rot):
    """x [..., n, head_dim] turned pair by pair, (even, odd) -> (even cos - odd sin, odd cos + even sin),
    by rot = rotation(...) [..., n, head_dim] (broadcast over heads by the caller): x * cos + swapped
    pairs * sin, the same roundings as the pairwise formula; computed in at least float32, returned in
    x's dtype."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    cos, sin = (t.to(dtype) for t in rot)
    x_wide = x.to(dtype)
    swapped = x_wide.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (odd, even) in each pair
    return (x_wide * cos + swapped * sin).to(x.dtype)

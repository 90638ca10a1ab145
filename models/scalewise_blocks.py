"""The blocks of the scale-wise outer model (models/families/scalewise.py): VAR's AdaLN attention block
and M-VAR's decoupled block (attention inside a scale + a Mamba-style selective scan across scales).

Every block is conditioned on the class vector by adaptive LayerNorm: LayerNorm without affine
parameters, then (1 + scale) and shift from SiLU + Linear of the class vector, and a gate on each
residual branch. The Linear gives [gammas | scales | shifts], one per branch (VAR: attention, MLP;
M-VAR: attention, scan, MLP).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.attention import attention
from models.gmm import at_least_fp32
from models.layers import FeedForward, modulate
from models.scan import selective_scan

MAX_LOG_SCALE = math.log(100.0)  # VAR clamps the learned attention temperature at 100


def drop_path(x, p, training):
    """Stochastic depth: the whole branch dropped per sample with probability p (rescaled to keep the mean)."""
    if not training or p == 0:
        return x
    keep = (torch.rand(x.shape[0], *([1] * (x.dim() - 1)), device=x.device) >= p).to(x.dtype)
    return x * keep / (1 - p)


class ScaleAttention(nn.Module):
    """VAR's attention (attn_l2_norm): q and k L2-normalised, q times a learned per-head temperature
    (init 4, at most 100), softmax scale 1; q and v carry biases, k none."""

    def __init__(self, width, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.mat_qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.log_temperature = nn.Parameter(torch.full((1, num_heads, 1, 1), math.log(4.0)))
        self.proj = nn.Linear(width, width)

    def forward(self, x, mask=None, cache=None, start=0):
        """x [B, L, W]. mask: [L, L] bool (True = may attend) over x itself; or cache [2, B, H, T, hd]:
        x's keys and values are written at positions start..start+L-1 and x attends to 0..start+L-1."""
        b, length, width = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        q, k, v = F.linear(x, self.mat_qkv.weight, bias).view(b, length, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        temperature = self.log_temperature.clamp_max(MAX_LOG_SCALE).exp()
        q = (F.normalize(q, dim=-1) * temperature).to(v.dtype)
        k = F.normalize(k, dim=-1).to(v.dtype)
        if cache is not None:
            end = start + length
            cache[0, :, :, start:end] = k
            cache[1, :, :, start:end] = v
            k, v = cache[0, :, :, :end], cache[1, :, :, :end]
        out = attention(q, k, v, 1.0, mask=mask)  # mask None: everything in k is visible (flash-attn when usable)
        return self.proj(out.transpose(1, 2).reshape(b, length, width))


class SelectiveScanMixer(nn.Module):
    """A Mamba (S6) mixer over the scale-ordered sequence: in_proj to (x, gate), causal depthwise
    conv, input-dependent step sizes (a rank-W/16 projection) and B, C, the selective scan
    (models/scan.py), out_proj.

    Causal along the sequence, so run over the whole sequence it never looks ahead; a sampler runs it
    one scale at a time, carrying the scan state and the conv's last inputs (`state`) from one
    scale to the next.
    """

    def __init__(self, width, expand=2, state_dim=16, conv_width=4):
        super().__init__()
        inner = expand * width
        self.inner, self.state_dim, self.conv_width = inner, state_dim, conv_width
        self.rank = math.ceil(width / 16)  # Mamba's dt_rank "auto"
        self.in_proj = nn.Linear(width, 2 * inner, bias=False)
        self.conv = nn.Conv1d(inner, inner, conv_width, groups=inner)
        self.x_proj = nn.Linear(inner, self.rank + 2 * state_dim, bias=False)
        # plain parameters, not a Linear: a CUDA-graph backend casts Linear weights to bf16, and the step
        # sizes' bias must stay in float32
        self.dt_weight = nn.Parameter(torch.zeros(inner, self.rank))
        self.dt_bias = nn.Parameter(torch.zeros(inner))
        self.A_log = nn.Parameter(torch.zeros(inner, state_dim))
        self.D = nn.Parameter(torch.ones(inner))
        self.out_proj = nn.Linear(inner, width, bias=False)

    @torch.no_grad()
    def reset_scan_parameters(self, dt_min=1e-3, dt_max=0.1):
        """Mamba's init: A = -(1..N) per channel, D = 1, step sizes log-uniform in [dt_min, dt_max]
        (dt_bias is their inverse softplus)."""
        self.A_log.copy_(torch.log(torch.arange(1, self.state_dim + 1, dtype=self.A_log.dtype)).expand_as(self.A_log))
        self.D.fill_(1.0)
        nn.init.uniform_(self.dt_weight, -self.rank ** -0.5, self.rank ** -0.5)
        dt = torch.exp(torch.rand(self.inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def new_state(self, rows, dtype, device):
        """(scan state [rows, inner, N], conv inputs [rows, inner, conv_width - 1]), zero."""
        return (torch.zeros(rows, self.inner, self.state_dim, dtype=dtype, device=device),
                torch.zeros(rows, self.inner, self.conv_width - 1, dtype=dtype, device=device))

    def forward(self, x, state=None):
        """x [B, L, W] -> [B, L, W]. state None: x is the whole sequence (zero initial state);
        else (scan state, conv inputs) as new_state makes, read and then overwritten in place."""
        xs, gate = self.in_proj(x).transpose(1, 2).chunk(2, dim=1)  # [B, inner, L] each
        if state is None:
            padded = F.pad(xs, (self.conv_width - 1, 0))
        else:
            padded = torch.cat([state[1].to(xs.dtype), xs], dim=-1)
            state[1].copy_(padded[..., padded.shape[-1] - (self.conv_width - 1):])
        xs = F.silu(F.conv1d(padded, self.conv.weight, self.conv.bias, groups=self.inner))
        dt, b_in, c_out = self.x_proj(xs.transpose(1, 2)).split([self.rank, self.state_dim, self.state_dim], dim=-1)
        delta = F.linear(dt, self.dt_weight).transpose(1, 2)
        y, last = selective_scan(xs, delta, -torch.exp(at_least_fp32(self.A_log)), b_in.transpose(1, 2),
                                 c_out.transpose(1, 2), at_least_fp32(self.D), gate,
                                 delta_bias=at_least_fp32(self.dt_bias),
                                 delta_softplus=True, return_last_state=True,
                                 initial_state=None if state is None else state[0])
        if state is not None:
            state[0].copy_(last)
        return self.out_proj(y.transpose(1, 2))


class ScaleBlock(nn.Module):
    """One AdaLN block: attention (+ the selective scan for M-VAR) + MLP, each branch gated."""

    def __init__(self, width, num_heads, mlp_ratio=4.0, scan=None, drop_path=0.0):
        super().__init__()
        self.attn = ScaleAttention(width, num_heads)
        self.scan = scan
        self.ffn = FeedForward(width, round(width * mlp_ratio))
        self.branches = 2 if scan is None else 3
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * self.branches * width))
        self.drop_path = drop_path

    def forward(self, x, cond, mask=None, cache=None, start=0, state=None):
        """x [B, L, W], cond [B, W]; mask/cache/start as ScaleAttention takes them, state the scan's."""
        mods = self.ada_lin(cond).view(cond.shape[0], 1, 3, self.branches, -1).unbind(2)
        gamma, scale, shift = (m.unbind(2) for m in mods)
        x = x + self.dropped(self.attn(modulate(x, scale[0], shift[0]), mask, cache, start) * gamma[0])
        if self.scan is not None:
            x = x + self.dropped(self.scan(modulate(x, scale[1], shift[1]), state) * gamma[1])
        return x + self.dropped(self.ffn(modulate(x, scale[-1], shift[-1])) * gamma[-1])

    def dropped(self, branch):
        return drop_path(branch, self.drop_path, self.training)


class AdaLNBeforeHead(nn.Module):
    """The last norm: LayerNorm modulated by the class vector; its output is z for the per-token head."""

    def __init__(self, width):
        super().__init__()
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x, cond):
        scale, shift = self.ada_lin(cond).view(cond.shape[0], 1, 2, -1).unbind(2)
        return modulate(x, scale, shift)

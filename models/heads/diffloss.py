"""MAR's per-token diffusion head ("DiffLoss"): a small AdaLN MLP denoiser and its loss and sampler.

Parameter names follow MAR's release (`diffloss.net.*` inside MAR), so its checkpoints load
strictly. The diffusion math lives in models/diffusion.py; this module only wires it to the net.
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from models.config import flag
from models.heads.adaln_mlp import FinalLayer, ResBlock, init_adaln_mlp_
from models.diffusion import (Schedule, compute_dtype, cosine_betas, p_sample_step, q_sample, space_timesteps,
                              training_loss)
from models.gmm import at_least_fp32, guidance_scale, is_guided
from models.registry import register_head

TRAIN_STEPS = 1000


def timestep_embedding(t, dim=256, max_period=10000.0, dtype=torch.float32):
    """Sinusoidal features [N, dim] of integer timesteps t [N]: [cos(t f_i) | sin(t f_i)],
    f_i = max_period^(-i / (dim/2)), computed in `dtype` but never below float32 (t f_i reaches ~1000
    rad: a bf16 or fp16 phase would be meaningless) and never narrowing float64."""
    dtype = torch.promote_types(dtype, torch.float32)
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=dtype, device=t.device) / half)
    args = t[:, None].to(dtype) * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, width, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t):
        # the table in the weights' precision (float64 for a float64 model), then cast only if they are narrower
        dtype = self.mlp[0].weight.dtype
        return self.mlp(timestep_embedding(t, self.freq_dim, dtype=dtype).to(dtype))


class DenoiserMLP(nn.Module):
    """MAR's SimpleMLPAdaLN: (x_t [N, C], t [N], z [N, cond_dim]) -> [eps | variance values] [N, 2C]."""

    def __init__(self, token_dim, cond_dim, width, depth):
        super().__init__()
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(cond_dim, width)
        self.input_proj = nn.Linear(token_dim, width)
        self.res_blocks = nn.ModuleList(ResBlock(width) for _ in range(depth))
        self.final_layer = FinalLayer(width, 2 * token_dim)
        init_adaln_mlp_(self)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def forward(self, x, t, c):
        y = self.time_embed(t) + self.cond_embed(c)
        x = self.input_proj(x)
        for block in self.res_blocks:
            x = block(x, y)
        return self.final_layer(x, y)


@dataclass
class DiffLossConfig:
    """MAR's defaults (MAR-B's released head: depth 6, width 1024)."""
    width: int = field(default=1024, metadata=flag("width of the MLP heads (diffloss, gmm)", name="diffloss_w"))
    depth: int = field(default=3, metadata=flag("blocks of the MLP heads (diffloss, gmm; MAR-B: 6)",
                                                name="diffloss_d"))
    num_sampling_steps: int = field(default=100, metadata=flag(
        "diffloss: diffusion steps when sampling", tunable=True,
        valid=(f"in [2, {TRAIN_STEPS}]", lambda v: 2 <= v <= TRAIN_STEPS)))
    diffusion_batch_mul: int = field(default=4, metadata=flag(
        "diffloss: noise draws per masked token in training", tunable=True, training=True))


@register_head("diffloss", config=DiffLossConfig, attr="diffloss")
class DiffLoss(nn.Module):
    """The head contract: token_dim, train_repeats, loss(target, z) -> [N], sample(z, ...) -> [n, C].

    Training runs the full 1000-step cosine schedule; sampling its respacing to
    `num_sampling_steps` evenly spaced steps. The schedules are plain float64 tables, not buffers
    (the release saves none).
    """

    cfg_samplers = ("sir",)  # guidance acts on eps; there is no other CFG rule to choose

    @property
    def compile_regions(self):
        """What a compiling backend compiles in `sample` (sampling/cuda_graphs.py): the denoiser's residual
        blocks, one graph for all of them at every diffusion step."""
        return tuple(self.net.res_blocks)

    def __init__(self, token_dim, cond_dim, width, depth, num_sampling_steps=100, diffusion_batch_mul=4):
        super().__init__()
        num_sampling_steps = int(num_sampling_steps)
        if not 2 <= num_sampling_steps <= TRAIN_STEPS:
            raise ValueError(f"--num_sampling_steps must be between 2 and {TRAIN_STEPS}, got {num_sampling_steps}")
        self.token_dim = token_dim
        self.train_repeats = diffusion_batch_mul  # MAR tiles each masked token's rows this many times
        self.net = DenoiserMLP(token_dim, cond_dim, width, depth)
        betas = cosine_betas(TRAIN_STEPS)
        self.train_schedule = Schedule(betas)
        self.sample_schedule = Schedule.respaced(betas, space_timesteps(TRAIN_STEPS, num_sampling_steps))

    def loss(self, target, z, t=None, noise=None):
        """Per-row loss [N] for targets [N, C] under conditions z [N, cond_dim]; t [N] uniform in
        [0, 1000) and noise ~ N(0, I) are drawn unless given."""
        target = target.to(compute_dtype(target))
        if t is None:
            t = torch.randint(0, TRAIN_STEPS, (target.shape[0],), device=target.device)
        if noise is None:
            noise = torch.randn_like(target)
        x_t = q_sample(self.train_schedule, target, t, noise)
        return training_loss(self.train_schedule, target, x_t, t, noise, self.net(x_t, t, z))

    @torch.no_grad()
    def sample(self, z, temperature=1.0, cfg=1.0, cfg_sampler="sir"):
        """One token per condition, float32 [n, C]. Guided (cfg != 1 or a tensor cfg): z's rows are
        [cond; uncond], both halves see the same x, eps = eps_u + cfg * (eps_c - eps_u) and the
        conditional half's variance values; the conditional sample is returned. cfg_sampler is
        only checked: the diffusion head has one CFG rule."""
        if cfg_sampler == "exact":
            raise ValueError("--cfg_sampler exact is for the inner AR's 1-d mixtures; the diffusion head has "
                             "no exact CFG sampler (use --cfg_sampler sir)")
        guided = is_guided(cfg)
        rows = z.shape[0]
        n = rows // 2 if guided else rows
        schedule, c = self.sample_schedule, self.token_dim
        x = torch.randn(n, c, device=z.device, dtype=compute_dtype(z))
        w = guidance_scale(cfg, x[:, 0]) if guided else None
        for i in reversed(range(len(schedule))):
            t = torch.full((rows,), int(schedule.timesteps[i]), device=z.device)
            out = self.net(torch.cat([x, x]) if guided else x, t, z).to(x.dtype)
            eps, v = out[:n, :c], out[:n, c:]
            if guided:
                eps = out[n:, :c] + w * (eps - out[n:, :c])
            x = p_sample_step(schedule, eps, v, x, i, torch.randn_like(x), temperature)
        return at_least_fp32(x)

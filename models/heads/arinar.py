"""The inner model: a small causal AdaLN transformer that writes one token feature by feature.

For a token with features x_0..x_{D-1} and outer condition z, position 0 holds
cond_proj(z) + start_token and position i (1..D-1) holds input_proj(x_{i-1}); the output at
position i parameterises a K-Gaussian mixture for x_i. Every block is modulated by z (AdaLN).
Parameter names follow the released checkpoint (`arhead.*` inside MAR). It is one of MAR's
per-token heads: `loss(target, z)` for training, `sample(z, temperature, cfg)` for generation.
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.attention import attention
from models.config import flag
from models.layers import FeedForward, FullPrecisionLinear, activation_dtype, modulate_by_gain
from models.gmm import (CFG_SAMPLERS, LOG_2PI, at_least_fp32, diag_gmm_log_prob, gmm_nll, is_guided,
                        sample_diag_gmm, sample_diag_gmm_cfg, sample_gmm, split_gmm_params)
from models.registry import register_head


@torch.compiler.disable  # compiled, the write would become a copy of the whole cache; eager, it is in place
def write_kv(kv_cache, pos, kv):
    """Keys and values kv [2, N, H, L, hd] written at positions pos..pos+L-1 of the cache [2, N, H, D, hd]."""
    kv_cache[:, :, :, pos:pos + kv.shape[3]] = kv


class CausalSelfAttention(nn.Module):
    """q and v carry learned biases, k a fixed zero one (kept as a buffer for checkpoint parity)."""

    def __init__(self, width, num_heads):
        super().__init__()
        self.num_heads = num_heads
        # 4x below the usual 1/sqrt(d): the release's choice, part of what the weights expect
        self.scale = 0.25 / math.sqrt(width // num_heads)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.register_buffer("zero_k_bias", torch.zeros(width))
        self.mat_qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width)

    def forward(self, x, kv_cache=None, pos=0):
        """x: [N, L, W]. With kv_cache [2, N, H, D, hd] (keys, values), x is the single position `pos`."""
        n, length, width = x.shape
        bias = torch.cat([self.q_bias, self.zero_k_bias, self.v_bias])
        qkv = F.linear(x, self.mat_qkv.weight, bias).view(n, length, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv
        if kv_cache is None:
            out = attention(q, k, v, self.scale, causal=True)
        else:
            write_kv(kv_cache, pos, qkv[1:])  # keys and values in one copy
            # the new query may see every cached key, so no mask is needed
            out = attention(q, kv_cache[0, :, :, :pos + length], kv_cache[1, :, :, :pos + length], self.scale)
        return self.proj(out.transpose(1, 2).reshape(n, length, width))


class AdaLNBlock(nn.Module):
    def __init__(self, width, num_heads, cond_dim, mlp_ratio=4.0):
        super().__init__()
        self.attn = CausalSelfAttention(width, num_heads)
        self.ffn = FeedForward(width, int(width * mlp_ratio))
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * width))

    def modulation(self, z):
        """(gamma1, gamma2, 1 + scale1, 1 + scale2, shift1, shift2), each [N, 1, W]."""
        gamma1, gamma2, scale1, scale2, shift1, shift2 = self.ada_lin(z).unsqueeze(1).chunk(6, dim=-1)
        return gamma1, gamma2, 1 + scale1, 1 + scale2, shift1, shift2

    def forward(self, x, mod, kv_cache=None, pos=0):
        gamma1, gamma2, gain1, gain2, shift1, shift2 = mod
        x = x + gamma1 * self.attn(modulate_by_gain(x, gain1, shift1), kv_cache, pos)
        return x + gamma2 * self.ffn(modulate_by_gain(x, gain2, shift2))


class AdaLNBeforeHead(nn.Module):
    def __init__(self, width, cond_dim):
        super().__init__()
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * width))

    def modulation(self, z):
        """(1 + scale, shift), each [N, 1, W]."""
        scale, shift = self.ada_lin(z).unsqueeze(1).chunk(2, dim=-1)
        return 1 + scale, shift

    def forward(self, x, mod):
        gain, shift = mod
        return modulate_by_gain(x, gain, shift)


def mixture_params(out, num_gaussians, feature_group):
    """Head output [..., K(2g+1)] -> (mu, logvar, logits) in at least float32: [..., K] each for g = 1,
    else mu and logvar [..., K, g] laid out component-major, logits [..., K]."""
    if feature_group == 1:
        return split_gmm_params(out, num_gaussians)
    k, g = num_gaussians, feature_group
    mu, logvar, logits = at_least_fp32(out).split([k * g, k * g, k], dim=-1)
    return mu.unflatten(-1, (k, g)), logvar.unflatten(-1, (k, g)), logits


class MixtureDraw(nn.Module):
    """One inner step's draw: head outputs [N, K(2g+1)] -> features [n, g]. No weights (the checkpoint's
    keys are unchanged); a module so that a compiling backend can fuse the mixture math (compile_regions)."""

    def __init__(self, num_gaussians, feature_group):
        super().__init__()
        self.num_gaussians, self.feature_group = num_gaussians, feature_group

    def forward(self, out, temperature=1.0, cfg=1.0, cfg_sampler="sir"):
        """Unguided: one draw per row. Guided (cfg != 1 or a tensor): rows [cond; uncond], one draw per
        pair from the guided target by `cfg_sampler` (a name in models.gmm.CFG_SAMPLERS)."""
        mu, logvar, logits = mixture_params(out, self.num_gaussians, self.feature_group)
        g = self.feature_group
        if not is_guided(cfg):
            x = (sample_gmm if g == 1 else sample_diag_gmm)(mu, logvar, logits, temperature)
        else:
            n = out.shape[0] // 2
            draw = CFG_SAMPLERS[cfg_sampler] if g == 1 else sample_diag_gmm_cfg
            x = draw((mu[:n], logvar[:n], logits[:n]), (mu[n:], logvar[n:], logits[n:]), cfg, temperature)
        return x.reshape(-1, g)


@dataclass
class InnerARConfig:
    """ARINAR-B's inner model: 768 wide, 1 block, 4 heads, 4 Gaussians per feature."""
    num_gaussians: int = field(default=4, metadata=flag("mixture components (per feature; per token for gmm)"))
    width: int = field(default=768, metadata=flag("inner model width", name="inner_ar_width"))
    depth: int = field(default=1, metadata=flag("inner model blocks", name="inner_ar_depth"))
    num_heads: int = field(default=4, metadata=flag("inner model attention heads", name="inner_ar_heads"))
    feature_group: int = field(default=1, metadata=flag(
        "features written per inner step, a g-dim diagonal mixture with shared weights (1 = the paper)"))

    def validate(self, tokens):
        if self.width % self.num_heads:
            raise ValueError(f"--inner_ar_width {self.width} must be a multiple of --inner_ar_heads {self.num_heads}")
        if tokens.token_dim % self.feature_group:
            raise ValueError(f"--feature_group {self.feature_group} must divide the token's {tokens.token_dim} "
                             "features (vae_embed_dim x patch_size^2)")


@register_head("arinar", config=InnerARConfig, attr="arhead")
class InnerAR(nn.Module):
    train_repeats = 1  # MAR.forward feeds each masked token once
    no_weight_decay = True  # the release decays none of the inner model

    def __init__(self, token_dim=16, cond_dim=768, width=768, depth=1, num_heads=4,
                 num_gaussians=4, mlp_ratio=4.0, feature_group=1):
        super().__init__()
        if width % num_heads:
            raise ValueError(f"inner_ar_width {width} must be divisible by inner_ar_heads {num_heads}")
        if feature_group < 1 or token_dim % feature_group:
            raise ValueError(f"--feature_group {feature_group} must divide the token's {token_dim} features")
        self.token_dim = token_dim
        self.num_gaussians = num_gaussians
        # g features per inner step: 16/g steps, each a g-dim diagonal mixture with shared weights
        self.feature_group = feature_group
        self.num_steps = token_dim // feature_group
        self.start_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embedding = nn.Parameter(torch.zeros(1, self.num_steps, width))
        self.input_proj = FullPrecisionLinear(feature_group, width)
        self.cond_proj = nn.Linear(cond_dim, width)
        self.blocks = nn.ModuleList(AdaLNBlock(width, num_heads, cond_dim, mlp_ratio) for _ in range(depth))
        self.head_nm = AdaLNBeforeHead(width, cond_dim)
        self.head = FullPrecisionLinear(width, (2 * feature_group + 1) * num_gaussians)
        self.draw = MixtureDraw(num_gaussians, feature_group)
        self.initialize_weights()

    @property
    def cfg_samplers(self):
        """The exact sampler inverts a 1-D CDF: feature groups of g > 1 use the resampling only."""
        return tuple(CFG_SAMPLERS) if self.feature_group == 1 else ("sir",)

    @property
    def compile_regions(self):
        """What a compiling backend compiles in `sample` (sampling/cuda_graphs.py): each class's forward
        once, so the 16 features share a few small graphs (one block's, the pre-head norm's, the draw's)."""
        return (*self.blocks, self.head_nm, self.draw)

    @torch.no_grad()
    def initialize_weights(self):
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.start_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embedding, std=0.02)
        self.head.weight.mul_(0.02)
        self.head_nm.ada_lin[1].weight.mul_(0.5)
        width = self.start_token.shape[-1]
        for block in self.blocks:
            block.attn.proj.weight.div_(math.sqrt(2 * len(self.blocks)))
            block.ffn.fc2.weight.div_(math.sqrt(2 * len(self.blocks)))
            # near-zero gates: each block starts as the identity
            block.ada_lin[1].weight[:2 * width].mul_(1e-5)
            block.ada_lin[1].weight[2 * width:].mul_(0.5)

    def modulations(self, z):
        return [block.modulation(z) for block in self.blocks], self.head_nm.modulation(z)

    def embed_features(self, x):
        """input_proj of feature groups x [N, L, g] -> [N, L, W], in at least float32 (fed back unrounded)."""
        return self.input_proj(x)

    def mixture(self, out):
        return mixture_params(out, self.num_gaussians, self.feature_group)

    def run(self, h, mods, kv_caches=None, pos=0):
        """Blocks + head on inputs h [N, L, W] at positions pos..pos+L-1 -> mixture parameters [N, L, 3K]."""
        block_mods, head_mod = mods
        for i, block in enumerate(self.blocks):
            h = block(h, block_mods[i], None if kv_caches is None else kv_caches[i], pos)
        return self.head(self.head_nm(h, head_mod))

    def forward(self, x, z):
        """Teacher forcing. x: [N, D] features, z: [N, C] conditions -> head output [N, D/g, K(2g+1)]."""
        groups = x.view(x.shape[0], self.num_steps, self.feature_group)
        h = torch.cat([self.cond_proj(z).unsqueeze(1) + self.start_token, self.embed_features(groups[:, :-1])], dim=1)
        return self.run(h + self.pos_embedding, self.modulations(z))

    def nll(self, x, z):
        """Per-token mixture NLL summed over the D features (without the log(2*pi)/2 constants): [N]."""
        mu, logvar, logits = self.mixture(self(x, z))
        if self.feature_group == 1:
            return gmm_nll(x, mu, logvar, logits).sum(-1)
        groups = x.view(x.shape[0], self.num_steps, self.feature_group)
        return -(diag_gmm_log_prob(groups, mu, logvar, logits) + 0.5 * self.feature_group * LOG_2PI).sum(-1)

    def loss(self, target, z):
        """The head's training loss per token: the mixture NLL summed over features, [N]."""
        return self.nll(target, z)

    @torch.no_grad()
    def sample(self, z, temperature=1.0, cfg=1.0, cfg_sampler="sir"):
        """Sample one token per condition, feature by feature, with a KV cache.

        z: [N, C]. With cfg != 1 the rows are [conditional; unconditional] (N = 2n), each feature
        (or group of g) is drawn from the guided target by `cfg_sampler` (a name in
        models.gmm.CFG_SAMPLERS) and fed to both halves. A tensor cfg (as CUDA-graph capture
        passes) always means guided; the temperature may be a 0-d tensor too. Returns [n, D] in at
        least float32.
        """
        if cfg_sampler not in self.cfg_samplers:
            raise ValueError(f"--cfg_sampler {cfg_sampler} is not available with --feature_group {self.feature_group}")
        guided = is_guided(cfg)
        rows = z.shape[0]
        mods = self.modulations(z)
        h = self.cond_proj(z).unsqueeze(1) + self.start_token + self.pos_embedding[:, :1]
        heads, width = self.blocks[0].attn.num_heads, self.start_token.shape[-1]
        shape = (2, rows, heads, self.num_steps, width // heads)
        kv_caches = [z.new_empty(shape, dtype=activation_dtype(z.device, z.dtype)) for _ in self.blocks]
        features = []
        for t in range(self.num_steps):
            x = self.draw(self.run(h, mods, kv_caches, pos=t)[:, -1], temperature, cfg, cfg_sampler)  # [n, g]
            features.append(x)
            if t + 1 < self.num_steps:
                x = x.unsqueeze(1)
                h = self.embed_features(torch.cat([x, x]) if guided else x) + self.pos_embedding[:, t + 1:t + 2]
        return torch.cat(features, dim=1)  # one copy, not one a feature

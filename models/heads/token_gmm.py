"""Whole-token mixture head (GIVT-style; the "no inner AR" ablation).

An AdaLN residual MLP maps the outer model's z to a K-component diagonal Gaussian mixture over
the whole C-feature token. The mixture math is in models/gmm.py (the diag_* functions).
"""
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.config import flag
from models.heads.adaln_mlp import FinalLayer, ResBlock, init_adaln_mlp_
from models.gmm import at_least_fp32, diag_gmm_log_prob, is_guided, sample_diag_gmm, sample_diag_gmm_cfg
from models.registry import register_head

MIN_VARIANCE = 1e-6
NUM_CFG_CANDIDATES = 1000  # the release's resampling size


def split_token_gmm_params(out, num_gaussians, token_dim):
    """Head output [..., K*(2C+1)] laid out [means K*C | raw variances K*C | logits K], each K*C
    block component-major, -> (mu, logvar [..., K, C], logits [..., K]) in at least float32."""
    out = at_least_fp32(out)
    kc = num_gaussians * token_dim
    shape = out.shape[:-1] + (num_gaussians, token_dim)
    variance = F.softplus(out[..., kc:2 * kc]).clamp_min(MIN_VARIANCE)
    return out[..., :kc].reshape(shape), variance.log().reshape(shape), out[..., 2 * kc:]


@dataclass
class TokenGMMConfig:
    """The MLP's size shares MAR's head flags; K components over the whole token."""
    width: int = field(default=1024, metadata=flag("width of the MLP heads (diffloss, gmm)", name="diffloss_w"))
    depth: int = field(default=3, metadata=flag("blocks of the MLP heads (diffloss, gmm; MAR-B: 6)",
                                                name="diffloss_d"))
    num_gaussians: int = field(default=4, metadata=flag("mixture components (per feature; per token for gmm)"))


@register_head("gmm", config=TokenGMMConfig, attr="gmmhead")
class TokenGMM(nn.Module):
    """The head contract: token_dim, train_repeats, loss(target, z) -> [N], sample(z, ...) -> [n, C]."""

    cfg_samplers = ("sir",)  # no exact sampler for a 16-d guided target

    @property
    def compile_regions(self):
        """What a compiling backend compiles in `sample` (sampling/cuda_graphs.py): the residual blocks."""
        return tuple(self.res_blocks)

    def __init__(self, token_dim, cond_dim, width, depth, num_gaussians):
        super().__init__()
        self.token_dim = token_dim
        self.num_gaussians = num_gaussians
        self.train_repeats = 1  # the NLL is exact: no need to tile rows
        self.cond_embed = nn.Linear(cond_dim, width)
        self.res_blocks = nn.ModuleList(ResBlock(width) for _ in range(depth))
        self.final_layer = FinalLayer(width, num_gaussians * (2 * token_dim + 1), full_precision=True)
        # the output Linear keeps its Xavier init: zeroed, all components would start equal and
        # get equal gradients forever
        init_adaln_mlp_(self)

    def mixture(self, z):
        """(mu, logvar [N, K, C], logits [N, K]) for conditions z [N, cond_dim]."""
        y = self.cond_embed(z)
        x = y  # no sample to denoise: the residual stream starts from the condition itself
        for block in self.res_blocks:
            x = block(x, y)
        return split_token_gmm_params(self.final_layer(x, y), self.num_gaussians, self.token_dim)

    def loss(self, target, z):
        """Per-row NLL [N] of the whole token [N, C] under the mixture, constant included."""
        return -diag_gmm_log_prob(target, *self.mixture(z))

    @torch.no_grad()
    def sample(self, z, temperature=1.0, cfg=1.0, cfg_sampler="sir"):
        """One token per condition, float32 [n, C]; temperature divides each std. Guided (cfg != 1 or
        a tensor cfg): rows are [cond; uncond] and the target is p_cond^w / p_uncond^(w-1) over the
        whole token, by the release's 1000-candidate resampling."""
        if cfg_sampler != "sir":
            raise ValueError(f"--cfg_sampler {cfg_sampler} is not available for the whole-token mixture head "
                             "(no exact sampler for a whole-token target); use --cfg_sampler sir")
        mu, logvar, logits = self.mixture(z)
        if not is_guided(cfg):
            return sample_diag_gmm(mu, logvar, logits, temperature)
        n = z.shape[0] // 2
        cond, uncond = (mu[:n], logvar[:n], logits[:n]), (mu[n:], logvar[n:], logits[n:])
        return sample_diag_gmm_cfg(cond, uncond, cfg, temperature, NUM_CFG_CANDIDATES)

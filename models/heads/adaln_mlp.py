"""The AdaLN residual MLP blocks of MAR's diffusion head, shared by the per-token heads.

models/diffloss.py stacks them into MAR's denoiser, models/token_gmm.py into the whole-token
mixture head. Module names follow MAR's release (`diffloss.net.res_blocks.*`, `final_layer.*`), so
its checkpoints load strictly.
"""
import torch.nn as nn

from models.layers import FullPrecisionLinear, modulate


def silu_linear(width, out):
    """SiLU then Linear, as an nn.Sequential so the Linear is `.1` as in the release."""
    return nn.Sequential(nn.SiLU(), nn.Linear(width, out))


class ResBlock(nn.Module):
    """x + gate * MLP(LN(x) * (1 + scale) + shift), with (shift, scale, gate) from the condition y."""

    def __init__(self, width):
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = silu_linear(width, 3 * width)

    def forward(self, x, y):
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(self.in_ln(x) * (1 + scale) + shift)


class FinalLayer(nn.Module):
    """Linear(LN(x) * (1 + scale) + shift) with a LayerNorm without affine parameters; `full_precision`:
    the Linear stays in at least float32 under autocast (a mixture's parameters)."""

    def __init__(self, width, out_dim, full_precision=False):
        super().__init__()
        self.linear = (FullPrecisionLinear if full_precision else nn.Linear)(width, out_dim)
        self.adaLN_modulation = silu_linear(width, 2 * width)

    def forward(self, x, y):
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(modulate(x, scale, shift))


def init_adaln_mlp_(module):
    """The release's init: Xavier-uniform Linear weights, zero biases, every AdaLN modulation zero
    (so each block starts as the identity)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    for m in module.modules():
        if isinstance(m, (ResBlock, FinalLayer)):
            nn.init.zeros_(m.adaLN_modulation[1].weight)
            nn.init.zeros_(m.adaLN_modulation[1].bias)

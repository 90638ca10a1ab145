"""Small layers several networks share: the AdaLN modulation, the tanh-GELU feed-forward block, MAR's
MLP, a Linear that stays in full precision under autocast, the per-row gather `take`, the activation
dtype under autocast, and the ViT-style initialisation."""
import torch
import torch.nn as nn
import torch.nn.functional as F


def layer_norm(x):
    """LayerNorm without affine parameters; the affine part comes from AdaLN."""
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def modulate(x, scale, shift):
    return modulate_by_gain(x, 1 + scale, shift)


def modulate_by_gain(x, gain, shift):
    """modulate with gain = 1 + scale already formed: a loop that reuses one modulation (ARINAR's 16
    features) forms it once, not once per call."""
    return layer_norm(x) * gain + shift


class FeedForward(nn.Module):
    """fc1 -> GELU (tanh) -> fc2 (the key names the ARINAR release uses)."""

    def __init__(self, width, hidden):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2 with dropout after each (timm's Mlp: MAR's blocks and the causal family's)."""

    def __init__(self, dim, hidden, drop=0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


def take(x, index):
    """x[b, index[b, p]] for [B, N, C] x and [B, P] index: [B, P, C]."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def activation_dtype(device, fallback=None):
    """autocast's dtype when autocast is on for `device`, else `fallback` (the weights' dtype; None: no autocast)."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return fallback


class FullPrecisionLinear(nn.Linear):
    """nn.Linear computed in at least float32 even under autocast (float64 stays float64).

    Mixture parameters (and ARINAR's fed-back features) go through these layers: rounded to bf16,
    a mean near 3 would move by up to ~0.008. Backends that cast Linear weights for autocast once per
    call (sampling/cuda_graphs.py) leave modules with `keeps_full_precision` alone.
    """
    keeps_full_precision = True

    def forward(self, x):
        dtype = torch.promote_types(self.weight.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.to(dtype), self.weight.to(dtype), None if self.bias is None else self.bias.to(dtype))


@torch.no_grad()
def init_linears_and_norms_(module):
    """Xavier-uniform Linear weights with zero biases, unit LayerNorms (MAR's outer init)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

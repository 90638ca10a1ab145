"""Small layers several networks share: the AdaLN modulation, the tanh-GELU feed-forward block and
the ViT-style initialisation."""
import torch
import torch.nn as nn
import torch.nn.functional as F


def layer_norm(x):
    """LayerNorm without affine parameters; the affine part comes from AdaLN."""
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def modulate(x, scale, shift):
    return layer_norm(x) * (1 + scale) + shift


class FeedForward(nn.Module):
    """fc1 -> GELU (tanh) -> fc2 (the key names the ARINAR release uses)."""

    def __init__(self, width, hidden):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


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

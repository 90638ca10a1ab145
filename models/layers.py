"""Small layers several networks share: the AdaLN modulation and the tanh-GELU feed-forward block."""
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

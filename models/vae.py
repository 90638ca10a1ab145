"""MAR's KL-16 autoencoder (the image tokenizer), written from the architecture facts.

An LDM-style AutoencoderKL: a 256x256x3 image in [-1, 1] becomes a 16x16 grid of 16-channel
latents (stride 16). The encoder emits 32 channels = mean | logvar of a diagonal Gaussian.
Module and parameter names follow MAR's checkpoint `kl16.ckpt` exactly, so its `model` entry
loads strictly into `AutoencoderKL()` (util/io/tokenizers.py reads it).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

# MAR multiplies the posterior sample by this so that latents have roughly unit variance;
# generated tokens are divided by it before decoding.
LATENT_SCALE = 0.2325

def Normalize(channels):
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def swish(x):
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    """GN -> swish -> conv3x3 -> GN -> swish -> conv3x3, plus a (1x1-projected) shortcut."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels)
        # MAR has dropout(p=0) here, which is the identity, so it is left out.
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x):
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions, with a residual."""

    def __init__(self, channels):
        super().__init__()
        self.norm = Normalize(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        # [B, C, H, W] -> [B, 1 head, HW tokens, C]; SDPA's default scale is C^-0.5
        q, k, v = (t.flatten(2).transpose(1, 2).unsqueeze(1) for t in (self.q(h), self.k(h), self.v(h)))
        h = F.scaled_dot_product_attention(q, k, v)
        h = h.squeeze(1).transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Halve the resolution: pad right/bottom by one, then a 3x3 stride-2 conv."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: res blocks (each optionally followed by attention), then a resample."""

    def __init__(self, in_channels, out_channels, num_blocks, use_attn, resample=None):
        super().__init__()
        self.block = nn.ModuleList(
            [ResnetBlock(in_channels if i == 0 else out_channels, out_channels) for i in range(num_blocks)]
        )
        self.attn = nn.ModuleList([AttnBlock(out_channels) for _ in range(num_blocks)] if use_attn else [])
        if resample == "down":
            self.downsample = Downsample(out_channels)
        elif resample == "up":
            self.upsample = Upsample(out_channels)

    def forward(self, x):
        for i, block in enumerate(self.block):
            x = block(x)
            if len(self.attn) > 0:
                x = self.attn[i](x)
        if hasattr(self, "downsample"):
            x = self.downsample(x)
        if hasattr(self, "upsample"):
            x = self.upsample(x)
        return x


class Mid(nn.Module):
    """ResnetBlock -> attention -> ResnetBlock at the lowest resolution."""

    def __init__(self, channels):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """Image [B, 3, H, W] -> [B, 2*z_channels, H/16, W/16] (mean | logvar)."""

    def __init__(self, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=16, in_channels=3):
        super().__init__()
        chans = [ch * m for m in ch_mult]
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = ch
        for i, block_out in enumerate(chans):
            last = i == len(chans) - 1
            # MAR attends at nominal resolution 16 of a 256 input, i.e. only at the last level.
            self.down.append(Level(block_in, block_out, num_res_blocks, use_attn=last,
                                   resample=None if last else "down"))
            block_in = block_out
        self.mid = Mid(block_in)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent [B, z_channels, h, w] -> image [B, 3, 16h, 16w] (no output activation)."""

    def __init__(self, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=16, out_channels=3):
        super().__init__()
        chans = [ch * m for m in ch_mult]
        block_in = chans[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = Mid(block_in)
        # Built from the lowest level up, but stored by level index (up.0 = full resolution)
        # to match the checkpoint's keys; forward runs them in reverse.
        levels = [None] * len(chans)
        for i in reversed(range(len(chans))):
            levels[i] = Level(block_in, chans[i], num_res_blocks + 1, use_attn=False,
                              resample="up" if i > 0 else None)
            block_in = chans[i]
        self.up = nn.ModuleList(levels)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(swish(self.norm_out(h)))


class DiagonalGaussian:
    """Posterior N(mean, exp(logvar)) from the 2*embed_dim-channel moments tensor."""

    def __init__(self, parameters):
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self):
        noise = torch.randn(self.mean.shape, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self):
        return self.mean


class AutoencoderKL(nn.Module):
    """MAR's KL-16 VAE: encode(x) -> DiagonalGaussian over latents, decode(z) -> image."""

    def __init__(self, embed_dim=16, ch_mult=(1, 1, 2, 2, 4)):
        super().__init__()
        self.encoder = Encoder(ch=128, ch_mult=ch_mult, num_res_blocks=2, z_channels=embed_dim)
        self.decoder = Decoder(ch=128, ch_mult=ch_mult, num_res_blocks=2, z_channels=embed_dim)
        self.quant_conv = nn.Conv2d(2 * embed_dim, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, embed_dim, 1)

    def encode(self, x):
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))

"""Tokenizers: images in [-1, 1] <-> a grid of continuous features the MAR model patchifies.

Each tokenizer has `embed_dim` (channels per grid position), `stride` (pixels per position),
`scale` (multiplier applied to posterior samples before the model sees them; generated tokens
are divided by it before `decode`), `encode(images) -> posterior` with .sample()/.mode()/
.parameters, `posterior(parameters)` to rebuild one from cached parameters, and `decode`.

- "kl16": MAR's KL-16 VAE (stride 16, 16 channels, scale 0.2325).
- "pixel": the pixels themselves (stride 1, img_channels channels, scale 1). Its posterior is
  the pixel value plus, when `levels` is set, uniform dequantisation noise within the grey-level
  bin, so a continuous density can be fitted to discrete intensities.
"""
import contextlib

import torch
import torch.nn as nn

from models.vae import LATENT_SCALE, AutoencoderKL, DiagonalGaussian



class KLTokenizer(nn.Module):
    stride = 16
    scale = LATENT_SCALE

    def __init__(self, embed_dim=16):
        super().__init__()
        self.embed_dim = embed_dim
        self.vae = AutoencoderKL(embed_dim=embed_dim)  # weights: util/io/tokenizers.py

    def encode(self, images):
        with self.full_precision(images) as images:
            return self.vae.encode(images)

    @staticmethod
    def posterior(parameters):
        return DiagonalGaussian(parameters.float())

    def decode(self, latents):
        with self.full_precision(latents) as latents:
            return self.vae.decode(latents)

    @contextlib.contextmanager
    def full_precision(self, x):
        """x in the VAE's dtype, with autocast off: the VAE runs as its weights were trained, whatever
        autocast its caller runs under (its latents and pixels in bf16 would lose detail)."""
        with torch.autocast(x.device.type, enabled=False):
            yield x.to(next(self.vae.parameters()).dtype)


class PixelPosterior:
    """A point mass at the pixel values, optionally spread uniformly over each grey-level bin."""

    def __init__(self, parameters, levels=None):
        self.parameters = parameters
        self.mean = parameters
        self.levels = levels

    def sample(self):
        if not self.levels:
            return self.mean
        bin_width = 2.0 / (self.levels - 1)
        noise = torch.rand(self.mean.shape, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + (noise - 0.5) * bin_width

    def mode(self):
        return self.mean


class PixelTokenizer(nn.Module):
    stride = 1
    scale = 1.0

    def __init__(self, img_channels=3, levels=256):
        """levels: the data's grey levels, for dequantisation noise of one level's width; 0 or None: none."""
        super().__init__()
        if levels and levels < 2:
            raise ValueError(f"--pixel_levels must be >= 2 (or 0 for no dequantisation); got {levels}")
        self.embed_dim = img_channels
        self.levels = levels or None

    def encode(self, images):
        return PixelPosterior(images, self.levels)

    def posterior(self, parameters):
        return PixelPosterior(parameters.float(), self.levels)

    def decode(self, latents):
        return latents

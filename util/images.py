"""Images on disk and in memory: uint8 [N, H, W, C] arrays, PNG files written atomically, grids."""
import math
import os

import numpy as np
import torch
from PIL import Image


def to_uint8(images):
    """[-1, 1] float [N, C, H, W] -> uint8 numpy [N, H, W, C]."""
    images = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).cpu().numpy()


def decode_images(tokenizer, latents):
    """Latents (x tokenizer.scale) -> uint8 numpy [N, H, W, C], decoded in fp32."""
    return to_uint8(tokenizer.decode(latents.float() / tokenizer.scale))


def save_png(image, path):
    """Write uint8 [H, W, C] as a PNG under a temporary name, then rename: a kill never leaves half a file."""
    tmp = f"{path}.tmp"
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(tmp, format="PNG")
    os.replace(tmp, path)


def load_png(path):
    image = np.asarray(Image.open(path))
    return image[..., None] if image.ndim == 2 else image


def save_grid(images, nrow, path, pad=2):
    """Tile uint8 [N, H, W, C] images into rows of `nrow` and save a PNG (grey if C == 1)."""
    images = np.asarray(images)
    n, h, w, c = images.shape
    rows = math.ceil(n / nrow)
    grid = np.zeros((pad + rows * (h + pad), pad + nrow * (w + pad), c), dtype=np.uint8)
    for i, image in enumerate(images):
        top, left = pad + (i // nrow) * (h + pad), pad + (i % nrow) * (w + pad)
        grid[top:top + h, left:left + w] = image
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(grid[..., 0] if c == 1 else grid).save(path)
    return path

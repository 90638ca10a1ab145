"""An evaluation's folder on disk: named by its settings, reusable after a kill, PNGs checked.

Images are a pure function of (weights, settings, seed): the num_images images are cut into
batches of eval_bsz in index order, and batch b is drawn from its own seed batch_seed(seed, b),
whichever process draws it. So a folder can be resumed batch by batch: a batch whose PNGs are all
present and complete is kept, any other is drawn again from its seed, which gives the same images.
The folder name carries a digest of every setting that changes images, and settings.json inside it
is compared before any reuse.
"""
import hashlib
import json
import os

import numpy as np
import torch
from PIL import Image

from util.io.files import atomic_write

SETTINGS = "settings.json"


def batch_seed(seed, batch):
    """A 63-bit seed for batch `batch` of an evaluation seeded with `seed` (no overlap between nearby seeds)."""
    return int.from_bytes(hashlib.sha256(f"arinar-eval:{seed}:{batch}".encode()).digest()[:8], "little") >> 1


def batches(num_images, eval_bsz):
    """Image indices of each batch: [0, eval_bsz), [eval_bsz, 2 eval_bsz), ... (the last may be short)."""
    return [np.arange(start, min(start + eval_bsz, num_images)) for start in range(0, num_images, eval_bsz)]


def weights_digest(model):
    """sha256 over the model's parameters and buffers (bytes, in state-dict order)."""
    return state_digest(model.state_dict())


@torch.no_grad()
def state_digest(state):
    """weights_digest of a model whose state dict is `state` (names and bytes, in its order)."""
    h = hashlib.sha256()
    for name, tensor in state.items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def eval_settings(args, config, cfg, temperature, weights_sha, device_type, num_iter):
    """Every setting that changes the generated images (the number of processes does not): the run's
    sampling flags, the model config and its weights. num_iter: the outer steps the family takes (a
    scale-wise model's fixed count, not the ignored --num_iter)."""
    keys = ("num_images", "eval_bsz", "seed", "cfg_schedule", "cfg_sampler", "precision", "vae_path",
            "compile", "cuda_graphs", "eval_weights")
    settings = {k: getattr(args, k, None) for k in keys}
    settings.update(num_iter=num_iter, cfg=float(cfg), temperature=float(temperature), model=config.to_dict(),
                    weights_sha256=weights_sha, device=device_type)
    return settings


def folder_name(epoch, settings):
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    s = settings
    return (f"eval-ep{epoch}-iter{s['num_iter']}-cfg{s['cfg']:g}-{s['cfg_schedule']}-temp{s['temperature']:g}"
            f"-n{s['num_images']}-{s['eval_weights']}-{digest}")


def open_folder(output_dir, epoch, settings):
    """The folder for these settings: created with its settings.json, or an earlier one with the same settings."""
    folder = os.path.join(output_dir, folder_name(epoch, settings))
    path = os.path.join(folder, SETTINGS)
    if os.path.isfile(path):
        with open(path) as f:
            found = json.load(f)
        if found != json.loads(json.dumps(settings)):
            raise ValueError(f"{folder} holds another evaluation's images ({SETTINGS} differs): move it away")
    else:
        atomic_write(path, lambda f: f.write(json.dumps(settings, indent=2, sort_keys=True).encode()))
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    return folder


def png_path(image_dir, index):
    return os.path.join(image_dir, f"{index:06d}.png")


def read_complete_png(path, shape):
    """uint8 [H, W, C] from `path` if it is a whole PNG of that shape, else None (missing, cut short, other size)."""
    h, w, c = shape
    try:
        with Image.open(path) as image:
            image.verify()  # checks every chunk's CRC through the end of the file
        with Image.open(path) as image:
            if image.size != (w, h) or image.mode != ("L" if c == 1 else "RGB"):
                return None
            pixels = np.asarray(image)
    except (OSError, SyntaxError, ValueError):
        return None
    return pixels[..., None] if pixels.ndim == 2 else pixels

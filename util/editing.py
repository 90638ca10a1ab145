"""Masked editing: inpainting, repainting a region as another class, and outpainting.

An edit is a canvas of tokens, some given (`filled`) and the rest to generate, visited through
one or more model-sized windows: inside each window the model's own partial-canvas sampling
(model.sample_tokens(known=, keep=), any family) keeps the filled tokens and generates the others. Inpainting is
one window over the image; outpainting slides the window over a larger canvas, so every new
window sees the tokens already there. The pure pieces (image and mask reading, region -> tokens,
the window plan) are small functions; `fill_canvas` and `run_edit` drive the model.

Token grids are [rows, cols] bool arrays, True = regenerate (masks) or True = filled (canvases).
"""
import logging
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from util.data.datasets import center_crop_arr
from util.images import decode_images

logger = logging.getLogger(__name__)

DIRECTIONS = ("left", "right", "up", "down")
WHITE = 128  # a mask pixel at or above this grey level asks for regeneration
ASPECT_TOLERANCE = 0.02  # relative difference of width/height ratios still taken as the same shape


# ----------------------------------------------------------------------------- reading files
def open_image(path, flag, mode):
    """A PIL image converted to `mode` ("L" or "RGB"); one-line errors naming `flag`."""
    try:
        with Image.open(path) as image:
            return image.convert(mode)
    except FileNotFoundError:
        raise FileNotFoundError(f"{flag} {path}: file not found") from None
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ValueError(f"{flag} {path} is not a readable image ({type(err).__name__})") from None


def load_edit_image(path, img_size, channels):
    """(uint8 [S, S, C] ADM centre crop at the model's size, original (width, height))."""
    image = open_image(path, "--edit", "L" if channels == 1 else "RGB")
    crop = np.asarray(center_crop_arr(image, img_size))
    return crop.reshape(img_size, img_size, channels), image.size


def load_mask(path, image_size):
    """A mask PNG (white = regenerate) as bool [h, w]; it must have the edited image's aspect ratio."""
    mask = open_image(path, "--mask", "L")
    (iw, ih), (mw, mh) = image_size, mask.size
    if abs(mw / mh - iw / ih) > ASPECT_TOLERANCE * iw / ih:
        raise ValueError(f"--mask {path} is {mw}x{mh} but the image is {iw}x{ih}: the mask must have the image's "
                         "aspect ratio")
    return np.asarray(mask) >= WHITE


# ----------------------------------------------------------------------------- regions -> tokens
def cell_bounds(i, cells, length):
    """The pixel range [start, stop) of cell i when `length` pixels are cut into `cells` equal cells."""
    return math.floor(i * length / cells), math.ceil((i + 1) * length / cells)


def mask_to_tokens(white, grid):
    """bool [h, w] white-pixel mask -> bool [grid, grid]: a token is regenerated if any of its pixels is white.

    The mask is cropped to its central square, as the image is (ADM centre crop), then cut into the grid.
    """
    h, w = white.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = white[top:top + side, left:left + side]
    regenerate = np.zeros((grid, grid), dtype=bool)
    for r in range(grid):
        r0, r1 = cell_bounds(r, grid, side)
        for c in range(grid):
            c0, c1 = cell_bounds(c, grid, side)
            regenerate[r, c] = square[r0:r1, c0:c1].any()
    return regenerate


def check_box(box):
    """Refuse an empty or reversed --box (it needs no canvas size, so sample.py checks it before loading)."""
    x0, y0, x1, y1 = box
    if not (x0 < x1 and y0 < y1):
        raise ValueError(f"--box {x0} {y0} {x1} {y1} is empty or reversed: need X0 < X1 and Y0 < Y1 "
                         "(X1 and Y1 are exclusive)")


def box_to_tokens(box, img_size, stride):
    """(x0, y0, x1, y1) pixels of the model-sized canvas (x1, y1 exclusive) -> bool [grid, grid] of the
    tokens the box touches."""
    check_box(box)
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= img_size and 0 <= y0 < y1 <= img_size):
        raise ValueError(f"--box {x0} {y0} {x1} {y1} is outside the {img_size}x{img_size} canvas: need "
                         f"0 <= X0 < X1 <= {img_size} and 0 <= Y0 < Y1 <= {img_size}")
    grid = img_size // stride
    regenerate = np.zeros((grid, grid), dtype=bool)
    regenerate[y0 // stride:math.ceil(y1 / stride), x0 // stride:math.ceil(x1 / stride)] = True
    return regenerate


def check_regenerate(regenerate, flag):
    """Refuse a region that regenerates nothing; say when it regenerates everything (ordinary sampling)."""
    if not regenerate.any():
        raise ValueError(f"{flag} regenerates no token (white = regenerate): nothing to edit")
    if regenerate.all():
        logger.info("%s regenerates every token: this is ordinary sampling (nothing of the image is kept)", flag)
    return regenerate


# ----------------------------------------------------------------------------- outpainting
@dataclass(frozen=True)
class OutpaintPlan:
    """A canvas of `canvas` (rows, cols) tokens with the image's grid at `origin`, and the (row, col)
    corners of the model-sized windows to fill, in order."""
    canvas: tuple
    origin: tuple
    windows: tuple


def outpaint_plan(direction, pixels, grid, stride):
    """Extend a grid x grid token canvas by `pixels` towards `direction`.

    Windows move by at most half a window, so each one keeps at least half of its tokens as context
    (the image's or those generated before) and generates the rest; the last window reaches the new edge.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"--outpaint direction must be one of {', '.join(DIRECTIONS)}; got {direction!r}")
    try:
        pixels = int(pixels)
    except ValueError:
        raise ValueError(f"--outpaint {direction} {pixels}: PIXELS must be a whole number") from None
    if pixels <= 0 or pixels % stride:
        raise ValueError(f"--outpaint {direction} {pixels}: the pixels must be a positive multiple of the token "
                         f"stride {stride} (vae_stride x patch_size)")
    new = pixels // stride
    step = max(1, grid // 2)
    shifts = [min(k * step, new) for k in range(1, math.ceil(new / step) + 1)]
    if direction in ("right", "down"):
        origin, offsets = 0, shifts
    else:  # the image sits after the new tokens; windows walk back from it
        origin, offsets = new, [new - s for s in shifts]
    if direction in ("left", "right"):
        return OutpaintPlan((grid, grid + new), (0, origin), tuple((0, o) for o in offsets))
    return OutpaintPlan((grid + new, grid), (origin, 0), tuple((o, 0) for o in offsets))


# ----------------------------------------------------------------------------- the driver
def fill_canvas(model, canvas, filled, windows, labels, sampling, backend=None, progress=True):
    """Generate the tokens not `filled` of a latent canvas, window by window.

    canvas: latents [n, C, H, W] (tokens of patch_size x patch_size positions; the unfilled ones are
    ignored); filled: bool [H / p, W / p] token grid, shared by the n rows; windows: (row, col) token
    corners of model-sized windows; labels: [n] class ids or None (unconditional); sampling: a
    SamplingSettings. Returns the filled canvas (a new tensor).
    """
    canvas, filled = canvas.clone(), torch.as_tensor(filled, dtype=torch.bool).clone()
    g, p, n = model.config.tokens.seq_h, model.config.tokens.patch_size, canvas.shape[0]
    several = len(windows) > 1  # one bar over the windows, else one over the outer steps
    for row, col in tqdm(windows, desc="windows", disable=not (progress and several)):
        if filled[row:row + g, col:col + g].all():
            continue
        latents = canvas[:, :, row * p:(row + g) * p, col * p:(col + g) * p]
        keep = filled[row:row + g, col:col + g].reshape(1, -1).expand(n, -1).to(canvas.device)
        out = model.sample_tokens(n, known=latents, keep=keep, labels=labels, backend=backend,
                                  progress=progress and not several, **asdict(sampling))
        canvas[:, :, row * p:(row + g) * p, col * p:(col + g) * p] = out.to(canvas.dtype)
        filled[row:row + g, col:col + g] = True
    return canvas


def upsample_tokens(grid, stride):
    """bool [rows, cols] token grid -> bool [rows * stride, cols * stride] pixel mask."""
    return np.asarray(grid).repeat(stride, axis=0).repeat(stride, axis=1)


@dataclass
class EditJob:
    """What to generate, all checked: the latent canvas (one image), which tokens are filled, the
    windows, and the grid's first two cells (the original placed on the canvas, and the mask)."""
    canvas: torch.Tensor
    filled: np.ndarray
    windows: tuple
    original: np.ndarray
    mask: np.ndarray


@torch.no_grad()
def prepare_edit(args, model, tokenizer, channels):
    """The EditJob for sample.py's --edit with --mask, --box or --outpaint; one-line errors for bad input."""
    tokens = model.config.tokens
    stride = tokens.vae_stride * tokens.patch_size
    image, size = load_edit_image(args.edit, tokens.img_size, channels)
    pixels = torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float().div(127.5).sub(1.0)
    device = next(model.parameters()).device
    latents = tokenizer.encode(pixels.to(device)).mode().float() * tokenizer.scale
    grid = tokens.seq_h
    if args.outpaint:
        plan = outpaint_plan(*args.outpaint, grid, stride)
        (rows, cols), (r0, c0), p = plan.canvas, plan.origin, tokens.patch_size
        canvas = latents.new_zeros(1, latents.shape[1], rows * p, cols * p)
        canvas[:, :, r0 * p:(r0 + grid) * p, c0 * p:(c0 + grid) * p] = latents
        filled = np.zeros(plan.canvas, dtype=bool)
        filled[r0:r0 + grid, c0:c0 + grid] = True
        original = np.zeros((rows * stride, cols * stride, channels), dtype=np.uint8)
        original[r0 * stride:(r0 + grid) * stride, c0 * stride:(c0 + grid) * stride] = image
        windows = plan.windows
    else:
        if args.mask:
            regenerate = check_regenerate(mask_to_tokens(load_mask(args.mask, size), grid), "--mask")
        else:
            regenerate = check_regenerate(box_to_tokens(args.box, tokens.img_size, stride), "--box")
        canvas, filled, original, windows = latents, ~regenerate, image, ((0, 0),)
    mask = np.repeat(upsample_tokens(~filled, stride)[..., None], channels, axis=2).astype(np.uint8) * 255
    return EditJob(canvas, filled, windows, original, mask)


def run_edit(model, tokenizer, job, num, class_id, sampling, batch_size, backend=None):
    """uint8 [num, H, W, C]: `num` results of the job for class `class_id` (None = unconditional)."""
    results = []
    for start in range(0, num, batch_size):
        rows = min(batch_size, num - start)
        labels = None if class_id is None else torch.full((rows,), class_id, device=job.canvas.device)
        out = fill_canvas(model, job.canvas.expand(rows, -1, -1, -1), job.filled, job.windows, labels, sampling,
                          backend)
        results.append(decode_images(tokenizer, out))
    return np.concatenate(results)

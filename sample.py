"""Generate class-conditional images from a checkpoint: a PNG grid with one row per class.

    python sample.py --ckpt pretrained_models/arinar/arinar_b/checkpoint-last.pth \
        --classes 207 360 387 974 --num_per_class 4 --cfg 4.5 --temperature 1.0 --out samples.png

Or edit an image (util/editing.py): regenerate a region, repaint it as another class, or extend it:

    python sample.py --ckpt CKPT --edit photo.jpg (--mask mask.png | --box X0 Y0 X1 Y1 |
        --outpaint {left,right,up,down} PIXELS) [--class N] --out edit.png

The model is rebuilt from the checkpoint's stored config (or, for files written before configs
and the releases, from their stored args and weights); model flags are only needed for a bare state
dict, and one that contradicts the checkpoint is an error (sampling-time settings such as
--num_sampling_steps may change). EMA weights unless --no_ema; CUDA when present. The same --seed
gives the same images on the same device.
"""
import logging
import os
import shlex
import sys
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from engine_mar import generate, sampling_backend
from models import build
from models.families.common import check_sampling_settings
from sampling import default_precision
from util import flags
from util.editing import DIRECTIONS, check_box, prepare_edit, run_edit
from util.images import save_grid, save_png
from util.io.checkpoints import config_from_checkpoint, load_model_weights, model_state_from_checkpoint, read_checkpoint
from util.io.tokenizers import build_tokenizer
from util.train.preemption import INTERRUPT_EXIT

logger = logging.getLogger("sample")

GRID_PADDING = 2  # pixels between (and around) the images of the grid
# --classes' default; `args.classes is DEFAULT_CLASSES` tells it was not given (argparse keeps the object)
DEFAULT_CLASSES = [207, 360, 387, 974]


def get_parser():
    parser = flags.parser("Sample a PNG grid (one row per class) from a checkpoint, or edit an image.")
    parser.add_argument("--ckpt", required=True, help="checkpoint file (.pth or .safetensors), run directory, "
                        "published model folder or Hugging Face Hub repo id USER/NAME[@REVISION] (python -m util.hub)")
    parser.add_argument("--classes", type=int, nargs="+", default=DEFAULT_CLASSES, help="class ids, one row each")
    parser.add_argument("--num_per_class", type=int, default=4, help="images per class (per edit: results)")
    parser.add_argument("--seed", type=int, default=0, help="the same seed gives the same images on the same device")
    parser.add_argument("--batch_size", type=int, default=64, help="images generated at once")
    parser.add_argument("--out", default="samples.png", help="the grid PNG")
    parser.add_argument("--save_dir", default=None, help="also save each image here as INDEX_classID.png")
    parser.add_argument("--no_ema", action="store_true", help="use the live weights instead of the EMA")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: CUDA if present")
    add_editing_args(parser)
    flags.add_precision_arg(flags.add_sampling_args(parser, cfg=4.5, sweep=False))
    flags.add_model_args(parser, training=False)
    flags.add_tokenizer_file_args(parser.add_argument_group("tokenizer weights"))
    return parser


def add_editing_args(parser):
    edit = parser.add_argument_group(
        "editing (one row in --out: original | mask | --num_per_class results; each result also as OUT-i.png)")
    edit.add_argument("--edit", metavar="IMAGE", help="image to edit (ADM centre crop to the model's size)")
    region = edit.add_mutually_exclusive_group()
    region.add_argument("--mask", metavar="MASK.png", help="white = regenerate (a token is regenerated if any of "
                        "its pixels is white); same aspect ratio as the image")
    region.add_argument("--box", type=int, nargs=4, metavar=("X0", "Y0", "X1", "Y1"),
                        help="regenerate the tokens this box touches (pixels of the cropped, model-sized image; "
                             "X1, Y1 exclusive)")
    region.add_argument("--outpaint", nargs=2, metavar=("{" + ",".join(DIRECTIONS) + "}", "PIXELS"),
                        help="extend the image by PIXELS (a multiple of vae_stride x patch_size), sliding the "
                             "model's window")
    edit.add_argument("--class", dest="class_id", type=int, default=None, metavar="N",
                      help="class of the regenerated tokens (repaints the region as N); required when --cfg > 1, "
                           "without it --cfg 1 samples unconditionally")


def check_editing_args(args):
    if args.edit is None:
        if args.mask or args.box or args.outpaint or args.class_id is not None:
            raise ValueError("--mask, --box, --outpaint and --class edit an image: add --edit IMAGE")
        return
    if not (args.mask or args.box or args.outpaint):
        raise ValueError("--edit needs a region: --mask MASK.png, --box X0 Y0 X1 Y1 or --outpaint DIRECTION PIXELS")
    # grid-mode flags would be silently ignored by an edit
    if args.save_dir is not None:
        raise ValueError("--save_dir is for class grids, not --edit: each edit result is already written as "
                         "OUT-0.png, OUT-1.png, ... beside --out; drop --save_dir")
    if args.classes is not DEFAULT_CLASSES:
        raise ValueError("--classes is for class grids, not --edit: use --class N for the regenerated region")
    if args.box:
        check_box(args.box)
    if args.class_id is None and args.cfg != 1:
        raise ValueError(f"--cfg {args.cfg:g} guides towards a class: add --class N (or --cfg 1 to edit "
                         "unconditionally)")


def requested_classes(args):
    """(flag, class ids) the run will ask for."""
    if args.edit is None:
        return "--classes", args.classes
    return "--class", [] if args.class_id is None else [args.class_id]


def resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA device is available; use --device cpu")
    return torch.device(name)


def resolve_precision(name, device):
    if name is not None:
        return name
    return default_precision(device)


def check_sampling_args(args):
    for name in ("num_per_class", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1; got {getattr(args, name)}")
    check_sampling_settings(args.num_iter, args.cfg, args.temperature, args.cfg_schedule)
    check_out(args.out)


def check_out(out):
    """--out is written only after every image is drawn: refuse now a path PIL could not write then."""
    if os.path.isdir(out):
        raise ValueError(f"--out {out} is a directory: name the image file to write, e.g. "
                         f"--out {os.path.join(out, 'samples.png')}")
    suffix = os.path.splitext(out)[1].lower()
    if Image.registered_extensions().get(suffix) not in Image.SAVE:
        what = f"its extension {suffix} is not an image format PIL can write" if suffix else "it has no extension"
        raise ValueError(f"--out {out}: {what}; use .png (or .jpg, .webp, ...)")


def load_everything(args, device):
    """(model, tokenizer) on `device`, ready to sample; raises FileNotFoundError/ValueError one-liners."""
    ckpt = read_checkpoint(args.ckpt)
    state = model_state_from_checkpoint(ckpt, use_ema=not args.no_ema)
    config, changed = config_from_checkpoint(ckpt, state, flags.given_model_flags(args), source=str(args.ckpt))
    for name, (old, new) in changed.items():
        logger.info("--%s %s (the checkpoint's: %s)", name, new, old)
    model = build(config)
    flag, classes = requested_classes(args)
    bad = [c for c in classes if not 0 <= c < config.class_num]
    if bad:
        raise ValueError(f"{flag} {' '.join(map(str, bad))} out of range: the model has {config.class_num} "
                         f"classes (0..{config.class_num - 1})")
    load_model_weights(model, state, source=str(args.ckpt))
    weights = "EMA" if "model_ema" in ckpt and not args.no_ema else "non-EMA"
    del ckpt
    tokens = config.tokens
    tokenizer = build_tokenizer(tokens, args.vae_path, device=device)
    if (tokenizer.stride, tokenizer.embed_dim) != (tokens.vae_stride, tokens.vae_embed_dim):
        raise ValueError(f"--tokenizer {tokens.tokenizer} gives stride {tokenizer.stride} and {tokenizer.embed_dim} "
                         f"channels but the model expects --vae_stride {tokens.vae_stride} and --vae_embed_dim "
                         f"{tokens.vae_embed_dim}")
    logger.info("loaded %s (%s weights): %s (family %s) with the %s head, %.1fM parameters, tokenizer %s", args.ckpt,
                weights, config.model, config.family, config.head, sum(p.numel() for p in model.parameters()) / 1e6,
                tokens.tokenizer)
    return model.to(device).eval(), tokenizer, tokens.img_channels


def sample_images(model, tokenizer, args, backend):
    """uint8 [len(classes) * num_per_class, H, W, C], class-major, from one seeded stream."""
    labels = torch.tensor(args.classes).repeat_interleave(args.num_per_class)
    settings = flags.sampling_settings(args)
    torch.manual_seed(args.seed)
    batches = []
    with tqdm(total=labels.numel(), desc="sampling", unit="img") as bar:
        for batch in labels.split(args.batch_size):
            batches.append(generate(model, tokenizer, settings, batch, backend, progress=True))
            bar.update(batch.numel())
    return [image for batch in batches for image in batch]


def main(argv=None):
    """sample.py's entry point: Ctrl-C ends it with one line (nothing is written before every image is drawn)."""
    try:
        return run_sample(argv)
    except KeyboardInterrupt:
        command = shlex.join(["python", "sample.py", *(sys.argv[1:] if argv is None else map(str, argv))])
        logger.error("interrupted (Ctrl-C) before the images were done: nothing was written (--out is written at "
                     "the end); the same command starts over and draws the same images (exit code %d): %s",
                     INTERRUPT_EXIT, command)
        sys.exit(INTERRUPT_EXIT)


def run_sample(argv):
    parser = get_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        check_sampling_args(args)
        check_editing_args(args)
        device = resolve_device(args.device)
        args.precision = resolve_precision(args.precision, device)
        model, tokenizer, channels = load_everything(args, device)
        job = prepare_edit(args, model, tokenizer, channels) if args.edit else None
        backend = sampling_backend(model, args)
    except (FileNotFoundError, ValueError) as err:  # bad files, config or flags: one line, no usage dump
        parser.exit(2, f"{parser.prog}: error: {err}\n")

    if job is not None:
        return edit(model, tokenizer, job, args, backend)
    images = sample_images(model, tokenizer, args, backend)
    save_grid(images, args.num_per_class, args.out, pad=GRID_PADDING)
    if args.save_dir:
        os.makedirs(args.save_dir, exist_ok=True)
        for i, image in enumerate(images):
            save_png(image, Path(args.save_dir) / f"{i:05d}_class{args.classes[i // args.num_per_class]:04d}.png")
    logger.info("wrote %s (%d classes x %d images)%s", args.out, len(args.classes), args.num_per_class,
                f" and {len(images)} images in {args.save_dir}" if args.save_dir else "")
    return Path(args.out)


def edit(model, tokenizer, job, args, backend):
    """Run the edit; write the grid row (original | mask | results) to --out and each result beside it."""
    torch.manual_seed(args.seed)
    results = run_edit(model, tokenizer, job, args.num_per_class, args.class_id, flags.sampling_settings(args),
                       args.batch_size, backend)
    save_grid([job.original, job.mask, *results], 2 + len(results), args.out, pad=GRID_PADDING)
    out = Path(args.out)
    for i, image in enumerate(results):
        save_png(image, out.with_name(f"{out.stem}-{i}{out.suffix}"))
    logger.info("wrote %s (original | mask | %d results) and %s-0..%d%s", out, len(results), out.stem,
                len(results) - 1, out.suffix)
    return out


if __name__ == "__main__":
    main()

"""The CPU demo's editing check (`make demo-edit`; `make demo` runs it after training).

Every held-out real digit (util/data/digits.py's test split) keeps its top half; the bottom half is
regenerated once with the digit's own class (completion) and once as class (label + 1) % 10
(repainting). The demo's digit classifier scores both: the completed digits against their true
class, the repainted ones against the new class. Writes edit_metrics.json and edit_grid.png (one
digit per class: original | kept top half | completed | repainted) into RUN/edit-demo/.

    python demo_edit.py [--ckpt output_dir/demo-TIME/checkpoint-last.pth]   # default: the newest demo run
"""
import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

import sample
from engine_mar import sampling_backend
from util.data.digits import DigitsDataset, score_samples
from util.editing import box_to_tokens, fill_canvas, upsample_tokens
from util.flags import sampling_settings
from util.images import decode_images, save_grid, to_uint8
from util.io.checkpoints import checkpoint_args, read_checkpoint, resolve_checkpoint_path
from util.io.files import atomic_write

logger = logging.getLogger("demo_edit")

ZOOM = 4  # 8x8 digits are shown 32x32 in the grid


def get_parser():
    parser = argparse.ArgumentParser(description="Complete and repaint held-out digits with a digits demo model.")
    parser.add_argument("--ckpt", default=None,
                        help="demo run folder or checkpoint file; the results go to edit-demo/ in that folder "
                             "(or the file's) (default: the newest RUNS/demo-*/checkpoint-last.pth)")
    parser.add_argument("--runs", default="output_dir",
                        help="where `make demo` writes its runs (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="sampling seed; the same seed gives the same digits on the same device (default: 0)")
    parser.add_argument("--num_iter", type=int, default=None, help="outer steps (default: the run's own)")
    parser.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the run's own)")
    return parser


def newest_demo_checkpoint(runs):
    found = sorted(Path(runs).glob("demo-*/checkpoint-last.pth"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no demo run in {runs}/ (demo-*/checkpoint-last.pth): run `make demo` first, "
                                "or pass --ckpt")
    return found[-1]


def sample_args(demo):
    """sample.py's arguments for the demo checkpoint, with the run's own sampling settings unless overridden."""
    stored = checkpoint_args(read_checkpoint(demo.ckpt))
    if stored.get("dataset") != "digits":
        raise ValueError(f"--ckpt {demo.ckpt} was not trained with --dataset digits (the demo's data)")
    settings = vars(sampling_settings(stored))
    settings.update({key: getattr(demo, key) for key in ("num_iter", "cfg") if getattr(demo, key) is not None})
    flags = ["--ckpt", str(demo.ckpt), "--device", "cpu", "--precision", "fp32", "--seed", str(demo.seed),
             "--classes", *map(str, range(10))]
    for key, value in settings.items():
        flags += [f"--{key}", str(value)]
    return sample.get_parser().parse_args(flags)


def regenerate_bottom(model, tokenizer, images, labels, keep, args, backend):
    """uint8 digits: `images` [N, 1, S, S] with every token outside `keep` regenerated for `labels`."""
    latents = tokenizer.encode(images).mode() * tokenizer.scale
    out = fill_canvas(model, latents, keep, ((0, 0),), labels, sampling_settings(args), backend)
    return decode_images(tokenizer, out)


def write_grid(columns, labels, path):
    """One row per class (its first held-out digit), one column per entry of `columns` ([N, S, S, 1] each)."""
    firsts = [int(np.flatnonzero(labels == c)[0]) for c in range(10)]
    cells = np.stack([column[i] for i in firsts for column in columns])
    return save_grid(cells.repeat(ZOOM, axis=1).repeat(ZOOM, axis=2), len(columns), path)


def main(argv=None):
    parser = get_parser()
    demo = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        given = Path(demo.ckpt) if demo.ckpt else newest_demo_checkpoint(demo.runs)
        demo.ckpt = resolve_checkpoint_path(given)  # a run folder -> its checkpoint-last.pth
        args = sample_args(demo)
        model, tokenizer, _ = sample.load_everything(args, torch.device("cpu"))
    except (FileNotFoundError, ValueError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")

    tokens = model.config.tokens
    data = DigitsDataset("test", tokens.img_size)
    side, stride = tokens.img_size, tokens.vae_stride * tokens.patch_size
    keep = ~box_to_tokens((0, side // 2, side, side), side, stride)  # the top half
    labels, new_labels = data.labels, (data.labels + 1) % 10
    backend = sampling_backend(model, args)
    torch.manual_seed(args.seed)
    start = time.time()
    completed = regenerate_bottom(model, tokenizer, data.images, labels, keep, args, backend)
    repainted = regenerate_bottom(model, tokenizer, data.images, new_labels, keep, args, backend)
    seconds = time.time() - start

    real = to_uint8(data.images)
    top_only = real * upsample_tokens(keep, stride)[..., None]
    completion = score_samples(completed, labels.numpy())
    metrics = {
        "completion_accuracy": completion["accuracy"],
        "real_accuracy": completion["real_accuracy"],
        "top_half_only_accuracy": score_samples(top_only, labels.numpy())["accuracy"],
        "class_edit_share": score_samples(repainted, new_labels.numpy())["accuracy"],
        "class_edit_mapping": "(label + 1) % 10",
        "class_edit_still_old_class": score_samples(repainted, labels.numpy())["accuracy"],
        "num_digits": len(labels), "kept": f"top {side // 2} of {side} pixel rows", "seed": args.seed,
        "sec_per_image": seconds / (2 * len(labels)), "checkpoint": str(demo.ckpt),
        **vars(sampling_settings(args)),
    }
    # the run folder named by --ckpt, or the folder of the checkpoint file
    folder = (given if given.is_dir() else given.parent) / "edit-demo"
    folder.mkdir(exist_ok=True)
    grid = write_grid([real, top_only, completed, repainted], labels.numpy(), folder / "edit_grid.png")
    atomic_write(folder / "edit_metrics.json", lambda f: f.write(json.dumps(metrics, indent=2).encode()))
    logger.info("completed digits (top half kept, bottom regenerated with the true class): accuracy %.4f "
                "(real digits %.4f, top half alone %.4f)", metrics["completion_accuracy"], metrics["real_accuracy"],
                metrics["top_half_only_accuracy"])
    logger.info("bottom half repainted as (label + 1) %% 10: %.4f classified as the new class, %.4f as the old",
                metrics["class_edit_share"], metrics["class_edit_still_old_class"])
    logger.info("wrote %s and %s", grid, folder / "edit_metrics.json")
    return metrics


if __name__ == "__main__":
    main()

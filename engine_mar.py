"""Training epochs, sample generation and evaluation (FID / IS) for main_mar.py.

generate() and save_grid() are the reusable pieces: they take a model, a tokenizer and the run's
args and return uint8 images, so the demo and sample scripts produce images exactly the way
evaluation does.
"""
import argparse
import json
import logging
import math
import os
import time
import zipfile
from contextlib import nullcontext

import numpy as np
import torch
from numpy.lib import format as npformat
from PIL import Image
from tqdm import tqdm

from models.gmm import CFG_SAMPLERS
from sampling import make_backend
from sampling.backends import PRECISIONS

from util import misc
from util.checkpoint import atomic_write
from util.lr_sched import lr_at, set_lr

logger = logging.getLogger(__name__)

def autocast(args, device):
    """Mixed precision for the transformer; the mixture math inside the model stays fp32."""
    if PRECISIONS[args.precision] is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=PRECISIONS[args.precision])


def model_device(model):
    return next(model.parameters()).device


@torch.no_grad()
def to_latents(tokenizer, batch, use_cached):
    """Images (or cached posterior parameters) -> posterior sample x tokenizer.scale, in fp32."""
    posterior = tokenizer.posterior(batch) if use_cached else tokenizer.encode(batch)
    return posterior.sample().float().mul_(tokenizer.scale)


# ----------------------------------------------------------------------------- training
def train_one_epoch(model, tokenizer, loader, optimizer, scaler, ema, state, args, steps_in_epoch,
                    writer=None, on_step=None):
    """Run the remaining steps of epoch `state.epoch`; `on_step(state)` is called after each step.

    `model` may be DDP-wrapped; `ema` tracks the unwrapped model. Raises FloatingPointError (on every
    rank) as soon as the loss is not finite, before the bad step touches the weights.
    """
    model.train()
    unwrapped = model.module if hasattr(model, "module") else model
    trainable = [p for p in unwrapped.parameters() if p.requires_grad]
    device = model_device(unwrapped)
    world = misc.get_world_size()
    max_norm = args.grad_clip if args.grad_clip > 0 else math.inf
    window_loss, window_steps, window_start = 0.0, 0, time.time()

    for batch, labels in loader:
        lr = lr_at(state.epoch + state.step_in_epoch / steps_in_epoch, args.lr, args.warmup_epochs,
                   args.epochs, args.lr_schedule, args.min_lr)
        set_lr(optimizer, lr)
        batch = batch.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        latents = to_latents(tokenizer, batch, args.use_cached)

        with autocast(args, device):
            loss = model(latents, labels)

        # every rank learns whether any rank's loss is bad, so they all stop together
        stats = misc.all_reduce_sum(torch.stack([loss.detach().float(),
                                                 (~torch.isfinite(loss.detach())).float()]))
        loss_mean, bad = stats[0].item() / world, stats[1].item()
        if bad:
            raise FloatingPointError(
                f"loss is {loss.item()} at step {state.global_step + 1} (epoch {state.epoch}, iteration "
                f"{state.step_in_epoch + 1}); stopped before updating the weights, the last checkpoint in "
                f"{args.output_dir} is the last good one")

        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, max_norm)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        ema.update(unwrapped)

        state.step_in_epoch += 1
        state.global_step += 1
        window_loss += loss_mean
        window_steps += 1
        if writer is not None:
            writer.add_scalar("train/loss", loss_mean, state.global_step)
            writer.add_scalar("train/lr", lr, state.global_step)
            writer.add_scalar("train/grad_norm", grad_norm.item(), state.global_step)
        if state.step_in_epoch % args.log_freq == 0 or state.step_in_epoch == steps_in_epoch:
            elapsed = max(time.time() - window_start, 1e-9)
            images_per_s = window_steps * args.batch_size * world / elapsed
            logger.info("epoch %d step %d/%d (global %d)  loss %.4f  lr %.3e  grad_norm %.3f  %.1f images/s",
                        state.epoch, state.step_in_epoch, steps_in_epoch, state.global_step,
                        window_loss / window_steps, lr, grad_norm.item(), images_per_s)
            if writer is not None:
                writer.add_scalar("train/images_per_s", images_per_s, state.global_step)
            window_loss, window_steps, window_start = 0.0, 0, time.time()
        if on_step is not None:
            on_step(state)


# ----------------------------------------------------------------------------- generation
def to_uint8(images):
    """[-1, 1] float [N, C, H, W] -> uint8 numpy [N, H, W, C]."""
    images = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def generate(model, tokenizer, args, labels, backend=None, cfg=None, progress=False):
    """Sample one image per class label: uint8 numpy [N, H, W, C].

    Uses args.num_iter, args.cfg (unless `cfg` is given), args.cfg_schedule and args.temperature;
    `backend` (from sampling_backend; made from args when None) sets the precision and CFG sampler;
    pass one to reuse it (and its CUDA graphs) across calls. Decoding runs in fp32 so low precision cannot turn into NaN or black images.
    """
    device = model_device(model)
    labels = torch.as_tensor(labels, dtype=torch.long, device=device)
    backend = backend or sampling_backend(model, args)
    was_training = model.training
    model.eval()
    tokens = model.sample_tokens(bsz=labels.numel(), num_iter=args.num_iter, cfg=args.cfg if cfg is None else cfg,
                                 cfg_schedule=args.cfg_schedule, labels=labels, temperature=args.temperature,
                                 backend=backend, progress=progress)
    model.train(was_training)
    return decode_images(tokenizer, tokens)


def decode_images(tokenizer, latents):
    """Latents (x tokenizer.scale) -> uint8 numpy [N, H, W, C], decoded in fp32."""
    return to_uint8(tokenizer.decode(latents.float() / tokenizer.scale))


def add_sampling_args(group):
    """The sampling-method flags main_mar.py (evaluation), sample.py and the benchmarks share."""
    group.add_argument("--cfg_sampler", default="sir", choices=sorted(CFG_SAMPLERS),
                       help="sir: the release's 1000-candidate resampling; exact: inverse CDF of the guided density")
    group.add_argument("--cuda_graphs", default=None, action=argparse.BooleanOptionalAction,
                       help="replay each sampling step as CUDA graphs (default: on with CUDA; same math, far "
                            "fewer launches)")
    group.add_argument("--compile", action="store_true",
                       help="torch.compile the outer step inside the CUDA-graph backend (CUDA only, ~1 min once)")


def sampling_backend(model, args):
    """The run's sampling backend from its flags (see sampling/backends.py); logs which one runs."""
    return make_backend(model, cuda_graphs=args.cuda_graphs, compile=args.compile, cfg_sampler=args.cfg_sampler,
                        precision=args.precision)


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


def save_png(image, path):
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path)


def load_png(path):
    image = np.asarray(Image.open(path))
    return image[..., None] if image.ndim == 2 else image


# ----------------------------------------------------------------------------- evaluation
def class_balanced_labels(num_images, class_num):
    """[0]*k + [1]*k + ... with k = num_images / class_num images per class."""
    if num_images % class_num:
        raise ValueError(f"--num_images {num_images} must be a multiple of --class_num {class_num} "
                         "(the same number of images per class)")
    return np.repeat(np.arange(class_num), num_images // class_num)


def fid_enabled(args):
    return args.fid_stats not in (None, "", "none")


def eval_folder(args, epoch, cfg, weights):
    """A fresh folder per evaluation; an existing one is never reused or overwritten."""
    name = (f"eval-ep{epoch}-iter{args.num_iter}-cfg{cfg:g}-{args.cfg_schedule}-temp{args.temperature:g}"
            f"-n{args.num_images}-{weights}")
    base = os.path.join(args.output_dir, name)
    folder, run = base, 1
    while os.path.exists(folder):
        run += 1
        folder = f"{base}-run{run}"
    return folder


def write_adm_npz(path, png_paths, labels, shape):
    """ADM's sample file: arr_0 = uint8 [N, H, W, C], arr_1 = labels. Streams PNGs, so 50k images
    never have to sit in memory at once."""
    def write(fileobj):
        with zipfile.ZipFile(fileobj, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as f:
                npformat.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False,
                                                    "shape": (len(png_paths),) + tuple(shape)})
                for p in png_paths:
                    f.write(np.ascontiguousarray(load_png(p)).tobytes())
            with zf.open("arr_1.npy", "w") as f:
                npformat.write_array(f, np.asarray(labels, dtype=np.int64))
    atomic_write(path, write)


@torch.no_grad()
def evaluate(model, tokenizer, ema, args, epoch, cfg=None, writer=None, extra_score=None, backend=None):
    """Generate args.num_images (equal per class, split across ranks), save PNGs + ADM npz, score.

    EMA weights unless args.eval_weights == "live". FID / IS come from upstream torch-fidelity when
    args.fid_stats is set; `extra_score(images uint8 [N,H,W,C], labels) -> dict` adds scores of its
    own (computed on rank 0). Returns the metrics dict (complete on rank 0).
    """
    from util import metrics  # torch-fidelity is only needed when evaluating

    cfg = args.cfg if cfg is None else cfg
    rank, world = misc.get_rank(), misc.get_world_size()
    device = model_device(model)
    labels_all = class_balanced_labels(args.num_images, args.class_num)
    mine = np.arange(rank, args.num_images, world)
    folder = misc.broadcast_object(eval_folder(args, epoch, cfg, args.eval_weights) if rank == 0 else None)
    image_dir = os.path.join(folder, "images")
    os.makedirs(image_dir, exist_ok=True)
    use_fid = fid_enabled(args)
    extractor = metrics.build_inception(args.inception_path, device) if use_fid else None

    pool_feats, logit_feats = [], []
    gen_time, gen_count = 0.0, 0
    weights = ema.swapped_in(model) if args.eval_weights == "ema" else nullcontext()
    # a private RNG stream: evaluating in the middle of training must not change what training draws
    fork_devices = [device] if device.type == "cuda" else []
    # one backend per run (main_mar makes it): CUDA graphs captured once, replayed on every batch
    backend = backend or sampling_backend(model, args)
    with weights, torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(args.seed + 1000 + rank)
        batches = [mine[i:i + args.eval_bsz] for i in range(0, len(mine), args.eval_bsz)]
        for b, idx in enumerate(tqdm(batches, desc=f"generating (cfg {cfg:g})", disable=rank != 0)):
            start = time.time()
            images = generate(model, tokenizer, args, labels_all[idx], backend, cfg=cfg)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if b > 0 or len(batches) == 1:  # the first batch pays for warm-up
                gen_time += time.time() - start
                gen_count += len(idx)
            for i, image in zip(idx, images):
                save_png(image, os.path.join(image_dir, f"{i:06d}.png"))
            if use_fid:
                pool, logits = metrics.inception_features(extractor, images, device)
                pool_feats.append(pool)
                logit_feats.append(logits)

    results = {"epoch": epoch, "num_images": args.num_images, "cfg": cfg, "cfg_schedule": args.cfg_schedule,
               "temperature": args.temperature, "num_iter": args.num_iter, "weights": args.eval_weights,
               "sec_per_image": gen_time / max(gen_count, 1), "world_size": world}
    if use_fid:
        dim_pool, dim_logits = 2048, 1008
        pool = torch.cat(pool_feats) if pool_feats else torch.zeros(0, dim_pool, device=device)
        logits = torch.cat(logit_feats) if logit_feats else torch.zeros(0, dim_logits, device=device)
        pool, logits = misc.all_gather_rows(pool).cpu(), misc.all_gather_rows(logits).cpu()
        if rank == 0:
            results["fid"] = metrics.fid_from_features(pool, metrics.load_fid_stats(args.fid_stats))
            results.update(metrics.inception_score(logits))
    misc.barrier()

    if rank == 0:
        png_paths = [os.path.join(image_dir, f"{i:06d}.png") for i in range(args.num_images)]
        shape = load_png(png_paths[0]).shape
        write_adm_npz(os.path.join(folder, "samples.npz"), png_paths, labels_all, shape)
        write_class_grid(png_paths, labels_all, args.class_num, os.path.join(folder, "grid.png"))
        if extra_score is not None:
            images = np.stack([load_png(p) for p in png_paths])
            results.update(extra_score(images, labels_all))
        results["folder"] = folder
        atomic_write(os.path.join(folder, "metrics.json"), lambda f: f.write(json.dumps(results, indent=2).encode()))
        if writer is not None:
            tag = f"eval_cfg{cfg:g}_{args.eval_weights}"
            for key, value in results.items():
                if isinstance(value, float) and key not in ("cfg", "temperature"):
                    writer.add_scalar(f"{tag}/{key}", value, epoch)
            writer.flush()
        scores = ", ".join(f"{k} {v:.4f}" for k, v in results.items()
                           if isinstance(v, float) and k not in ("cfg", "temperature"))
        logger.info("evaluation (epoch %d, cfg %g, %s weights): %s -> %s", epoch, cfg, args.eval_weights, scores,
                    folder)
    misc.barrier()
    return results


def write_class_grid(png_paths, labels, class_num, path, max_rows=16, per_row=10, min_cell=32):
    """One row per class (the first `max_rows` classes), up to `per_row` samples each, cells >= `min_cell` px."""
    per_row = min(per_row, len(labels) // class_num)
    rows = []
    for c in range(min(class_num, max_rows)):
        picks = [p for p, label in zip(png_paths, labels) if label == c][:per_row]
        rows += [load_png(p) for p in picks]
    cells = np.stack(rows)
    zoom = max(1, min_cell // cells.shape[1])  # tiny images (the 8x8 demo) are enlarged to be seen
    return save_grid(cells.repeat(zoom, axis=1).repeat(zoom, axis=2), per_row, path)

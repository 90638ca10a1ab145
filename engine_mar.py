"""Training epochs, sample generation and evaluation (FID / IS) for main_mar.py.

generate() and save_grid() are the reusable pieces: they take a model, a tokenizer and the sampling
settings and return uint8 images, so the demo and sample scripts produce images exactly the way
evaluation does.
"""
import dataclasses
import json
import logging
import math
import os
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext

import numpy as np
import torch
from numpy.lib import format as npformat
from tqdm import tqdm

from models.families.common import check_labels
from sampling import make_backend, precision_autocast

from util import distributed, flags, flops
from util.evaluation import eval_folder
from util.images import decode_images, load_png, save_grid, save_png
from util.io.files import atomic_write
from util.train.lr_sched import lr_at, set_lr

logger = logging.getLogger(__name__)

def model_device(model):
    return next(model.parameters()).device


@torch.no_grad()
def to_latents(tokenizer, batch, use_cached):
    """Images (or cached posterior parameters) -> posterior sample x tokenizer.scale, in fp32."""
    posterior = tokenizer.posterior(batch) if use_cached else tokenizer.encode(batch)
    return posterior.sample().float() * tokenizer.scale  # not in place: the sample may be the batch itself


# ----------------------------------------------------------------------------- training
def synchronized_time(device):
    """time.time() once the device's queued work is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.time()


def train_one_epoch(model, tokenizer, loader, optimizer, scaler, ema, state, train_config, steps_in_epoch,
                    writer=None, on_step=None, stop=None):
    """Run the remaining steps of epoch `state.epoch` with the settings `train_config` (a TrainConfig, its lr
    resolved); `on_step(state)` is called after each step.

    `model` may be DDP-wrapped; `ema` tracks the unwrapped model. One all-reduce per step makes every
    rank take the same decisions: a non-finite loss raises FloatingPointError before the weights change;
    a non-finite gradient skips the step (see skip_step); a stop request (`stop`, a StopRequest) on any
    rank sets stop.agreed and ends the epoch after this step.
    """
    model.train()
    unwrapped = model.module if hasattr(model, "module") else model
    trainable = [p for p in unwrapped.parameters() if p.requires_grad]
    device = model_device(unwrapped)
    world = distributed.get_world_size()
    max_norm = train_config.grad_clip if train_config.grad_clip > 0 else math.inf
    window_loss, window_steps, window_images, window_start = 0.0, 0, 0, time.time()
    # MFU needs the GPU's peak; the step's FLOPs are counted on the first batch only when there is one
    peak, step_flops = flops.peak_flops(device, train_config.precision), None

    for batch, labels in loader:
        lr = lr_at(state.epoch + state.step_in_epoch / steps_in_epoch, train_config.lr, train_config.warmup_epochs,
                   train_config.epochs, train_config.lr_schedule, train_config.min_lr)
        set_lr(optimizer, lr)
        batch = batch.to(device, non_blocking=True)
        check_labels(labels, labels.shape[0], unwrapped.config.class_num)  # on the host: the model's check would sync
        labels = labels.to(device, non_blocking=True)
        latents = to_latents(tokenizer, batch, train_config.use_cached)
        if peak is not None and step_flops is None:
            def forward():
                with precision_autocast(device, train_config.precision):
                    return unwrapped(latents, labels)
            # not training time: the window skips it (synchronised, so that the GPU's share of it is out too)
            counting = synchronized_time(device)
            step_flops = flops.training_step_flops(forward, device)
            window_start += synchronized_time(device) - counting

        with precision_autocast(device, train_config.precision):
            loss = model(latents, labels)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, max_norm)

        loss = loss.detach().float()
        stop_here = float(stop is not None and stop.requested)
        stats = distributed.all_reduce_sum(torch.stack([loss, (~torch.isfinite(loss)).float(),
                                                 (~torch.isfinite(grad_norm)).float(),
                                                 torch.tensor(stop_here, device=device)]))
        loss_sum, bad_loss, bad_grad, stopping = stats.tolist()
        if bad_loss:
            raise FloatingPointError(
                f"loss is {loss.item()} at step {state.global_step + 1} (epoch {state.epoch}, iteration "
                f"{state.step_in_epoch + 1}); stopped before updating the weights")
        if bad_grad:
            skip_step(scaler, state, train_config.max_skipped_steps, grad_norm)
        else:
            scaler.step(optimizer)
            scaler.update()
            ema.update(unwrapped)
            state.skips_in_a_row = 0
        optimizer.zero_grad(set_to_none=True)

        state.step_in_epoch += 1
        state.global_step += 1
        loss_mean = loss_sum / world
        window_loss += loss_mean
        window_steps += 1
        window_images += labels.shape[0] * world
        if writer is not None:
            writer.add_scalar("train/loss", loss_mean, state.global_step)
            writer.add_scalar("train/lr", lr, state.global_step)
            writer.add_scalar("train/grad_norm", grad_norm.item(), state.global_step)
            writer.add_scalar("train/skipped_steps", state.skipped_steps, state.global_step)
        if state.step_in_epoch % train_config.log_freq == 0 or state.step_in_epoch == steps_in_epoch:
            elapsed = max(time.time() - window_start, 1e-9)
            images_per_s = window_images / elapsed
            mfu = flops.mfu(step_flops * window_steps, elapsed, peak) if step_flops else None  # per GPU
            logger.info("epoch %d step %d/%d (global %d)  loss %.4f  lr %.3e  grad_norm %.3f  %.1f images/s%s",
                        state.epoch, state.step_in_epoch, steps_in_epoch, state.global_step,
                        window_loss / window_steps, lr, grad_norm.item(), images_per_s,
                        "" if mfu is None else f"  MFU {100 * mfu:.1f}%")
            if writer is not None:
                writer.add_scalar("train/images_per_s", images_per_s, state.global_step)
                if mfu is not None:
                    writer.add_scalar("train/mfu", mfu, state.global_step)
            window_loss, window_steps, window_images, window_start = 0.0, 0, 0, time.time()
        if on_step is not None:
            on_step(state)
        if stopping:
            stop.agreed = True
            return


def skip_step(scaler, state, max_skipped_steps, grad_norm):
    """A non-finite gradient: leave the weights, optimizer and EMA as they are and count the step as
    skipped; max_skipped_steps in a row raise FloatingPointError. (Under fp16 this is also how
    the GradScaler backs off: update() lowers the scale after the overflow unscale_ found.)"""
    scaler.update()
    state.skipped_steps += 1
    state.skips_in_a_row += 1
    step = state.global_step + 1
    if state.skips_in_a_row >= max_skipped_steps:
        raise FloatingPointError(
            f"the gradient was not finite at {state.skips_in_a_row} steps in a row (steps "
            f"{step - state.skips_in_a_row + 1}-{step}, --max_skipped_steps {max_skipped_steps}); "
            "training stopped, the weights were never updated with them")
    logger.warning("step %d (epoch %d, iteration %d): gradient norm %s, step skipped: weights, optimizer and EMA "
                   "unchanged (%d in a row, %d in all)", step, state.epoch, state.step_in_epoch + 1,
                   grad_norm.item(), state.skips_in_a_row, state.skipped_steps)


# ----------------------------------------------------------------------------- generation
@torch.no_grad()
def generate(model, tokenizer, settings, labels, backend=None, progress=False):
    """Sample one image per class label at `settings` (a SamplingSettings: steps, cfg, its schedule,
    temperature): uint8 numpy [N, H, W, C].

    `backend` (from sampling_backend) sets the precision and CFG sampler; pass one to reuse it (and its CUDA
    graphs) across calls; None: the family's eager steps under the caller's autocast. Decoding runs in fp32
    so low precision cannot turn into NaN or black images.
    """
    device = model_device(model)
    labels = torch.as_tensor(labels, dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    tokens = model.sample_tokens(bsz=labels.numel(), labels=labels, backend=backend, progress=progress,
                                 **dataclasses.asdict(settings))
    model.train(was_training)
    return decode_images(tokenizer, tokens)


def sampling_backend(model, args):
    """The run's sampling backend from its flags (see sampling/backends.py); logs which one runs."""
    return make_backend(model, cuda_graphs=args.cuda_graphs, compile=args.compile, cfg_sampler=args.cfg_sampler,
                        precision=args.precision)


# ----------------------------------------------------------------------------- evaluation
def class_balanced_labels(num_images, class_num):
    """[0]*k + [1]*k + ... with k = num_images / class_num images per class."""
    if num_images % class_num:
        raise ValueError(f"--num_images {num_images} must be a multiple of --class_num {class_num} "
                         "(the same number of images per class)")
    return np.repeat(np.arange(class_num), num_images // class_num)


def fid_enabled(args):
    return args.fid_stats not in (None, "", "none")


def ref_batch_enabled(args):
    return args.ref_batch not in (None, "", "none")


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


PNG_WRITERS = 4  # threads writing a drawn batch's PNGs


def finish(futures):
    """Wait for every future; the first that failed raises its error here."""
    for future in futures:
        future.result()


def draw_or_reuse_batches(model, tokenizer, args, cfg, temperature, folder, backend=None, on_batch=None):
    """Make sure this rank's batches (round-robin over ranks) exist as PNGs in folder/images.

    A batch whose PNGs are all complete is kept; any other is drawn from its own seed. on_batch(b, idx,
    images uint8) is called for every batch of this rank, drawn or read back. Returns (images drawn,
    images kept, seconds per drawn image after the first drawn batch's warm-up or None).
    """
    rank, world = distributed.get_rank(), distributed.get_world_size()
    device = model_device(model)
    config = model.config
    labels_all = class_balanced_labels(args.num_images, config.class_num)
    image_dir = os.path.join(folder, "images")
    shape = (config.tokens.img_size, config.tokens.img_size, config.tokens.img_channels)
    point = flags.sampling_settings(args, cfg=cfg, temperature=temperature)
    all_batches = eval_folder.batches(args.num_images, args.eval_bsz)
    mine = range(rank, len(all_batches), world)
    times, drawn, kept, writing = [], 0, 0, []
    # a private RNG stream: evaluating in the middle of training must not change what training draws;
    # a batch's PNGs are written while the next batch is drawn (Pillow's encoder releases the GIL)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
            ThreadPoolExecutor(PNG_WRITERS) as writer:
        for b in tqdm(mine, desc=f"generating (cfg {cfg:g}, temperature {temperature:g})", disable=rank != 0):
            idx = all_batches[b]
            paths = [eval_folder.png_path(image_dir, i) for i in idx]
            found = [eval_folder.read_complete_png(p, shape) for p in paths]
            if all(image is not None for image in found):
                images = np.stack(found)
                kept += len(idx)
            else:
                start = time.time()
                torch.manual_seed(eval_folder.batch_seed(args.seed, b))
                images = generate(model, tokenizer, point, labels_all[idx], backend)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times.append((time.time() - start, len(idx)))
                finish(writing)  # at most one batch in flight: its images wait in memory
                writing = [writer.submit(save_png, image, path) for image, path in zip(images, paths)]
                drawn += len(idx)
            if on_batch is not None:
                on_batch(b, idx, images)
        finish(writing)
    timed = times[1:] or times  # the first drawn batch pays for warm-up
    sec_per_image = sum(t for t, _ in timed) / sum(n for _, n in timed) if timed else None
    return drawn, kept, sec_per_image


def gather_in_index_order(rows, indices, dim):
    """All ranks' feature rows, ordered by image index, so the metrics do not depend on the process count."""
    rows = torch.cat(rows) if rows else torch.zeros(0, dim)
    indices = torch.as_tensor(np.concatenate(indices) if indices else np.zeros(0), dtype=torch.long)
    rows, indices = distributed.all_gather_rows(rows.cpu()), distributed.all_gather_rows(indices)
    return rows[torch.argsort(indices)]


@torch.no_grad()
def evaluate(model, tokenizer, ema, args, epoch, cfg=None, temperature=None, writer=None, extra_score=None,
             backend=None):
    """Generate args.num_images (equal per class) at one (cfg, temperature), save PNGs + ADM npz, score.

    EMA weights unless args.eval_weights == "live". Re-running with the same weights and settings
    resumes the same folder (see util/evaluation/eval_folder.py); the images do not depend on the number of
    processes. FID / IS come from upstream torch-fidelity when args.fid_stats is set, precision /
    recall against args.ref_batch's images when that is set; `extra_score(images uint8 [N,H,W,C],
    labels) -> dict` adds scores of its own (computed on rank 0). backend: the run's sampling backend,
    reused across calls (default: one from args, see sampling_backend). Returns the metrics dict (complete on rank 0).
    """
    from util.evaluation import metrics  # torch-fidelity is only needed when evaluating

    cfg = args.cfg if cfg is None else cfg
    temperature = args.temperature if temperature is None else temperature
    rank, world = distributed.get_rank(), distributed.get_world_size()
    device = model_device(model)
    labels_all = class_balanced_labels(args.num_images, model.config.class_num)
    use_fid, use_pr = fid_enabled(args), ref_batch_enabled(args)
    steps = model.sampling_steps(args.num_iter)  # the family's own count (a scale-wise model ignores num_iter)
    extractor = metrics.build_inception(args.inception_path, device) if use_fid or use_pr else None
    backend = sampling_backend(model, args) if backend is None else backend
    pool_feats, logit_feats, feat_index = [], [], []

    def features(b, idx, images):
        if extractor is not None:
            pool, logits = metrics.inception_features(extractor, images, device)
            pool_feats.append(pool.cpu())
            logit_feats.append(logits.cpu())
            feat_index.append(idx)

    weights = ema.swapped_in(model) if args.eval_weights == "ema" else nullcontext()
    with weights:
        folder = refused = None
        if rank == 0:
            settings = eval_folder.eval_settings(args, model.config, cfg, temperature,
                                                 eval_folder.weights_digest(model), device.type, steps)
            try:
                folder = eval_folder.open_folder(args.output_dir, epoch, settings)
            except ValueError as err:
                refused = str(err)
        folder, refused = distributed.broadcast_object((folder, refused))  # every rank stops, not only rank 0
        if refused:
            raise ValueError(refused)
        drawn, kept, sec_per_image = draw_or_reuse_batches(model, tokenizer, args, cfg, temperature, folder,
                                                           backend=backend, on_batch=features)
    counts = distributed.all_reduce_sum(torch.tensor([drawn, kept], dtype=torch.float64))

    results = {"epoch": epoch, "num_images": args.num_images, "cfg": cfg, "cfg_schedule": args.cfg_schedule,
               "temperature": temperature, "num_iter": steps, "weights": args.eval_weights,
               "sec_per_image": sec_per_image, "images_drawn": int(counts[0]), "images_kept": int(counts[1]),
               "world_size": world}
    if extractor is not None:
        pool = gather_in_index_order(pool_feats, feat_index, 2048)
        logits = gather_in_index_order(logit_feats, feat_index, 1008)
        if rank == 0:
            if use_fid:
                results["fid"] = metrics.fid_from_features(pool, metrics.load_fid_stats(args.fid_stats))
                results.update(metrics.inception_score(logits))
            if use_pr:
                reference = metrics.reference_features(args.ref_batch, extractor, device, args.inception_path)
                results.update(metrics.precision_recall(pool.to(device), reference.to(device)))
    distributed.barrier()

    if rank == 0:
        image_dir = os.path.join(folder, "images")
        png_paths = [eval_folder.png_path(image_dir, i) for i in range(args.num_images)]
        shape = load_png(png_paths[0]).shape
        write_adm_npz(os.path.join(folder, "samples.npz"), png_paths, labels_all, shape)
        write_class_grid(png_paths, labels_all, model.config.class_num, os.path.join(folder, "grid.png"))
        if extra_score is not None:
            images = np.stack([load_png(p) for p in png_paths])
            results.update(extra_score(images, labels_all))
        results["folder"] = folder
        atomic_write(os.path.join(folder, "metrics.json"), lambda f: f.write(json.dumps(results, indent=2).encode()))
        if writer is not None:
            tag = f"eval_cfg{cfg:g}_temp{temperature:g}_{args.eval_weights}"
            for key, value in results.items():
                if isinstance(value, float) and key not in ("cfg", "temperature"):
                    writer.add_scalar(f"{tag}/{key}", value, epoch)
            writer.flush()
        scores = ", ".join(f"{k} {v:.4f}" for k, v in results.items()
                           if isinstance(v, float) and k not in ("cfg", "temperature"))
        logger.info("evaluation (epoch %d, cfg %g, temperature %g, %s weights; %d images drawn, %d kept): %s -> %s",
                    epoch, cfg, temperature, args.eval_weights, results["images_drawn"], results["images_kept"],
                    scores, folder)
    distributed.barrier()
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

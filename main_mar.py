"""Train or evaluate ARINAR.

    torchrun --nproc_per_node=N [--nnodes ...] main_mar.py --model mar_base --epochs 400 ...
    python main_mar.py ...            (one process, CUDA if present, else CPU)
    ... --evaluate --resume RUN_DIR   (generate --num_images and score them)

All command-line flags are defined here (get_args_parser); main_cache.py reuses the tokenizer
and data groups below.
"""
import argparse
import itertools
import logging
import os
import random
import sys
import time

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter

from engine_mar import (PRECISIONS, add_sampling_args, class_balanced_labels, evaluate, fid_enabled,
                        ref_batch_enabled, sampling_graphs, train_one_epoch)
from models.mar import CFG_SCHEDULES, MODELS
from models.tokenizer import TOKENIZERS, build_tokenizer
from util import misc, sweep
from util.checkpoint import (LAST, TrainState, atomic_copy, checkpoint_path, load_weights_and_ema, resume_training,
                             save_training_checkpoint)
from util.data import DATASETS, ResumableSampler, build_dataset, steps_per_epoch
from util.ema import EMA
from util.loading import build_model_from_args, freeze_outer, load_outer_from_mar, read_checkpoint
from util.lr_sched import LR_SCHEDULES

logger = logging.getLogger("main_mar")

DEFAULT_FID_STATS = "fid_stats/adm_in256_stats.npz"
CLASS_NUM = {"imagenet": 1000, "digits": 10}
IMG_CHANNELS = {"imagenet": 3, "digits": 1}


# ----------------------------------------------------------------------------- flags
def add_tokenizer_args(parser):
    group = parser.add_argument_group("images and tokenizer")
    group.add_argument("--img_size", default=256, type=int, help="image side in pixels")
    group.add_argument("--tokenizer", default="kl16", choices=TOKENIZERS,
                       help="kl16: MAR's KL-16 VAE; pixel: the pixels themselves (stride 1)")
    group.add_argument("--vae_path", default="pretrained_models/vae/kl16.ckpt", help="KL-16 VAE checkpoint")
    group.add_argument("--vae_embed_dim", default=16, type=int,
                       help="tokenizer channels per position (pixel: set to the image channels)")
    group.add_argument("--vae_stride", default=16, type=int,
                       help="pixels per tokenizer position (pixel: set to 1)")
    group.add_argument("--pixel_levels", default=256, type=int,
                       help="grey levels of the data for --tokenizer pixel dequantisation (0 = none)")
    return group


def add_data_args(parser):
    group = parser.add_argument_group("data")
    group.add_argument("--data_path", default="./data/imagenet", help="ImageFolder root (with train/)")
    group.add_argument("--cached_path", default="", help="cached latents (main_cache.py shards or MAR .npz)")
    group.add_argument("--batch_size", default=16, type=int, help="images per process (global = x processes)")
    group.add_argument("--num_workers", default=10, type=int)
    group.add_argument("--pin_mem", action="store_true", help="pin CPU memory in the DataLoader (default)")
    group.add_argument("--no_pin_mem", action="store_false", dest="pin_mem")
    parser.set_defaults(pin_mem=True)
    return group


def get_args_parser():
    parser = argparse.ArgumentParser("ARINAR training and evaluation")
    add_tokenizer_args(parser)
    data = add_data_args(parser)
    data.add_argument("--dataset", default="imagenet", choices=DATASETS)
    data.add_argument("--use_cached", action="store_true", help="train from --cached_path latents")
    data.add_argument("--class_num", default=None, type=int, help="classes (default: 1000 imagenet, 10 digits)")
    data.add_argument("--seed", default=1, type=int)

    model = parser.add_argument_group("model")
    model.add_argument("--model", default="mar_base", choices=sorted(MODELS))
    model.add_argument("--enc_dec_depth", default=None, type=int,
                       help="override the model's encoder/decoder depth (MAR-B: 12)")
    model.add_argument("--patch_size", default=1, type=int, help="tokenizer positions per token side")
    model.add_argument("--num_gaussians", default=4, type=int, help="mixture components per feature")
    # None = the --model factory's own default (ARINAR-B: inner 768 wide, 1 block, 4 heads; 64 buffer slots)
    model.add_argument("--inner_ar_width", default=None, type=int)
    model.add_argument("--inner_ar_depth", default=None, type=int)
    model.add_argument("--inner_ar_heads", default=None, type=int)
    model.add_argument("--mask_ratio_min", default=0.7, type=float)
    model.add_argument("--label_drop_prob", default=0.1, type=float)
    model.add_argument("--attn_dropout", default=0.1, type=float)
    model.add_argument("--proj_dropout", default=0.1, type=float)
    model.add_argument("--buffer_size", default=None, type=int, help="class-vector buffer slots (default: the model's)")
    model.add_argument("--grad_checkpointing", action="store_true")
    model.add_argument("--init_outer_from", default=None, help="initialise the outer model from a MAR checkpoint")
    model.add_argument("--freeze_outer", action="store_true", help="train only the inner model")

    train = parser.add_argument_group("training")
    train.add_argument("--epochs", default=400, type=int)
    train.add_argument("--warmup_epochs", default=100, type=float)
    train.add_argument("--lr", default=None, type=float, help="absolute lr (default: blr x global batch / 256)")
    train.add_argument("--blr", default=1e-4, type=float, help="base lr per 256 images")
    train.add_argument("--min_lr", default=0.0, type=float, help="floor of the cosine schedule")
    train.add_argument("--lr_schedule", default="constant", choices=LR_SCHEDULES)
    train.add_argument("--weight_decay", default=0.02, type=float)
    train.add_argument("--grad_clip", default=3.0, type=float, help="max grad norm (0 = no clipping)")
    train.add_argument("--ema_rate", default=0.9999, type=float)
    train.add_argument("--precision", default=None, choices=sorted(PRECISIONS),
                       help="autocast dtype (default: bf16 on GPUs that support it, else fp32)")
    train.add_argument("--log_freq", default=20, type=int, help="steps between progress lines")

    ckpt = parser.add_argument_group("checkpoints and logs")
    ckpt.add_argument("--output_dir", default="./output_dir")
    ckpt.add_argument("--log_dir", default=None, help="TensorBoard folder (default: --output_dir)")
    ckpt.add_argument("--resume", default="", help="run folder (its checkpoint-last.pth) or checkpoint file")
    ckpt.add_argument("--save_last_freq", default=5, type=int, help="epochs between checkpoint-last.pth saves")
    ckpt.add_argument("--save_copy_freq", default=0, type=int,
                      help="also keep checkpoint-EPOCH.pth every N epochs (0 = never)")
    ckpt.add_argument("--save_every_steps", default=0, type=int,
                      help="also save checkpoint-last.pth every N steps, resumable at that exact step")

    ev = parser.add_argument_group("generation and evaluation")
    ev.add_argument("--evaluate", action="store_true", help="only evaluate the --resume checkpoint")
    ev.add_argument("--online_eval", action="store_true", help="evaluate every --eval_freq epochs")
    ev.add_argument("--eval_freq", default=40, type=int)
    ev.add_argument("--num_images", default=50000, type=int, help="images to generate (equal per class)")
    ev.add_argument("--eval_bsz", default=64, type=int,
                    help="generation batch per process (batch b is drawn from its own seed: images depend on it)")
    ev.add_argument("--num_iter", default=64, type=int, help="outer autoregressive steps")
    ev.add_argument("--cfg", default=[1.0], type=float, nargs="+", dest="cfg_list", metavar="CFG",
                    help="classifier-free guidance scale(s) >= 1; --evaluate sweeps every cfg x temperature, "
                         "--online_eval uses 1 and the first value")
    ev.add_argument("--cfg_schedule", default="linear", choices=CFG_SCHEDULES)
    ev.add_argument("--temperature", default=[1.0], type=float, nargs="+", dest="temperature_list",
                    metavar="TEMPERATURE", help="divides each Gaussian's std (> 0); several values: a sweep")
    add_sampling_args(ev)
    ev.add_argument("--eval_weights", default="ema", choices=("ema", "live"))
    ev.add_argument("--fid_stats", default=None,
                    help=f"reference statistics npz with mu, sigma (default: {DEFAULT_FID_STATS} for imagenet, "
                         "none for digits); 'none' skips FID/IS")
    ev.add_argument("--ref_batch", default=None,
                    help="ADM reference batch npz (arr_0 = uint8 images, e.g. VIRTUAL_imagenet256_labeled.npz): "
                         "adds precision and recall (k = 3); its Inception features are cached beside it")
    ev.add_argument("--inception_path", default=None,
                    help="torch-fidelity InceptionV3 weights (default: torch-fidelity downloads them)")
    return parser


# ----------------------------------------------------------------------------- start-up checks
def resolve_args(args):
    """Fill the defaults that depend on the device or the data set."""
    if args.precision is None:
        args.precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    if args.class_num is None:
        args.class_num = CLASS_NUM[args.dataset]
    args.img_channels = IMG_CHANNELS[args.dataset]
    if args.fid_stats is None:
        args.fid_stats = DEFAULT_FID_STATS if args.dataset == "imagenet" else "none"
    if args.tokenizer == "pixel":
        args.vae_stride, args.vae_embed_dim = 1, args.img_channels
    args.log_dir = args.log_dir or args.output_dir
    # the point generate() draws at; evaluation and sweeps pass each point's values explicitly
    args.cfg, args.temperature = args.cfg_list[0], args.temperature_list[0]
    return args


def check_args(args, ckpt_file):
    """Everything that can be wrong before any heavy object is built: one clear line each."""
    positive = ("batch_size", "eval_bsz", "num_iter", "log_freq", "save_last_freq", "class_num", "img_size")
    for name in positive:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1; got {getattr(args, name)}")
    for name in ("save_every_steps", "save_copy_freq", "num_workers", "epochs"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name} must be >= 0; got {getattr(args, name)}")
    if args.evaluate and ckpt_file is None:
        raise ValueError(f"--evaluate needs a checkpoint: --resume {args.resume or 'RUN_DIR'} holds no {LAST}")
    if args.evaluate or args.online_eval:
        check_eval_args(args)
    if not args.evaluate:
        existing = os.path.join(args.output_dir, LAST)
        if os.path.isfile(existing) and (ckpt_file is None or not os.path.samefile(existing, ckpt_file)):
            raise ValueError(f"--output_dir {args.output_dir} already holds {LAST} from another run: pass "
                             f"--resume {args.output_dir} to continue it or choose a new --output_dir")
        if args.init_outer_from and not os.path.exists(args.init_outer_from):
            raise FileNotFoundError(f"--init_outer_from {args.init_outer_from}: no such checkpoint")
    if args.use_cached and not args.cached_path:
        raise ValueError("--use_cached needs --cached_path (latents written by main_cache.py)")


def check_eval_args(args):
    """The evaluation flags and files, checked before any image is generated."""
    bad_cfg = [c for c in args.cfg_list if not c >= 1.0]
    if bad_cfg:
        raise ValueError(f"--cfg values must be >= 1 (1 = no guidance); got {bad_cfg[0]:g}")
    bad_temperature = [t for t in args.temperature_list if not 0.0 < t < float("inf")]
    if bad_temperature:
        raise ValueError(f"--temperature values must be > 0; got {bad_temperature[0]:g}")
    class_balanced_labels(args.num_images, args.class_num)
    from util import metrics
    if fid_enabled(args):
        if args.fid_stats == DEFAULT_FID_STATS and args.img_size != 256:
            raise ValueError(f"{DEFAULT_FID_STATS} is for 256px images; pass --fid_stats for --img_size "
                             f"{args.img_size} (or --fid_stats none)")
        metrics.load_fid_stats(args.fid_stats)
    if ref_batch_enabled(args):
        metrics.check_ref_batch(args.ref_batch, args.img_size, args.img_channels)
    if (fid_enabled(args) or ref_batch_enabled(args)) and args.inception_path is not None \
            and not os.path.isfile(args.inception_path):
        raise FileNotFoundError(f"--inception_path {args.inception_path}: no such file")


def sweep_points(args):
    """Every (cfg, temperature) of --cfg x --temperature, in the order given."""
    return list(itertools.product(args.cfg_list, args.temperature_list))


def param_groups(model, weight_decay):
    """[no decay, decay] in named_parameters order: no decay on biases, norms, 1-D params and the inner model."""
    no_decay, decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith(".bias") or name.startswith("arhead."):
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def extra_scorer(args):
    """Scores beyond FID for data sets without Inception statistics: util.digits.score_samples(images, labels)."""
    if args.dataset == "digits":
        from util.digits import score_samples
        return score_samples
    return None


# ----------------------------------------------------------------------------- main
def main(args):
    device = misc.init_distributed()
    misc.setup_logging()
    resolve_args(args)
    rank, world = misc.get_rank(), misc.get_world_size()
    ckpt_file = checkpoint_path(args.resume)
    check_args(args, ckpt_file)
    scorer = extra_scorer(args) if args.evaluate or args.online_eval else None

    dataset = sampler = None
    if not args.evaluate:
        dataset = build_dataset(args, "train")
        classes = getattr(dataset, "classes", None)
        if classes is not None and len(classes) > args.class_num:
            raise ValueError(f"the data set has {len(classes)} classes but --class_num is {args.class_num}")
        sampler = ResumableSampler(len(dataset), world, rank, seed=args.seed)
        if steps_per_epoch(sampler, args.batch_size) == 0:
            raise ValueError(f"{len(dataset)} training items are fewer than {world} processes x --batch_size "
                             f"{args.batch_size}")
    # the same seed everywhere for the initial weights, then one stream per rank
    torch.manual_seed(args.seed)
    tokenizer = build_tokenizer(args.tokenizer, vae_path=args.vae_path, vae_embed_dim=args.vae_embed_dim,
                                patch_size=args.patch_size, img_channels=args.img_channels,
                                levels=args.pixel_levels, device=device)
    model = build_model_from_args(args).to(device)
    if args.init_outer_from and ckpt_file is None and not args.evaluate:
        load_outer_from_mar(model, args.init_outer_from)
    if args.freeze_outer:
        freeze_outer(model)
    ema = EMA(model, args.ema_rate)

    global_batch = args.batch_size * world
    if args.lr is None:
        args.lr = args.blr * global_batch / 256
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95))
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    state, eval_epoch = TrainState(), 0
    torch.manual_seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    random.seed(args.seed + rank)
    if ckpt_file is not None:
        ckpt = read_checkpoint(ckpt_file)
        if args.evaluate:
            load_weights_and_ema(ckpt, ckpt_file, model, ema)
            eval_epoch = int(ckpt.get("epoch", 0))
        else:
            state = resume_training(ckpt, ckpt_file, model, ema, optimizer, scaler, args, sampler)
        del ckpt
        if not args.evaluate:
            logger.info("resuming %s at epoch %d step %d", ckpt_file, state.epoch, state.step_in_epoch)

    # start-up checks passed: from here on files are written
    if rank == 0:
        os.makedirs(args.output_dir, exist_ok=True)
        logging.getLogger().addHandler(logging.FileHandler(os.path.join(args.output_dir, "log.txt")))
        logger.info("args: %s", " ".join(f"--{k} {v}" for k, v in sorted(vars(args).items())))
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        logger.info("model %s: %.2fM parameters (%.2fM trainable); %d processes x batch %d, lr %.2e, %s",
                    args.model, sum(p.numel() for p in model.parameters()) / 1e6, n_train / 1e6, world,
                    args.batch_size, args.lr, args.precision)
    writer = SummaryWriter(log_dir=args.log_dir) if rank == 0 else None
    try:
        if args.evaluate:
            run_evaluations(model, tokenizer, ema, args, eval_epoch, writer, sweep_points(args), scorer)
        else:
            train(model, tokenizer, ema, optimizer, scaler, dataset, sampler, state, args, device, writer, scorer)
    finally:
        if writer is not None:
            writer.close()
    misc.cleanup_distributed()


def run_evaluations(model, tokenizer, ema, args, epoch, writer, points, scorer):
    """Evaluate each (cfg, temperature) point with one sampling accelerator; then, when the sweep table
    (output_dir/sweep-ep<E>-iter<I>-n<N>-<weights>.{csv,json,png}) holds several points, write its table
    and plot and log its best point. Points already in the table from an earlier run stay in it."""
    graphs = sampling_graphs(model, args)
    results = [evaluate(model, tokenizer, ema, args, epoch, cfg=cfg, temperature=t, writer=writer,
                        extra_score=scorer, graphs=graphs) for cfg, t in dict.fromkeys(points)]
    prefix = os.path.join(args.output_dir, f"sweep-ep{epoch}-iter{args.num_iter}-n{args.num_images}-"
                                           f"{args.eval_weights}")
    rows = sweep.merge_rows(sweep.read_rows(f"{prefix}.json"), results) if misc.is_main_process() else []
    if len(rows) > 1:
        csv_path, _ = sweep.write_tables(rows, prefix)
        plotted = sweep.plot(rows, f"{prefix}.png", title=f"epoch {epoch}, {args.eval_weights} weights, "
                                                          f"{args.num_images} images, {args.num_iter} steps")
        best = sweep.best_point(rows)
        if best is not None:
            row, key, lower = best
            logger.info("sweep best point (%s %s): cfg %g, temperature %g: %s %.4f -> %s", "lowest" if lower
                        else "highest", key, row["cfg"], row["temperature"], key, row[key], row["folder"])
        logger.info("sweep table %s, plot %s", csv_path, plotted)
    return results


def train(model, tokenizer, ema, optimizer, scaler, dataset, sampler, state, args, device, writer, scorer):
    ddp = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None) if misc.is_distributed() else model
    steps = steps_per_epoch(sampler, args.batch_size)
    last = os.path.join(args.output_dir, LAST)

    def save():
        save_training_checkpoint(last, model, ema, optimizer, scaler, args, state, sampler)
        logger.info("saved %s (epoch %d, step %d, global step %d)", last, state.epoch, state.step_in_epoch,
                    state.global_step)

    def on_step(state):
        if args.save_every_steps and state.global_step % args.save_every_steps == 0 \
                and state.step_in_epoch < steps:
            save()

    logger.info("training epochs %d-%d, %d steps per epoch", state.epoch, args.epochs - 1, steps)
    start, results = time.time(), []
    for epoch in range(state.epoch, args.epochs):
        state.epoch = epoch
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        sampler.set_epoch(epoch, skip=state.step_in_epoch * args.batch_size)
        loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.num_workers,
                            pin_memory=args.pin_mem and device.type == "cuda", drop_last=True,
                            generator=torch.Generator().manual_seed(args.seed + epoch))
        train_one_epoch(ddp, tokenizer, loader, optimizer, scaler, ema, state, args, steps, writer, on_step)

        state.epoch, state.step_in_epoch = epoch + 1, 0
        if epoch % args.save_last_freq == 0 or epoch + 1 == args.epochs or args.save_every_steps:
            save()
        if args.save_copy_freq and (epoch + 1) % args.save_copy_freq == 0 and misc.is_main_process():
            atomic_copy(last, os.path.join(args.output_dir, f"checkpoint-{epoch}.pth"))
        if args.online_eval and (epoch % args.eval_freq == 0 or epoch + 1 == args.epochs):
            results = run_evaluations(model, tokenizer, ema, args, epoch, writer,
                                      [(1.0, args.temperature), (args.cfg, args.temperature)], scorer)
        if writer is not None:
            writer.flush()
    logger.info("training done in %.1f min; checkpoint %s; TensorBoard logs %s", (time.time() - start) / 60,
                last, args.log_dir)
    if args.online_eval and misc.is_main_process():
        for res in results:  # the final evaluation: where to look, and its scores
            scores = ", ".join(f"{k} {v:.4f}" for k, v in res.items()
                               if isinstance(v, float) and k not in ("cfg", "temperature", "sec_per_image"))
            logger.info("final samples (cfg %g, temperature %g): %s/grid.png; %s", res["cfg"], res["temperature"],
                        res["folder"], scores)


def cli(argv=None):
    """Entry point: a bad flag or input ends the run with one line naming the fix."""
    args = get_args_parser().parse_args(argv)
    try:
        main(args)
    except (ValueError, FileNotFoundError, FloatingPointError) as err:
        logger.error("%s", err)
        sys.exit(1)


if __name__ == "__main__":
    cli()

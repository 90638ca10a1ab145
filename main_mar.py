"""Train or evaluate ARINAR (any outer family with any per-token head).

    torchrun --nproc_per_node=N [--nnodes ...] main_mar.py --model mar_base --epochs 400 ...
    python main_mar.py ...            (one process, CUDA if present, else CPU)
    ... --evaluate --resume RUN_DIR   (generate --num_images and score them)

The model flags are derived from the model config (util/flags.py); a run stores its config in every
checkpoint, so `--resume` / `--evaluate` rebuild the model from it alone.
"""
import contextlib
import dataclasses
import errno
import glob
import itertools
import json
import logging
import logging.handlers
import math
import os
import random
import sys
import time

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter

from engine_mar import (class_balanced_labels, evaluate, fid_enabled, ref_batch_enabled, sampling_backend,
                        train_one_epoch)
from models import build, config_from_flags
from models.config import check_flags_apply
from models.families.common import check_sampling_settings
from sampling import default_precision
from util import distributed, flags
from util.data.datasets import DATASETS, ResumableSampler, build_dataset, sample_scorer, steps_per_epoch
from util.evaluation import sweep
from util.io.checkpoints import (checkpoint_args, config_from_checkpoint, freeze_outer, load_outer_weights,
                                 model_state_from_checkpoint, read_checkpoint)
from util.io.files import atomic_copy, storage_error
from util.io.tokenizers import build_tokenizer
from util.train.config import TrainConfig
from util.train.ema import EMA
from util.train.preemption import INTERRUPT_EXIT, REQUEUE_EXIT, StopRequest, ignore_stop_signals, start_workers
from util.train.run_folder import FolderInUse, claim_run_folder
from util.train.state import (LAST, TrainState, checkpoint_path, load_weights_and_ema, resume_training,
                              save_training_checkpoint)

logger = logging.getLogger("main_mar")


# ----------------------------------------------------------------------------- flags
def get_args_parser():
    parser = flags.parser("ARINAR training and evaluation")
    flags.add_model_args(parser)
    data = flags.add_data_args(parser)
    data.add_argument("--dataset", default=None, choices=sorted(DATASETS),
                      help="imagenet (ImageFolder) or the digits demo (default: a resumed or evaluated run's own, "
                           "else imagenet)")
    data.add_argument("--seed", default=1, type=int, help="initial weights, data order and sampling seeds")

    train = flags.add_config_args(parser.add_argument_group("training"), TrainConfig)
    train.add_argument("--init_outer_from", default=None,
                       help="initialise the outer model (everything but the head) from a checkpoint")
    train.add_argument("--freeze_outer", action="store_true", help="train only the per-token head")

    ckpt = parser.add_argument_group("checkpoints and logs")
    ckpt.add_argument("--output_dir", default="./output_dir", help="run folder: checkpoints, logs, evaluations")
    ckpt.add_argument("--log_dir", default=None, help="TensorBoard folder (default: --output_dir)")
    ckpt.add_argument("--resume", default="", help="run folder (its checkpoint-last.pth) or checkpoint file; with "
                      "--evaluate also a published model folder or Hub repo id USER/NAME (python -m util.hub)")
    ckpt.add_argument("--save_last_freq", default=5, type=int, help="epochs between checkpoint-last.pth saves")
    ckpt.add_argument("--save_copy_freq", default=0, type=int,
                      help="also keep checkpoint-EPOCH.pth every N epochs, saving checkpoint-last.pth at those "
                      "epochs too (0 = never)")
    ckpt.add_argument("--save_every_steps", default=0, type=int,
                      help="also save checkpoint-last.pth every N steps, resumable at that exact step (0 = never)")

    flags.add_sampling_args(parser, cfg=1.0, sweep=True)
    ev = parser.add_argument_group("evaluation")
    ev.add_argument("--evaluate", action="store_true", help="only evaluate the --resume checkpoint")
    ev.add_argument("--online_eval", action="store_true",
                    help="evaluate every --eval_freq epochs (at cfg 1 and the first --cfg)")
    ev.add_argument("--eval_freq", default=40, type=int, help="epochs between online evaluations")
    ev.add_argument("--num_images", default=50000, type=int, help="images to generate (equal per class)")
    ev.add_argument("--eval_bsz", default=64, type=int,
                    help="generation batch per process (batch b is drawn from its own seed: images depend on it)")
    ev.add_argument("--eval_weights", default="ema", choices=("ema", "live"), help="which weights generate")
    ev.add_argument("--fid_stats", default=None,
                    help="reference statistics npz with mu, sigma (default: the data set's, "
                         f"{DATASETS['imagenet'].fid_stats} for imagenet); 'none' skips FID/IS")
    ev.add_argument("--ref_batch", default=None,
                    help="ADM reference batch npz (arr_0 = uint8 images, e.g. VIRTUAL_imagenet256_labeled.npz): "
                         "adds precision and recall (k = 3); its Inception features are cached beside it")
    ev.add_argument("--inception_path", default=None,
                    help="torch-fidelity InceptionV3 weights (default: torch-fidelity downloads them)")
    return parser


# ----------------------------------------------------------------------------- start-up checks
def resolve_args(args, stored=None):
    """Fill the defaults that depend on the device or the data set (the model's come from its config).
    stored: the run arguments of the checkpoint resumed or evaluated, if any (its data set is the default)."""
    if args.dataset is None:
        args.dataset = (stored or {}).get("dataset") or "imagenet"
    if args.precision is None:
        args.precision = default_precision("cuda" if torch.cuda.is_available() else "cpu")
    if args.lr is None:
        args.lr = args.blr * args.batch_size * distributed.get_world_size() / 256
    if args.fid_stats is None:
        args.fid_stats = DATASETS[args.dataset].fid_stats
    args.log_dir = args.log_dir or args.output_dir
    # the point generate() draws at; evaluation and sweeps pass each point's values explicitly
    args.cfg, args.temperature = args.cfg_list[0], args.temperature_list[0]
    return args


def data_set_defaults(args):
    """Model flags the data set implies for a new run (given flags win): its classes, image channels and
    token settings (util/data/datasets.py: DATASETS)."""
    spec = DATASETS[args.dataset]
    return {"class_num": spec.class_num, "img_channels": spec.img_channels, **spec.token_defaults}


def model_config(args, ckpt_file, ckpt=None):
    """The run's ModelConfig: a new run's (ckpt_file None) from --model's preset, the data set and the model
    flags; a resumed or evaluated run's from its checkpoint dict `ckpt`, read from ckpt_file (model flags
    that contradict it are an error). Returns (config, ckpt)."""
    given = flags.given_model_flags(args)
    if ckpt_file is None:
        config = config_from_flags({**data_set_defaults(args), **given})
        check_flags_apply(config, given)  # a flag of another family or head is a mistake, not a no-op
        return config, None
    state = model_state_from_checkpoint(ckpt, use_ema=False)
    config, changed = config_from_checkpoint(ckpt, state, given, source=str(ckpt_file))
    if changed:
        logger.warning("%s: changed settings: %s", ckpt_file,
                       ", ".join(f"--{k} {new} (was {old})" for k, (old, new) in changed.items()))
    return config, ckpt


# the allowed range of every other numeric run flag (the model's are checked by its config, the training
# settings' by TrainConfig)
FLAG_RANGES = (
    (("batch_size", "save_last_freq", "eval_freq", "num_images", "eval_bsz"), ">= 1", lambda v: v >= 1),
    (("num_workers", "save_copy_freq", "save_every_steps"), ">= 0", lambda v: v >= 0),
    (("seed",), "in [0, 2^31)", lambda v: 0 <= v < 2 ** 31),  # numpy seeds must be >= 0 (seed + rank is used)
    (("pixel_levels",), "0 (no dequantisation) or >= 2", lambda v: v == 0 or v >= 2),
)


def check_flag_ranges(args):
    """One line naming the first numeric flag outside its range (nan and inf are outside every range)."""
    for names, rule, ok in FLAG_RANGES:
        for name in names:
            value = getattr(args, name)
            if value is not None and not (math.isfinite(value) and ok(value)):
                raise ValueError(f"--{name} must be {rule}; got {value}")


def check_args(args, ckpt_file):
    """Everything about the run flags that can be wrong before any heavy object is built: one clear line each."""
    check_flag_ranges(args)
    TrainConfig.from_args(args).validate()
    for cfg, temperature in sweep_points(args):
        check_sampling_settings(args.num_iter, cfg, temperature, args.cfg_schedule)
    if args.evaluate and ckpt_file is None:
        raise ValueError(f"--evaluate needs a checkpoint: --resume {args.resume or 'RUN_DIR'} holds no {LAST}")
    if not args.evaluate:
        existing = os.path.join(args.output_dir, LAST)
        if os.path.isfile(existing) and (ckpt_file is None or not os.path.samefile(existing, ckpt_file)):
            raise ValueError(f"--output_dir {args.output_dir} already holds {LAST} from another run: pass "
                             f"--resume {args.output_dir} to continue it or choose a new --output_dir")
        if args.init_outer_from and not os.path.exists(args.init_outer_from):
            raise FileNotFoundError(f"--init_outer_from {args.init_outer_from}: no such checkpoint")
    if args.use_cached and not args.cached_path:
        raise ValueError("--use_cached needs --cached_path (latents written by main_cache.py)")
    if not (args.evaluate or args.online_eval):
        given = [name for name, on in (("--compile", args.compile), ("--cuda_graphs", args.cuda_graphs is not None))
                 if on]
        if given:
            raise ValueError(f"{given[0]} sets how this run draws images, and it draws none: add --online_eval "
                             f"(or --evaluate) or drop {given[0]}")


def check_eval_args(args, config, classes_known=True):
    """The evaluation flags and files, checked before any image is generated. classes_known False: the
    class count comes from the data set later (a new run without --class_num), which checks it then."""
    if classes_known:
        class_balanced_labels(args.num_images, config.class_num)
    from util.evaluation import metrics
    img_size = config.tokens.img_size
    if fid_enabled(args):
        if args.fid_stats == DATASETS["imagenet"].fid_stats and img_size != 256:
            raise ValueError(f"{args.fid_stats} is for 256px images; pass --fid_stats for --img_size "
                             f"{img_size} (or --fid_stats none)")
        metrics.load_fid_stats(args.fid_stats)
    if ref_batch_enabled(args):
        metrics.check_ref_batch(args.ref_batch, img_size, config.tokens.img_channels)
    if (fid_enabled(args) or ref_batch_enabled(args)) and args.inception_path is not None \
            and not os.path.isfile(args.inception_path):
        raise FileNotFoundError(f"--inception_path {args.inception_path}: no such file")
    scored = fid_enabled(args) or ref_batch_enabled(args) or sample_scorer(args.dataset) is not None
    if not scored and distributed.is_main_process():
        logger.warning("no metric will be computed (--fid_stats none, no --ref_batch, --dataset %s has no scorer of "
                       "its own): the evaluation only writes images", args.dataset)


def sweep_points(args):
    """Every (cfg, temperature) of --cfg x --temperature, in the order given."""
    return list(itertools.product(args.cfg_list, args.temperature_list))


def param_groups(model, weight_decay):
    """[no decay, decay] in named_parameters order: no decay on biases, norms, 1-D params, and none on the
    head when it says so (ARINAR's inner model; MAR decays its diffusion MLP like the outer model)."""
    exempt = model.head_attr + "." if getattr(model.head, "no_weight_decay", False) else None
    no_decay, decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith(".bias") or (exempt and name.startswith(exempt)):
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


# ----------------------------------------------------------------------------- main
def main(args, argv=None):
    """Train or evaluate as `args` say; returns the exit code. argv: the command line given (default
    sys.argv[1:]), quoted in the line that says how to continue a stopped run."""
    argv = sys.argv[1:] if argv is None else argv
    device = distributed.init_distributed()
    distributed.setup_logging()
    # the start-up lines (resuming, changed settings, the class count, the backend) also go to log.txt,
    # written once the run folder is claimed
    early = logging.handlers.BufferingHandler(capacity=10_000)
    logging.getLogger().addHandler(early)
    try:
        return run(args, device, early, argv)
    finally:
        logging.getLogger().removeHandler(early)


def run(args, device, early, argv):
    rank, world = distributed.get_rank(), distributed.get_world_size()
    ckpt_file = checkpoint_path(args.resume, args.output_dir)
    check_args(args, ckpt_file)  # the flags first: cheap, and their errors should not wait for a large file
    ckpt = read_checkpoint(ckpt_file) if ckpt_file is not None else None
    resolve_args(args, checkpoint_args(ckpt) if ckpt is not None else None)
    train_config = TrainConfig.from_args(args)
    if args.resume and ckpt_file is None and not args.evaluate:
        logger.info("--resume %s holds no %s yet: starting a fresh run", args.resume, LAST)
    config, ckpt = model_config(args, ckpt_file, ckpt)
    classes_from_data = not args.evaluate and ckpt is None and args.class_num is None
    if args.evaluate or args.online_eval:
        check_eval_args(args, config, classes_known=not classes_from_data)
    scorer = sample_scorer(args.dataset) if args.evaluate or args.online_eval else None

    dataset = sampler = None
    if not args.evaluate:
        dataset = build_dataset(args, config.tokens, "train")
        classes = getattr(dataset, "classes", None)
        if classes is not None and classes_from_data and len(classes) != config.class_num:
            # the --dataset default (1000 for imagenet) would silently train unused class slots
            logger.info("the data set has %d classes: --class_num set to %d (the --dataset %s default is %d; "
                        "pass --class_num to choose)", len(classes), len(classes), args.dataset, config.class_num)
            config = dataclasses.replace(config, class_num=len(classes))
        if classes_from_data and args.online_eval:
            class_balanced_labels(args.num_images, config.class_num)
        if classes is not None and len(classes) > config.class_num:
            raise ValueError(f"the data set has {len(classes)} classes but --class_num is {config.class_num}")
        sampler = ResumableSampler(len(dataset), world, rank, seed=args.seed)
        if steps_per_epoch(sampler, args.batch_size) == 0:
            raise ValueError(f"{len(dataset)} training items are fewer than {world} processes x --batch_size "
                             f"{args.batch_size}")
    # the same seed everywhere for the initial weights, then one stream per rank
    torch.manual_seed(args.seed)
    tokenizer = build_tokenizer(config.tokens, args.vae_path, levels=args.pixel_levels, device=device)
    model = build(config).to(device)
    model.grad_checkpointing = train_config.grad_checkpointing
    if args.init_outer_from and ckpt_file is None and not args.evaluate:
        load_outer_weights(model, args.init_outer_from)
    if args.freeze_outer:
        freeze_outer(model)
    ema = EMA(model, train_config.ema_rate)
    # one sampling backend for the run's evaluations (flag contradictions fail here, before training)
    backend = sampling_backend(model, args) if args.evaluate or args.online_eval else None

    optimizer = torch.optim.AdamW(param_groups(model, train_config.weight_decay), lr=train_config.lr, betas=(0.9, 0.95))
    scaler = torch.amp.GradScaler(device.type, enabled=train_config.precision == "fp16")
    state, eval_epoch = TrainState(), 0
    torch.manual_seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    random.seed(args.seed + rank)
    if ckpt is not None:
        if args.evaluate:
            load_weights_and_ema(ckpt, ckpt_file, model, ema)
            eval_epoch = int(ckpt.get("epoch", 0))
        else:
            state = resume_training(ckpt, ckpt_file, model, ema, optimizer, scaler, args, sampler)
            changed = train_config.changed_settings(checkpoint_args(ckpt))
            if changed:
                logger.warning("%s: resuming with changed training settings: %s", ckpt_file, ", ".join(changed))
        del ckpt
        if not args.evaluate:
            logger.info("resuming %s at epoch %d step %d", ckpt_file, state.epoch, state.step_in_epoch)

    # start-up checks passed: from here on files are written
    lock = None if args.evaluate else claim_run_folder(args.output_dir)
    if rank == 0:
        os.makedirs(args.output_dir, exist_ok=True)
        log_file = logging.FileHandler(os.path.join(args.output_dir, "log.txt"))
        log_file.setFormatter(logging.getLogger().handlers[0].formatter)  # the console's: time, level, logger
        for record in early.buffer:
            log_file.handle(record)
        logging.getLogger().addHandler(log_file)
    logging.getLogger().removeHandler(early)
    if rank == 0:
        logger.info("args: %s", " ".join(f"--{k} {v}" for k, v in sorted(vars(args).items())))
        logger.info("model config: %s", json.dumps(config.to_dict()))
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        run_line = (f"{world} processes x eval batch {args.eval_bsz}" if args.evaluate else
                    f"{world} processes x batch {args.batch_size}, lr {train_config.lr:.2e}")
        logger.info("model %s (family %s, head %s): %.2fM parameters (%.2fM trainable); %s, %s", config.model,
                    config.family, config.head, sum(p.numel() for p in model.parameters()) / 1e6, n_train / 1e6,
                    run_line, args.precision)
        steps = model.sampling_steps(args.num_iter)
        if steps != args.num_iter:
            logger.info("the %s family samples in %d steps (one a scale): --num_iter %d is not used", config.family,
                        steps, args.num_iter)
    writer = SummaryWriter(log_dir=args.log_dir) if rank == 0 else None
    exit_code = 0
    try:
        if args.evaluate:
            run_evaluations(model, tokenizer, ema, args, eval_epoch, writer, sweep_points(args), scorer, backend)
        else:
            in_place = ckpt_file is not None and os.path.isfile(os.path.join(args.output_dir, LAST)) and \
                os.path.samefile(ckpt_file, os.path.join(args.output_dir, LAST))
            exit_code = train(model, tokenizer, ema, optimizer, scaler, dataset, sampler, state, train_config, args,
                              device, writer, scorer, backend, argv, saved_step=state.global_step if in_place else None)
    finally:
        if writer is not None:
            writer.close()
        if lock is not None:
            lock.release()
    distributed.cleanup_distributed()
    return exit_code


def run_evaluations(model, tokenizer, ema, args, epoch, writer, points, scorer, backend):
    """Evaluate each (cfg, temperature) point with the run's sampling backend; then, when the sweep table
    (output_dir/sweep-ep<E>-iter<I>-n<N>-<weights>.{csv,json,png}) holds several points, write its table
    and plot and log its best point. Points already in the table from an earlier run stay in it."""
    results = [evaluate(model, tokenizer, ema, args, epoch, cfg=cfg, temperature=t, writer=writer,
                        extra_score=scorer, backend=backend) for cfg, t in dict.fromkeys(points)]
    steps = model.sampling_steps(args.num_iter)
    prefix = os.path.join(args.output_dir, f"sweep-ep{epoch}-iter{steps}-n{args.num_images}-"
                                           f"{args.eval_weights}")
    rows = sweep.merge_rows(sweep.read_rows(f"{prefix}.json"), results) if distributed.is_main_process() else []
    if len(rows) > 1:
        csv_path, _ = sweep.write_tables(rows, prefix)
        plotted = sweep.plot(rows, f"{prefix}.png", title=f"epoch {epoch}, {args.eval_weights} weights, "
                                                          f"{args.num_images} images, {steps} steps")
        best = sweep.best_point(rows)
        if best is not None:
            row, key, lower = best
            logger.info("sweep best point (%s %s): cfg %g, temperature %g: %s %.4f -> %s", "lowest" if lower
                        else "highest", key, row["cfg"], row["temperature"], key, row[key], row["folder"])
        logger.info("sweep table %s, plot %s", csv_path, plotted)
    return results


def train(model, tokenizer, ema, optimizer, scaler, dataset, sampler, state, train_config, args, device, writer, scorer,
          backend, argv, saved_step=None):
    """Train to train_config.epochs; returns 0, or REQUEUE_EXIT when a stop signal ended the run early (after a
    step-granular save; argv, the command line, goes into the line saying how to continue). saved_step: the global
    step of the checkpoint already in --output_dir, if any."""
    ddp = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None) if distributed.is_distributed() else model
    steps = steps_per_epoch(sampler, args.batch_size)
    last = os.path.join(args.output_dir, LAST)
    saved = {"step": saved_step}

    def save():
        with storage_reported(last, args.output_dir):
            save_training_checkpoint(last, model, ema, optimizer, scaler, args, state, sampler)
        saved["step"] = state.global_step
        logger.info("saved %s (epoch %d, step %d, global step %d)", last, state.epoch, state.step_in_epoch,
                    state.global_step)

    def on_disk():
        return f"the last checkpoint, {last}, is the last good one" if saved["step"] is not None else \
            "no checkpoint has been written yet"

    def on_step(state):
        if args.save_every_steps and state.global_step % args.save_every_steps == 0 \
                and state.step_in_epoch < steps:
            save()

    if state.epoch >= train_config.epochs:
        logger.info("already trained %d of --epochs %d: nothing to train (raise --epochs to go on)", state.epoch,
                    train_config.epochs)
    else:
        logger.info("training epochs %d-%d, %d steps per epoch", state.epoch, train_config.epochs - 1, steps)
    start, results = time.time(), []
    with StopRequest() as stop:
        try:
            for epoch in range(state.epoch, train_config.epochs):
                state.epoch = epoch
                if hasattr(dataset, "set_epoch"):
                    dataset.set_epoch(epoch)
                sampler.set_epoch(epoch, skip=state.step_in_epoch * args.batch_size)
                loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler,
                                    num_workers=args.num_workers, pin_memory=args.pin_mem and device.type == "cuda",
                                    drop_last=True, generator=torch.Generator().manual_seed(args.seed + epoch),
                                    worker_init_fn=ignore_stop_signals)  # a group's SIGTERM is for us to handle
                train_one_epoch(ddp, tokenizer, start_workers(loader), optimizer, scaler, ema, state, train_config,
                                steps, writer, on_step, stop)
                if stop.agreed:
                    break
                state.epoch, state.step_in_epoch = epoch + 1, 0
                # a copy is of this epoch's checkpoint: one due forces the save (else it would copy an older one)
                copy_due = args.save_copy_freq and (epoch + 1) % args.save_copy_freq == 0
                if epoch % args.save_last_freq == 0 or epoch + 1 == train_config.epochs or args.save_every_steps \
                        or copy_due:
                    save()
                if copy_due and distributed.is_main_process():
                    copy = os.path.join(args.output_dir, f"checkpoint-{epoch}.pth")
                    with storage_reported(copy, args.output_dir):
                        atomic_copy(last, copy)
                if args.online_eval and (epoch % args.eval_freq == 0 or epoch + 1 == train_config.epochs):
                    results = run_evaluations(model, tokenizer, ema, args, epoch, writer,
                                              [(1.0, args.temperature), (args.cfg, args.temperature)], scorer,
                                              backend)
                if writer is not None:
                    writer.flush()
                if epoch + 1 < train_config.epochs and stop.agree(device):  # signalled during the save or evaluation
                    break
        except FloatingPointError as err:
            raise FloatingPointError(f"{err}; {on_disk()}") from None
        if stop.agreed and saved["step"] != state.global_step:  # inside: a repeated signal must not cut it short
            save()
    if stop.agreed:
        logger.info("%s: stopped after global step %d with %s saved; exiting with code %d; to continue: %s",
                    stop.name, state.global_step, last, REQUEUE_EXIT, resume_command(argv, args.output_dir))
        return REQUEUE_EXIT
    logger.info("training done in %.1f min; %s; TensorBoard logs %s", (time.time() - start) / 60,
                f"checkpoint {last}" if saved["step"] is not None else
                f"no checkpoint was written (no epoch left to train with --epochs {train_config.epochs})", args.log_dir)
    if args.online_eval and distributed.is_main_process():
        for res in results:  # the final evaluation: where to look, and its scores
            scores = ", ".join(f"{k} {v:.4f}" for k, v in res.items()
                               if isinstance(v, float) and k not in ("cfg", "temperature", "sec_per_image"))
            logger.info("final samples (cfg %g, temperature %g): %s/grid.png; %s", res["cfg"], res["temperature"],
                        res["folder"], scores)
    return 0


@contextlib.contextmanager
def storage_reported(path, output_dir):
    """A storage failure while writing checkpoint `path` becomes one OSError line saying what to do
    (the atomic write has left any previous file as it was)."""
    try:
        yield
    except Exception as err:
        cause = storage_error(err)
        if cause is None:
            raise
        code = errno.errorcode.get(cause.errno, cause.errno)
        raise OSError(cause.errno, f"could not write {path}: {os.strerror(cause.errno)} ({code}); no existing "
                                   f"checkpoint was changed: free space or fix --output_dir {output_dir}, then "
                                   f"continue with --resume {output_dir}") from err


def one_line(err):
    """err's message; for an error raised in a DataLoader worker, the worker's own message (torch wraps it
    in the worker's traceback, whose last line it is)."""
    text = str(err)
    if "DataLoader worker" in text and "\n" in text:
        return text.strip().splitlines()[-1].split(": ", 1)[-1]
    return text


def resume_command(argv, output_dir):
    """The command line argv with --resume output_dir (added, or in place of the one given)."""
    kept, skip = [], False
    for arg in argv:
        if skip or arg.startswith("--resume="):
            skip = False
            continue
        if arg == "--resume":
            skip = True
            continue
        kept.append(arg)
    return distributed.launch_command("main_mar.py", [*kept, "--resume", str(output_dir)])


def interrupted_evaluation(args, argv, since):
    """The one line for Ctrl-C during --evaluate: the images kept, and the command that resumes."""
    folders = [d for d in glob.glob(os.path.join(args.output_dir, "eval-*", "images")) if os.path.getmtime(d) >= since]
    if folders:
        images = max(folders, key=os.path.getmtime)  # the folder this run was writing to
        kept = (f"{len(glob.glob(os.path.join(images, '*.png')))} of {args.num_images} images are finished and "
                f"kept in {os.path.dirname(images)}")
    else:
        kept = "this run had written no image yet"
    return (f"interrupted (Ctrl-C): {kept}; the same command resumes, drawing only the unfinished batches "
            f"(exit code {INTERRUPT_EXIT}): {distributed.launch_command('main_mar.py', argv)}")


def interrupted_training(args, argv):
    """The one line for Ctrl-C outside the training loop, while the data, weights or model are being read or
    built (the loop itself turns Ctrl-C into a step-granular save and REQUEUE_EXIT)."""
    last = os.path.join(args.output_dir, LAST)
    if os.path.isfile(last):
        return (f"interrupted (Ctrl-C) outside the training loop: {last} is as it was; to continue (exit code "
                f"{INTERRUPT_EXIT}): {resume_command(argv, args.output_dir)}")
    return (f"interrupted (Ctrl-C) before the first checkpoint: none was written; the same command starts again "
            f"(exit code {INTERRUPT_EXIT}): {distributed.launch_command('main_mar.py', argv)}")


def cli(argv=None):
    """Entry point: a bad flag or input, full or read-only storage, or Ctrl-C outside the training loop ends the run
    with one line naming the fix or the command that continues."""
    args = get_args_parser().parse_args(argv)
    argv = sys.argv[1:] if argv is None else [str(arg) for arg in argv]
    start = time.time()
    try:
        exit_code = main(args, argv)
    except KeyboardInterrupt:
        if distributed.is_main_process():
            logger.error("%s", interrupted_evaluation(args, argv, start) if args.evaluate else
                         interrupted_training(args, argv))
        sys.exit(INTERRUPT_EXIT)
    except (ValueError, FileNotFoundError, FloatingPointError, FolderInUse) as err:
        logger.error("%s", one_line(err))
        sys.exit(1)
    except OSError as err:
        if storage_error(err) is None:
            raise
        logger.error("%s", f"{err.filename}: {err.strerror}" if err.filename else err.strerror)
        sys.exit(1)
    if exit_code:
        sys.exit(exit_code)


if __name__ == "__main__":
    cli()

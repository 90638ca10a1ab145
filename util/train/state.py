"""Writing and resuming training checkpoints.

`checkpoint-last.pth` follows the release layout (`model`, `model_ema`, `optimizer`, `epoch` =
the last finished epoch, `scaler`) with `args` stored as a plain dict (the training settings,
util/train/config.py, among them), plus `config`: the model's typed config (models/config.py) as a
plain dict. The file loads with `torch.load(weights_only=True)`. A step-granular save adds
`train_state`: where training is in the data stream, the data order it relied on and every RNG
state of every rank, which is enough to continue bit-identically. Files are written atomically, so
a crash at any moment leaves either the previous checkpoint or the new one, never a truncated file.
"""
import logging
import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from util import distributed
from util.io.files import atomic_torch_save
from util.io.checkpoints import fetch_hint, load_model_weights, model_state_from_checkpoint, resolve_checkpoint_path
from util.io.pretrained import is_pretrained_folder, parse_repo_id

logger = logging.getLogger(__name__)

LAST = "checkpoint-last.pth"

@dataclass
class TrainState:
    """Where training is in the data stream."""
    epoch: int = 0          # the epoch in progress
    step_in_epoch: int = 0  # optimizer steps already done in that epoch
    global_step: int = 0    # optimizer steps since the start of training (skipped ones included)
    skipped_steps: int = 0  # steps skipped for a non-finite gradient, in all
    skips_in_a_row: int = 0  # ... and since the last applied step


def args_to_dict(args):
    """argparse.Namespace -> dict of plain values (what weights_only loading accepts)."""
    plain = (bool, int, float, str, type(None))
    out = {}
    for key, value in vars(args).items():
        if isinstance(value, (list, tuple)) and all(isinstance(v, plain) for v in value):
            out[key] = list(value)
        elif isinstance(value, plain):
            out[key] = value
        else:
            out[key] = str(value)
    return out


# ----------------------------------------------------------------------------- RNG states
def capture_rng_state():
    """Every RNG this process draws from, in tensors/ints/lists only."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available():  # this process's GPU only: a resume may see other GPUs (2x4 for 1x8)
        state["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return state


def restore_rng_state(state):
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda_rng_state_of_this_device(state["cuda"], torch.cuda.current_device()),
                                 torch.cuda.current_device())


def cuda_rng_state_of_this_device(saved, device_index):
    """The saved CUDA RNG state for this process's GPU: one state, or (older checkpoints) a list with one
    per visible GPU, of which this process used the entry at its device index."""
    if isinstance(saved, (list, tuple)):
        if len(saved) != torch.cuda.device_count():
            logger.warning("the checkpoint holds CUDA RNG states for %d GPUs, this node has %d: GPU %d's state is "
                           "taken, which may not be the stream this rank drew from before (resume is then not "
                           "bit-exact)", len(saved), torch.cuda.device_count(), device_index)
        if device_index >= len(saved):
            raise ValueError(f"the checkpoint holds CUDA RNG states for {len(saved)} GPUs, this process runs on "
                             f"GPU {device_index}: resume with the GPU layout that wrote it (or a newer checkpoint)")
        return saved[device_index]
    return saved


# ----------------------------------------------------------------------------- save / load
def build_checkpoint(model, ema, optimizer, scaler, epoch, args, train_state=None):
    """The release layout, plus the model's typed config as a plain dict (`config`, what rebuilds the
    model) and `train_state` for step-granular resume."""
    ckpt = {
        "config": model.config.to_dict(),
        "model": model.state_dict(),
        "model_ema": ema.state_dict_for(model),
        "optimizer": optimizer.state_dict(),
        "epoch": int(epoch),
        "scaler": scaler.state_dict(),
        "args": args_to_dict(args),
    }
    if train_state is not None:
        ckpt["train_state"] = train_state
    return ckpt


def checkpoint_path(resume, output_dir=None):
    """--resume may name a folder (its checkpoint-last.pth), a file, a published model folder or a Hub repo id
    USER/NAME[@REVISION] (downloaded into the Hugging Face cache; its snapshot folder is returned). None when
    there is nothing to resume: an existing folder without a checkpoint, or --resume equal to --output_dir
    before the first save (the first launch of a job always started with --resume OUTPUT_DIR). Any other
    missing path is a typo. A local path that exists wins over a repo id."""
    if not resume:
        return None
    resume = os.fspath(resume)
    if os.path.isfile(resume):
        return resume
    candidate = os.path.join(resume, LAST)
    if os.path.isfile(candidate):
        return candidate
    if is_pretrained_folder(resume):
        return resume
    if os.path.isdir(resume) or (output_dir and os.path.realpath(resume) == os.path.realpath(output_dir)):
        return None
    if parse_repo_id(resume) is not None:
        try:
            return str(resolve_checkpoint_path(resume))
        except FileNotFoundError as err:
            raise FileNotFoundError(f"--resume {err}") from None
    raise FileNotFoundError(f"--resume {resume}: no such checkpoint file or run folder; {fetch_hint(resume)}")


def optimizer_groups_match(optimizer, state):
    saved = state.get("param_groups", [])
    return [len(g["params"]) for g in saved] == [len(g["params"]) for g in optimizer.param_groups]


def last_batch_indices(sampler, state, batch_size):
    """The data indices of this rank's most recent step (from the previous epoch at an epoch boundary)."""
    if state.global_step == 0:
        return []
    epoch, step = state.epoch, state.step_in_epoch
    if step == 0:
        epoch, step = epoch - 1, sampler.per_rank // batch_size
    return sampler.epoch_indices(epoch)[(step - 1) * batch_size:step * batch_size]


@torch.no_grad()
def check_finite(path, model, ema, optimizer, state):
    """Collective: refuse (on every rank) to write `path` when any rank's weights, EMA or optimizer state
    hold a NaN or inf, so a bad step can never replace the last good checkpoint."""
    device = next(model.parameters()).device
    tensors = list(model.state_dict().values()) + list(ema.params) + \
        [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    bad = torch.zeros((), device=device)
    for t in tensors:
        if t.is_floating_point():
            bad += (~torch.isfinite(t)).sum().to(device)
    if distributed.all_reduce_sum(bad).item():
        raise FloatingPointError(f"refusing to write {path}: the weights, EMA or optimizer state hold "
                                 f"{int(bad.item())} non-finite values at step {state.global_step}; "
                                 "the checkpoint on disk is left as it was")


def save_training_checkpoint(path, model, ema, optimizer, scaler, args, state, sampler):
    """Collective: every rank contributes its RNG state, last batch and weight fingerprint; rank 0 writes.

    `state` is the TrainState after the last step (at an epoch's end: the next epoch, step 0);
    `sampler` the training ResumableSampler. `epoch` in the file is the last *finished* epoch, as in
    the release, so MAR-style loaders resume at epoch + 1.
    """
    check_finite(path, model, ema, optimizer, state)
    last_batch = last_batch_indices(sampler, state, args.batch_size)
    fingerprints = distributed.check_replicas_in_sync(model)
    per_rank = distributed.all_gather_object({"rng": capture_rng_state(), "last_batch": last_batch})
    if not distributed.is_main_process():
        return
    train_state = {
        "epoch": state.epoch, "step_in_epoch": state.step_in_epoch, "global_step": state.global_step,
        "skipped_steps": state.skipped_steps, "skips_in_a_row": state.skips_in_a_row,
        "data_order": {"seed": args.seed, "world_size": distributed.get_world_size(), "batch_size": args.batch_size,
                       "num_samples": sampler.num_samples,
                       "last_batch_indices": [r["last_batch"] for r in per_rank]},
        "rng": [r["rng"] for r in per_rank],
        "replica_weight_sums": [float(sum(f)) for f in fingerprints],
    }
    atomic_torch_save(build_checkpoint(model, ema, optimizer, scaler, state.epoch - 1, args, train_state), path)


def load_weights_and_ema(ckpt, source, model, ema):
    """Strictly load `model` (live weights) and the EMA (from `model_ema`, else the live weights)."""
    load_model_weights(model, model_state_from_checkpoint(ckpt, use_ema=False), source=source)
    if "model_ema" in ckpt:
        ema.load_state_dict(ckpt["model_ema"], source)
    else:
        logger.warning("%s has no model_ema: the EMA starts from its live weights", source)
        ema.load_state_dict(model.state_dict(), source)


def resume_training(ckpt, source, model, ema, optimizer, scaler, args, sampler):
    """Restore weights, EMA, optimizer, scaler and (when saved) the exact data/RNG position.

    Returns the TrainState to continue from. A checkpoint without optimizer/epoch (a stripped
    release file) restores the weights only and starts at epoch 0.
    """
    load_weights_and_ema(ckpt, source, model, ema)
    if "optimizer" not in ckpt or "epoch" not in ckpt:
        return TrainState()
    if not optimizer_groups_match(optimizer, ckpt["optimizer"]):
        raise ValueError(f"{source}: its optimizer state has parameter groups of sizes "
                         f"{[len(g['params']) for g in ckpt['optimizer']['param_groups']]}, this run "
                         f"{[len(g['params']) for g in optimizer.param_groups]} (was --freeze_outer different?)")
    optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    saved = ckpt.get("train_state")
    if saved is None:
        return TrainState(epoch=int(ckpt["epoch"]) + 1)

    state = TrainState(saved["epoch"], saved["step_in_epoch"], saved["global_step"],
                       saved.get("skipped_steps", 0), saved.get("skips_in_a_row", 0))
    order = saved["data_order"]
    world, rank = distributed.get_world_size(), distributed.get_rank()
    if state.step_in_epoch > 0:
        if (order["world_size"], order["batch_size"]) != (world, args.batch_size):
            raise ValueError(f"{source} stopped mid-epoch with {order['world_size']} processes x --batch_size "
                             f"{order['batch_size']}; resume with the same (now {world} x {args.batch_size})")
        expected = last_batch_indices(sampler, state, args.batch_size)
        if (order["seed"], order["num_samples"]) != (args.seed, sampler.num_samples) or \
                order["last_batch_indices"][rank] != expected:
            raise ValueError(f"{source}: the data order changed since it was saved (it had {order['num_samples']} "
                             f"items and --seed {order['seed']}; now {sampler.num_samples} and {args.seed}); "
                             "resume with the same data set and --seed")
    if len(saved["rng"]) == world:
        restore_rng_state(saved["rng"][rank])
    else:
        logger.warning("%s was written by %d processes, this run has %d: RNG streams restart from --seed",
                       source, len(saved["rng"]), world)
    return state

"""Cache the tokenizer posteriors of an ImageFolder's train split for faster training.

    torchrun --nproc_per_node=8 main_cache.py --img_size 256 --vae_path pretrained_models/vae/kl16.ckpt \
        --vae_embed_dim 16 --batch_size 128 --data_path ${IMAGENET_PATH} --cached_path ${CACHED_PATH}

Each image is center-cropped (ADM) and encoded as is and flipped; both posteriors' parameters
(KL-16: mean and log-variance, 32 x 16 x 16) are stored. Images are grouped into shards of
--shard_size in ImageFolder order: `shard-NNNNN.npy` [n, 2, *shape] (fp16 by default, read back
memory-mapped), `shard-NNNNN-labels.npy`, and `shard-NNNNN.json` written last to mark the shard
complete; `index.json` lists them all once every shard is done. Shards are dealt to ranks round
robin; a restarted run skips completed shards. Unreadable images are logged and left out.
Train from the cache with `main_mar.py --use_cached --cached_path ...`.
"""
import errno
import glob
import json
import logging
import math
import os
import sys

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from util import distributed, flags
from util.io.files import atomic_write, storage_error
from util.data.datasets import CACHE_FORMAT, INDEX_FILE, ImageFolderADM, SkipUnreadable, collate_skipping, shard_stem
from util.io.tokenizers import build_tokenizer
from util.train.preemption import INTERRUPT_EXIT, ignore_stop_signals

logger = logging.getLogger("main_cache")

DTYPES = {"fp16": np.float16, "fp32": np.float32}


def get_args_parser():
    parser = flags.parser("ARINAR latent caching")
    flags.add_model_args(parser, tokens_only=True)
    flags.add_data_args(parser, writes_cache=True)
    parser.add_argument("--shard_size", default=10000, type=int, help="images per shard")
    parser.add_argument("--cache_dtype", default="fp16", choices=sorted(DTYPES), help="storage dtype of the moments")
    return parser


def cache_settings(args, tokens, num_images, classes):
    """What a cache was made from; a restart must match it exactly."""
    return {"format": CACHE_FORMAT, "img_size": tokens.img_size, "tokenizer": tokens.tokenizer,
            "embed_dim": tokens.vae_embed_dim, "stride": tokens.vae_stride, "dtype": args.cache_dtype,
            "shard_size": args.shard_size, "num_images": num_images, "classes": classes}


def write_json(path, obj):
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def read_json(path):
    with open(path) as f:
        return json.load(f)


def check_existing(root, settings):
    """A cache folder may only be continued with the same settings; never overwrite another cache."""
    index_path = os.path.join(root, INDEX_FILE)
    found = []
    if os.path.isfile(index_path):
        found.append((index_path, read_json(index_path)))
    found += [(os.path.join(root, n), read_json(os.path.join(root, n))["settings"])
              for n in sorted(os.listdir(root)) if n.startswith("shard-") and n.endswith(".json")]
    for path, saved in found:
        saved_settings = {k: saved.get(k) for k in settings}
        if saved_settings != settings:
            diff = [f"{k}: {saved_settings[k]!r:.40} vs {settings[k]!r:.40}" for k in settings
                    if saved_settings[k] != settings[k]]
            raise ValueError(f"--cached_path {root} already holds a different cache ({path}: {'; '.join(diff)}); "
                             "pass a new --cached_path or the flags it was made with")
    return os.path.isfile(index_path)


@torch.no_grad()
def encode_shard(shard, indices, folder, tokenizer, args, settings, device, progress):
    """Encode one shard's images (original + flip) and write its files; the .json goes last."""
    loader = DataLoader(SkipUnreadable(folder, indices), batch_size=args.batch_size, shuffle=False,
                        num_workers=args.num_workers, pin_memory=args.pin_mem and device.type == "cuda",
                        collate_fn=collate_skipping, worker_init_fn=ignore_stop_signals)
    moments, labels, skipped, count = None, [], [], 0
    for images, batch_labels, _, failed in loader:
        for note in failed:
            logger.warning("skipping unreadable image %s", note)
        skipped += failed
        progress.update(len(failed))
        if images is None:
            continue
        images = images.to(device, non_blocking=True)
        both = torch.stack([tokenizer.encode(images).parameters, tokenizer.encode(images.flip(-1)).parameters], 1)
        both = both.float().cpu().numpy().astype(DTYPES[args.cache_dtype])
        if moments is None:
            moments = np.empty((len(indices),) + both.shape[1:], dtype=both.dtype)
        moments[count:count + len(both)] = both
        labels.append(batch_labels.numpy())
        count += len(both)
        progress.update(len(both))
    moments = moments[:count] if moments is not None else np.zeros((0,), DTYPES[args.cache_dtype])
    labels = np.concatenate(labels) if labels else np.zeros(0, np.int64)

    stem = os.path.join(args.cached_path, shard_stem(shard))
    atomic_write(stem + ".npy", lambda f: np.save(f, moments))
    atomic_write(stem + "-labels.npy", lambda f: np.save(f, labels.astype(np.int64)))
    write_json(stem + ".json", {"settings": settings, "shard": shard, "first": int(indices[0]), "count": count,
                                "moments": shard_stem(shard) + ".npy", "labels": shard_stem(shard) + "-labels.npy",
                                "moments_shape": list(moments.shape[2:]), "skipped": skipped})


def write_index(root, settings, num_shards):
    metas = [read_json(os.path.join(root, shard_stem(s) + ".json")) for s in range(num_shards)]
    shapes = {tuple(m["moments_shape"]) for m in metas if m["count"]}
    index = dict(settings, num_cached=sum(m["count"] for m in metas),
                 moments_shape=list(shapes.pop()) if shapes else [],
                 shards=[{"moments": m["moments"], "labels": m["labels"], "count": m["count"]} for m in metas if m["count"]],
                 skipped=[note for m in metas for note in m["skipped"]])
    write_json(os.path.join(root, INDEX_FILE), index)
    return index


def shards_of(rank, world, num_shards, done):
    """The shards rank `rank` of `world` encodes: every `world`-th of those not `done`, so that the work
    left is shared evenly (dealing all shards round-robin, then skipping the done ones, could leave some
    ranks idle and give the others everything, as after a resume). Every rank must pass the same `done`."""
    return [s for s in range(num_shards) if s not in done][rank::world]


def main(args):
    device = distributed.init_distributed()
    distributed.setup_logging()
    rank, world = distributed.get_rank(), distributed.get_world_size()
    if not args.cached_path:
        raise ValueError("--cached_path is required (the folder to write the cache into)")
    if args.shard_size < 1 or args.batch_size < 1:
        raise ValueError("--shard_size and --batch_size must be >= 1")
    tokens = flags.token_config(args)
    folder = ImageFolderADM(os.path.join(args.data_path, "train"), tokens.img_size, flip=False)
    settings = cache_settings(args, tokens, len(folder), folder.classes)
    if os.path.isdir(args.cached_path) and check_existing(args.cached_path, settings):
        logger.info("%s is already complete", args.cached_path)
        distributed.cleanup_distributed()
        return
    tokenizer = build_tokenizer(tokens, args.vae_path, levels=args.pixel_levels, device=device)
    if rank == 0:
        os.makedirs(args.cached_path, exist_ok=True)
    distributed.barrier()

    num_shards = math.ceil(len(folder) / args.shard_size)
    done = distributed.broadcast_object(
        {s for s in range(num_shards) if os.path.isfile(os.path.join(args.cached_path, shard_stem(s) + ".json"))})
    mine = shards_of(rank, world, num_shards, done)
    logger.info("%d images in %d shards: %d already done, %d left (%d on this rank)", len(folder), num_shards,
                len(done), num_shards - len(done), len(mine))
    spans = {s: range(s * args.shard_size, min((s + 1) * args.shard_size, len(folder))) for s in mine}
    with tqdm(total=sum(len(r) for r in spans.values()), desc="caching", unit="img", disable=rank != 0) as bar:
        for s in mine:
            encode_shard(s, spans[s], folder, tokenizer, args, settings, device, bar)
    distributed.barrier()
    if rank == 0:
        index = write_index(args.cached_path, settings, num_shards)
        logger.info("cached %d of %d images into %s (%d unreadable, skipped)", index["num_cached"], len(folder),
                    args.cached_path, len(index["skipped"]))
    distributed.cleanup_distributed()


def interrupted(args, argv):
    """The one line for Ctrl-C: the complete shards are kept, and the same command encodes only the others."""
    done = len(glob.glob(os.path.join(glob.escape(args.cached_path), "shard-*.json"))) if args.cached_path else 0
    return (f"interrupted (Ctrl-C): {done} complete shard{'s' * (done != 1)} kept in {args.cached_path}; the same "
            f"command continues with the others (exit code {INTERRUPT_EXIT}): "
            f"{distributed.launch_command('main_cache.py', argv)}")


def cli(argv=None):
    """Entry point: a bad flag or input, Ctrl-C, or full or read-only storage ends the run with one line."""
    args = get_args_parser().parse_args(argv)
    argv = sys.argv[1:] if argv is None else [str(arg) for arg in argv]
    try:
        main(args)
    except KeyboardInterrupt:
        if distributed.is_main_process():
            logger.error("%s", interrupted(args, argv))
        sys.exit(INTERRUPT_EXIT)
    except (ValueError, FileNotFoundError) as err:
        logger.error("%s", err)
        sys.exit(1)
    except OSError as err:
        cause = storage_error(err)
        if cause is None:
            raise
        logger.error("could not write into --cached_path %s: %s (%s); the complete shards are kept: free space or "
                     "fix the folder, then the same command continues", args.cached_path, os.strerror(cause.errno),
                     errno.errorcode.get(cause.errno, cause.errno))
        sys.exit(1)


if __name__ == "__main__":
    cli()

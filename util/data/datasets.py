"""Data sets for training and caching, and the resumable distributed sampler.

- ImageNet-style ImageFolder (`--data_path/<split>/<class>/<image>`) with ADM's center crop and a
  random horizontal flip.
- Cached latents written by main_cache.py: a few large shards `shard-NNNNN.npy` holding
  [n, 2 (original, flipped), *moments_shape] (fp16 by default, memory-mapped), a labels file per
  shard, and `index.json`. MAR's own cache (one `.npz` per image with `moments` and
  `moments_flip`, in class folders) is read as well.
- The digits demo set (util/digits.py).

Every random choice made here (flip or not) is a pure function of (seed, epoch, index), so the
data a step sees does not depend on worker processes or on where a run was resumed. An image that
cannot be decoded is replaced by the next readable one in folder order (and its path logged), which
keeps batches full and the same on resume.
"""
import importlib
import json
import logging
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler
from torchvision.datasets.folder import IMG_EXTENSIONS, ImageFolder

from util.io.safe_load import ARRAY_ERRORS, why_array_unreadable


logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class DataSetSpec:
    """Everything a --dataset name decides, in this one place."""
    class_num: int
    img_channels: int
    fid_stats: str  # the default --fid_stats ("none": no Inception statistics apply)
    token_defaults: dict = field(default_factory=dict)  # model flags a new run on it implies (given flags win)
    scorer: str = None  # "module:function" scoring samples (images, labels) -> dict where FID does not apply
    hub_id: str = None  # the Hugging Face data set a model card names


DATASETS = {
    "imagenet": DataSetSpec(1000, 3, "fid_stats/adm_in256_stats.npz", hub_id="ILSVRC/imagenet-1k"),
    # the CPU demo's 8x8 grey digits as 16 pixel tokens of 2x2 (a preset's 256 px default would upsample
    # them to 65,536 pixel tokens an image); scored by a digit classifier
    "digits": DataSetSpec(10, 1, "none", {"tokenizer": "pixel", "img_size": 8, "patch_size": 2},
                          scorer="util.data.digits:score_samples"),
}


def sample_scorer(dataset):
    """The data set's own scorer of samples (e.g. the digits' classifier), or None; imported on use."""
    path = DATASETS[dataset].scorer
    if path is None:
        return None
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)
INDEX_FILE = "index.json"
CACHE_FORMAT = "arinar-latents-v1"


# ----------------------------------------------------------------------------- image transforms
def center_crop_arr(pil_image, image_size):
    """ADM's crop: halve with a box filter while the short side >= 2x target, bicubic-resize the
    short side to the target (rounding each side), then center-crop."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[top:top + image_size, left:left + image_size])


SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # "I": how older Pillows open 16-bit PNGs
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def to_rgb(pil_image):
    """Any PIL mode -> 8-bit RGB.

    PIL's own convert("RGB") clips 16-bit grey values at 255 (an almost white image), so 16-bit
    and 32-bit integer grey is scaled by 255/65535 (= 1/257) and float grey ("F") is taken on PIL's
    0-255 scale; both are rounded and clipped. Transparent pixels store arbitrary colours (often
    black), so images with alpha (or a palette with transparency) are composited over white, as a
    viewer shows them.
    """
    mode = pil_image.mode
    if mode in SIXTEEN_BIT_MODES or mode == "F":
        grey = np.nan_to_num(np.asarray(pil_image, dtype=np.float64))
        if mode != "F":
            grey = grey / 257.0
        grey = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode in ALPHA_MODES or (mode == "P" and "transparency" in pil_image.info):
        rgba = pil_image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return pil_image.convert("RGB")


def to_model_range(pil_image):
    """PIL RGB image -> float tensor [3, H, W] in [-1, 1]."""
    arr = torch.from_numpy(np.asarray(pil_image, dtype=np.uint8).copy()).permute(2, 0, 1)
    return arr.float().div_(127.5).sub_(1.0)


def flip_coin(seed, epoch, index):
    """A fair coin that depends only on (seed, epoch, index)."""
    return bool(np.random.default_rng((seed, epoch, index)).integers(2))


# ----------------------------------------------------------------------------- ImageFolder
def check_image_folder(root, flag="--data_path"):
    """Fail early and clearly on a missing folder or a class folder without images."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{flag}: image folder {root} does not exist (expected {root}/<class>/<image>)")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise ValueError(f"{flag}: {root} has no class folders (expected {root}/<class>/<image>)")
    empty = [c for c in classes if not _has_image(os.path.join(root, c))]
    if empty:
        more = f" and {len(empty) - 1} more" if len(empty) > 1 else ""
        raise ValueError(f"{flag}: class folder {os.path.join(root, empty[0])}{more} holds no images "
                         f"({', '.join(IMG_EXTENSIONS[:4])}, ...); remove it or fix {flag}")
    return classes


def _has_image(folder):
    for _, _, files in os.walk(folder, followlinks=True):
        if any(f.lower().endswith(IMG_EXTENSIONS) for f in files):
            return True
    return False


class ImageFolderADM(ImageFolder):
    """ImageFolder -> (image [3, S, S] in [-1, 1], label), ADM center crop, optional random flip."""

    def __init__(self, root, img_size, flip=True, seed=0):
        check_image_folder(root)
        super().__init__(root)
        self.img_size, self.flip, self.seed, self.epoch = img_size, flip, seed, 0
        self.unreadable = set()  # indices this process found unreadable (each logged once)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def load(self, index):
        path, label = self.samples[index]
        with open(path, "rb") as f:
            image = center_crop_arr(to_rgb(Image.open(f)), self.img_size)
        return to_model_range(image), label

    def load_readable(self, index):
        """load(index), or for an image that cannot be decoded the next readable one in folder order: a
        pure function of the files, so batches stay full and identical on resume."""
        count = len(self.samples)
        for offset in range(count):
            candidate = (index + offset) % count
            if candidate in self.unreadable:
                continue
            try:
                return self.load(candidate)
            except Exception as err:  # PIL raises many types for broken files; all mean "use another one"
                self.unreadable.add(candidate)
                logger.warning("skipping unreadable image %s; the next readable image is used instead",
                               self.unreadable_note(candidate, err))
        raise ValueError(f"--data_path {self.root}: none of its {count} images can be read")

    def unreadable_note(self, index, err):
        """"PATH (ErrorType: first line of the message)" for a log line."""
        reason = (str(err).splitlines() or [""])[0][:200]
        return f"{self.samples[index][0]} ({type(err).__name__}: {reason})"

    def __getitem__(self, index):
        image, label = self.load_readable(index)
        if self.flip and flip_coin(self.seed, self.epoch, index):
            image = image.flip(-1)
        return image, label


class SkipUnreadable(Dataset):
    """Wraps ImageFolderADM for caching: an unreadable image yields None (and its path) instead of raising."""

    def __init__(self, folder, indices):
        self.folder, self.indices = folder, list(indices)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        index = self.indices[i]
        try:
            image, label = self.folder.load(index)
        except Exception as err:  # PIL raises many types for broken files; all mean "skip this one"
            return None, -1, index, self.folder.unreadable_note(index, err)
        return image, label, index, None


def collate_skipping(batch):
    """(images [n,3,S,S] or None, labels [n], indices [n], [failed path notes])."""
    good = [b for b in batch if b[0] is not None]
    failed = [b[3] for b in batch if b[0] is None]
    images = torch.stack([b[0] for b in good]) if good else None
    labels = torch.tensor([b[1] for b in good], dtype=torch.long)
    indices = torch.tensor([b[2] for b in good], dtype=torch.long)
    return images, labels, indices, failed


# ----------------------------------------------------------------------------- cached latents
def shard_stem(i):
    return f"shard-{i:05d}"


def read_cache_index(root):
    path = os.path.join(root, INDEX_FILE)
    with open(path) as f:
        index = json.load(f)
    if index.get("format") != CACHE_FORMAT:
        raise ValueError(f"--cached_path: {path} is not an arinar latent cache (format {index.get('format')!r})")
    return index


def check_cache_matches(meta, tokens, where):
    """Cached latents must come from the same image size and tokenizer as this run (tokens: its TokenConfig)."""
    if meta["img_size"] != tokens.img_size:
        raise ValueError(f"--cached_path {where} holds latents of {meta['img_size']}px images but --img_size is "
                         f"{tokens.img_size}: pass --img_size {meta['img_size']} or re-cache with main_cache.py")
    if meta["tokenizer"] != tokens.tokenizer or meta["embed_dim"] != tokens.vae_embed_dim:
        raise ValueError(f"--cached_path {where} was made with tokenizer {meta['tokenizer']} "
                         f"({meta['embed_dim']} channels) but this run uses --tokenizer {tokens.tokenizer} "
                         f"({tokens.vae_embed_dim} channels)")


class CachedLatents(Dataset):
    """main_cache.py's shards -> (moments [*moments_shape] float32, label); flip chosen at random."""

    def __init__(self, root, seed=0):
        self.root, self.seed, self.epoch = root, seed, 0
        self.meta = read_cache_index(root)
        self.shards = self.meta["shards"]
        counts = [s["count"] for s in self.shards]
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        # every shard is opened once here (memory-mapped, so only its header is read): a damaged one
        # stops the run at start-up with one line, not later inside a DataLoader worker
        for shard in self.shards:
            moments = self.read_shard(shard, "moments", mmap_mode="r")
            if moments.ndim < 2 or moments.shape[:2] != (shard["count"], 2):
                self.refuse(shard, "moments", f"holds an array of shape {list(moments.shape)}, not "
                                              f"[{shard['count']}, 2, ...] as {INDEX_FILE} says")
        labels = [self.read_shard(s, "labels") for s in self.shards]
        for shard, shard_labels in zip(self.shards, labels):
            if shard_labels.shape != (shard["count"],) or shard_labels.dtype.kind not in "iu":
                self.refuse(shard, "labels", f"holds {shard_labels.dtype} {list(shard_labels.shape)}, not "
                                             f"{shard['count']} integer labels")
        self.labels = np.concatenate(labels) if self.shards else np.zeros(0, np.int64)
        self.classes = self.meta["classes"]
        self.arrays = None  # memory maps, opened lazily in each (worker) process

    def read_shard(self, shard, part, **kwargs):
        try:
            return np.load(os.path.join(self.root, shard[part]), allow_pickle=False, **kwargs)
        except ARRAY_ERRORS as err:
            self.refuse(shard, part, why_array_unreadable(err))

    def refuse(self, shard, part, why):
        stem = shard[part].removesuffix(".npy").removesuffix("-labels")
        raise ValueError(f"--cached_path {self.root}: {shard[part]} is unusable: {why}; delete {stem}.json and "
                         f"{INDEX_FILE} and re-run main_cache.py with the same flags (it redoes only that shard)")

    def __getstate__(self):
        state = dict(self.__dict__)
        state["arrays"] = None  # never pickle a memory map into a worker
        return state

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return int(self.offsets[-1])

    def __getitem__(self, index):
        if self.arrays is None:
            self.arrays = [np.load(os.path.join(self.root, s["moments"]), mmap_mode="r") for s in self.shards]
        shard = int(np.searchsorted(self.offsets, index, side="right") - 1)
        flip = int(flip_coin(self.seed, self.epoch, index))
        moments = np.asarray(self.arrays[shard][index - self.offsets[shard], flip], dtype=np.float32)
        return torch.from_numpy(moments), int(self.labels[index])


class NpzLatentFolder(Dataset):
    """MAR's cache: <root>/<class>/<name>.npz with `moments` and `moments_flip`."""

    def __init__(self, root, seed=0):
        self.root, self.seed, self.epoch = root, seed, 0
        self.classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
        self.samples = []
        for label, cls in enumerate(self.classes):
            for dirpath, _, files in sorted(os.walk(os.path.join(root, cls), followlinks=True)):
                self.samples += [(os.path.join(dirpath, f), label) for f in sorted(files) if f.endswith(".npz")]
        if not self.samples:
            raise FileNotFoundError(f"--cached_path {root}: no {INDEX_FILE} and no <class>/*.npz files")

    def set_epoch(self, epoch):
        self.epoch = epoch

    def moments_shape(self):
        return tuple(self.read(self.samples[0][0], "moments").shape)

    def read(self, path, key):
        """Array `key` of one .npz, or a one-line ValueError naming the file (pickled objects are never loaded)."""
        try:
            with open(path, "rb") as f:
                data = np.load(f, allow_pickle=False)
                if not isinstance(data, np.lib.npyio.NpzFile) or key not in data.files:
                    why = f"it has no array {key!r} (MAR's caches hold 'moments' and 'moments_flip')"
                else:
                    return data[key]
        except ARRAY_ERRORS as err:
            why = why_array_unreadable(err)
        raise ValueError(f"--cached_path {self.root}: {path} is unusable: {why}; re-cache that image or delete "
                         "the file")

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, label = self.samples[index]
        key = "moments_flip" if flip_coin(self.seed, self.epoch, index) else "moments"
        return torch.from_numpy(self.read(path, key).astype(np.float32)), label


def build_cached_dataset(args, tokens):
    root = args.cached_path
    if not root or not os.path.isdir(root):
        raise FileNotFoundError(f"--cached_path {root!r} does not exist; create it with main_cache.py")
    if os.path.isfile(os.path.join(root, INDEX_FILE)):
        dataset = CachedLatents(root, seed=args.seed)
        check_cache_matches(dataset.meta, tokens, root)
        if len(dataset) == 0:
            raise ValueError(f"--cached_path {root} holds no latents")
        return dataset
    dataset = NpzLatentFolder(root, seed=args.seed)
    side = tokens.img_size // tokens.vae_stride
    expected = (2 * tokens.vae_embed_dim, side, side)
    if dataset.moments_shape() != expected:
        got = dataset.moments_shape()
        raise ValueError(f"--cached_path {root} holds moments of shape {got} but --img_size {tokens.img_size} / "
                         f"--vae_stride {tokens.vae_stride} / --vae_embed_dim {tokens.vae_embed_dim} expect {expected}"
                         f" (pass --img_size {got[-1] * tokens.vae_stride} or re-cache)")
    return dataset


# ----------------------------------------------------------------------------- entry point
def build_dataset(args, tokens, split="train"):
    """The training set for args (data flags) and tokens (the model's TokenConfig): cached latents, an
    ImageFolder, or the digits demo set.

    Items are (image in [-1, 1], label), or (posterior parameters, label) with --use_cached.
    """
    if getattr(args, "use_cached", False):
        return build_cached_dataset(args, tokens)
    if args.dataset == "imagenet":
        return ImageFolderADM(os.path.join(args.data_path, split), tokens.img_size, flip=True, seed=args.seed)
    if args.dataset == "digits":
        from util.data.digits import DigitsDataset  # the demo's data set, only needed for --dataset digits
        return DigitsDataset(split, tokens.img_size)
    raise ValueError(f"--dataset must be one of {', '.join(DATASETS)}; got {args.dataset!r}")


# ----------------------------------------------------------------------------- sampling
class ResumableSampler(Sampler):
    """DistributedSampler-like: a per-epoch permutation from (seed, epoch), rank r takes every
    world-th index (the tail that does not divide evenly is dropped, so ranks never overlap), and
    `set_epoch(epoch, skip)` starts this rank's stream after its first `skip` indices."""

    def __init__(self, num_samples, num_replicas=1, rank=0, seed=0, shuffle=True):
        if num_samples < num_replicas:
            raise ValueError(f"the data set has {num_samples} items, fewer than the {num_replicas} processes")
        self.num_samples, self.num_replicas, self.rank = num_samples, num_replicas, rank
        self.seed, self.shuffle = seed, shuffle
        self.per_rank = num_samples // num_replicas
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch, skip=0):
        self.epoch, self.skip = epoch, skip

    def epoch_indices(self, epoch):
        """This rank's full index stream for `epoch`."""
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.num_samples, generator=gen)
        else:
            order = torch.arange(self.num_samples)
        return order[:self.per_rank * self.num_replicas][self.rank::self.num_replicas].tolist()

    def __iter__(self):
        return iter(self.epoch_indices(self.epoch)[self.skip:])

    def __len__(self):
        return self.per_rank - self.skip


def steps_per_epoch(sampler, batch_size):
    return sampler.per_rank // batch_size


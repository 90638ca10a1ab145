"""scikit-learn's handwritten digits: the CPU demo's data set and its sample score.

The data ships inside scikit-learn (1,797 8x8 images, grey levels 0..16, 10 classes), so the demo
downloads nothing. One fixed stratified split (80 % train / 20 % test, random_state 0) serves both
the generative model (train) and the scoring classifier (fit on train, checked on test).

Images are mapped linearly to [-1, 1]: level k -> k / 8 - 1, so the 17 levels are equally spaced
and `--tokenizer pixel --pixel_levels 17` dequantises each pixel uniformly within its level's bin.
"""
import functools

import numpy as np
import torch
from threadpoolctl import threadpool_limits  # ships with scikit-learn
from torch.utils.data import Dataset

GREY_LEVELS = 17  # pixel values 0..16
NATIVE_SIZE = 8
SPLITS = ("train", "test")
TEST_FRACTION = 0.2
SPLIT_SEED = 0


def load_split(split):
    """(grey images int64 [N, 8, 8] in 0..16, labels int64 [N]) of the fixed train/test split."""
    if split not in SPLITS:
        raise ValueError(f"digits split must be one of {SPLITS}; got {split!r}")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images, labels = digits.images.astype(np.int64), digits.target.astype(np.int64)
    parts = train_test_split(images, labels, test_size=TEST_FRACTION, stratify=labels, random_state=SPLIT_SEED)
    train_images, test_images, train_labels, test_labels = parts
    return (train_images, train_labels) if split == "train" else (test_images, test_labels)


def check_img_size(img_size):
    if img_size < NATIVE_SIZE or img_size % NATIVE_SIZE:
        raise ValueError(f"--img_size for --dataset digits must be a multiple of {NATIVE_SIZE} "
                         f"(8 = native, 16 = each pixel repeated 2x2); got {img_size}")
    return img_size // NATIVE_SIZE


class DigitsDataset(Dataset):
    """(image float [1, S, S] in [-1, 1], label) with S = img_size; S > 8 repeats each pixel (nearest)."""

    classes = [str(c) for c in range(10)]

    def __init__(self, split="train", img_size=NATIVE_SIZE):
        factor = check_img_size(img_size)
        grey, labels = load_split(split)
        images = torch.from_numpy(grey).float().div_((GREY_LEVELS - 1) / 2).sub_(1.0).unsqueeze(1)
        self.images = images.repeat_interleave(factor, 2).repeat_interleave(factor, 3).contiguous()
        self.labels = torch.from_numpy(labels)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return self.images[index], int(self.labels[index])


def to_grey_levels(images):
    """Generated uint8 images [N, S, S] or [N, S, S, 1] (0..255) -> float [N, 8, 8] grey levels in 0..16.

    Larger images are averaged over each 8x8 cell's block (the inverse of the nearest upsampling),
    then every value is rounded to the nearest of the 17 levels, as the real data is.
    """
    images = np.asarray(images)
    if images.ndim == 4:
        if images.shape[-1] != 1:
            raise ValueError(f"digit samples must be single-channel; got shape {images.shape}")
        images = images[..., 0]
    if images.ndim != 3 or images.shape[1] != images.shape[2]:
        raise ValueError(f"digit samples must be [N, S, S] or [N, S, S, 1]; got shape {images.shape}")
    factor = check_img_size(images.shape[1])
    n = images.shape[0]
    grey = images.astype(np.float64).reshape(n, NATIVE_SIZE, factor, NATIVE_SIZE, factor).mean(axis=(2, 4))
    return np.rint(grey * (GREY_LEVELS - 1) / 255.0)


@functools.lru_cache(maxsize=1)
def fit_digits_classifier():
    """(logistic regression fit on the train split's 8x8 grey levels, its accuracy on the test split)."""
    from sklearn.linear_model import LogisticRegression

    train_images, train_labels = load_split("train")
    test_images, test_labels = load_split("test")
    classifier = LogisticRegression(max_iter=5000)
    # 64 features gain nothing from BLAS threads, and busy cores make them spin for seconds
    with threadpool_limits(limits=1):
        classifier.fit(classifier_features(train_images), train_labels)
        real_accuracy = classifier.score(classifier_features(test_images), test_labels)
    return classifier, float(real_accuracy)


def classifier_features(grey):
    """[N, 8, 8] grey levels -> [N, 64] in [0, 1] (scaled so the solver converges in a few dozen steps)."""
    return np.asarray(grey, dtype=np.float64).reshape(len(grey), -1) / (GREY_LEVELS - 1)


def score_samples(images, labels):
    """Classifier accuracy on generated digits against the classes they were asked for.

    images: uint8 [N, S, S(, 1)]; labels: [N] requested classes. Returns {"accuracy": on the samples,
    "real_accuracy": the same classifier on held-out real digits, for reference}.
    """
    labels = np.asarray(labels).reshape(-1)
    grey = to_grey_levels(images)
    if len(grey) != len(labels) or len(labels) == 0:
        raise ValueError(f"need one requested label per sample (and at least one); got {len(grey)} samples "
                         f"and {len(labels)} labels")
    classifier, real_accuracy = fit_digits_classifier()
    with threadpool_limits(limits=1):
        predicted = classifier.predict(classifier_features(grey))
    return {"accuracy": float(np.mean(predicted == labels)), "real_accuracy": real_accuracy}

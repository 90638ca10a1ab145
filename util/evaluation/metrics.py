"""FID, Inception Score, precision and recall with upstream torch-fidelity.

Features come from torch-fidelity's own InceptionV3 (the TF-ported network ADM and MAR use): the
2048-d pool features for FID and the 1008-d unbiased logits for IS. FID compares the generated
features' Gaussian with reference statistics (`mu`, `sigma`) through torch-fidelity's
`fid_statistics_to_metric`. Precision and recall compare the pool features with those of ADM's
reference batch (images, not statistics). Without a weights path torch-fidelity's Inception file is
downloaded into the torch hub cache; either way it is read weights-only
(util/evaluation/inception_weights.py).
"""
import hashlib
import io
import logging
import os
import zipfile

import numpy as np
import torch
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
from torch_fidelity.metric_prc import calculate_precision_recall_part
from numpy.lib import format as npformat
from tqdm import tqdm

from util.io.files import atomic_write
from util.evaluation.inception_weights import read_inception_state
from util.io.safe_load import ARRAY_ERRORS, why_array_unreadable

logger = logging.getLogger(__name__)

PR_NEIGHBOURS = 3  # ADM's evaluator: the 3rd nearest neighbour sets each point's manifold radius
POOL, LOGITS = "2048", "logits_unbiased"


def build_inception(weights_path=None, device="cpu"):
    """torch-fidelity's InceptionV3 feature extractor on `device`, its weights read weights-only
    (util/inception_weights.py) from `weights_path` or torch-fidelity's cached download."""
    state = read_inception_state(weights_path)
    # torch-fidelity unpickles whatever its weights path names with weights_only=False; handing it an
    # in-memory copy of the tensors read above means it only ever unpickles bytes written here
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    extractor = FeatureExtractorInceptionV3("inception-v3-compat", [POOL, LOGITS],
                                            feature_extractor_weights_path=buffer)
    return extractor.to(device).eval()


@torch.no_grad()
def inception_features(extractor, images, device, batch_size=100):
    """uint8 [N, H, W, C] (C = 1 or 3) -> (pool [N, 2048], logits [N, 1008]) fp32 on `device`."""
    x = torch.as_tensor(np.asarray(images)).to(device).permute(0, 3, 1, 2)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    pools, logits = [], []
    for chunk in x.split(batch_size):
        pool, logit = extractor(chunk.contiguous())
        pools.append(pool)
        logits.append(logit)
    return torch.cat(pools), torch.cat(logits)


def load_fid_stats(path):
    """Reference statistics {mu [D], sigma [D, D]} as float64 from an npz with keys mu, sigma."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--fid_stats {path}: no such file (fetch ImageNet-256's with "
                                "`python -m util.io.download adm_in256_stats`, or pass --fid_stats none)")
    try:
        with open(path, "rb") as f:
            data = np.load(f, allow_pickle=False)
            found = list(data.files) if isinstance(data, np.lib.npyio.NpzFile) else ["a single .npy array"]
            arrays = {key: np.asarray(data[key], dtype=np.float64) for key in ("mu", "sigma") if key in found}
    except ARRAY_ERRORS as err:
        raise ValueError(f"--fid_stats {path} is unreadable: {why_array_unreadable(err)}; pass an .npz of "
                         "arrays 'mu' and 'sigma' (or --fid_stats none)") from None
    if len(arrays) < 2:
        raise ValueError(f"--fid_stats {path} must hold arrays 'mu' and 'sigma'; it has {found}")
    mu, sigma = arrays["mu"], arrays["sigma"]
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"--fid_stats {path}: mu must be [D] and sigma [D, D]; got {mu.shape} and {sigma.shape}")
    return {"mu": mu, "sigma": sigma}


def fid_from_features(features, reference):
    """torch-fidelity's FID between the features' Gaussian and the reference statistics."""
    stats = fid_features_to_statistics(torch.as_tensor(features).cpu().double())
    return float(fid_statistics_to_metric(stats, reference, verbose=False)[KEY_METRIC_FID])


def inception_score(logits, splits=10):
    """torch-fidelity's Inception Score (mean and std over splits) from unbiased logits."""
    logits = torch.as_tensor(logits).cpu()
    out = isc_features_to_metric(logits, splits=min(splits, logits.shape[0]))
    return {"inception_score": out[KEY_METRIC_ISC_MEAN], "inception_score_std": out[KEY_METRIC_ISC_STD]}


# ----------------------------------------------------------------------------- precision and recall
def precision_recall(generated, reference, k=PR_NEIGHBOURS, batch_size=2000):
    """Kynkaanniemi et al.'s improved precision and recall, as ADM's evaluator computes them.

    Each point's radius is the distance to its k-th nearest neighbour in its own set (itself
    excluded). Precision: the fraction of generated points within the radius of some reference
    point; recall: the fraction of reference points within the radius of some generated point.
    torch-fidelity's row-blocked routine applies exactly this rule (<= radius, self excluded through
    the (k+1)-th smallest distance), so it is reused; it keeps memory at batch_size rows of distances.
    """
    generated, reference = torch.as_tensor(generated).float(), torch.as_tensor(reference).float()
    for name, feats in (("generated", generated), ("reference", reference)):
        if feats.ndim != 2 or feats.shape[0] <= k:
            raise ValueError(f"precision/recall need more than {k} {name} feature rows; got shape "
                             f"{tuple(feats.shape)}")
    precision, recall = calculate_precision_recall_part(generated, reference, k, batch_size)
    return {"precision": float(precision), "recall": float(recall)}


def npz_array_header(path, key="arr_0"):
    """(shape, dtype) of array `key` in an npz, read from its header only (ADM's batches are GBs)."""
    try:
        with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
            shape, _, dtype = read_npy_header(f)
    except (zipfile.BadZipFile, KeyError, ValueError, OSError) as err:
        raise ValueError(f"{path}: not an npz holding {key} ({err})") from None
    return shape, dtype


def read_npy_header(f):
    """(shape, fortran_order, dtype) of the .npy stream f, leaving f at the first data byte."""
    major, _ = npformat.read_magic(f)
    read = npformat.read_array_header_1_0 if major == 1 else npformat.read_array_header_2_0
    return read(f)


def iter_npz_rows(path, key="arr_0", rows=500):
    """Stream array `key` of an (uncompressed or deflated) npz in blocks of `rows` leading rows."""
    shape, dtype = npz_array_header(path, key)
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
        read_npy_header(f)
        for start in range(0, shape[0], rows):
            n = min(rows, shape[0] - start)
            yield np.frombuffer(bytearray(f.read(n * row_bytes)), dtype=dtype).reshape((n,) + tuple(shape[1:]))


def check_ref_batch(path, img_size, channels):
    """One-line errors for a --ref_batch that cannot be compared with img_size x img_size x channels samples."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--ref_batch {path}: no such file (fetch ADM's ImageNet-256 batch with "
                                "`python -m util.io.download adm_in256_ref_batch`)")
    try:
        shape, dtype = npz_array_header(path)
    except ValueError as err:
        raise ValueError(f"--ref_batch {err}") from None
    want = (img_size, img_size, channels)
    if dtype != np.uint8 or len(shape) != 4 or tuple(shape[1:]) != want or shape[0] <= PR_NEIGHBOURS:
        raise ValueError(f"--ref_batch {path}: arr_0 must be uint8 [N, {', '.join(map(str, want))}] images with "
                         f"N > {PR_NEIGHBOURS}; got {dtype} {list(shape)}")
    return shape


def file_digest(path, chunk=1 << 24):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def reference_features_path(ref_path, inception_path):
    """Where the reference batch's pool features are cached: beside the batch, named after what they
    depend on (the batch file's size and time, and the Inception weights)."""
    stat = os.stat(ref_path)
    network = file_digest(inception_path) if inception_path else "torch-fidelity-inception-v3-compat"
    key = hashlib.sha256(f"{stat.st_size}:{stat.st_mtime_ns}:{network}".encode()).hexdigest()[:12]
    return f"{os.fspath(ref_path)}.pool-{key}.npy"


def reference_features(ref_path, extractor, device, inception_path=None):
    """Pool features [N, 2048] of the reference batch's arr_0 images, computed once and cached."""
    cache = reference_features_path(ref_path, inception_path)
    if os.path.isfile(cache):
        return torch.from_numpy(np.load(cache))
    shape = npz_array_header(ref_path)[0]
    pools = []
    for block in tqdm(iter_npz_rows(ref_path), total=-(-shape[0] // 500), desc="reference batch features"):
        pools.append(inception_features(extractor, block, device)[0].cpu())
    pool = torch.cat(pools)
    try:
        atomic_write(cache, lambda f: np.save(f, pool.numpy()))
        logger.info("cached the reference batch's Inception features in %s", cache)
    except OSError as err:  # a read-only data folder: the scores are still computed, only not cached
        logger.warning("could not cache the reference batch's Inception features in %s (%s); they are "
                       "computed again at each evaluation", cache, err)
    return pool

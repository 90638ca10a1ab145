"""FID and Inception Score with upstream torch-fidelity, plus an independent Fréchet distance.

Features come from torch-fidelity's own InceptionV3 (the TF-ported network ADM and MAR use): the
2048-d pool features for FID and the 1008-d unbiased logits for IS. FID compares the generated
features' Gaussian with reference statistics (`mu`, `sigma`) through torch-fidelity's
`fid_statistics_to_metric`. Without a weights path torch-fidelity's Inception file is downloaded
into the torch hub cache; either way it is read weights-only (util/inception_weights.py).
"""
import io
import os

import numpy as np
import scipy.linalg
import torch
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

from util.inception_weights import read_inception_state

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
                                "`python util/download.py adm_in256_stats`, or pass --fid_stats none)")
    with np.load(path) as data:
        if "mu" not in data or "sigma" not in data:
            raise ValueError(f"--fid_stats {path} must hold arrays 'mu' and 'sigma'; it has {list(data.keys())}")
        mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
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


def psd_sqrt(matrix):
    """Symmetric square root of a positive semi-definite matrix (tiny negative eigenvalues -> 0)."""
    w, v = scipy.linalg.eigh(matrix)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), independent of torch-fidelity's route.

    tr (S1 S2)^(1/2) = tr (R S2 R)^(1/2) with R = S1^(1/2): a symmetric eigenproblem, which stays
    accurate when S1 is singular (fewer samples than feature dimensions).
    """
    root = psd_sqrt(np.asarray(sigma1, dtype=np.float64))
    inner = root @ np.asarray(sigma2, dtype=np.float64) @ root
    tr_covmean = np.sqrt(np.clip(scipy.linalg.eigvalsh(inner), 0.0, None)).sum()
    diff = np.asarray(mu1, dtype=np.float64) - np.asarray(mu2, dtype=np.float64)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)

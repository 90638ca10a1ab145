"""Cheap stand-ins for the Inception network and FID, for tests of the evaluation plumbing.

The real network takes about a second per image on one CPU core and FID's 2048-d matrix square
root about ten seconds; these tests check where features go (order, processes, resumption,
caching), not that math, so a fixed random projection of the pixels stands in for the network
and FID's mean term for FID. test_eval.py checks the real network and FID.
"""
import textwrap

import numpy as np
import torch

from tests.conftest import REPO

POOL_DIM, LOGITS_DIM = 2048, 1008


def cheap_features(extractor, images, device, batch_size=100):
    """(pool [N, 2048], logits [N, 1008]) from a fixed random projection of the uint8 pixels."""
    x = torch.as_tensor(np.asarray(images)).reshape(len(images), -1).double() / 255.0
    gen = torch.Generator().manual_seed(x.shape[1])
    proj = torch.randn(x.shape[1], POOL_DIM + LOGITS_DIM, generator=gen, dtype=torch.float64)
    out = (x @ proj).float().to(device)
    return torch.tanh(out[:, :POOL_DIM]), out[:, POOL_DIM:]


def cheap_fid(features, reference):
    """||mean - mu||^2: FID without its covariance term."""
    return float(((features.double().mean(0).numpy() - reference["mu"]) ** 2).sum())


def use_cheap_inception(monkeypatch):
    from util.evaluation import metrics
    monkeypatch.setattr(metrics, "build_inception", lambda path=None, device="cpu": "cheap inception")
    monkeypatch.setattr(metrics, "inception_features", cheap_features)
    monkeypatch.setattr(metrics, "fid_from_features", cheap_fid)


LAUNCHER = textwrap.dedent(f"""
    import sys
    sys.path.insert(0, {str(REPO)!r})
    from tests.pipeline_fixtures import TINY, TINY_PRESET
    from tests.eval_fixtures import cheap_features, cheap_fid
    from models import PRESETS
    from util.evaluation import metrics
    PRESETS[TINY] = TINY_PRESET
    metrics.build_inception = lambda path=None, device="cpu": "cheap inception"
    metrics.inception_features = cheap_features
    metrics.fid_from_features = cheap_fid
    import main_mar
    main_mar.cli(sys.argv[1:])
""")


def write_cheap_launcher(folder):
    """A torchrun script: main_mar with the tiny model registered and the cheap Inception stand-in."""
    path = folder / "launch_cheap_eval.py"
    path.write_text(LAUNCHER)
    return path

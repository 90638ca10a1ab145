"""The InceptionV3 weights for FID/IS, read safely wherever they come from.

torch-fidelity would read its weights with full unpickling (`torch.load(weights_only=False)`, also
for the copy it caches under $TORCH_HOME/hub/checkpoints), so a file planted in a shared cache would
run code during evaluation. Here the file is found (`--inception_path`, else torch-fidelity's file
in the torch hub cache, downloaded there by each node's first process when missing), its SHA-256 checked against the
hash prefix its name carries (the torch hub convention: `name-<first hex digits of the SHA-256>.ext`),
and its tensors read weights-only.
"""
import hashlib
import logging
import os

import torch
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

from util import distributed
from util.io.safe_load import load_weights_only

logger = logging.getLogger(__name__)

INCEPTION_FILE = os.path.basename(URL_INCEPTION_V3)
# the file's known checksum: torch hub names carry the leading hex digits of the file's SHA-256
_NAMED_HASH = torch.hub.HASH_REGEX.search(INCEPTION_FILE)
INCEPTION_SHA256_PREFIX = _NAMED_HASH.group(1) if _NAMED_HASH else None


def cached_inception_file():
    """Where torch-fidelity keeps its download: the torch hub cache ($TORCH_HOME/hub/checkpoints)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_FILE)


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_inception_checksum(path):
    """torch-fidelity's file (known by its name) must have the SHA-256 its name announces; other files
    have no known checksum and are only read weights-only."""
    if os.path.basename(path) != INCEPTION_FILE or not INCEPTION_SHA256_PREFIX:
        return
    actual = sha256_of(path)
    if not actual.startswith(INCEPTION_SHA256_PREFIX):
        raise ValueError(f"Inception weights {path} fail their checksum (SHA-256 {actual[:16]}..., expected "
                         f"{INCEPTION_SHA256_PREFIX}...): the file is corrupt or was replaced; delete it so it is "
                         "downloaded again, or pass a trusted copy with --inception_path")


def download_inception(path):
    """torch-fidelity's weights into `path`: the first process of each node downloads them when missing
    (nodes may each have their own cache), the others wait; a failed download stops every rank with its
    message (rather than leaving the others waiting for it)."""
    error = None
    if distributed.get_local_rank() == 0 and not os.path.isfile(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        logger.info("downloading the Inception weights %s to %s", URL_INCEPTION_V3, path)
        try:
            torch.hub.download_url_to_file(URL_INCEPTION_V3, path, progress=True)
        except OSError as err:  # URLError, timeouts, refused connections: no network, one line
            error = (f"could not download the Inception weights {URL_INCEPTION_V3} into {path} ({err}); fetch "
                     "the file elsewhere and pass --inception_path")
    failed = [e for e in distributed.all_gather_object(error) if e]
    if failed:
        raise FileNotFoundError(failed[0])


def read_inception_state(weights_path=None):
    """The InceptionV3 state dict (tensors on the CPU), from `weights_path` or torch-fidelity's cached file."""
    if weights_path is None:
        path = cached_inception_file()
        download_inception(path)
        what = "Inception weights"
    else:
        path, what = os.fspath(weights_path), "--inception_path"
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--inception_path {path}: no such file")
    check_inception_checksum(path)
    state = load_weights_only(path, what)
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{what} {path} is not a state dict of InceptionV3 tensors")
    return state

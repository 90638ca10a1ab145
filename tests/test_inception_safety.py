"""The Inception weights are never unpickled fully: a planted file (in torch-fidelity's cache or
at --inception_path) cannot run code, torch-fidelity's file is checked against its checksum, and
good weights still reach the feature extractor unchanged."""
import io
import os

import pytest
import torch

from tests.pipeline_fixtures import random_inception_weights
from util.evaluation import inception_weights
from util.evaluation import metrics
from util.evaluation.inception_weights import INCEPTION_FILE, sha256_of


class Plant:
    """Full unpickling of this creates the marker file (a stand-in for any shell command)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def plant(path, marker):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(1), "payload": Plant(marker)}, path)
    return path


def assert_dangerous(path, marker):
    """The planted file does run code when unpickled fully (so the tests above it can fail)."""
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_planted_file_in_torch_fidelitys_cache_does_not_run(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    marker = tmp_path / "marker"
    cached = plant(tmp_path / "torch_home" / "hub" / "checkpoints" / INCEPTION_FILE, marker)
    with pytest.raises(ValueError) as err:
        metrics.build_inception()
    message = str(err.value)
    assert str(cached) in message and "checksum" in message and "\n" not in message, message
    assert not marker.exists()
    assert_dangerous(cached, marker)


def test_planted_inception_path_does_not_run(tmp_path):
    marker = tmp_path / "marker"
    path = plant(tmp_path / "inception.pth", marker)
    with pytest.raises(ValueError) as err:
        metrics.build_inception(path)
    message = str(err.value)
    assert message.startswith(f"--inception_path {path}") and "\n" not in message, message
    assert "weights-only loading refuses" in message and "weights_only" not in message, message
    assert not marker.exists()
    assert_dangerous(path, marker)


def test_cached_file_is_checked_and_good_weights_reach_the_extractor(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    cached = tmp_path / "torch_home" / "hub" / "checkpoints" / INCEPTION_FILE
    os.makedirs(cached.parent)
    random_inception_weights(cached)
    with pytest.raises(ValueError, match="fail their checksum"):  # random weights are not torch-fidelity's file
        metrics.build_inception()

    # with the checksum the file's name would announce, it is read, and only weights-only
    monkeypatch.setattr(inception_weights, "INCEPTION_SHA256_PREFIX", sha256_of(cached)[:8])
    real_load, calls = torch.load, []

    def spy(f, *args, **kwargs):
        calls.append((f, kwargs.get("weights_only")))
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    extractor = metrics.build_inception()
    assert calls and all(weights_only or isinstance(f, io.BytesIO) for f, weights_only in calls), calls
    expected = real_load(cached, weights_only=True)
    got = extractor.state_dict()
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


def test_each_node_downloads_and_a_failure_stops_every_rank(tmp_path, monkeypatch):
    """Nodes may each have their own torch hub cache: each node's first process downloads (global rank 0
    alone left the other nodes without the file). A failed download anywhere raises on every rank."""
    from util import distributed
    path = tmp_path / "hub" / INCEPTION_FILE
    fetched = []

    def fetch(url, dest, progress=True):
        fetched.append(dest)
        raise OSError("no network")
    monkeypatch.setattr(torch.hub, "download_url_to_file", fetch)
    gathered = []
    # global rank 8, the first process of the second node: it downloads, and every rank sees its error
    monkeypatch.setattr(distributed, "get_local_rank", lambda: 0)
    monkeypatch.setattr(distributed, "all_gather_object", lambda obj: gathered.append(obj) or [None, obj])
    with pytest.raises(FileNotFoundError, match=r"could not download the Inception weights .* \(no network\)"):
        inception_weights.download_inception(str(path))
    assert fetched == [str(path)] and gathered[0] is not None
    # its node's second process waits for it and raises the same error
    monkeypatch.setattr(distributed, "get_local_rank", lambda: 1)
    monkeypatch.setattr(distributed, "all_gather_object", lambda obj: [None, "could not download (rank 8)"])
    with pytest.raises(FileNotFoundError, match=r"rank 8"):
        inception_weights.download_inception(str(path))
    assert len(fetched) == 1


def test_a_file_that_is_not_all_tensors_is_refused_in_one_line(tmp_path):
    """A weights-only loadable dict with one entry that is not a tensor (or an empty dict, or a list of tensors) is
    not InceptionV3 weights: one line naming the file. Bug caught: any tensor entry taken as enough."""
    for name, content in (("mixed.pth", {"Conv2d_1a_3x3.conv.weight": torch.zeros(1), "step": 3}),
                          ("empty.pth", {}), ("list.pth", [torch.zeros(1)])):
        torch.save(content, tmp_path / name)
        with pytest.raises(ValueError, match=r"^--inception_path .* is not a state dict of InceptionV3 tensors$"):
            inception_weights.read_inception_state(tmp_path / name)
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.ones(2)}, tmp_path / "good.pth")
    assert torch.equal(inception_weights.read_inception_state(tmp_path / "good.pth")["Conv2d_1a_3x3.conv.weight"],
                       torch.ones(2))

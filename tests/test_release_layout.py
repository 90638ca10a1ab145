"""Our state dicts match the released checkpoints' layouts (shared/manifests) key for key."""
import pytest
import torch

from models import create_model
from tests.conftest import load_manifest


@pytest.fixture(scope="module")
def arinar_b():
    torch.manual_seed(0)
    return create_model("mar_base", num_gaussians=4)


def random_state_dict(manifest, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {e["key"]: torch.randn(e["shape"], generator=gen) for e in manifest["state_dict"]}


def test_parameter_counts(arinar_b):
    manifest = load_manifest("arinar_b_official.json")
    total = sum(p.numel() for p in arinar_b.parameters())
    inner = sum(p.numel() for p in arinar_b.arhead.parameters())
    assert total == manifest["total_params"] == 212_949_516
    assert inner == manifest["inner_head_params"] and total - inner == manifest["outer_params"]


def test_state_dict_matches_release_keys_shapes_and_order(arinar_b):
    manifest = load_manifest("arinar_b_official.json")
    ours = arinar_b.state_dict()
    assert [e["key"] for e in manifest["state_dict"]] == list(ours)
    for e in manifest["state_dict"]:
        assert list(ours[e["key"]].shape) == e["shape"], e["key"]


def test_release_state_dict_loads_strictly_and_round_trips(arinar_b):
    manifest = load_manifest("arinar_b_official.json")
    sd = random_state_dict(manifest)
    sd["arhead.blocks.0.attn.zero_k_bias"].zero_()
    arinar_b.load_state_dict(sd, strict=True)
    for key, value in arinar_b.state_dict().items():
        assert torch.equal(value, sd[key]), key


def test_mar_b_outer_layout_matches_enc_dec_depth_12():
    manifest = load_manifest("mar_b_official.json")
    outer = {e["key"]: e["shape"] for e in manifest["state_dict"] if not e["key"].startswith("diffloss.")}
    model = create_model("mar_base", enc_dec_depth=12)
    ours = {k: list(v.shape) for k, v in model.state_dict().items() if not k.startswith("arhead.")}
    assert ours == outer
    assert sum(p.numel() for n, p in model.named_parameters() if not n.startswith("arhead.")) == \
        manifest["outer_params"]

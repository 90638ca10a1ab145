"""Host syncs in the loops that run on a GPU: a tensor read back to Python (.item(), bool(), .tolist(),
nonzero()) makes the host wait for the GPU's queued work, so the GPU idles while the next kernels
are launched (on an H200 the masked-only loss path, with a host sync in its gather then, ran at half
the all-tokens path's speed). Training steps may make none; a sampling call a fixed few (checking its
labels, grouping the rows of an edit), never one per step."""
import collections

import pytest
import torch

from models import create_model
from models.families import mar

PRESETS = ["mar_tiny", "causal_tiny", "scalewise_tiny", "mvar_tiny"]
HEADS = ["arinar", "diffloss", "gmm"]
DIGITS = dict(tokenizer="pixel", img_size=8, vae_stride=1, vae_embed_dim=1, img_channels=1, patch_size=2,
              class_num=10)
SYNCS = ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero", "cpu", "numpy", "multinomial",
         "masked_select")
SYNC_FUNCTIONS = ("nonzero", "multinomial", "masked_select")  # the same as torch.* functions (boolean-mask
# indexing, x[mask], syncs inside C++ where no patch sees it)


def tiny(preset, head, **flags):
    torch.manual_seed(0)
    if head == "diffloss":
        flags = {"num_sampling_steps": 5, **flags}  # a syncing denoising step shows at 5 as at 100
    return create_model(preset, head=head, **DIGITS, **flags)


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("preset", PRESETS)
def test_training_step_makes_no_host_sync(monkeypatch, request, preset, head):
    """The mask ratio is a host-side draw by design (a float, before any device work), so it is fixed
    here and every other tensor read that would sync is refused (a nonzero() gather of the masked tokens,
    a count read back with int())."""
    model = tiny(preset, head, label_drop_prob=0.5).train()
    latents, labels = torch.randn(4, 1, 8, 8), torch.tensor([0, 3, 5, 9])
    monkeypatch.setattr(mar, "sample_mask_ratio", lambda *args, **kwargs: 0.8)
    request.getfixturevalue("no_host_sync")  # from here on a host sync raises
    model(latents, labels).backward()


def host_syncs(fn):
    """How many tensor reads that sync with the host fn() makes."""
    counts = collections.Counter()
    real = {(owner, name): getattr(owner, name) for owner, names in ((torch.Tensor, SYNCS), (torch, SYNC_FUNCTIONS))
            for name in names}
    for (owner, name), method in real.items():
        setattr(owner, name, lambda *a, _name=name, _method=method, **k: (counts.update([_name]), _method(*a, **k))[1])
    try:
        fn()
    finally:
        for (owner, name), method in real.items():
            setattr(owner, name, method)
    return sum(counts.values())


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("preset", PRESETS)
def test_sampling_syncs_a_fixed_few_times_per_call(preset, head):
    """At batch 1 a sync per step would leave the GPU idle at every step. Few per call, and as many at 8
    steps as at 4 (the scale-wise family steps through its scales: 4 here, so one per scale would show too)."""
    model = tiny(preset, head).eval()

    def run(steps):
        return lambda: model.sample_tokens(2, num_iter=steps, cfg=2.0, labels=torch.tensor([1, 2]))
    few, more = host_syncs(run(4)), host_syncs(run(8))
    assert few == more <= 4, (few, more)

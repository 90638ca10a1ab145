"""sample.py --edit with a causal or scale-wise (var, mvar) checkpoint: --box, --mask, --outpaint and --class
through the CLI, the kept pixels bit for bit (the model-level prefill and VAR-style editing are in
tests/test_causal.py and tests/test_scalewise.py)."""
import numpy as np
import pytest
import torch
from PIL import Image

from models import create_model
from tests.conftest import randomize_
from tests.test_editing import box_edit, digit_png, edit, grid_cells, outpaint  # noqa: F401  (the 12x8 grey image)

pytestmark = pytest.mark.usefixtures("one_thread")
# grey 8x8 images in 2x2 patches: a 4x4 grid of 4-feature tokens (scales 1, 2, 3, 4 for the scale-wise family)
TOKENS = dict(tokenizer="pixel", img_size=8, vae_stride=1, vae_embed_dim=1, img_channels=1, patch_size=2,
              class_num=10, inner_ar_width=16, inner_ar_heads=2)
FAMILIES = {"causal": ("causal_tiny", dict(width=32, num_heads=2, depth=2, attn_dropout=0.0, proj_dropout=0.0)),
            "var": ("scalewise_tiny", dict(width=32, num_heads=2, depth=2)),
            "mvar": ("mvar_tiny", dict(width=32, num_heads=2, depth=2, ssm_state=4))}


@pytest.fixture(scope="module", params=FAMILIES)
def family_run(request, tmp_path_factory):
    """A run folder holding a random-weight checkpoint of the family, stored with its config as main_mar.py does."""
    folder = tmp_path_factory.mktemp(request.param)
    preset, sizes = FAMILIES[request.param]
    torch.manual_seed(0)
    model = randomize_(create_model(preset, **TOKENS, **sizes), std=0.2, seed=1)
    args = {"dataset": "digits", "num_iter": 4, "cfg": 2.0, "temperature": 1.0, "cfg_schedule": "linear"}
    torch.save({"model": model.state_dict(), "model_ema": model.state_dict(), "config": model.config.to_dict(),
                "args": args, "epoch": 1}, folder / "checkpoint-last.pth")
    return folder


def kept_and_redrawn(results, crop, regenerate):
    for result in results:
        assert np.array_equal(result[~regenerate], crop[~regenerate])
    assert len({r[regenerate].tobytes() for r in results}) == len(results)  # each result its own draw


def test_box_edit_with_a_class(family_run, digit_png, tmp_path):  # noqa: F811
    image, crop = digit_png
    results, regenerate = box_edit(family_run, image, crop, tmp_path)
    kept_and_redrawn(results, crop, regenerate)


def test_mask_edit_unconditional(family_run, digit_png, tmp_path):  # noqa: F811
    image, crop = digit_png
    white = np.zeros((8, 12), dtype=np.uint8)
    white[0, 2], white[7, 9] = 255, 255  # the crop's top-left and bottom-right pixels -> tokens (0, 0), (3, 3)
    Image.fromarray(white).save(tmp_path / "mask.png")
    out = edit(family_run, tmp_path / "m.png", image, "--mask", tmp_path / "mask.png")
    _, mask, *results = grid_cells(out, 5, 8, 8)
    regenerate = mask > 0
    assert regenerate.sum() == 8 and regenerate[:2, :2].all() and regenerate[6:, 6:].all()
    kept_and_redrawn(results, crop, regenerate)


@pytest.mark.parametrize("direction, shape, where", [("left", (8, 12), np.s_[:, 4:]), ("down", (14, 8), np.s_[:8, :])])
def test_outpaint(family_run, digit_png, tmp_path, direction, shape, where):  # noqa: F811
    """4 or 6 new pixel rows/columns: the window slides, each later window keeps what the earlier drew."""
    image, crop = digit_png
    original, mask, results = outpaint(family_run, image, crop, tmp_path, direction, shape, where)
    kept_and_redrawn(results, original, mask == 255)

"""The scale-wise family through main_mar.py like the others: a killed run resumes bit for bit, with
either mixer (label drops and drop-path draw from the RNG streams the checkpoint restores)."""
import pytest

from tests.pipeline_fixtures import TINY_SCALEWISE, load, make_image_folder, run_main, run_main_killed_after_saves
from tests.pipeline_fixtures import tiny_flags
from tests.test_checkpoint import assert_same_optimizer, assert_same_tensors
from util.train.state import LAST

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("mixer", ["var", "mvar"])
def test_a_scalewise_run_resumes_bit_exactly(tmp_path, monkeypatch, mixer):
    data = make_image_folder(tmp_path / "data", per_class=3)  # 6 images / batch 2 = 3 steps per epoch
    flags = dict(model=TINY_SCALEWISE, buffer_size=None, mixer=mixer, drop_path=0.2, data_path=data, epochs=2,
                 save_every_steps=1)
    run_main(tiny_flags(output_dir=tmp_path / "whole", **flags))
    run_main_killed_after_saves(monkeypatch, 2, tiny_flags(output_dir=tmp_path / "broken", **flags))
    run_main(tiny_flags(output_dir=tmp_path / "broken", resume=tmp_path / "broken", **flags))
    whole, resumed = load(tmp_path / "whole" / LAST), load(tmp_path / "broken" / LAST)
    assert (whole["config"]["family"], whole["config"]["family_config"]["mixer"]) == ("scalewise", mixer)
    assert whole["train_state"]["global_step"] == resumed["train_state"]["global_step"] == 6
    assert_same_tensors(whole["model"], resumed["model"], "model")
    assert_same_tensors(whole["model_ema"], resumed["model_ema"], "model_ema")
    assert_same_optimizer(whole["optimizer"], resumed["optimizer"])

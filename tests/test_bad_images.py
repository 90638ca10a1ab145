"""Raw-image training with unreadable files (skipped, logged once, same batches on resume) and the
conversion of 16-bit, float, palette, alpha and CMYK images to 8-bit RGB."""
import io
import os

import numpy as np
import pytest
from PIL import Image

from tests.pipeline_fixtures import load, make_image_folder, run_main, run_main_killed_after_saves, tiny_flags
from tests.test_checkpoint import assert_same_optimizer, assert_same_tensors
from util.train.state import LAST
from util.data.datasets import ImageFolderADM, to_rgb

pytestmark = pytest.mark.usefixtures("one_thread")


def rgb_of(image):
    return np.asarray(to_rgb(image), dtype=np.int64)


# ----------------------------------------------------------------------------- modes
def test_sixteen_bit_png_scales_by_one_over_257(tmp_path):
    values = np.array([[0, 257, 1000, 4000], [32768, 40000, 65278, 65535]], dtype=np.uint16)
    expected = np.array([[0, 1, 4, 16], [128, 156, 254, 255]])  # round(v / 257), worked out by hand
    root = tmp_path / "data" / "train" / "class0"
    os.makedirs(root)
    big = np.kron(values, np.ones((4, 2), dtype=np.uint16))  # 8x8: loaded without resizing
    Image.fromarray(big).save(root / "grey16.png")
    assert Image.open(root / "grey16.png").mode.startswith("I")  # PIL really opens it as 16-bit
    image, _ = ImageFolderADM(str(tmp_path / "data" / "train"), img_size=8, flip=False).load(0)
    levels = np.rint((image.numpy() + 1) * 127.5).astype(np.int64)  # back from [-1, 1] to 0-255
    for channel in levels:
        np.testing.assert_array_equal(channel, np.kron(expected, np.ones((4, 2), dtype=np.int64)))


def test_other_modes_convert_to_the_right_rgb(tmp_path):
    ints = Image.fromarray(np.array([[0, 4000, 65535, 70000]], dtype=np.int32), "I")
    np.testing.assert_array_equal(rgb_of(ints)[0, :, 0], [0, 16, 255, 255])
    floats = Image.fromarray(np.array([[0.0, 12.4, 254.6, 300.0, -5.0]], dtype=np.float32), "F")
    np.testing.assert_array_equal(rgb_of(floats)[0, :, 1], [0, 12, 255, 255, 0])
    grey = Image.new("L", (1, 1), 77)
    np.testing.assert_array_equal(rgb_of(grey)[0, 0], [77, 77, 77])
    cmyk = Image.new("CMYK", (2, 1))
    cmyk.putpixel((0, 0), (0, 0, 0, 0))
    cmyk.putpixel((1, 0), (0, 255, 255, 0))
    np.testing.assert_array_equal(rgb_of(cmyk)[0], [[255, 255, 255], [255, 0, 0]])

    # alpha: transparent pixels show the white background, opaque ones their colour, half blends
    la = Image.fromarray(np.array([[[100, 0], [100, 255], [100, 128]]], dtype=np.uint8), "LA")
    blended = (100 * 128 + 255 * 127) / 255
    np.testing.assert_allclose(rgb_of(la)[0, :, 2], [255, 100, blended], atol=1)

    palette = Image.new("P", (2, 1))
    palette.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    palette.putpixel((1, 0), 1)
    buffer = io.BytesIO()
    palette.save(buffer, format="PNG", transparency=0)  # index 0 transparent, as such files come
    reopened = Image.open(io.BytesIO(buffer.getvalue()))
    assert reopened.mode == "P" and "transparency" in reopened.info
    np.testing.assert_array_equal(rgb_of(reopened)[0], [[255, 255, 255], [200, 100, 50]])


# ----------------------------------------------------------------------------- training with bad files
def add_bad_files(data):
    """A zero-byte, a corrupt and a truncated JPEG, and a (valid) 16-bit PNG; returns the bad paths."""
    class0, class1 = data / "train" / "class0", data / "train" / "class1"
    (class0 / "empty.jpg").write_bytes(b"")
    (class0 / "garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)
    rng = np.random.default_rng(1)
    buffer = io.BytesIO()
    Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(buffer, format="JPEG", quality=95)
    (class1 / "cut.jpg").write_bytes(buffer.getvalue()[:len(buffer.getvalue()) // 2])
    Image.fromarray((rng.random((12, 12)) * 65535).astype(np.uint16)).save(class1 / "deep.png")
    return [class0 / "empty.jpg", class0 / "garbage.jpg", class1 / "cut.jpg"]


def test_bad_images_are_skipped_logged_once_and_resume_bit_identically(tmp_path, monkeypatch):
    data = make_image_folder(tmp_path / "data", per_class=5)
    bad = add_bad_files(data)
    folder = ImageFolderADM(str(data / "train"), img_size=8)
    for path in bad:  # the fixture's files really are unreadable
        with pytest.raises(Exception):
            folder.load(folder.imgs.index((str(path), int(path.parent.name[-1]))))

    flags = dict(data_path=data, epochs=2, save_every_steps=1, label_drop_prob=0.5)  # 14 files: 7 steps/epoch
    run_main(tiny_flags(output_dir=tmp_path / "whole", **flags))
    log = (tmp_path / "whole" / "log.txt").read_text()
    skips = [line for line in log.splitlines() if "skipping unreadable image" in line]
    for path in bad:
        assert sum(str(path) in line for line in skips) == 1, log
    assert len(skips) == len(bad) and "deep.png" not in log
    whole = load(tmp_path / "whole" / LAST)
    assert whole["train_state"]["global_step"] == 14  # every batch full: bad files were replaced, not dropped

    run_main_killed_after_saves(monkeypatch, 10, tiny_flags(output_dir=tmp_path / "killed", **flags))  # epoch 1
    run_main(tiny_flags(output_dir=tmp_path / "killed", resume=tmp_path / "killed", **flags))
    resumed = load(tmp_path / "killed" / LAST)
    assert resumed["train_state"]["global_step"] == 14
    assert_same_tensors(whole["model"], resumed["model"], "model")
    assert_same_tensors(whole["model_ema"], resumed["model_ema"], "model_ema")
    assert_same_optimizer(whole["optimizer"], resumed["optimizer"])


def test_a_folder_without_any_readable_image_fails_in_one_line(tmp_path):
    root = tmp_path / "train" / "class0"
    os.makedirs(root)
    (root / "a.png").write_bytes(b"not a png")
    folder = ImageFolderADM(str(tmp_path / "train"), img_size=8)
    with pytest.raises(ValueError, match=r"--data_path .*none of its 1 images can be read"):
        folder[0]


def test_an_unreadable_last_image_is_replaced_by_the_first_in_folder_order(tmp_path):
    """The next readable image after the folder's last one is its first (bug: no wrap-around: the search runs
    past the end, and a data set whose last image is broken fails with "none of its images can be read")."""
    root = tmp_path / "train" / "class0"
    os.makedirs(root)
    pixels = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels[0]).save(root / "a.png")
    Image.fromarray(pixels[1]).save(root / "b.png")
    (root / "c.png").write_bytes(b"not a png")
    folder = ImageFolderADM(str(tmp_path / "train"), img_size=8, flip=False)
    image, label = folder[2]
    np.testing.assert_allclose(image.numpy(), pixels[0].transpose(2, 0, 1) / 127.5 - 1, atol=1e-6)
    assert label == 0 and folder.unreadable == {2}

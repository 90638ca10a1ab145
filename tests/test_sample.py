"""End-to-end tests for sample.py on CPU with tiny randomly initialised checkpoints."""
import argparse

import numpy as np
import pytest
import torch
from PIL import Image

import sample
from models import PRESETS
from models.vae import AutoencoderKL
from tests.conftest import model_from_flags, randomize_

# grey 8x8 images in 2x2 patches: 16 tokens of 4 features (stored the way main_mar.py stores args: a dict)
PIXEL_ARGS = {"model": "tiny_test", "img_size": 8, "patch_size": 2, "tokenizer": "pixel", "img_channels": 1,
              "vae_stride": 1, "vae_embed_dim": 1, "class_num": 10, "buffer_size": 4, "num_gaussians": 2,
              "inner_ar_width": 32, "enc_dec_depth": None, "vae_path": "/nonexistent/kl16.ckpt"}
# a release-style run: args pickled as a Namespace, no tokenizer entry (KL-16 implied)
KL16_ARGS = argparse.Namespace(model="tiny_test", img_size=32, vae_stride=16, patch_size=1, vae_embed_dim=16,
                               class_num=10, buffer_size=4, num_gaussians=4, inner_ar_width=32)


TINY_TEST = ("mar", {"width": 32, "num_heads": 4, "enc_dec_depth": 1})


@pytest.fixture(scope="module", autouse=True)
def tiny_model_name():
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(PRESETS, "tiny_test", TINY_TEST)
        yield


pytestmark = pytest.mark.usefixtures("one_thread")


def weights(args, seed):
    return randomize_(model_from_flags(args), std=0.2, seed=seed).state_dict()


@pytest.fixture(scope="module")
def pixel_run(tmp_path_factory):
    """A pixel-tokenizer checkpoint (args as a dict, like ours), plus copies holding only one weight set."""
    folder = tmp_path_factory.mktemp("pixel")
    live, ema = weights(PIXEL_ARGS, 1), weights(PIXEL_ARGS, 2)
    torch.save({"model": live, "model_ema": ema, "epoch": 3, "args": PIXEL_ARGS}, folder / "checkpoint-last.pth")
    torch.save({"model": ema, "args": PIXEL_ARGS}, folder / "ema_only.pth")
    torch.save({"model": live, "args": PIXEL_ARGS}, folder / "live_only.pth")
    return folder


@pytest.fixture(scope="module")
def kl16_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kl16")
    torch.save({"model": weights(KL16_ARGS, 3), "args": KL16_ARGS}, folder / "checkpoint-last.pth")
    torch.manual_seed(0)
    torch.save({"model": AutoencoderKL().state_dict()}, folder / "kl16.ckpt")
    return folder


def run(ckpt, out, *extra):
    argv = ["--ckpt", str(ckpt), "--out", str(out), "--classes", "1", "3", "7", "--num_per_class", "2",
            "--num_iter", "4", "--cfg", "1.0", "--device", "cpu", *map(str, extra)]
    return sample.main(argv)


def cells(grid, rows, cols, side, pad=sample.GRID_PADDING):
    """The images of a grid, row by row."""
    step = side + pad
    return [grid[pad + r * step:pad + r * step + side, pad + c * step:pad + c * step + side]
            for r in range(rows) for c in range(cols)]


def test_grid_and_individual_images(pixel_run, tmp_path):
    out = run(pixel_run, tmp_path / "grid.png", "--save_dir", tmp_path / "each")
    grid = np.asarray(Image.open(out))
    pad = sample.GRID_PADDING
    assert grid.shape == (pad + 3 * (8 + pad), pad + 2 * (8 + pad))  # grey
    names = sorted(p.name for p in (tmp_path / "each").iterdir())
    assert names == ["00000_class0001.png", "00001_class0001.png", "00002_class0003.png", "00003_class0003.png",
                     "00004_class0007.png", "00005_class0007.png"]
    for cell, name in zip(cells(grid, 3, 2, 8), names):
        assert np.array_equal(cell, np.asarray(Image.open(tmp_path / "each" / name)))
    assert len({cell.tobytes() for cell in cells(grid, 3, 2, 8)}) == 6  # samples differ


def test_each_grid_row_and_file_holds_the_class_it_names(pixel_run, tmp_path, monkeypatch):
    """Bug: the labels tiled (1 3 7 1 3 7) instead of class-major (1 1 3 3 7 7), so rows and the files' names
    mislabel the images. A stand-in generate draws each image as grey level 20 x its class."""
    calls = []

    def by_class(model, tokenizer, settings, labels, backend, progress=False):
        calls.append(labels.tolist())
        return np.stack([np.full((8, 8, 1), 20 * c, np.uint8) for c in labels.tolist()])

    monkeypatch.setattr(sample, "generate", by_class)
    out = run(pixel_run, tmp_path / "grid.png", "--batch_size", "4", "--save_dir", tmp_path / "each")
    assert calls == [[1, 1, 3, 3], [7, 7]]
    grid = np.asarray(Image.open(out))
    for i, cell in enumerate(cells(grid, 3, 2, 8)):
        assert (cell == 20 * [1, 3, 7][i // 2]).all(), i
    for path in (tmp_path / "each").iterdir():
        assert (np.asarray(Image.open(path)) == 20 * int(path.stem.split("class")[1])).all(), path.name


def test_same_seed_same_png_and_ema_by_default(pixel_run, tmp_path):
    guided = ("--classes", "2", "5", "--cfg", "3.0")
    first = run(pixel_run, tmp_path / "a.png", *guided, "--seed", "5").read_bytes()
    assert run(pixel_run, tmp_path / "b.png", *guided, "--seed", "5").read_bytes() == first
    assert run(pixel_run, tmp_path / "c.png", *guided, "--seed", "6").read_bytes() != first

    # the default uses model_ema: it matches a file whose only weights are those EMA values
    ema = run(pixel_run, tmp_path / "d.png").read_bytes()
    assert run(pixel_run / "ema_only.pth", tmp_path / "e.png").read_bytes() == ema
    live = run(pixel_run, tmp_path / "f.png", "--no_ema").read_bytes()
    assert live != ema
    assert run(pixel_run / "live_only.pth", tmp_path / "g.png").read_bytes() == live


def test_kl16_checkpoint_with_namespace_args(kl16_run, tmp_path):
    out = run(kl16_run, tmp_path / "kl.png", "--vae_path", kl16_run / "kl16.ckpt", "--classes", "4", "9",
              "--num_per_class", "1")
    pad = sample.GRID_PADDING
    assert np.asarray(Image.open(out)).shape == (pad + 2 * (32 + pad), pad + 1 * (32 + pad), 3)


@pytest.mark.parametrize("extra, message", [
    (["--classes", "3", "10"], "--classes 10 out of range: the model has 10 classes"),
    (["--num_gaussians", "3"], "--num_gaussians 3 contradicts"),
    (["--tokenizer", "pixel", "--vae_stride", "16"], "--vae_stride 16 contradicts"),
    (["--classes", "-1", "3"], "--classes -1 out of range: the model has 10 classes (0..9)"),
    (["--num_per_class", "0"], "--num_per_class must be >= 1"),
    (["--batch_size", "0"], "--batch_size must be >= 1; got 0"),
    (["--temperature", "0"], "--temperature must be > 0"),
])
def test_bad_config_is_a_one_line_error(pixel_run, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        run(pixel_run, tmp_path / "x.png", *extra)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error:" in error and message in error
    assert not (tmp_path / "x.png").exists()


def test_an_out_pil_cannot_write_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    """--out is written after all the sampling: a name without an image extension, or a folder, used to end
    the run with PIL's traceback then, and every image was lost."""
    monkeypatch.setattr(sample, "load_everything", lambda *a: pytest.fail("the model loaded before --out was checked"))
    (tmp_path / "samples").mkdir()
    for out, message in [(tmp_path / "noext", "it has no extension; use .png"),
                         (tmp_path / "grid.pgn", "its extension .pgn is not an image format PIL can write"),
                         (tmp_path / "samples", "is a directory: name the image file to write")]:
        with pytest.raises(SystemExit) as exit_info:
            run(tmp_path / "any.pth", out)
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert exit_info.value.code == 2 and f"error: --out {out}" in error and message in error, error


def test_missing_files_are_one_line_errors(kl16_run, tmp_path, capsys):
    with pytest.raises(SystemExit):
        run(tmp_path / "nowhere.pth", tmp_path / "x.png")
    assert "checkpoint not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run(kl16_run, tmp_path / "x.png", "--vae_path", tmp_path / "missing.ckpt")
    assert "python -m util.io.download kl16" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            run(kl16_run, tmp_path / "x.png", "--device", "cuda")
        assert "no CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize("flag, message", [("--compile", "--compile needs a CUDA device"),
                                           ("--cuda_graphs", "--cuda_graphs needs a CUDA device")])
def test_cuda_only_flags_on_a_cpu_are_one_line(pixel_run, tmp_path, capsys, flag, message):
    """On a CPU, --compile and --cuda_graphs stop before sampling with one line that says to drop the flag."""
    with pytest.raises(SystemExit) as exit_info:
        run(pixel_run, tmp_path / "x.png", flag)
    # (the last line: logging handlers left by other tests may write to stderr before it)
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2 and "error:" in error and message in error and f"drop {flag}" in error, error
    assert not (tmp_path / "x.png").exists()


def test_an_exported_safetensors_file_samples_its_ema_weights_without_a_warning(pixel_run, tmp_path, caplog):
    """The export holds the EMA weights and says so: sampling it gives the run's EMA images, no 'no EMA' warning."""
    from util.io.checkpoints import export_safetensors
    exported = export_safetensors(pixel_run, tmp_path / "ema.safetensors")
    with caplog.at_level("WARNING"):
        from_file = run(exported, tmp_path / "a.png").read_bytes()
    assert not [r for r in caplog.records if "EMA" in r.getMessage()]
    assert from_file == run(pixel_run, tmp_path / "b.png").read_bytes()


def test_precision_flag_reaches_the_backend(pixel_run, tmp_path, caplog):
    """--precision bf16 samples under bf16 autocast; without it a CPU run takes the device default, fp32
    (bug: the flag ignored for the device default)."""
    for extra, want in (((), "fp32"), (("--precision", "bf16"), "bf16")):
        caplog.clear()
        with caplog.at_level("INFO", logger="sampling"):
            run(pixel_run, tmp_path / "p.png", *extra)
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("sampling backend:")]
        assert len(lines) == 1 and f", precision {want} (" in lines[0], lines


def test_device_auto_is_cuda_when_present(monkeypatch):
    for available, want in ((True, "cuda"), (False, "cpu")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
        assert sample.resolve_device("auto") == torch.device(want)

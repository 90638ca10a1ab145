"""Latent caching (main_cache.py) and the cached-latent / image data sets."""
import errno
import json
import os
import shlex
import signal

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats

import main_cache
from engine_mar import to_latents
from models import TokenConfig
from models.tokenizer import KLTokenizer, PixelPosterior, PixelTokenizer
from util.io.tokenizers import build_tokenizer
from models.vae import LATENT_SCALE, AutoencoderKL
from tests.pipeline_fixtures import make_image_folder, parse
from util import flags
from util.data.datasets import CachedLatents, NpzLatentFolder, build_dataset, center_crop_arr, to_model_range
from util.io import files
from util.train import preemption
from util.train.preemption import SIGNALS


pytestmark = pytest.mark.usefixtures("one_thread")


def cache(data, out, *extra):
    args = main_cache.get_args_parser().parse_args(
        ["--data_path", str(data), "--cached_path", str(out), "--num_workers", "0", *map(str, extra)])
    main_cache.main(args)
    return out


def snapshot(folder):
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.iterdir())}


# ----------------------------------------------------------------------------- KL-16 caching
def test_kl16_cache_stores_both_posteriors_of_the_adm_crop(tmp_path):
    torch.manual_seed(0)
    vae = AutoencoderKL().eval()
    torch.save({"model": vae.state_dict()}, tmp_path / "kl16.ckpt")
    data = make_image_folder(tmp_path / "data", classes=1, per_class=2, broken=[(0, "zz_broken.png")])
    out = cache(data, tmp_path / "cache", "--img_size", "16", "--vae_path", tmp_path / "kl16.ckpt",
                "--batch_size", "2")
    index = json.loads((out / "index.json").read_text())
    assert index["num_cached"] == 2 and index["moments_shape"] == [32, 1, 1] and index["dtype"] == "fp16"
    stored = np.load(out / "shard-00000.npy")
    assert stored.dtype == np.float16 and stored.shape == (2, 2, 32, 1, 1)

    for i in range(2):
        with Image.open(data / "train" / "class0" / f"img{i}.png") as image:
            x = to_model_range(center_crop_arr(image.convert("RGB"), 16))[None]
        with torch.no_grad():
            plain, flipped = vae.encode(x).parameters[0], vae.encode(x.flip(-1)).parameters[0]
        np.testing.assert_allclose(stored[i, 0], plain.numpy(), rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(stored[i, 1], flipped.numpy(), rtol=2e-3, atol=2e-3)
    assert not np.allclose(stored[:, 0], stored[:, 1])


# ----------------------------------------------------------------------------- shards, resume, errors
def test_pixel_cache_skips_broken_images_and_resumes_by_shard(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", classes=2, per_class=4, broken=[(1, "img2b.png")])
    flags = ("--tokenizer", "pixel", "--img_size", "8", "--batch_size", "3", "--shard_size", "3")
    out = cache(data, tmp_path / "cache", *flags)
    broken = str(data / "train" / "class1" / "img2b.png")
    assert any("skipping unreadable image " + broken in line for line in capsys.readouterr().err.splitlines())
    index = json.loads((out / "index.json").read_text())
    assert index["num_images"] == 9 and index["num_cached"] == 8 and len(index["shards"]) == 3
    assert len(index["skipped"]) == 1 and broken in index["skipped"][0]
    # each shard's record says where it starts in ImageFolder order (bug caught: its last image's index)
    records = [json.loads((out / f"shard-{s:05d}.json").read_text()) for s in range(3)]
    assert [(r["shard"], r["first"], r["count"]) for r in records] == [(0, 0, 3), (1, 3, 3), (2, 6, 2)]
    assert np.load(out / "shard-00002-labels.npy").dtype == np.int64  # whatever the loader's label dtype

    dataset = CachedLatents(out, seed=0)
    assert len(dataset) == 8 and dataset.labels.tolist() == [0] * 4 + [1] * 4
    dataset[0]
    assert all(isinstance(a, np.memmap) for a in dataset.arrays)  # memory-mapped, not loaded

    # simulate a run killed while writing shard 1: only completed shards are kept
    before = snapshot(out)
    (out / "shard-00001.json").unlink()
    (out / "index.json").unlink()
    cache(data, out, *flags)
    after = snapshot(out)
    for name in ("shard-00000.npy", "shard-00000.json", "shard-00002.npy", "shard-00002-labels.npy"):
        assert after[name] == before[name], f"{name} was rewritten"
    assert after["shard-00001.npy"][1] == before["shard-00001.npy"][1]
    assert after["shard-00001.npy"][0] != before["shard-00001.npy"][0]
    assert json.loads((out / "index.json").read_text())["num_cached"] == 8


def test_cache_loader_workers_leave_stop_signals_to_the_main_process(tmp_path, monkeypatch):
    """A SIGTERM to the process group (scancel, `timeout`) must not kill the workers under the main process."""
    class Checked(main_cache.SkipUnreadable):
        def __getitem__(self, i):  # runs in the worker
            handlers = {s: signal.getsignal(s) for s in SIGNALS}
            # SIGTERM absorbed once (the loader's terminate() of a stuck worker still works), the others ignored
            assert handlers[signal.SIGTERM] is preemption._absorb_once and all(
                h == signal.SIG_IGN for s, h in handlers.items() if s != signal.SIGTERM), handlers
            return super().__getitem__(i)

    monkeypatch.setattr(main_cache, "SkipUnreadable", Checked)
    data = make_image_folder(tmp_path / "data", classes=1, per_class=2)
    out = cache(data, tmp_path / "cache", "--tokenizer", "pixel", "--img_size", "8", "--num_workers", "1")
    assert json.loads((out / "index.json").read_text())["num_cached"] == 2


def cache_cli(data, out, *extra):
    """main_cache.cli: its exit code, and its argv (the command its lines must name)."""
    argv = ["--data_path", str(data), "--cached_path", str(out), "--num_workers", "0", *map(str, extra)]
    with pytest.raises(SystemExit) as stop:
        main_cache.cli(argv)
    return stop.value.code, argv


def stop_during_shard(monkeypatch, shard, error):
    """encode_shard raising `error` when it is called for shard number `shard` (the earlier ones complete)."""
    real = main_cache.encode_shard

    def encode_shard(s, *args):
        if s == shard:
            raise error
        return real(s, *args)
    monkeypatch.setattr(main_cache, "encode_shard", encode_shard)


def test_ctrl_c_while_caching_is_one_line_and_the_same_command_continues(tmp_path, monkeypatch, capsys):
    """Ctrl-C during hours of caching ended in a traceback. Bugs caught: the line missing, the shards
    miscounted, another command named."""
    data = make_image_folder(tmp_path / "data", classes=1, per_class=5)
    flags = ("--tokenizer", "pixel", "--img_size", "8", "--shard_size", "2")  # 3 shards
    with monkeypatch.context() as patch:
        stop_during_shard(patch, 2, KeyboardInterrupt())
        code, argv = cache_cli(data, tmp_path / "cache", *flags)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "interrupted (Ctrl-C)" in line]
    assert code == preemption.INTERRUPT_EXIT and "Traceback" not in err and len(lines) == 1, err
    assert lines[0].endswith(f"interrupted (Ctrl-C): 2 complete shards kept in {tmp_path / 'cache'}; the same "
                             f"command continues with the others (exit code 130): python main_cache.py "
                             f"{shlex.join(argv)}")
    cache(data, tmp_path / "cache", *flags)
    assert json.loads((tmp_path / "cache" / "index.json").read_text())["num_cached"] == 5


def test_a_full_disk_while_caching_is_one_line_and_keeps_the_complete_shards(tmp_path, monkeypatch, capsys):
    """Bugs caught: an ENOSPC or a read-only folder ending in a traceback, and another OSError (a bug's, or a
    bad sector's) taken for one."""
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full")
    data = make_image_folder(tmp_path / "data", classes=1, per_class=3)
    flags = ("--tokenizer", "pixel", "--img_size", "8", "--shard_size", "2")
    out, real_mkstemp = tmp_path / "cache", files.tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):  # a real ENOSPC from the kernel once shard 0 is complete
        if (out / "shard-00000.json").exists():
            return os.open("/dev/full", os.O_WRONLY), os.path.join(dir, "never-created.tmp")
        return real_mkstemp(*args, dir=dir, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(files.tempfile, "mkstemp", mkstemp)
        code, _ = cache_cli(data, out, *flags)
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err
    assert f"could not write into --cached_path {out}: {os.strerror(errno.ENOSPC)} (ENOSPC); the complete shards " \
           "are kept: free space or fix the folder, then the same command continues" in err
    assert sorted(p.name for p in out.glob("*.json")) == ["shard-00000.json"]
    cache(data, out, *flags)
    assert json.loads((out / "index.json").read_text())["num_cached"] == 3

    with monkeypatch.context() as patch:  # any other OSError keeps its traceback
        stop_during_shard(patch, 0, OSError(errno.EIO, "bad sector"))
        with pytest.raises(OSError, match="bad sector"):
            main_cache.cli(["--data_path", str(data), "--cached_path", str(tmp_path / "other"), *flags])


def test_cache_refuses_a_folder_made_with_other_settings(tmp_path):
    data = make_image_folder(tmp_path / "data", classes=1, per_class=2)
    out = cache(data, tmp_path / "cache", "--tokenizer", "pixel", "--img_size", "8")
    before = snapshot(out)
    with pytest.raises(ValueError, match=r"--cached_path .*img_size"):
        cache(data, out, "--tokenizer", "pixel", "--img_size", "16")
    assert snapshot(out) == before


def test_cache_refuses_other_settings_on_a_partial_cache_and_for_any_setting(tmp_path):
    """Bugs: only index.json compared (a run killed before writing it, restarted with other flags, mixes two
    caches' shards), or only some settings compared (another --cache_dtype taken as the same cache)."""
    data = make_image_folder(tmp_path / "data", classes=1, per_class=3)
    flags = ("--tokenizer", "pixel", "--img_size", "8", "--shard_size", "2")
    out = cache(data, tmp_path / "cache", *flags)
    with pytest.raises(ValueError, match=r"--cached_path .*dtype: 'fp16' vs 'fp32'"):
        cache(data, out, *flags, "--cache_dtype", "fp32")
    (out / "index.json").unlink()  # as if killed after its shards, before the index
    before = snapshot(out)
    with pytest.raises(ValueError, match=r"shard-00000.json: img_size: 8 vs 16"):
        cache(data, out, "--tokenizer", "pixel", "--img_size", "16", "--shard_size", "2")
    assert snapshot(out) == before


def test_cache_dtype_fp32_keeps_full_precision(tmp_path):
    """Bug: the moments always narrowed to float16 whatever --cache_dtype says."""
    data = make_image_folder(tmp_path / "data", classes=1, per_class=1)
    out = cache(data, tmp_path / "cache", "--tokenizer", "pixel", "--img_size", "8", "--cache_dtype", "fp32")
    stored = np.load(out / "shard-00000.npy")
    assert stored.dtype == np.float32 and stored.shape == (1, 2, 3, 8, 8)
    with Image.open(data / "train" / "class0" / "img0.png") as image:
        crop = np.asarray(center_crop_arr(image.convert("RGB"), 8)).astype(np.float64)
    expected = crop.transpose(2, 0, 1) / 127.5 - 1.0  # the pixel tokenizer's posterior: pixels in [-1, 1]
    np.testing.assert_allclose(stored[0, 0], expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(stored[0, 1], expected[:, :, ::-1], rtol=0, atol=1e-6)
    assert (stored.astype(np.float16).astype(np.float32) != stored).any()  # float16 would have rounded these


def test_a_shard_of_only_unreadable_images_is_left_out_of_the_index(tmp_path):
    """Bug: an empty shard listed in index.json; its placeholder array (shape [0]) then stops training at start-up."""
    data = make_image_folder(tmp_path / "data", classes=1, per_class=2, broken=[(0, "zz_broken.png")])
    out = cache(data, tmp_path / "cache", "--tokenizer", "pixel", "--img_size", "8", "--shard_size", "1")
    index = json.loads((out / "index.json").read_text())
    assert index["num_images"] == 3 and index["num_cached"] == 2 and len(index["skipped"]) == 1
    assert [s["moments"] for s in index["shards"]] == ["shard-00000.npy", "shard-00001.npy"]
    dataset = CachedLatents(out, seed=0)
    assert len(dataset) == 2 and dataset.labels.tolist() == [0, 0]


def test_cached_shards_check_the_run_config(tmp_path):
    data = make_image_folder(tmp_path / "data", classes=1, per_class=2)
    out = cache(data, tmp_path / "cache", "--tokenizer", "pixel", "--img_size", "8")
    ok = parse(["--use_cached", "--cached_path", str(out), "--tokenizer", "pixel", "--img_size", "8",
                "--vae_stride", "1", "--vae_embed_dim", "3"])
    assert len(dataset_for(ok)) == 2
    other_size = parse(["--use_cached", "--cached_path", str(out), "--tokenizer", "pixel", "--img_size", "16",
                        "--vae_stride", "1", "--vae_embed_dim", "3"])
    with pytest.raises(ValueError, match="--img_size 8"):
        dataset_for(other_size)
    other_tokenizer = parse(["--use_cached", "--cached_path", str(out), "--tokenizer", "kl16", "--img_size", "8",
                             "--vae_stride", "1"])
    with pytest.raises(ValueError, match="--tokenizer"):
        dataset_for(other_tokenizer)


def dataset_for(args):
    """The training set main_mar.py builds for these flags (a new run: the flags give the token geometry)."""
    return build_dataset(args, flags.token_config(args))


# ----------------------------------------------------------------------------- reading back
def fake_cache(root, n=6, channels=4, side=2, seed=0):
    """A one-shard cache written by hand: original moments = +k, flipped = -k, for item k."""
    os.makedirs(root)
    moments = np.zeros((n, 2, channels, side, side), np.float16)
    for k in range(n):
        moments[k, 0], moments[k, 1] = k + 1, -(k + 1)
    np.save(root / "shard-00000.npy", moments)
    np.save(root / "shard-00000-labels.npy", np.arange(n) % 2)
    index = {"format": "arinar-latents-v1", "img_size": 32, "tokenizer": "kl16", "embed_dim": channels // 2,
             "classes": ["a", "b"], "shards": [{"moments": "shard-00000.npy", "labels": "shard-00000-labels.npy",
                                                 "count": n}]}
    (root / "index.json").write_text(json.dumps(index))
    return root


def test_flip_choice_is_a_fair_coin_fixed_by_seed_epoch_index(tmp_path):
    dataset = CachedLatents(fake_cache(tmp_path / "c"), seed=5)
    flips = []
    for epoch in range(300):
        dataset.set_epoch(epoch)
        for k in range(6):
            value = float(dataset[k][0][0, 0, 0])
            assert abs(value) == k + 1
            flips.append(value < 0)
    assert stats.binomtest(sum(flips), len(flips), 0.5).pvalue > 1e-3
    dataset.set_epoch(7)
    again = CachedLatents(tmp_path / "c", seed=5)
    again.set_epoch(7)
    assert all(torch.equal(dataset[k][0], again[k][0]) for k in range(6))


def test_posterior_sample_times_scale():
    """Cached KL moments -> posterior sample x 0.2325 with the right mean and std."""
    mean, logvar = torch.tensor(0.8), torch.tensor(-1.0)
    moments = torch.cat([torch.full((4000, 16, 1, 1), 0.8), torch.full((4000, 16, 1, 1), -1.0)], 1)
    torch.manual_seed(0)
    # posterior() and scale need no VAE weights, so the class itself serves as the tokenizer here
    latents = to_latents(KLTokenizer, moments, use_cached=True)
    assert latents.shape == (4000, 16, 1, 1)
    std = torch.exp(0.5 * logvar) * LATENT_SCALE
    z = (latents.mean() - mean * LATENT_SCALE) / (std / latents.numel() ** 0.5)
    assert abs(float(z)) < 4
    assert float(latents.std()) == pytest.approx(float(std), rel=0.02)
    assert stats.kstest(((latents.flatten() - mean * LATENT_SCALE) / std).numpy(), "norm").pvalue > 1e-3


def test_reads_mar_per_image_npz_cache(tmp_path):
    for c in ("n01", "n02"):
        os.makedirs(tmp_path / "mar" / c)
        for i in range(3):
            np.savez(tmp_path / "mar" / c / f"x{i}.JPEG.npz", moments=np.full((32, 16, 16), 1.0, np.float32),
                     moments_flip=np.full((32, 16, 16), -1.0, np.float32))
    args = parse(["--use_cached", "--cached_path", str(tmp_path / "mar"), "--img_size", "256"])
    dataset = dataset_for(args)
    assert isinstance(dataset, NpzLatentFolder) and len(dataset) == 6
    assert [dataset[i][1] for i in range(6)] == [0, 0, 0, 1, 1, 1]
    seen = set()
    for epoch in range(20):
        dataset.set_epoch(epoch)
        seen |= {float(dataset[i][0][0, 0, 0]) for i in range(6)}
    assert seen == {1.0, -1.0}
    with pytest.raises(ValueError, match="--img_size 256"):
        dataset_for(parse(["--use_cached", "--cached_path", str(tmp_path / "mar"), "--img_size", "128"]))


def test_pixel_dequantisation_is_uniform_within_the_bin():
    levels = 17
    values = torch.linspace(-1, 1, levels).repeat(2000)
    torch.manual_seed(0)
    sample = PixelPosterior(values, levels).sample()
    offset = (sample - values) / (2.0 / (levels - 1))  # in units of one bin, should be U(-0.5, 0.5)
    assert float(offset.min()) >= -0.5 and float(offset.max()) <= 0.5
    assert stats.kstest(offset.numpy() + 0.5, "uniform").pvalue > 1e-3
    assert torch.equal(PixelPosterior(values, None).sample(), values)


def test_pixel_levels_below_two_are_refused():
    """Bug: one grey level accepted; its bin width 2 / (levels - 1) divides by zero at the first sample."""
    with pytest.raises(ValueError, match="--pixel_levels must be >= 2"):
        PixelTokenizer(img_channels=1, levels=1)
    values = torch.tensor([-1.0, 1.0]).repeat(500)
    torch.manual_seed(0)
    offset = PixelTokenizer(img_channels=1, levels=2).posterior(values).sample() - values
    assert float(offset.abs().max()) <= 1.0 and float(offset.abs().max()) > 0.9  # two levels: bins of width 2
    assert torch.equal(PixelTokenizer(img_channels=1, levels=0).posterior(values).sample(), values)  # 0: no noise


def test_posteriors_of_float16_cached_moments_sample_in_float32():
    """Bug: posterior() keeping the cache's float16 (main_cache's default --cache_dtype): the KL posterior's
    std and noise, and the dequantisation noise, would be drawn in float16."""
    moments = torch.cat([torch.full((2, 4, 3, 3), 0.8), torch.full((2, 4, 3, 3), -1.0)], 1).half()
    torch.manual_seed(0)
    for posterior in (KLTokenizer.posterior(moments), PixelTokenizer(8, levels=17).posterior(moments)):
        sample = posterior.sample()
        assert posterior.mean.dtype == sample.dtype == torch.float32
        assert (sample.half().float() != sample).any()  # values float16 cannot hold


def test_tokenizer_bad_input():
    with pytest.raises(ValueError, match="--tokenizer pixel"):
        build_tokenizer(TokenConfig(img_channels=1), vae_path="x")
    with pytest.raises(FileNotFoundError, match="--vae_path"):
        build_tokenizer(TokenConfig(), vae_path="/nonexistent/kl16.ckpt")
    with pytest.raises(ValueError, match="--tokenizer"):
        TokenConfig(tokenizer="vq").validate()
    pixel = build_tokenizer(TokenConfig("pixel", img_size=16, vae_stride=1, vae_embed_dim=1, patch_size=4,
                                        img_channels=1), levels=17)
    assert (pixel.embed_dim, pixel.stride, pixel.scale, pixel.levels) == (1, 1, 1.0, 17)



def test_cache_settings_record_each_token_setting_from_its_own_field(tmp_path):
    """Literal settings of a KL-16-like token config whose stride, patch size and width all differ. Bug caught:
    the stride recorded from the patch size (a cache of another stride then passed the restart check)."""
    from types import SimpleNamespace
    tokens = SimpleNamespace(img_size=64, tokenizer="kl16", vae_embed_dim=16, vae_stride=8, patch_size=2)
    args = SimpleNamespace(cache_dtype="fp32", shard_size=5)
    assert main_cache.cache_settings(args, tokens, 11, ["a", "b"]) == {
        "format": "arinar-latents-v1", "img_size": 64, "tokenizer": "kl16", "embed_dim": 16, "stride": 8,
        "dtype": "fp32", "shard_size": 5, "num_images": 11, "classes": ["a", "b"]}


def test_ctrl_c_line_counts_zero_one_and_two_shards(tmp_path):
    """Bug caught: the plural for `> 1` ("0 complete shard kept")."""
    from types import SimpleNamespace
    args = SimpleNamespace(cached_path=str(tmp_path))
    for count, words in ((0, "0 complete shards"), (1, "1 complete shard kept"), (2, "2 complete shards")):
        if count:
            (tmp_path / f"shard-{count - 1:05d}.json").write_text("{}")
        assert main_cache.interrupted(args, ["--x"]).startswith(f"interrupted (Ctrl-C): {words}")


def test_shards_left_are_shared_evenly_by_the_ranks():
    """24 shards, the first 8 done (a resumed run), 16 ranks: each rank gets one of the 16 left; dealt
    round-robin before skipping the done ones, ranks 0-7 would get none and ranks 8-15 two each."""
    from main_cache import shards_of
    done = set(range(8))
    split = [shards_of(rank, 16, 24, done) for rank in range(16)]
    assert split == [[8 + rank] for rank in range(16)]
    assert shards_of(1, 3, 7, {2}) == [1, 5]  # left: 0 1 3 4 5 6 -> ranks 0: 0 4, 1: 1 5, 2: 3 6


# ----------------------------------------------------------------------------- ADM crop and multi-shard reads
def test_adm_crop_rounds_the_resized_side_and_box_halves_an_exactly_2x_image():
    """Bugs: int() for ADM's round() when resizing (a 23x17 image at 16 px is resized to 22x16, not 21x16, then
    cropped from x = 3), and `>` for ADM's `>=` (a 2x image is box-halved, not bicubic-downscaled)."""
    # a horizontal ramp 10 + 10 x: bicubic resizing keeps it linear, so output column j samples the source at
    # (j + 3 + 0.5) * 23 / 22 - 0.5 (j + 2 for a 21 px width: up to 9.6 levels off)
    ramp = np.repeat((10 + 10 * np.arange(23))[None, :, None], 17, 0).repeat(3, 2).astype(np.uint8)
    out = np.asarray(center_crop_arr(Image.fromarray(ramp), 16)).astype(np.float64)
    assert out.shape == (16, 16, 3)
    expected = 10 + 10 * ((np.arange(16) + 3 + 0.5) * 23 / 22 - 0.5)
    assert np.abs(out - expected[None, :, None]).max() <= 0.5 + 1e-9
    # 32x32 made of 2x2 constant blocks: box-halving gives the blocks back exactly
    small = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    big = np.kron(small, np.ones((2, 2, 1), np.uint8))
    assert np.array_equal(np.asarray(center_crop_arr(Image.fromarray(big), 16)), small)


def test_cached_items_of_later_shards_carry_their_own_moments_and_labels(tmp_path):
    """Bug: a later shard's item read with its shard-local index into the global labels (or the wrong shard)."""
    root = tmp_path / "c"
    os.makedirs(root)
    labels = [np.array([0, 1, 0]), np.array([1, 1, 0, 1])]
    shards, k = [], 0
    for i, shard_labels in enumerate(labels):
        moments = np.zeros((len(shard_labels), 2, 2, 1, 1), np.float16)
        for row in range(len(shard_labels)):
            k += 1
            moments[row, 0], moments[row, 1] = k, -k
        np.save(root / f"shard-{i:05d}.npy", moments)
        np.save(root / f"shard-{i:05d}-labels.npy", shard_labels)
        shards.append({"moments": f"shard-{i:05d}.npy", "labels": f"shard-{i:05d}-labels.npy",
                       "count": len(shard_labels)})
    (root / "index.json").write_text(json.dumps({"format": "arinar-latents-v1", "img_size": 16, "tokenizer": "kl16",
                                                 "embed_dim": 1, "classes": ["a", "b"], "shards": shards}))
    dataset = CachedLatents(root, seed=0)
    items = [dataset[i] for i in range(len(dataset))]
    assert [abs(float(m[0, 0, 0])) for m, _ in items] == [1, 2, 3, 4, 5, 6, 7]
    assert [label for _, label in items] == [0, 1, 0, 1, 1, 0, 1]


def test_image_folder_flips_left_right_by_a_coin_of_seed_epoch_index(tmp_path):
    """ADM's augmentation is a horizontal flip (bug: flip(-2), upside down) chosen per (seed, epoch, index)
    (bug: the epoch left out, so an image is flipped in every epoch or in none). The --dataset imagenet
    training set flips (bug: flip=False). Oracle: the PNG's pixels / 127.5 - 1, mirrored with numpy."""
    root = tmp_path / "data" / "train" / "c0"
    os.makedirs(root)
    pixels = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "a.png")
    original = pixels.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1
    dataset = build_dataset(parse(["--dataset", "imagenet", "--data_path", str(tmp_path / "data"), "--seed", "4"]),
                            TokenConfig(tokenizer="pixel", img_size=8, vae_stride=1, vae_embed_dim=3))
    flipped = []
    for epoch in range(40):
        dataset.set_epoch(epoch)
        image = dataset[0][0].numpy()
        if np.allclose(image, original, atol=1e-6):
            flipped.append(False)
        else:
            np.testing.assert_allclose(image, original[:, :, ::-1], atol=1e-6)
            flipped.append(True)
    assert 5 < sum(flipped) < 35


def test_cached_flips_change_from_epoch_to_epoch_for_every_item(tmp_path):
    """Bug: the cached data sets' coin drawn without the epoch (flip_coin(seed, 0, index)): each item would be
    flipped in every epoch or in none, which the pooled fair-coin counts above do not show. Over 40 epochs every
    item of both cache layouts must come both ways (shard: +k / -k; MAR's npz: moments +1 / moments_flip -1)."""
    shards = CachedLatents(fake_cache(tmp_path / "c"), seed=5)
    for c in ("n01", "n02"):
        os.makedirs(tmp_path / "mar" / c)
        for i in range(3):
            np.savez(tmp_path / "mar" / c / f"x{i}.npz", moments=np.ones((2, 1, 1), np.float32),
                     moments_flip=-np.ones((2, 1, 1), np.float32))
    npz = NpzLatentFolder(str(tmp_path / "mar"), seed=5)
    for dataset in (shards, npz):
        signs = np.zeros((40, 6))
        for epoch in range(40):
            dataset.set_epoch(epoch)
            signs[epoch] = [np.sign(float(dataset[k][0].flatten()[0])) for k in range(6)]
        assert ((signs == 1).any(0) & (signs == -1).any(0)).all(), signs


def test_pixel_tokenizer_encodes_with_its_dequantisation_noise():
    """encode() (training from images, not a cache) spreads each value over its grey-level bin like posterior().
    Bug: encode() left out the levels, so training on images saw bare discrete values."""
    values = torch.linspace(-1, 1, 5).repeat(400).view(1, 1, 40, 50)
    torch.manual_seed(0)
    offset = PixelTokenizer(img_channels=1, levels=5).encode(values).sample() - values
    assert float(offset.abs().max()) <= 0.25 and float(offset.abs().max()) > 0.24  # bins of width 2 / 4
    assert torch.equal(PixelTokenizer(img_channels=1, levels=0).encode(values).sample(), values)


def test_the_kl16_tokenizer_has_the_configured_latent_width(monkeypatch):
    """--vae_embed_dim sizes the VAE that is built and then loaded (a file of another width is refused by the
    strict load); KL-16 means stride 16. Bugs: KLTokenizer built with its default 16 channels whatever the config
    says; a stride of 8."""
    import util.io.tokenizers as tokenizers
    loaded = []
    monkeypatch.setattr(tokenizers, "load_vae_weights", lambda vae, path: loaded.append((vae, path)))
    tokenizer = build_tokenizer(TokenConfig(vae_embed_dim=8), vae_path="kl8.ckpt")
    assert tokenizer.embed_dim == 8 and loaded[0][1] == "kl8.ckpt"
    assert (tokenizer.stride, tokenizer.scale) == (16, 0.2325)  # sample.py refuses a model of another stride
    vae = loaded[0][0]
    assert vae is tokenizer.vae and vae.post_quant_conv.in_channels == 8 and vae.quant_conv.out_channels == 16

"""Evaluation: generation, PNG / ADM npz / metrics.json outputs, EMA weights, FID and IS via torch-fidelity."""
import json

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image
from threadpoolctl import threadpool_limits

from engine_mar import evaluate, generate, sampling_backend
from util.images import save_grid, to_uint8
from tests.conftest import randomize_
from tests.pipeline_fixtures import eval_setup, random_inception_weights, run_main, make_image_folder, tiny_flags
from util.evaluation import metrics
from util.flags import sampling_settings
from util.train.state import LAST


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def inception_path(tmp_path_factory):
    return random_inception_weights(tmp_path_factory.mktemp("inception") / "inception.pth")

# ----------------------------------------------------------------------------- the FID oracle
def psd_sqrt(matrix):
    """Symmetric square root of a positive semi-definite matrix (tiny negative eigenvalues -> 0)."""
    w, v = scipy.linalg.eigh(matrix)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), independent of torch-fidelity's route.

    tr (S1 S2)^(1/2) = tr (R S2 R)^(1/2) with R = S1^(1/2): a symmetric eigenproblem, which stays
    accurate when S1 is singular (fewer samples than feature dimensions).
    """
    root = psd_sqrt(np.asarray(sigma1, dtype=np.float64))
    inner = root @ np.asarray(sigma2, dtype=np.float64) @ root
    tr_covmean = np.sqrt(np.clip(scipy.linalg.eigvalsh(inner), 0.0, None)).sum()
    diff = np.asarray(mu1, dtype=np.float64) - np.asarray(mu2, dtype=np.float64)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def read_pngs(folder):
    return [np.asarray(Image.open(p)) for p in sorted((folder / "images").glob("*.png"))]


# ----------------------------------------------------------------------------- metric math
def test_fid_and_is_match_independent_computations():
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((400, 16)) @ rng.standard_normal((16, 16)) + 0.3
    ref_b = rng.standard_normal((16, 16))
    reference = {"mu": rng.standard_normal(16), "sigma": ref_b @ ref_b.T / 16 + 0.1 * np.eye(16)}
    fid = metrics.fid_from_features(torch.tensor(feats, dtype=torch.float32), reference)
    mu, sigma = feats.astype(np.float32).mean(0), np.cov(feats.astype(np.float32), rowvar=False)
    expected = frechet_distance(mu, sigma, reference["mu"], reference["sigma"])
    assert fid == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-6)

    logits = torch.tensor(rng.standard_normal((300, 20)) * 3)
    p = torch.softmax(logits.double(), 1).numpy()
    kl = (p * (np.log(p) - np.log(p.mean(0, keepdims=True)))).sum(1).mean()
    assert metrics.inception_score(logits, splits=1)["inception_score"] == pytest.approx(np.exp(kl), rel=1e-9)


def test_fid_stats_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="--fid_stats"):
        metrics.load_fid_stats(tmp_path / "missing.npz")
    np.savez(tmp_path / "bad.npz", mean=np.zeros(3))
    with pytest.raises(ValueError, match="'mu' and 'sigma'"):
        metrics.load_fid_stats(tmp_path / "bad.npz")
    # one of the two is as bad as neither (bug caught: only an npz with neither refused, then a KeyError)
    for only in ({"mu": np.zeros(3)}, {"sigma": np.eye(3)}):
        np.savez(tmp_path / "half.npz", **only)
        with pytest.raises(ValueError, match="must hold arrays 'mu' and 'sigma'; it has"):
            metrics.load_fid_stats(tmp_path / "half.npz")


def test_fid_stats_whose_sigma_does_not_match_mu_are_refused_at_load(tmp_path):
    """Statistics of another feature (mu of the 2048-d pool, sigma of the 1008-d logits) are refused when read,
    not after a whole sampling run. Bug: only sigma's rank checked, not its [D, D] shape."""
    path = tmp_path / "stats.npz"
    for sigma in (np.eye(2), np.ones((3, 2))):
        np.savez(path, mu=np.zeros(3), sigma=sigma)
        with pytest.raises(ValueError, match=r"mu must be \[D\] and sigma \[D, D\]"):
            metrics.load_fid_stats(path)
    np.savez(path, mu=np.zeros(3), sigma=np.eye(3))
    assert metrics.load_fid_stats(path)["sigma"].shape == (3, 3)


# ----------------------------------------------------------------------------- full evaluation
def test_evaluate_writes_everything_and_its_fid_matches_scipy(tmp_path, inception_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    rng = np.random.default_rng(1)
    ref_b = rng.standard_normal((2048, 64)) * 0.05
    np.savez(tmp_path / "stats.npz", mu=rng.standard_normal(2048) * 0.1, sigma=ref_b @ ref_b.T + 1e-3 * np.eye(2048))
    args, model, tokenizer, ema = eval_setup(tmp_path, fid_stats=tmp_path / "stats.npz",
                                             inception_path=inception_path, num_images=4)
    seen = []
    real = metrics.inception_features
    monkeypatch.setattr(metrics, "inception_features", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    writer = SummaryWriter(tmp_path / "tb")
    results = evaluate(model, tokenizer, ema, args, epoch=7, writer=writer)
    writer.close()

    (folder,) = (tmp_path / "run").glob("eval-ep7-iter4-cfg1-linear-temp1-n4-ema-*")
    assert results["folder"] == str(folder)
    saved = json.loads((folder / "metrics.json").read_text())
    assert saved["fid"] == results["fid"] and saved["sec_per_image"] > 0 and "inception_score" in saved
    images = read_pngs(folder)
    assert len(images) == 4 and images[0].shape == (8, 8, 3)
    with np.load(folder / "samples.npz") as npz:
        assert npz["arr_0"].dtype == np.uint8 and npz["arr_0"].shape == (4, 8, 8, 3)
        np.testing.assert_array_equal(npz["arr_0"], np.stack(images))
        assert npz["arr_1"].tolist() == [0, 0, 1, 1]
    # the FID torch-fidelity reported equals an independent Fréchet distance on the same features
    pool = torch.cat([s[0] for s in seen]).double().numpy()
    ref = metrics.load_fid_stats(tmp_path / "stats.npz")
    independent = frechet_distance(pool.mean(0), np.cov(pool, rowvar=False), ref["mu"], ref["sigma"])
    assert results["fid"] == pytest.approx(independent, rel=1e-4)
    tags = EventAccumulator(str(tmp_path / "tb")).Reload().Tags()["scalars"]
    assert "eval_cfg1_temp1_ema/fid" in tags and "eval_cfg1_temp1_ema/sec_per_image" in tags


def test_a_scalewise_evaluation_is_named_by_its_scales_not_by_the_unused_num_iter(tmp_path):
    """The scale-wise sampler takes one step a scale (4 on the 4x4 token grid) whatever --num_iter says, so
    --num_iter 16 and 3 draw the same images: one folder (named iter4), reused by the second run."""
    from tests.pipeline_fixtures import TINY_SCALEWISE
    args, model, tokenizer, ema = eval_setup(tmp_path, model=TINY_SCALEWISE, buffer_size=None, num_iter=16)
    first = evaluate(model, tokenizer, ema, args, epoch=0)
    assert "-iter4-" in first["folder"] and first["num_iter"] == 4 and first["images_drawn"] == 4
    args.num_iter = 3
    again = evaluate(model, tokenizer, ema, args, epoch=0)
    assert again["folder"] == first["folder"] and again["images_drawn"] == 0 and again["images_kept"] == 4


def test_evaluation_uses_ema_weights_and_restores_live_ones(tmp_path):
    args, model, tokenizer, ema = eval_setup(tmp_path)
    randomize_(model, std=0.3, seed=1)
    live = {k: v.clone() for k, v in model.state_dict().items()}
    shadow = eval_setup(tmp_path)[1]
    randomize_(shadow, std=0.3, seed=2)
    ema.load_state_dict(shadow.state_dict())
    first = evaluate(model, tokenizer, ema, args, epoch=0)
    assert all(torch.equal(v, live[k]) for k, v in model.state_dict().items())

    args.eval_weights = "live"
    live_shadow = evaluate(shadow, tokenizer, ema, args, epoch=0)  # the EMA's weights as live weights
    args.eval_weights = "ema"
    again = evaluate(model, tokenizer, ema, args, epoch=0)  # the same weights and settings: the same folder
    assert again["folder"] == first["folder"] and again["images_kept"] == 4 and again["images_drawn"] == 0
    ema_a = read_pngs(tmp_path / "run" / first["folder"])
    assert live_shadow["folder"] != first["folder"] and "-live-" in live_shadow["folder"]
    assert all(np.array_equal(a, b) for a, b in zip(ema_a, read_pngs(tmp_path / "run" / live_shadow["folder"])))
    args.eval_weights = "live"
    live_model = evaluate(model, tokenizer, ema, args, epoch=0)  # other weights: another folder
    assert live_model["folder"] not in (first["folder"], live_shadow["folder"]) and live_model["images_drawn"] == 4
    assert not all(np.array_equal(a, b) for a, b in zip(ema_a, read_pngs(tmp_path / "run" / live_model["folder"])))


def test_grey_images_grid_and_extra_score(tmp_path):
    args, model, tokenizer, ema = eval_setup(tmp_path, dataset="digits", class_num=3, num_images=6,
                                             eval_bsz=4, img_size=8)
    calls = []

    def score(images, labels):
        calls.append((images.shape, images.dtype, list(labels)))
        return {"digit_accuracy": 0.5}

    results = evaluate(model, tokenizer, ema, args, epoch=1, cfg=2.0, extra_score=score)
    assert calls == [((6, 8, 8, 1), np.uint8, [0, 0, 1, 1, 2, 2])]
    (folder,) = (tmp_path / "run").glob("eval-ep1-iter4-cfg2-linear-temp1-n6-ema-*")
    assert json.loads((folder / "metrics.json").read_text())["digit_accuracy"] == 0.5 and "fid" not in results
    with np.load(folder / "samples.npz") as npz:
        assert npz["arr_0"].shape == (6, 8, 8, 1)
    grid = np.asarray(Image.open(folder / "grid.png"))
    assert grid.shape == (2 + 3 * 34, 2 + 2 * 34)  # one row per class, 2 samples each (8px shown x4), 2px padding


def test_save_grid_places_images_row_major(tmp_path):
    images = np.stack([np.full((4, 5, 3), 10 * i, np.uint8) for i in range(5)])
    save_grid(images, 2, tmp_path / "g.png", pad=1)
    grid = np.asarray(Image.open(tmp_path / "g.png"))
    assert grid.shape == (1 + 3 * 5, 1 + 2 * 6, 3)
    for i in range(5):
        r, c = divmod(i, 2)
        assert (grid[1 + r * 5:1 + r * 5 + 4, 1 + c * 6:1 + c * 6 + 5] == 10 * i).all()
    gaps = np.ones(grid.shape[:2], bool)  # the padding and the empty sixth cell are black
    for i in range(5):
        r, c = divmod(i, 2)
        gaps[1 + r * 5:1 + r * 5 + 4, 1 + c * 6:1 + c * 6 + 5] = False
    assert (grid[gaps] == 0).all()


def test_save_grid_makes_the_folders_it_writes_into(tmp_path):
    """sample.py --out new/folder/grid.png is written after all the sampling: save_grid makes the folders (bug:
    a FileNotFoundError then, every image lost)."""
    path = save_grid(np.full((1, 2, 3, 1), 9, np.uint8), 1, tmp_path / "new" / "folder" / "g.png", pad=1)
    assert np.array_equal(np.asarray(Image.open(path)), np.pad(np.full((2, 3), 9, np.uint8), 1))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_sampling_from_a_fresh_model_is_finite(tmp_path, precision, monkeypatch):
    args, model, tokenizer, _ = eval_setup(tmp_path, precision=precision, cfg=3.0)
    tokens = []
    real = model.sample_tokens
    monkeypatch.setattr(model, "sample_tokens", lambda *a, **k: tokens.append(real(*a, **k)) or tokens[-1])
    torch.manual_seed(0)
    images = generate(model, tokenizer, sampling_settings(args), [0, 1, 1, 0], sampling_backend(model, args))
    assert images.dtype == np.uint8 and images.shape == (4, 8, 8, 3)
    assert torch.isfinite(tokens[0]).all() and tokens[0].dtype == torch.float32
    assert images.std() > 5  # not black, not constant


def test_main_evaluate_flag_loads_ema_from_a_checkpoint(tmp_path):
    """The evaluation is named by the checkpoint's last finished epoch, 1 of --epochs 2 (bug: epoch 0 whatever the
    checkpoint holds, which also files a later checkpoint's images under an earlier one's name)."""
    data = make_image_folder(tmp_path / "data", per_class=1)
    run_main(tiny_flags(data_path=data, output_dir=tmp_path / "run", epochs=2))
    run_main(tiny_flags(output_dir=tmp_path / "run", resume=tmp_path / "run" / LAST, evaluate=True,
                        num_images=2, eval_bsz=2, num_iter=2, fid_stats="none"))
    (folder,) = (tmp_path / "run").glob("eval-ep*-ema-*")
    assert folder.name.startswith("eval-ep1-")
    assert len(read_pngs(folder)) == 2 and json.loads((folder / "metrics.json").read_text())["epoch"] == 1


def test_uint8_conversion_rounds_and_clamps():
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0]).view(1, 1, 1, 5)
    assert to_uint8(x).ravel().tolist() == [0, 0, 128, 255, 255]


def test_uint8_conversion_moves_channels_last_without_transposing():
    """[N, C, H, W] -> [N, H, W, C] on a 3-channel 2x4 image whose every value is distinct (bug: H and W
    swapped, unseen on a square image or a 1x1 one)."""
    levels = np.arange(24).reshape(1, 3, 2, 4)  # level v <- v / 127.5 - 1
    images = to_uint8(torch.tensor(levels / 127.5 - 1, dtype=torch.float32))
    assert images.shape == (1, 2, 4, 3) and np.array_equal(images, levels.transpose(0, 2, 3, 1))

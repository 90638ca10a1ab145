"""Evaluation a researcher can trust: precision/recall, images independent of the process count,
resumable folders, cfg x temperature sweeps, and one-line errors for bad evaluation input."""
import csv
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import engine_mar
import main_mar
from engine_mar import evaluate
from tests.eval_fixtures import cheap_features, use_cheap_inception, write_cheap_launcher
from tests.pipeline_fixtures import eval_setup, make_image_folder, run, run_main, tiny_flags, torchrun
from tests.test_eval import one_thread  # noqa: F401 (autouse: one thread for torch and BLAS)
from util import images
from util.evaluation import eval_folder
from util.evaluation import metrics
from util.evaluation import sweep
from util.train.state import LAST


@pytest.fixture(scope="module")
def fid_stats(tmp_path_factory):
    rng = np.random.default_rng(1)
    path = tmp_path_factory.mktemp("stats") / "stats.npz"
    b = rng.standard_normal((2048, 64)) * 0.05
    np.savez(path, mu=rng.standard_normal(2048) * 0.1, sigma=b @ b.T + 1e-3 * np.eye(2048))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A one-epoch tiny checkpoint to evaluate."""
    tmp = tmp_path_factory.mktemp("trained")
    data = make_image_folder(tmp / "data", per_class=2)
    run_main(tiny_flags(data_path=data, output_dir=tmp / "run", epochs=1))
    return tmp / "run" / LAST


def png_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted((folder / "images").glob("*.png"))}


# ----------------------------------------------------------------------------- precision and recall
def naive_precision_recall(gen, ref, k=3):
    """The k-NN manifold rule written out point by point (ADM's evaluator's definition)."""
    def radii(x):
        return [sorted(np.linalg.norm(x - p, axis=1))[k] for p in x]  # index 0 is the point itself
    r_gen, r_ref = radii(gen), radii(ref)
    precision = np.mean([any(np.linalg.norm(g - q) <= r for q, r in zip(ref, r_ref)) for g in gen])
    recall = np.mean([any(np.linalg.norm(q - g) <= r for g, r in zip(gen, r_gen)) for q in ref])
    return precision, recall


def test_precision_recall_known_answers():
    ref = np.array([[0.0], [1.0], [2.0], [3.0], [4.0]])  # 3rd-neighbour radii 3, 2, 2, 2, 3
    # 2.5 and -2.9 fall inside a reference ball, 10 and 7.5 do not; the wide generated balls cover all of ref
    assert metrics.precision_recall([[2.5], [10.0], [-2.9], [7.5]], ref) == pytest.approx({"precision": 0.5, "recall": 1.0})
    # a tight generated cluster (radii 1.5, 1, 1, 1.5): reference 3 sits exactly on a radius (counts), 4 outside
    assert metrics.precision_recall([[0.0], [0.5], [1.0], [1.5]], ref) == pytest.approx({"precision": 1.0, "recall": 0.8})

    rng = np.random.default_rng(0)
    feats = rng.standard_normal((120, 8))
    assert metrics.precision_recall(feats, feats) == {"precision": 1.0, "recall": 1.0}
    assert metrics.precision_recall(feats + 100.0, feats) == {"precision": 0.0, "recall": 0.0}
    shifted = rng.standard_normal((90, 8)) * 1.3 + 1.2
    got = metrics.precision_recall(shifted, feats)
    expected = naive_precision_recall(shifted, feats)
    assert 0.05 < got["precision"] < 0.95 and 0.05 < got["recall"] < 0.95
    assert (got["precision"], got["recall"]) == pytest.approx(expected, abs=1e-6)  # fp32 means of 0/1
    with pytest.raises(ValueError, match="more than 3"):
        metrics.precision_recall(feats[:3], feats)


@pytest.mark.parametrize("arrays, message", [
    ({"arr_0": np.zeros((6, 8, 8, 3), np.float32)}, "uint8"),
    ({"arr_0": np.zeros((6, 8, 8), np.uint8)}, r"\[6, 8, 8\]"),
    ({"arr_0": np.zeros((6, 16, 16, 3), np.uint8)}, "uint8 \\[N, 8, 8, 3\\]"),
    ({"arr_0": np.zeros((3, 8, 8, 3), np.uint8)}, "N > 3"),
    ({"mu": np.zeros(3)}, "not an npz holding arr_0"),
])
def test_ref_batch_shape_and_dtype_are_checked_from_the_header(tmp_path, arrays, message):
    np.savez(tmp_path / "ref.npz", **arrays)
    with pytest.raises(ValueError, match="--ref_batch .*" + message) as err:
        metrics.check_ref_batch(tmp_path / "ref.npz", 8, 3)
    assert "\n" not in str(err.value)
    np.savez(tmp_path / "good.npz", arr_0=np.zeros((6, 8, 8, 3), np.uint8))
    assert metrics.check_ref_batch(tmp_path / "good.npz", 8, 3) == (6, 8, 8, 3)


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_npz_rows_stream_in_blocks(tmp_path, save):
    images = np.random.default_rng(3).integers(0, 256, (7, 4, 5, 3), dtype=np.uint8)
    save(tmp_path / "x.npz", arr_0=images)
    blocks = list(metrics.iter_npz_rows(tmp_path / "x.npz", rows=3))
    assert [len(b) for b in blocks] == [3, 3, 1] and np.array_equal(np.concatenate(blocks), images)
    # rows of a wider dtype are itemsize bytes per element (bug caught: row bytes counted as elements)
    wide = np.random.default_rng(4).standard_normal((5, 2, 3)).astype(np.float32)
    save(tmp_path / "w.npz", arr_0=wide)
    blocks = list(metrics.iter_npz_rows(tmp_path / "w.npz", rows=2))
    assert [len(b) for b in blocks] == [2, 2, 1] and np.array_equal(np.concatenate(blocks), wide)


def test_reference_features_are_computed_once_and_cached_per_inception(tmp_path, monkeypatch):
    images = np.random.default_rng(2).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "ref.npz", arr_0=images, arr_1=np.arange(5))
    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"weights a")  # only the file's bytes enter the cache name
    calls = []
    monkeypatch.setattr(metrics, "inception_features", lambda *a: calls.append(len(a[1])) or cheap_features(*a))
    first = metrics.reference_features(tmp_path / "ref.npz", "net", "cpu", weights)
    assert calls == [5] and torch.equal(first, cheap_features(None, images, "cpu")[0])
    (cached,) = tmp_path.glob("ref.npz.pool-*.npy")
    again = metrics.reference_features(tmp_path / "ref.npz", "net", "cpu", weights)
    assert calls == [5] and torch.equal(again, first)  # read back, not recomputed
    other = tmp_path / "other.pth"
    other.write_bytes(b"weights b")
    assert metrics.reference_features_path(tmp_path / "ref.npz", other) != str(cached)
    assert metrics.reference_features_path(tmp_path / "ref.npz", None) != str(cached)
    # a batch replaced by another of the same size (same bytes count, new mtime) gets new features
    stat = os.stat(tmp_path / "ref.npz")
    os.utime(tmp_path / "ref.npz", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert metrics.reference_features_path(tmp_path / "ref.npz", weights) != str(cached)


def test_reference_features_in_a_read_only_folder_are_computed_not_cached(tmp_path, monkeypatch, caplog):
    """Shared data folders are often read-only: the run used to stop there, after drawing every image."""
    images = np.random.default_rng(2).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "ref.npz", arr_0=images, arr_1=np.arange(5))
    monkeypatch.setattr(metrics, "inception_features", cheap_features)

    def refuse(path, write):
        raise PermissionError(13, "Permission denied", path)
    monkeypatch.setattr(metrics, "atomic_write", refuse)
    pool = metrics.reference_features(tmp_path / "ref.npz", "net", "cpu")
    assert torch.equal(pool, cheap_features(None, images, "cpu")[0])
    assert "could not cache the reference batch's Inception features" in caplog.text
    assert not list(tmp_path.glob("ref.npz.pool-*"))


# ----------------------------------------------------------------------------- resumable folders
def test_complete_pngs_are_read_back_and_others_refused(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    good = tmp_path / "good.png"
    images.save_png(image, str(good))
    assert np.array_equal(eval_folder.read_complete_png(good, (8, 8, 3)), image)
    assert not list(tmp_path.glob("*.tmp"))
    assert eval_folder.read_complete_png(good, (8, 8, 1)) is None  # RGB where grey is expected
    assert eval_folder.read_complete_png(good, (16, 16, 3)) is None
    grey = tmp_path / "grey.png"
    images.save_png(image[..., :1], str(grey))
    assert np.array_equal(eval_folder.read_complete_png(grey, (8, 8, 1)), image[..., :1])
    data = good.read_bytes()
    for name, content in (("cut.png", data[:len(data) // 2]), ("tail.png", data[:-12]), ("junk.png", b"x" * 40)):
        (tmp_path / name).write_bytes(content)
        assert eval_folder.read_complete_png(tmp_path / name, (8, 8, 3)) is None, name
    assert eval_folder.read_complete_png(tmp_path / "missing.png", (8, 8, 3)) is None


def ref_batch(path, n=8, seed=5):
    np.savez(path, arr_0=np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 3), dtype=np.uint8))
    return path


def test_a_killed_evaluation_resumes_its_folder_and_gives_the_same_metrics(tmp_path, fid_stats, monkeypatch):
    use_cheap_inception(monkeypatch)
    args, model, tokenizer, ema = eval_setup(tmp_path, num_images=6, eval_bsz=2, fid_stats=fid_stats,
                                             ref_batch=ref_batch(tmp_path / "ref.npz"))
    drawn = []
    real = engine_mar.generate
    monkeypatch.setattr(engine_mar, "generate", lambda *a, **k: drawn.append(list(a[3])) or real(*a, **k))
    first = evaluate(model, tokenizer, ema, args, epoch=2)
    folder = tmp_path / "run" / first["folder"]
    assert drawn == [[0, 0], [0, 1], [1, 1]] and first["images_drawn"] == 6
    assert {"fid", "inception_score", "precision", "recall"} <= set(first)
    before = png_bytes(folder)

    # a kill: one PNG never written, one cut short, a temporary file left behind
    (folder / "images" / "000001.png").unlink()
    cut = folder / "images" / "000004.png"
    cut.write_bytes(before["000004.png"][:30])
    (folder / "images" / "000005.png.tmp").write_bytes(b"partial")
    drawn.clear()
    again = evaluate(model, tokenizer, ema, args, epoch=2)
    assert again["folder"] == first["folder"]
    assert drawn == [[0, 0], [1, 1]]  # batches 0 and 2 drawn again, batch 1 kept
    assert again["images_drawn"] == 4 and again["images_kept"] == 2
    assert png_bytes(folder) == before  # each batch's own seed gives back the same images
    for key in ("fid", "inception_score", "inception_score_std", "precision", "recall"):
        assert again[key] == first[key], key
    with np.load(folder / "samples.npz") as npz:
        assert np.array_equal(npz["arr_0"], np.stack([images.load_png(folder / "images" / n) for n in before]))

    # a different setting never reuses the folder
    other = evaluate(model, tokenizer, ema, args, epoch=2, temperature=0.5)
    assert other["folder"] != first["folder"] and other["images_drawn"] == 6
    assert png_bytes(tmp_path / "run" / other["folder"]) != before
    # a folder of the same name whose settings.json differs is refused, not overwritten
    settings = json.loads((folder / "settings.json").read_text())
    (folder / "settings.json").write_text(json.dumps({**settings, "seed": 99}))
    with pytest.raises(ValueError, match="settings.json differs"):
        evaluate(model, tokenizer, ema, args, epoch=2)
    assert png_bytes(folder) == before


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("extra, message", [
    (["--cfg", "1.0", "0.5"], r"--cfg must be 1 \(no guidance\) or finite and at least 1 \+ 1e-06; got 0.5$"),
    (["--cfg", "1.0000000001"], r"--cfg must be 1 \(no guidance\) .*; got 1.0000000001$"),
    (["--temperature", "1.0", "0"], "--temperature must be > 0 and finite .*; got 0.0$"),
    (["--temperature", "-1"], "--temperature must be > 0"),
    (["--temperature", "inf"], "--temperature must be > 0 and finite"),
    (["--num_images", "5"], "--num_images 5 must be a multiple of --class_num 2"),
    (["--fid_stats", "STATS_WITHOUT_MU"], "--fid_stats .* must hold arrays 'mu' and 'sigma'"),
    (["--ref_batch", "FLOAT_BATCH"], "--ref_batch .*arr_0 must be uint8"),
    (["--ref_batch", "MISSING"], "--ref_batch .*no such file"),
])
def test_bad_evaluation_input_is_one_line_before_anything_is_written(tmp_path, extra, message):
    np.savez(tmp_path / "nomu.npz", mean=np.zeros(3))
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((6, 8, 8, 3), np.float32))
    names = {"STATS_WITHOUT_MU": tmp_path / "nomu.npz", "FLOAT_BATCH": tmp_path / "float.npz",
             "MISSING": tmp_path / "missing.npz"}
    extra = [str(names.get(e, e)) for e in extra]
    flags = tiny_flags(data_path=tmp_path / "no-data", output_dir=tmp_path / "run", online_eval=True,
                       num_images=4, fid_stats="none") + extra
    with pytest.raises((ValueError, FileNotFoundError), match=message) as err:
        run_main(flags)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- sweeps
def test_sweep_evaluates_every_point_once_and_tables_plots_and_ranks_them(tmp_path, trained, fid_stats, monkeypatch):
    use_cheap_inception(monkeypatch)
    built = []
    real = main_mar.sampling_backend
    monkeypatch.setattr(main_mar, "sampling_backend", lambda *a: built.append(1) or real(*a))
    out = tmp_path / "sweep"
    run_main(tiny_flags(output_dir=out, resume=trained, evaluate=True, num_images=2, eval_bsz=2, num_iter=2,
                        fid_stats=fid_stats) + ["--cfg", "1.0", "2.5", "--temperature", "1.0", "0.5"])
    assert len(built) == 1  # one sampling backend for the whole sweep
    with open(out / "sweep-ep0-iter2-n2-ema.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(float(r["cfg"]), float(r["temperature"])) for r in rows] == [(1.0, 1.0), (1.0, 0.5), (2.5, 1.0),
                                                                           (2.5, 0.5)]
    table = json.loads((out / "sweep-ep0-iter2-n2-ema.json").read_text())
    for row, saved in zip(rows, table):
        metrics_json = json.loads((tmp_path / "sweep" / saved["folder"] / "metrics.json").read_text())
        assert float(row["fid"]) == saved["fid"] == metrics_json["fid"]
        assert metrics_json["cfg"] == saved["cfg"] and metrics_json["temperature"] == saved["temperature"]
    assert len({r["fid"] for r in rows}) == 4  # four different image sets
    best = min(table, key=lambda r: r["fid"])
    log = (out / "log.txt").read_text()
    assert (f"sweep best point (lowest fid): cfg {best['cfg']:g}, temperature {best['temperature']:g}: "
            f"fid {best['fid']:.4f}") in log
    plot = Image.open(out / "sweep-ep0-iter2-n2-ema.png")
    assert plot.size[0] >= 2 * plot.size[1] > 400  # fid and IS panels side by side

    # a later run at another temperature adds its point to the same table
    run_main(tiny_flags(output_dir=out, resume=trained, evaluate=True, num_images=2, eval_bsz=2, num_iter=2,
                        fid_stats=fid_stats) + ["--cfg", "2.5", "--temperature", "0.8"])
    merged = json.loads((out / "sweep-ep0-iter2-n2-ema.json").read_text())
    assert merged[:4] == table and [(r["cfg"], r["temperature"]) for r in merged[4:]] == [(2.5, 0.8)]


def test_sweep_ranking_and_plot_work_with_whatever_metrics_exist(tmp_path):
    digits = [{"cfg": c, "temperature": t, "accuracy": a, "real_accuracy": 0.97, "sec_per_image": 0.1,
               "folder": f"f{c}{t}"} for c, t, a in [(1.0, 1.0, 0.4), (3.0, 1.0, 0.9), (1.0, 0.8, 0.5), (3.0, 0.8, 0.7)]]
    row, key, lower = sweep.best_point(digits)
    assert (row["cfg"], row["temperature"], key, lower) == (3.0, 1.0, "accuracy", False)
    assert sweep.metric_keys(digits) == ["accuracy"]  # real_accuracy: a reference line in its panel
    assert Image.open(sweep.plot(digits, tmp_path / "digits.png")).size[0] > 300
    with_fid = [dict(r, fid=f, inception_score_std=1.0) for r, f in zip(digits, [9.0, 3.0, 2.0, 5.0])]
    assert sweep.best_point(with_fid)[0]["folder"] == "f1.00.8"  # FID decides when present
    assert sweep.metric_keys(with_fid) == ["accuracy", "fid"]  # stds are not plotted
    again = dict(digits[1], accuracy=0.1)
    assert sweep.merge_rows(digits, [again]) == [digits[0], digits[2], digits[3], again]
    assert sweep.best_point([{"cfg": 1.0, "temperature": 1.0}]) is None
    assert sweep.plot([{"cfg": 1.0, "temperature": 1.0, "folder": "f"}], tmp_path / "none.png") is None


def test_sweep_best_point_skips_non_finite_scores_and_booleans_are_not_metrics():
    """A diverged point's FID is NaN (or inf): never the best. Bugs: the isfinite filter dropped (a NaN first row
    wins min()); bools (an int subclass) tabled and plotted as metrics."""
    rows = [{"cfg": c, "temperature": 1.0, "fid": f, "accuracy": a, "resumed": True}
            for c, f, a in [(1.0, float("nan"), float("nan")), (2.0, 3.0, 0.6), (3.0, 2.0, 0.7), (4.0, float("inf"), 0.5)]]
    row, key, lower = sweep.best_point(rows)
    assert (row["cfg"], key, lower) == (3.0, "fid", True)
    row, key, lower = sweep.best_point([dict(r, fid=None) for r in rows])
    assert (row["cfg"], key, lower) == (3.0, "accuracy", False)
    assert sweep.metric_keys(rows) == ["fid", "accuracy"]


def test_sweep_table_columns_start_with_the_point_then_every_key_first_seen(tmp_path):
    """Bug: the columns taken in the rows' own order (cfg and temperature buried mid-table)."""
    rows = [{"fid": 3.0, "temperature": 1.0, "cfg": 2.0}, {"cfg": 1.0, "temperature": 0.5, "fid": 4.0, "accuracy": 0.9}]
    csv_path, json_path = sweep.write_tables(rows, str(tmp_path / "sweep"))
    with open(csv_path) as f:
        lines = f.read().splitlines()
    assert lines == ["cfg,temperature,fid,accuracy", "2.0,1.0,3.0,", "1.0,0.5,4.0,0.9"]
    assert json.loads(open(json_path).read()) == rows


def test_sweep_plot_draws_each_temperature_in_cfg_order(tmp_path, monkeypatch):
    """A later sweep appends its points (merge_rows), so rows are not in cfg order. Bug: the points plotted in
    row order, a zig-zag line."""
    from matplotlib.figure import Figure
    figures = []
    savefig = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: figures.append(self) or savefig(self, *a, **k))
    rows = [{"cfg": c, "temperature": t, "fid": f} for c, t, f in [(3.0, 1.0, 5.0), (1.0, 1.0, 9.0), (2.0, 1.0, 4.0),
                                                                  (2.0, 0.5, 6.0), (1.0, 0.5, 8.0)]]
    sweep.plot(rows, tmp_path / "sweep.png")
    (ax,) = figures[0].axes
    lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}
    assert lines["temperature 1"] == ([1.0, 2.0, 3.0], [9.0, 4.0, 5.0])
    assert lines["temperature 0.5"] == ([1.0, 2.0], [8.0, 6.0])


# ----------------------------------------------------------------------------- processes
def test_one_and_two_processes_draw_identical_images_and_scores(tmp_path, trained, fid_stats, monkeypatch):
    """6 batches of 2: rank 0 draws batches 0, 2, 4, rank 1 batches 1, 3, 5; one process draws them all.
    IS (splits of a fixed shuffle) sees the order of the features: they must be gathered in image order."""
    flags = tiny_flags(resume=trained, evaluate=True, num_images=12, eval_bsz=2, num_iter=2, fid_stats=fid_stats,
                       ref_batch=ref_batch(tmp_path / "ref.npz"))
    use_cheap_inception(monkeypatch)
    run_main(flags + ["--output_dir", str(tmp_path / "one")])
    launcher = write_cheap_launcher(tmp_path)
    two = run(torchrun() + ["--standalone", "--nproc_per_node=2", str(launcher), *flags, "--output_dir",
                            str(tmp_path / "two")])
    assert two.returncode == 0, two.stderr[-3000:]
    (folder_one,) = (tmp_path / "one").glob("eval-*")
    (folder_two,) = (tmp_path / "two").glob("eval-*")
    assert folder_one.name == folder_two.name  # the process count is not a setting
    assert len(png_bytes(folder_one)) == 12 and png_bytes(folder_one) == png_bytes(folder_two)
    m1, m2 = (json.loads((f / "metrics.json").read_text()) for f in (folder_one, folder_two))
    assert (m1["world_size"], m2["world_size"]) == (1, 2)
    for key in ("fid", "inception_score", "precision", "recall"):
        assert m1[key] == m2[key], key



class ConfigStub:
    def to_dict(self):
        return {"model": "stub"}


def test_every_sampling_flag_is_a_setting_of_the_evaluation_folder():
    """A folder is reused only when its settings match: a sampling flag (util/flags.py's "sampling" group, or
    --precision, --seed, ...) left out of eval_folder.eval_settings would let a run with another value of it
    reuse images drawn with the old one. Each such flag, changed, must change the folder's name."""
    from tests.pipeline_fixtures import parse
    group = next(g for g in main_mar.get_args_parser()._action_groups if g.title == "sampling")
    dests = {a.dest for a in group._group_actions} | {"precision", "seed", "eval_bsz", "num_images", "vae_path",
                                                       "eval_weights"}
    assert {"num_iter", "cfg_list", "cfg_schedule", "temperature_list", "cfg_sampler", "compile"} <= dests

    def folder(args):
        settings = eval_folder.eval_settings(args, ConfigStub(), args.cfg_list[0], args.temperature_list[0], "sha",
                                             "cpu", num_iter=args.num_iter)
        return eval_folder.folder_name(0, settings)

    def flags():
        return main_mar.resolve_args(parse(tiny_flags(output_dir="run")))

    base = folder(flags())
    for dest in sorted(dests):
        args = flags()
        old = getattr(args, dest)
        if isinstance(old, list):
            new = [old[0] + 0.5]
        elif isinstance(old, bool) or old is None:
            new = not old
        elif isinstance(old, int):
            new = old + 1
        else:
            new = {"fp32": "bf16", "sir": "exact", "linear": "constant", "ema": "live"}.get(old, f"{old}x")
        setattr(args, dest, new)
        assert folder(args) != base, f"--{dest} does not change the evaluation folder's name"


# ----------------------------------------------------------------------------- metric plumbing, literal oracles
def test_inception_score_averages_ten_splits_of_the_fixed_shuffle():
    """The README's IS: 10 splits (after torch-fidelity's fixed shuffle, RandomState(2020)); mean and
    population std of exp(mean KL(p || split mean)). Bug: the splits argument ignored (one split)."""
    logits = np.random.default_rng(4).standard_normal((60, 7)) * 3
    shuffled = logits[np.random.RandomState(2020).permutation(60)]
    p = np.exp(shuffled - shuffled.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = []
    for part in np.split(p, 10):
        scores.append(np.exp((part * (np.log(part) - np.log(part.mean(0, keepdims=True)))).sum(1).mean()))
    got = metrics.inception_score(torch.tensor(logits))
    assert got["inception_score"] == pytest.approx(np.mean(scores), rel=1e-9)
    assert got["inception_score_std"] == pytest.approx(np.std(scores), rel=1e-9)


def test_inception_features_feed_the_network_nchw_uint8_images():
    """Bug: permute(0, 3, 2, 1) (every image transposed: same shape for square images, other features)."""
    seen = []

    def network(x):
        seen.append(x.clone())
        return x.float().mean((2, 3)), x.float().amax((2, 3))

    rgb = np.random.default_rng(0).integers(0, 256, (3, 4, 6, 3), dtype=np.uint8)
    pool, _ = metrics.inception_features(network, rgb, "cpu", batch_size=2)
    assert [tuple(x.shape) for x in seen] == [(2, 3, 4, 6), (1, 3, 4, 6)] and seen[0].dtype == torch.uint8
    assert np.array_equal(torch.cat(seen).numpy(), rgb.transpose(0, 3, 1, 2))
    assert torch.allclose(pool, torch.tensor(rgb.mean((1, 2)), dtype=torch.float32))
    seen.clear()
    metrics.inception_features(network, rgb[..., :1], "cpu")
    assert np.array_equal(seen[0].numpy(), np.repeat(rgb[..., :1].transpose(0, 3, 1, 2), 3, 1))


def test_a_replaced_reference_batch_gets_new_features_not_the_cached_ones(tmp_path, monkeypatch):
    """Bug: the cache key without the batch file's size and time, so a new ADM batch at the same path reuses
    the old batch's features."""
    monkeypatch.setattr(metrics, "inception_features", cheap_features)
    rng = np.random.default_rng(6)
    old, new = (rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8) for n in (5, 6))
    np.savez(tmp_path / "ref.npz", arr_0=old)
    assert torch.equal(metrics.reference_features(tmp_path / "ref.npz", "net", "cpu"),
                       cheap_features(None, old, "cpu")[0])
    np.savez(tmp_path / "ref.npz", arr_0=new)
    assert torch.equal(metrics.reference_features(tmp_path / "ref.npz", "net", "cpu"),
                       cheap_features(None, new, "cpu")[0])


def test_complete_png_check_compares_height_and_width_in_order(tmp_path):
    """Bug: image.size (W, H) compared with (H, W): a 4x6 PNG accepted as 6x4 (latent while samples are square)."""
    image = np.random.default_rng(1).integers(0, 256, (4, 6, 3), dtype=np.uint8)
    images.save_png(image, str(tmp_path / "wide.png"))
    assert np.array_equal(eval_folder.read_complete_png(tmp_path / "wide.png", (4, 6, 3)), image)
    assert eval_folder.read_complete_png(tmp_path / "wide.png", (6, 4, 3)) is None


def test_sweep_metrics_leave_out_every_setting_and_count_and_keep_a_lone_real_score():
    """An evaluate() row's settings and image counts are not scores; a real_<metric> without <metric> beside it is a
    score of its own. Bugs: images_kept plotted as a metric; any real_ key dropped, with or without its metric."""
    row = {"cfg": 2.0, "temperature": 1.0, "epoch": 3, "num_images": 8, "num_iter": 4, "world_size": 2,
           "sec_per_image": 0.5, "images_drawn": 10, "images_kept": 8, "fid": 3.0, "inception_score": 9.0,
           "inception_score_std": 0.1, "real_recall": 0.6, "folder": "f"}
    assert sweep.metric_keys([row]) == ["fid", "inception_score", "real_recall"]


def test_an_unreadable_sweep_table_is_not_taken_for_an_empty_one(tmp_path):
    """No table yet: no earlier points. A table that is not JSON stops the merge rather than being overwritten by
    this sweep's points alone. Bug: any read error taken for "no table" (an earlier sweep's points lost)."""
    assert sweep.read_rows(str(tmp_path / "none.json")) == []
    broken = tmp_path / "sweep.json"
    broken.write_text('[{"cfg": 1.0, "temperature": 1.0, "fid": 3')
    with pytest.raises(json.JSONDecodeError):
        sweep.read_rows(str(broken))

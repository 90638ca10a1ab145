"""util.hub: published folders (config.json + model.safetensors + README.md), the Hugging Face cache and the
push CLI. No network: Hub repos are pre-populated cache folders read with HF_HUB_OFFLINE=1, uploads go to a
fake HfApi."""
import argparse
import json
import os
import shlex
import shutil
import stat
from pathlib import Path
from unittest import mock

import httpx2
import pytest
import torch
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
from huggingface_hub.repocard import metadata_load
from safetensors import safe_open

import sample
from models import PRESETS, build
from tests.conftest import randomize_
from tests.pipeline_fixtures import TINY, TINY_PRESET, make_image_folder, run_main, tiny_flags
from tests.test_heads import HEAD_FLAGS, digits_mar
from tests.test_loading import Planted
from util.evaluation.eval_folder import SETTINGS, state_digest
from util.hub import __main__ as cli
from util.hub import from_pretrained, remote, save_pretrained
from util.io.checkpoints import read_checkpoint
from util.io.pretrained import CONFIG_NAME, FILES, WEIGHTS_NAME, check_destination, parse_repo_id, run_facts
from util.train.state import LAST, checkpoint_path

pytestmark = pytest.mark.usefixtures("one_thread")
ARGS = {"dataset": "digits", "epochs": 5, "batch_size": 8, "blr": 1e-4, "ema_rate": 0.999, "seed": 1}
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True)
def offline_hub(tmp_path, monkeypatch):
    """Every test runs offline against its own empty Hub cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    return tmp_path / "hf-cache"


def write_eval(run, name, state, scores, **settings):
    """An evaluation folder as engine_mar.evaluate writes it, of the weights `state`."""
    folder = run / name
    folder.mkdir()
    (folder / SETTINGS).write_text(json.dumps({"weights_sha256": state_digest(state), **settings}))
    (folder / "metrics.json").write_text(json.dumps({"epoch": 4, "num_images": 8, "cfg_schedule": "linear",
                                                     "weights": "ema", "folder": str(folder), **scores}))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A digits run folder: checkpoint-last.pth (config, live and EMA weights, args, epoch 4), an evaluation of
    its EMA weights and one of its live weights."""
    folder = tmp_path_factory.mktemp("run")
    model = digits_mar("arinar")
    live = randomize_(model, seed=1).state_dict()
    live = {k: v.clone() for k, v in live.items()}
    ema = randomize_(model, seed=2).state_dict()
    torch.save({"config": model.config.to_dict(), "model": live, "model_ema": ema, "epoch": 4, "args": ARGS,
                "optimizer": {}}, folder / LAST)
    write_eval(folder, "eval-ep4-ema", ema, {"fid": 12.345, "accuracy": 0.75, "cfg": 3.0, "temperature": 0.9,
                                              "num_iter": 4}, cfg_sampler="exact", seed=1, eval_bsz=2)
    write_eval(folder, "eval-ep4-live", live, {"fid": 99.9, "cfg": 7.0, "temperature": 1.0, "num_iter": 4})
    return folder


def push(*argv):
    return cli.main(["push", *map(str, argv)])


@pytest.fixture(scope="module")
def published(run, tmp_path_factory):
    folder = tmp_path_factory.mktemp("published") / "tiny"
    push("--ckpt", run, "--local_dir", folder)
    return folder


def draw(ckpt, out, *extra):
    argv = ["--ckpt", str(ckpt), "--out", str(out), "--classes", "1", "7", "--num_per_class", "2", "--num_iter", "4",
            "--cfg", "3.0", "--device", "cpu", *map(str, extra)]
    return sample.main(argv).read_bytes()


def to_cache(cache, repo_id, folder, commit=COMMIT):
    """Hugging Face's cache layout: models--USER--NAME/snapshots/<commit>/<files> and refs/main = <commit>."""
    storage = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = storage / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in FILES:
        shutil.copy(folder / name, snapshot / name)
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(commit)
    return snapshot


def one_line_error(capsys, call):
    with pytest.raises(SystemExit) as exit_info:
        call()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


# ----------------------------------------------------------------------------- round trips
def test_published_folder_draws_the_same_samples_as_the_run(run, published, tmp_path):
    assert sorted(os.listdir(published)) == sorted(FILES)
    original = draw(run, tmp_path / "run.png", "--seed", "3")
    assert draw(published, tmp_path / "folder.png", "--seed", "3") == original  # bit for bit
    assert draw(published / WEIGHTS_NAME, tmp_path / "file.png", "--seed", "3") == original
    assert draw(run, tmp_path / "live.png", "--seed", "3", "--no_ema") != original  # the EMA weights were published
    with safe_open(str(published / WEIGHTS_NAME), framework="pt") as f:
        meta = f.metadata()
    stored = json.loads(meta["arinar"])
    assert stored["weights"] == "ema" and stored["args"] == ARGS and stored["epoch"] == 4
    config = json.loads((published / CONFIG_NAME).read_text())
    assert config.pop("arinar_format") == 1 and config == read_checkpoint(run)["config"]


@pytest.mark.parametrize("head", sorted(HEAD_FLAGS))
def test_every_head_saves_and_loads_the_same_model(head, tmp_path):
    model = randomize_(digits_mar(head), std=0.1, seed=4).eval()
    save_pretrained(model, tmp_path / head)
    loaded = from_pretrained(tmp_path / head)
    assert loaded.config == model.config and not loaded.training
    assert list(loaded.state_dict()) == list(model.state_dict())
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    samples = []
    for m in (model, loaded):
        torch.manual_seed(0)
        samples.append(m.sample_tokens(2, num_iter=2, cfg=2.0, labels=torch.tensor([1, 2])))
    assert torch.equal(*samples)


# ----------------------------------------------------------------------------- the Hugging Face cache
def test_a_cached_hub_repo_loads_offline(run, published, offline_hub, tmp_path, monkeypatch):
    to_cache(offline_hub, "someone/tiny-arinar", published)
    calls, real = [], remote.hf_hub_download
    monkeypatch.setattr(remote, "hf_hub_download", lambda **kw: calls.append(kw) or real(**kw))
    original = draw(run, tmp_path / "run.png")
    assert draw("someone/tiny-arinar", tmp_path / "hub.png") == original
    assert draw(f"someone/tiny-arinar@{COMMIT}", tmp_path / "rev.png") == original
    # HF_HUB_OFFLINE and HF_HUB_CACHE as set now (huggingface_hub reads them at import): the cache alone
    assert calls and all(c["local_files_only"] is True and c["cache_dir"] == offline_hub for c in calls)
    assert [c["filename"] for c in calls[:2]] == [CONFIG_NAME, WEIGHTS_NAME] and calls[1]["revision"] == COMMIT
    assert cli.main(["download", "someone/tiny-arinar"]) == offline_hub / "models--someone--tiny-arinar" / \
        "snapshots" / COMMIT
    assert checkpoint_path("someone/tiny-arinar") == str(offline_hub / "models--someone--tiny-arinar" / "snapshots"
                                                         / COMMIT)  # main_mar.py --resume

    # a local path that exists wins over the repo id
    monkeypatch.chdir(tmp_path)
    other = randomize_(digits_mar("arinar"), seed=9)
    save_pretrained(other, tmp_path / "someone" / "tiny-arinar")
    local = from_pretrained("someone/tiny-arinar")
    assert torch.equal(local.mask_token, other.mask_token)
    assert not torch.equal(local.mask_token, from_pretrained(published).mask_token)


def test_offline_without_a_cached_copy_is_one_line(offline_hub, tmp_path, capsys):
    err = one_line_error(capsys, lambda: draw("someone/absent", tmp_path / "x.png"))
    assert "HF_HUB_OFFLINE=1 is set" in err and str(offline_hub / "models--someone--absent") in err
    assert not (tmp_path / "x.png").exists()
    with pytest.raises(FileNotFoundError, match=r"^--resume someone/absent: .*HF_HUB_OFFLINE"):
        checkpoint_path("someone/absent", tmp_path / "run")
    err = one_line_error(capsys, lambda: cli.main(["download", "someone/absent"]))
    assert "HF_HUB_OFFLINE" in err
    # a path that is not a repo id keeps its own message (and never reaches the Hub)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        read_checkpoint(tmp_path / "runs" / "exp" / LAST)


def test_no_network_without_a_cached_copy_is_one_line(offline_hub, monkeypatch):
    """What huggingface_hub raises when the Hub cannot be reached, as one line naming HF_HUB_OFFLINE and the cache."""
    monkeypatch.delenv("HF_HUB_OFFLINE")
    calls = []

    def unreachable(**kwargs):
        calls.append(kwargs)
        raise LocalEntryNotFoundError("cannot find the requested files") from ConnectionError("Connection refused")

    monkeypatch.setattr(remote, "hf_hub_download", unreachable)
    with pytest.raises(FileNotFoundError) as err:
        read_checkpoint("someone/absent")
    assert "Connection refused" in str(err.value) and "HF_HUB_OFFLINE=1" in str(err.value)
    assert str(offline_hub / "models--someone--absent") in str(err.value) and "\n" not in str(err.value)
    assert calls[0]["local_files_only"] is False and calls[0]["cache_dir"] == offline_hub


def test_the_cache_folder_follows_hf_hub_cache_then_hf_home(tmp_path, monkeypatch):
    """huggingface_hub's rule: HF_HUB_CACHE, else HF_HOME/hub (bug: HF_HOME itself, a cache no other HF tool
    reads or fills)."""
    assert remote.cache_dir() == tmp_path / "hf-cache"
    monkeypatch.delenv("HF_HUB_CACHE")
    assert remote.cache_dir() == tmp_path / "hf-home" / "hub"


def test_repo_ids_and_local_paths():
    assert parse_repo_id("someone/tiny-arinar") == ("someone/tiny-arinar", None)
    assert parse_repo_id("someone/tiny@v1.0") == ("someone/tiny", "v1.0")
    for path in ("runs/exp/checkpoint-last.pth", "run/checkpoint-last.pth", "model.safetensors", "/abs/x",
                 "./a/b", "a/b/c", "a--b/c", "user/name.safetensors"):
        assert parse_repo_id(path) is None, path


# ----------------------------------------------------------------------------- bad files
def _pickle_as_safetensors(folder, marker):
    torch.save({"w": torch.zeros(1), "payload": Planted(marker)}, folder / WEIGHTS_NAME)


def _truncate(folder, marker):
    data = (folder / WEIGHTS_NAME).read_bytes()
    (folder / WEIGHTS_NAME).write_bytes(data[:len(data) // 2])


def _edit_config(**changes):
    def edit(folder, marker):
        config = json.loads((folder / CONFIG_NAME).read_text())
        for key, value in changes.items():
            part, _, name = key.rpartition(".")
            (config[part] if part else config)[name] = value
        (folder / CONFIG_NAME).write_text(json.dumps(config))
    return edit


def _pickled_weights_only(folder, marker):
    (folder / WEIGHTS_NAME).rename(folder / "pytorch_model.bin")


@pytest.mark.parametrize("spoil, message", [
    (_pickle_as_safetensors, f"{WEIGHTS_NAME} is not a readable safetensors file"),
    (_truncate, f"{WEIGHTS_NAME} is not a readable safetensors file"),
    (_pickled_weights_only, f"has {CONFIG_NAME} but no {WEIGHTS_NAME} (found pytorch_model.bin: pickled weights "
                            "are never loaded)"),
    (_edit_config(bogus=1), f"{CONFIG_NAME}: unknown model config entries bogus"),
    (_edit_config(**{"head_config.width": "wide"}), "width must be int; got 'wide'"),
    (_edit_config(class_num=2.5), "class_num must be an integer"),
    (_edit_config(arinar_format=2), "arinar_format 2 is not one this code reads"),
    (_edit_config(arinar_format=0), "arinar_format 0 is not one this code reads"),  # versions start at 1
    (_edit_config(arinar_format=True), "arinar_format True is not one this code reads"),  # a bool is no version
    (lambda folder, marker: (folder / CONFIG_NAME).write_text("{not json"), f"{CONFIG_NAME} is not valid JSON"),
    (_edit_config(**{"head_config.num_gaussians": 3}),
     f"{WEIGHTS_NAME} does not fit the model its {CONFIG_NAME} describes: 2 with another shape (arhead.head.weight "
     "[12, 32] vs model [9, 32], "),
    (_edit_config(class_num=7), "The weights say: --class_num 10"),
])
def test_spoilt_folders_are_refused_in_one_line(published, tmp_path, capsys, spoil, message):
    folder = tmp_path / "copy"
    shutil.copytree(published, folder)
    marker = tmp_path / "planted"
    spoil(folder, marker)
    err = one_line_error(capsys, lambda: draw(folder, tmp_path / "x.png"))
    assert message in err and str(folder) in err, err
    assert not marker.exists()  # nothing was unpickled
    assert not (tmp_path / "x.png").exists()


# ----------------------------------------------------------------------------- the model card
def test_the_model_card_holds_the_facts(run, published, tmp_path):
    card = (published / "README.md").read_text()
    meta = metadata_load(published / "README.md")  # the Hub's own parser
    assert meta["library_name"] == "arinar" and meta["license"] == "mit"
    assert meta["pipeline_tag"] == "unconditional-image-generation"
    assert {"family-mar", "head-arinar", "arxiv:2503.02883"} <= set(meta["tags"])  # the Hub links the paper
    model = build(read_checkpoint(run)["config"])
    assert f"| parameters | {sum(p.numel() for p in model.parameters()):,} " in card
    assert "| family | mar (preset mar_base) |" in card and "| per-token head | arinar |" in card
    assert "EMA" in card.split("| model.safetensors |")[1].splitlines()[0]
    assert "| data set | digits |" in card and "| epochs completed | 5 |" in card
    assert "12.35" in card and "0.75" in card  # FID and accuracy of the published (EMA) weights
    assert "99.9" not in card  # the live weights' evaluation is not theirs

    # the card's sampling command runs and draws what the run draws at the evaluated settings
    (command,) = [line for line in card.splitlines() if line.startswith("python sample.py")]
    argv = shlex.split(command)[2:]
    assert argv[argv.index("--ckpt") + 1] == str(published)
    argv[argv.index("--out") + 1] = str(tmp_path / "card.png")
    card_png = sample.main(argv + ["--device", "cpu"]).read_bytes()
    same = ["--classes", "0", "1", "2", "3", "--num_per_class", "4", "--cfg", "3", "--temperature", "0.9",
            "--num_iter", "4", "--cfg_sampler", "exact", "--seed", "0", "--device", "cpu"]
    assert sample.main(["--ckpt", str(run), "--out", str(tmp_path / "run.png"), *same]).read_bytes() == card_png


@pytest.mark.parametrize("args, shown, left_out", [
    ({"dataset": "digits", "data_path": "./data/imagenet"}, [], ["data path", "cached latents"]),
    ({"dataset": "imagenet", "data_path": "/data/in1k"}, ["| data path | /data/in1k |"], ["cached latents"]),
    ({"dataset": "imagenet", "data_path": "./data/imagenet", "use_cached": True, "cached_path": "/cache"},
     ["| cached latents | /cache |"], ["data path"]),
])
def test_the_model_card_names_only_the_data_the_run_read(args, shown, left_out):
    """The digits demo reads no --data_path (its default ./data/imagenet would read as the training data), and
    --use_cached reads --cached_path, not --data_path."""
    from util.hub.card import model_card
    card = model_card("tiny", digits_mar("arinar").config, 1000, {"args": {**ARGS, **args}}, "mit")
    assert all(row in card for row in shown) and not any(f"| {label} |" in card for label in left_out), card
    # the front matter names the Hub's ImageNet for ImageNet runs, and no Hub data set for the digits
    front = card.split("---")[1]
    assert ('datasets:\n- "ILSVRC/imagenet-1k"' in front) == (args["dataset"] == "imagenet"), front


def card_commands(evaluations=(), args=None, **config_changes):
    """(sample.py argv, main_mar.py argv) of the card of a tiny digits model with these evaluations and args."""
    from dataclasses import replace
    from util.hub.card import model_card
    config = replace(digits_mar("arinar").config, **config_changes)
    card = model_card("me/tiny", config, 1000, {"args": dict(ARGS if args is None else args),
                                                "evaluations": list(evaluations)}, "mit")
    (sample_line,) = [line for line in card.splitlines() if line.startswith("python sample.py")]
    (evaluate_line,) = [line for line in card.splitlines() if line.startswith("python main_mar.py")]
    return shlex.split(sample_line), shlex.split(evaluate_line)


def flag_value(argv, flag):
    return argv[argv.index(flag) + 1]


def test_the_card_quotes_the_lowest_fid_else_the_highest_accuracy():
    """Bugs: the best evaluation taken as the highest FID or the lowest digit accuracy, or a NaN FID taken as the
    best (the card's commands then quote the worst setting)."""
    by_fid = [{"fid": float("nan"), "cfg": 9.0}, {"fid": 15.0, "cfg": 2.0}, {"fid": 9.5, "cfg": 3.5},
              {"fid": 30.0, "cfg": 1.0}]  # (a NaN FID, first in folder order, is no score)
    by_accuracy = [{"accuracy": 0.5, "cfg": 1.0}, {"accuracy": 0.9, "cfg": 4.0}, {"accuracy": 0.7, "cfg": 2.0}]
    for evaluations, cfg in ((by_fid, "3.5"), (by_accuracy, "4")):
        sample_argv, evaluate_argv = card_commands(evaluations)
        assert flag_value(sample_argv, "--cfg") == cfg and flag_value(evaluate_argv, "--cfg") == cfg


def test_the_card_quotes_the_first_value_of_a_sweep_without_evaluations():
    """Bug: a --cfg / --temperature sweep stored as a list quoted by its last value (main_mar.py runs the first as
    its --cfg)."""
    sample_argv, _ = card_commands(args={**ARGS, "cfg": [4.5, 1.0], "temperature": [0.9, 1.1]})
    assert flag_value(sample_argv, "--cfg") == "4.5" and flag_value(sample_argv, "--temperature") == "0.9"


def test_the_card_samples_imagenet_s_showcase_classes_for_1000_classes():
    """Bug: `class_num > 1000` for the ImageNet classes, so an ImageNet model's card sampled classes 0..3."""
    sample_argv, _ = card_commands(class_num=1000)
    assert sample_argv[sample_argv.index("--classes") + 1:][:5] == ["207", "360", "387", "974", "--num_per_class"]
    sample_argv, _ = card_commands(class_num=10)
    assert sample_argv[sample_argv.index("--classes") + 1:][:5] == ["0", "1", "2", "3", "--num_per_class"]
    sample_argv, _ = card_commands(class_num=2)  # fewer than 4 classes: each one once
    assert sample_argv[sample_argv.index("--classes") + 1:][:3] == ["0", "1", "--num_per_class"]


def test_the_card_evaluate_command_reruns_the_quoted_evaluation():
    """The main_mar.py command repeats the best evaluation's own --num_images / --seed, and without evaluations
    asks for the standard 50,000 images. Bugs: the first evaluation's settings quoted instead of the best one's;
    another default image count."""
    evaluations = [{"fid": 30.0, "cfg": 1.0, "num_images": 1000, "seed": 7},
                   {"fid": 9.5, "cfg": 3.5, "num_images": 5000, "seed": 2}]
    _, evaluate_argv = card_commands(evaluations)
    assert flag_value(evaluate_argv, "--num_images") == "5000" and flag_value(evaluate_argv, "--seed") == "2"
    assert flag_value(evaluate_argv, "--cfg") == "3.5"
    _, evaluate_argv = card_commands()
    assert flag_value(evaluate_argv, "--num_images") == "50000" and "--seed" not in evaluate_argv
    assert flag_value(evaluate_argv, "--dataset") == "digits"
    _, evaluate_argv = card_commands([{"fid": 9.5, "eval_bsz": 64}])
    assert flag_value(evaluate_argv, "--eval_bsz") == "64"


def test_the_card_states_the_ema_rate_and_downloads_kl16_only_for_kl16_models():
    """Bugs: the EMA rate left out of the weights row; the KL-16 download line printed for a pixel model."""
    from dataclasses import replace
    from util.hub.card import model_card
    config = digits_mar("arinar").config
    assert config.tokens.tokenizer != "kl16"
    card = model_card("me/tiny", config, 1000, {"args": ARGS}, "mit")
    assert "EMA: the exponential moving average of the training weights (rate 0.999)" in card
    assert "util.io.download kl16" not in card
    kl16 = replace(config, tokens=replace(config.tokens, tokenizer="kl16"))
    assert "python -m util.io.download kl16" in model_card("me/tiny", kl16, 1000, {"args": ARGS}, "mit")


def test_the_card_table_has_a_column_for_every_score_some_evaluation_has():
    """Evaluations that scored different things (one FID, one digit accuracy): both columns, each row filling its
    own. Bug: only the scores every evaluation has kept (here none)."""
    from util.hub.card import model_card
    evaluations = [{"fid": 9.5, "cfg": 3.5}, {"accuracy": 0.75, "cfg": 1.0}]
    card = model_card("me/tiny", digits_mar("arinar").config, 1000, {"args": ARGS, "evaluations": evaluations},
                      "mit")
    rows = card.split("## Evaluation")[1].split("## Sampling")[0].strip().splitlines()[2:]
    assert rows[0].startswith("| FID | digit accuracy | cfg |"), rows
    assert rows[2].startswith("| 9.5 |  | 3.5 |") and rows[3].startswith("|  | 0.75 | 1 |"), rows


def test_the_card_leaves_out_empty_arguments_and_says_ema_by_default():
    """An argument stored as "" (an unset path) gets no training row; facts that do not say which weights are
    EMA (run_facts' default); one million parameters read 1.0M. Bugs: only None left out ("| lr schedule |  |"),
    the weights read as live when unsaid, `>` for `>=` at 1e6 ("1000.0K")."""
    from util.hub.card import model_card
    card = model_card("me/tiny", digits_mar("arinar").config, 1_000_000,
                      {"args": {**ARGS, "lr_schedule": "", "weight_decay": 0.0}}, "mit")
    assert "| lr schedule |" not in card and "| weight decay | 0 |" in card
    assert card.split("| model.safetensors |")[1].splitlines()[0].lstrip().startswith("EMA")
    assert "| parameters | 1,000,000 (1.0M) |" in card


# ----------------------------------------------------------------------------- the releases
def release_file(path, head, **args):
    """A release-layout file of a tiny model: args pickled as a Namespace, no config, optimizer and scaler."""
    model = digits_mar(head)
    live = {k: v.clone() for k, v in randomize_(model, std=0.1, seed=5).state_dict().items()}
    ema = randomize_(model, std=0.1, seed=6).state_dict()
    release_args = dict(model="tiny_release", img_size=8, vae_stride=1, patch_size=2, vae_embed_dim=1, class_num=10,
                        buffer_size=4, tokenizer="pixel", img_channels=1, epochs=400, batch_size=64, **args)
    torch.save({"model": live, "model_ema": ema, "optimizer": {"state": {}, "param_groups": []}, "epoch": 399,
                "scaler": {"scale": 65536.0}, "args": argparse.Namespace(**release_args)}, path)
    return ema


@pytest.mark.parametrize("head, args", [
    ("arinar", dict(num_gaussians=4, inner_ar_width=32, cfg=4.5)),  # ARINAR-B's layout
    ("diffloss", dict(diffloss_d=1, diffloss_w=32, num_sampling_steps="8")),  # MAR-B/L/H's (steps as a string)
])
def test_a_release_converts_with_one_command(head, args, tmp_path, monkeypatch):
    monkeypatch.setitem(PRESETS, "tiny_release", ("mar", {"width": 32, "num_heads": 4, "enc_dec_depth": 1}))
    path = tmp_path / "release" / LAST
    path.parent.mkdir()
    ema = release_file(path, head, **args)
    push("--ckpt", path.parent, "--local_dir", tmp_path / "hub")
    converted = read_checkpoint(tmp_path / "hub")
    assert converted["config"]["head"] == head and converted["epoch"] == 399 and "model" not in converted
    assert all(torch.equal(converted["model_ema"][k], v) for k, v in ema.items())
    card = (tmp_path / "hub" / "README.md").read_text()
    assert "| epochs completed | 400 |" in card and f"| per-token head | {head} |" in card
    assert draw(tmp_path / "hub", tmp_path / "a.png") == draw(path, tmp_path / "b.png")


# ----------------------------------------------------------------------------- pushing
class FakeApi:
    """HfApi's create_repo / upload_folder, recording what would be sent."""
    calls = []
    fail_with = None

    def __init__(self, token=None, library_name=None):
        self.library_name = library_name

    def create_repo(self, repo_id, private=None, exist_ok=False):
        self.calls.append(("create_repo", repo_id, private, exist_ok))

    def upload_folder(self, repo_id, folder_path, commit_message=None):
        if self.fail_with is not None:
            raise self.fail_with
        folder = Path(folder_path)
        files = {p.name: p.read_bytes() for p in folder.iterdir()}
        self.calls.append(("upload_folder", repo_id, files))
        return mock.Mock(commit_url=f"https://huggingface.co/{repo_id}/commit/abc")


def test_push_uploads_the_three_files(run, published, monkeypatch, capsys):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(remote, "HfApi", FakeApi)
    monkeypatch.setattr(FakeApi, "calls", [])
    assert push("--ckpt", run, "--repo", "me/tiny", "--private").endswith("/commit/abc")
    (create, upload) = FakeApi.calls
    assert create == ("create_repo", "me/tiny", True, True)
    assert upload[1] == "me/tiny" and sorted(upload[2]) == sorted(FILES)
    assert upload[2][WEIGHTS_NAME] == (published / WEIGHTS_NAME).read_bytes()  # the same files as --local_dir
    assert "python sample.py --ckpt me/tiny " in upload[2]["README.md"].decode()

    request = httpx2.Request("POST", "https://huggingface.co/api/repos/create")
    monkeypatch.setattr(FakeApi, "fail_with", HfHubHTTPError("401 Unauthorized",
                                                              response=httpx2.Response(401, request=request)))
    err = one_line_error(capsys, lambda: push("--ckpt", run, "--repo", "me/tiny"))
    assert "upload failed" in err and "hf auth login" in err


def test_push_refuses_bad_destinations(run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(remote, "HfApi", FakeApi)
    monkeypatch.setattr(FakeApi, "calls", [])
    err = one_line_error(capsys, lambda: push("--ckpt", run, "--repo", "me/tiny"))  # HF_HUB_OFFLINE=1
    assert "HF_HUB_OFFLINE" in err and "--local_dir" in err and FakeApi.calls == []
    mine = tmp_path / "project"
    mine.mkdir()
    (mine / "README.md").write_text("my project")
    (mine / "train.py").write_text("")
    err = one_line_error(capsys, lambda: push("--ckpt", run, "--local_dir", mine))
    assert err.endswith(f"--local_dir {mine} holds other files (train.py): write a published model to a new or "
                        "empty folder") and (mine / "README.md").read_text() == "my project"
    with pytest.raises(ValueError, match="holds other files"):
        save_pretrained(digits_mar("gmm"), mine)
    assert (mine / "README.md").read_text() == "my project" and not (mine / WEIGHTS_NAME).exists()
    err = one_line_error(capsys, lambda: push("--ckpt", run))
    assert "--repo USER/NAME" in err and "--local_dir DIR" in err
    err = one_line_error(capsys, lambda: push("--ckpt", run, "--repo", "not a repo"))
    assert "--repo must be a Hub repo id" in err
    # a revision names what to download, not where to push (bug: only parse_repo_id's check, which takes @REV)
    err = one_line_error(capsys, lambda: push("--ckpt", run, "--repo", "me/tiny@v1", "--local_dir", tmp_path / "v"))
    assert "--repo must be a Hub repo id USER/NAME; got 'me/tiny@v1'" in err and not (tmp_path / "v").exists()
    err = one_line_error(capsys, lambda: push("--ckpt", tmp_path / "nowhere", "--local_dir", tmp_path / "out"))
    assert "checkpoint not found" in err and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- main_mar.py end to end
def test_main_mar_evaluates_a_hub_repo_like_the_run(tmp_path, offline_hub):
    """Train, evaluate, publish (the card quotes that evaluation), then the card's own `main_mar.py --evaluate
    --resume USER/NAME` (from the cache) draws the very same images."""
    data = make_image_folder(tmp_path / "data", per_class=2)
    run_main(tiny_flags(data_path=data, output_dir=tmp_path / "run", epochs=1))
    evaluation = dict(evaluate=True, num_images=2, eval_bsz=2, num_iter=2, fid_stats="none", cfg=2.0)
    run_main(tiny_flags(output_dir=tmp_path / "run", resume=tmp_path / "run", **evaluation))
    with mock.patch.dict(PRESETS, {TINY: TINY_PRESET}):
        push("--ckpt", tmp_path / "run", "--local_dir", tmp_path / "hub", "--repo", "someone/tiny")
    card = (tmp_path / "hub" / "README.md").read_text()
    assert "No evaluation of these exact weights" not in card and "| 2 | 1 | 2 | linear | sir | 2 | 3 | ema |" in card

    to_cache(offline_hub, "someone/tiny", tmp_path / "hub")
    (command,) = [line for line in card.splitlines() if line.startswith("python main_mar.py")]
    argv = shlex.split(command)[2:]
    assert argv[argv.index("--resume") + 1] == "someone/tiny"
    argv[argv.index("--output_dir") + 1] = str(tmp_path / "again")
    run_main(argv + ["--fid_stats", "none"])  # the run had no FID statistics either
    (first,) = (tmp_path / "run").glob("eval-ep0-*/images")
    (second,) = (tmp_path / "again").glob("eval-ep0-*/images")
    names = sorted(os.listdir(first))
    assert len(names) == 2 and sorted(os.listdir(second)) == names
    assert all((first / n).read_bytes() == (second / n).read_bytes() for n in names)


def test_repo_id_limits():
    """Bugs caught: the 96-character limit off by one, and a clone URL's NAME.git taken for a repo id."""
    assert parse_repo_id("u/" + "n" * 94) == ("u/" + "n" * 94, None)  # 96 characters: the Hub's maximum
    assert parse_repo_id("u/" + "n" * 95) is None  # 97
    assert parse_repo_id("someone/tiny.git") is None


def test_run_facts_refuse_a_boolean_epoch():
    """Bug caught: True (a bool is an int in Python) accepted as the run's epoch."""
    with pytest.raises(ValueError, match="metadata epoch must be a int; got bool"):
        run_facts({"arinar": json.dumps({"epoch": True})}, "w.safetensors")
    assert run_facts({"arinar": json.dumps({"epoch": 4})}, "w.safetensors") == {"weights": "ema", "epoch": 4}
    # the other facts are type-checked too (bug caught: evaluations taken whatever their type)
    for key, value, kind in (("evaluations", {"fid": 3.0}, "list; got dict"), ("args", [1], "dict; got list")):
        with pytest.raises(ValueError, match=f"metadata {key} must be a {kind}"):
            run_facts({"arinar": json.dumps({key: value})}, "w.safetensors")


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pth", "model.pt", "model.ckpt"])
def test_a_folder_with_only_pickled_weights_names_them(tmp_path, name):
    """Bug caught: only .bin files named in the refusal (a .pth left it saying nothing of what was found)."""
    from util.io.pretrained import read_weights
    (tmp_path / CONFIG_NAME).write_text("{}")
    (tmp_path / name).write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match=f"no {WEIGHTS_NAME} \\(found {name}: pickled weights are never"):
        read_weights(tmp_path)


def test_a_folder_with_only_the_hubs_cache_is_a_valid_destination(tmp_path):
    """Bug caught: the .cache folder huggingface_hub leaves in a --local_dir download counted as a foreign file."""
    folder = tmp_path / "model"
    (folder / ".cache" / "huggingface").mkdir(parents=True)
    (folder / WEIGHTS_NAME).write_bytes(b"old")
    check_destination(folder)  # no error
    (folder / "notes.txt").write_text("")
    with pytest.raises(ValueError, match=r"holds other files \(notes.txt\)"):
        check_destination(folder)
    for name in ("a.txt", "b.txt", "c.txt"):
        (folder / name).write_text("")
    with pytest.raises(ValueError, match=r"holds other files \(a.txt, b.txt, c.txt, \.\.\.\): write"):
        check_destination(folder)  # the first three named, the rest elided (bug caught: all of them listed)


def test_published_weights_honour_the_umask(tmp_path):
    """Bug caught: model.safetensors left at mkstemp's 0600 (a team shares published folders)."""
    old = os.umask(0o027)
    try:
        save_pretrained(digits_mar("gmm"), tmp_path / "model")
    finally:
        os.umask(old)
    for name in FILES:
        assert stat.S_IMODE(os.stat(tmp_path / "model" / name).st_mode) == 0o640, name


def test_a_checkpoint_of_epoch_0_publishes_its_epoch_and_live_weights_take_no_evaluation(run, tmp_path):
    """A checkpoint saved after the first epoch stores epoch 0: published, its epoch is 0, not unknown (bug caught:
    the epoch read by truth, 0 taken for "none"). A checkpoint without EMA weights publishes its live ones and quotes
    no evaluation, even one that sampled with those live weights (bug caught: the EMA-only rule dropped)."""
    from util.hub.export import published_from_checkpoint
    ckpt = torch.load(run / LAST, weights_only=False)
    folder = tmp_path / "first"
    folder.mkdir()
    torch.save({**ckpt, "epoch": 0}, folder / LAST)
    assert published_from_checkpoint(folder / LAST).facts["epoch"] == 0
    live_only = {k: v for k, v in ckpt.items() if k != "model_ema"}
    torch.save(live_only, tmp_path / "live.pth")
    published = published_from_checkpoint(tmp_path / "live.pth", eval_root=run)  # run holds eval-ep4-live
    assert published.facts["weights"] == "live" and published.facts["evaluations"] == []
    assert published_from_checkpoint(run / LAST).facts["evaluations"][0]["folder"] == "eval-ep4-ema"


def test_a_model_saved_at_epoch_0_keeps_its_epoch_in_the_published_weights(tmp_path):
    """save_pretrained(epoch=0) writes epoch 0 into model.safetensors' metadata (and the card says 1 epoch
    completed). Bug: the facts written by truth, so epoch 0 (and empty args) dropped as if unknown."""
    from util.io.pretrained import read_weights
    save_pretrained(digits_mar("gmm"), tmp_path / "model", args={"seed": 0}, epoch=0)
    _, metadata = read_weights(tmp_path / "model")
    assert run_facts(metadata, "w")["epoch"] == 0
    assert json.loads(metadata["arinar"])["epoch"] == 0
    assert "| epochs completed | 1 |" in (tmp_path / "model" / "README.md").read_text()


@pytest.mark.parametrize("value, on", [("1", True), ("TRUE", True), (" Yes ", True), ("on", True), ("0", False),
                                       ("false", False), ("", False)])
def test_hf_hub_offline_is_read_in_any_case(monkeypatch, value, on):
    """huggingface_hub's spellings of a true HF_HUB_OFFLINE, in any case and with spaces. Bug caught: the value
    compared as written (HF_HUB_OFFLINE=TRUE ignored, so a node without network tried the Hub)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert remote.offline() is on


@pytest.mark.parametrize("status, hint", [(401, "hf auth login"), (403, "hf auth login"),
                                          (500, "run the command again")])
def test_an_upload_refused_for_want_of_rights_says_to_log_in(tmp_path, monkeypatch, status, hint):
    """401 (no token) and 403 (a token without write access) both point at logging in; other failures at running
    again. Bug caught: 403 given the retry hint."""
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(remote, "HfApi", FakeApi)
    monkeypatch.setattr(FakeApi, "calls", [])
    request = httpx2.Request("POST", "https://huggingface.co/api/repos/create")
    monkeypatch.setattr(FakeApi, "fail_with", HfHubHTTPError(f"{status} refused",
                                                              response=httpx2.Response(status, request=request)))
    with pytest.raises(ValueError) as err:
        remote.upload(tmp_path, "me/tiny")
    assert str(err.value).startswith(f"--repo me/tiny: upload failed ({status} refused)") and hint in str(err.value)


def test_a_revision_reaches_the_config_download_and_the_weights_follow_its_commit(tmp_path, monkeypatch):
    """USER/NAME@v1: config.json is fetched at v1, model.safetensors at the commit v1 resolved to (huggingface_hub
    is a stand-in here). Bug caught: the revision left off the first download (the main branch's config read)."""
    calls = []

    def fake_download(filename, revision=None, **kwargs):
        calls.append((filename, revision))
        commit = COMMIT if revision in ("v1", COMMIT) else "f" * 40
        return str(tmp_path / "snapshots" / commit / filename)

    monkeypatch.setattr(remote, "hf_hub_download", fake_download)
    assert remote.download("me/tiny", "v1") == tmp_path / "snapshots" / COMMIT
    assert calls == [(CONFIG_NAME, "v1"), (WEIGHTS_NAME, COMMIT)]


def test_a_checkpoint_s_stored_evaluations_are_published_without_eval_folders(run, tmp_path):
    """A checkpoint (e.g. a re-exported published model) carrying its evaluations keeps them when no eval-*/ folder
    holds any. Bug caught: the stored evaluations dropped, the card quoting none."""
    from util.hub.export import published_from_checkpoint
    ckpt = torch.load(run / LAST, weights_only=False)
    stored = [{"folder": "eval-ep4-elsewhere", "fid": 7.5}]
    (tmp_path / "bare").mkdir()
    torch.save({**ckpt, "evaluations": stored}, tmp_path / "bare" / "ckpt.pth")
    assert published_from_checkpoint(tmp_path / "bare" / "ckpt.pth").facts["evaluations"] == stored


def test_weights_stored_in_another_key_order_publish_in_the_model_s_order(run, tmp_path):
    """The published state follows the model's state-dict order whatever the file's order, so its digest is the
    one the evaluations recorded. Bug caught: the file's order kept (evaluations of these very weights lost)."""
    from util.hub.export import published_from_checkpoint
    ckpt = torch.load(run / LAST, weights_only=False)
    reordered = {k: ckpt["model_ema"][k] for k in reversed(list(ckpt["model_ema"]))}
    (tmp_path / "reordered").mkdir()
    torch.save({**ckpt, "model_ema": reordered}, tmp_path / "reordered" / LAST)
    published = published_from_checkpoint(tmp_path / "reordered" / LAST, eval_root=run)
    assert list(published.state) == list(ckpt["model_ema"])
    assert [e["folder"] for e in published.facts["evaluations"]] == ["eval-ep4-ema"]


def test_config_and_weights_of_different_snapshots_are_refused(tmp_path, monkeypatch):
    """huggingface_hub is a stand-in whose weights land in another snapshot folder than config.json. Bug caught:
    the check dropped, a config of one commit paired with the weights of another."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(remote, "hf_hub_download", lambda filename, revision=None, **kw: str(
        tmp_path / "snapshots" / (COMMIT if filename == CONFIG_NAME else "f" * 40) / filename))
    with pytest.raises(ValueError, match="resolved to different snapshots"):
        remote.download("me/tiny")


def test_hf_endpoint_and_a_cache_under_home_reach_the_download(tmp_path, monkeypatch):
    """HF_ENDPOINT (a mirror) reaches both downloads, and HF_HUB_CACHE's ~ and $VARS are expanded. Bugs caught:
    the endpoint left at huggingface.co, and a literal ./~ folder made for the cache."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("CACHE_ROOT", "caches")
    monkeypatch.setenv("HF_HUB_CACHE", "~/$CACHE_ROOT/hub")
    monkeypatch.setenv("HF_ENDPOINT", "https://mirror.example")
    assert remote.cache_dir() == tmp_path / "caches" / "hub"
    calls = []

    def fake_download(filename, revision=None, **kwargs):
        calls.append((kwargs["endpoint"], kwargs["cache_dir"]))
        return str(tmp_path / "snapshots" / COMMIT / filename)

    monkeypatch.setattr(remote, "hf_hub_download", fake_download)
    remote.download("me/tiny")
    assert calls == [("https://mirror.example", tmp_path / "caches" / "hub")] * 2

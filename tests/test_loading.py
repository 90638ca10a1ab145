"""Tests for util/io/checkpoints.py: safe reading, strict loading with fix-naming errors, MAR outer init.

The release-layout tests write checkpoints with the manifests' full key/shape lists. To keep them
cheap, every tensor is a window of one shared random pool (torch.save writes the pool once), at an
offset that differs per key and between "model" and "model_ema".
"""
import argparse
import ast
import os
import re
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from models import create_model
from tests.conftest import load_manifest, randomize_, tiny_mar
from util.io.checkpoints import (check_state_dict, checkpoint_args, config_from_checkpoint, export_safetensors,
                                 freeze_outer, load_model_weights, load_outer_weights, model_state_from_checkpoint,
                                 read_checkpoint, strip_wrapper_prefixes)

REPO = Path(__file__).resolve().parents[1]
POOL = torch.randn(3 * 2 ** 21, generator=torch.Generator().manual_seed(0))  # > 2 x the largest tensor


def expected_value(entry, index, ema):
    """What the release-layout file holds for manifest entry `index` (buffers are zeros and never EMA'd)."""
    if entry["kind"] == "buffer":
        return torch.zeros(entry["shape"])
    numel = torch.Size(entry["shape"]).numel()
    offset = (7919 * index + (104_729 if ema else 0)) % (POOL.numel() - numel)
    return POOL[offset:offset + numel].view(entry["shape"])


def release_checkpoint(entries, args):
    """The release layout: model, model_ema (EMA values, live buffers), optimizer, epoch, scaler, args."""
    model = {e["key"]: expected_value(e, i, ema=False) for i, e in enumerate(entries)}
    ema = {e["key"]: expected_value(e, i, ema=True) for i, e in enumerate(entries)}
    group = dict(lr=1e-4, betas=(0.9, 0.95), eps=1e-8, amsgrad=False, maximize=False, foreach=None,
                 capturable=False, differentiable=False, fused=None)
    optimizer = {"state": {0: {"step": torch.tensor(10.0), "exp_avg": torch.zeros(3), "exp_avg_sq": torch.zeros(3)}},
                 "param_groups": [dict(group, weight_decay=0.0, params=[0]),
                                  dict(group, weight_decay=0.02, params=[1])]}
    scaler = {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
              "_growth_tracker": 0}
    return {"model": model, "model_ema": ema, "optimizer": optimizer, "epoch": 399, "scaler": scaler, "args": args}


def write_release(tmp_path_factory, manifest_name, folder, **args):
    entries = load_manifest(manifest_name)["state_dict"]
    path = tmp_path_factory.mktemp(folder) / "checkpoint-last.pth"
    torch.save(release_checkpoint(entries, argparse.Namespace(**args)), path)
    return path, entries


@pytest.fixture(scope="module")
def arinar_release(tmp_path_factory):
    return write_release(tmp_path_factory, "arinar_b_official.json", "arinar_b", model="mar_base",
                         num_gaussians=4, img_size=256, vae_stride=16, patch_size=1, vae_embed_dim=16,
                         class_num=1000, buffer_size=64, vae_path="pretrained_models/vae/kl16.ckpt", cfg=4.5)


@pytest.fixture(scope="module")
def mar_release(tmp_path_factory):
    return write_release(tmp_path_factory, "mar_b_official.json", "mar_b", model="mar_base", img_size=256,
                         diffloss_d=6, diffloss_w=1024, num_sampling_steps="100")


@pytest.fixture(scope="module")
def arinar_b():
    return create_model("mar_base", num_gaussians=4)


@pytest.fixture(scope="module")
def arinar_12():
    return create_model("mar_base", enc_dec_depth=12, num_gaussians=4)


def save_checkpoint(path, **entries):
    torch.save(entries, path)
    return path


# ----------------------------------------------------------------------------- the release layouts
def test_read_checkpoint_release_layout_needs_only_namespace(arinar_release):
    path, _ = arinar_release
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(path, map_location="cpu", weights_only=True)  # the file really needs the allow-list
    ckpt = read_checkpoint(path)
    assert set(ckpt) == {"model", "model_ema", "optimizer", "epoch", "scaler", "args"}
    assert isinstance(ckpt["args"], argparse.Namespace) and ckpt["epoch"] == 399
    assert ckpt["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95)
    assert checkpoint_args(ckpt)["num_gaussians"] == 4
    assert argparse.Namespace not in torch.serialization.get_safe_globals()  # allowed for that call only
    assert read_checkpoint(path.parent)["epoch"] == 399  # a run directory works too


def test_mar_base_loads_arinar_release_strictly(arinar_release, arinar_b):
    path, entries = arinar_release
    ckpt = read_checkpoint(path)
    load_model_weights(arinar_b, model_state_from_checkpoint(ckpt), source=str(path))
    state = arinar_b.state_dict()
    assert list(state) == [e["key"] for e in entries]  # the release's names, in its order
    for i, e in enumerate(entries):
        assert torch.equal(state[e["key"]], expected_value(e, i, ema=True)), e["key"]
    assert "arhead.blocks.0.attn.zero_k_bias" in state
    live = model_state_from_checkpoint(ckpt, use_ema=False)
    assert torch.equal(live["fake_latent"], expected_value(entries[0], 0, ema=False))
    assert not torch.equal(live["fake_latent"], state["fake_latent"])  # EMA was the default


def test_outer_init_from_mar_b_ignores_diffloss_and_keeps_arhead(mar_release, arinar_12):
    path, entries = mar_release
    assert any(e["key"].startswith("diffloss.") for e in entries)
    arhead_before = {k: v.clone() for k, v in arinar_12.arhead.state_dict().items()}
    load_outer_weights(arinar_12, path)
    state = arinar_12.state_dict()
    for i, e in enumerate(entries):
        if not e["key"].startswith("diffloss."):
            assert torch.equal(state[e["key"]], expected_value(e, i, ema=True)), e["key"]
    for k, v in arinar_12.arhead.state_dict().items():
        assert torch.equal(v, arhead_before[k]), k

    trainable = freeze_outer(arinar_12)
    assert trainable and all(n.startswith("arhead.") for n in trainable)
    assert set(trainable) == {"arhead." + n for n, _ in arinar_12.arhead.named_parameters()}
    assert all(p.requires_grad == n.startswith("arhead.") for n, p in arinar_12.named_parameters())


def test_mar_b_into_arinar_b_names_depth_and_init_outer_from(mar_release, arinar_b):
    path, _ = mar_release
    before = arinar_b.encoder_blocks[0].attn.qkv.weight.clone()
    with pytest.raises(ValueError, match=r"--enc_dec_depth 12") as err:
        load_outer_weights(arinar_b, path)
    assert "\n" not in str(err.value) and "encoder_blocks.12" in str(err.value)
    with pytest.raises(ValueError, match=r"--init_outer_from") as err:
        load_model_weights(arinar_b, model_state_from_checkpoint(read_checkpoint(path)), source=str(path))
    assert "--enc_dec_depth 12" in str(err.value)
    assert torch.equal(arinar_b.encoder_blocks[0].attn.qkv.weight, before)  # a failed load changes nothing


def test_release_mismatch_names_num_gaussians_and_model(arinar_release, arinar_b):
    found = read_checkpoint(arinar_release[0])["model_ema"]
    one_gaussian = dict(arinar_b.state_dict(), **{"arhead.head.weight": torch.empty(3, 768),
                                                  "arhead.head.bias": torch.empty(3)})
    with pytest.raises(ValueError, match=r"--num_gaussians 4 \(checkpoint head \[12, 768\]"):
        check_state_dict(one_gaussian, found)
    with torch.device("meta"):
        large = create_model("mar_large", num_gaussians=4).state_dict()
    with pytest.raises(ValueError, match=r"--model mar_base \(checkpoint width 768, model width 1024\)"):
        check_state_dict(large, found)


# ----------------------------------------------------------------------------- mismatch hints (small models)
@pytest.mark.parametrize("file_config, model_config, fix", [
    (dict(num_gaussians=4), dict(num_gaussians=1), "--num_gaussians 4"),
    (dict(enc_dec_depth=2), dict(enc_dec_depth=1), "--enc_dec_depth 2"),
    (dict(class_num=10), dict(class_num=7), "--class_num 10"),
    (dict(img_size=64), dict(img_size=32), "--img_size / --vae_stride / --patch_size"),
    (dict(buffer_size=4), dict(buffer_size=2), "--buffer_size 4"),
    (dict(vae_embed_dim=16), dict(vae_embed_dim=4), "--vae_embed_dim / --patch_size / --tokenizer"),
    (dict(inner_ar_width=32), dict(inner_ar_width=16), "--inner_ar_width 32"),
    (dict(inner_ar_depth=2), dict(inner_ar_depth=1), "--inner_ar_depth 2"),
])
def test_mismatch_names_the_flag(file_config, model_config, fix):
    model = tiny_mar(**model_config)
    with pytest.raises(ValueError, match=re.escape(fix)) as err:
        load_model_weights(model, tiny_mar(**file_config).state_dict(), source="ckpt.pth")
    assert str(err.value).startswith("ckpt.pth does not fit the model") and "\n" not in str(err.value)


@pytest.mark.parametrize("preset, file_config, model_config, fix", [
    ("causal_tiny", dict(depth=6), dict(depth=4), "--depth 6 (checkpoint has 6 blocks, model 4)"),
    ("scalewise_tiny", dict(depth=3), dict(depth=2), "--depth 3 (checkpoint has 3 blocks, model 2)"),
    ("mvar_tiny", dict(depth=1), dict(depth=2), "--depth 1 (checkpoint has 1 blocks, model 2)"),
    ("causal_tiny", dict(width=96), dict(width=128), "(checkpoint width 96, model width 128)"),
    ("scalewise_tiny", dict(width=128), dict(width=96), "--model scalewise_tiny (checkpoint width 128, model width 96)"),
])
def test_mismatch_names_the_flag_in_every_family(preset, file_config, model_config, fix):
    with torch.device("meta"):
        found = create_model(preset, **file_config).state_dict()
        model = create_model(preset, **model_config)
    with pytest.raises(ValueError, match=re.escape(fix)):
        check_state_dict(model.state_dict(), found, family=model.config.family)


def test_outer_weights_of_another_family_are_named(tmp_path):
    causal = create_model("causal_tiny")
    path = save_checkpoint(tmp_path / "causal.pth", model=causal.state_dict(), config=causal.config.to_dict())
    with pytest.raises(ValueError, match=r"holds a causal-family outer model, this run builds a mar one: "
                                         r"pass --init_outer_from a mar checkpoint, or --model a causal preset "
                                         r"\(causal_tiny, causal_base, causal_large, causal_huge\)") as err:
        load_outer_weights(tiny_mar(), path)
    assert "\n" not in str(err.value)


def test_mismatch_without_a_known_cause_still_lists_keys():
    state = tiny_mar().state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["mask_token"]
    with pytest.raises(ValueError, match=r"1 missing \(mask_token\); 1 unexpected \(extra.weight\)"):
        load_model_weights(tiny_mar(), state)


def test_strips_ddp_and_compile_prefixes():
    source = randomize_(tiny_mar(), seed=3)
    wrapped = {"module._orig_mod." + k: v for k, v in source.state_dict().items()}
    assert set(strip_wrapper_prefixes(wrapped)) == set(source.state_dict())
    target = tiny_mar()
    load_model_weights(torch.nn.DataParallel(target), wrapped)  # a wrapped model is unwrapped too
    for k, v in source.state_dict().items():
        assert torch.equal(target.state_dict()[k], v), k


def test_load_outer_from_small_mar_checkpoint(tmp_path):
    mar = randomize_(tiny_mar(), seed=5).state_dict()
    mar = {k: v for k, v in mar.items() if not k.startswith("arhead.")}
    mar["diffloss.net.input_proj.weight"] = torch.ones(8, 16)
    ema = {k: v + 1 for k, v in mar.items()}
    path = save_checkpoint(tmp_path / "mar.pth", model=mar, model_ema=ema, args={"model": "mar_base"})
    model = tiny_mar()
    load_outer_weights(model, path, use_ema=False)
    assert torch.equal(model.mask_token, mar["mask_token"])
    load_outer_weights(model, path)
    assert torch.equal(model.mask_token, ema["mask_token"])
    with pytest.raises(ValueError, match="--enc_dec_depth 2"):
        load_outer_weights(tiny_mar(enc_dec_depth=1), path)


def test_freeze_outer_small():
    model = tiny_mar()
    trainable = freeze_outer(model)
    assert trainable == [n for n, _ in model.named_parameters() if n.startswith("arhead.")]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == sum(
        p.numel() for p in model.arhead.parameters())
    with pytest.raises(ValueError, match="nothing would be trained"):
        freeze_outer(torch.nn.Linear(2, 2))


# ----------------------------------------------------------------------------- which weights
def test_model_state_from_checkpoint_choices(caplog):
    live, ema = {"w": torch.zeros(1)}, {"w": torch.ones(1)}
    assert model_state_from_checkpoint({"model": live, "model_ema": ema}) is ema
    assert model_state_from_checkpoint({"model": live, "model_ema": ema}, use_ema=False) is live
    assert model_state_from_checkpoint({"model": live}) is live
    assert "no EMA weights" in caplog.text
    assert model_state_from_checkpoint(ema) is ema  # a bare state dict
    with pytest.raises(ValueError, match="holds no model weights"):
        model_state_from_checkpoint({"epoch": 3, "optimizer": {}})
    assert checkpoint_args({"args": argparse.Namespace(model="x")}) == {"model": "x"}
    assert checkpoint_args({"args": {"model": "y"}}) == {"model": "y"}
    assert checkpoint_args({"model": live}) == {}


def test_empty_weights_are_no_model_weights():
    """An empty "model" entry (or an empty file dict) is refused here, not loaded as a model with every key
    missing. Bug: the emptiness check dropped."""
    for ckpt in ({"model": {}, "epoch": 3}, {"model_ema": {}}, {}):
        with pytest.raises(ValueError, match="holds no model weights"):
            model_state_from_checkpoint(ckpt)


# ----------------------------------------------------------------------------- bad files
def test_missing_files_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere\.pth.*python -m util\.io\.download NAME.*--ckpt"):
        read_checkpoint(tmp_path / "nowhere.pth")
    with pytest.raises(FileNotFoundError, match=r"python -m util\.io\.download arinar_b"):
        read_checkpoint(tmp_path / "pretrained_models/arinar/arinar_b/checkpoint-last.pth")
    with pytest.raises(FileNotFoundError, match=r"python -m util\.io\.download mar_base"):
        read_checkpoint(tmp_path / "pretrained_models/mar/mar_base/checkpoint-last.pth")
    with pytest.raises(FileNotFoundError, match="no checkpoint-last.pth in directory"):
        read_checkpoint(tmp_path)


class Planted:
    """A pickled object that would create a directory when unpickled by an unsafe loader."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (os.mkdir, (self.target,))


def test_files_that_are_not_checkpoints_are_refused(tmp_path):
    (tmp_path / "random.pth").write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "random.safetensors").write_bytes(b"\x10" * 64)
    for name in ("random.pth", "empty.pth", "random.safetensors"):
        with pytest.raises(ValueError, match=f"{name} is not a readable checkpoint") as err:
            read_checkpoint(tmp_path / name)
        assert "\n" not in str(err.value)

    marker = tmp_path / "planted"
    torch.save({"model": {"w": torch.zeros(1)}, "payload": Planted(marker)}, tmp_path / "planted.pth")
    with pytest.raises(ValueError, match=r"pickles posix\.mkdir, which weights-only loading refuses"):
        read_checkpoint(tmp_path / "planted.pth")
    assert not marker.exists()

    torch.save({"model": {"w": torch.zeros(1)}, "args": Planted(marker).__class__}, tmp_path / "class.pth")
    with pytest.raises(ValueError, match=r"pickles tests\.test_loading\.Planted"):
        read_checkpoint(tmp_path / "class.pth")

    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="holds a list, not a dict"):
        read_checkpoint(tmp_path / "list.pth")


def unsafe_loads(source):
    """Lines of `source` that may unpickle arbitrary objects: torch.load without a literal weights_only=True,
    or pickle.load(s). (numpy's unsafe switch has its own test: tests/test_sharp_edges.py.)"""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
        weights_only = next((k.value for k in node.keywords if k.arg == "weights_only"), None)
        if ((owner, node.func.attr) == ("torch", "load")
                and not (isinstance(weights_only, ast.Constant) and weights_only.value is True)
                or owner == "pickle" and node.func.attr in ("load", "loads")):
            found.append(node.lineno)
    return found


def test_every_load_in_the_code_is_weights_only():
    """Every torch.load outside the tests passes weights_only=True literally (and nothing unpickles)."""
    assert unsafe_loads("torch.load(p)\ntorch.load(p, weights_only=False)\ntorch.load(p, weights_only=flag)\n"
                        "pickle.loads(b)\ntorch.load(p, weights_only=True)\n") == [1, 2, 3, 4]
    files = [p for p in REPO.rglob("*.py") if not ({"tests", ".venv", ".git"} & set(p.relative_to(REPO).parts))]
    assert len(files) > 50 and REPO / "util/io/checkpoints.py" in files
    bad = {str(p.relative_to(REPO)): lines for p in files if (lines := unsafe_loads(p.read_text()))}
    assert not bad, bad


# ----------------------------------------------------------------------------- safetensors
def test_safetensors_round_trip_and_export(tmp_path):
    source = randomize_(tiny_mar(), seed=7)
    path = tmp_path / "weights.safetensors"
    save_file(source.state_dict(), str(path))
    target = tiny_mar()
    load_model_weights(target, model_state_from_checkpoint(read_checkpoint(path)), source=str(path))
    for k, v in source.state_dict().items():
        assert torch.equal(target.state_dict()[k], v), k

    live = source.state_dict()
    ema = {k: v * 2 for k, v in live.items()}
    ckpt = save_checkpoint(tmp_path / "checkpoint-last.pth", model=live, model_ema=ema, args={"lr": 0.5},
                           config=source.config.to_dict())
    out = export_safetensors(ckpt, tmp_path / "out" / "ema.safetensors")
    converted = read_checkpoint(out)
    assert checkpoint_args(converted) == {"lr": 0.5}  # the run args and the config travel in the metadata
    assert converted["config"] == source.config.to_dict() and "model" not in converted  # the EMA weights, said so
    exported = model_state_from_checkpoint(converted)
    assert exported.keys() == ema.keys() and all(torch.equal(exported[k], ema[k]) for k in ema)
    assert os.listdir(out.parent) == ["ema.safetensors"]  # no temp file left behind
    exported_live = read_checkpoint(export_safetensors(ckpt, tmp_path / "live.safetensors", use_ema=False))["model"]
    assert all(torch.equal(exported_live[k], live[k]) for k in live)


def test_a_checkpoint_without_ema_exports_its_live_weights_said_so(tmp_path):
    """No model_ema in the file: the default (EMA) export holds the live weights and its metadata must say
    "live", so they read back as "model". Bug: the metadata follows use_ema alone and calls them EMA."""
    source = randomize_(tiny_mar(), seed=3)
    ckpt = save_checkpoint(tmp_path / "checkpoint-last.pth", model=source.state_dict(), args={},
                           config=source.config.to_dict())
    converted = read_checkpoint(export_safetensors(ckpt, tmp_path / "out.safetensors"))
    assert "model" in converted and "model_ema" not in converted
    assert all(torch.equal(converted["model"][k], v) for k, v in source.state_dict().items())


def test_exported_safetensors_honour_the_umask(tmp_path):
    """Like every other file the project writes (a team shares run folders): not safetensors' own 0600."""
    source = tiny_mar()
    ckpt = save_checkpoint(tmp_path / "checkpoint-last.pth", model=source.state_dict(), args={},
                           config=source.config.to_dict())
    old = os.umask(0o022)
    try:
        for mask, expected in ((0o022, 0o644), (0o002, 0o664)):
            os.umask(mask)
            out = export_safetensors(ckpt, tmp_path / f"out-{mask:o}.safetensors")
            assert stat.S_IMODE(out.stat().st_mode) == expected, oct(out.stat().st_mode)
    finally:
        os.umask(old)


def test_a_bare_state_dict_that_does_not_fit_the_default_model_says_what_to_pass():
    """No config and no run arguments: the weights give the width (32), the default preset the heads (12)."""
    state = tiny_mar().state_dict()
    with pytest.raises(ValueError, match=r"bare.pth is a bare state dict \(no config, no run arguments\): name its "
                                         r"model with --model PRESET .*; as it stands: --width 32 must be a multiple"):
        config_from_checkpoint(state, state, source="bare.pth")
    with pytest.raises(ValueError, match=r"^--width 32 must be a multiple of --num_heads 12$"):  # named: plain
        config_from_checkpoint(state, state, given={"model": "mar_base"}, source="bare.pth")


def test_the_export_command_writes_the_ema_by_default_and_the_live_weights_with_no_ema(tmp_path, capsys):
    """`python -m util.io.checkpoints SRC DEST [--no_ema]`. Bugs: --no_ema read the wrong way round (the
    default export publishing the live weights), a DEST not ending in .safetensors written anyway, a missing
    SRC escaping as a traceback instead of a one-line usage error."""
    from util.io.checkpoints import main
    source = randomize_(tiny_mar(), seed=5)
    live = source.state_dict()
    ema = {k: v + 1 for k, v in live.items()}
    ckpt = save_checkpoint(tmp_path / "checkpoint-last.pth", model=live, model_ema=ema, args={},
                           config=source.config.to_dict())
    main([str(ckpt), str(tmp_path / "ema.safetensors")])
    exported = read_checkpoint(tmp_path / "ema.safetensors")["model_ema"]
    assert exported.keys() == ema.keys() and all(torch.equal(exported[k], ema[k]) for k in ema)
    main([str(ckpt), str(tmp_path / "live.safetensors"), "--no_ema"])
    exported = read_checkpoint(tmp_path / "live.safetensors")["model"]
    assert all(torch.equal(exported[k], live[k]) for k in live)
    for argv, message in (([str(ckpt), str(tmp_path / "out.pth")], "dest must end in .safetensors"),
                          ([str(tmp_path / "absent.pth"), str(tmp_path / "x.safetensors")], "absent.pth")):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-last.pth", "ema.safetensors", "live.safetensors"]


def test_safetensors_weights_are_ema_only_when_the_metadata_says_so(tmp_path):
    """A .safetensors file with metadata: its tensors are "model_ema" only for weights "ema" (as the export
    writes), else "model", e.g. a file another tool saved with just {"format": "pt"}. Bug: anything not said
    to be live taken for EMA weights (no warning that the live ones are used, an export labelled EMA)."""
    state = tiny_mar().state_dict()
    for metadata, key in (({"weights": "ema"}, "model_ema"), ({"weights": "live"}, "model"),
                          ({"format": "pt"}, "model")):
        path = tmp_path / f"{key}-{len(os.listdir(tmp_path))}.safetensors"
        save_file(state, str(path), metadata=metadata)
        ckpt = read_checkpoint(path)
        assert set(ckpt) == {key}, (metadata, set(ckpt))
        assert all(torch.equal(ckpt[key][k], v) for k, v in state.items())


def test_a_published_folder_of_live_weights_reads_them_as_live(tmp_path):
    """A published folder whose metadata says "live" (a run without EMA weights) reads as "model", one that
    says "ema" as "model_ema". Bug: every published folder read as EMA weights."""
    from util.io.pretrained import write_folder
    model = randomize_(tiny_mar(), seed=11)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for weights, key in (("live", "model"), ("ema", "model_ema")):
        folder = write_folder(tmp_path / weights, model.config, state, {"weights": weights}, "card\n")
        ckpt = read_checkpoint(folder)
        assert key in ckpt and ({"model", "model_ema"} - {key}).isdisjoint(ckpt), (weights, set(ckpt))
        assert all(torch.equal(ckpt[key][k], v) for k, v in state.items())


def test_an_export_is_synced_under_its_temp_name_then_renamed(tmp_path, monkeypatch):
    """The exported bytes reach the disk (fsync) before the rename makes them the file (a crash must not leave
    a complete-looking DEST of zeros). Bug: the fsync dropped."""
    source = tiny_mar()
    ckpt = save_checkpoint(tmp_path / "checkpoint-last.pth", model=source.state_dict(), args={},
                           config=source.config.to_dict())
    dest = tmp_path / "out.safetensors"
    synced, real_fsync = [], os.fsync

    def fsync(fd):
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), dest.exists()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    export_safetensors(ckpt, dest)
    assert synced == [(str(tmp_path / "out.safetensors.tmp"), False)]


def test_a_failed_export_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    """A write that fails half-way (a full disk) leaves DEST as it was and no out.safetensors.tmp behind.
    Bug: the temp file's clean-up dropped."""
    import util.io.checkpoints as checkpoints
    source = tiny_mar()
    ckpt = save_checkpoint(tmp_path / "checkpoint-last.pth", model=source.state_dict(), args={},
                           config=source.config.to_dict())
    dest = tmp_path / "out.safetensors"
    dest.write_bytes(b"old")

    def half_written(tensors, path, metadata=None):
        Path(path).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoints, "save_safetensors", half_written)
    with pytest.raises(OSError, match="No space left"):
        export_safetensors(ckpt, dest)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-last.pth", "out.safetensors"]
    assert dest.read_bytes() == b"old"


def test_a_checkpoint_in_torch_s_legacy_format_is_read(tmp_path):
    """torch.save's pre-1.6 (non-zip) format cannot be memory-mapped; it is read without mmap. Bug: mmap=True
    for every file (the legacy file refused as not a readable checkpoint)."""
    state = randomize_(tiny_mar(), seed=2).state_dict()
    path = tmp_path / "legacy.pth"
    torch.save({"model": state, "epoch": 3}, path, _use_new_zipfile_serialization=False)
    ckpt = read_checkpoint(path)
    assert ckpt["epoch"] == 3 and all(torch.equal(ckpt["model"][k], v) for k, v in state.items())


def test_an_os_error_while_reading_a_checkpoint_stays_an_os_error(tmp_path, monkeypatch):
    """A failing disk is not a bad file: an OSError from the read passes through (main_mar reports storage
    errors as such), every parser error becomes "not a readable checkpoint". Bug: OSErrors caught with the rest."""
    import errno
    path = save_checkpoint(tmp_path / "checkpoint-last.pth", model=tiny_mar().state_dict())

    def failing_load(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(torch, "load", failing_load)
    with pytest.raises(OSError, match="Input/output error"):
        read_checkpoint(path)


def test_a_named_file_inside_a_published_folder_is_that_file(tmp_path):
    """Only model.safetensors stands for its published folder; another checkpoint named inside the folder is
    read itself. Bug: any file in a published folder resolved to the folder (the named weights ignored)."""
    from util.io.pretrained import write_folder
    model = tiny_mar()
    folder = write_folder(tmp_path / "published", model.config, model.state_dict(), {"weights": "ema"}, "card\n")
    other = {k: v + 1 for k, v in model.state_dict().items()}
    path = save_checkpoint(folder / "older.pth", model=other, epoch=7)
    ckpt = read_checkpoint(path)
    assert ckpt["epoch"] == 7 and all(torch.equal(ckpt["model"][k], v) for k, v in other.items())
    assert "model_ema" in read_checkpoint(folder / "model.safetensors")


def test_outer_init_logs_which_weights_it_took(tmp_path, caplog):
    """The log line says EMA only when EMA weights were read. Bug: a file without model_ema logged as EMA."""
    state = {k: v for k, v in tiny_mar().state_dict().items() if not k.startswith("arhead.")}
    live_only = save_checkpoint(tmp_path / "live.pth", model=state, args={"model": "mar_base"})
    both = save_checkpoint(tmp_path / "both.pth", model=state, model_ema=state, args={"model": "mar_base"})
    with caplog.at_level("INFO", logger="util.io.checkpoints"):
        for path in (live_only, both):
            load_outer_weights(tiny_mar(), path)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("initialised the outer model")]
    assert len(lines) == 2 and "(live weights," in lines[0] and "(EMA," in lines[1], lines


def test_blocks_of_another_layout_suggest_no_depth():
    """--depth is suggested only when both the file and the model count blocks: a file of scale-wise "blocks"
    against a model with encoder/decoder blocks only gets the generic advice. Bug: "--depth 2 (... model 0)"."""
    expected = {"encoder_blocks.0.w": torch.zeros(1), "decoder_blocks.0.w": torch.zeros(1)}
    found = {"blocks.0.w": torch.zeros(1), "blocks.1.w": torch.zeros(1)}
    with pytest.raises(ValueError) as err:
        check_state_dict(expected, found, "f.pth", "mar")
    assert str(err.value).endswith("Likely fix: check --model and the config flags against the run that wrote it "
                                   "(its stored args)"), str(err.value)


def test_a_local_file_named_like_a_repo_id_is_read_locally(tmp_path, monkeypatch):
    """A path that exists wins over a Hub repo id of the same spelling (USER/NAME). Bug: the repo id parsed
    first (the local file ignored, the Hub asked)."""
    import util.hub.remote as remote
    monkeypatch.chdir(tmp_path)
    (tmp_path / "someone").mkdir()
    save_checkpoint(tmp_path / "someone" / "tiny", model={"w": torch.ones(2)}, epoch=5)
    monkeypatch.setattr(remote, "download", lambda *a, **k: pytest.fail(f"the Hub was asked for {a}"))
    assert read_checkpoint("someone/tiny")["epoch"] == 5

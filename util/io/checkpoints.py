"""Reading checkpoints safely, the model config they describe, and strict loading of their weights.

Pickled checkpoints are read with ``torch.load(weights_only=True)``; the releases pickle their run
arguments as an ``argparse.Namespace``, which is allow-listed for that one call only. Our checkpoints
store the typed model config as `config` (a plain dict); files written before it (ours, and the
ARINAR and MAR releases) are converted to one here, once (`config_from_checkpoint`). Loading into a
model is strict, and a mismatch names the differing keys and the flag that most likely fixes it.

What --ckpt / --resume name is resolved here (`resolve_checkpoint_path`): a checkpoint file, a run
folder, a published model folder (config.json + model.safetensors, util/io/pretrained.py) or a Hub
repo id USER/NAME[@REVISION], downloaded into the Hugging Face cache (util/hub/remote.py). A local
path that exists always wins over a repo id.

Convert a checkpoint's weights to safetensors (EMA by default; the config goes into its metadata):
    python -m util.io.checkpoints CKPT.pth OUT.safetensors [--no_ema]
"""
import argparse
import json
import logging
import os
import zipfile
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file as save_safetensors

from models import HEADS, PRESETS, ModelConfig, build, config_from_flags
from models.config import all_flag_fields, check_flags_apply, coerce, tunable_flags
from util.io import pretrained
from util.io.download import ASSETS
from util.io.files import current_umask
from util.io.safe_load import why_unreadable

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint-last.pth"
INNER_PREFIX = "arhead."  # ARINAR's inner model
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile
MAX_LISTED = 3


# ----------------------------------------------------------------------------- reading files
def fetch_hint(path):
    """How to get a missing file: the download.py asset whose location it is, else the flags."""
    posix = Path(path).as_posix()
    for asset in ASSETS.values():
        if posix.endswith(asset.relpath) or posix.rstrip("/").endswith(str(Path(asset.relpath).parent)):
            return f"fetch it with `python -m util.io.download {asset.name}`"
    return ("fetch released weights with `python -m util.io.download NAME` (--list shows the names) "
            "or pass the right --resume / --ckpt / --init_outer_from path")


def resolve_checkpoint_path(path):
    """A checkpoint file, a run directory's checkpoint-last.pth, a published model folder (its model.safetensors
    names the folder too), or the snapshot folder of a Hub repo id USER/NAME[@REVISION] (downloaded into
    the Hugging Face cache, or found there when offline). A local path that exists wins over a repo id."""
    text = os.fspath(path)
    path = Path(text)
    if path.is_dir():
        if (path / CHECKPOINT_NAME).is_file():
            return path / CHECKPOINT_NAME
        if pretrained.is_pretrained_folder(path):
            return path
        raise FileNotFoundError(f"no {CHECKPOINT_NAME} in directory {path} (nor the {pretrained.CONFIG_NAME} of a "
                                f"published model): {fetch_hint(path)}")
    if path.is_file():
        if path.name == pretrained.WEIGHTS_NAME and pretrained.is_pretrained_folder(path.parent):
            return path.parent  # its config.json says what the weights are
        return path
    repo = pretrained.parse_repo_id(text)
    if repo is not None:
        from util.hub.remote import download  # huggingface_hub is imported only when a repo id is named
        return download(*repo)
    raise FileNotFoundError(f"checkpoint not found: {path}: {fetch_hint(path)}")


def _read_safetensors(path):
    """A checkpoint dict from a .safetensors file: the tensors under "model_ema" when its metadata says they
    are EMA weights (as export_safetensors writes), else "model"; "config" and "args" from the metadata.
    A file without metadata is a bare state dict."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        metadata = f.metadata() or {}
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    if not metadata:
        return tensors
    ckpt = {"model_ema" if metadata.get("weights") == "ema" else "model": tensors}
    for key in ("config", "args"):
        if key in metadata:
            ckpt[key] = json.loads(metadata[key])
    return ckpt


def _read_pretrained(folder):
    """A published model folder as a checkpoint dict: its config.json (validated, and checked against the
    weights' names and shapes), its weights as "model_ema" (or "model" when the metadata says live), and
    the run's args, epoch and evaluations from the weights' metadata."""
    config = pretrained.read_config(folder)
    tensors, metadata = pretrained.read_weights(folder)
    weights = Path(folder) / pretrained.WEIGHTS_NAME
    facts = pretrained.run_facts(metadata, weights)
    with torch.device("meta"):
        expected = build(config).state_dict()
    check_state_dict(expected, tensors, str(weights), config.family,
                     against=f"the model its {pretrained.CONFIG_NAME} describes", fix_label="The weights say")
    ckpt = {"config": config.to_dict(), "model_ema" if facts.pop("weights") == "ema" else "model": tensors}
    ckpt.update(facts)
    return ckpt


def _load(path):
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    # argparse.Namespace is allowed for this call only: the releases pickle their args with it
    with torch.serialization.safe_globals([argparse.Namespace]):
        # mmap keeps the unused optimizer state of a multi-GB release file out of memory
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))


def read_checkpoint(path):
    """Load a .pth/.pt/.ckpt (weights only) or .safetensors file, a run directory's checkpoint-last.pth, a
    published model folder or a Hub repo id (see resolve_checkpoint_path)."""
    path = resolve_checkpoint_path(path)
    if path.is_dir():
        return _read_pretrained(path)  # its errors name the file at fault
    try:
        ckpt = _load(path)
    except OSError:
        raise
    except Exception as err:  # every parser error means the same thing here: not a usable checkpoint
        raise ValueError(f"{path} is not a readable checkpoint: {why_unreadable(err)}") from err
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path} is not a checkpoint: it holds a {type(ckpt).__name__}, not a dict of weights")
    return ckpt


def checkpoint_args(ckpt):
    """The run arguments stored in a checkpoint as a dict ({} if none): ours are a dict, the releases' a Namespace."""
    args = ckpt.get("args") if isinstance(ckpt, dict) else None
    if isinstance(args, argparse.Namespace):
        return dict(vars(args))
    return dict(args) if isinstance(args, dict) else {}


def model_state_from_checkpoint(ckpt, use_ema=True):
    """The state dict to load: "model_ema" (if present and use_ema), else "model", else a bare state dict."""
    if not isinstance(ckpt, dict):
        raise ValueError(f"a checkpoint must be a dict; got {type(ckpt).__name__}")
    if use_ema and "model_ema" in ckpt:
        state = ckpt["model_ema"]
    elif "model" in ckpt:
        if use_ema:
            logger.warning("checkpoint has no EMA weights (model_ema); using its live weights (model)")
        state = ckpt["model"]
    elif "model_ema" in ckpt:
        logger.warning("checkpoint has no live weights (model), only EMA weights (model_ema, as a published "
                       "model folder holds): using the EMA weights")
        state = ckpt["model_ema"]
    else:
        state = ckpt
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError("checkpoint holds no model weights: expected a 'model' / 'model_ema' state dict or a "
                         f"bare state dict of tensors; found entries {list(ckpt)[:6]}")
    return state


# ----------------------------------------------------------------------------- names
def unwrap_model(model):
    """The plain module under DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def strip_wrapper_prefixes(state_dict):
    """Drop leading "module." (DDP) and "_orig_mod." (torch.compile) from every key."""
    stripped = {}
    for key, value in state_dict.items():
        while key.startswith(WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        stripped[key] = value
    return stripped


# ----------------------------------------------------------------------------- mismatch reports
def _shape(state, key):
    return tuple(state[key].shape) if key in state else None


def _num_blocks(state, prefix):
    """How many blocks `prefix`.N.* a state dict holds."""
    return len({key[len(prefix) + 1:].split(".")[0] for key in state if key.startswith(prefix + ".")})


def _model_names_with_width(width, family):
    """Presets of `family` whose outer width is `width`."""
    return [name for name, (owner, values) in PRESETS.items() if owner == family and values.get("width") == width]


def head_prefixes():
    """{state-dict prefix: --head} of every registered head."""
    return {entry.attr + ".": name for name, entry in HEADS.items()}


def head_of(state):
    """The --head whose keys a state dict carries (None if it has no head)."""
    return next((name for prefix, name in head_prefixes().items() if any(k.startswith(prefix) for k in state)), None)


def head_prefix(model):
    """The state-dict prefix of the model's per-token head ("arhead." for ARINAR); None for other modules."""
    attr = getattr(unwrap_model(model), "head_attr", None)
    return None if attr is None else attr + "."


def _likely_fixes(expected, found, family):
    """Flags that would make the model's keys/shapes (expected, a `family` model) match the file's (found)."""
    fixes = []
    carried, built = head_of(found), head_of(expected)
    if carried and carried != built:
        fixes.append(f"--head {carried} (the checkpoint carries the {carried} head, the model the {built} "
                     f"one; or keep --head {built} and take only the outer model with --init_outer_from PATH)")
    # every family embeds the class as [classes (+ a null row), width]
    width_file, width_model = _shape(found, "class_emb.weight"), _shape(expected, "class_emb.weight")
    if width_file and width_model and width_file[-1] != width_model[-1]:
        names = _model_names_with_width(width_file[-1], family)
        fixes.append(f"--model {' or '.join(names) or '<a model of that width>'} (checkpoint width "
                     f"{width_file[-1]}, model width {width_model[-1]})")
    for part in ("encoder_blocks", "decoder_blocks"):
        n_file, n_model = _num_blocks(found, part), _num_blocks(expected, part)
        if n_file and n_file != n_model:
            fixes.append(f"--enc_dec_depth {n_file} (checkpoint has {n_file} {part}, model {n_model})")
            break
    # --depth counts the scale-wise family's blocks and the causal family's self- and cross-attention ones
    depth_file, depth_model = (sum(_num_blocks(state, part) for part in ("blocks", "self_blocks", "cross_blocks"))
                               for state in (found, expected))
    if depth_file and depth_model and depth_file != depth_model:
        fixes.append(f"--depth {depth_file} (checkpoint has {depth_file} blocks, model {depth_model})")
    tokens_file, tokens_model = _shape(found, "z_proj.weight"), _shape(expected, "z_proj.weight")
    if tokens_file and tokens_model and tokens_file[1] != tokens_model[1]:
        fixes.append(f"--vae_embed_dim / --patch_size / --tokenizer (checkpoint tokens have {tokens_file[1]} "
                     f"features, the model's {tokens_model[1]} = vae_embed_dim x patch_size^2)")
    seq_file, seq_model = _shape(found, "diffusion_pos_embed_learned"), _shape(expected, "diffusion_pos_embed_learned")
    if seq_file and seq_model and seq_file[1] != seq_model[1]:
        fixes.append(f"--img_size / --vae_stride / --patch_size (checkpoint has {seq_file[1]} tokens per image, "
                     f"the model {seq_model[1]} = (img_size / vae_stride / patch_size)^2)")
    pos_file, pos_model = _shape(found, "encoder_pos_embed_learned"), _shape(expected, "encoder_pos_embed_learned")
    if seq_file and seq_model and pos_file and pos_model and pos_file[1] - seq_file[1] != pos_model[1] - seq_model[1]:
        fixes.append(f"--buffer_size {pos_file[1] - seq_file[1]}")
    classes_file, classes_model = _shape(found, "class_emb.weight"), _shape(expected, "class_emb.weight")
    if classes_file and classes_model and classes_file[0] != classes_model[0]:
        fixes.append(f"--class_num {classes_file[0]}")
    start = INNER_PREFIX + "start_token"
    inner_file, inner_model = _shape(found, start), _shape(expected, start)
    if inner_file and inner_model and inner_file[-1] != inner_model[-1]:
        fixes.append(f"--inner_ar_width {inner_file[-1]}")
    n_file, n_model = _num_blocks(found, INNER_PREFIX + "blocks"), _num_blocks(expected, INNER_PREFIX + "blocks")
    if n_file and n_file != n_model:
        fixes.append(f"--inner_ar_depth {n_file}")
    head_file, head_model = _shape(found, INNER_PREFIX + "head.weight"), _shape(expected, INNER_PREFIX + "head.weight")
    if head_file and head_model and head_file[0] != head_model[0]:
        fixes.append(f"--num_gaussians {head_file[0] // 3} (checkpoint head {list(head_file)} = 3K x width, "
                     f"model {list(head_model)})")
    return fixes


def _listed(items):
    more = ", ..." if len(items) > MAX_LISTED else ""
    return ", ".join(items[:MAX_LISTED]) + more


def check_state_dict(expected, found, source="checkpoint", family=None, against="the model", fix_label="Likely fix"):
    """Raise a one-line ValueError unless `found` has exactly the keys and shapes of `expected`, the state
    of a `family` model (default: the family of a file without a config, LEGACY_FALLBACKS):
    "<source> does not fit <against>: <what differs>. <fix_label>: <the flags the weights imply>"."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    reshaped = [f"{k} {list(found[k].shape)} vs model {list(expected[k].shape)}"
                for k in expected if k in found and tuple(found[k].shape) != tuple(expected[k].shape)]
    if not (missing or unexpected or reshaped):
        return
    parts = [f"{len(keys)} {what} ({_listed(keys)})"
             for what, keys in (("missing", missing), ("unexpected", unexpected),
                                ("with another shape", reshaped)) if keys]
    family = family or PRESETS[LEGACY_FALLBACKS["model"]][0]
    fixes = _likely_fixes(expected, found, family) or [
        "check --model and the config flags against the run that wrote it (its stored args)"]
    raise ValueError(f"{source} does not fit {against}: {'; '.join(parts)}. {fix_label}: {'; '.join(fixes)}")


# ----------------------------------------------------------------------------- loading into models
def load_model_weights(model, state_dict, source=""):
    """Strictly load `state_dict` (DDP/compile prefixes stripped) into `model`, or raise a ValueError naming the fix."""
    model = unwrap_model(model)
    state_dict = strip_wrapper_prefixes(state_dict)
    check_state_dict(model.state_dict(), state_dict, source or "checkpoint", model.config.family)
    model.load_state_dict(state_dict, strict=True)


def load_outer_weights(model, path, use_ema=True):
    """Initialise everything but the per-token head from a checkpoint of the model's family (for MAR's: the
    MAR and ARINAR releases too), ignoring the file's head. Every outer key must match strictly."""
    ckpt = read_checkpoint(path)
    model = unwrap_model(model)
    file_family = (ckpt.get("config") or {}).get("family")
    if file_family and file_family != model.config.family:
        raise ValueError(f"{path} holds a {file_family}-family outer model, this run builds a {model.config.family} "
                         f"one: pass --init_outer_from a {model.config.family} checkpoint, or --model a "
                         f"{file_family} preset ({', '.join(n for n, (f, _) in PRESETS.items() if f == file_family)})")
    state = strip_wrapper_prefixes(model_state_from_checkpoint(ckpt, use_ema))
    heads = tuple(head_prefixes())
    outer = {k: v for k, v in state.items() if not k.startswith(heads)}
    own = head_prefix(model)
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith(own)}
    check_state_dict(expected, outer, f"{path} (outer part)", model.config.family)
    missing, unexpected = model.load_state_dict(outer, strict=False)
    assert not unexpected and all(k.startswith(own) for k in missing)
    logger.info("initialised the outer model from %s (%s, %d tensors; ignored %d head tensors)", path,
                "EMA" if use_ema and "model_ema" in ckpt else "live weights", len(outer), len(state) - len(outer))


def freeze_outer(model):
    """Train only the per-token head: requires_grad stays on for its parameters alone. Returns the trainable names."""
    own = head_prefix(model)
    trainable = []
    for name, param in unwrap_model(model).named_parameters():
        param.requires_grad_(own is not None and name.startswith(own))
        if param.requires_grad:
            trainable.append(name)
    if not trainable:
        raise ValueError(f"the model has no per-token head parameters ({own or 'no head'}): nothing would be trained")
    return trainable


# ----------------------------------------------------------------------------- the model config
DEFAULT_HEAD = ModelConfig.head  # the head a file without head weights or args is taken to carry
# what a file without a stored config is taken to be when nothing in it says otherwise (the releases' model)
LEGACY_FALLBACKS = {"model": "mar_base", "tokenizer": "kl16", "img_channels": 3}


def facts_from_state(state):
    """What a state dict's keys and shapes say about the model, as flag values (for files without a config)."""
    facts = {"head": head_of(state)}
    depth = _num_blocks(state, "encoder_blocks")
    if depth:
        facts["enc_dec_depth"] = depth
    shapes = {
        "width": ("fake_latent", -1), "class_num": ("class_emb.weight", 0),
        "inner_ar_width": (INNER_PREFIX + "start_token", -1),
        "diffloss_w": ("diffloss.net.input_proj.weight", 0),
    }
    for flag, (key, dim) in shapes.items():
        if key in state:
            facts[flag] = int(state[key].shape[dim])
    if facts["head"] == "arinar":
        facts["inner_ar_depth"] = _num_blocks(state, INNER_PREFIX + "blocks")
    if facts["head"] == "diffloss":
        facts["diffloss_d"] = _num_blocks(state, "diffloss.net.res_blocks")
    return {k: v for k, v in facts.items() if v is not None}


def legacy_flags(ckpt, state, source="checkpoint"):
    """A file without `config` (ours before it, the ARINAR and MAR releases): the model flags its stored
    args hold, as their fields' types (MAR stores --num_sampling_steps as "100"), overruled by what its weights
    show. The releases store MAR's argparse names, ours the same."""
    owners = all_flag_fields()
    stored = {k: coerce(owners[k][0][0], v, f"{source}: args") for k, v in checkpoint_args(ckpt).items()
              if k in owners and v is not None}
    return {**LEGACY_FALLBACKS, **stored, **facts_from_state(state)}


def config_from_checkpoint(ckpt, state, given=None, source="checkpoint"):
    """The ModelConfig of a checkpoint, with the model flags given on the command line (`given`).

    A stored config is authoritative: a given flag that contradicts it is a one-line error (tunable
    settings such as dropout or --num_sampling_steps may change; they are logged). A file without a
    config is converted once from its args and weights; given flags fill what it does not say and
    must agree with what it does. Returns (config, {flag: (old, new)} of changed tunable settings).
    """
    given = {k: v for k, v in (given or {}).items() if v is not None}
    if "config" in ckpt:
        config = ModelConfig.from_dict(ckpt["config"], source=f"{source}: config")
        changed = check_flags_apply(config, given, source)
        return config_from_flags({k: new for k, (_, new) in changed.items()}, base=config), changed
    stored = legacy_flags(ckpt, state, source)
    family = stored.get("family") or PRESETS[stored["model"]][0]
    tunable = tunable_flags(family, stored.get("head") or DEFAULT_HEAD)
    for name, value in given.items():
        if name in stored and stored[name] != value and name not in tunable and name not in LEGACY_FALLBACKS:
            raise ValueError(f"--{name} {value} contradicts {source} ({name} {stored[name]}): drop the flag")
    changed = {k: (stored[k], v) for k, v in given.items() if k in tunable and k in stored and stored[k] != v}
    try:
        config = config_from_flags({**stored, **given})
    except ValueError as err:
        if checkpoint_args(ckpt) or "model" in given:  # stored arguments, or the user named the model: their error
            raise
        # nothing stored says what the model is: the weights' shapes and the preset's defaults disagree
        raise ValueError(f"{source} is a bare state dict (no config, no run arguments): name its model with "
                         f"--model PRESET and the flags it was trained with (--tokenizer, --img_size, --patch_size, "
                         f"--img_channels, --class_num, ...); as it stands: {err}") from None
    check_flags_apply(config, given, source)  # flags of another family or head
    return config, changed


# ----------------------------------------------------------------------------- conversion
def export_safetensors(src, dest, use_ema=True):
    """Write a checkpoint's model weights (EMA by default), its model config and run args to a .safetensors
    file, atomically; the metadata says which weights it holds."""
    ckpt = read_checkpoint(src)
    state = strip_wrapper_prefixes(model_state_from_checkpoint(ckpt, use_ema))
    config, _ = config_from_checkpoint(ckpt, state, source=str(src))
    ema = use_ema and "model_ema" in ckpt
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    try:
        # clone: safetensors refuses tensors that share storage
        save_safetensors({k: v.detach().clone() for k, v in state.items()}, str(tmp),
                         metadata={"args": json.dumps(checkpoint_args(ckpt), default=str),
                                   "config": json.dumps(config.to_dict()), "weights": "ema" if ema else "live"})
        os.chmod(tmp, 0o666 & ~current_umask())  # safetensors writes 0600; a team shares released weights
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()
    return dest


def main(argv=None):
    parser = argparse.ArgumentParser(description="Export a checkpoint's model weights to .safetensors")
    parser.add_argument("src", help="checkpoint file or run directory")
    parser.add_argument("dest", help="output .safetensors file")
    parser.add_argument("--no_ema", action="store_true", help="export the live weights instead of the EMA")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.dest.endswith(".safetensors"):
        parser.error(f"dest must end in .safetensors; got {args.dest}")
    try:
        dest = export_safetensors(args.src, args.dest, use_ema=not args.no_ema)
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    logger.info("wrote %s", dest)


if __name__ == "__main__":
    main()

"""The published model folder (what `python -m util.hub push` writes and uploads, what the Hub serves):

    config.json        the typed model config (ModelConfig.to_dict()) plus "arinar_format": 1
    model.safetensors  the EMA weights; its metadata entry "arinar" holds (as JSON) which weights they are
                       and the run's args, epoch and evaluations
    README.md          the model card

Only safetensors weights are ever read from such a folder (a pickle is never loaded), and config.json is
validated like any stored config. `read_checkpoint` (util/io/checkpoints.py) reads a folder as a
checkpoint dict {"config", "model_ema", "args", "epoch", "evaluations"}. Also here: whether a
--ckpt / --resume value is a Hub repo id (USER/NAME, optionally @REVISION).
"""
import json
import os
import re
import tempfile
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from models import ModelConfig
from util.io.files import atomic_write, current_umask, fsync_dir
from util.io.safe_load import why_unreadable

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
FILES = (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME)
FORMAT_KEY = "arinar_format"
FORMAT_VERSION = 1
META_KEY = "arinar"  # one metadata entry: safetensors writes several in no fixed order (the file's bytes would vary)

# USER/NAME[@REVISION] as the Hub spells repo ids (no "--" or "..", at most 96 characters); a name that
# ends like a weight file is a local path, never a repo id
_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?"
REPO_ID = re.compile(rf"(?P<repo>{_PART}/{_PART})(?:@(?P<revision>[A-Za-z0-9._/-]+))?")
WEIGHT_SUFFIXES = (".pth", ".pt", ".ckpt", ".safetensors", ".bin", ".json")


def parse_repo_id(text):
    """(repo_id, revision or None) when `text` reads as a Hub repo id USER/NAME[@REVISION], else None."""
    match = REPO_ID.fullmatch(os.fspath(text))
    if match is None:
        return None
    repo = match["repo"]
    if len(repo) > 96 or "--" in repo or ".." in repo or repo.endswith(".git") or repo.endswith(WEIGHT_SUFFIXES):
        return None
    return repo, match["revision"]


def is_pretrained_folder(path):
    """A folder holding config.json (and, when complete, model.safetensors): a published model."""
    path = Path(os.fspath(path))
    return path.is_dir() and (path / CONFIG_NAME).is_file()


# ----------------------------------------------------------------------------- reading
def read_config(folder):
    """The ModelConfig in folder/config.json, validated; a one-line ValueError naming the file otherwise."""
    path = Path(folder) / CONFIG_NAME
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path} must hold a JSON object; got {type(d).__name__}")
    version = d.pop(FORMAT_KEY, None)
    if version is None:
        raise ValueError(f"{path} has no {FORMAT_KEY!r} entry: not an arinar model folder (written by "
                         "`python -m util.hub push`)")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= FORMAT_VERSION:
        raise ValueError(f"{path}: {FORMAT_KEY} {version!r} is not one this code reads (1..{FORMAT_VERSION}): "
                         "update arinar")
    try:
        return ModelConfig.from_dict(d, source=str(path))
    except (TypeError, ValueError) as err:
        message = str(err)
        raise ValueError(message if message.startswith(str(path)) else f"{path}: {message}") from None


def read_weights(folder):
    """(tensors, metadata) of folder/model.safetensors; a one-line ValueError if it is not a safetensors file."""
    path = Path(folder) / WEIGHTS_NAME
    if not path.is_file():
        others = sorted(p.name for p in Path(folder).iterdir() if p.suffix in (".bin", ".pth", ".pt", ".ckpt"))
        found = f" (found {', '.join(others)}: pickled weights are never loaded)" if others else ""
        raise FileNotFoundError(f"{folder} has {CONFIG_NAME} but no {WEIGHTS_NAME}{found}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except OSError:
        raise
    except Exception as err:  # every parser error means the same thing here: not a usable weight file
        raise ValueError(f"{path} is not a readable safetensors file: {why_unreadable(err)}") from err
    return tensors, metadata


def run_facts(metadata, path):
    """{"weights", and where recorded "args", "epoch", "evaluations"} from the weights' metadata (a file
    without it holds EMA weights and no run facts)."""
    try:
        stored = json.loads(metadata.get(META_KEY, "{}"))
    except json.JSONDecodeError:
        raise ValueError(f"{path}: metadata {META_KEY!r} is not valid JSON") from None
    if not isinstance(stored, dict):
        raise ValueError(f"{path}: metadata {META_KEY!r} must be a JSON object")
    facts = {"weights": stored.get("weights", "ema")}
    if facts["weights"] not in ("ema", "live"):
        raise ValueError(f"{path}: metadata weights must be ema or live; got {facts['weights']!r}")
    for key, kind in (("args", dict), ("evaluations", list), ("epoch", int)):
        value = stored.get(key)
        if value is None:
            continue
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ValueError(f"{path}: metadata {key} must be a {kind.__name__}; got {type(value).__name__}")
        facts[key] = value
    return facts


# ----------------------------------------------------------------------------- writing
def check_destination(folder):
    """Refuse to write into a folder that holds anything but a published model's files (it may be a repo)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} is a file: write a published model to a new or empty folder")
    if folder.is_dir():
        foreign = sorted(p.name for p in folder.iterdir() if p.name not in FILES and p.name != ".cache")
        if foreign:
            listed = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise ValueError(f"{folder} holds other files ({listed}): write a published model to a new or empty "
                             "folder")


def write_folder(folder, config, state, facts, card):
    """Write the three files, each atomically (weights first: a config.json always has its weights)."""
    folder = Path(folder)
    check_destination(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stored = {key: facts[key] for key in ("weights", "args", "epoch", "evaluations") if facts.get(key) is not None}
    metadata = {META_KEY: json.dumps(stored, sort_keys=True, default=str)}
    _save_safetensors(state, folder / WEIGHTS_NAME, metadata)
    config_text = json.dumps({FORMAT_KEY: FORMAT_VERSION, **config.to_dict()}, indent=2) + "\n"
    atomic_write(folder / CONFIG_NAME, lambda f: f.write(config_text.encode()))
    atomic_write(folder / CARD_NAME, lambda f: f.write(card.encode()))
    return folder


def _save_safetensors(state, path, metadata):
    """safetensors' save_file to a temp name beside `path`, then renamed over it."""
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        # contiguous copies: safetensors refuses tensors that share storage
        save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, tmp, metadata=metadata)
        os.chmod(tmp, 0o666 & ~current_umask())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fsync_dir(path.parent)

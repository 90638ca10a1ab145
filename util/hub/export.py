"""save_pretrained / from_pretrained / push_to_hub for every family and head, and the conversion of any
checkpoint (ours, or the ARINAR and MAR releases through config_from_checkpoint's legacy conversion)
into a published model folder (util/io/pretrained.py)."""
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from models import ModelConfig, build
from util.hub.card import model_card
from util.hub.evaluations import evaluations_of
from util.io.checkpoints import (check_state_dict, checkpoint_args, config_from_checkpoint, load_model_weights,
                                 model_state_from_checkpoint, read_checkpoint, strip_wrapper_prefixes, unwrap_model)
from util.io.pretrained import write_folder

logger = logging.getLogger(__name__)
DEFAULT_LICENSE = "mit"  # MAR's (and so this code's) license; pass another for weights under other terms


@dataclass
class Published:
    """What a published folder holds: the config, the weights (the model's state-dict order) and the run's facts."""
    config: ModelConfig
    state: dict
    facts: dict = field(default_factory=dict)  # weights ("ema" / "live"), args, epoch, evaluations

    def num_params(self):
        with torch.device("meta"):
            return sum(p.numel() for p in build(self.config).parameters())

    def write(self, folder, name=None, license=DEFAULT_LICENSE):
        """Write config.json, model.safetensors and README.md to `folder`; name: what the card's commands load."""
        card = model_card(name or folder, self.config, self.num_params(), self.facts, license)
        return write_folder(folder, self.config, self.state, self.facts, card)


def published_from_checkpoint(path, eval_root=None):
    """A checkpoint (file, run folder, release, published folder or repo id) as a Published: its EMA weights
    (live ones only when it has none, said so), its config, args and epoch, and the evaluations in
    eval_root (default: the run folder) of exactly these weights."""
    ckpt = read_checkpoint(path)
    weights = "ema" if "model_ema" in ckpt else "live"
    state = strip_wrapper_prefixes(model_state_from_checkpoint(ckpt))
    config, _ = config_from_checkpoint(ckpt, state, source=str(path))
    with torch.device("meta"):
        expected = build(config).state_dict()
    check_state_dict(expected, state, str(path), config.family)
    state = {key: state[key] for key in expected}
    local = Path(path)
    run_folder = eval_root or (local if local.is_dir() else local.parent if local.is_file() else None)
    evaluations = evaluations_of(run_folder, state) if run_folder is not None and weights == "ema" else []
    epoch = ckpt.get("epoch")
    facts = {"weights": weights, "args": checkpoint_args(ckpt), "epoch": None if epoch is None else int(epoch),
             "evaluations": evaluations or list(ckpt.get("evaluations") or [])}
    return Published(config, state, facts)


def save_pretrained(model, folder, args=None, epoch=None, evaluations=(), name=None, license=DEFAULT_LICENSE):
    """Write `model` (any family and head) as a published folder. Its current weights are written as the EMA
    weights: pass the model with its EMA swapped in (util.train.ema.EMA.swapped_in), as published models hold."""
    model = unwrap_model(model)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    facts = {"weights": "ema", "args": dict(args or {}), "epoch": epoch, "evaluations": list(evaluations)}
    return Published(model.config, state, facts).write(folder, name=name, license=license)


def push_to_hub(model, repo_id, private=False, token=None, **card):
    """save_pretrained into a temporary folder, then upload it to Hub repo `repo_id` (created if needed)."""
    from util.hub.remote import upload
    with tempfile.TemporaryDirectory() as folder:
        save_pretrained(model, Path(folder) / "model", name=repo_id, **card)
        return upload(Path(folder) / "model", repo_id, private=private, token=token)


def from_pretrained(name, device="cpu"):
    """The model a published folder, Hub repo id (USER/NAME[@REVISION]) or any checkpoint holds, with its EMA
    weights, in eval mode on `device`."""
    ckpt = read_checkpoint(name)
    state = model_state_from_checkpoint(ckpt)
    config, _ = config_from_checkpoint(ckpt, state, source=str(name))
    model = build(config)
    load_model_weights(model, state, source=str(name))
    return model.to(device).eval()

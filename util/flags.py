"""Command-line flags shared by main_mar.py, sample.py, main_cache.py and bench/: each defined once.

The model flags are derived from the config dataclasses (models/config.py and every registered
family and head), so a new family or head brings its flags by registering. They default to None
("not given"): a fresh run takes them from the --model preset, a stored run from its checkpoint's
config, and a given flag that contradicts a stored config is an error (models.config.check_flags_apply).
"""
import argparse
from dataclasses import fields

from models import FAMILIES, HEADS, PRESETS, TokenConfig
from models.config import TOKENIZERS, all_flag_fields, field_kind, flag_name, with_token_defaults
from models.families.common import CFG_SCHEDULES, SamplingSettings
from models.gmm import CFG_SAMPLERS
from sampling.backends import PRECISION_HELP, PRECISIONS
from util.train.lr_sched import LR_SCHEDULES

CHOICES = {"model": lambda: sorted(PRESETS), "family": lambda: sorted(FAMILIES), "head": lambda: sorted(HEADS),
           "tokenizer": lambda: TOKENIZERS, "precision": lambda: sorted(PRECISIONS),
           "lr_schedule": lambda: LR_SCHEDULES}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except None or "" ("not given": the help says what applies then) and on a
    negative switch (store_false, as --no_pin_mem), whose default is its positive twin's."""

    def _get_help_string(self, action):
        if action.default in (None, "") or action.default is argparse.SUPPRESS or action.help is None or \
                isinstance(action, argparse._StoreFalseAction):
            return action.help
        return super()._get_help_string(action)


def parser(description):
    return argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)


def _default_text(owners, shown=True):
    """' (default: X)' from the dataclass defaults, per owner where they differ. shown=False: the dataclass's
    default even where the field's `shown` names a data set's (main_cache.py has no --dataset)."""
    shown = shown and owners[0][0].metadata.get("shown")
    if shown:
        return f" (default: {shown})"
    values = {owner: f.default for f, owner in owners}
    if len(set(map(repr, values.values()))) == 1:
        return f" (default: {next(iter(values.values()))})"
    return " (default: " + ", ".join(f"{v} with {o}" for o, v in values.items()) + ")"


def _help_text(owners):
    """The help of a flag that several families or heads may share: one text and its owners (when fewer than
    three), or where the owners' helps differ (--depth), each owner's own."""
    helps = {}
    for f, owner in owners:
        helps.setdefault(f.metadata.get("help", ""), []).append(owner)
    if len(helps) > 1:
        return "; ".join(f"{', '.join(where)}: {text}" for text, where in helps.items())
    where = sorted({o for _, o in owners if o})
    return next(iter(helps)) + (f" [{', '.join(where)}]" if where and len(where) < 3 else "")


def add_model_args(parser, tokens_only=False, training=True):
    """Every model flag (top level, tokens, each family's and head's fields; or the tokenizer's alone),
    defaulting to None = not given. training=False: a script that only samples (leaves out the flags that only
    shape training: dropouts, label drop, ...)."""
    title = "tokenizer" if tokens_only else \
        "model (a new run: the --model preset's values unless given; a stored run: its config)" if training else \
        "model (a checkpoint's stored config; flags fill what a file without one does not say)"
    group = parser.add_argument_group(title)
    token_flags = {flag_name(f) for f in fields(TokenConfig)}
    for name, owners in all_flag_fields().items():
        if tokens_only and name not in token_flags:
            continue
        if not training and all(f.metadata.get("training") for f, _ in owners):
            continue
        f, _ = owners[0]
        kind = field_kind(f)
        text = _help_text(owners)
        if f.metadata.get("tunable"):
            text += "; a resumed run may change it"
        group.add_argument(f"--{name}", type=kind, default=None, choices=CHOICES[name]() if name in CHOICES else None,
                           help=text + _default_text(owners, shown=not tokens_only))
    return group


def given_model_flags(args):
    """{flag: value} of the model flags the command line set."""
    return {name: getattr(args, name) for name in all_flag_fields() if getattr(args, name, None) is not None}


def token_config(args):
    """The TokenConfig the tokenizer flags give (for scripts without a model: main_cache.py)."""
    values = with_token_defaults(given_model_flags(args))
    tokens = TokenConfig(**{f.name: values[flag_name(f)] for f in fields(TokenConfig) if flag_name(f) in values})
    tokens.validate()
    return tokens


def add_tokenizer_file_args(group):
    group.add_argument("--vae_path", default="pretrained_models/vae/kl16.ckpt", help="KL-16 VAE checkpoint")
    group.add_argument("--pixel_levels", default=256, type=int,
                       help="grey levels of the data for --tokenizer pixel dequantisation (0 = none)")


def add_data_args(parser, writes_cache=False):
    """The data flags; writes_cache: the script writes --cached_path (main_cache.py) rather than reading it."""
    group = parser.add_argument_group("data")
    group.add_argument("--data_path", default="./data/imagenet", help="ImageFolder root (with train/)")
    group.add_argument("--cached_path", default="", help=(
        "folder to write the cached latents into (required)" if writes_cache else
        "cached latents to read with --use_cached (main_cache.py shards or MAR .npz)"))
    group.add_argument("--batch_size", default=16, type=int, help="images per process (global = x processes)")
    group.add_argument("--num_workers", default=10, type=int, help="DataLoader worker processes")
    group.add_argument("--pin_mem", action="store_true", help="pin CPU memory in the DataLoader (with CUDA)")
    group.add_argument("--no_pin_mem", action="store_false", dest="pin_mem", help="do not pin CPU memory")
    parser.set_defaults(pin_mem=True)
    add_tokenizer_file_args(group)
    return group


def add_sampling_args(parser, cfg=1.0, sweep=True):
    """How images are drawn: steps, guidance, temperature, and the backend (--cfg_sampler, --cuda_graphs,
    --compile). cfg: this script's default guidance; sweep: --cfg/--temperature take lists."""
    group = parser.add_argument_group("sampling")
    many = {"nargs": "+"} if sweep else {}
    group.add_argument("--num_iter", default=64, type=int, help="outer autoregressive steps")
    group.add_argument("--cfg", default=[cfg] if sweep else cfg, type=float, dest="cfg_list" if sweep else "cfg",
                       metavar="CFG", help="classifier-free guidance scale: 1 (none) or at least 1 + 1e-6" +
                       ("; several values: a sweep of every cfg x temperature" if sweep else ""), **many)
    group.add_argument("--cfg_schedule", default="linear", choices=CFG_SCHEDULES,
                       help="linear: the scale grows with the share of tokens generated (MAR); constant")
    group.add_argument("--temperature", default=[1.0] if sweep else 1.0, type=float,
                       dest="temperature_list" if sweep else "temperature", metavar="TEMPERATURE",
                       help="divides each Gaussian's std (> 0)" + ("; several values: a sweep" if sweep else ""),
                       **many)
    group.add_argument("--cfg_sampler", default="sir", choices=sorted(CFG_SAMPLERS),
                       help="sir: the release's 1000-candidate resampling; exact: inverse CDF of the guided density")
    group.add_argument("--cuda_graphs", default=None, action=argparse.BooleanOptionalAction,
                       help="replay each sampling step as CUDA graphs (default: on with CUDA, off elsewhere; same "
                            "math, far fewer launches)")
    group.add_argument("--compile", action="store_true",
                       help="torch.compile the outer network's repeated blocks and the pieces the head's "
                            "sampler declares (compile_regions), inside the CUDA-graph backend (CUDA only; one "
                            "compilation per block class)")
    return group


def add_precision_arg(group):
    group.add_argument("--precision", default=None, choices=CHOICES["precision"](), help=PRECISION_HELP)


def add_config_args(group, cls):
    """A flag for each field of the settings dataclass `cls` (as util/train/config.TrainConfig), with its
    default, help and choices; a bool field is a switch."""
    for f in fields(cls):
        name = flag_name(f)
        kind = field_kind(f)
        if kind is bool:
            group.add_argument(f"--{name}", action="store_true", help=f.metadata["help"])
            continue
        group.add_argument(f"--{name}", type=kind, default=f.default, help=f.metadata["help"],
                           choices=CHOICES[name]() if name in CHOICES else None)
    return group


def sampling_settings(args, **overrides):
    """The outer loop's settings (a SamplingSettings) from a run's or a CLI's arguments (a Namespace or
    dict), with `overrides` (e.g. one sweep point's cfg and temperature)."""
    values = {**(args if isinstance(args, dict) else vars(args)), **overrides}
    return SamplingSettings(**{f.name: values[f.name] for f in fields(SamplingSettings)})

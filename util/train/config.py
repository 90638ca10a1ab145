"""The typed training settings: what the training loop reads (engine_mar.train_one_epoch).

Each field carries its command-line flag (`models.config.flag` metadata, as the model's config
does), so main_mar.py derives these flags from the dataclass (util/flags.add_config_args) and their
ranges are checked in one place. A run records them in its checkpoint's `args`; a resumed run may
change any of them, and every change is logged (`changed_settings`).
"""
from dataclasses import dataclass, field, fields

from models.config import check_ranges, flag
from sampling.backends import PRECISION_HELP

NON_NEGATIVE = (">= 0", lambda v: v >= 0)
POSITIVE = ("> 0", lambda v: v > 0)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = field(default=400, metadata=flag("epochs to train in all", valid=NON_NEGATIVE))
    warmup_epochs: float = field(default=100, metadata=flag("linear lr warm-up (per iteration)", valid=NON_NEGATIVE))
    # before lr, which is resolved from it: a bad --blr is named as given
    blr: float = field(default=1e-4, metadata=flag("base lr per 256 images", valid=POSITIVE))
    lr: float = field(default=None, metadata=flag("absolute lr (default: blr x global batch / 256)", valid=POSITIVE))
    min_lr: float = field(default=0.0, metadata=flag("floor of the cosine schedule", valid=NON_NEGATIVE))
    lr_schedule: str = field(default="constant", metadata=flag("after the warm-up"))
    weight_decay: float = field(default=0.02, metadata=flag("AdamW decay of the outer weight matrices",
                                                            valid=NON_NEGATIVE))
    grad_clip: float = field(default=3.0, metadata=flag("max grad norm (0 = no clipping)", valid=NON_NEGATIVE))
    ema_rate: float = field(default=0.9999, metadata=flag("EMA decay per step", valid=("in [0, 1)",
                                                                                     lambda v: 0 <= v < 1)))
    precision: str = field(default=None, metadata=flag(PRECISION_HELP))
    grad_checkpointing: bool = field(default=False, metadata=flag(
        "recompute the outer blocks in the backward pass (less memory, more time)"))
    use_cached: bool = field(default=False, metadata=flag("train from --cached_path latents (main_cache.py)"))
    max_skipped_steps: int = field(default=10, metadata=flag(
        "stop after this many steps in a row skipped for a non-finite gradient"))
    log_freq: int = field(default=20, metadata=flag("steps between progress lines"))

    @classmethod
    def from_args(cls, args):
        """The settings a run's arguments (a Namespace) give; lr and precision as given or resolved."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})

    def validate(self):
        """One line naming the first setting out of its range (a setting not yet resolved, None, passes)."""
        check_ranges(self)
        return self

    def changed_settings(self, saved):
        """['--name new (was old)'] for every setting that differs from `saved`, a checkpoint's stored args dict
        (a setting it does not record is not compared)."""
        return [f"--{f.name} {getattr(self, f.name)} (was {saved[f.name]})" for f in fields(self)
                if f.name in saved and saved[f.name] != getattr(self, f.name)]

"""Networks and their math. `build(config)` is the one way to make a model:

    from models import build, create_model, ModelConfig
    model = create_model("mar_base", num_gaussians=4)      # a preset and flag-named overrides
    model = build(ckpt["config"])                           # a checkpoint's config (dict) or a ModelConfig

Importing this package registers every family (models/families/) and head (models/heads/).
"""
from models import families, heads  # noqa: F401  (registration)
from models.config import ModelConfig, TokenConfig, config_from_flags
from models.registry import FAMILIES, HEADS, PRESETS


def build(config):
    """The model a ModelConfig (or its to_dict() form, as checkpoints store it) describes, freshly initialised."""
    if isinstance(config, dict):
        config = ModelConfig.from_dict(config)
    config.validate()
    return FAMILIES[config.family].cls(config)


def create_model(name, **flags):
    """build() of preset `name` with flag-named overrides, e.g. create_model("mar_base", enc_dec_depth=12)."""
    return build(config_from_flags({**flags, "model": name}))


__all__ = ["FAMILIES", "HEADS", "PRESETS", "ModelConfig", "TokenConfig", "build", "config_from_flags",
           "create_model"]

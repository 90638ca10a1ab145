"""The typed model config: what `models.build` reads and every checkpoint stores as `config`.

    ModelConfig(model, family, head, class_num, tokens: TokenConfig,
                family_config: <the family's dataclass>, head_config: <the head's dataclass>)

`to_dict()` gives plain JSON values (loadable with torch.load(weights_only=True)); `from_dict`
rebuilds and validates it. Every field carries its command-line flag (`flag(...)` metadata), so the
flags are derived from the dataclasses (util/flags.py) and a config can be read from or compared with
flat {flag: value} dicts: `config_from_flags` (presets + flags) and `flat()`.

A field marked `tunable` is a training-time setting (dropout, label drop, ...): a resumed run may
change it. Any other field fixes the weights' shapes or meaning.
"""
import dataclasses
from dataclasses import dataclass, field, fields

from models.registry import FAMILIES, HEADS, PRESETS

TOKENIZERS = ("kl16", "pixel")


def flag(help, name=None, tunable=False, valid=None, shown=None, training=False):
    """Field metadata: the command-line flag (--<name>, default the field's name), its help, its range as
    (rule, predicate) (integers default to >= 1), the default --help shows when it is not the field's, and
    whether it only shapes training (a sampling script leaves it out of its flags)."""
    return {"flag": name, "help": help, "tunable": tunable, "valid": valid, "shown": shown, "training": training}


UNIT = ("in [0, 1]", lambda v: 0 <= v <= 1)


def check_ranges(part):
    """One line naming the first field of a config dataclass outside its range (None: not set, not checked)."""
    for f in fields(part):
        value = getattr(part, f.name)
        if value is None:  # not given, and not resolved yet
            continue
        rule, ok = f.metadata.get("valid") or ((">= 1", lambda v: v >= 1) if field_kind(f) is int else
                                               (None, None))
        if ok is not None and not (value == value and abs(value) != float("inf") and ok(value)):
            raise ValueError(f"--{flag_name(f)} must be {rule}; got {value}")


def flag_name(f):
    return f.metadata.get("flag") or f.name


@dataclass
class TokenConfig:
    """The tokenizer and the token geometry: images -> a seq_h x seq_w grid of token_dim features."""
    tokenizer: str = field(default="kl16", metadata=flag("kl16: MAR's KL-16 VAE; pixel: the pixels themselves"))
    img_size: int = field(default=256, metadata=flag("image side in pixels"))
    # before vae_embed_dim, which the pixel tokenizer derives from it: a bad value is named as given
    img_channels: int = field(default=3, metadata=flag("image channels (3 = RGB, 1 = grey)",
                                                       shown="the data set's: 3 imagenet, 1 digits"))
    vae_stride: int = field(default=16, metadata=flag("pixels per tokenizer position (pixel tokenizer: 1)"))
    vae_embed_dim: int = field(default=16, metadata=flag(
        "tokenizer channels per position (pixel tokenizer: the image channels)"))
    patch_size: int = field(default=1, metadata=flag("tokenizer positions per token side"))

    @property
    def seq_h(self):
        return self.img_size // (self.vae_stride * self.patch_size)

    @property
    def seq_w(self):
        return self.seq_h

    @property
    def seq_len(self):
        return self.seq_h * self.seq_w

    @property
    def token_dim(self):
        return self.vae_embed_dim * self.patch_size ** 2

    def validate(self):
        if self.tokenizer not in TOKENIZERS:
            raise ValueError(f"--tokenizer must be one of {', '.join(TOKENIZERS)}; got {self.tokenizer!r}")
        check_ranges(self)
        grid = self.vae_stride * self.patch_size
        if self.img_size % grid:
            raise ValueError(f"--img_size {self.img_size} must be a multiple of --vae_stride x --patch_size = {grid}")
        if self.tokenizer == "pixel" and (self.vae_stride, self.vae_embed_dim) != (1, self.img_channels):
            raise ValueError(f"--tokenizer pixel means --vae_stride 1 and --vae_embed_dim {self.img_channels} (the "
                             f"image channels); got {self.vae_stride} and {self.vae_embed_dim}")


@dataclass
class ModelConfig:
    model: str = field(default="mar_base", metadata=flag(
        "named preset: a family and its sizes", shown="mar_base, or the --family's own default preset"))
    family: str = field(default="mar", metadata=flag("outer model family", shown="the --model preset's"))
    head: str = field(default="arinar", metadata=flag("per-token head"))
    class_num: int = field(default=1000, metadata=flag("classes", shown="the data set's: 1000 imagenet, 10 digits"))
    tokens: TokenConfig = field(default_factory=TokenConfig)
    family_config: object = None  # the family's config dataclass
    head_config: object = None    # the head's config dataclass

    def __post_init__(self):
        if self.family_config is None:
            self.family_config = FAMILIES[self.family].config()
        if self.head_config is None:
            self.head_config = HEADS[self.head].config()

    # ------------------------------------------------------------------ plain dicts
    def to_dict(self):
        """Plain JSON values, `family` and `head` at the top level."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d, source="config"):
        """Rebuild from to_dict()'s output; an unknown or missing part is a one-line ValueError naming `source`."""
        if not isinstance(d, dict):
            raise ValueError(f"{source}: a model config must be a dict; got {type(d).__name__}")
        parts = {"tokens": TokenConfig, "family_config": FAMILIES[d.get("family", "mar")].config,
                 "head_config": HEADS[d.get("head", "arinar")].config}
        top = {f.name: f for f in fields(cls)}
        unknown = sorted(set(d) - set(top))
        if unknown:
            raise ValueError(f"{source}: unknown model config entries {', '.join(unknown)}")
        values = {k: coerce(top[k], v, source) for k, v in d.items() if k not in parts}
        values.update({k: _dataclass_from_dict(part, d.get(k) or {}, f"{source}: {k}") for k, part in parts.items()})
        return cls(**values).validate()

    # ------------------------------------------------------------------ flat {flag: value}
    def parts(self):
        """The dataclasses this config is made of, itself first."""
        return [self, self.tokens, self.family_config, self.head_config]

    def flat(self):
        """{flag name: value} over every field (the command line's view of this config)."""
        return {flag_name(f): getattr(part, f.name) for part in self.parts() for f in fields(part)
                if f.name not in ("tokens", "family_config", "head_config")}

    def tunable_flags(self):
        return tunable_flags(self.family, self.head)

    def validate(self):
        # `model` names the preset the config started from; a stored config stands alone without it
        if self.model in PRESETS and PRESETS[self.model][0] != self.family:
            raise ValueError(f"--model {self.model} is a {PRESETS[self.model][0]} model, not --family {self.family}")
        for part, expected in ((self.family_config, FAMILIES[self.family].config),
                               (self.head_config, HEADS[self.head].config)):
            if not isinstance(part, expected):
                raise ValueError(f"{type(part).__name__} is not the config of {expected.__name__}")
        check_ranges(self)
        self.tokens.validate()
        for part in self.parts()[2:]:
            check_ranges(part)
            check = getattr(part, "validate", None)
            if check is not None:
                check(self.tokens)
        return self


def field_kind(f):
    """A dataclass field's type (int, float, bool, str), also when annotations are strings; None for others."""
    return f.type if isinstance(f.type, type) else {"int": int, "float": float, "bool": bool, "str": str}.get(f.type)


def coerce(f, value, source):
    """A stored value as the field's type (JSON has no int/float distinction for 1.0; MAR stores some ints as str)."""
    kind = field_kind(f)
    if kind in (int, float) and isinstance(value, bool):  # a bool is an int in Python: true is not 1 here
        raise ValueError(f"{source}: {f.name} must be {kind.__name__}; got {value!r}")
    if kind in (int, float, str) and not isinstance(value, bool):
        try:
            converted = kind(value)
        except (TypeError, ValueError):
            raise ValueError(f"{source}: {f.name} must be {kind.__name__}; got {value!r}") from None
        if kind is int and converted != float(value):
            raise ValueError(f"{source}: {f.name} must be an integer; got {value!r}")
        return converted
    if kind is bool and not isinstance(value, bool):
        raise ValueError(f"{source}: {f.name} must be true or false; got {value!r}")
    return value


def _dataclass_from_dict(cls, d, source):
    if not isinstance(d, dict):
        raise ValueError(f"{source} must be a dict; got {type(d).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ValueError(f"{source}: unknown entries {', '.join(unknown)} for {cls.__name__}")
    return cls(**{k: coerce(known[k], v, source) for k, v in d.items()})


def _pick(cls, values):
    """cls(**the fields whose flags `values` holds), each as the field's type."""
    return cls(**{f.name: coerce(f, values[flag_name(f)], "flags") for f in fields(cls) if flag_name(f) in values})


def preset_for(values):
    """The preset name (--model) a flat dict selects: its own, else its family's default, else mar_base."""
    if values.get("model") is not None:
        return values["model"]
    if values.get("family") is not None:
        return FAMILIES[values["family"]].default
    return "mar_base"


def with_token_defaults(values):
    """The pixel tokenizer's implied settings (stride 1, one feature per image channel) where not given."""
    if values.get("tokenizer") == "pixel":
        values = {"vae_stride": 1, "vae_embed_dim": values.get("img_channels", TokenConfig.img_channels), **values}
    return values


def config_from_flags(values, base=None):
    """A ModelConfig from flat {flag: value} (None = not given) over `base` (a stored config) or else
    over the preset the values select. Flags that belong to another family or head are ignored here
    (check_flags_apply tells the user); the result is validated."""
    values = {k: v for k, v in values.items() if v is not None}
    if base is not None:
        merged = {**base.flat(), **values}
    else:
        name = preset_for(values)
        family, preset = PRESETS[name]
        merged = with_token_defaults({"family": family, **preset, **values, "model": name})
    family, head = merged.get("family", "mar"), merged.get("head", "arinar")
    top = {f.name: coerce(f, merged[f.name], "flags") for f in fields(ModelConfig) if f.name in merged}
    config = ModelConfig(**{**top, "family": family, "head": head,
                            "tokens": _pick(TokenConfig, merged),
                            "family_config": _pick(FAMILIES[family].config, merged),
                            "head_config": _pick(HEADS[head].config, merged)})
    return config.validate()


def tunable_flags(family, head):
    """The flags of settings a stored run may change (training- or sampling-only: dropout, label drop, ...)."""
    parts = (ModelConfig, TokenConfig, FAMILIES[family].config, HEADS[head].config)
    return {flag_name(f) for part in parts for f in fields(part) if f.metadata.get("tunable")}


def check_flags_apply(config, given, source="the checkpoint"):
    """Flags given on the command line against a config: a flag of another family or head is an error,
    a value that contradicts a non-tunable field is an error; returns {flag: (old, new)} of tunable changes."""
    given = {k: v for k, v in given.items() if v is not None}
    own = config.flat()
    changed = {}
    for name, value in given.items():
        if name not in own:
            raise ValueError(f"--{name} is not a setting of --family {config.family} with --head {config.head}")
        if own[name] == value:
            continue
        if name not in config.tunable_flags():
            raise ValueError(f"--{name} {value} contradicts {source}'s config ({name} {own[name]}): drop the flag "
                             "(a stored run rebuilds itself) or start a new run")
        changed[name] = (own[name], value)
    return changed


def all_flag_fields():
    """{flag name: [(field, owner label)]} over the top level, the tokens, every family and every head."""
    owners = [(ModelConfig, None), (TokenConfig, None)]
    owners += [(entry.config, f"--family {entry.name}") for entry in FAMILIES.values()]
    owners += [(entry.config, f"--head {entry.name}") for entry in HEADS.values()]
    out = {}
    for cls, owner in owners:
        for f in fields(cls):
            if f.name in ("tokens", "family_config", "head_config"):
                continue
            out.setdefault(flag_name(f), []).append((f, owner))
    return out

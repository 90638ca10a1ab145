"""The registries: outer families, per-token heads and the named presets (`--model`).

A family or head joins with one decorator line beside its class:

    @register_head("arinar", config=InnerARConfig, attr="arhead")
    class InnerAR(nn.Module): ...

    @register_family("mar", config=MARConfig, presets={"mar_base": {...}, ...}, default="mar_base")
    class MAR(nn.Module): ...

A preset is a flat dict of flag values (the same names as the command line). Unknown names are
one-line ValueErrors listing the choices.
"""
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Entry:
    name: str
    cls: type     # the nn.Module
    config: type  # its config dataclass
    attr: str = None  # heads: the attribute (and state-dict prefix) the releases use
    default: str = None  # families: the preset --family alone selects


class Registry(dict):
    """name -> Entry; a missing name is a ValueError naming the flag and the choices."""

    def __init__(self, flag):
        super().__init__()
        self.flag = flag

    def __missing__(self, name):
        raise ValueError(f"unknown --{self.flag} {name!r}; choose one of {', '.join(sorted(self))}")


FAMILIES = Registry("family")
HEADS = Registry("head")
PRESETS = Registry("model")  # preset name -> (family, {flag: value})


def register_family(name, config, presets, default):
    """Class decorator: the outer family `name` with its config dataclass and its presets."""
    def add(cls):
        FAMILIES[name] = Entry(name, cls, config, default=default)
        for preset, values in presets.items():
            PRESETS[preset] = (name, dict(values))
        return cls
    return add


def register_head(name, config, attr):
    """Class decorator: the per-token head `name`, built as cls(token_dim, cond_dim, **config fields),
    stored as model.<attr> (so its state-dict keys start with `attr.`)."""
    def add(cls):
        HEADS[name] = Entry(name, cls, config, attr=attr)
        return cls
    return add


def build_head(model, config, cond_dim):
    """Attach the head config.head names to `model` under its release attribute; returns it."""
    entry = HEADS[config.head]
    head = entry.cls(config.tokens.token_dim, cond_dim, **asdict(config.head_config))
    setattr(model, entry.attr, head)
    model.head_name, model.head_attr = entry.name, entry.attr
    return head

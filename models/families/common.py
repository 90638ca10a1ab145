"""What every outer family's sampler shares: steps a backend runs, the default backend, schedules,
CFG settings and the partial canvas.

A family's sampling loop owns its schedule and canvas and calls only:
    with backend.autocast(): ...
    backend.run(step, *tensors)                     # a Step: the piece worth capturing as a graph
    backend.buffers(key, make)                      # zeroed tensors a Step writes in place (KV cache)
    backend.sample_head(head, z, temperature, cfg)  # the per-token head's sampler
`EagerSteps` below is the default backend; sampling/backends.py adds precision, the CFG sampler
choice and CUDA graphs behind the same four calls.
"""
import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from models.token_grid import patchify, unpatchify

CFG_SCHEDULES = ("linear", "constant")


@dataclass(frozen=True)
class Step:
    """fn(module, *tensors): a piece of a sampling step that a backend may capture and replay.

    fn must not synchronise with the host, and its output shapes must depend only on its input
    shapes. `inplace` lists argument positions that are persistent buffers fn writes into (a KV
    cache): a capturing backend uses those tensors themselves, so the caller preallocates them and
    passes the same tensors on every call. `module` holds the weights fn reads. `regions` lists the
    repeated blocks that fn calls (submodules of `module`): a compiling backend compiles their class's
    forward once for all of them and runs the rest of fn as it is.
    """
    name: str
    module: nn.Module
    fn: Callable
    inplace: tuple = ()
    regions: tuple = ()

    def __call__(self, *args):
        return self.fn(self.module, *args)


class OuterModel(nn.Module):
    """What every family's network shares: its config (`config`, `tokens`), its head under the release's
    attribute (`head`, set up by models.registry.build_head), and the token layout of its latents."""

    grad_checkpointing = False  # set by the training script

    def __init__(self, config):
        super().__init__()
        self.config, self.tokens = config, config.tokens

    @property
    def head(self):
        """The per-token head (--head): ARINAR's inner AR, MAR's diffusion MLP or a whole-token mixture."""
        return getattr(self, self.head_attr)

    def run_blocks(self, blocks, x, *args):
        """x through each block in turn, block(x, *args); with grad_checkpointing while training, each
        block's activations are recomputed in the backward pass instead of kept."""
        for block in blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, *args, use_reentrant=False)
            else:
                x = block(x, *args)
        return x

    def sampling_steps(self, num_iter):
        """How many outer steps sample_tokens(num_iter=num_iter) takes (what an evaluation is named by)."""
        return num_iter

    def patchify(self, latents):
        return patchify(latents, self.tokens)

    def unpatchify(self, tokens):
        return unpatchify(tokens, self.tokens)


class EagerSteps:
    """The default backend: steps run as they are under the caller's autocast; the release's CFG sampler."""

    name = "eager"
    cfg_sampler = "sir"

    def autocast(self):
        return contextlib.nullcontext()

    def run(self, step, *args):
        return step(*args)

    def buffers(self, key, make):
        """Zeroed persistent tensors for Steps' `inplace` arguments (a KV cache): `make()`'s (a tensor or a
        tuple). A capturing backend hands out the same tensors for the same key on every call; this one
        makes them anew, so nothing outlives the call."""
        return make()

    def sample_head(self, head, z, temperature, cfg):
        return head.sample(z, temperature, cfg, cfg_sampler=self.cfg_sampler)


class CapturedBuffers:
    """For backends that capture Steps by address: `buffers` hands out the same tensors for a key on
    every call, zeroed (a captured graph writes into the tensors it was captured with)."""

    def buffers(self, key, make):
        kept = self.__dict__.setdefault("_captured_buffers", {})
        if key not in kept:
            kept[key] = make()
        for t in kept[key] if isinstance(kept[key], tuple) else (kept[key],):
            t.zero_()
        return kept[key]


@dataclass
class SamplingSettings:
    """The outer loop's settings, as every family's sample_tokens takes them (keyword arguments)."""
    num_iter: int = 64
    cfg: float = 1.0
    cfg_schedule: str = "linear"
    temperature: float = 1.0


# below this distance from 1 a ramped guidance scale can round to exactly 1, which a head reads as "not guided"
MIN_GUIDANCE = 1e-6


def check_sampling_settings(num_iter, cfg, temperature, cfg_schedule):
    """The outer loop's settings, checked in this one place for every family and entry point (the flags
    carry the same names, so the messages name them)."""
    if not num_iter >= 1:
        raise ValueError(f"--num_iter must be >= 1; got {num_iter}")
    if not (cfg == 1 or 1 + MIN_GUIDANCE <= cfg < math.inf):
        raise ValueError(f"--cfg must be 1 (no guidance) or finite and at least 1 + {MIN_GUIDANCE:g}; got {cfg!r}")
    if not 0 < temperature < math.inf:
        raise ValueError(f"--temperature must be > 0 and finite (it divides each Gaussian's std); got {temperature!r}")
    if cfg_schedule not in CFG_SCHEDULES:
        raise ValueError(f"--cfg_schedule must be one of {CFG_SCHEDULES}; got {cfg_schedule!r}")


def cfg_scale(cfg, cfg_schedule, known, total):
    """The guidance scale of a step: constant, or MAR's linear ramp 1 + (cfg - 1) * known / total with
    `known` the tokens the outer model will have seen once the step is done."""
    return 1 + (cfg - 1) * known / total if cfg_schedule == "linear" else cfg


def cosine_schedule(num_unknown, num_iter, cfg=1.0, cfg_schedule="linear", seq_len=None):
    """[(tokens still to generate after step s, cfg scale of step s)] on MAR's cosine schedule.

    The schedule spans the `num_unknown` tokens to generate (all seq_len of them unless part of the
    canvas is given). The count is clamped so every step but the last generates at least one token
    and at least one is left for the last step (which generates all that remain). The linear CFG
    scale grows with the share of the seq_len tokens known, using that clamped count (>= 1).
    """
    return step_schedule(num_unknown, num_iter, cfg, cfg_schedule, seq_len, kind="cosine")


# share of the tokens still to generate once `done` of `total` steps are done; 256 tokens in 64 steps:
# cosine (MAR, ARPG) ~1 a step early and ~7 late, arccos (ARPG's option) ~3 early and 28 in the last step
STEP_SCHEDULES = {
    "cosine": lambda done, total: math.cos(math.pi / 2 * done / total),
    "arccos": lambda done, total: math.acos(done / total) / (math.pi / 2),
}


def step_schedule(num_unknown, num_iter, cfg=1.0, cfg_schedule="linear", seq_len=None, kind="cosine"):
    """cosine_schedule() with the masking curve `kind` (a key of STEP_SCHEDULES)."""
    if kind not in STEP_SCHEDULES:
        raise ValueError(f"the step schedule must be one of {', '.join(STEP_SCHEDULES)}; got {kind!r}")
    share_left = STEP_SCHEDULES[kind]
    seq_len = num_unknown if seq_len is None else seq_len
    steps, masked = [], num_unknown
    for s in range(num_iter):
        mask_len = math.floor(num_unknown * share_left(s + 1, num_iter))
        mask_len = max(1, min(masked - 1, mask_len))
        steps.append((mask_len, cfg_scale(cfg, cfg_schedule, seq_len - mask_len, seq_len)))
        masked = mask_len
    return steps


def canvas(tokens_config, bsz, known, keep, dtype, device):
    """(tokens [bsz, L, D] holding the kept tokens, keep [bsz, L] bool) for a partial canvas.

    known: latents [bsz, C, H, W] (x the tokenizer's scale) or None; keep: bool [bsz, L] (True = keep
    the token bit for bit) or None (generate everything).
    """
    seq_len, token_dim = tokens_config.seq_len, tokens_config.token_dim
    tokens = torch.zeros(bsz, seq_len, token_dim, device=device, dtype=dtype)
    if keep is None:
        return tokens, torch.zeros(bsz, seq_len, dtype=torch.bool, device=device)
    keep = torch.as_tensor(keep, device=device)
    if keep.dtype != torch.bool or tuple(keep.shape) != (bsz, seq_len):
        raise ValueError(f"keep must be a bool [bsz, seq_len] = [{bsz}, {seq_len}] mask (True = keep the "
                         f"token); got {keep.dtype} {list(keep.shape)}")
    if known is None:
        raise ValueError("keep needs known=LATENTS: the latents whose kept tokens are copied")
    check_latents(tokens_config, known)
    if known.shape[0] != bsz:
        raise ValueError(f"known holds {known.shape[0]} canvases for bsz {bsz}")
    given = patchify(known.to(device=device, dtype=dtype), tokens_config)
    return torch.where(keep[..., None], given, tokens), keep


def check_latents(tokens_config, latents):
    t = tokens_config
    side = t.seq_h * t.patch_size
    expected = (t.vae_embed_dim, side, side)
    if not torch.is_tensor(latents) or latents.dim() != 4 or tuple(latents.shape[1:]) != expected:
        got = list(latents.shape) if torch.is_tensor(latents) else type(latents).__name__
        raise ValueError(f"latents must be [B, {', '.join(map(str, expected))}] (img_size {t.img_size} / "
                         f"vae_stride {t.vae_stride}, tokenizer latents x its scale); got {got}")


def check_labels(labels, batch_size, class_num, values=True):
    """Class ids' shape and dtype, and with `values` their range: reading a GPU tensor's values waits for
    the GPU's queued work, so training forwards (values=False) leave the range to the training loop,
    which checks the labels on the host."""
    if not torch.is_tensor(labels) or labels.dtype not in (torch.int64, torch.int32) or labels.dim() != 1:
        raise ValueError(f"labels must be a 1-D integer tensor of {batch_size} class ids; got {labels!r:.80}")
    if labels.numel() != batch_size:
        raise ValueError(f"labels must hold {batch_size} class ids (one per image); got {labels.numel()}")
    if values and labels.numel() and (labels.min() < 0 or labels.max() >= class_num):
        raise ValueError(f"labels must be in [0, {class_num}) (class_num); "
                         f"got values in [{int(labels.min())}, {int(labels.max())}]")


def canvas_dtype(module):
    """Sampled tokens are kept in float32, or float64 for a float64 model (never narrowed)."""
    return torch.promote_types(next(module.parameters()).dtype, torch.float32)

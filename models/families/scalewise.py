"""The `scalewise` family: next-scale prediction on continuous tokens (VAR; M-VAR's decoupled mixer).

The token grid [B, D, n, n] is generated coarse to fine over the scales of models/multiscale.py
(1, 2, 3, 4, 5, 6, 8, 10, 13, 16 for 16 x 16; 1, 2, 3, 4 for the digits' 4 x 4): scale k's p_k^2
tokens are the residual h_k, drawn by the per-token head from the z the outer model gives each of
them; f_hat accumulates the bicubic upsampled residuals and the next scale's input is f_hat resized
to that scale. The first scale's input is the class embedding (the start token) plus a start position;
every input gets a level embedding and a position embedding; the blocks are AdaLN-conditioned on
the class (VAR). Two mixers (`--mixer`):
- var: block-causal attention (a token sees every token of its own and the earlier scales);
- mvar: M-VAR's decoupling: attention inside a scale only, and a causal selective scan (Mamba) over
  the tokens in scale order for the dependency across scales.

Training teacher-forces all scales in one pass (the inputs are the f_hat of the true latents) with
the head's loss on every token of every scale. Sampling takes one step a scale (`num_iter` is
ignored: the grid fixes the steps); the per-scale network is one Step with a preallocated KV cache
(var) or the scan's carried state (mvar), so a CUDA-graph backend captures one graph a scale.
CFG doubles the batch with the null class (an extra class-embedding row) and ramps linearly over
the scales: scale k of S (1-based) is guided with 1 + (cfg - 1) * k / S (cfg_schedule "linear": MAR's
ramp by steps done). VAR's ramp is 1 + c * (k - 1) / (S - 1), so its cfg c is about our 1 + c; the ARINAR
release's var sampler guides every scale alike (cfg_schedule "constant").
Editing (known/keep) is VAR's zero-shot editing: at every scale but the last, each cell whose
footprint lies wholly in the kept region takes the kept region's residual measured against f_hat as
sampled so far (models.multiscale.kept_residual: the free coarse scales' offset is corrected at the
first forced scale, so the network sees the kept region as in training; nothing outside `keep` is
read); the last scale is the full grid, where the kept tokens are copied over the sample bit for bit.
"""
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from tqdm import tqdm

from models.config import UNIT, flag
from models.families.common import (EagerSteps, OuterModel, Step, canvas, canvas_dtype, cfg_scale, check_labels,
                                    check_latents, check_sampling_settings)
from models.layers import activation_dtype
from models.multiscale import (accumulate, covered, grid_to_seq, kept_residual, residuals, resize, scale_bounds,
                               scale_ids, scales_for, seq_to_grid)
from models.registry import build_head, register_family
from models.scalewise_blocks import AdaLNBeforeHead, ScaleBlock, SelectiveScanMixer
from models.token_grid import patchify, unpatchify

MIXERS = ("var", "mvar")


@dataclass
class ScalewiseConfig:
    """The outer model's config; the defaults are the ARINAR release's var_d16."""
    mixer: str = field(default="var", metadata=flag(
        "scalewise: var = block-causal attention; mvar = attention inside a scale + a selective scan across"))
    width: int = field(default=1024, metadata=flag("outer model width"))
    depth: int = field(default=16, metadata=flag("outer AdaLN blocks (var: attention; mvar: attention + scan)"))
    num_heads: int = field(default=16, metadata=flag("outer attention heads"))
    mlp_ratio: float = field(default=4.0, metadata=flag("outer MLP width / width", valid=("> 0", lambda v: v > 0)))
    ssm_state: int = field(default=16, metadata=flag("mvar: selective-scan state size per channel"))
    ssm_expand: int = field(default=2, metadata=flag("mvar: scan channels / width"))
    ssm_conv: int = field(default=4, metadata=flag("mvar: causal conv width before the scan"))
    drop_path: float = field(default=0.0, metadata=flag(
        "scalewise: stochastic depth of the last block (linear from 0 over the blocks)", tunable=True, training=True,
        valid=("in [0, 1)", lambda v: 0 <= v < 1)))
    label_drop_prob: float = field(default=0.1, metadata=flag(
        "training: share of labels replaced by the fake class (for CFG)", tunable=True, training=True, valid=UNIT))

    def validate(self, tokens):
        if self.mixer not in MIXERS:
            raise ValueError(f"--mixer must be one of {', '.join(MIXERS)}; got {self.mixer!r}")
        if self.width % self.num_heads:
            raise ValueError(f"--width {self.width} must be a multiple of --num_heads {self.num_heads}")


PRESETS = {
    # the ARINAR release's var_d16 (its inner head as wide as the outer model); with VAR's AdaLN norm before
    # the head (head_nm, 2.1M), which the release leaves out
    "var_d16": {"mixer": "var", "width": 1024, "depth": 16, "num_heads": 16, "drop_path": 0.1 * 16 / 24,
                "inner_ar_width": 1024},
    # M-VAR's block (attention + scan + MLP) at var_d16's parameter count: 16 blocks of 832 (13 heads of 64)
    "mvar_d16": {"mixer": "mvar", "width": 832, "depth": 16, "num_heads": 13, "drop_path": 0.1 * 16 / 24,
                 "inner_ar_width": 1024},
    # ARINAR-B's outer parameter count (200.5M) at its width, with its head: the families benchmark's size
    "var_base": {"mixer": "var", "width": 768, "depth": 19, "num_heads": 12},
    "mvar_base": {"mixer": "mvar", "width": 768, "depth": 12, "num_heads": 12},
    # the CPU demo's, about mar_tiny's size (0.94M parameters with the inner head)
    "scalewise_tiny": {"mixer": "var", "width": 128, "depth": 3, "num_heads": 4, "inner_ar_width": 64},
    # (the scan at expand 1 and 8 states: its sequential loop dominates a CPU step otherwise)
    "mvar_tiny": {"mixer": "mvar", "width": 112, "depth": 3, "num_heads": 4, "ssm_expand": 1, "ssm_state": 8,
                  "inner_ar_width": 64},
}


@register_family("scalewise", config=ScalewiseConfig, presets=PRESETS, default="var_d16")
class ScalewiseAR(OuterModel):
    def __init__(self, config):
        super().__init__(config)
        t = self.tokens
        c = self.family_config = config.family_config
        width = c.width
        self.mixer = c.mixer
        self.class_num = config.class_num
        self.label_drop_prob = c.label_drop_prob
        self.side, self.token_dim = t.seq_h, t.token_dim
        self.scales = scales_for(self.side)
        self.bounds = scale_bounds(self.scales)
        self.num_tokens = self.bounds[-1][1]

        self.class_emb = nn.Embedding(config.class_num + 1, width)  # the last row is the null class (CFG)
        self.pos_start = nn.Parameter(torch.zeros(1, self.scales[0] ** 2, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, width))
        self.lvl_embed = nn.Embedding(len(self.scales), width)
        self.word_embed = nn.Linear(self.token_dim, width)
        rates = [c.drop_path * i / max(1, c.depth - 1) for i in range(c.depth)]  # VAR's linear rule
        scan = (lambda: SelectiveScanMixer(width, c.ssm_expand, c.ssm_state, c.ssm_conv)) if self.mixer == "mvar" \
            else (lambda: None)
        self.blocks = nn.ModuleList(ScaleBlock(width, c.num_heads, c.mlp_ratio, scan(), rate) for rate in rates)
        self.head_nm = AdaLNBeforeHead(width)

        levels = scale_ids(self.scales)
        self.register_buffer("levels", levels, persistent=False)
        # var: a token sees its own and every earlier scale; mvar: its own scale only (the scan does the rest)
        visible = levels[:, None] >= levels[None, :] if self.mixer == "var" else levels[:, None] == levels[None, :]
        self.register_buffer("attn_mask", visible, persistent=False)
        self.initialize_weights()
        # created after the outer init, which must not touch it
        build_head(self, config, cond_dim=width)

    def sampling_steps(self, num_iter):
        return len(self.scales)  # one step a scale, whatever num_iter says

    @property
    def null_class(self):
        return self.class_num

    @torch.no_grad()
    def initialize_weights(self):
        """VAR's init: truncated normal std sqrt(1/(3 width)), residual projections / sqrt(2 depth), the
        AdaLN scale/shift rows x 0.5 and gate rows x 1e-3 (the ARINAR release's init_adaln_gamma)."""
        width, depth = self.family_config.width, len(self.blocks)
        std = (1 / width / 3) ** 0.5
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding, nn.Conv1d)):
                nn.init.trunc_normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        for p in (self.pos_start, self.pos_embed):
            nn.init.trunc_normal_(p, std=std)
        for block in self.blocks:
            block.attn.proj.weight.div_((2 * depth) ** 0.5)
            block.ffn.fc2.weight.div_((2 * depth) ** 0.5)
            ada = block.ada_lin[1].weight
            gates = block.branches * width
            ada[:gates].mul_(1e-3)
            ada[gates:].mul_(0.5)
            if block.scan is not None:
                block.scan.out_proj.weight.div_((2 * depth) ** 0.5)
                block.scan.reset_scan_parameters()
        self.head_nm.ada_lin[1].weight.mul_(0.5)

    # ---------------------------------------------------------------- inputs
    def class_vectors(self, labels, batch_size, drop_labels=False):
        """Class embeddings [B, W]; labels None = the null class; label drop (training) to the null class."""
        device = self.class_emb.weight.device
        if labels is None:
            ids = torch.full((batch_size,), self.null_class, device=device)
        else:
            check_labels(labels, batch_size, self.class_num, values=False)  # forward and sample_tokens check them
            ids = labels.to(device=device, dtype=torch.long)
            if drop_labels and self.label_drop_prob > 0:
                drop = torch.rand(batch_size, device=device) < self.label_drop_prob
                ids = torch.where(drop, torch.full_like(ids, self.null_class), ids)
        return self.class_emb(ids)

    def embed_scale(self, tokens, cond, k):
        """Scale k's inputs: tokens [B, p*p, D] (resized f_hat; unused at k = 0, where the class vector
        and the start position stand in) -> [B, p*p, W] with level and position embeddings."""
        start, end = self.bounds[k]
        if k == 0:
            x = cond.unsqueeze(1) + self.pos_start
        else:
            x = self.word_embed(tokens)
        return x + self.lvl_embed.weight[k] + self.pos_embed[:, start:end]

    def embed(self, inputs, cond):
        """All scales at once: inputs [B, L - p_1^2, D] (the inputs of scales 2..S in order) -> [B, L, W]."""
        first = cond.unsqueeze(1) + self.pos_start
        x = torch.cat([first, self.word_embed(inputs)], dim=1)
        return x + self.lvl_embed(self.levels) + self.pos_embed

    # ---------------------------------------------------------------- network
    def condition(self, inputs, cond):
        """Teacher forcing: inputs [B, L - p_1^2, D] (see embed), class vectors [B, W] -> z [B, L, W]."""
        x = self.run_blocks(self.blocks, self.embed(inputs, cond), cond, self.attn_mask)
        return self.head_nm(x, cond)

    def scale_step(self, tokens, cond, k, *state):
        """Sampling, scale k: inputs [B, p*p, D] and class vectors -> z [B, p*p, W]; state (new_state's
        buffers) is read and written in place: var's KV cache, mvar's scan state and conv inputs."""
        x = self.embed_scale(tokens, cond, k)
        start = self.bounds[k][0]
        for i, block in enumerate(self.blocks):
            if self.mixer == "var":
                x = block(x, cond, cache=state[0][i], start=start)
            else:
                x = block(x, cond, state=(state[0][i], state[1][i]))
        return self.head_nm(x, cond)

    def new_state(self, rows, device):
        """The sampler's per-call buffers, zero: var [depth, 2, rows, H, L, hd] keys and values in the
        activation dtype; mvar (scan states [depth, rows, E*W, N] in the math dtype, conv inputs)."""
        c, depth = self.family_config, len(self.blocks)
        if self.mixer == "var":
            dtype = activation_dtype(device, self.pos_embed.dtype)
            shape = (depth, 2, rows, c.num_heads, self.num_tokens, c.width // c.num_heads)
            return (torch.zeros(shape, dtype=dtype, device=device),)
        scans = [block.scan.new_state(rows, canvas_dtype(self), device) for block in self.blocks]
        return tuple(torch.stack(parts) for parts in zip(*scans))

    # ---------------------------------------------------------------- training
    def forward(self, latents, labels):
        """The head's loss averaged over every token of every scale (teacher-forced residual targets)."""
        check_latents(self.tokens, latents)
        grid = seq_to_grid(patchify(latents, self.tokens), self.side)
        targets, inputs = residuals(grid, self.scales)
        if labels is not None:  # training leaves their range to the training loop (a host sync), as MAR does
            check_labels(labels, grid.shape[0], self.class_num, values=not self.training)
        cond = self.class_vectors(labels, grid.shape[0], drop_labels=self.training)
        # the inputs of scales 2..S in order (none on a 1 x 1 grid)
        inputs = torch.cat([grid.new_zeros(grid.shape[0], 0, self.token_dim)] + [grid_to_seq(x) for x in inputs], 1)
        z = self.condition(inputs, cond).flatten(0, 1)
        target = torch.cat([grid_to_seq(h) for h in targets], dim=1).flatten(0, 1)
        # the diffusion head sees each token `train_repeats` times (target and its own z together)
        repeats = self.head.train_repeats
        return self.head.loss(target.repeat(repeats, 1), z.repeat(repeats, 1)).mean()

    # ---------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample_tokens(self, bsz, num_iter=64, cfg=1.0, cfg_schedule="linear", labels=None, temperature=1.0,
                      known=None, keep=None, backend=None, progress=False):
        """Generate latents [bsz, C, h, w] (divide by the tokenizer's scale before decoding), one step a
        scale (num_iter is ignored). known [bsz, C, h, w] and keep [bsz, seq_len] bool (True = keep that
        token) edit: see the module doc. backend: from sampling.make_backend (default: eager under
        the caller's autocast)."""
        check_sampling_settings(num_iter, cfg, temperature, cfg_schedule)
        guided = cfg != 1.0
        if guided and labels is None:
            raise ValueError("cfg > 1 needs class labels (pass labels=...) or use cfg=1.0")
        if labels is not None:
            check_labels(labels, bsz, self.class_num)
        backend = backend or EagerSteps()
        device = self.pos_embed.device
        with backend.autocast():
            editing = keep is not None
            tokens, keep = canvas(self.tokens, bsz, known, keep, canvas_dtype(self), device)
            forced = self.kept_region(tokens, keep) if editing else None
            cond = self.class_vectors(labels.to(device) if labels is not None else None, bsz)
            if guided:
                cond = torch.cat([cond, self.class_vectors(None, bsz).to(cond.dtype)])
            grid = self.generate(backend, cond, bsz, guided, cfg, cfg_schedule, temperature, forced, tokens.dtype,
                                 progress)
            tokens = torch.where(keep[..., None], tokens, grid_to_seq(grid))
        return unpatchify(tokens, self.tokens)

    def generate(self, backend, cond, bsz, guided, cfg, cfg_schedule, temperature, forced, dtype, progress):
        """The scale loop: f_hat [bsz, D, n, n] after the last scale."""
        both = (lambda t: torch.cat([t, t])) if guided else (lambda t: t)
        rows, device = cond.shape[0], cond.device
        lowp = activation_dtype(device)
        # from the backend: a CUDA-graph backend captured the state by address and hands out the same tensors
        state = backend.buffers((f"scalewise.{self.mixer}.state", rows, device, lowp),
                                lambda: self.new_state(rows, device))
        step = Step(f"scalewise.{self.mixer}", self, ScalewiseAR.scale_step,
                    inplace=tuple(range(3, 3 + len(state))))
        f_hat = torch.zeros(bsz, self.token_dim, self.side, self.side, dtype=dtype, device=cond.device)
        inputs = f_hat.new_zeros(bsz, self.scales[0] ** 2, self.token_dim)  # the first scale reads the class only
        num_scales = len(self.scales)
        for k, p in enumerate(tqdm(self.scales, disable=not progress, desc="sampling")):
            z = backend.run(step, both(inputs), cond, k, *state)
            scale = cfg_scale(cfg, cfg_schedule, k + 1, num_scales) if guided else 1.0
            h = backend.sample_head(self.head, z.flatten(0, 1), temperature, scale)
            h = seq_to_grid(h.view(bsz, p * p, self.token_dim).to(dtype), p)
            if forced is not None and k < num_scales - 1:
                known, keep_grid, cells = forced
                h = torch.where(cells[k], kept_residual(f_hat, known, keep_grid, p).to(h.dtype), h)
            f_hat = accumulate(f_hat, h)
            if k + 1 < num_scales:
                inputs = grid_to_seq(resize(f_hat, self.scales[k + 1]))
        return f_hat

    # ---------------------------------------------------------------- editing
    def kept_region(self, tokens, keep):
        """(the canvas as a grid [B, D, n, n], the kept positions [B, 1, n, n], [cells whose residual is
        forced at scale k [B, 1, p, p] bool for every scale but the last]). The last scale needs none: it
        is the full grid, whose kept tokens are copied over the sample."""
        keep_grid = seq_to_grid(keep.unsqueeze(-1), self.side)
        return (seq_to_grid(tokens, self.side), keep_grid, [covered(keep_grid, p) for p in self.scales[:-1]])

"""The `mar` family: MAR's masked encoder-decoder outer model, its training loss and its sampler.

The outer model sees the tokens generated so far (masked ones are dropped in the encoder and
replaced by a mask token in the decoder) plus the class, and emits a condition z for every token;
the per-token head (`--head`, models/heads/) turns z into the token. Parameter names match the
released ARINAR checkpoint, and the outer part matches MAR's.

Sampling (`sample_tokens`): a random order per image over the tokens to generate, MAR's cosine
schedule over `num_iter` outer steps, the batch doubled for CFG; each step runs the outer model as
one Step (what a CUDA-graph backend captures) and the head's sampler on the predicted positions.
A partial canvas (`keep` True = given) is the general case: kept tokens come back bit for bit.
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from models.attention import attention
from models.config import UNIT, flag
from models.families.common import (EagerSteps, OuterModel, Step, canvas, canvas_dtype, check_labels, check_latents,
                                    check_sampling_settings, cosine_schedule)
from models.layers import Mlp, init_linears_and_norms_, take
from models.registry import build_head, register_family


# ----------------------------------------------------------------------------- outer blocks
class Attention(nn.Module):
    def __init__(self, dim, num_heads, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x, queries=None):
        """x: [B, N, C]. queries: optional [B, P] positions; only their outputs are computed."""
        b, n, c = x.shape
        if queries is None:
            q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        else:
            w_q, w_kv = self.qkv.weight.split([c, 2 * c])
            b_q, b_kv = self.qkv.bias.split([c, 2 * c])
            k, v = F.linear(x, w_kv, b_kv).view(b, n, 2, self.num_heads, -1).permute(2, 0, 3, 1, 4)
            q = F.linear(take(x, queries), w_q, b_q).view(b, -1, self.num_heads, c // self.num_heads).transpose(1, 2)
        x = attention(q, k, v, (c // self.num_heads) ** -0.5, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, -1, c)))


class Block(nn.Module):
    """Pre-norm ViT block (the layout and key names of timm's Block, which MAR used)."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, attn_drop, proj_drop)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), proj_drop)

    def forward(self, x, queries=None):
        """queries: optional [B, P] positions: the block's output there only, [B, P, C]."""
        h = self.norm1(x)
        if queries is not None:
            x = take(x, queries)
        x = x + self.attn(h, queries)
        return x + self.mlp(self.norm2(x))


def positions(flags):
    """Positions of the True entries of a [B, L] bool with the same count per row: [B, n], ascending."""
    counts = flags.sum(1)
    if (counts != counts[0]).any():
        raise ValueError(f"every row must flag the same number of tokens; got counts {counts.tolist()[:8]}")
    # a stable sort keeps the flagged positions in their original (ascending) order
    return flags.to(torch.uint8).sort(dim=1, descending=True, stable=True).indices[:, :int(counts[0])]


# ----------------------------------------------------------------------------- schedules
def sample_mask_ratio(min_ratio=0.7, mean=1.0, std=0.25):
    """One mask ratio from a normal(mean, std) truncated to [min_ratio, 1], by inverse CDF."""
    normal = torch.distributions.Normal(0.0, 1.0)
    lo, hi = normal.cdf(torch.tensor((min_ratio - mean) / std)), normal.cdf(torch.tensor((1.0 - mean) / std))
    u = lo + (hi - lo) * torch.rand(())
    return float((mean + std * torch.special.ndtri(u)).clamp(min_ratio, 1.0))


# ----------------------------------------------------------------------------- the family
@dataclass
class MARConfig:
    """The outer model's config; the defaults are ARINAR-B's (the mar_base preset)."""
    width: int = field(default=768, metadata=flag("outer model width"))
    depth: int = field(default=14, metadata=flag("outer blocks per side (encoder and decoder; MAR-B: 12)",
                                                 name="enc_dec_depth"))
    num_heads: int = field(default=12, metadata=flag("outer attention heads"))
    mlp_ratio: float = field(default=4.0, metadata=flag("outer MLP width / width", valid=("> 0", lambda v: v > 0)))
    buffer_size: int = field(default=64, metadata=flag("class-vector buffer slots"))
    mask_ratio_min: float = field(default=0.7, metadata=flag(
        "lowest training mask ratio", tunable=True, training=True, valid=("in (0, 1]", lambda v: 0 < v <= 1)))
    label_drop_prob: float = field(default=0.1, metadata=flag(
        "training: share of labels replaced by the fake class (for CFG)", tunable=True, training=True, valid=UNIT))
    attn_dropout: float = field(default=0.1, metadata=flag("attention dropout", tunable=True, training=True,
                                                           valid=UNIT))
    proj_dropout: float = field(default=0.1, metadata=flag("projection/MLP dropout", tunable=True, training=True,
                                                           valid=UNIT))

    def validate(self, tokens):
        if self.width % self.num_heads:
            raise ValueError(f"--width {self.width} must be a multiple of --num_heads {self.num_heads}")


PRESETS = {
    # the CPU demo's (make demo): no dropout
    "mar_tiny": {"width": 128, "num_heads": 4, "enc_dec_depth": 2, "buffer_size": 4, "inner_ar_width": 64,
                 "attn_dropout": 0.0, "proj_dropout": 0.0},
    "mar_base": {"width": 768, "num_heads": 12, "enc_dec_depth": 14},  # ARINAR-B; enc_dec_depth 12: MAR-B
    "mar_large": {"width": 1024, "num_heads": 16, "enc_dec_depth": 16},
    "mar_huge": {"width": 1280, "num_heads": 16, "enc_dec_depth": 20},
}


@register_family("mar", config=MARConfig, presets=PRESETS, default="mar_base")
class MAR(OuterModel):
    def __init__(self, config):
        super().__init__(config)
        t = self.tokens
        c = config.family_config
        width = c.width
        self.seq_len, self.token_embed_dim = t.seq_len, t.token_dim
        self.buffer_size = c.buffer_size
        self.class_num = config.class_num
        self.label_drop_prob = c.label_drop_prob
        self.mask_ratio_min = c.mask_ratio_min
        total = c.buffer_size + self.seq_len

        # directly owned tensors first, in the release's order (the state_dict follows it)
        self.fake_latent = nn.Parameter(torch.zeros(1, width))
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, total, width))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, total, width))
        # the third position table (named for MAR's diffusion head) is added to z itself
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len, width))

        self.class_emb = nn.Embedding(config.class_num, width)
        self.z_proj = nn.Linear(self.token_embed_dim, width)
        self.z_proj_ln = nn.LayerNorm(width, eps=1e-6)
        blocks = lambda: nn.ModuleList(Block(width, c.num_heads, c.mlp_ratio, c.attn_dropout, c.proj_dropout)
                                       for _ in range(c.depth))
        self.encoder_blocks = blocks()
        self.encoder_norm = nn.LayerNorm(width, eps=1e-6)
        self.decoder_embed = nn.Linear(width, width)
        self.decoder_blocks = blocks()
        self.decoder_norm = nn.LayerNorm(width, eps=1e-6)
        self.initialize_weights()
        # created after the outer init, which must not touch it; registered under the release's key name
        build_head(self, config, cond_dim=width)

    @torch.no_grad()
    def initialize_weights(self):
        for p in (self.class_emb.weight, self.fake_latent, self.mask_token, self.encoder_pos_embed_learned,
                  self.decoder_pos_embed_learned, self.diffusion_pos_embed_learned):
            nn.init.normal_(p, std=0.02)
        init_linears_and_norms_(self)

    # ---------------------------------------------------------------- tokens and inputs
    def check_mask(self, mask, batch_size):
        if tuple(mask.shape) != (batch_size, self.seq_len):
            raise ValueError(f"mask must be [B, seq_len] = [{batch_size}, {self.seq_len}] with 1 = masked; "
                             f"got {list(mask.shape)}")
        mask = mask.bool()
        counts = mask.sum(1)
        if (counts != counts[0]).any() or counts[0] == 0:
            raise ValueError("mask must mask the same number (>= 1) of tokens in every image; got counts "
                             f"{counts.tolist()[:8]}")
        return mask

    def class_embedding(self, labels, batch_size, drop_labels=False):
        """Class vectors [B, D]; labels None -> the learned fake (unconditional) class."""
        fake = self.fake_latent.expand(batch_size, -1)
        if labels is None:
            return fake
        check_labels(labels, batch_size, self.class_num, values=not self.training)
        emb = self.class_emb(labels.long())
        if drop_labels:
            # fake_latent stays in every training graph, as in the release: DDP expects a gradient for each
            # parameter (with --label_drop_prob 0 it is zero, so AdamW's decay alone moves the fake class)
            drop = (torch.rand(batch_size, device=emb.device) < self.label_drop_prob if self.label_drop_prob > 0
                    else torch.zeros(batch_size, dtype=torch.bool, device=emb.device))
            emb = torch.where(drop[:, None], fake.to(emb.dtype), emb)
        return emb

    def random_orders(self, batch_size, device):
        """(a random order per image [B, L], how many of each order's first tokens are masked)."""
        num_masked = math.ceil(sample_mask_ratio(self.mask_ratio_min) * self.seq_len)
        return torch.argsort(torch.rand(batch_size, self.seq_len, device=device), dim=1), num_masked

    def random_mask(self, batch_size, device):
        """A random order per image; the first ceil(ratio * seq_len) of each order are masked."""
        return self.mask_from_orders(*self.random_orders(batch_size, device))

    @staticmethod
    def mask_from_orders(orders, num_masked):
        mask = torch.zeros(orders.shape, dtype=torch.bool, device=orders.device)
        return mask.scatter_(1, orders[:, :num_masked], True)

    # ---------------------------------------------------------------- outer network
    def condition(self, tokens, mask, class_vec, predict=None):
        """Outer encoder-decoder: tokens [B, L, Dt], mask [B, L] bool, class_vec [B, D] -> z [B, L, Dd].

        predict: optional [B, L] bool with the same count P in every row: z at those positions
        only, [B, P, Dd] in the order z[predict] has (the last decoder block runs its queries there only).
        """
        return self.condition_at(tokens, positions(~mask), class_vec, None if predict is None else positions(predict))

    def condition_at(self, tokens, keep, class_vec, predict=None):
        """condition() on index tensors and free of host syncs (the outer Step of sampling).

        keep: [B, n] ascending positions of the unmasked tokens; predict: optional [B, P] positions.
        """
        b = tokens.shape[0]
        # per-token projection and norm only where the encoder will look
        kept = self.z_proj(take(tokens, keep))
        slots = torch.arange(self.buffer_size, device=keep.device).expand(b, -1)
        keep = torch.cat([slots, keep + self.buffer_size], dim=1)  # the class buffer is always kept
        buffer = class_vec.to(kept.dtype).unsqueeze(1).expand(b, self.buffer_size, -1)
        x = torch.cat([buffer, kept], dim=1) + take(self.encoder_pos_embed_learned.expand(b, -1, -1), keep)
        x = self.encoder_norm(self.run_blocks(self.encoder_blocks, self.z_proj_ln(x)))

        x = self.decoder_embed(x)
        full = self.mask_token.to(x.dtype).expand(b, self.buffer_size + self.seq_len, -1)
        x = full.scatter(1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]), x) + self.decoder_pos_embed_learned
        if predict is None:
            x = self.decoder_norm(self.run_blocks(self.decoder_blocks, x))
            return x[:, self.buffer_size:] + self.diffusion_pos_embed_learned
        x = self.run_blocks(self.decoder_blocks[:-1], x)
        x = self.decoder_norm(self.run_blocks(self.decoder_blocks[-1:], x, predict + self.buffer_size))
        return x + take(self.diffusion_pos_embed_learned.expand(b, -1, -1), predict)

    # ---------------------------------------------------------------- training
    def forward(self, latents, labels, mask=None):
        """The head's loss averaged over masked tokens (ARINAR: mixture NLL summed over features).

        mask: optional [B, L] bool (True = predict), the same count in every row; default a random
        order per image with a truncated-normal mask ratio. The outer model's last block and the head
        run on the masked positions only, gathered with a count known on the host (no sync, and the
        shapes are static for a given count).
        """
        check_latents(self.tokens, latents)
        tokens = self.patchify(latents)
        b = tokens.shape[0]
        if mask is None:
            orders, num_masked = self.random_orders(b, tokens.device)
            visible, masked = orders[:, num_masked:].sort(dim=1).values, orders[:, :num_masked].sort(dim=1).values
        else:
            mask = self.check_mask(mask, b)
            visible, masked = positions(~mask), positions(mask)
        class_vec = self.class_embedding(labels, b, drop_labels=self.training)
        z = self.condition_at(tokens, visible, class_vec, masked).flatten(0, 1)
        target = take(tokens, masked).flatten(0, 1)
        # MAR's diffusion head sees each masked token `train_repeats` times; the mean is unchanged
        repeats = self.head.train_repeats
        return self.head.loss(target.repeat(repeats, 1), z.repeat(repeats, 1)).mean()

    # ---------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample_tokens(self, bsz, num_iter=64, cfg=1.0, cfg_schedule="linear", labels=None, temperature=1.0,
                      known=None, keep=None, backend=None, progress=False):
        """Generate latents [bsz, C, h, w] (divide by the tokenizer's scale before decoding).

        known [bsz, C, h, w] latents and keep [bsz, seq_len] bool (True = keep that token) fill part of
        the canvas; only the other tokens are generated, each image in its own random order. Rows that
        generate different numbers of tokens run as separate groups (the encoder needs the same count
        of visible tokens in every row). backend: from sampling.make_backend (default: eager under the
        caller's autocast).
        """
        check_sampling_settings(num_iter, cfg, temperature, cfg_schedule)
        guided = cfg != 1.0
        if guided and labels is None:
            raise ValueError("cfg > 1 needs class labels (pass labels=...) or use cfg=1.0")
        backend = backend or EagerSteps()
        device = self.fake_latent.device
        with backend.autocast():
            class_vec = self.class_embedding(labels.to(device) if labels is not None else None, bsz)
            tokens, keep = canvas(self.tokens, bsz, known, keep, canvas_dtype(self), device)
            unknown = (~keep).sum(1)
            for count in unknown.unique().tolist():
                if count == 0:
                    continue  # nothing to generate in these rows
                rows = (unknown == count).nonzero().squeeze(1)
                tokens[rows] = self.fill(backend, tokens[rows], keep[rows], class_vec[rows], count, num_iter, cfg,
                                         cfg_schedule, temperature, progress)
        return self.unpatchify(tokens)

    def fill(self, backend, tokens, keep, class_vec, num_unknown, num_iter, cfg, cfg_schedule, temperature, progress):
        """Generate the `num_unknown` tokens that `keep` leaves open in every row of `tokens` [b, L, D]."""
        b, guided = tokens.shape[0], cfg != 1.0
        both = (lambda t: torch.cat([t, t])) if guided else (lambda t: t)
        if guided:
            class_vec = torch.cat([class_vec, self.fake_latent.expand(b, -1).to(class_vec.dtype)])
        outer = Step("mar.outer", self, MAR.condition_at, regions=(*self.encoder_blocks, *self.decoder_blocks))
        # a random order per image; kept tokens sort last, so the first `masked` entries are still to generate
        scores = torch.rand(b, self.seq_len, device=tokens.device)
        orders = torch.argsort(scores.masked_fill(keep, 2.0), dim=1)
        masked = num_unknown
        schedule = cosine_schedule(num_unknown, num_iter, cfg, cfg_schedule, seq_len=self.seq_len)
        for step, (mask_len, cfg_scale) in enumerate(tqdm(schedule, disable=not progress, desc="sampling")):
            if step == num_iter - 1:
                mask_len = 0
            if mask_len == masked:
                continue  # fewer tokens to generate than steps
            visible = orders[:, masked:].sort(dim=1).values
            predict = orders[:, mask_len:masked].sort(dim=1).values
            z = backend.run(outer, both(tokens), both(visible), class_vec, both(predict))  # [rows, P, D]
            features = backend.sample_head(self.head, z.flatten(0, 1), temperature, cfg_scale if guided else 1.0)
            tokens = tokens.scatter(1, predict.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]),
                                    features.view(b, -1, tokens.shape[-1]).to(tokens.dtype))
            masked = mask_len
        return tokens

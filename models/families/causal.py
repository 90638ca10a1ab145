"""The `causal` family: a causal random-order outer model (ARPG-style) with a KV cache.

Network (ARPG, arXiv 2503.10568). The class token, then the content tokens in a per-image random order,
pass depth/2 causal self-attention blocks; 2-D RoPE (models/rope.py) turns each token's queries and
keys by its own (row, col). One shared projection of their output gives the keys and values of the
other depth/2 blocks: cross-attention blocks whose queries do not depend on the data (a learned
query vector plus a learned embedding of the target position, turned by the target's RoPE). The
query for the i-th target of an order sees the class token and content tokens 0..i-1 of that order;
its last output, normed, is z for the per-token head.

Sampling (`sample_tokens`): the kept tokens of a partial canvas first (a teacher-forced prefill),
then the others in a random order, k_s of them a step (cosine or arccos schedule). Each step appends
the tokens drawn in the previous step to a KV cache preallocated once per call, then asks k_s
queries at once; queries of one step see the same cache, so their tokens are drawn independently
given the earlier ones. Both pieces are Steps writing the cache in place at index-tensor slots and
attending over the whole cache with a validity mask, so their shapes depend only on the token and
query counts (one CUDA graph each).

Cache layout: one tensor [depth/2 + 1, 2 (keys, values), rows, heads, seq_len, head_dim]; entry
l < depth/2 is self-attention block l's, the last entry the shared keys/values of the cross half.
Slot 0 holds the class token, slot p + 1 the content token at place p of the order (the last token
of an order is never a key, so seq_len slots suffice).
"""
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from tqdm import tqdm

from models.attention import attention
from models.config import UNIT, flag
from models.families.common import (STEP_SCHEDULES, EagerSteps, OuterModel, Step, canvas, canvas_dtype, check_labels,
                                    check_latents, check_sampling_settings, step_schedule)
from models.layers import Mlp, activation_dtype, init_linears_and_norms_, take
from models.registry import build_head, register_family
from models.rope import grid_angles, rotate, rotation


# ----------------------------------------------------------------------------- attention pieces
def split_heads(x, num_heads):
    """[B, n, W] -> [B, heads, n, W / heads]."""
    return x.unflatten(-1, (num_heads, -1)).transpose(1, 2)


def merge_heads(x):
    return x.transpose(1, 2).flatten(2)


def per_head(rot):
    """A rotation [B, n, d] (CausalAR.rotation) broadcast over heads: [B, 1, n, d] views."""
    return tuple(t.unsqueeze(1) for t in rot)


def attend(q, k, v, visible=None, causal=False, dropout_p=0.0):
    """softmax(q k^T / sqrt(d)) v; visible: optional bool [B, n_q, n_k] (True = the query sees that key)."""
    return attention(q, k, v, q.shape[-1] ** -0.5, causal=causal, dropout_p=dropout_p,
                     mask=None if visible is None else visible.unsqueeze(1))


def write_slots(buffer, slots, values):
    """buffer [B, heads, S, d][b, :, slots[b, i]] = values[b, :, i] in place (slots [B, n])."""
    index = slots[:, None, :, None].expand(-1, buffer.shape[1], -1, buffer.shape[3])
    buffer.scatter_(2, index, values.to(buffer.dtype))


@torch.compiler.disable  # compiled, the writes became a copy of the whole layer cache; eager, they are in place
def write_kv(cache, slots, k, v):
    """A layer's cache [2, B, heads, S, d]: keys k and values v [B, heads, n, d] written at slots [B, n]."""
    write_slots(cache[0], slots, k)
    write_slots(cache[1], slots, v)


class SelfAttentionBlock(nn.Module):
    """Pre-norm block: causal self-attention with RoPE on q and k, then an MLP."""

    def __init__(self, width, num_heads, mlp_ratio, attn_drop, proj_drop):
        super().__init__()
        self.num_heads, self.attn_drop = num_heads, attn_drop
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.proj_drop = nn.Dropout(proj_drop)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = Mlp(width, int(width * mlp_ratio), proj_drop)

    def qkv_heads(self, x, rot):
        """(q, k, v) [B, heads, n, d] of the normed x [B, n, W]; q and k turned by rot (CausalAR.rotation)."""
        q, k, v = (split_heads(t, self.num_heads) for t in self.qkv(self.norm1(x)).chunk(3, dim=-1))
        rot = per_head(rot)
        return rotate(q, rot), rotate(k, rot), v

    def finish(self, x, out):
        x = x + self.proj_drop(self.proj(merge_heads(out)))
        return x + self.mlp(self.norm2(x))

    def forward(self, x, rot, cache=None, slots=None, visible=None):
        """Without a cache, the whole sequence x [B, n, W] at once: token i sees tokens 0..i. With one, new
        tokens x written to cache [2, B, heads, S, d] at slots [B, n]; each sees the slots `visible`
        [B, n, S] marks: those up to its own (its order's earlier tokens and the class token)."""
        q, k, v = self.qkv_heads(x, rot)
        if cache is None:
            return self.finish(x, attend(q, k, v, causal=True, dropout_p=self.attn_drop if self.training else 0.0))
        write_kv(cache, slots, k, v)
        return self.finish(x, attend(q, cache[0], cache[1], visible))


class CrossAttentionBlock(nn.Module):
    """Pre-norm block: the query stream attends to the shared keys/values, then an MLP."""

    def __init__(self, width, num_heads, mlp_ratio, attn_drop, proj_drop):
        super().__init__()
        self.num_heads, self.attn_drop = num_heads, attn_drop
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.q = nn.Linear(width, width)
        self.proj = nn.Linear(width, width)
        self.proj_drop = nn.Dropout(proj_drop)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = Mlp(width, int(width * mlp_ratio), proj_drop)

    def forward(self, x, rot, k, v, visible=None, causal=False):
        """x [B, n, W] queries turned by rot (CausalAR.rotation); k, v [B, heads, S, d]; visible as attend()."""
        q = rotate(split_heads(self.q(self.norm1(x)), self.num_heads), per_head(rot))
        out = attend(q, k, v, visible, causal, self.attn_drop if self.training else 0.0)
        x = x + self.proj_drop(self.proj(merge_heads(out)))
        return x + self.mlp(self.norm2(x))


# ----------------------------------------------------------------------------- sampling Steps
def append_step(model, cache, x, positions, slots):
    """Append inputs x [rows, n, W] (embedded: the class token or content tokens) at grid positions
    [rows, n] (-1 = the class token) to every layer's cache at slots [rows, n]. Free of host syncs.
    Returns the self half's output [rows, n, W] (a graph backend hands every Step's output back)."""
    rot = model.rotation(positions)  # formed once for every block, as is the mask
    visible = torch.arange(cache.shape[4], device=slots.device) <= slots.unsqueeze(-1)
    x = model.input_norm(x)
    for block, layer_cache in zip(model.self_blocks, cache[:-1]):
        x = block(x, rot, layer_cache, slots, visible)
    write_kv(cache[-1], slots, *model.shared_kv(x, rot))
    return x


def query_step(model, cache, targets, visible_count):
    """z [rows, k, W] for target grid positions [rows, k], each query seeing cache slots
    0..visible_count - 1 ([rows, k]). Free of host syncs."""
    visible = torch.arange(cache.shape[4], device=targets.device) < visible_count.unsqueeze(-1)
    return model.ask(targets, cache[-1, 0], cache[-1, 1], visible=visible)


# ----------------------------------------------------------------------------- the family
@dataclass
class CausalConfig:
    """The outer model's config; the defaults are causal_base's (ARINAR-B's outer size)."""
    width: int = field(default=768, metadata=flag("outer model width"))
    depth: int = field(default=30, metadata=flag(
        "outer blocks in all, even (the first half self-attention, the second cross-attention)"))
    num_heads: int = field(default=12, metadata=flag("outer attention heads"))
    mlp_ratio: float = field(default=4.0, metadata=flag("outer MLP width / width", valid=("> 0", lambda v: v > 0)))
    rope_base: float = field(default=10000.0, metadata=flag(
        "causal family: 2-D RoPE base (the slowest pair turns by pos / base^(1 - 4 / head width))",
        valid=("> 1", lambda v: v > 1)))
    target_subsample: float = field(default=1.0, metadata=flag(
        "causal family, training: share of each image's tokens that are loss targets (random ones)", tunable=True,
        training=True, valid=("in (0, 1]", lambda v: 0 < v <= 1)))
    step_schedule: str = field(default="cosine", metadata=flag(
        "causal family, sampling: tokens a step, cosine (about 1 early, 7 late for 256 in 64) or arccos "
        "(about 3 early, 28 last)", tunable=True))
    label_drop_prob: float = field(default=0.1, metadata=flag(
        "training: share of labels replaced by the fake class (for CFG)", tunable=True, training=True, valid=UNIT))
    # MAR's dropouts (the flags the families share); ARPG trains with attention dropout 0, residual and
    # MLP dropout 0.1 and a token-embedding dropout 0.1: --attn_dropout 0 comes closest
    attn_dropout: float = field(default=0.1, metadata=flag("attention dropout", tunable=True, training=True,
                                                           valid=UNIT))
    proj_dropout: float = field(default=0.1, metadata=flag("projection/MLP dropout", tunable=True, training=True,
                                                           valid=UNIT))

    def validate(self, tokens):
        if self.depth % 2:
            raise ValueError(f"--depth {self.depth} must be even (half self-attention, half cross-attention blocks)")
        if self.width % self.num_heads:
            raise ValueError(f"--width {self.width} must be a multiple of --num_heads {self.num_heads}")
        if (self.width // self.num_heads) % 4:
            raise ValueError(f"--width / --num_heads = {self.width // self.num_heads} must be a multiple of 4 "
                             "(2-D RoPE turns feature pairs by row and by column)")
        if self.step_schedule not in STEP_SCHEDULES:
            raise ValueError(f"--step_schedule must be one of {', '.join(STEP_SCHEDULES)}; got {self.step_schedule!r}")


PRESETS = {
    "causal_tiny": {"width": 128, "num_heads": 4, "depth": 4, "inner_ar_width": 64, "attn_dropout": 0.0,
                    "proj_dropout": 0.0},
    # outer parameters within 3% of ARINAR-B's / MAR-L's / MAR-H's at their widths (tests/test_causal.py)
    "causal_base": {"width": 768, "num_heads": 12, "depth": 30},
    "causal_large": {"width": 1024, "num_heads": 16, "depth": 34},
    "causal_huge": {"width": 1280, "num_heads": 16, "depth": 44},
}


@register_family("causal", config=CausalConfig, presets=PRESETS, default="causal_base")
class CausalAR(OuterModel):
    def __init__(self, config):
        super().__init__(config)
        t = self.tokens
        c = config.family_config
        width, half = c.width, c.depth // 2
        self.seq_len, self.token_embed_dim = t.seq_len, t.token_dim
        self.class_num, self.num_heads = config.class_num, c.num_heads
        self.label_drop_prob, self.target_subsample = c.label_drop_prob, c.target_subsample
        self.step_schedule = c.step_schedule

        self.class_emb = nn.Embedding(config.class_num + 1, width)  # the last row: the null class (CFG)
        self.z_proj = nn.Linear(self.token_embed_dim, width)
        self.input_norm = nn.LayerNorm(width, eps=1e-6)
        block_args = (width, c.num_heads, c.mlp_ratio, c.attn_dropout, c.proj_dropout)
        self.self_blocks = nn.ModuleList(SelfAttentionBlock(*block_args) for _ in range(half))
        self.kv_norm = nn.LayerNorm(width, eps=1e-6)
        self.kv = nn.Linear(width, 2 * width)
        self.query_token = nn.Parameter(torch.zeros(1, 1, width))
        # RoPE alone cannot place a query that sees only the class token (one key, softmax 1): the
        # first target of every order would not know where it is
        self.query_pos_embed = nn.Parameter(torch.zeros(1, self.seq_len, width))
        self.cross_blocks = nn.ModuleList(CrossAttentionBlock(*block_args) for _ in range(half))
        self.out_norm = nn.LayerNorm(width, eps=1e-6)
        # float64 so a float64 model turns in float64; cast per use (rotate)
        self.register_buffer("rope_angles", grid_angles(t.seq_h, t.seq_w, width // c.num_heads, c.rope_base),
                             persistent=False)
        self.initialize_weights()
        build_head(self, config, cond_dim=width)

    @torch.no_grad()
    def initialize_weights(self):
        for p in (self.class_emb.weight, self.query_token, self.query_pos_embed):
            nn.init.normal_(p, std=0.02)
        init_linears_and_norms_(self)

    # ---------------------------------------------------------------- tokens and inputs
    @property
    def null_class(self):
        return self.class_num

    def class_ids(self, labels, batch_size, device, drop_labels=False):
        """Class-table rows [B]: the labels, or the null class (labels None, or dropped for CFG)."""
        null = torch.full((batch_size,), self.null_class, dtype=torch.long, device=device)
        if labels is None:
            return null
        check_labels(labels, batch_size, self.class_num, values=not self.training)
        ids = labels.to(device=device, dtype=torch.long)
        if drop_labels and self.label_drop_prob > 0:
            ids = torch.where(torch.rand(batch_size, device=device) < self.label_drop_prob, null, ids)
        return ids

    def embed_tokens(self, tokens):
        return self.z_proj(tokens.to(self.z_proj.weight.dtype))

    def embed_class(self, class_ids):
        return self.class_emb(class_ids).unsqueeze(1)

    def rotation(self, positions):
        """RoPE's rotation (models/rope.py) of grid positions [B, n] (-1 = the class token, not turned),
        formed once for every block, in at least float32 (float64 for a float64 model), as rotate computes."""
        dtype = torch.promote_types(self.z_proj.weight.dtype, torch.float32)
        return rotation(self.rope_angles[positions + 1], dtype)

    def random_orders(self, batch_size, device):
        """A random order (permutation of the grid positions) per image: [B, L]."""
        return torch.argsort(torch.rand(batch_size, self.seq_len, device=device), dim=1)

    # ---------------------------------------------------------------- the network
    def shared_kv(self, x, rot):
        """The cross half's keys (turned by rot) and values [B, heads, n, d] of the self half's x."""
        k, v = (split_heads(t, self.num_heads) for t in self.kv(self.kv_norm(x)).chunk(2, dim=-1))
        return rotate(k, per_head(rot)), v

    def ask(self, targets, k, v, visible=None, causal=False):
        """z [B, n, W] of the queries for target grid positions [B, n] over keys/values [B, heads, S, d]."""
        x = self.query_token + take(self.query_pos_embed.expand(targets.shape[0], -1, -1), targets)
        x = self.run_blocks(self.cross_blocks, x, self.rotation(targets), k, v, visible, causal)
        return self.out_norm(x)

    def condition(self, tokens, orders, class_ids, query_at=None):
        """Teacher-forced z: tokens [B, L, D] in orders [B, L] (a permutation per row) after the class
        rows class_ids [B]. The query for target orders[:, i] sees content tokens orders[:, :i].

        query_at: optional [B, n] places in the order (0..L-1) to query; default all L, in order.
        Returns z [B, n, W] for targets orders[b, query_at[b]].
        """
        b = tokens.shape[0]
        sources = orders[:, :-1]  # the last token of an order is no query's key
        x = torch.cat([self.embed_class(class_ids), self.embed_tokens(take(tokens, sources))], dim=1)
        positions = torch.cat([orders.new_full((b, 1), -1), sources], dim=1)
        rot = self.rotation(positions)
        x = self.run_blocks(self.self_blocks, self.input_norm(x), rot)
        k, v = self.shared_kv(x, rot)
        if query_at is None:
            return self.ask(orders, k, v, causal=True)  # query i sees keys 0..i: the class and i tokens
        visible = torch.arange(self.seq_len, device=orders.device) <= query_at.unsqueeze(-1)
        return self.ask(orders.gather(1, query_at), k, v, visible=visible)

    # ---------------------------------------------------------------- training
    def forward(self, latents, labels, orders=None):
        """The head's loss averaged over the targets (every token, or a random target_subsample share
        of each image's, a count fixed on the host so the shapes stay static).

        orders: optional [B, L] permutations (default a new random one per image).
        """
        check_latents(self.tokens, latents)
        tokens = self.patchify(latents)
        b, device = tokens.shape[0], tokens.device
        if orders is None:
            orders = self.random_orders(b, device)
        elif tuple(orders.shape) != (b, self.seq_len):
            raise ValueError(f"orders must be [B, seq_len] = [{b}, {self.seq_len}] permutations; "
                             f"got {list(orders.shape)}")
        class_ids = self.class_ids(labels, b, device, drop_labels=self.training)
        num_targets = max(1, round(self.target_subsample * self.seq_len))
        query_at = None
        if num_targets < self.seq_len:
            query_at = torch.argsort(torch.rand(b, self.seq_len, device=device), dim=1)[:, :num_targets]
        z = self.condition(tokens, orders, class_ids, query_at).flatten(0, 1)
        targets = orders if query_at is None else orders.gather(1, query_at)
        target = take(tokens, targets).flatten(0, 1)
        # MAR's diffusion head sees each target `train_repeats` times; the mean is unchanged
        repeats = self.head.train_repeats
        return self.head.loss(target.repeat(repeats, 1), z.repeat(repeats, 1)).mean()

    # ---------------------------------------------------------------- sampling
    def kv_cache(self, backend, rows, dtype, device):
        """The KV cache (layout in the module docstring) for `rows` rows, zeroed; from the backend, since a
        CUDA-graph backend captures it by address and hands out the same tensor every call."""
        width = self.z_proj.out_features
        shape = (len(self.self_blocks) + 1, 2, rows, self.num_heads, self.seq_len, width // self.num_heads)
        return backend.buffers(("causal.kv", shape, dtype, device),
                               lambda: torch.zeros(shape, dtype=dtype, device=device))

    @torch.no_grad()
    def sample_tokens(self, bsz, num_iter=64, cfg=1.0, cfg_schedule="linear", labels=None, temperature=1.0,
                      known=None, keep=None, backend=None, progress=False):
        """Generate latents [bsz, C, h, w] (divide by the tokenizer's scale before decoding).

        known [bsz, C, h, w] latents and keep [bsz, seq_len] bool (True = keep that token) fill part of
        the canvas: the kept tokens are prefilled into the cache, only the others are queried and drawn.
        Rows that generate different numbers of tokens run as separate groups (their schedules differ).
        The step schedule is the config's step_schedule. backend: from sampling.make_backend (default:
        eager under the caller's autocast).
        """
        check_sampling_settings(num_iter, cfg, temperature, cfg_schedule)
        if cfg != 1.0 and labels is None:
            raise ValueError("cfg > 1 needs class labels (pass labels=...) or use cfg=1.0")
        backend = backend or EagerSteps()
        device = self.query_token.device
        with backend.autocast():
            class_ids = self.class_ids(labels, bsz, device)
            tokens, keep_mask = canvas(self.tokens, bsz, known, keep, canvas_dtype(self), device)
            settings = (num_iter, cfg, cfg_schedule, temperature, progress)
            if keep is None:  # every row generates every token (and no host sync is needed to know it)
                tokens = self.fill(backend, tokens, keep_mask, class_ids, self.seq_len, *settings)
            else:
                unknown = (~keep_mask).sum(1)
                for count in unknown.unique().tolist():
                    if count == 0:
                        continue  # nothing to generate in these rows
                    rows = (unknown == count).nonzero().squeeze(1)
                    tokens[rows] = self.fill(backend, tokens[rows], keep_mask[rows], class_ids[rows], count, *settings)
        return self.unpatchify(tokens)

    def fill(self, backend, tokens, keep, class_ids, num_unknown, num_iter, cfg, cfg_schedule, temperature, progress):
        """Generate the `num_unknown` tokens that `keep` leaves open in every row of `tokens` [b, L, D]."""
        b, dim, guided = tokens.shape[0], tokens.shape[-1], cfg != 1.0
        both = (lambda t: torch.cat([t, t])) if guided else (lambda t: t)
        if guided:
            class_ids = torch.cat([class_ids, torch.full_like(class_ids, self.null_class)])
        rows, device = class_ids.shape[0], tokens.device
        # the kept tokens first (in a random order: any order is a valid prefill), then the rest at random
        orders = both(torch.argsort(torch.rand(b, self.seq_len, device=device) + (~keep), dim=1))
        cache = self.kv_cache(backend, rows, activation_dtype(device, next(self.parameters()).dtype), device)
        append = Step("causal.append", self, append_step, inplace=(0,), regions=tuple(self.self_blocks))
        query = Step("causal.query", self, query_step, inplace=(0,), regions=tuple(self.cross_blocks))

        def append_tokens(start, count):
            """The content tokens at places start..start+count-1 of the orders, into slots start+1..."""
            positions = orders[:, start:start + count]
            slots = torch.arange(start + 1, start + 1 + count, device=device).expand(rows, -1)
            backend.run(append, cache, self.embed_tokens(take(both(tokens), positions)), positions, slots)

        start_slot = torch.zeros(rows, 1, dtype=torch.long, device=device)
        backend.run(append, cache, self.embed_class(class_ids), start_slot - 1, start_slot)
        done = self.seq_len - num_unknown  # content tokens in the cache
        if done:
            append_tokens(0, done)
        schedule = step_schedule(num_unknown, num_iter, cfg, cfg_schedule, self.seq_len, self.step_schedule)
        masked, drawn = num_unknown, 0
        for step, (mask_len, scale) in enumerate(tqdm(schedule, disable=not progress, desc="sampling")):
            if step == num_iter - 1:
                mask_len = 0
            count = masked - mask_len
            if count == 0:
                continue  # fewer tokens to generate than steps
            if drawn:  # the previous step's tokens join the cache
                append_tokens(done, drawn)
                done += drawn
            targets = orders[:, done:done + count]
            z = backend.run(query, cache, targets, torch.full_like(targets, done + 1))
            features = backend.sample_head(self.head, z.flatten(0, 1), temperature, scale if guided else 1.0)
            tokens = tokens.scatter(1, targets[:b, :, None].expand(-1, -1, dim),
                                    features.view(b, count, dim).to(tokens.dtype))
            masked, drawn = mask_len, count
        return tokens

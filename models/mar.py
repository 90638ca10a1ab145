"""ARINAR: MAR's masked encoder-decoder (outer model) with a per-token head.

The outer model sees the tokens generated so far (masked ones are dropped in the encoder and
replaced by a mask token in the decoder) plus the class, and emits a condition z for every
token. A per-token head turns z into the token's features: ARINAR's inner feature-by-feature
AR model (models/inner.py). Every head offers `loss(target, z)` and `sample(z, temperature,
cfg)`; the outer model never looks inside it. Parameter names match the released ARINAR
checkpoint, and the outer part matches MAR's.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from models.attention import attention
from models.diffloss import DiffLoss
from models.inner import InnerAR
from models.token_gmm import TokenGMM

CFG_SCHEDULES = ("linear", "constant")


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


class Mlp(nn.Module):
    def __init__(self, dim, hidden, drop=0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


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


def take(x, index):
    """x[b, index[b, p]] for [B, N, C] x and [B, P] index: [B, P, C]."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def positions(flags):
    """Positions of the True entries of a [B, L] bool with the same count per row: [B, n], ascending."""
    counts = flags.sum(1)
    if (counts != counts[0]).any():
        raise ValueError(f"every row must flag the same number of tokens; got counts {counts.tolist()[:8]}")
    # a stable sort keeps the flagged positions in their original (ascending) order
    return flags.to(torch.uint8).sort(dim=1, descending=True, stable=True).indices[:, :int(counts[0])]


# ----------------------------------------------------------------------------- per-token heads
# --head name -> the attribute (and state-dict prefix) the releases use for it
HEADS = {"arinar": "arhead", "diffloss": "diffloss", "gmm": "gmmhead"}


def build_head(name, token_dim, cond_dim, num_gaussians, inner_ar_width, inner_ar_depth, inner_ar_heads,
               feature_group, diffloss_d, diffloss_w, num_sampling_steps, diffusion_batch_mul):
    """The per-token head `name` for tokens of token_dim features and conditions of cond_dim."""
    if name == "arinar":
        return InnerAR(token_dim=token_dim, cond_dim=cond_dim, width=inner_ar_width, depth=inner_ar_depth,
                       num_heads=inner_ar_heads, num_gaussians=num_gaussians, feature_group=feature_group)
    if name == "diffloss":
        return DiffLoss(token_dim, cond_dim, width=diffloss_w, depth=diffloss_d,
                        num_sampling_steps=int(num_sampling_steps), diffusion_batch_mul=diffusion_batch_mul)
    return TokenGMM(token_dim, cond_dim, width=diffloss_w, depth=diffloss_d, num_gaussians=num_gaussians)


# ----------------------------------------------------------------------------- schedules
def sample_mask_ratio(min_ratio=0.7, mean=1.0, std=0.25):
    """One mask ratio from a normal(mean, std) truncated to [min_ratio, 1], by inverse CDF."""
    normal = torch.distributions.Normal(0.0, 1.0)
    lo, hi = normal.cdf(torch.tensor((min_ratio - mean) / std)), normal.cdf(torch.tensor((1.0 - mean) / std))
    u = lo + (hi - lo) * torch.rand(())
    return float((mean + std * torch.special.ndtri(u)).clamp(min_ratio, 1.0))


def sampling_schedule(num_unknown, num_iter, cfg=1.0, cfg_schedule="linear", seq_len=None):
    """[(tokens still masked after step s, cfg scale of step s)] for the cosine schedule.

    The cosine schedule spans the `num_unknown` tokens to generate (all seq_len of them unless
    part of the canvas is given). The count is clamped so every step but the last unmasks at least
    one token and at least one stays masked until the last step (which predicts all that remain).
    The linear CFG scale grows with the share of the seq_len tokens the outer model sees, using
    that clamped count (>= 1).
    """
    seq_len = num_unknown if seq_len is None else seq_len
    steps, masked = [], num_unknown
    for s in range(num_iter):
        mask_len = math.floor(num_unknown * math.cos(math.pi / 2 * (s + 1) / num_iter))
        mask_len = max(1, min(masked - 1, mask_len))
        scale = 1 + (cfg - 1) * (seq_len - mask_len) / seq_len if cfg_schedule == "linear" else cfg
        steps.append((mask_len, scale))
        masked = mask_len
    return steps


# ----------------------------------------------------------------------------- the model
class MAR(nn.Module):
    def __init__(self, img_size=256, vae_stride=16, patch_size=1,
                 encoder_embed_dim=1024, encoder_depth=16, encoder_num_heads=16,
                 decoder_embed_dim=1024, decoder_depth=16, decoder_num_heads=16,
                 mlp_ratio=4., vae_embed_dim=16, mask_ratio_min=0.7, label_drop_prob=0.1,
                 class_num=1000, attn_dropout=0.1, proj_dropout=0.1, buffer_size=64,
                 num_gaussians=4, inner_ar_width=768, inner_ar_depth=1, inner_ar_heads=4,
                 head="arinar", feature_group=1, diffloss_d=3, diffloss_w=1024, num_sampling_steps=100,
                 diffusion_batch_mul=4,
                 grad_checkpointing=False):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"--head must be one of {', '.join(HEADS)}; got {head!r}")
        if img_size % (vae_stride * patch_size):
            raise ValueError(f"img_size {img_size} must be divisible by vae_stride*patch_size "
                             f"= {vae_stride * patch_size}")
        self.img_size, self.vae_stride, self.patch_size = img_size, vae_stride, patch_size
        self.vae_embed_dim = vae_embed_dim
        self.seq_h = self.seq_w = img_size // vae_stride // patch_size
        self.seq_len = self.seq_h * self.seq_w
        self.token_embed_dim = vae_embed_dim * patch_size ** 2
        self.buffer_size = buffer_size
        self.class_num = class_num
        self.label_drop_prob = label_drop_prob
        self.mask_ratio_min = mask_ratio_min
        self.grad_checkpointing = grad_checkpointing
        total = buffer_size + self.seq_len

        # directly owned tensors first, in the release's order (the state_dict follows it)
        self.fake_latent = nn.Parameter(torch.zeros(1, encoder_embed_dim))
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, total, encoder_embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, total, decoder_embed_dim))
        # the third position table (named for MAR's diffusion head) is added to z itself
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len, decoder_embed_dim))

        self.class_emb = nn.Embedding(class_num, encoder_embed_dim)
        self.z_proj = nn.Linear(self.token_embed_dim, encoder_embed_dim)
        self.z_proj_ln = nn.LayerNorm(encoder_embed_dim, eps=1e-6)
        self.encoder_blocks = nn.ModuleList(
            Block(encoder_embed_dim, encoder_num_heads, mlp_ratio, attn_dropout, proj_dropout)
            for _ in range(encoder_depth))
        self.encoder_norm = nn.LayerNorm(encoder_embed_dim, eps=1e-6)
        self.decoder_embed = nn.Linear(encoder_embed_dim, decoder_embed_dim)
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, attn_dropout, proj_dropout)
            for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.initialize_weights()

        # created after the outer init, which must not touch it; registered under the release's key name
        self.head_name, self.head_attr = head, HEADS[head]
        setattr(self, self.head_attr, build_head(
            head, token_dim=self.token_embed_dim, cond_dim=decoder_embed_dim, num_gaussians=num_gaussians,
            inner_ar_width=inner_ar_width, inner_ar_depth=inner_ar_depth, inner_ar_heads=inner_ar_heads,
            feature_group=feature_group, diffloss_d=diffloss_d, diffloss_w=diffloss_w,
            num_sampling_steps=num_sampling_steps, diffusion_batch_mul=diffusion_batch_mul))

    @property
    def head(self):
        """The per-token head (--head): ARINAR's inner AR, MAR's diffusion MLP or a whole-token mixture."""
        return getattr(self, self.head_attr)

    @torch.no_grad()
    def initialize_weights(self):
        for p in (self.class_emb.weight, self.fake_latent, self.mask_token, self.encoder_pos_embed_learned,
                  self.decoder_pos_embed_learned, self.diffusion_pos_embed_learned):
            nn.init.normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # ---------------------------------------------------------------- tokens and inputs
    def patchify(self, x):
        """[B, C, H, W] -> [B, h*w, C*p*p], row-major over the token grid."""
        b, c, _, _ = x.shape
        p = self.patch_size
        x = x.reshape(b, c, self.seq_h, p, self.seq_w, p)
        return torch.einsum("nchpwq->nhwcpq", x).reshape(b, self.seq_len, c * p * p)

    def unpatchify(self, x):
        b, p, c = x.shape[0], self.patch_size, self.vae_embed_dim
        x = torch.einsum("nhwcpq->nchpwq", x.reshape(b, self.seq_h, self.seq_w, c, p, p))
        return x.reshape(b, c, self.seq_h * p, self.seq_w * p)

    def check_latents(self, latents):
        side = self.seq_h * self.patch_size
        expected = (self.vae_embed_dim, side, side)
        if not torch.is_tensor(latents) or latents.dim() != 4 or tuple(latents.shape[1:]) != expected:
            got = list(latents.shape) if torch.is_tensor(latents) else type(latents).__name__
            raise ValueError(f"latents must be [B, {', '.join(map(str, expected))}] (img_size {self.img_size} / "
                             f"vae_stride {self.vae_stride}, VAE latents x 0.2325); got {got}")

    def check_labels(self, labels, batch_size):
        if not torch.is_tensor(labels) or labels.dtype not in (torch.int64, torch.int32) or labels.dim() != 1:
            raise ValueError(f"labels must be a 1-D integer tensor of {batch_size} class ids; got {labels!r:.80}")
        if labels.numel() != batch_size:
            raise ValueError(f"labels must hold {batch_size} class ids (one per image); got {labels.numel()}")
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.class_num):
            raise ValueError(f"labels must be in [0, {self.class_num}) (class_num); "
                             f"got values in [{int(labels.min())}, {int(labels.max())}]")

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
        self.check_labels(labels, batch_size)
        emb = self.class_emb(labels.long())
        if drop_labels and self.label_drop_prob > 0:
            drop = torch.rand(batch_size, device=emb.device) < self.label_drop_prob
            emb = torch.where(drop[:, None], fake.to(emb.dtype), emb)
        return emb

    def random_mask(self, batch_size, device):
        """A random order per image; the first ceil(ratio * seq_len) of each order are masked."""
        num_masked = math.ceil(sample_mask_ratio(self.mask_ratio_min) * self.seq_len)
        orders = torch.argsort(torch.rand(batch_size, self.seq_len, device=device), dim=1)
        return self.mask_from_orders(orders, num_masked)

    @staticmethod
    def mask_from_orders(orders, num_masked):
        mask = torch.zeros(orders.shape, dtype=torch.bool, device=orders.device)
        return mask.scatter_(1, orders[:, :num_masked], True)

    # ---------------------------------------------------------------- outer network
    def run_blocks(self, blocks, x, queries=None):
        for block in blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, queries, use_reentrant=False)
            else:
                x = block(x, queries)
        return x

    def condition(self, tokens, mask, class_vec, predict=None):
        """Outer encoder-decoder: tokens [B, L, Dt], mask [B, L] bool, class_vec [B, D] -> z [B, L, Dd].

        predict: optional [B, L] bool with the same count P in every row: z at those positions
        only, [B, P, Dd] in the order z[predict] has (the last decoder block runs its queries there only).
        """
        return self.condition_at(tokens, positions(~mask), class_vec, None if predict is None else positions(predict))

    def condition_at(self, tokens, keep, class_vec, predict=None):
        """condition() on index tensors and free of host syncs (what CUDA graphs capture).

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
        """The head's loss averaged over masked tokens (ARINAR: mixture NLL summed over features)."""
        self.check_latents(latents)
        tokens = self.patchify(latents)
        b = tokens.shape[0]
        mask = self.random_mask(b, tokens.device) if mask is None else self.check_mask(mask, b)
        class_vec = self.class_embedding(labels, b, drop_labels=self.training)
        z = self.condition(tokens, mask, class_vec)
        # the head runs on masked tokens only (each `train_repeats` times, as MAR's diffusion loss
        # repeats them); the mean equals the release's masked mean
        repeats = self.head.train_repeats
        return self.head.loss(tokens[mask].repeat(repeats, 1), z[mask].repeat(repeats, 1)).mean()

    # ---------------------------------------------------------------- sampling
    def sample_tokens(self, bsz, num_iter=64, cfg=1.0, cfg_schedule="linear", labels=None, temperature=1.0,
                      known=None, keep=None, backend=None, progress=False):
        """Generate latents [bsz, C, h, w] (divide by 0.2325 before the VAE decoder).

        known [bsz, C, h, w] latents and keep [bsz, seq_len] bool (True = keep that token) fill
        part of the canvas; only the other tokens are generated. backend: a sampling backend from
        sampling.make_backend (default: eager, the caller's autocast). See sampling/loop.py.
        """
        from sampling import EagerBackend, sample_tokens  # the sampler drives the network, not the reverse
        return sample_tokens(self, backend or EagerBackend(self), bsz, num_iter=num_iter, cfg=cfg,
                             cfg_schedule=cfg_schedule, labels=labels, temperature=temperature, known=known,
                             keep=keep, progress=progress)


# ----------------------------------------------------------------------------- factories
def _mar(width, heads, enc_dec_depth, **kwargs):
    return MAR(encoder_embed_dim=width, encoder_depth=enc_dec_depth, encoder_num_heads=heads,
               decoder_embed_dim=width, decoder_depth=enc_dec_depth, decoder_num_heads=heads,
               mlp_ratio=4, **kwargs)


def mar_base(enc_dec_depth=14, **kwargs):
    """ARINAR-B's outer model (14+14 blocks); enc_dec_depth=12 gives MAR-B's shape."""
    return _mar(768, 12, enc_dec_depth, **kwargs)


def mar_large(enc_dec_depth=16, **kwargs):
    return _mar(1024, 16, enc_dec_depth, **kwargs)


def mar_huge(enc_dec_depth=20, **kwargs):
    return _mar(1280, 16, enc_dec_depth, **kwargs)


def mar_tiny(enc_dec_depth=2, **kwargs):
    """The CPU demo's size: width 128, 2+2 outer blocks, a 64-wide inner model, 4 buffer slots."""
    kwargs.setdefault("inner_ar_width", 64)
    kwargs.setdefault("buffer_size", 4)
    return _mar(128, 4, enc_dec_depth, **kwargs)


MODELS = {"mar_tiny": mar_tiny, "mar_base": mar_base, "mar_large": mar_large, "mar_huge": mar_huge}

"""ARINAR: MAR's masked encoder-decoder (outer model) with an inner feature-by-feature AR head.

The outer model sees the tokens generated so far (masked ones are dropped in the encoder and
replaced by a mask token in the decoder) plus the class, and emits a condition z for every
token. The inner model (models/inner.py) turns z into the token's features. Parameter names
match the released ARINAR checkpoint, and the outer part matches MAR's.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from models.attention import attention
from models.inner import InnerAR

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

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        head_dim = c // self.num_heads
        x = attention(q, k, v, head_dim ** -0.5, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, c)))


class Mlp(nn.Module):
    def __init__(self, dim, hidden, drop=0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm ViT block (timm's layout and key names)."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, attn_drop, proj_drop)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), proj_drop)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


# ----------------------------------------------------------------------------- schedules
def sample_mask_ratio(min_ratio=0.7, mean=1.0, std=0.25):
    """One mask ratio from a normal(mean, std) truncated to [min_ratio, 1], by inverse CDF."""
    normal = torch.distributions.Normal(0.0, 1.0)
    lo, hi = normal.cdf(torch.tensor((min_ratio - mean) / std)), normal.cdf(torch.tensor((1.0 - mean) / std))
    u = lo + (hi - lo) * torch.rand(())
    return float((mean + std * torch.special.ndtri(u)).clamp(min_ratio, 1.0))


def sampling_schedule(seq_len, num_iter, cfg=1.0, cfg_schedule="linear"):
    """[(tokens still masked after step s, cfg scale of step s)] for the cosine schedule.

    The count is clamped so every step but the last unmasks at least one token and at least one
    stays masked until the last step (which predicts all that remain). The linear CFG scale grows
    with the number of tokens already unmasked, using that clamped count (>= 1).
    """
    steps, masked = [], seq_len
    for s in range(num_iter):
        mask_len = math.floor(seq_len * math.cos(math.pi / 2 * (s + 1) / num_iter))
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
                 grad_checkpointing=False):
        super().__init__()
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

        # created after the outer init, which must not touch it
        self.arhead = InnerAR(token_dim=self.token_embed_dim, cond_dim=decoder_embed_dim,
                              width=inner_ar_width, depth=inner_ar_depth, num_heads=inner_ar_heads,
                              num_gaussians=num_gaussians)

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
    def run_blocks(self, blocks, x):
        for block in blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    def condition(self, tokens, mask, class_vec):
        """Outer encoder-decoder: tokens [B, L, Dt], mask [B, L] bool, class_vec [B, D] -> z [B, L, Dd]."""
        b = tokens.shape[0]
        x = self.z_proj(tokens)
        buffer = class_vec.to(x.dtype).unsqueeze(1).expand(b, self.buffer_size, -1)
        x = self.z_proj_ln(torch.cat([buffer, x], dim=1) + self.encoder_pos_embed_learned)

        # every image masks the same number of tokens, so the kept ones reshape into a batch
        keep = torch.cat([mask.new_zeros(b, self.buffer_size), mask], dim=1).logical_not()
        x = x[keep].reshape(b, -1, x.shape[-1])
        x = self.encoder_norm(self.run_blocks(self.encoder_blocks, x))

        x = self.decoder_embed(x)
        full = self.mask_token.to(x.dtype).expand(b, keep.shape[1], -1).clone()
        full[keep] = x.reshape(-1, x.shape[-1])
        x = self.decoder_norm(self.run_blocks(self.decoder_blocks, full + self.decoder_pos_embed_learned))
        return x[:, self.buffer_size:] + self.diffusion_pos_embed_learned

    # ---------------------------------------------------------------- training
    def forward(self, latents, labels, mask=None):
        """Mean mixture NLL over masked tokens (summed over each token's features)."""
        self.check_latents(latents)
        tokens = self.patchify(latents)
        b = tokens.shape[0]
        mask = self.random_mask(b, tokens.device) if mask is None else self.check_mask(mask, b)
        class_vec = self.class_embedding(labels, b, drop_labels=self.training)
        z = self.condition(tokens, mask, class_vec)
        # the inner model runs on masked tokens only; the mean equals the release's masked mean
        return self.arhead.nll(tokens[mask], z[mask]).mean()

    # ---------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample_tokens(self, bsz, num_iter=64, cfg=1.0, cfg_schedule="linear", labels=None,
                      temperature=1.0, progress=False, use_cache=True, cfg_sampler=None, inner_graphs=None):
        """Generate latents [bsz, C, h, w] (divide by 0.2325 before the VAE decoder).

        inner_graphs: a models.fast_inner.GraphedInnerSampler(self.arhead) to replay the inner
        loop as CUDA graphs (ignored off CUDA); keep it across calls so graphs are captured once.
        """
        if num_iter < 1:
            raise ValueError(f"num_iter must be >= 1; got {num_iter}")
        if cfg < 1:
            raise ValueError(f"cfg must be >= 1 (1 = no guidance); got {cfg}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 (it divides each Gaussian's std); got {temperature}")
        if cfg_schedule not in CFG_SCHEDULES:
            raise ValueError(f"cfg_schedule must be one of {CFG_SCHEDULES}; got {cfg_schedule!r}")
        guided = cfg != 1.0
        if guided and labels is None:
            raise ValueError("cfg > 1 needs class labels (pass labels=...) or use cfg=1.0")
        device = self.fake_latent.device
        class_vec = self.class_embedding(labels.to(device) if labels is not None else None, bsz)
        if guided:
            class_vec = torch.cat([class_vec, self.fake_latent.expand(bsz, -1)])
        inner_kwargs = {"use_cache": use_cache}
        if cfg_sampler is not None:
            inner_kwargs["cfg_sampler"] = cfg_sampler
        if inner_graphs is not None:
            inner_kwargs["graphs"] = inner_graphs

        tokens = torch.zeros(bsz, self.seq_len, self.token_embed_dim, device=device)
        mask = torch.ones(bsz, self.seq_len, dtype=torch.bool, device=device)
        orders = torch.argsort(torch.rand(bsz, self.seq_len, device=device), dim=1)
        schedule = sampling_schedule(self.seq_len, num_iter, cfg, cfg_schedule)
        for step, (mask_len, cfg_scale) in enumerate(tqdm(schedule, disable=not progress, desc="sampling")):
            both = (lambda t: torch.cat([t, t])) if guided else (lambda t: t)
            z = self.condition(both(tokens), both(mask), class_vec)
            if step == num_iter - 1:
                to_predict = mask
            else:
                next_mask = self.mask_from_orders(orders, mask_len)
                to_predict, mask = mask & ~next_mask, next_mask
            if not to_predict.any():
                continue  # possible only when num_iter > seq_len
            features = self.arhead.sample(z[both(to_predict)], temperature, cfg_scale if guided else 1.0,
                                          **inner_kwargs)
            tokens[to_predict] = features
        return self.unpatchify(tokens)


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

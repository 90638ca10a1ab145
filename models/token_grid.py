"""Latents <-> token sequences: a [B, C, H, W] latent is cut into patch_size x patch_size patches,
row-major over the token grid; each token holds C * p * p features (channel-major, then the patch's
rows and columns), as MAR lays them out."""


def patchify(latents, tokens_config):
    """[B, C, H, W] -> [B, seq_len, C*p*p]."""
    t = tokens_config
    b, c, p = latents.shape[0], latents.shape[1], t.patch_size
    x = latents.reshape(b, c, t.seq_h, p, t.seq_w, p)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, t.seq_len, c * p * p)


def unpatchify(tokens, tokens_config):
    """[B, seq_len, C*p*p] -> [B, C, H, W]."""
    t = tokens_config
    b, p, c = tokens.shape[0], t.patch_size, t.vae_embed_dim
    x = tokens.reshape(b, t.seq_h, t.seq_w, c, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, t.seq_h * p, t.seq_w * p)

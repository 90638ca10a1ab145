"""Building a tokenizer with its weights: MAR's KL-16 VAE read strictly from kl16.ckpt (weights
only, or .safetensors), or the pixel tokenizer (no weights)."""
import os

from safetensors.torch import load_file

from models.tokenizer import KLTokenizer, PixelTokenizer
from util.io.safe_load import load_weights_only

FIX = "fix: `python -m util.io.download kl16` or pass the right --vae_path"


def load_vae_weights(vae, path):
    """Strictly load MAR's kl16.ckpt (weights under "model") into an AutoencoderKL; frozen, eval mode."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"VAE checkpoint not found: {path} ({FIX})")
    sd = load_file(path, device="cpu") if path.endswith(".safetensors") else load_weights_only(path, "--vae_path")
    if isinstance(sd, dict) and isinstance(sd.get("model"), dict):
        sd = sd["model"]
    if not isinstance(sd, dict):
        raise ValueError(f"{path} is not MAR's kl16.ckpt: it holds a {type(sd).__name__}, not a state dict ({FIX})")
    own = vae.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong_shape = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong_shape:
        parts = []
        for name, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
            if keys:
                more = ", ..." if len(keys) > 3 else ""
                parts.append(f"{len(keys)} {name} keys ({', '.join(keys[:3])}{more})")
        raise ValueError(f"{path} is not MAR's kl16.ckpt: {'; '.join(parts)} ({FIX})")
    vae.load_state_dict(sd, strict=True)
    return vae.eval().requires_grad_(False)


def build_tokenizer(tokens, vae_path=None, levels=256, device="cpu"):
    """The tokenizer a TokenConfig names, in eval mode with frozen weights, on `device`.

    levels: grey levels of the data for the pixel tokenizer's dequantisation (0/None = none).
    """
    if tokens.tokenizer == "kl16":
        if tokens.img_channels != 3:
            raise ValueError(f"the KL-16 VAE encodes RGB images, not {tokens.img_channels}-channel ones; "
                             "use --tokenizer pixel for this data set")
        if not vae_path:
            raise FileNotFoundError(f"--tokenizer kl16 needs --vae_path ({FIX})")
        tokenizer = KLTokenizer(tokens.vae_embed_dim)
        load_vae_weights(tokenizer.vae, vae_path)
    else:
        tokenizer = PixelTokenizer(tokens.img_channels, levels)
    return tokenizer.to(device).eval().requires_grad_(False)

"""Tests for models/vae.py: checkpoint layout, strict loading, shapes, posterior, numerics."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from util.io.tokenizers import load_vae_weights
from models.vae import LATENT_SCALE, AutoencoderKL, DiagonalGaussian
from tests.conftest import load_manifest



@pytest.fixture(scope="module")
def manifest():
    return load_manifest("kl16_vae.json")


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return AutoencoderKL().eval()


def cheap_state_dict(entries, fill=0.5):
    """A state dict whose tensors all view one 1-element storage, so torch.save writes bytes, not 265 MB."""
    base = torch.full((1,), fill)
    return {e["key"]: base.view([1] * len(e["shape"])).expand(e["shape"]) for e in entries}


def test_state_dict_matches_manifest(vae, manifest):
    entries = manifest["state_dict"]
    ours = [(k, list(v.shape)) for k, v in vae.state_dict().items()]
    theirs = [(e["key"], e["shape"]) for e in entries]
    assert len(ours) == len(theirs) == manifest["num_state_dict_entries"] == 312
    assert ours == theirs  # same keys, shapes and order
    n_params = sum(p.numel() for p in vae.parameters())
    assert n_params == manifest["total_params"] == 66_456_019
    assert LATENT_SCALE == 0.2325


def test_load_checkpoint_roundtrip(manifest, tmp_path):
    gen = torch.Generator().manual_seed(1)
    sd = {e["key"]: torch.randn(e["shape"], generator=gen) for e in manifest["state_dict"]}
    path = tmp_path / "kl16.ckpt"
    torch.save({"model": sd}, path)
    model = load_vae_weights(AutoencoderKL(), path)
    loaded = model.state_dict()
    assert loaded.keys() == sd.keys()
    for k, v in sd.items():
        assert torch.equal(loaded[k], v), k
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())


def test_load_bare_state_dict(vae, manifest, tmp_path):
    path = tmp_path / "bare.pt"
    torch.save(cheap_state_dict(manifest["state_dict"], fill=0.25), path)
    model = copy.deepcopy(vae).train().requires_grad_(True)
    load_vae_weights(model, path)
    assert all(torch.all(v == 0.25) for v in model.state_dict().values())
    assert not model.training


@pytest.mark.parametrize("change", ["missing", "unexpected"])
def test_load_checkpoint_bad_keys(vae, manifest, tmp_path, change):
    sd = cheap_state_dict(manifest["state_dict"])
    if change == "missing":
        key = "decoder.up.3.block.0.nin_shortcut.weight"
        del sd[key]
    else:
        key = "encoder.extra_layer.weight"
        sd[key] = torch.zeros(3)
    path = tmp_path / "bad.ckpt"
    torch.save({"model": sd}, path)
    with pytest.raises(ValueError) as err:
        load_vae_weights(copy.deepcopy(vae), path)
    msg = str(err.value)
    assert key in msg and str(path) in msg and change in msg and "kl16" in msg
    assert "\n" not in msg


def test_a_wrong_shape_is_a_one_line_error_and_safetensors_files_load(tmp_path):
    """The loader's checks on a small stand-in module (any module's state dict goes through the same code).
    Bugs: the shape check dropped (load_state_dict's multi-line RuntimeError instead of the one-line error
    naming the key), a .safetensors file sent to torch.load."""
    from safetensors.torch import save_file
    good = {"weight": torch.arange(6.0).view(3, 2), "bias": torch.tensor([1.0, 2.0, 3.0])}
    path = tmp_path / "kl16.safetensors"
    save_file(good, str(path))
    model = load_vae_weights(torch.nn.Linear(2, 3), path)
    assert torch.equal(model.weight, good["weight"]) and torch.equal(model.bias, good["bias"])
    assert not model.training and not model.weight.requires_grad
    bad = tmp_path / "bad.ckpt"
    torch.save({"model": {**good, "weight": torch.zeros(3, 3)}}, bad)
    with pytest.raises(ValueError, match=r"bad.ckpt is not MAR's kl16.ckpt: 1 wrong shape keys \(weight\)") as err:
        load_vae_weights(torch.nn.Linear(2, 3), bad)
    assert "\n" not in str(err.value)


def test_load_checkpoint_missing_file(vae, tmp_path):
    path = tmp_path / "nowhere" / "kl16.ckpt"
    with pytest.raises(FileNotFoundError, match="nowhere") as err:
        load_vae_weights(vae, path)
    assert str(path) in str(err.value) and "python -m util.io.download kl16" in str(err.value)


def test_shapes(vae):
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        post = vae.encode(x)
        assert isinstance(post, DiagonalGaussian)
        assert post.parameters.shape == (2, 32, 4, 4)
        assert post.sample().shape == post.mode().shape == (2, 16, 4, 4)
        assert torch.equal(post.mode(), post.parameters[:, :16])
        img = vae.decode(torch.randn(2, 16, 4, 4))
    assert img.shape == (2, 3, 64, 64)


def test_logvar_clamp():
    mean = torch.randn(1, 16, 2, 2)
    logvar = torch.full((1, 16, 2, 2), 100.0)
    logvar[:, :8] = -100.0
    post = DiagonalGaussian(torch.cat([mean, logvar], dim=1))
    assert post.logvar[:, 8:].eq(20.0).all() and post.logvar[:, :8].eq(-30.0).all()
    assert torch.allclose(post.std[:, 8:], torch.tensor(math.exp(10.0)))
    assert torch.allclose(post.var[:, :8], torch.tensor(math.exp(-30.0)))
    assert torch.equal(post.mean, mean)


def test_posterior_sampling_statistics():
    gen = torch.Generator().manual_seed(0)
    mean = torch.randn(1, 16, 2, 2, generator=gen) * 3
    logvar = torch.rand(1, 16, 2, 2, generator=gen) * 4 - 2
    n = 20000
    post = DiagonalGaussian(torch.cat([mean, logvar], dim=1).expand(n, -1, -1, -1))
    torch.manual_seed(123)
    s = post.sample()
    std = torch.exp(0.5 * logvar)
    # standard errors: std/sqrt(n) for the mean, std/sqrt(2n) for the std; allow ~5 sigma
    assert ((s.mean(0, keepdim=True) - mean).abs() <= 5 * std / math.sqrt(n)).all()
    assert ((s.std(0, keepdim=True) - std).abs() <= 5 * std / math.sqrt(2 * n)).all()
    # the seed makes sampling reproducible (main_cache.py's flipped and unflipped draws rely on torch's RNG)
    torch.manual_seed(123)
    assert torch.equal(s, post.sample())


def randomize_(module, gen):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.1)
    return module


def naive_group_norm(x, weight, bias, groups=32, eps=1e-6):
    B, C, H, W = x.shape
    g = x.reshape(B, groups, -1)
    mu = g.mean(-1, keepdim=True)
    var = ((g - mu) ** 2).mean(-1, keepdim=True)
    g = (g - mu) / torch.sqrt(var + eps)
    return g.reshape(B, C, H, W) * weight[None, :, None, None] + bias[None, :, None, None]


def test_resnet_block_matches_naive_reference(vae):
    gen = torch.Generator().manual_seed(2)
    block = randomize_(copy.deepcopy(vae.encoder.down[2].block[0]).double(), gen)  # 128 -> 256, with nin_shortcut
    x = torch.randn(2, 128, 8, 8, generator=gen, dtype=torch.float64)
    P = dict(block.named_parameters())

    def silu(t):
        return t / (1 + torch.exp(-t))

    h = naive_group_norm(x, P["norm1.weight"], P["norm1.bias"])
    h = F.conv2d(silu(h), P["conv1.weight"], P["conv1.bias"], padding=1)
    h = naive_group_norm(h, P["norm2.weight"], P["norm2.bias"])
    h = F.conv2d(silu(h), P["conv2.weight"], P["conv2.bias"], padding=1)
    ref = F.conv2d(x, P["nin_shortcut.weight"], P["nin_shortcut.bias"]) + h
    with torch.no_grad():
        out = block(x)
    assert torch.allclose(out, ref, atol=1e-5, rtol=0)


def test_attention_block_matches_naive_reference(vae):
    gen = torch.Generator().manual_seed(3)
    attn = randomize_(copy.deepcopy(vae.encoder.mid.attn_1).double(), gen)
    B, C, H, W = 2, 512, 3, 4
    x = torch.randn(B, C, H, W, generator=gen, dtype=torch.float64)
    P = dict(attn.named_parameters())
    h = naive_group_norm(x, P["norm.weight"], P["norm.bias"])
    q, k, v = (F.conv2d(h, P[f"{n}.weight"], P[f"{n}.bias"]).reshape(B, C, H * W) for n in "qkv")
    out = torch.empty(B, C, H * W, dtype=torch.float64)
    for b in range(B):
        for i in range(H * W):
            scores = torch.stack([(q[b, :, i] * k[b, :, j]).sum() / math.sqrt(C) for j in range(H * W)])
            w = torch.exp(scores - scores.max())
            w = w / w.sum()
            out[b, :, i] = sum(w[j] * v[b, :, j] for j in range(H * W))
    ref = x + F.conv2d(out.reshape(B, C, H, W), P["proj_out.weight"], P["proj_out.bias"])
    with torch.no_grad():
        got = attn(x)
    assert torch.allclose(got, ref, atol=1e-5, rtol=0)


def test_resample_match_naive_reference(vae):
    gen = torch.Generator().manual_seed(4)
    down = randomize_(copy.deepcopy(vae.encoder.down[0].downsample), gen)
    up = randomize_(copy.deepcopy(vae.decoder.up[1].upsample), gen)
    x = torch.randn(1, 128, 6, 6, generator=gen)
    # Downsample: zeros appended on the right and bottom only, then a stride-2 3x3 conv
    padded = torch.zeros(1, 128, 7, 7)
    padded[:, :, :6, :6] = x
    ref_down = F.conv2d(padded, down.conv.weight, down.conv.bias, stride=2)
    # Upsample: each pixel copied into a 2x2 square, then a 3x3 conv
    big = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    ref_up = F.conv2d(big, up.conv.weight, up.conv.bias, padding=1)
    with torch.no_grad():
        assert torch.allclose(down(x), ref_down, atol=1e-5, rtol=0)
        assert torch.allclose(up(x), ref_up, atol=1e-5, rtol=0)


def test_tokenizer_runs_the_vae_in_its_own_precision_under_autocast():
    """A caller's bf16 autocast (or bf16 inputs) must not reach the VAE: its convolutions would run in
    bf16 and its pixels and latents lose detail."""
    from models.tokenizer import KLTokenizer
    torch.manual_seed(0)
    tok = KLTokenizer().eval()
    latents, images = torch.randn(1, 16, 2, 2), torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        want_images, want_latents = tok.decode(latents), tok.encode(images).parameters
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got_images = tok.decode(latents.bfloat16())
            got_latents = tok.encode(images).parameters
    assert got_images.dtype == got_latents.dtype == torch.float32
    assert torch.equal(got_images, tok.decode(latents.bfloat16().float()))  # the input's rounding only
    assert torch.equal(got_latents, want_latents)
    assert want_images.shape == (1, 3, 32, 32)


def test_encoder_and_decoder_chain_their_parts_in_ldm_order():
    """The whole-network wiring (each part is checked above): conv_in, the levels (encoder: full resolution
    first, decoder: lowest first), mid = ResnetBlock -> attention -> ResnetBlock, then GroupNorm -> SiLU ->
    conv_out; quant_conv after the encoder, post_quant_conv before the decoder.
    Bugs: mid's attention after its second block; the SiLU before the encoder's conv_out dropped."""
    gen = torch.Generator().manual_seed(5)
    vae = randomize_(AutoencoderKL(embed_dim=4, ch_mult=(1, 2)).double().eval(), gen)
    x = torch.randn(1, 3, 8, 8, generator=gen, dtype=torch.float64)
    z = torch.randn(1, 4, 4, 4, generator=gen, dtype=torch.float64)

    def silu(t):
        return t / (1 + torch.exp(-t))

    def mid(m, h):
        return m.block_2(m.attn_1(m.block_1(h)))

    def levels(stack, h):
        for level in stack:
            for i, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[i](h)
            for resample in ("downsample", "upsample"):
                if hasattr(level, resample):
                    h = getattr(level, resample)(h)
        return h

    def head(net, h):
        h = silu(naive_group_norm(h, net.norm_out.weight, net.norm_out.bias))
        return F.conv2d(h, net.conv_out.weight, net.conv_out.bias, padding=1)

    enc, dec = vae.encoder, vae.decoder
    with torch.no_grad():
        moments = vae.quant_conv(head(enc, mid(enc.mid, levels(enc.down, enc.conv_in(x)))))
        image = head(dec, levels(reversed(dec.up), mid(dec.mid, dec.conv_in(vae.post_quant_conv(z)))))
        assert moments.shape == (1, 8, 4, 4) and image.shape == (1, 3, 8, 8)
        assert torch.allclose(vae.encode(x).parameters, moments, atol=1e-9, rtol=0)
        assert torch.allclose(vae.decode(z), image, atol=1e-9, rtol=0)


def test_posterior_noise_is_a_float32_normal_draw_and_var_is_exp_logvar():
    """sample() = mean + exp(logvar / 2) * z with z torch's float32 N(0, 1) draw at the current seed, and var
    = exp(logvar). Bugs: the noise drawn in float16 (then cast up: z keeps 11 bits, a statistical test passes),
    var computed as exp(2 logvar) (the clamp test sees var only where both underflow below its tolerance)."""
    mean = torch.tensor([0.5, -1.0, 2.0, 0.0]).view(1, 4, 1, 1)
    logvar = torch.tensor([0.0, -2.0, 1.0, 3.0]).view(1, 4, 1, 1)
    post = DiagonalGaussian(torch.cat([mean, logvar], dim=1).expand(64, -1, -1, -1))
    torch.manual_seed(7)
    z = torch.randn(64, 4, 1, 1)
    torch.manual_seed(7)
    sample = post.sample()
    assert sample.dtype == torch.float32
    assert torch.allclose(sample, mean + torch.exp(logvar / 2) * z, atol=1e-6, rtol=0)
    assert torch.allclose(post.var[0].flatten(), torch.tensor([1.0, math.exp(-2.0), math.e, math.exp(3.0)]))

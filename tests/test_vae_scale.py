"""The KL-16 latent scale on both sides, through the real tokenizer paths: training multiplies the
posterior sample by 0.2325, generation divides the model's latents by 0.2325 before decoding.

The VAE is the real KL-16 architecture with random weights; its encode/decode are wrapped only to
see what goes in and out. 0.2325 is written out here, not taken from the code under test.
"""

import pytest
import torch

from engine_mar import generate, to_latents
from util.images import to_uint8
from models.families.common import SamplingSettings
from models.tokenizer import KLTokenizer
from models.vae import DiagonalGaussian
from tests.conftest import randomize_, tiny_mar

pytestmark = pytest.mark.usefixtures("one_thread")

SCALE = 0.2325  # MAR's KL-16 latent scale (MAR's README and release code)


@pytest.fixture(scope="module")
def tokenizer():
    torch.manual_seed(0)
    return KLTokenizer().eval().requires_grad_(False)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(1)  # 32x32 images: 2x2 latent positions of 16 channels
    return randomize_(tiny_mar(img_size=32, attn_dropout=0.0, proj_dropout=0.0), std=0.1).eval()


def sampling_args():
    return SamplingSettings(num_iter=2)


def record(monkeypatch, obj, name, calls):
    """Replace obj.name by a wrapper that appends (args, result) to `calls`."""
    real = getattr(obj, name)

    def wrapper(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append((args, result))
        return result

    monkeypatch.setattr(obj, name, wrapper)


def test_generate_decodes_latents_divided_by_the_scale(tokenizer, model, monkeypatch):
    sampled, decoded = [], []
    record(monkeypatch, model, "sample_tokens", sampled)
    record(monkeypatch, tokenizer.vae, "decode", decoded)
    torch.manual_seed(2)
    images = generate(model, tokenizer, sampling_args(), [3, 7])
    (_, tokens), = sampled
    ((latents,), pixels), = decoded
    assert tokens.shape == (2, 16, 2, 2)
    torch.testing.assert_close(latents, tokens / SCALE, rtol=1e-6, atol=0)
    assert images.shape == (2, 32, 32, 3)
    assert (images == to_uint8(pixels)).all()  # the decoder's output is the image


def test_training_latents_are_the_posterior_sample_times_the_scale(tokenizer, monkeypatch):
    encoded = []
    record(monkeypatch, tokenizer.vae, "encode", encoded)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    torch.manual_seed(4)
    latents = to_latents(tokenizer, images, use_cached=False)
    ((seen,), posterior), = encoded
    assert torch.equal(seen, images)
    torch.manual_seed(4)  # the same noise: mean + std * eps
    eps = torch.randn(posterior.mean.shape)
    torch.testing.assert_close(latents, (posterior.mean + posterior.std * eps) * SCALE, rtol=1e-6, atol=1e-7)
    # cached moments (what main_cache.py stores) take the same route
    torch.manual_seed(4)
    cached = to_latents(tokenizer, posterior.parameters, use_cached=True)
    torch.testing.assert_close(cached, latents, rtol=0, atol=0)


def test_scale_round_trip_from_encoder_to_decoder(tokenizer, model, monkeypatch):
    """Latents made for training, handed back as if generated, reach the decoder as the raw posterior sample."""
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.no_grad():
        moments = tokenizer.vae.encode(images).parameters
    torch.manual_seed(6)
    latents = to_latents(tokenizer, moments, use_cached=True)
    torch.manual_seed(6)
    raw = DiagonalGaussian(moments).sample()
    assert not torch.allclose(latents, raw)
    monkeypatch.setattr(model, "sample_tokens", lambda *args, **kwargs: latents.clone())
    decoded = []
    record(monkeypatch, tokenizer.vae, "decode", decoded)
    generate(model, tokenizer, sampling_args(), [0, 1])
    ((seen,), _), = decoded
    torch.testing.assert_close(seen, raw, rtol=1e-6, atol=1e-6)

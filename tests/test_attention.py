"""models/attention.py splits batch x heads past the kernel's row cap (CUDA's 65,535 grid limit).

The cap is forced small on CPU so the chunked path runs here; the oracle is the same attention
in one call, and a softmax written out by hand.
"""
import math

import pytest
import torch

from models import attention as attention_module
from models.attention import attention
from models.heads.arinar import InnerAR
from tests.conftest import randomize_

HEADS, HEAD_DIM = 4, 8


@pytest.fixture
def kernel_calls(monkeypatch):
    """The (batch, heads) of every call that reaches torch's fused attention."""
    calls, sdpa = [], attention_module.F.scaled_dot_product_attention

    def counted(q, *args, **kwargs):
        calls.append(tuple(q.shape[:2]))
        return sdpa(q, *args, **kwargs)
    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention", counted)
    return calls


def cap_cpu_rows(monkeypatch, cap):
    monkeypatch.setitem(attention_module.MAX_KERNEL_ROWS, "cpu", cap)


def by_hand(q, k, v, scale, causal):
    scores = q.double() @ k.double().transpose(-1, -2) * scale
    if causal:
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril()
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, -1) @ v.double()


def inputs(batch, length, cached, dtype, seed=0):
    """q, k, v [batch, HEADS, length, HEAD_DIM]; `cached`: k and v are the first `length` positions of
    a larger preallocated cache, the non-contiguous views the inner model's decoding passes."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, HEADS, length, HEAD_DIM, generator=gen).to(dtype)
    if not cached:
        return q, *(torch.randn(q.shape, generator=gen).to(dtype) for _ in range(2))
    caches = [torch.randn(batch, HEADS, length + 5, HEAD_DIM, generator=gen).to(dtype) for _ in range(2)]
    return q[:, :, -1:], *(c[:, :, :length] for c in caches)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["causal", "full", "kv_cache"])
def test_chunked_attention_equals_one_call(monkeypatch, kernel_calls, case, dtype):
    causal, cached = case == "causal", case == "kv_cache"
    q, k, v = inputs(batch=7, length=6, cached=cached, dtype=dtype)
    whole = attention(q, k, v, 0.3, causal=causal)
    assert kernel_calls == [(7, HEADS)]
    kernel_calls.clear()
    cap_cpu_rows(monkeypatch, 2 * HEADS + 1)  # 2 images per call: 4 calls, the last one short
    chunked = attention(q, k, v, 0.3, causal=causal)
    assert kernel_calls == [(2, HEADS)] * 3 + [(1, HEADS)]
    assert chunked.shape == whole.shape == (7, HEADS, q.shape[2], HEAD_DIM)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=0)  # the same kernel on the same rows
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(chunked.double(), by_hand(q, k, v, 0.3, causal), rtol=tol, atol=tol)


def test_cap_counts_batch_times_heads(monkeypatch, kernel_calls):
    cap_cpu_rows(monkeypatch, 3 * HEADS)
    attention(*inputs(batch=3, length=2, cached=False, dtype=torch.float32), 0.3)
    assert kernel_calls == [(3, HEADS)]  # exactly at the cap: one call
    kernel_calls.clear()
    attention(*inputs(batch=4, length=2, cached=False, dtype=torch.float32), 0.3)
    assert kernel_calls == [(3, HEADS), (1, HEADS)]
    kernel_calls.clear()
    cap_cpu_rows(monkeypatch, 1)  # below one image's heads: one image per call
    attention(*inputs(batch=2, length=2, cached=False, dtype=torch.float32), 0.3)
    assert kernel_calls == [(1, HEADS), (1, HEADS)]


def test_cuda_cap_is_the_grid_limit():
    assert attention_module.MAX_KERNEL_ROWS["cuda"] == 2 ** 16 - 1
    assert "cpu" not in attention_module.MAX_KERNEL_ROWS  # CPU kernels take any row count


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_inner_sampling_with_chunks_draws_the_same(monkeypatch, kernel_calls, cfg):
    """The inner model's KV-cache decoding, chunked, gives the same tokens draw for draw."""
    torch.manual_seed(0)
    inner = randomize_(InnerAR(token_dim=16, cond_dim=24, width=32, depth=2, num_heads=HEADS), std=0.1).eval()
    z = torch.randn(10, 24, generator=torch.Generator().manual_seed(1))  # [cond; uncond] when guided

    def draw():
        torch.manual_seed(5)
        return inner.sample(z, temperature=0.9, cfg=cfg)
    whole = draw()
    calls_whole = len(kernel_calls)
    cap_cpu_rows(monkeypatch, 3 * HEADS)
    chunked = draw()
    assert len(kernel_calls) - calls_whole == math.ceil(10 / 3) * calls_whole  # every call was split
    assert max(b for b, _ in kernel_calls[calls_whole:]) == 3
    assert torch.equal(chunked, whole)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_attention_past_the_grid_limit():  # pragma: no cover - GPU only
    """Issue 30's crash: one-query rows x 4 heads (head dim 192, bf16) against a sliced KV cache, as the
    inner model decodes at batch 256 with CFG and 2 outer steps: the second step's 181 tokens per image
    make 92,672 rows, past 65,535 even before the heads multiply them (the first step's 38,400 x 4 heads
    are past it only as batch x heads, which some kernels' grids do not put in one dimension); the
    oracle is the softmax written out in fp32, a few thousand rows at a time."""
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    rows, heads, dim = 92672, 4, 192
    q = torch.randn(rows, heads, 1, dim, device=device, generator=gen).bfloat16()
    k_cache, v_cache = (torch.randn(rows, heads, 16, dim, device=device, generator=gen).bfloat16() for _ in range(2))
    k, v = k_cache[:, :, :5], v_cache[:, :, :5]
    out = attention(q, k, v, 0.25 / math.sqrt(dim))
    for i in range(0, rows, 4096):
        ref = by_hand(q[i:i + 4096].float(), k[i:i + 4096].float(), v[i:i + 4096].float(), 0.25 / math.sqrt(dim),
                      causal=False)
        torch.testing.assert_close(out[i:i + 4096].double(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("shared", [False, True])
def test_masked_attention_is_chunked_with_its_mask(monkeypatch, kernel_calls, shared):
    """The causal family's visibility mask (one per image, [B, 1, L_q, L_k]) and the scale-wise
    family's block-causal one (shared, [L_q, L_k]) past the row cap: each chunk of images takes its
    own slice of a per-image mask (a misaligned slice gives a query another image's visibility)."""
    q, k, v = inputs(batch=5, length=6, cached=False, dtype=torch.float32, seed=1)
    gen = torch.Generator().manual_seed(2)
    mask = torch.rand(6, 6, generator=gen) < 0.5 if shared else torch.rand(5, 1, 6, 6, generator=gen) < 0.5
    mask |= torch.eye(6, dtype=torch.bool)  # every query sees at least itself
    whole = attention(q, k, v, 0.3, mask=mask)
    cap_cpu_rows(monkeypatch, 2 * HEADS)
    kernel_calls.clear()
    chunked = attention(q, k, v, 0.3, mask=mask)
    assert kernel_calls == [(2, HEADS), (2, HEADS), (1, HEADS)]
    torch.testing.assert_close(chunked, whole, rtol=0, atol=0)
    scores = (q.double() @ k.double().transpose(-1, -2) * 0.3).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(chunked.double(), torch.softmax(scores, -1) @ v.double(), rtol=1e-5, atol=1e-5)


def test_a_mask_shared_by_all_images_stays_whole_in_every_chunk(monkeypatch, kernel_calls):
    """Bug: a 4-D mask of batch size 1 ([1, 1, L_q, L_k], broadcast over the images) taken for a per-image
    one and sliced per chunk: every chunk after the first gets an empty mask and the call fails."""
    q, k, v = inputs(batch=5, length=6, cached=False, dtype=torch.float32, seed=3)
    mask = (torch.rand(6, 6, generator=torch.Generator().manual_seed(4)) < 0.5) | torch.eye(6, dtype=torch.bool)
    cap_cpu_rows(monkeypatch, 2 * HEADS)
    out = attention(q, k, v, 0.3, mask=mask[None, None])
    assert kernel_calls == [(2, HEADS), (2, HEADS), (1, HEADS)]
    scores = (q.double() @ k.double().transpose(-1, -2) * 0.3).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(out.double(), torch.softmax(scores, -1) @ v.double(), rtol=1e-5, atol=1e-5)


def test_attention_dropout_reaches_the_kernel():
    """Bug: dropout_p not passed on to SDPA (MAR's attn_dropout silently off in training). With q = k = 0
    every weight is 1/L, and v = identity shows the weights: dropped ones are 0, kept ones 1/L / (1 - p)."""
    length, p = 8, 0.5
    q = k = torch.zeros(2, HEADS, length, length)
    v = torch.eye(length).expand(2, HEADS, length, length)
    torch.manual_seed(0)
    out = attention(q, k, v, 1.0, dropout_p=p)
    kept = out != 0
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / length / (1 - p)))
    assert 0.4 < float(kept.float().mean()) < 0.6
    torch.testing.assert_close(attention(q, k, v, 1.0), torch.full_like(out, 1 / length))  # no dropout: 1/L

"""Inner AdaLN transformer: numerics against a naive spec reference, causality, KV cache, init."""
import math

import numpy as np
import pytest
import torch
from scipy import special, stats

from models import attention as attention_module
from models.attention import attention
from models.heads.arinar import InnerAR
from tests.conftest import randomize_

D, C, W, H, K = 16, 24, 32, 4, 4


def small_inner(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(token_dim=D, cond_dim=C, width=W, depth=2, num_heads=H, num_gaussians=K)
    cfg.update(kw)
    return InnerAR(**cfg)


def naive_forward(m, x, z):
    """The spec written out by hand: loops over heads, explicit masks, no shared helpers."""
    width = m.start_token.shape[-1]
    heads = m.blocks[0].attn.num_heads
    hd = width // heads
    seq = [z @ m.cond_proj.weight.T + m.cond_proj.bias + m.start_token[0, 0]]
    for i in range(D - 1):
        seq.append(x[:, i:i + 1] * m.input_proj.weight[:, 0] + m.input_proj.bias)
    h = torch.stack(seq, 1) + m.pos_embedding
    silu_z = z * torch.sigmoid(z)

    def ln(t):
        mean = t.mean(-1, keepdim=True)
        var = ((t - mean) ** 2).mean(-1, keepdim=True)
        return (t - mean) / torch.sqrt(var + 1e-6)

    causal = torch.tril(torch.ones(D, D, dtype=torch.bool))
    for blk in m.blocks:
        mod = silu_z @ blk.ada_lin[1].weight.T + blk.ada_lin[1].bias
        g1, g2, s1, s2, b1, b2 = [mod[:, i * width:(i + 1) * width, None].transpose(1, 2) for i in range(6)]
        a = ln(h) * (1 + s1) + b1
        wq, wk, wv = blk.attn.mat_qkv.weight.split(width)
        q = a @ wq.T + blk.attn.q_bias
        k = a @ wk.T                          # no key bias
        v = a @ wv.T + blk.attn.v_bias
        outs = []
        for head in range(heads):
            sl = slice(head * hd, (head + 1) * hd)
            scores = q[..., sl] @ k[..., sl].transpose(1, 2) * (0.25 / math.sqrt(hd))
            scores = scores.masked_fill(~causal, float("-inf"))
            outs.append(torch.softmax(scores, -1) @ v[..., sl])
        h = h + g1 * (torch.cat(outs, -1) @ blk.attn.proj.weight.T + blk.attn.proj.bias)
        f = ln(h) * (1 + s2) + b2
        f = f @ blk.ffn.fc1.weight.T + blk.ffn.fc1.bias
        f = 0.5 * f * (1 + torch.tanh(math.sqrt(2 / math.pi) * (f + 0.044715 * f ** 3)))
        h = h + g2 * (f @ blk.ffn.fc2.weight.T + blk.ffn.fc2.bias)
    mod = silu_z @ m.head_nm.ada_lin[1].weight.T + m.head_nm.ada_lin[1].bias
    scale, shift = mod[:, None, :width], mod[:, None, width:]
    return (ln(h) * (1 + scale) + shift) @ m.head.weight.T + m.head.bias


def test_forward_matches_naive_spec():
    m = randomize_(small_inner())
    x, z = torch.randn(5, D), torch.randn(5, C)
    torch.testing.assert_close(m(x, z), naive_forward(m, x, z), rtol=1e-4, atol=1e-4)


def test_nll_is_sum_of_feature_nll():
    """The loss against scipy: -log p(x_i) under each feature's mixture, less the release's omitted
    log(2 pi)/2, summed over the features; the mixtures read off the naive forward's [means | logvars | logits]."""
    m = randomize_(small_inner(), std=0.05)
    x, z = torch.randn(6, D), torch.randn(6, C)
    with torch.no_grad():
        head = naive_forward(m, x, z).double().numpy()
    mu, logvar, logits = head[..., :K], head[..., K:2 * K], head[..., 2 * K:]
    log_w = logits - special.logsumexp(logits, axis=-1, keepdims=True)
    log_p = special.logsumexp(log_w + stats.norm.logpdf(x.double().numpy()[..., None], mu, np.exp(0.5 * logvar)),
                              axis=-1)
    expected = (-log_p - 0.5 * math.log(2 * math.pi)).sum(-1)
    np.testing.assert_allclose(m.nll(x, z).detach().numpy(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_causal_in_forward(dtype):
    m = randomize_(small_inner())
    x, z = torch.randn(3, D), torch.randn(3, C)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        base = m(x, z).float()
        for j in (3, 9):
            x2 = x.clone()
            x2[:, j] += 5.0
            out = m(x2, z).float()
            # output i sees features 0..i-1 only: positions <= j are untouched, j+1 changes
            assert torch.equal(out[:, :j + 1], base[:, :j + 1])
            assert not torch.allclose(out[:, j + 1], base[:, j + 1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_causal_mask_sdpa(dtype):
    q, k, v = (torch.randn(2, 3, 7, 8, dtype=dtype) for _ in range(3))
    out = attention(q, k, v, 0.3, causal=True).float()  # SDPA on CPU
    mask = torch.tril(torch.ones(7, 7, dtype=torch.bool))
    scores = (q.float() @ k.float().transpose(-1, -2) * 0.3).masked_fill(~mask, float("-inf"))
    ref = torch.softmax(scores, -1) @ v.float()
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)


@pytest.mark.skipif(attention_module.flash_attn_func is None or not torch.cuda.is_available(),
                    reason="flash-attn and CUDA not available")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_attention_causal_mask_flash(dtype, monkeypatch):  # pragma: no cover - GPU only
    q, k, v = (torch.randn(2, 3, 7, 64, dtype=dtype, device="cuda") for _ in range(3))
    out = attention(q, k, v, 0.3, causal=True)
    monkeypatch.setattr(attention_module, "flash_attn_func", None)  # SDPA
    ref = attention(q, k, v, 0.3, causal=True)
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)


def test_sampled_features_follow_head_layout():
    """With a constant head, the sample must come from [means | log-variances | logits]."""
    m = small_inner()
    with torch.no_grad():
        m.head.weight.zero_()
        m.head.bias.copy_(torch.tensor([-3.0, 7.0, 0.0, 0.0,           # means
                                        -9.0, -9.0, -9.0, -9.0,        # log-variances (std 0.011)
                                        -20.0, 20.0, -20.0, -20.0]))  # logits: component 1
    out = m.sample(torch.randn(50, C))
    assert torch.allclose(out, torch.full_like(out, 7.0), atol=0.1)


def test_init_follows_spec():
    torch.manual_seed(0)
    m = InnerAR(token_dim=16, cond_dim=256, width=256, depth=2, num_heads=4)
    assert m.head.weight.std().item() == pytest.approx(0.02 * 0.02, rel=0.15)
    assert m.head_nm.ada_lin[1].weight.std().item() == pytest.approx(0.01, rel=0.1)
    blk = m.blocks[0]
    assert blk.ada_lin[1].weight[:512].std().item() == pytest.approx(0.02e-5, rel=0.1)
    assert blk.ada_lin[1].weight[512:].std().item() == pytest.approx(0.01, rel=0.1)
    assert blk.attn.proj.weight.std().item() == pytest.approx(0.01, rel=0.1)  # 0.02 / sqrt(2*2)
    assert blk.ffn.fc2.weight.std().item() == pytest.approx(0.01, rel=0.1)
    assert blk.ffn.fc1.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert torch.count_nonzero(blk.attn.q_bias) == 0 and torch.count_nonzero(blk.attn.zero_k_bias) == 0
    assert m.pos_embedding.std().item() == pytest.approx(0.02, rel=0.1)


def test_zero_k_bias_is_a_persistent_buffer():
    m = small_inner()
    assert "blocks.0.attn.zero_k_bias" in m.state_dict()
    assert "blocks.0.attn.zero_k_bias" not in dict(m.named_parameters())


def test_mixture_math_is_fp32_under_bf16_autocast():
    m = randomize_(small_inner(), std=0.05)
    x, z = torch.randn(4, D), torch.randn(4, C)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert m(x, z).dtype == torch.float32  # the head Linear runs in fp32 (tests/test_engine.py)
        nll = m.nll(x, z)
        samples = m.sample(torch.cat([z, z]), cfg=2.0)
    assert nll.dtype == torch.float32 and samples.dtype == torch.float32
    assert torch.isfinite(nll).all() and torch.isfinite(samples).all()
    torch.testing.assert_close(nll, m.nll(x, z), rtol=0.05, atol=0.5)


def test_bad_width_heads():
    with pytest.raises(ValueError, match="divisible"):
        InnerAR(width=30, num_heads=4)


# ----------------------------------------------------------------------------- mutation guards (issue: heads)
@pytest.mark.parametrize("cfg_sampler", ["sir", "exact"])
def test_guided_kv_cache_sampling_equals_teacher_forcing_on_both_halves(cfg_sampler):
    """Bugs: the drawn feature fed back to the unconditional half in another row order (interleaved,
    repeat_interleave) or not at all, so a conditional row is guided by another row's history; the cache
    read at the wrong positions under CFG. The head outputs the sampler used at step t, for the
    conditional and the unconditional rows, must be what teacher forcing of the sampled token gives
    under each row's own condition."""
    m = randomize_(small_inner(), std=0.15).double()
    n = 5
    z = torch.randn(2 * n, C, generator=torch.Generator().manual_seed(21), dtype=torch.float64)
    seen = []
    m.draw.register_forward_hook(lambda module, args, out: seen.append(args[0].clone()))
    torch.manual_seed(22)
    x = m.sample(z, 1.0, 3.0, cfg_sampler=cfg_sampler)
    assert x.shape == (n, D) and len(seen) == D
    used = torch.stack(seen, 1)  # [2n, D, 3K]
    with torch.no_grad():
        torch.testing.assert_close(used[:n], m(x, z[:n]), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(used[n:], m(x, z[n:]), rtol=1e-9, atol=1e-9)


def mixture_rows(means, logvar=-40.0, logits=(0.0, -40.0, -40.0, -40.0)):
    """Head outputs [rows, 3K] = [K means | K log-variances | K logits] with component 0 dominant."""
    rows = len(means)
    mu = torch.as_tensor(means, dtype=torch.float64)[:, None].expand(rows, K)
    return torch.cat([mu, torch.full((rows, K), logvar, dtype=torch.float64),
                      torch.tensor(logits, dtype=torch.float64).expand(rows, K)], 1)


@pytest.mark.parametrize("cfg_sampler", ["sir", "exact"])
def test_guided_draw_pairs_row_i_with_row_n_plus_i(cfg_sampler):
    """Bugs: [cond; uncond] read interleaved (rows 0::2 and 1::2) or swapped. Conditional row i is a
    point mass at i + 0.25; the unconditional rows are wide Gaussians, so a draw must land on its own
    row's point; swapped, the wide rows would be the proposals and the draws spread out."""
    from models.heads.arinar import MixtureDraw
    n = 6
    out = torch.cat([mixture_rows(torch.arange(n) + 0.25), mixture_rows(torch.zeros(n), logvar=2.0)])
    torch.manual_seed(23)
    x = MixtureDraw(K, 1)(out, 1.0, 4.0, cfg_sampler)
    assert x.shape == (n, 1)
    torch.testing.assert_close(x[:, 0], torch.arange(n, dtype=torch.float64) + 0.25, rtol=0, atol=1e-6)


def test_inner_sample_hands_the_cfg_sampler_and_temperature_to_the_draw(monkeypatch):
    """Bugs: sample() dropping cfg_sampler (every run silently on 'sir') or the temperature in the guided
    path; each feature's draw must get both."""
    from models import gmm
    calls = []
    for name in ("sir", "exact"):
        real = gmm.CFG_SAMPLERS[name]
        monkeypatch.setitem(gmm.CFG_SAMPLERS, name,
                            lambda c, u, w, t, _n=name, _f=real: calls.append((_n, w, t)) or _f(c, u, w, t))
    m = small_inner()
    z = torch.randn(6, C)
    m.sample(z, 0.7, 2.5, cfg_sampler="exact")
    m.sample(z, 1.3, 2.5, cfg_sampler="sir")
    assert calls == [("exact", 2.5, 0.7)] * D + [("sir", 2.5, 1.3)] * D


def test_kv_cache_is_kept_in_the_activation_dtype(monkeypatch):
    """Bug: the cache allocated in z's dtype (float32) under bf16 autocast: twice the memory, and on CUDA
    keys/values no longer match the bf16 queries, so attention leaves flash-attn for SDPA."""
    from models.heads import arinar as inner_module
    dtypes, real = [], inner_module.write_kv
    monkeypatch.setattr(inner_module, "write_kv", lambda cache, pos, kv: dtypes.append((cache.dtype, kv.dtype))
                        or real(cache, pos, kv))
    m = small_inner()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m.sample(torch.randn(3, C), 1.0, 1.0)
    assert dtypes == [(torch.bfloat16, torch.bfloat16)] * (2 * D)  # 2 blocks x 16 features
    dtypes.clear()
    m.double().sample(torch.randn(3, C, dtype=torch.float64), 1.0, 1.0)
    assert set(dtypes) == {(torch.float64, torch.float64)}


def test_init_draws_the_start_token_and_zeroes_every_linear_bias():
    """Bugs: the start token left at its zero construction value (the spec draws it, like the position table,
    from a truncated normal of std 0.02), the Linear biases left at PyTorch's uniform default."""
    torch.manual_seed(0)
    m = InnerAR(token_dim=16, cond_dim=256, width=256, depth=2, num_heads=4)
    assert m.start_token.std().item() == pytest.approx(0.02, rel=0.15)
    assert m.cond_proj.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert m.input_proj.weight.std().item() == pytest.approx(0.02, rel=0.15)
    linears = {name: mod for name, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)}
    assert {"cond_proj", "input_proj", "head", "head_nm.ada_lin.1", "blocks.1.attn.proj", "blocks.1.ffn.fc1",
            "blocks.1.ffn.fc2", "blocks.1.ada_lin.1"} <= set(linears)
    for name, mod in linears.items():
        assert mod.bias is None or not mod.bias.any(), name


def test_a_feature_group_that_does_not_divide_the_token_is_refused_at_construction():
    """Bug: the constructor's divisibility check dropped (only the config's remains): an InnerAR built directly with
    g = 3 for 16 features would make 5 steps of 3 and fail later, in a view, without naming the flag."""
    for group in (3, 5, 0):
        with pytest.raises(ValueError, match=f"--feature_group {group} must divide the token's 16 features"):
            InnerAR(token_dim=16, cond_dim=8, width=8, num_heads=2, feature_group=group)
    assert InnerAR(token_dim=16, cond_dim=8, width=8, num_heads=2, feature_group=4).num_steps == 4


@pytest.mark.parametrize("group", [1, 4])
def test_unguided_sampling_divides_each_std_by_the_temperature(group):
    """Bug: the unguided draw dropping the temperature (the guided path keeps it), so sampling without CFG at
    T != 1 silently runs at T = 1. A constant head: every feature is N(1.5, 0.3^2) whatever came before it,
    so all 16 features of every token must follow N(1.5, (0.3 / T)^2)."""
    m = small_inner(feature_group=group)
    with torch.no_grad():
        m.head.weight.zero_()
        m.head.bias.copy_(torch.cat([torch.full((K * group,), 1.5), torch.full((K * group,), 2 * math.log(0.3)),
                                     torch.tensor([0.0, -40.0, -40.0, -40.0])]))
    torch.manual_seed(24)
    x = m.sample(torch.randn(300, C), temperature=0.6).flatten().numpy()
    assert stats.kstest(x, stats.norm(1.5, 0.3 / 0.6).cdf).pvalue > 0.001
    assert stats.kstest(x, stats.norm(1.5, 0.3).cdf).pvalue < 1e-8

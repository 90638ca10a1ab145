"""Outer MAR model: flow against a naive reference, masking, schedules, sampling, bad input."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from models.families.common import cosine_schedule as sampling_schedule
from models.families.mar import MAR, positions, sample_mask_ratio
from models.layers import Mlp, init_linears_and_norms_
from models import create_model
from tests.conftest import SpyBackend, randomize_, tiny_mar


def eval_tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return tiny_mar(attn_dropout=0.0, proj_dropout=0.0, **kw).eval()


def naive_condition(m, tokens, mask, class_vec):
    """Outer flow written from the spec, one image at a time, with plain tensor ops."""
    out = []
    for b in range(tokens.shape[0]):
        x = tokens[b] @ m.z_proj.weight.T + m.z_proj.bias
        x = torch.cat([class_vec[b].expand(m.buffer_size, -1), x]) + m.encoder_pos_embed_learned[0]
        x = F.layer_norm(x, x.shape[-1:], m.z_proj_ln.weight, m.z_proj_ln.bias, 1e-6)
        keep = torch.cat([torch.ones(m.buffer_size, dtype=torch.bool), ~mask[b]])
        x = x[keep]
        for blk in m.encoder_blocks:
            x = naive_block(blk, x)
        x = F.layer_norm(x, x.shape[-1:], m.encoder_norm.weight, m.encoder_norm.bias, 1e-6)
        x = x @ m.decoder_embed.weight.T + m.decoder_embed.bias
        full = m.mask_token[0].repeat(len(keep), 1)
        full[keep] = x
        x = full + m.decoder_pos_embed_learned[0]
        for blk in m.decoder_blocks:
            x = naive_block(blk, x)
        x = F.layer_norm(x, x.shape[-1:], m.decoder_norm.weight, m.decoder_norm.bias, 1e-6)
        out.append(x[m.buffer_size:] + m.diffusion_pos_embed_learned[0])
    return torch.stack(out)


def naive_block(blk, x):
    n, c = x.shape
    heads = blk.attn.num_heads
    h = F.layer_norm(x, (c,), blk.norm1.weight, blk.norm1.bias, 1e-6)
    q, k, v = (h @ blk.attn.qkv.weight.T + blk.attn.qkv.bias).split(c, -1)
    outs = []
    for i in range(heads):
        sl = slice(i * c // heads, (i + 1) * c // heads)
        att = torch.softmax(q[:, sl] @ k[:, sl].T / math.sqrt(c // heads), -1)
        outs.append(att @ v[:, sl])
    x = x + torch.cat(outs, -1) @ blk.attn.proj.weight.T + blk.attn.proj.bias
    h = F.layer_norm(x, (c,), blk.norm2.weight, blk.norm2.bias, 1e-6)
    h = F.gelu(h @ blk.mlp.fc1.weight.T + blk.mlp.fc1.bias)  # exact erf GELU
    return x + h @ blk.mlp.fc2.weight.T + blk.mlp.fc2.bias


def make_mask(b, seq_len, num_masked, seed=0):
    gen = torch.Generator().manual_seed(seed)
    orders = torch.stack([torch.randperm(seq_len, generator=gen) for _ in range(b)])
    return MAR.mask_from_orders(orders, num_masked)


# ----------------------------------------------------------------------------- outer flow
def test_condition_matches_naive_reference():
    m = randomize_(eval_tiny(), std=0.1)
    tokens = torch.randn(3, m.seq_len, m.token_embed_dim)
    mask = make_mask(3, m.seq_len, 11)
    labels = torch.tensor([1, 5, 9])
    class_vec = m.class_embedding(labels, 3)
    with torch.no_grad():
        torch.testing.assert_close(m.condition(tokens, mask, class_vec),
                                   naive_condition(m, tokens, mask, class_vec), rtol=1e-4, atol=1e-4)


def test_condition_at_predicted_positions_equals_full_condition():
    """predict= runs the last decoder block's queries at those positions only: same z there."""
    m = randomize_(eval_tiny(), std=0.1)
    tokens = torch.randn(3, m.seq_len, m.token_embed_dim)
    mask = make_mask(3, m.seq_len, 11)
    predict = torch.zeros_like(mask)
    for row in range(3):  # 3 of each image's masked tokens
        predict[row, mask[row].nonzero()[:3, 0]] = True
    class_vec = m.class_embedding(torch.tensor([1, 5, 9]), 3)
    with torch.no_grad():
        full = m.condition(tokens, mask, class_vec)
        part = m.condition(tokens, mask, class_vec, predict=predict)
    assert part.shape == (3, 3, full.shape[-1])
    torch.testing.assert_close(part.flatten(0, 1), full[predict], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="same number"):
        bad = predict.clone()
        bad[0, 0] = ~bad[0, 0]
        m.condition(tokens, mask, class_vec, predict=bad)


def test_encoder_drops_masked_tokens_and_buffer_holds_class():
    m = randomize_(eval_tiny(), std=0.1)
    seen = []
    m.encoder_blocks[0].register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape))
    tokens = torch.randn(2, m.seq_len, 16)
    mask = make_mask(2, m.seq_len, 10)
    with torch.no_grad():
        z = m.condition(tokens, mask, m.class_embedding(torch.tensor([0, 3]), 2))
        # changing the values of masked tokens changes nothing: they never enter the encoder
        tokens2 = tokens.clone()
        tokens2[mask] = torch.randn(int(mask.sum()), 16) * 10
        z2 = m.condition(tokens2, mask, m.class_embedding(torch.tensor([0, 3]), 2))
        z3 = m.condition(tokens, mask, m.class_embedding(torch.tensor([4, 3]), 2))
    assert seen[0] == (2, m.buffer_size + m.seq_len - 10, 32)
    torch.testing.assert_close(z, z2)
    assert not torch.allclose(z3[0], z[0]) and torch.allclose(z3[1], z[1])


def test_decoder_fills_masked_positions_with_mask_token():
    m = randomize_(eval_tiny(), std=0.1)
    captured = {}
    m.decoder_blocks[0].register_forward_hook(lambda mod, inp, out: captured.update(x=inp[0]))
    mask = make_mask(2, m.seq_len, 7)
    with torch.no_grad():
        m.condition(torch.randn(2, m.seq_len, 16), mask, m.class_embedding(None, 2))
    dec_in = captured["x"][:, m.buffer_size:]
    expected = (m.mask_token[0, 0] + m.decoder_pos_embed_learned[0, m.buffer_size:]).expand(2, -1, -1)
    torch.testing.assert_close(dec_in[mask], expected[mask])
    assert not torch.allclose(dec_in[~mask], expected[~mask])


@pytest.mark.parametrize("table", ["encoder_pos_embed_learned", "decoder_pos_embed_learned",
                                   "diffusion_pos_embed_learned"])
def test_each_position_table_is_used(table):
    m = randomize_(eval_tiny(), std=0.1)
    tokens, mask = torch.randn(1, m.seq_len, 16), make_mask(1, m.seq_len, 8)
    cv = m.class_embedding(torch.tensor([2]), 1)
    with torch.no_grad():
        before = m.condition(tokens, mask, cv)
        getattr(m, table).add_(torch.randn_like(getattr(m, table)))
        after = m.condition(tokens, mask, cv)
    assert (after - before).abs().max() > 1e-2
    assert m.diffusion_pos_embed_learned.shape == (1, m.seq_len, 32)
    assert m.encoder_pos_embed_learned.shape == (1, m.buffer_size + m.seq_len, 32)


def test_label_drop_in_training_only():
    m = randomize_(tiny_mar(label_drop_prob=1.0), std=0.1)
    labels = torch.tensor([1, 2, 3])
    fake = m.fake_latent.expand(3, -1)
    torch.testing.assert_close(m.class_embedding(labels, 3, drop_labels=True), fake)
    m.eval()
    torch.testing.assert_close(m.class_embedding(labels, 3, drop_labels=False), m.class_emb(labels))
    # the drop rate is per sample: binomial check at 0.1
    m.label_drop_prob = 0.1
    torch.manual_seed(0)
    emb = m.class_embedding(torch.zeros(20000, dtype=torch.long), 20000, drop_labels=True)
    dropped = (emb == m.fake_latent).all(-1).float().mean().item()
    assert abs(dropped - 0.1) < 4 * math.sqrt(0.1 * 0.9 / 20000)


def test_forward_applies_label_drop_in_train_mode_not_eval():
    # weights at std 0.3 and seeded latents: the class moves the loss by a fixed, clearly measurable amount
    m = randomize_(tiny_mar(label_drop_prob=1.0, attn_dropout=0.0, proj_dropout=0.0), std=0.3)
    lat, mask = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(0)), make_mask(2, 16, 9)
    labels = torch.tensor([1, 2])
    tokens = m.patchify(lat)

    def loss_with(class_vec):  # the loss written out for given class vectors
        z = m.condition(tokens, mask, class_vec)
        return m.arhead.nll(tokens[mask], z[mask]).mean()

    with torch.no_grad():
        m.train()
        train_loss = m(lat, labels, mask)
        m.eval()
        eval_loss = m(lat, labels, mask)
        uncond = loss_with(m.fake_latent.expand(2, -1))
        cond = loss_with(m.class_emb(labels))
    torch.testing.assert_close(train_loss, uncond, rtol=1e-6, atol=0)  # every label dropped
    torch.testing.assert_close(eval_loss, cond, rtol=1e-6, atol=0)     # none dropped
    assert abs(cond - uncond) > 1e-4 * abs(uncond)  # the two really are told apart


def test_mask_ratio_is_truncated_normal():
    torch.manual_seed(0)
    ratios = np.array([sample_mask_ratio(0.7) for _ in range(4000)])
    assert ratios.min() >= 0.7 and ratios.max() <= 1.0
    dist = stats.truncnorm((0.7 - 1.0) / 0.25, 0.0, loc=1.0, scale=0.25)
    assert stats.kstest(ratios, dist.cdf).pvalue > 0.01
    assert stats.kstest(ratios, stats.uniform(0.7, 0.3).cdf).pvalue < 1e-6


def test_random_mask_counts():
    m = tiny_mar()
    torch.manual_seed(1)
    for _ in range(20):
        mask = m.random_mask(4, "cpu")
        counts = mask.sum(1)
        assert (counts == counts[0]).all() and math.ceil(0.7 * 16) <= counts[0] <= 16
    # different images get different orders
    assert not (mask[0] == mask[1]).all() or counts[0] == 16


def test_loss_is_mean_over_masked_tokens():
    m = randomize_(eval_tiny(), std=0.05)
    lat, labels = torch.randn(2, 16, 4, 4), torch.tensor([0, 1])
    mask = make_mask(2, 16, 5)
    tokens = m.patchify(lat)
    with torch.no_grad():
        z = m.condition(tokens, mask, m.class_embedding(labels, 2))
        per_token = m.arhead.nll(tokens.reshape(-1, 16), z.reshape(-1, z.shape[-1])).reshape(2, 16)
        expected = (per_token * mask).sum() / mask.sum()
        torch.testing.assert_close(m(lat, labels, mask), expected, rtol=1e-5, atol=1e-5)


def test_patchify_roundtrip_and_order():
    m = tiny_mar(img_size=64, vae_stride=8, patch_size=2)   # 4x4 tokens of 16*4 features
    lat = torch.randn(2, 16, 8, 8)
    tokens = m.patchify(lat)
    assert tokens.shape == (2, 16, 64)
    torch.testing.assert_close(m.unpatchify(tokens), lat)
    # token index = h * w_tokens + w; features are channel-major
    torch.testing.assert_close(tokens[0, 1 * 4 + 2, :4], lat[0, 0, 2:4, 4:6].reshape(-1))


def test_grad_checkpointing_gives_same_grads():
    lat, labels, mask = torch.randn(2, 16, 4, 4), torch.tensor([3, 4]), make_mask(2, 16, 12)
    grads = []
    for ckpt in (False, True):
        m = randomize_(tiny_mar(attn_dropout=0.0, proj_dropout=0.0, label_drop_prob=0.0,
                                grad_checkpointing=ckpt), std=0.05)
        m.train()
        m(lat, labels, mask).backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1])


def test_bf16_autocast_training_loss_is_fp32_and_finite():
    m = tiny_mar()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = m(torch.randn(2, 16, 4, 4), torch.tensor([1, 2]))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()


# ----------------------------------------------------------------------------- schedules
def test_cosine_schedule_release_facts():
    steps = sampling_schedule(256, 64, cfg=4.5)
    masked = [256] + [m for m, _ in steps]
    predicted = [masked[i] - masked[i + 1] for i in range(63)] + [masked[63]]
    assert predicted[:13] == [1] * 13 and predicted[13] > 1
    assert predicted[-1] == 6 and sum(predicted) == 256 and min(predicted) >= 1
    assert steps[0][1] == pytest.approx(1.0137, abs=1e-4)
    assert steps[-1][1] == pytest.approx(4.4863, abs=1e-4)
    assert all(s == 4.5 for _, s in sampling_schedule(256, 64, 4.5, "constant"))


def test_cosine_schedule_small_case_literal():
    """16 tokens, 5 steps, cfg 3: floor(16 cos(pi/2 s/5)) = 15, 12, 9, 4, 0 -> clamped to 1 at the last step;
    linear cfg 1 + 2 (16 - masked) / 16."""
    steps = sampling_schedule(16, 5, cfg=3.0)
    assert [masked for masked, _ in steps] == [15, 12, 9, 4, 1]
    assert [scale for _, scale in steps] == pytest.approx([1.125, 1.5, 1.875, 2.5, 2.875], abs=1e-12)
    # more steps than tokens: one token per step until one is left, the rest at the last step
    assert [masked for masked, _ in sampling_schedule(4, 6)] == [3, 2, 1, 1, 1, 1]


def test_cosine_schedule_matches_the_spec_formula_step_by_step():
    """The spec's formula, evaluated with numpy: floor(256 cos(pi/2 s/64)), at least one token unmasked per
    step and one still masked until the last."""
    masked, expected = 256, []
    for s in range(1, 65):
        value = int(np.floor(256 * np.cos(np.pi / 2 * s / 64)))
        masked = max(1, min(masked - 1, value))
        expected.append(masked)
    steps = sampling_schedule(256, 64, cfg=4.5)
    assert [m for m, _ in steps] == expected
    assert [w for _, w in steps] == pytest.approx([1 + 3.5 * (256 - m) / 256 for m in expected], abs=1e-12)


def test_sampling_predicts_the_scheduled_tokens():
    """Counts and scales seen by the inner sampler, against the literal schedule of the 16-token, 5-step case."""
    m = eval_tiny()
    counts, scales, positions_seen = [], [], []
    sample, condition_at = m.arhead.sample, m.condition_at

    def spy_sample(z, temperature, cfg, **kw):
        counts.append(z.shape[0])
        scales.append(cfg)
        return sample(z, temperature, cfg, **kw)

    def spy_condition(tokens, keep, class_vec, predict=None):
        positions_seen.append((keep, predict))
        return condition_at(tokens, keep, class_vec, predict)

    m.arhead.sample, m.condition_at = spy_sample, spy_condition
    torch.manual_seed(0)
    out = m.sample_tokens(2, num_iter=5, cfg=3.0, labels=torch.tensor([1, 2]))
    # tokens predicted per step: 16-15, 15-12, 12-9, 9-4, and the last 4; x 2 images x 2 (cfg doubles the rows)
    assert counts == [4 * n for n in (1, 3, 3, 5, 4)]
    assert scales == pytest.approx([1.125, 1.5, 1.875, 2.5, 2.875], abs=1e-12)
    for keep, predict in positions_seen:  # the class and the unconditional rows see the same positions
        assert torch.equal(keep[:2], keep[2:]) and torch.equal(predict[:2], predict[2:])
    assert out.shape == (2, 16, 4, 4) and torch.isfinite(out).all() and (out != 0).all()


def test_sampling_is_seeded_and_label_dependent():
    m = randomize_(eval_tiny(), std=0.1)
    labels = torch.tensor([1, 2, 3])
    runs = []
    for seed, lab in ((0, labels), (0, labels), (1, labels), (0, torch.tensor([4, 5, 6]))):
        torch.manual_seed(seed)
        runs.append(m.sample_tokens(3, num_iter=4, cfg=2.0, labels=lab, temperature=1.2))
    assert torch.equal(runs[0], runs[1])
    assert not torch.allclose(runs[0], runs[2]) and not torch.allclose(runs[0], runs[3])


def test_sampling_under_bf16_autocast_is_finite():
    m = eval_tiny()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m.sample_tokens(2, num_iter=4, cfg=4.0, labels=torch.tensor([0, 9]))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs,match", [
    (dict(cfg=0.5, labels=torch.tensor([1, 2])), r"--cfg must be 1 \(no guidance\) or finite"),
    # a ramped scale 1 + (cfg - 1) k / L would round to exactly 1, which the head reads as unguided
    (dict(cfg=1 + 2 ** -52, labels=torch.tensor([1, 2])), r"--cfg must be 1 \(no guidance\) or finite"),
    (dict(cfg=float("inf"), labels=torch.tensor([1, 2])), r"--cfg must be 1 \(no guidance\) or finite"),
    (dict(temperature=0.0), "temperature must be > 0"),
    (dict(temperature=-1.0), "temperature must be > 0"),
    (dict(labels=torch.tensor([1, 10])), r"labels must be in \[0, 10\)"),
    (dict(labels=torch.tensor([1])), "one per image"),
    (dict(cfg=2.0), "needs class labels"),
    (dict(cfg_schedule="cosine"), "cfg_schedule must be one of"),
])
def test_sample_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        eval_tiny().sample_tokens(2, num_iter=2, **kwargs)


def test_sampling_settings_accept_the_edges_of_their_ranges():
    """--cfg exactly 1 + 1e-6 (the documented least guided scale), exactly 1 (no guidance), the smallest positive
    temperature and one step are all valid. Bug caught: the lower cfg bound made exclusive (1 + 1e-6 refused)."""
    from models.families.common import check_sampling_settings
    for cfg in (1.0, 1 + 1e-6, 1e300):
        check_sampling_settings(1, cfg, 5e-324, "linear")
    with pytest.raises(ValueError, match=r"^--cfg must be 1 \(no guidance\) or finite and at least 1 \+ 1e-06"):
        check_sampling_settings(1, 1 + 0.99e-6, 1.0, "constant")


@pytest.mark.parametrize("latents,labels,mask,match", [
    (torch.randn(2, 16, 8, 8), torch.tensor([1, 2]), None, r"latents must be \[B, 16, 4, 4\]"),
    (torch.randn(2, 32, 4, 4), torch.tensor([1, 2]), None, "latents must be"),
    (torch.randn(16, 4, 4), torch.tensor([1, 2]), None, "latents must be"),
    (torch.randn(2, 16, 4, 4), torch.tensor([1, 12]), None, r"labels must be in \[0, 10\)"),
    (torch.randn(2, 16, 4, 4), torch.tensor([-1, 2]), None, "labels must be in"),
    (torch.randn(2, 16, 4, 4), torch.tensor([1.0, 2.0]), None, "integer tensor"),
    (torch.randn(2, 16, 4, 4), torch.tensor([1, 2]), torch.ones(2, 15), r"mask must be \[B, seq_len\]"),
    (torch.randn(2, 16, 4, 4), torch.tensor([1, 2]), torch.eye(2, 16), None),
    (torch.randn(2, 16, 4, 4), torch.tensor([1, 2]), torch.zeros(2, 16), "same number"),
])
def test_forward_bad_input(latents, labels, mask, match):
    m = tiny_mar().eval()  # a training forward leaves the labels' range to the training loop (test_train_step.py)
    if match is None:  # one masked token per image is fine
        assert torch.isfinite(m(latents, labels, mask))
        return
    with pytest.raises(ValueError, match=match):
        m(latents, labels, mask)


def test_uneven_mask_rejected():
    mask = torch.zeros(2, 16)
    mask[0, :3] = 1
    mask[1, :5] = 1
    with pytest.raises(ValueError, match="same number"):
        tiny_mar()(torch.randn(2, 16, 4, 4), torch.tensor([1, 2]), mask)


def test_factories_shapes():
    m = create_model("mar_base", enc_dec_depth=2, num_gaussians=2)
    assert len(m.encoder_blocks) == len(m.decoder_blocks) == 2
    assert m.arhead.head.out_features == 6 and m.z_proj.out_features == 768
    with pytest.raises(ValueError, match="--img_size 250 must be a multiple of --vae_stride x --patch_size = 16"):
        create_model("mar_base", img_size=250)


# ----------------------------------------------------------------------------- mutation guards (outer MAR)
def watch_training_split(m, monkeypatch):
    """Per forward: the tokens the encoder projects (z_proj's input, [B, n, D]) and the head's targets
    ([B * P, D]); the head's loss itself is skipped (zeros)."""
    seen = []
    m.z_proj.register_forward_hook(lambda module, args, out: seen.append({"visible": args[0].detach()}))

    def spy_loss(target, z):
        seen[-1]["target"] = target.detach()
        return target.new_zeros(target.shape[0])

    monkeypatch.setattr(m.head, "loss", spy_loss)
    return seen


def token_ids(rows, tokens):
    """Which of `tokens` [L, D] (distinct random values) each of `rows` [n, D] is."""
    match = (rows[:, None, :] == tokens[None]).all(-1)
    assert (match.sum(1) == 1).all()
    return match.float().argmax(1)


@pytest.mark.usefixtures("one_thread")
def test_training_mask_respects_mask_ratio_min_and_predicts_exactly_the_unseen_tokens(monkeypatch):
    """Bugs: --mask_ratio_min not reaching the sampled ratio (the default 0.7 used), and the default mask's
    visible/predicted halves swapped (the encoder sees the ~90% that should be predicted).

    Oracles: ratio min 1 masks all 16 tokens (normal(1, .25) truncated to [1, 1]); at 0.7 each image
    predicts ceil(r 16) >= 12 tokens and the encoder sees exactly the others; at 0.3 the share of
    forwards predicting <= 11 tokens is P(r <= 11/16) under scipy's truncnorm (5-sigma band)."""
    gen = torch.Generator().manual_seed(0)
    lat, labels = torch.randn(2, 16, 4, 4, generator=gen), torch.tensor([1, 2])
    counts = {}
    for ratio_min, forwards in ((1.0, 3), (0.7, 30), (0.3, 200)):
        m = tiny_mar(mask_ratio_min=ratio_min, attn_dropout=0.0, proj_dropout=0.0).eval()
        seen = watch_training_split(m, monkeypatch)
        tokens = m.patchify(lat)
        torch.manual_seed(1)
        with torch.no_grad():
            for _ in range(forwards):
                m(lat, labels)
        counts[ratio_min] = []
        for s in seen:
            n_visible = s["visible"].shape[1]
            targets = s["target"].view(2, 16 - n_visible, 16)
            for b in range(2):  # the encoder's tokens and the targets split the image's 16 tokens
                ids = torch.cat([token_ids(s["visible"][b], tokens[b]), token_ids(targets[b], tokens[b])])
                assert torch.equal(ids.sort().values, torch.arange(16))
            counts[ratio_min].append(16 - n_visible)
    assert counts[1.0] == [16] * 3
    assert min(counts[0.7]) >= 12
    low = np.array(counts[0.3])
    assert low.min() >= math.ceil(0.3 * 16)
    p = stats.truncnorm((0.3 - 1.0) / 0.25, 0.0, loc=1.0, scale=0.25).cdf(11 / 16)  # ~0.21
    n = len(low)
    assert abs((low <= 11).sum() - n * p) < 5 * math.sqrt(n * p * (1 - p))


@pytest.mark.usefixtures("one_thread")
def test_rows_grouped_by_open_count_keep_their_own_class_and_canvas():
    """Bug: the class vectors not regrouped with their rows (the first rows' classes given to another
    group). Rows 0, 2 leave 12 tokens open, rows 1, 3 leave 8: two groups, each step's conditional half
    must carry its rows' own class embeddings and the unconditional half the fake class."""
    m = randomize_(eval_tiny(), std=0.1)
    known = torch.randn(4, 16, 4, 4, generator=torch.Generator().manual_seed(2))
    keep = torch.zeros(4, 16, dtype=torch.bool)
    keep[0, :4] = keep[2, 6:10] = True
    keep[1, :8] = keep[3, 8:] = True
    labels = torch.tensor([1, 2, 3, 4])
    spy = SpyBackend()
    torch.manual_seed(0)
    out = m.sample_tokens(4, num_iter=3, cfg=2.0, labels=labels, known=known, keep=keep, backend=spy)
    given = m.patchify(known)
    assert len(spy.runs) == 6  # 3 steps per group
    rows_seen = set()
    for _, (tokens, visible, class_vec, predict) in spy.runs:
        b = tokens.shape[0] // 2
        for r in range(b):  # which image this row is: its kept tokens are that image's
            (i,) = [i for i in range(4) if torch.equal(tokens[r][keep[i]], given[i][keep[i]])]
            rows_seen.add(i)
            torch.testing.assert_close(class_vec[r], m.class_emb.weight[labels[i]], rtol=0, atol=0)
            torch.testing.assert_close(class_vec[b + r], m.fake_latent[0], rtol=0, atol=0)
            assert not keep[i][predict[r]].any()  # a kept token is never predicted
    assert rows_seen == {0, 1, 2, 3}
    assert torch.equal(m.patchify(out)[keep], given[keep])


@pytest.mark.usefixtures("one_thread")
def test_a_fully_kept_row_runs_no_step_and_comes_back_bit_for_bit():
    """Bug: rows with nothing to generate sent through the loop anyway (its forced last step then
    predicts, and overwrites, one of their kept tokens)."""
    m = randomize_(eval_tiny(), std=0.1)
    known = torch.randn(3, 16, 4, 4, generator=torch.Generator().manual_seed(3))
    keep = torch.zeros(3, 16, dtype=torch.bool)
    keep[0, ::2] = True
    keep[1] = True  # nothing to generate in row 1
    spy = SpyBackend()
    torch.manual_seed(0)
    out = m.sample_tokens(3, num_iter=4, cfg=2.0, labels=torch.tensor([1, 2, 3]), known=known, keep=keep,
                          backend=spy)
    assert torch.equal(out[1], known[1])
    assert sorted({args[0].shape[0] for _, args in spy.runs}) == [2]  # rows 0 and 2 alone, doubled for CFG
    spy = SpyBackend()
    out = m.sample_tokens(3, num_iter=4, cfg=2.0, labels=torch.tensor([1, 2, 3]), known=known,
                          keep=torch.ones(3, 16, dtype=torch.bool), backend=spy)
    assert torch.equal(out, known) and spy.runs == []


def test_outer_init_is_xavier_uniform_with_zero_biases_and_unit_norms():
    """Bug: init_linears_and_norms_ leaving PyTorch's default biases (or LayerNorm affine) in place. Oracle:
    Glorot and Bengio's bound sqrt(6 / (fan_in + fan_out)), MAR's (timm's) zero biases, unit LayerNorms."""
    net = torch.nn.Sequential(torch.nn.Linear(30, 50), torch.nn.LayerNorm(50), torch.nn.Linear(50, 20, bias=False))
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(3.0)
    torch.manual_seed(0)
    init_linears_and_norms_(net)
    assert torch.equal(net[0].bias, torch.zeros(50))
    assert torch.equal(net[1].weight, torch.ones(50)) and torch.equal(net[1].bias, torch.zeros(50))
    for layer, (fan_in, fan_out) in ((net[0], (30, 50)), (net[2], (50, 20))):
        bound, weight = math.sqrt(6 / (fan_in + fan_out)), layer.weight.detach()
        assert float(weight.abs().max()) <= bound
        assert float(weight.std()) == pytest.approx(bound / math.sqrt(3), rel=0.1)  # U(-a, a): std a / sqrt 3


def test_mlp_drops_out_after_the_activation_and_after_fc2():
    """Bug: timm's Mlp dropout after the GELU left out (MAR's proj_dropout only on the block's output). fc1
    gives every hidden unit 1, so GELU(1) = (1 + erf(1 / sqrt 2)) / 2; fc2 = identity picks one unit per
    output: it survives both dropouts (x 2 each, 4 GELU(1)) with probability 1/4 and is 0 otherwise; with
    only the last dropout it would be 2 GELU(1) half the time."""
    mlp = Mlp(4, 4, drop=0.5)
    with torch.no_grad():
        mlp.fc1.weight.zero_()
        mlp.fc1.bias.fill_(1.0)
        mlp.fc2.weight.copy_(torch.eye(4))
        mlp.fc2.bias.zero_()
    gelu1 = (1 + math.erf(1 / math.sqrt(2))) / 2
    x = torch.randn(2000, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(mlp.eval()(x), torch.full((2000, 4), gelu1))
    torch.manual_seed(0)
    out = mlp.train()(x) / gelu1
    levels = torch.tensor([0.0, 2.0, 4.0])
    nearest = (out[..., None] - levels).abs().argmin(-1)
    torch.testing.assert_close(out, levels[nearest], rtol=0, atol=1e-5)
    share = torch.bincount(nearest.flatten(), minlength=3) / nearest.numel()
    torch.testing.assert_close(share, torch.tensor([0.75, 0.0, 0.25]), rtol=0, atol=0.03)


def test_positions_lists_each_rows_flagged_positions_in_ascending_order():
    """Bug: positions() sorting the flags without stable=True: from 32 tokens on, torch's CPU sort scrambles the
    tied True entries, so condition(..., predict=) no longer returns z in z[predict]'s (ascending) order (the
    16-token tests cannot see it: a sort that short stays stable). Oracle: numpy's flatnonzero of each row
    (64 tokens, 23 flagged per row)."""
    gen = torch.Generator().manual_seed(4)
    flags = torch.stack([torch.randperm(64, generator=gen) < 23 for _ in range(3)])
    want = np.stack([np.flatnonzero(row) for row in flags.numpy()])
    assert np.array_equal(positions(flags).numpy(), want)


def normal_std_fits(t, std):
    """chi-square check that t's entries are normal(0, std): sum(t^2) / std^2 ~ chi2(numel), two-sided 1e-4."""
    n = t.numel()
    p = stats.chi2.cdf(float((t.double() ** 2).sum()) / std ** 2, n)
    return 1e-4 < p < 1 - 1e-4


def test_outer_tables_start_normal_002_and_the_head_keeps_its_own_init():
    """Bugs: a table left out of the normal(0.02) init (the mask token left at zero), the init's std mistyped,
    or the head built before the outer init (its 0.02-scaled output weights reset to Xavier). Oracles: the
    spec's init (class table, fake class, mask token and the three position tables normal std 0.02; the inner
    head's output weight std 0.02 x 0.02), by chi-square on the entries."""
    torch.manual_seed(0)
    m = tiny_mar()
    for name in ("class_emb.weight", "fake_latent", "mask_token", "encoder_pos_embed_learned",
                 "decoder_pos_embed_learned", "diffusion_pos_embed_learned"):
        assert normal_std_fits(m.get_parameter(name).detach(), 0.02), name
    assert normal_std_fits(m.arhead.head.weight.detach(), 0.02 * 0.02)

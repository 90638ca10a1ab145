"""The causal random-order family (models/families/causal.py): network, training loss, KV-cached sampler.

The oracle for z is `Reference` below: the network written again from the module docstring's description in float64,
one token at a time, with its own RoPE (complex numbers) and its own causal bookkeeping; it only
borrows the model's Linear/LayerNorm/MLP weights.
"""
import contextlib
import copy
import math

import numpy as np
import pytest
import torch
from scipy import stats

from models import create_model
from models.families import causal
from models.families.common import CapturedBuffers, EagerSteps, Step, step_schedule
from models.rope import grid_angles, rotate, rotation
from tests.conftest import host_sync_calls, randomize_

SIDE = 6           # 12x12 grey images in 2x2 patches: a 6x6 grid of 4-feature tokens
L, D = SIDE * SIDE, 4
TINY = dict(tokenizer="pixel", img_size=12, vae_stride=1, vae_embed_dim=1, img_channels=1, patch_size=2,
            class_num=10, width=32, num_heads=2, depth=4, attn_dropout=0.0, proj_dropout=0.0,
            diffloss_w=32, diffloss_d=1, inner_ar_width=16, inner_ar_heads=2, diffusion_batch_mul=2,
            num_sampling_steps=5)
ARINAR_B_OUTER = 200_526_336  # ARINAR-B without its `arhead.` (the MAR family's mar_base)


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


def tiny(head="gmm", seed=0, **flags):
    torch.manual_seed(seed)
    return randomize_(create_model("causal_tiny", head=head, **{**TINY, **flags}), std=0.2, seed=seed).eval()


def random_tokens(b, seed=1):
    return torch.randn(b, L, D, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- the oracle
def ref_turn(v, row, col, base):
    """v [..., d] turned by 2-D RoPE at (row, col): pair j of the first half by row * base^(-4j/d),
    pair j of the second half by col * base^(-4j/d), as complex products."""
    d = v.shape[-1]
    freqs = base ** (-4.0 * torch.arange(d // 4, dtype=torch.float64) / d)
    angles = torch.cat([row * freqs, col * freqs])
    pairs = torch.view_as_complex(v.reshape(*v.shape[:-1], d // 2, 2).contiguous())
    return torch.view_as_real(pairs * torch.exp(1j * angles)).flatten(-2)


class Reference:
    """z by hand in float64 from a copy of the model's weights."""

    def __init__(self, model):
        self.m = copy.deepcopy(model).double().eval()
        self.heads = model.num_heads
        self.base = model.config.family_config.rope_base

    def attend(self, q, keys, values):
        """One query [H, d] over keys/values [n, H, d]: [H * d]."""
        w = torch.softmax(torch.einsum("hd,nhd->hn", q, keys) / math.sqrt(q.shape[-1]), dim=-1)
        return torch.einsum("hn,nhd->hd", w, values).flatten()

    @torch.no_grad()
    def z(self, tokens, class_id, sequence, queries):
        """tokens [L, D]; the class row class_id, then tokens at grid positions `sequence` (in that
        order) through the self half, token i seeing tokens 0..i; then for (target, seen) in queries
        the query of grid position `target` seeing the class token and the first `seen` tokens."""
        m, h = self.m, self.heads
        sequence = [int(p) for p in sequence]
        where = [None] + [divmod(p, SIDE) for p in sequence]

        def turn(v, i):
            return v if where[i] is None else ref_turn(v, *where[i], self.base)

        x = torch.stack([m.class_emb.weight[class_id]] + [m.z_proj(tokens[p].double()) for p in sequence])
        x = m.input_norm(x)
        n = len(x)
        for blk in m.self_blocks:
            q, k, v = blk.qkv(blk.norm1(x)).view(n, 3, h, -1).unbind(1)
            q = torch.stack([turn(q[i], i) for i in range(n)])
            k = torch.stack([turn(k[i], i) for i in range(n)])
            x = x + blk.proj(torch.stack([self.attend(q[i], k[:i + 1], v[:i + 1]) for i in range(n)]))
            x = x + blk.mlp(blk.norm2(x))
        k, v = m.kv(m.kv_norm(x)).view(n, 2, h, -1).unbind(1)
        k = torch.stack([turn(k[i], i) for i in range(n)])
        out = []
        for target, seen in queries:
            y = m.query_token[0, 0] + m.query_pos_embed[0, int(target)]
            for blk in m.cross_blocks:
                q = ref_turn(blk.q(blk.norm1(y)).view(h, -1), *divmod(int(target), SIDE), self.base)
                y = y + blk.proj(self.attend(q, k[:seen + 1], v[:seen + 1]))
                y = y + blk.mlp(blk.norm2(y))
            out.append(m.out_norm(y))
        return torch.stack(out)


# ----------------------------------------------------------------------------- backends for the tests
class Recorder(EagerSteps):
    """The eager backend, keeping every Step call (non-inplace tensor args cloned) and head call."""

    def __init__(self):
        self.calls = []

    def run(self, step, *args):
        out = step(*args)
        kept = [a if i in step.inplace or not torch.is_tensor(a) else a.clone() for i, a in enumerate(args)]
        self.calls.append((step.name, kept, None if out is None else out.clone()))
        return out

    def sample_head(self, head, z, temperature, cfg):
        out = super().sample_head(head, z, temperature, cfg)
        self.calls.append(("head", [z.clone(), temperature, cfg], out.clone()))
        return out


def queries_of(calls):
    """Walk a Recorder's calls: [(sequence [rows, n] grid positions in the cache before this query,
    targets [rows, k], visible counts [rows, k], z [rows, k, W])], one per query; a group (class
    token appended) starts a new sequence."""
    out, sequence = [], None
    for name, args, result in calls:
        if name == "causal.append":
            positions = args[2]
            if bool((positions == -1).all()):
                sequence = positions[:, :0]
            else:
                sequence = torch.cat([sequence, positions], dim=1)
        elif name == "causal.query":
            out.append((sequence, args[1], args[2], result))
    return out


@contextlib.contextmanager
def refusing_host_sync():
    """The tensor reads that synchronise with the host raise inside the block."""
    def refuse(*args, **kwargs):
        raise AssertionError("host sync inside a Step")

    with pytest.MonkeyPatch.context() as mp:
        for name in ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero", "cpu", "numpy"):
            mp.setattr(torch.Tensor, name, refuse)
        yield


class CapturingSteps(CapturedBuffers, EagerSteps):
    """What the CUDA-graph backend does to a Step, on the CPU: the first call per (name, argument
    shapes/values, inplace buffers) fixes static clones of the non-inplace tensor arguments; every
    call copies the arguments into them and runs the step on the statics, refusing host syncs, and
    gets a clone of the output, whose shape must not change for the key."""

    def __init__(self):
        self.static, self.shapes = {}, {}

    def run(self, step, *args):
        signature = tuple((tuple(a.shape), a.dtype) if torch.is_tensor(a) else a for a in args)
        key = (step.name, signature, tuple(args[i].data_ptr() for i in step.inplace))
        if key not in self.static:
            self.static[key] = [a if i in step.inplace or not torch.is_tensor(a) else a.clone()
                                for i, a in enumerate(args)]
        static = self.static[key]
        for i, (buffer, a) in enumerate(zip(static, args)):
            if i not in step.inplace and torch.is_tensor(a):
                buffer.copy_(a)
        with refusing_host_sync():
            out = step(*static)
        assert self.shapes.setdefault(key, out.shape) == out.shape, f"{step.name}: output shape changed"
        return out.clone()


# ----------------------------------------------------------------------------- RoPE
def test_rope_turns_pairs_by_row_then_column():
    angles = grid_angles(SIDE, SIDE, 16, 100.0)
    assert angles.shape == (1 + L, 8) and angles.dtype == torch.float64
    v = torch.randn(L, 16, dtype=torch.float64)
    got = rotate(v, rotation(angles[1:], torch.float64))
    want = torch.stack([ref_turn(v[p], *divmod(p, SIDE), 100.0) for p in range(L)])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    # the class row turns nothing; a float32 input stays float32
    assert torch.equal(rotate(v[:1], rotation(angles[:1], torch.float64)), v[:1])
    assert rotate(v.float(), rotation(angles[1:], torch.float32)).dtype == torch.float32


def test_rope_turns_bf16_queries_in_float32_and_rounds_once():
    """Bug: rotate computing in x's dtype (bf16 under autocast): cos, sin and both products each rounded to
    bf16 move a turned feature by several bf16 steps (and by far more where the two products cancel).
    The oracle: the complex-number turn of the same bf16 inputs in float64, rounded once to bf16."""
    angles = grid_angles(SIDE, SIDE, 16, 100.0)
    x = (3 * torch.randn(L, 16, generator=torch.Generator().manual_seed(0))).bfloat16()
    want = torch.stack([ref_turn(x[p].double(), *divmod(p, SIDE), 100.0) for p in range(L)])
    got = rotate(x, rotation(angles[1:], torch.float32))  # the model forms its rotation in float32
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), want, rtol=2 ** -8, atol=1e-5)  # half a bf16 step


def test_rope_scores_depend_on_the_offset_only():
    angles = grid_angles(SIDE, SIDE, 16)
    q, k = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)

    def score(a, b):  # grid positions of the query and the key
        return float(rotate(q, rotation(angles[1 + a], q.dtype)) @ rotate(k, rotation(angles[1 + b], k.dtype)))

    assert score(0, 7) == pytest.approx(score(14, 21), abs=1e-12)       # offset (1, 1) at two places
    assert abs(score(0, 7) - score(0, 1)) > 1e-3                        # another offset, another score
    assert abs(score(0, 6) - score(0, 1)) > 1e-3                        # row and column turn differently


def test_rope_angles_of_a_non_square_grid_and_the_default_base_on_literal_numbers():
    """The angle table written out: row 0 the class token, then row-major (row, col) positions, each half's
    pairs at frequencies base^(-4j / head_dim). Bugs: rows or columns counted over the other side (the
    square grids above cannot tell), a default base other than 10000."""
    angles = grid_angles(2, 3, 8, 100.0)  # quarter 2: frequencies 1 and 100^(-1/2) = 0.1
    want = [[0, 0, 0, 0]] + [[r, r / 10, c, c / 10] for r in range(2) for c in range(3)]
    torch.testing.assert_close(angles, torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-15)
    # base 10000 by default: frequencies 1 and 10000^(-1/2) = 0.01
    torch.testing.assert_close(grid_angles(1, 2, 8)[2], torch.tensor([0, 0, 1, 0.01], dtype=torch.float64),
                               rtol=0, atol=1e-15)


# ----------------------------------------------------------------------------- the network
def test_teacher_forced_z_matches_the_reference():
    model = tiny()
    tokens, orders = random_tokens(2), torch.stack([torch.randperm(L), torch.randperm(L)])
    class_ids = torch.tensor([3, 10])  # a class and the null class
    z = model.condition(tokens, orders, class_ids)
    ref = Reference(model)
    for b in range(2):
        want = ref.z(tokens[b], int(class_ids[b]), orders[b, :-1], [(orders[b, i], i) for i in range(L)])
        torch.testing.assert_close(z[b].double(), want, rtol=1e-4, atol=1e-4)


def test_no_query_sees_its_own_or_later_tokens_and_each_sees_the_earlier():
    model = tiny()
    tokens, orders = random_tokens(1), torch.randperm(L)[None]
    class_ids = torch.tensor([1])
    z = model.condition(tokens, orders, class_ids)
    for place in (0, 5, L - 2, L - 1):
        changed = tokens.clone()
        changed[0, orders[0, place]] += 3.0
        moved = (model.condition(changed, orders, class_ids) - z).abs().amax(-1)[0]
        assert moved[:place + 1].max() < 1e-6, f"a query at or before place {place} saw the token there"
        assert place == L - 1 or moved[place + 1:].min() > 1e-4, f"a query after place {place} missed its token"


def test_queried_subset_matches_the_full_pass():
    model = tiny()
    tokens, orders = random_tokens(2), torch.stack([torch.randperm(L), torch.randperm(L)])
    class_ids = torch.tensor([2, 7])
    full = model.condition(tokens, orders, class_ids)
    query_at = torch.tensor([[0, 9, 35, 17], [34, 1, 12, 20]])
    part = model.condition(tokens, orders, class_ids, query_at)
    torch.testing.assert_close(part, full.gather(1, query_at[..., None].expand(-1, -1, full.shape[-1])),
                               rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- training
def test_loss_pairs_each_target_with_its_own_query():
    model = tiny(label_drop_prob=0.0).train()
    latents = torch.randn(2, 1, 12, 12)
    labels = torch.tensor([4, 9])
    orders = torch.stack([torch.randperm(L), torch.randperm(L)])
    loss = model(latents, labels, orders=orders)
    tokens, ref = model.patchify(latents), Reference(model)
    head = ref.m.gmmhead
    with torch.no_grad():
        want = torch.cat([head.loss(tokens[b, orders[b]].double(),
                                    ref.z(tokens[b], int(labels[b]), orders[b, :-1],
                                          [(orders[b, i], i) for i in range(L)]))
                          for b in range(2)]).mean()
    assert float(loss.detach()) == pytest.approx(float(want), rel=1e-5)


def test_subsampled_loss_pairs_each_query_with_the_token_at_its_grid_position():
    """target_subsample 0.25: the forward draws round(0.25 * 36) = 9 places of each order (argsort of
    torch.rand(b, L), first 9); the query at place i predicts the token at grid position orders[b, i]."""
    model = tiny("gmm", target_subsample=0.25, label_drop_prob=0.0).train()
    gen = torch.Generator().manual_seed(13)
    latents, labels = torch.randn(3, 1, 12, 12, generator=gen), torch.tensor([1, 5, 8])
    orders = torch.stack([torch.randperm(L, generator=gen) for _ in range(3)])
    torch.manual_seed(21)
    with torch.no_grad():
        loss = model(latents, labels, orders=orders)
    torch.manual_seed(21)
    places = torch.argsort(torch.rand(3, L), dim=1)[:, :9]  # the forward's draw, by hand
    rows = torch.arange(3)[:, None]
    tokens = model.patchify(latents)
    with torch.no_grad():
        z = model.condition(tokens, orders, labels)[rows, places]  # the full teacher-forced z at those places
        want = model.gmmhead.loss(tokens[rows, orders[rows, places]].flatten(0, 1), z.flatten(0, 1)).mean()
    assert float(loss) == pytest.approx(float(want), rel=1e-5)


def test_diffloss_repeats_pair_each_target_with_its_own_z():
    """MAR's diffusion head, train_repeats 4: the rows are the targets tiled block-wise four times, each
    block with the same z's; the head's t (randint over 1000 steps) then noise are drawn in that order."""
    model = tiny("diffloss", diffusion_batch_mul=4, label_drop_prob=0.0).train()
    assert model.head.train_repeats == 4
    gen = torch.Generator().manual_seed(14)
    latents, labels = torch.randn(2, 1, 12, 12, generator=gen), torch.tensor([2, 6])
    orders = torch.stack([torch.randperm(L, generator=gen) for _ in range(2)])
    torch.manual_seed(22)
    with torch.no_grad():
        loss = model(latents, labels, orders=orders)
    tokens = model.patchify(latents)
    with torch.no_grad():
        z = model.condition(tokens, orders, labels).flatten(0, 1)  # [2 * L, W], place by place
        target = tokens[torch.arange(2)[:, None], orders].flatten(0, 1)
        rows = 4 * 2 * L
        torch.manual_seed(22)
        t, noise = torch.randint(0, 1000, (rows,)), torch.randn(rows, D)
        want = model.diffloss.loss(torch.cat([target] * 4), torch.cat([z] * 4), t=t, noise=noise).mean()
    # the same float32 ops: equal to rounding (mispaired repeats move this mean by about 2e-4 of it)
    assert float(loss) == pytest.approx(float(want), rel=1e-6)


def test_every_image_gets_its_own_random_order():
    model = tiny().train()
    orders = model.random_orders(4000, torch.device("cpu"))
    assert torch.equal(orders.sort(1).values, torch.arange(L).expand(4000, -1))
    assert len({tuple(o) for o in orders.tolist()}) == 4000
    # first place and the place of grid position 0 are uniform over the L positions
    for values in (orders[:, 0], orders.argsort(1)[:, 0]):
        counts = torch.bincount(values, minlength=L).numpy()
        assert stats.chisquare(counts).pvalue > 1e-3 / 2

    # forward draws a new order per image and uses it
    seen = []
    draw = model.random_orders
    model.random_orders = lambda b, device: seen.append(draw(b, device)) or seen[-1]
    latents, labels = torch.randn(3, 1, 12, 12), torch.tensor([1, 2, 3])
    model.label_drop_prob = 0.0
    with torch.no_grad():
        first, second = model(latents, labels), model(latents, labels)
    assert len({tuple(o) for o in torch.cat(seen).tolist()}) == 6
    del model.random_orders
    with torch.no_grad():
        assert float(model(latents, labels, orders=seen[0])) == pytest.approx(float(first), rel=1e-6)
        assert float(model(latents, labels, orders=seen[1])) == pytest.approx(float(second), rel=1e-6)


def test_label_drop_uses_the_null_class():
    model = tiny().train()
    latents, labels, orders = torch.randn(3, 1, 12, 12), torch.tensor([1, 2, 3]), torch.randperm(L).expand(3, -1)
    with torch.no_grad():
        model.label_drop_prob = 1.0
        dropped = model(latents, labels, orders=orders)
        assert float(dropped) == pytest.approx(float(model(latents, None, orders=orders)), rel=1e-6)
        model.label_drop_prob = 0.0
        assert abs(float(model(latents, labels, orders=orders)) - float(dropped)) > 1e-4


@pytest.mark.parametrize("head,subsample", [("arinar", 1.0), ("diffloss", 1.0), ("gmm", 1.0), ("gmm", 0.25)])
def test_training_reaches_every_parameter(head, subsample):
    model = tiny(head, target_subsample=subsample, label_drop_prob=0.5).train()
    rows = []
    loss_fn = model.head.loss
    model.head.loss = lambda target, z: rows.append(target.shape[0]) or loss_fn(target, z)
    loss = model(torch.randn(4, 1, 12, 12), torch.tensor([0, 1, 2, 3]))
    assert torch.isfinite(loss)
    assert rows == [4 * round(subsample * L) * model.head.train_repeats]
    loss.backward()
    silent = [n for n, p in model.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert not silent, f"no gradient reaches {silent}"


def test_grad_checkpointing_gives_the_same_gradients():
    model = tiny(label_drop_prob=0.0).train()
    latents, labels, orders = torch.randn(2, 1, 12, 12), torch.tensor([5, 6]), torch.randperm(L).expand(2, -1)
    model(latents, labels, orders=orders).backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.grad_checkpointing = True
    model(latents, labels, orders=orders).backward()
    for a, p in zip(plain, model.parameters()):
        torch.testing.assert_close(p.grad, a, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- sampling
def test_one_token_steps_give_the_teacher_forced_z():
    """num_iter = L: the cache holds what the teacher-forced pass sees, query by query (with CFG)."""
    model = tiny()
    rec, labels = Recorder(), torch.tensor([3, 8])
    torch.manual_seed(5)
    tokens = model.patchify(model.sample_tokens(2, num_iter=L, cfg=2.0, labels=labels, backend=rec))
    log = queries_of(rec.calls)
    assert len(log) == L
    orders = torch.cat([targets for _, targets, _, _ in log], dim=1)  # [2b, L]
    assert torch.equal(orders[:2], orders[2:]), "the guided halves must share the order"
    teacher = model.condition(torch.cat([tokens, tokens]), orders, torch.tensor([3, 8, 10, 10]))
    for place, (sequence, targets, visible, z) in enumerate(log):
        assert torch.equal(sequence, orders[:, :place]) and bool((visible == place + 1).all())
        torch.testing.assert_close(z[:, 0], teacher[:, place], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("schedule", ["cosine", "arccos"])
def test_cached_z_matches_the_reference(schedule):
    model = tiny(step_schedule=schedule)
    rec = Recorder()
    torch.manual_seed(6)
    tokens = model.patchify(model.sample_tokens(2, num_iter=5, cfg=3.0, labels=torch.tensor([0, 9]), backend=rec))
    log = queries_of(rec.calls)
    counts = [targets.shape[1] for _, targets, _, _ in log]
    plan = step_schedule(L, 5, kind=schedule)
    assert counts == [a - b for a, b in zip([L] + [m for m, _ in plan[:-1]], [m for m, _ in plan[:-1]] + [0])]
    ref = Reference(model)
    for sequence, targets, visible, z in log:
        for row, class_id in enumerate([0, 9, 10, 10]):
            seen = sequence.shape[1]
            assert bool((visible[row] == seen + 1).all())
            want = ref.z(tokens[row % 2], class_id, sequence[row], [(t, seen) for t in targets[row]])
            torch.testing.assert_close(z[row].double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("head", ["arinar", "diffloss", "gmm"])
def test_cfg_scale_ramps_and_temperature_reaches_the_head(head):
    model = tiny(head)
    rec = Recorder()
    model.sample_tokens(2, num_iter=4, cfg=4.0, labels=torch.tensor([1, 2]), temperature=0.7, backend=rec)
    heads = [args for name, args, _ in rec.calls if name == "head"]
    known = np.cumsum([t.shape[1] for _, t, _, _ in queries_of(rec.calls)])
    # MAR's ramp 1 + (cfg - 1) * known / L, known = tokens seen once the step is done (the last step: L - 1)
    want = [1 + 3.0 * min(k, L - 1) / L for k in known]
    assert [cfg for _, _, cfg in heads] == pytest.approx(want)
    assert all(temperature == 0.7 for _, temperature, _ in heads)


def head_calls(rec):
    """(z rows, cfg) of each head call a Recorder kept."""
    return [(args[0].shape[0], args[2]) for name, args, _ in rec.calls if name == "head"]


def test_cfg_schedule_reaches_every_head_call():
    """36 tokens in 4 cosine steps leave floor(36 cos(pi s / 8)) = 33, 25, 13, then 1 (clamped) tokens:
    3, 8, 12 and 13 drawn; the linear ramp counts 3, 11, 23 and 35 known; constant is cfg throughout."""
    model = tiny()
    want = {"constant": [4.0] * 4,
            "linear": [1 + 3 * 3 / 36, 1 + 3 * 11 / 36, 1 + 3 * 23 / 36, 1 + 3 * 35 / 36]}
    for schedule, scales in want.items():
        rec = Recorder()
        model.sample_tokens(2, num_iter=4, cfg=4.0, cfg_schedule=schedule, labels=torch.tensor([1, 2]), backend=rec)
        calls = head_calls(rec)
        assert [rows for rows, _ in calls] == [2 * 2 * n for n in (3, 8, 12, 13)]  # [cond; uncond] rows
        assert [cfg for _, cfg in calls] == pytest.approx(scales), schedule


def test_editing_ramp_counts_the_kept_tokens_as_known():
    """A partial canvas: the schedule spans the open tokens, the ramp 1 + 3 * known / 36 counts the kept
    ones too. 16 kept (20 open): floor(20 cos(pi s / 8)) leaves 18, 14, 7, 1 -> 2, 4, 7, 7 drawn, known
    18, 22, 29, 35. 30 kept (6 open): leaves 5, 4, 2, 1 -> 1, 1, 2, 2 drawn, known 31, 32, 34, 35."""
    model = tiny()
    gen = torch.Generator().manual_seed(8)
    known = torch.randn(2, 1, 12, 12, generator=gen)
    cases = {16: ((2, 4, 7, 7), [1 + 3 * 18 / 36, 1 + 3 * 22 / 36, 1 + 3 * 29 / 36, 1 + 3 * 35 / 36]),
             30: ((1, 1, 2, 2), [1 + 3 * 31 / 36, 1 + 3 * 32 / 36, 1 + 3 * 34 / 36, 1 + 3 * 35 / 36])}
    for kept, (counts, scales) in cases.items():
        keep = torch.stack([torch.randperm(L, generator=gen) < kept for _ in range(2)])
        rec = Recorder()
        model.sample_tokens(2, num_iter=4, cfg=4.0, labels=torch.tensor([1, 2]), known=known, keep=keep, backend=rec)
        calls = head_calls(rec)
        assert [rows for rows, _ in calls] == [2 * 2 * n for n in counts]
        assert [cfg for _, cfg in calls] == pytest.approx(scales), kept


def test_sampling_never_drops_labels():
    """label_drop_prob is for training: a sampler given labels appends their class rows (then the null
    class's for the unguided half) whatever the model's drop rate, and draws the same samples."""
    model = tiny()
    samples = []
    for drop in (1.0, 0.0):
        model.label_drop_prob = drop
        rec = Recorder()
        torch.manual_seed(12)
        samples.append(model.sample_tokens(2, num_iter=3, cfg=2.0, labels=torch.tensor([3, 7]), backend=rec))
        name, args, _ = rec.calls[0]
        assert name == "causal.append" and bool((args[2] == -1).all())
        assert torch.equal(args[1], model.class_emb.weight.detach()[[3, 7, 10, 10]][:, None])
    assert torch.equal(samples[0], samples[1])


def pit(values, mu, logvar, logits, temperature):
    """Each feature's value through its marginal CDF under the whole-token mixture: [n, C] in (0, 1)."""
    w = torch.softmax(logits, -1)[:, :, None].numpy()
    std = (torch.exp(0.5 * logvar) / temperature).numpy()
    return (w * stats.norm.cdf((values[:, None, :].numpy() - mu.numpy()) / std)).sum(1)


def sharpen_(gmm_head):
    """Spread the mixture means 10x and narrow the components (std ~0.2), so the laws of different
    queries differ clearly: a token drawn from another query's law fails the test."""
    kc = gmm_head.num_gaussians * gmm_head.token_dim
    with torch.no_grad():
        gmm_head.final_layer.linear.weight[:kc] *= 10
        gmm_head.final_layer.linear.bias[kc:2 * kc] = -3.0


def test_tokens_drawn_in_a_step_follow_the_law_the_network_gives_them():
    """Every drawn token, through the CDF of its query's mixture, is uniform (each feature, each step)."""
    model = tiny("gmm", seed=3)
    sharpen_(model.gmmhead)
    rec, n = Recorder(), 160
    torch.manual_seed(7)
    tokens = model.patchify(model.sample_tokens(n, num_iter=3, labels=torch.arange(n) % 10, temperature=0.8,
                                                backend=rec))
    log = queries_of(rec.calls)
    assert [t.shape[1] for _, t, _, _ in log] == [5, 13, 18]
    with torch.no_grad():
        for step, (_, targets, _, z) in enumerate(log):
            drawn = tokens.gather(1, targets[..., None].expand(-1, -1, D)).flatten(0, 1)
            u = pit(drawn.double(), *(t.double() for t in model.gmmhead.mixture(z.flatten(0, 1))), 0.8)
            for feature in range(D):
                assert stats.kstest(u[:, feature], "uniform").pvalue > 1e-3 / (3 * D), (step, feature)


def test_first_targets_are_uniform_over_the_grid():
    model = tiny()
    rec = Recorder()
    model.sample_tokens(720, num_iter=1, backend=rec)
    (_, targets, _, _), = queries_of(rec.calls)
    assert torch.equal(targets.sort(1).values, torch.arange(L).expand(720, -1))
    assert stats.chisquare(torch.bincount(targets[:, 0], minlength=L).numpy()).pvalue > 1e-3


def test_editing_prefills_the_kept_tokens_and_keeps_them_bit_for_bit():
    model = tiny()
    gen = torch.Generator().manual_seed(4)
    known = torch.randn(5, 1, 12, 12, generator=gen)
    # a different number of kept tokens in each row: 0, 7, 20, 35 and all 36
    keep = torch.stack([torch.randperm(L, generator=gen) < k for k in (0, 7, 20, 35, 36)])
    rec = Recorder()
    out = model.sample_tokens(5, num_iter=4, cfg=2.0, labels=torch.tensor([1, 2, 3, 4, 5]), known=known, keep=keep,
                              backend=rec)
    given, tokens = model.patchify(known), model.patchify(out)
    assert torch.equal(tokens[keep], given[keep])
    assert torch.equal(out[4], known[4])
    ref, asked = Reference(model), {}
    for sequence, targets, visible, z in queries_of(rec.calls):
        # the group's row: the one whose kept tokens open its cache (rows 0..3 keep 0, 7, 20, 35)
        row = max(r for r in range(4) if set(sequence[0, :int(keep[r].sum())].tolist()) == set(
            keep[r].nonzero().flatten().tolist()))
        assert not bool(keep[row, targets[0]].any()), "a kept token was queried"
        asked.setdefault(row, []).append(targets[0])
        seen = sequence.shape[1]
        for half, class_id in ((0, row + 1), (1, 10)):
            want = ref.z(tokens[row], class_id, sequence[half], [(t, seen) for t in targets[half]])
            torch.testing.assert_close(z[half].double(), want, rtol=1e-4, atol=1e-4)
    for row in range(4):
        got = torch.cat(asked[row]).sort().values
        assert torch.equal(got, (~keep[row]).nonzero().flatten()), f"row {row}: each open token once"


# ----------------------------------------------------------------------------- the Step contract
def sample_with(backend, model, seed=11, **kwargs):
    torch.manual_seed(seed)
    return model.sample_tokens(3, num_iter=5, backend=backend, **kwargs)


@pytest.mark.parametrize("head", ["gmm", "arinar"])
def test_a_capturing_backend_gives_the_eager_samples(head):
    model = tiny(head)
    gen = torch.Generator().manual_seed(2)
    edit = dict(known=torch.randn(3, 1, 12, 12, generator=gen),
                keep=torch.stack([torch.randperm(L, generator=gen) < k for k in (0, 9, 9)]))
    for kwargs in ({}, dict(cfg=2.5, labels=torch.tensor([1, 2, 3]), **edit)):
        assert torch.equal(sample_with(CapturingSteps(), model, **kwargs), sample_with(EagerSteps(), model, **kwargs))


def test_a_backend_keeps_its_cache_and_graphs_across_calls():
    """Batch after batch, a graph backend replays the same graphs: the cache is the same tensor, and
    what the first call left in it does not leak into the second."""
    model, backend = tiny(), CapturingSteps()
    first = sample_with(backend, model, seed=1)
    graphs = len(backend.static)
    again = sample_with(backend, model, seed=2)
    assert len(backend.static) == graphs
    assert torch.equal(again, sample_with(EagerSteps(), model, seed=2)) and not torch.equal(again, first)


def test_the_capturing_backend_catches_an_unmarked_cache(monkeypatch):
    """The check above has teeth: a cache not marked inplace is written into a static clone, and lost."""
    model = tiny()
    monkeypatch.setattr(causal, "Step", lambda name, module, fn, inplace=(), regions=(): Step(name, module, fn))
    assert not torch.equal(sample_with(CapturingSteps(), model), sample_with(EagerSteps(), model))


def test_no_host_sync_in_the_steps(no_host_sync):
    assert not host_sync_calls(causal.append_step, causal.query_step, causal.SelfAttentionBlock,
                               causal.CrossAttentionBlock, causal.CausalAR.ask, causal.CausalAR.shared_kv,
                               causal.CausalAR.rotation, causal.attend, causal.write_slots, causal.write_kv, rotate)
    # a whole unguided sample without a partial canvas, the loop included, runs without one
    tiny().sample_tokens(2, num_iter=4)


def test_a_float64_model_samples_in_float64():
    model = tiny().double()
    rec = Recorder()
    out = model.sample_tokens(2, num_iter=3, labels=torch.tensor([4, 5]), backend=rec)
    assert out.dtype == torch.float64
    caches = {id(args[0]): args[0].dtype for name, args, _ in rec.calls if name.startswith("causal.")}
    assert list(caches.values()) == [torch.float64]
    tokens, ref = model.patchify(out), Reference(model)
    for sequence, targets, _, z in queries_of(rec.calls):
        assert z.dtype == torch.float64
        for row in range(2):
            want = ref.z(tokens[row], row + 4, sequence[row], [(t, sequence.shape[1]) for t in targets[row]])
            torch.testing.assert_close(z[row], want, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------- schedules, sizes, flags
def test_step_schedules_match_arpg():
    """256 tokens in 64 steps (ARPG): arccos draws 3 first and 28 last; cosine about 1 early, 7 late."""
    for kind in ("cosine", "arccos"):
        left = [m for m, _ in step_schedule(256, 64, kind=kind)[:-1]] + [0]
        counts = -np.diff([256] + left)
        assert counts.sum() == 256 and counts.min() >= 1
        if kind == "arccos":
            assert (counts[0], counts[-1]) == (3, 28)
        else:
            assert counts[0] == 1 and 6 <= counts[-1] <= 7 and counts.max() <= 7
    # fewer tokens than steps: one a step, then nothing
    left = [m for m, _ in step_schedule(3, 8, kind="arccos")[:-1]] + [0]
    assert (-np.diff([3] + left)).tolist() == [1, 1, 0, 0, 0, 0, 0, 1]


def outer_parameters(model):
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith(model.head_attr + "."))


def test_preset_sizes():
    with torch.device("meta"):
        sizes = {name: outer_parameters(create_model(name)) for name in ("causal_base", "causal_large", "causal_huge")}
    # measured; MAR's outer at the same widths: ARINAR-B 200,526,336, MAR-L 406,095,872, MAR-H 791,196,160
    assert sizes == {"causal_base": 197_083_392, "causal_large": 395_996_160, "causal_huge": 798_580_480}
    assert abs(sizes["causal_base"] / ARINAR_B_OUTER - 1) <= 0.10
    demo = create_model("causal_tiny", tokenizer="pixel", img_size=8, vae_stride=1, vae_embed_dim=1, img_channels=1,
                        patch_size=2, class_num=10)
    # the digits demo's size class: mar_tiny is 944,908 parameters with the same head
    assert (sum(p.numel() for p in demo.parameters()), outer_parameters(demo)) == (890_252, 765_056)


@pytest.mark.parametrize("flags,flag", [
    (dict(depth=3), "--depth"), (dict(width=30, num_heads=5), "--width"), (dict(width=24, num_heads=4), "--width"),
    (dict(step_schedule="linear"), "--step_schedule"), (dict(target_subsample=0.0), "--target_subsample"),
    (dict(rope_base=1.0), "--rope_base"),
])
def test_bad_flags_name_the_flag(flags, flag):
    with pytest.raises(ValueError, match=flag) as error:
        create_model("causal_tiny", **{**TINY, **flags})
    assert "\n" not in str(error.value)


def test_bad_arguments_are_one_line_errors():
    model = tiny()
    with pytest.raises(ValueError, match="orders"):
        model(torch.randn(2, 1, 12, 12), None, orders=torch.randperm(L)[None])
    with pytest.raises(ValueError, match="labels"):
        model.sample_tokens(2, cfg=2.0)
    with pytest.raises(ValueError, match="keep"):
        model.sample_tokens(2, keep=torch.ones(2, L - 1, dtype=torch.bool), known=torch.randn(2, 1, 12, 12))


# ----------------------------------------------------------------------------- mutation guards (second pass)
def test_attention_dropout_is_off_in_eval_and_on_in_training():
    """Bugs: the self half's teacher-forced attention or the cross half's attention handing --attn_dropout to
    attend() whatever the mode (evaluation and sampling then drop attention weights at random), or never
    (training without the dropout it was configured with). Oracles: in eval, the float64 Reference (which
    has no dropout) for a model built with attn_dropout 0.5; in training, two calls of each half's block on
    the same input must differ."""
    model = tiny(attn_dropout=0.5)
    tokens, orders = random_tokens(1, seed=9), torch.randperm(L, generator=torch.Generator().manual_seed(9))[None]
    with torch.no_grad():
        z = model.condition(tokens, orders, torch.tensor([4]))
        want = Reference(model).z(tokens[0], 4, orders[0, :-1], [(orders[0, i], i) for i in range(L)])
        torch.testing.assert_close(z[0].double(), want, rtol=1e-4, atol=1e-4)
        model.train()
        x = torch.randn(1, L, 32, generator=torch.Generator().manual_seed(5))
        rot = model.rotation(orders)
        k, v = (torch.randn(1, 2, L, 16, generator=torch.Generator().manual_seed(s)) for s in (6, 7))
        for name, run in (("self", lambda: model.self_blocks[0](x, rot)),
                          ("cross", lambda: model.cross_blocks[0](x, rot, k, v, causal=True))):
            torch.manual_seed(0)
            first, second = run(), run()
            assert (first - second).abs().max() > 1e-3, f"no attention dropout in the {name} half while training"


def test_an_eval_forward_never_drops_labels():
    """Bug: the forward's label drop applied in eval mode too (drop_labels=True instead of self.training): an
    evaluation loss at --label_drop_prob 1 would be the unconditional one."""
    model = tiny(label_drop_prob=1.0)
    latents = torch.randn(2, 1, 12, 12, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([2, 7])
    orders = torch.stack([torch.randperm(L, generator=torch.Generator().manual_seed(s)) for s in (1, 2)])
    with torch.no_grad():
        at_one = float(model(latents, labels, orders=orders))
        model.label_drop_prob = 0.0
        at_zero = float(model(latents, labels, orders=orders))
        uncond = float(model(latents, None, orders=orders))
    assert at_one == at_zero
    assert abs(at_one - uncond) > 1e-4 * abs(uncond)


def test_label_drop_is_drawn_per_image():
    """Bug: one draw for the whole batch (torch.rand(()) instead of one per image): every batch then trains
    all-conditional or all-unconditional. Oracle: 20000 labels at --label_drop_prob 0.1 go to the null class
    (row 10) independently, so the share is binomial: within 4 sigma of 0.1."""
    model = tiny(label_drop_prob=0.1).train()
    torch.manual_seed(0)
    ids = model.class_ids(torch.full((20000,), 3), 20000, torch.device("cpu"), drop_labels=True)
    assert set(ids.unique().tolist()) == {3, 10}
    share = float((ids == 10).double().mean())
    assert abs(share - 0.1) < 4 * math.sqrt(0.1 * 0.9 / 20000)


@pytest.mark.parametrize("share,count", [(0.3, 11), (0.32, 12), (0.01, 1)])
def test_target_subsample_rounds_to_the_nearest_count_and_keeps_at_least_one(share, count):
    """Bugs: the per-image target count truncated (int: 10.8 -> 10, 11.52 -> 11) or not clamped to >= 1
    (0.36 -> 0 targets, a NaN loss). By hand for 36 tokens: round(10.8) = 11, round(11.52) = 12,
    max(1, round(0.36)) = 1."""
    model = tiny(target_subsample=share, label_drop_prob=0.0).train()
    rows, loss_fn = [], model.head.loss
    model.head.loss = lambda target, z: rows.append(target.shape[0]) or loss_fn(target, z)
    with torch.no_grad():
        loss = model(torch.randn(3, 1, 12, 12), torch.tensor([0, 1, 2]))
    assert rows == [3 * count * model.head.train_repeats] and torch.isfinite(loss)


def test_class_table_and_queries_start_normal_002_and_the_head_keeps_its_own_init():
    """Bugs: the query position table (or the query token, or the class table) left out of the normal(0.02)
    init, the std mistyped, or the head built before the outer init (its 0.02-scaled output weights reset to
    Xavier). Oracles: MAR's std 0.02 for the learned tables and ARINAR's inner-head output weight std
    0.02 x 0.02, by chi-square on the entries (sum(t^2) / std^2 ~ chi2(numel), two-sided 1e-4)."""
    torch.manual_seed(0)
    model = create_model("causal_tiny", head="arinar", **TINY)

    def fits(t, std):
        p = stats.chi2.cdf(float((t.detach().double() ** 2).sum()) / std ** 2, t.numel())
        return 1e-4 < p < 1 - 1e-4

    for name in ("class_emb.weight", "query_token", "query_pos_embed"):
        assert fits(model.get_parameter(name), 0.02), name
    assert fits(model.arhead.head.weight, 0.02 * 0.02)

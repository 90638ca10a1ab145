"""The scale-wise family (models/families/scalewise.py): scales, residual targets, masks, no leakage,
KV-cached / scan-carried sampling against teacher forcing, every head, a capturing backend, editing.

Models are tiny, on the digits demo's geometry: 8 x 8 grey pixels in 2 x 2 patches = a 4 x 4 grid of
4-feature tokens, scales (1, 2, 3, 4), 30 tokens in scale order.
"""
import math

import numpy as np
import pytest
import torch

from models import create_model
from models.families.common import CapturedBuffers, EagerSteps
from models.families.scalewise import ScalewiseAR
from models.multiscale import accumulate, covered, kept_residual, residuals, scales_for
from models.scalewise_blocks import AdaLNBeforeHead, ScaleAttention, ScaleBlock, SelectiveScanMixer, drop_path
from models.scan import selective_scan_ref
from models.token_grid import patchify, unpatchify
from tests.conftest import host_sync_calls, randomize_

DIGITS = dict(tokenizer="pixel", img_size=8, vae_stride=1, vae_embed_dim=1, img_channels=1, patch_size=2,
              class_num=10)
SCALES = (1, 2, 3, 4)
BOUNDS = [(0, 1), (1, 5), (5, 14), (14, 30)]
MIXERS = ("var", "mvar")


def tiny(mixer="var", head="arinar", dtype=torch.float32, seed=0, **flags):
    torch.manual_seed(seed)
    sizes = dict(width=32, depth=2, num_heads=4, inner_ar_width=32, diffloss_w=32, diffloss_d=1,
                 num_sampling_steps=4, ssm_state=4)
    model = create_model("scalewise_tiny", mixer=mixer, head=head, **{**DIGITS, **sizes, **flags})
    # generic weights: the init's near-zero gates (1e-3) would hide paths from the tests
    return randomize_(model, std=0.2, seed=seed).to(dtype).eval()


def latents(b=3, dtype=torch.float32, seed=1):
    return torch.randn(b, 1, 8, 8, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ----------------------------------------------------------------------------- an independent bicubic
def cubic(x, a=-0.75):
    """Keys' cubic convolution kernel with PyTorch's a = -0.75."""
    x = abs(x)
    if x <= 1:
        return (a + 2) * x ** 3 - (a + 3) * x ** 2 + 1
    return a * x ** 3 - 5 * a * x ** 2 + 8 * a * x - 4 * a if x < 2 else 0.0


def resize_matrix(n_in, n_out):
    """Rows: output samples at (i + 0.5) * n_in / n_out - 0.5, four taps clamped to the border."""
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = (i + 0.5) * n_in / n_out - 0.5
        i0 = math.floor(src)
        for j in range(-1, 3):
            m[i, min(max(i0 + j, 0), n_in - 1)] += cubic(src - (i0 + j))
    return m


def np_resize(x, side):
    """x [..., h, w] -> [..., side, side]."""
    return resize_matrix(x.shape[-2], side) @ x @ resize_matrix(x.shape[-1], side).T


def np_residuals(f, scales):
    n = f.shape[-1]
    f_hat, targets, inputs = np.zeros_like(f), [], []
    for k, p in enumerate(scales[:-1]):
        h = np_resize(f - f_hat, p)
        f_hat = f_hat + np_resize(h, n)
        targets.append(h)
        inputs.append(np_resize(f_hat, scales[k + 1]))
    return targets + [f - f_hat], inputs


# ----------------------------------------------------------------------------- scales and targets
def test_scales_rule():
    assert scales_for(16) == (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)  # VAR's
    assert scales_for(4) == (1, 2, 3, 4)                        # the digits demo's grid
    # by hand from floor(v * n / 16 + 1/2) over VAR's list, floored at 1, duplicates dropped
    assert scales_for(8) == (1, 2, 3, 4, 5, 7, 8)
    assert scales_for(12) == (1, 2, 3, 4, 5, 6, 8, 10, 12)
    assert scales_for(32) == (1, 2, 4, 6, 8, 10, 12, 16, 20, 26, 32)
    assert scales_for(1) == (1,)
    for n in range(1, 65):
        s = scales_for(n)
        assert s[0] == 1 and s[-1] == n and all(a < b for a, b in zip(s, s[1:]))
    with pytest.raises(ValueError, match="grid side"):
        scales_for(0)


def test_the_model_uses_the_grid_rule():
    model = tiny()
    assert model.scales == SCALES and model.bounds == BOUNDS and model.num_tokens == 30


def test_residuals_on_literal_numbers():
    # 2x2 -> 1x1 bicubic: the source point sits between the two taps of each axis (weights 0.59375 and
    # -0.09375 each side, clamped at the border): the mean
    f = torch.tensor([[[[1.0, 2.0], [3.0, 6.0]]]], dtype=torch.float64)
    targets, inputs = residuals(f, (1, 2))
    assert targets[0].flatten().tolist() == [3.0]
    assert inputs[0].flatten().tolist() == [3.0, 3.0, 3.0, 3.0]
    assert targets[1].flatten().tolist() == [-2.0, -1.0, 0.0, 3.0]


def test_residuals_equal_an_independent_bicubic():
    f = np.random.default_rng(0).normal(size=(2, 3, 4, 4))
    targets, inputs = residuals(torch.from_numpy(f), SCALES)
    want_targets, want_inputs = np_residuals(f, SCALES)
    assert [t.shape[-1] for t in targets] == list(SCALES) and [x.shape[-1] for x in inputs] == [2, 3, 4]
    for got, want in zip(targets + inputs, want_targets + want_inputs):
        np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-12)
    # on 16 x 16 too (VAR's schedule, ten scales)
    f = np.random.default_rng(1).normal(size=(1, 2, 16, 16))
    targets, _ = residuals(torch.from_numpy(f), scales_for(16))
    for got, want in zip(targets, np_residuals(f, scales_for(16))[0]):
        np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-11)


def test_covered_cells_on_literal_masks():
    keep = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    keep[..., :2] = True  # the left half of the grid
    assert covered(keep, 1).flatten().tolist() == [False]
    assert covered(keep, 2)[0, 0].tolist() == [[True, False], [True, False]]
    # 4 -> 3 pools columns {0,1}, {1,2}, {2,3}: only the first lies in the kept half
    assert covered(keep, 3)[0, 0].tolist() == [[True, False, False]] * 3


# ----------------------------------------------------------------------------- masks and leakage
@pytest.mark.parametrize("mixer", MIXERS)
def test_attention_masks(mixer):
    level = [k for k, (s, e) in enumerate(BOUNDS) for _ in range(s, e)]
    want = [[(lk <= lq) if mixer == "var" else (lk == lq) for lk in level] for lq in level]
    assert tiny(mixer).attn_mask.tolist() == want


def scale_of(t):
    return next(k for k, (s, e) in enumerate(BOUNDS) if s <= t < e)


@pytest.mark.parametrize("mixer", MIXERS)
def test_no_leakage_and_within_scale_visibility(mixer):
    """Perturbing one input token of scale j leaves every output of the earlier scales bit for bit and
    changes every output of scale j (both mixers see their whole scale) and of the later scales."""
    model = tiny(mixer, dtype=torch.float64)
    gen = torch.Generator().manual_seed(2)
    inputs = torch.randn(2, 29, 4, generator=gen, dtype=torch.float64)
    cond = model.class_vectors(torch.tensor([3, 7]), 2)
    base = model.condition(inputs, cond)
    for t in range(1, 30):  # sequence position t holds inputs[:, t - 1]
        moved = inputs.clone()
        moved[:, t - 1] += 1.0
        z = model.condition(moved, cond)
        j = scale_of(t)
        start, end = BOUNDS[j]
        assert torch.equal(z[:, :start], base[:, :start]), f"position {t} leaks into an earlier scale"
        changed = (z[:, start:] - base[:, start:]).abs().amax(dim=(0, 2))
        assert (changed > 1e-9).all(), f"position {t}: unseen by {(changed <= 1e-9).nonzero().flatten().tolist()}"


def test_training_inputs_are_the_samplers_rebuild_from_the_targets():
    """Teacher forcing feeds what a sampler would have rebuilt from the true residuals: resize(f_hat, p)
    where f_hat sums the upsampled residuals of the earlier scales only (the input never sees f)."""
    f = np.random.default_rng(3).normal(size=(2, 4, 4, 4))
    targets, inputs = residuals(torch.from_numpy(f), SCALES)
    f_hat = np.zeros_like(f)
    for k, h in enumerate(targets[:-1]):
        f_hat = f_hat + np_resize(h.numpy(), 4)
        np.testing.assert_allclose(inputs[k].numpy(), np_resize(f_hat, SCALES[k + 1]), atol=1e-12)
    np.testing.assert_allclose(f_hat + targets[-1].numpy(), f, atol=1e-12)


def test_accumulate_upsamples_a_low_precision_residual_in_f_hats_dtype():
    """Bug: accumulate resizing h in its own dtype: a bf16 residual (a head drawn under autocast) upsampled
    by bicubic in bf16 moves f_hat by ~1e-2; in f_hat's float32 only h's own rounding is left."""
    rng = np.random.default_rng(5)
    f_hat, h = rng.normal(size=(2, 3, 4, 4)), rng.normal(size=(2, 3, 2, 2))
    h_bf16 = torch.from_numpy(h).bfloat16()
    got = accumulate(torch.from_numpy(f_hat).float(), h_bf16)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), f_hat + np_resize(h_bf16.double().numpy(), 4), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- sampling vs teacher forcing
class Recorder(EagerSteps):
    """Eager, recording every step's arguments (cloned before the call) and output, and every head call."""

    def __init__(self):
        self.steps, self.heads = [], []

    def run(self, step, *args):
        before = [a.clone() if torch.is_tensor(a) else a for a in args]
        out = step(*args)
        self.steps.append((step, before, out.clone()))
        return out

    def sample_head(self, head, z, temperature, cfg):
        out = super().sample_head(head, z, temperature, cfg)
        self.heads.append((temperature, cfg, out.clone()))
        return out


@pytest.mark.parametrize("mixer", MIXERS)
@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_cached_sampling_equals_teacher_forcing(mixer, cfg):
    """The z the sampler computes scale by scale (KV cache / carried scan state) equal the one-pass
    network on the same inputs; the inputs are f_hat rebuilt from the drawn residuals (independent
    bicubic), and the sample is the last f_hat."""
    model, rec = tiny(mixer), Recorder()
    torch.manual_seed(5)
    out = model.sample_tokens(2, cfg=cfg, labels=torch.tensor([1, 8]), backend=rec)
    assert [s[1][2] for s in rec.steps] == [0, 1, 2, 3]
    inputs = torch.cat([args[0] for _, args, _ in rec.steps[1:]], dim=1)
    cond = rec.steps[0][1][1]
    z_steps = torch.cat([z for _, _, z in rec.steps], dim=1)
    torch.testing.assert_close(z_steps, model.condition(inputs, cond), rtol=1e-5, atol=1e-5)

    f_hat = np.zeros((2, 4, 4, 4))
    for k, ((_, _, h), p) in enumerate(zip(rec.heads, SCALES)):
        h = h.view(2, p, p, 4).permute(0, 3, 1, 2).double().numpy()
        f_hat = f_hat + np_resize(h, 4)
        if k + 1 < len(SCALES):
            fed = rec.steps[k + 1][1][0][:2]  # the conditional half
            want = np_resize(f_hat, SCALES[k + 1]).reshape(2, 4, -1).transpose(0, 2, 1)
            np.testing.assert_allclose(fed.double().numpy(), want, rtol=1e-5, atol=1e-5)
    got = patchify(out, model.tokens).view(2, 4, 4, 4).permute(0, 3, 1, 2)
    np.testing.assert_allclose(got.double().numpy(), f_hat, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("head", ["arinar", "diffloss", "gmm"])
def test_cfg_ramps_linearly_over_the_scales_and_temperature_reaches_the_head(head):
    model = tiny(head=head)
    for schedule, want in (("linear", [1 + 3.0 * k / 4 for k in (1, 2, 3, 4)]), ("constant", [4.0] * 4)):
        rec = Recorder()
        model.sample_tokens(2, cfg=4.0, cfg_schedule=schedule, labels=torch.tensor([0, 1]), temperature=1.3,
                            backend=rec)
        assert [c for _, c, _ in rec.heads] == pytest.approx(want)
        assert {t for t, _, _ in rec.heads} == {1.3}
    rec = Recorder()
    model.sample_tokens(2, backend=rec)  # unguided: the null class, no CFG
    assert [c for _, c, _ in rec.heads] == [1.0] * 4


def test_num_iter_is_ignored():
    model = tiny()
    samples = []
    for num_iter in (1, 4, 64):
        torch.manual_seed(0)
        samples.append(model.sample_tokens(2, num_iter=num_iter, labels=torch.tensor([0, 1])))
    assert torch.equal(samples[0], samples[1]) and torch.equal(samples[0], samples[2])


def test_float64_model_samples_in_float64():
    model = tiny("mvar", dtype=torch.float64)
    out = model.sample_tokens(2, cfg=2.0, labels=torch.tensor([0, 1]))
    assert out.dtype == torch.float64


# ----------------------------------------------------------------------------- capture-style backends
class Capturing(CapturedBuffers, EagerSteps):
    """What CUDA graphs do to a Step: every argument not marked inplace is copied into a static buffer
    (a clone); inplace buffers must be the very same tensors on every call, across sampling calls too."""

    def __init__(self):
        self.seen = {}

    def run(self, step, *args):
        for i in step.inplace:
            assert self.seen.setdefault((step.name, i), args[i]) is args[i], "inplace buffer reallocated"
        static = [a if i in step.inplace or not torch.is_tensor(a) else a.clone() for i, a in enumerate(args)]
        return step(*static)


@pytest.mark.parametrize("mixer", MIXERS)
def test_a_capturing_backend_samples_what_eager_does(mixer):
    """Batch after batch on one capturing backend: the same state tensors, and each batch what eager gives."""
    model, capturing = tiny(mixer), Capturing()
    for seed in (11, 12):
        samples = []
        for backend in (EagerSteps(), capturing):
            torch.manual_seed(seed)
            samples.append(model.sample_tokens(3, cfg=2.5, labels=torch.tensor([0, 4, 9]), backend=backend))
        assert torch.equal(samples[0], samples[1])


@pytest.mark.parametrize("mixer", MIXERS)
def test_steps_make_no_host_sync(mixer, monkeypatch, request):
    model, rec = tiny(mixer), Recorder()
    model.sample_tokens(2, cfg=2.0, labels=torch.tensor([0, 1]), backend=rec)
    request.getfixturevalue("no_host_sync")  # from here on a host sync raises
    with torch.no_grad():
        outs = [step(*args) for step, args, _ in rec.steps]
    monkeypatch.undo()
    for out, (_, _, want) in zip(outs, rec.steps):
        torch.testing.assert_close(out, want)
    assert host_sync_calls(ScalewiseAR.scale_step, ScalewiseAR.embed_scale, ScaleBlock, ScaleAttention,
                           SelectiveScanMixer, AdaLNBeforeHead, selective_scan_ref) == set()


# ----------------------------------------------------------------------------- training
@pytest.mark.parametrize("mixer", MIXERS)
@pytest.mark.parametrize("head", ["arinar", "diffloss", "gmm"])
def test_training_with_every_head(mixer, head):
    model = tiny(mixer, head, label_drop_prob=0.5).train()
    calls = []
    loss_fn = model.head.loss

    def spy(target, z):
        calls.append((target, z))
        return loss_fn(target, z)

    model.head.loss = spy
    x, labels = latents(4), torch.tensor([0, 3, 5, 9])
    loss = model(x, labels)
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    # every token of every scale, each `train_repeats` times with its own z
    (target, z), = calls
    r, rows = model.head.train_repeats, 4 * 30
    assert target.shape[0] == z.shape[0] == r * rows
    for i in range(1, r):
        assert torch.equal(target[i * rows:(i + 1) * rows], target[:rows])
        assert torch.equal(z[i * rows:(i + 1) * rows], z[:rows])
    grid = patchify(x, model.tokens).view(4, 4, 4, 4).permute(0, 3, 1, 2)
    want = torch.cat([h.flatten(2).transpose(1, 2) for h in residuals(grid, SCALES)[0]], dim=1).flatten(0, 1)
    assert torch.equal(target[:rows], want)


def test_grad_checkpointing_changes_nothing():
    model = tiny("mvar", label_drop_prob=0.0).train()
    grads = []
    for flag in (False, True):
        model.grad_checkpointing = flag
        model.zero_grad()
        torch.manual_seed(0)
        model(latents(2), torch.tensor([1, 2])).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_drop_path_drops_whole_samples():
    """Each sample's branch is dropped (0) or kept and rescaled (x 1/(1-p)); the dropped share ~ Binomial(n, p)
    checked with a 5-sigma band; nothing is dropped in eval mode."""
    n, p = 4000, 0.25
    x = torch.rand(n, 3, 5) + 1
    torch.manual_seed(0)
    out = drop_path(x, p, training=True)
    dropped = (out == 0).all(dim=(1, 2))
    assert torch.equal(out[~dropped], x[~dropped] / (1 - p))
    assert abs(dropped.sum().item() - p * n) < 5 * math.sqrt(n * p * (1 - p))
    assert torch.equal(drop_path(x, p, training=False), x)
    with pytest.raises(ValueError, match=r"--drop_path must be in \[0, 1\)"):
        tiny(drop_path=1.0)


def test_label_drop_rate():
    """Share of null-class rows ~ Binomial(n, p): a two-sided 5-sigma band (one test, no correction)."""
    model = tiny(label_drop_prob=0.3)
    n = 20000
    labels = torch.zeros(n, dtype=torch.long)
    torch.manual_seed(0)
    vec = model.class_vectors(labels, n, drop_labels=True)
    dropped = (vec == model.class_emb.weight[model.null_class]).all(1).sum().item()
    assert abs(dropped - 0.3 * n) < 5 * math.sqrt(n * 0.3 * 0.7)
    assert torch.equal(model.class_vectors(labels[:4], 4), model.class_emb.weight[[0] * 4])  # no drop by default


# ----------------------------------------------------------------------------- editing
@pytest.mark.parametrize("mixer", MIXERS)
def test_editing_keeps_tokens_bit_exact_and_never_reads_the_rest(mixer):
    model = tiny(mixer)
    known = latents(2, seed=4)
    keep = torch.zeros(2, 16, dtype=torch.bool)
    keep[:, :8] = True  # the top half of the token grid
    keep[1, 12] = True
    garbage_tokens = patchify(known, model.tokens)
    garbage_tokens[~keep] = 1e3  # what `known` holds outside `keep` must not matter
    garbage = unpatchify(garbage_tokens, model.tokens)
    outs = []
    for given in (known, garbage):
        torch.manual_seed(3)
        outs.append(model.sample_tokens(2, cfg=2.0, labels=torch.tensor([2, 5]), known=given, keep=keep))
    assert torch.equal(outs[0], outs[1])
    tokens = patchify(outs[0], model.tokens)
    assert torch.equal(tokens[keep], patchify(known, model.tokens)[keep])
    torch.manual_seed(3)
    free = model.sample_tokens(2, cfg=2.0, labels=torch.tensor([2, 5]))
    assert not torch.equal(patchify(free, model.tokens)[~keep], tokens[~keep])  # the edit conditions the rest


@pytest.mark.parametrize("mixer", MIXERS)
def test_editing_teacher_forces_every_scale(mixer):
    """With every token kept, each scale's residual is the ground truth's: the network sees exactly the
    teacher-forced inputs."""
    model, rec = tiny(mixer), Recorder()
    known = latents(2, seed=6)
    model.sample_tokens(2, labels=torch.tensor([2, 5]), known=known, keep=torch.ones(2, 16, dtype=torch.bool),
                        backend=rec)
    grid = patchify(known, model.tokens).view(2, 4, 4, 4).permute(0, 3, 1, 2)
    _, inputs = residuals(grid, SCALES)
    for (_, args, _), want in zip(rec.steps[1:], inputs):
        torch.testing.assert_close(args[0], want.flatten(2).transpose(1, 2), rtol=0, atol=1e-6)


@pytest.mark.parametrize("keep_side", ["left", "hole"])
def test_partial_editing_feeds_the_kept_region_as_teacher_forcing(keep_side):
    """A partial edit on a 16 x 16 grid: the coarse scales are drawn freely (no 1 x 1 cell lies in the kept
    region), yet from the first forced scale on the network must see the kept region as teacher forcing
    gives it, so the last scale's input over kept positions matches the ground truth's. Forcing the ground
    truth's own residuals instead (measured against coarse scales the sampler did not draw) leaves the
    free scales' offset in place: an error of the signal's size."""
    model, rec = tiny("var", img_size=32), Recorder()  # 2x2 patches of 32 x 32: a 16 x 16 grid of 4 features
    side = 16
    gen = torch.Generator().manual_seed(8)
    smooth = torch.nn.functional.interpolate(torch.randn(2, 1, 4, 4, generator=gen), size=(32, 32), mode="bicubic")
    known = smooth + 0.2 * torch.randn(2, 1, 32, 32, generator=gen)
    keep = torch.zeros(2, side, side, dtype=torch.bool)
    if keep_side == "left":
        keep[..., :side // 2] = True
    else:
        keep[:] = True
        keep[:, 5:11, 5:11] = False
    model.sample_tokens(2, cfg=2.0, labels=torch.tensor([2, 5]), known=known, keep=keep.flatten(1), backend=rec)
    grid = patchify(known, model.tokens).transpose(1, 2).reshape(2, 4, side, side)
    scales = model.scales
    assert scales == (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    _, inputs = residuals(grid.double(), scales)
    last_input = rec.steps[-1][1][0][:2].transpose(1, 2).reshape(2, 4, side, side)  # the cond half
    # kept positions at least 3 away from any open one (the free cells' upsampled draws reach into the kept
    # region near its edge; these random weights draw residuals several times the signal's size)
    interior = ~torch.nn.functional.max_pool2d((~keep).float()[:, None], 7, stride=1, padding=3).bool()
    error = (last_input - inputs[-1].float()).abs().permute(1, 0, 2, 3)[:, interior[:, 0]]
    scale = grid.permute(1, 0, 2, 3)[:, interior[:, 0]].abs().mean()
    # measured: 0.11 (left) and 0.07 (hole) of the signal's size; the ground truth's own residuals, 1.8 and 5.4
    assert error.mean() < 0.25 * scale, (error.mean(), scale)


# ----------------------------------------------------------------------------- config and sizes
def test_bad_settings_are_one_line_errors():
    with pytest.raises(ValueError, match="--mixer"):
        tiny("transformer")
    with pytest.raises(ValueError, match="--width 30 must be a multiple of --num_heads 4"):
        tiny(width=30)
    with pytest.raises(ValueError, match="needs class labels"):
        tiny().sample_tokens(2, cfg=2.0)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\)"):
        tiny().sample_tokens(2, labels=torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="labels must hold 2 class ids"):
        tiny()(latents(2), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="1-D integer tensor"):
        tiny()(latents(2), torch.tensor([0.0, 1.0]))


def count(name, **flags):
    with torch.device("meta"):
        model = create_model(name, **flags)
    outer = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(model.head_attr + "."))
    return outer, sum(p.numel() for p in model.parameters())


def test_parameter_counts():
    var_outer, var_total = count("var_d16")
    # the release's var_d16 (303,969,536) + VAR's head_nm (2,099,200), + a 1024-wide inner AR
    assert (var_outer, var_total) == (306_068_736, 328_137_996)
    mvar_outer, _ = count("mvar_d16")
    assert abs(mvar_outer / var_outer - 1) < 0.01
    assert count("scalewise_tiny", **DIGITS) == (929_676, 1_054_872)  # mar_tiny: 819,712 / 944,908
    assert count("mvar_tiny", **DIGITS) == (955_036, 1_071_016)
    # the benchmark's presets: ARINAR-B's outer (200,526,336) within 3%, and its head (12,423,180)
    assert count("var_base") == (204_418_020, 204_418_020 + 12_423_180)
    assert count("mvar_base") == (196_536_720, 196_536_720 + 12_423_180)


def test_var_d16_has_the_releases_sizes():
    with torch.device("meta"):
        model = create_model("var_d16")
    c = model.family_config
    assert (c.mixer, c.depth, c.width, c.num_heads, c.mlp_ratio) == ("var", 16, 1024, 16, 4.0)
    assert c.drop_path == pytest.approx(0.1 * 16 / 24) and c.label_drop_prob == 0.1
    assert model.scales == (1, 2, 3, 4, 5, 6, 8, 10, 13, 16) and model.num_tokens == 680
    assert model.class_emb.num_embeddings == 1001  # the null class is the extra row


@pytest.mark.parametrize("mixer", MIXERS)
def test_sampling_under_bf16_autocast(mixer):
    """Caches in the activation dtype, the scan's state in float32, the canvas in float32."""
    model = tiny(mixer)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.sample_tokens(2, cfg=2.0, labels=torch.tensor([0, 1]), backend=Capturing())
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


# ------------------------------------------------------------------ mutation guards (class rows, drop, cover)
NULL = 10  # DIGITS' class_num: the null class is class_emb's extra, last row


@pytest.mark.usefixtures("one_thread")
def test_guided_steps_see_the_class_rows_then_the_null_row_and_sampling_never_drops_labels():
    """Bugs: the null class in the conditional half (CFG then guides toward the unconditional model), the null
    class taken as row class_num - 1 (a real class), label drop applied while sampling. The head reads
    z[:n] as conditional and z[n:] as unconditional, so every step's class vectors must be
    [class_emb[labels]; class_emb[10] x n], even for a model trained with label drop 1."""
    model = tiny(label_drop_prob=1.0)
    weight = model.class_emb.weight
    assert weight.shape[0] == NULL + 1
    for cfg, labels, want in ((3.0, [3, 7], [3, 7, NULL, NULL]), (1.0, [3, 7], [3, 7]), (1.0, None, [NULL, NULL])):
        rec = Recorder()
        torch.manual_seed(0)
        model.sample_tokens(2, cfg=cfg, labels=None if labels is None else torch.tensor(labels), backend=rec)
        assert len(rec.steps) == 4
        for _, args, _ in rec.steps:
            assert torch.equal(args[1], weight[want])


@pytest.mark.usefixtures("one_thread")
def test_forward_drops_labels_to_the_null_row_in_training_only():
    """Bugs: label drop applied in eval (validation losses of the unconditional model) or never in training
    (no unconditional model to guide with). With label_drop_prob 1 the training loss is the null
    class's (labels None) and the eval loss the class's, and the two differ."""
    model = tiny(label_drop_prob=1.0)
    x, labels = latents(2), torch.tensor([1, 8])
    with torch.no_grad():
        cond, uncond = model(x, labels), model(x, None)
        model.train()
        train = model(x, labels)
        dropped = model.class_vectors(labels, 2, drop_labels=True)
    assert torch.equal(dropped, model.class_emb.weight[[NULL, NULL]])
    torch.testing.assert_close(train, uncond, rtol=1e-6, atol=0)
    assert abs(cond - uncond) > 1e-3 * abs(uncond)


@pytest.mark.usefixtures("one_thread")
def test_an_eval_forward_refuses_a_label_out_of_range():
    """Bug: the scale-wise forward never checks label values, so in eval (validation losses) class_num itself
    silently reads the null row (the unconditional model) where MAR and causal raise a one-line error."""
    model = tiny()
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\)"):
        model(latents(2), torch.tensor([0, 10]))
    assert torch.isfinite(model.train()(latents(2), torch.tensor([0, 9])))  # training: the loop checks on the host


def np_covered(keep, side):
    """keep [n, n] bool -> [side, side]: cell (i, j) covers rows floor(i n / side) .. ceil((i + 1) n / side) - 1
    (and the same for columns); it is covered when all of them are kept."""
    n = keep.shape[0]
    spans = [(i * n // side, -(-(i + 1) * n // side)) for i in range(side)]
    return np.array([[keep[r0:r1, c0:c1].all() for c0, c1 in spans] for r0, r1 in spans])


def test_a_cell_counts_as_covered_only_when_its_whole_footprint_is_kept():
    """Bug: a threshold below 1 (e.g. share.round(), share > 0.5): a cell 3/4 kept is forced, asserting a value
    over an open position. Literal: a 4 x 4 grid kept but for (0, 0); then random masks against numpy."""
    keep = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    keep[..., 0, 0] = False
    assert covered(keep, 2)[0, 0].tolist() == [[False, True], [True, True]]
    assert covered(keep, 3)[0, 0].tolist() == [[False, True, True], [True, True, True], [True, True, True]]
    rng = np.random.default_rng(0)
    for n in (4, 8, 16):
        masks = rng.random((6, n, n)) < 0.9
        for side in scales_for(n)[:-1]:
            got = covered(torch.from_numpy(masks)[:, None], side)[:, 0].numpy()
            assert np.array_equal(got, np.stack([np_covered(k, side) for k in masks])), (n, side)


# ------------------------------------------------- mutation guards (blocks against naive references, init, CFG)
def np_layer_norm(x):
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + 1e-6)


def np_softmax(s):
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_silu(x):
    return x / (1 + np.exp(-x))


def weights(module):
    return {k: v.detach().double().numpy() for k, v in module.named_parameters()}


def test_scale_attention_equals_a_naive_float64_reference():
    """VAR's attention written out per head from its description: q = x Wq + q_bias, k = x Wk (no bias),
    v = x Wv + v_bias; q and k L2-normalised over the head's features, q times min(exp(log_t), 100), softmax
    at scale 1, then proj. Bugs: the zero bias on v instead of k, the temperature cap dropped (head 1 asks
    for 500), k not normalised or normalised over the wrong axis, a 1/sqrt(head_dim) softmax scale."""
    width, heads, hd, length = 8, 2, 4, 5
    attn = randomize_(ScaleAttention(width, heads), std=0.5, seed=3).double()
    with torch.no_grad():
        attn.log_temperature.copy_(torch.tensor([2.0, 500.0], dtype=torch.float64).log().view(1, 2, 1, 1))
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, length, width, generator=gen, dtype=torch.float64)
    mask = torch.rand(length, length, generator=gen) < 0.6
    mask |= torch.eye(length, dtype=torch.bool)
    got = attn(x, mask).detach().numpy()

    w, xs, m = weights(attn), x.numpy(), mask.numpy()
    wq, wk, wv = np.split(w["mat_qkv.weight"], 3)
    q, k, v = xs @ wq.T + w["q_bias"], xs @ wk.T, xs @ wv.T + w["v_bias"]
    out = np.zeros_like(xs)
    for h, temp in enumerate([2.0, 100.0]):
        cols = slice(h * hd, (h + 1) * hd)
        qh = q[..., cols] / np.linalg.norm(q[..., cols], axis=-1, keepdims=True) * temp
        kh = k[..., cols] / np.linalg.norm(k[..., cols], axis=-1, keepdims=True)
        scores = np.where(m, qh @ kh.transpose(0, 2, 1), -np.inf)
        out[..., cols] = np_softmax(scores) @ v[..., cols]
    want = out @ w["proj.weight"].T + w["proj.bias"]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)


class StandInScan(torch.nn.Module):
    """A stateless stand-in for the scan branch (the block's wiring is under test, not the scan)."""

    def __init__(self, width):
        super().__init__()
        self.lin = torch.nn.Linear(width, width)

    def forward(self, x, state=None):
        return torch.tanh(self.lin(x))


@pytest.mark.parametrize("mixer", MIXERS)
def test_scale_block_is_adaln_with_gamma_scale_shift_rows_in_that_order(mixer):
    """A block from the module doc: ada_lin(cond) = [gammas | scales | shifts], one width-sized chunk per branch
    (attention, [scan,] MLP); each branch reads LayerNorm(x) * (1 + scale_i) + shift_i and adds gamma_i times
    its output. Bugs: gammas and scales swapped, shift and scale swapped, a gate dropped, the MLP (or the
    scan) reading another branch's modulation, the rows laid out branch-major."""
    width = 8
    block = ScaleBlock(width, 2, mlp_ratio=2.0, scan=StandInScan(width) if mixer == "mvar" else None)
    block = randomize_(block, std=0.5, seed=5).double().eval()
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, width, generator=gen, dtype=torch.float64)
    cond = torch.randn(2, width, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        got = block(x, cond).numpy()
    attn, ffn, scan = (lambda a, f=f: f(torch.from_numpy(a)).detach().numpy()  # the sub-layers as black boxes
                       for f in (block.attn, block.ffn, block.scan))
    w = weights(block)
    n = 3 if mixer == "mvar" else 2
    chunks = np.split(np_silu(cond.numpy()) @ w["ada_lin.1.weight"].T + w["ada_lin.1.bias"], 3 * n, axis=-1)
    gamma, scale, shift = ([c[:, None] for c in chunks[i * n:(i + 1) * n]] for i in range(3))
    branches = [attn, scan, ffn] if mixer == "mvar" else [attn, ffn]
    h = x.numpy()
    for i, branch in enumerate(branches):
        h = h + gamma[i] * branch(np_layer_norm(h) * (1 + scale[i]) + shift[i])
    np.testing.assert_allclose(got, h, rtol=0, atol=1e-10)


def test_the_norm_before_the_head_is_adaln_with_scale_rows_then_shift_rows():
    """z = LayerNorm(x) * (1 + scale) + shift, ada_lin(cond) = [scale | shift]. Bug: the two read swapped."""
    head_nm = randomize_(AdaLNBeforeHead(6), std=0.5, seed=7).double()
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2, 3, 6, generator=gen, dtype=torch.float64)
    cond = torch.randn(2, 6, generator=gen, dtype=torch.float64)
    w = weights(head_nm)
    scale, shift = np.split(np_silu(cond.numpy()) @ w["ada_lin.1.weight"].T + w["ada_lin.1.bias"], 2, axis=-1)
    want = np_layer_norm(x.numpy()) * (1 + scale[:, None]) + shift[:, None]
    np.testing.assert_allclose(head_nm(x, cond).detach().numpy(), want, rtol=0, atol=1e-12)


def test_the_scan_mixer_equals_a_naive_mamba_in_float64():
    """SelectiveScanMixer over a whole sequence, written out from Mamba: in_proj -> (x, gate); causal
    depthwise conv (zeros before the start) and SiLU; x_proj -> (dt, B, C); step sizes softplus(dt W_dt^T
    + dt_bias); A = -exp(A_log); the recurrence (tests/test_scan.py's naive loop) gated by SiLU(gate);
    out_proj. Bugs: A = +exp(A_log), softplus dropped, SiLU after the conv dropped, the step sizes
    reversed along the sequence."""
    from tests.test_scan import naive
    width, length = 4, 6
    mixer = randomize_(SelectiveScanMixer(width, expand=2, state_dim=3, conv_width=3), std=0.5, seed=9).double()
    x = torch.randn(2, length, width, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    with torch.no_grad():
        got = mixer(x).numpy()
    w = weights(mixer)
    inner, rank, n, cw = 8, mixer.rank, 3, 3
    xz = x.numpy() @ w["in_proj.weight"].T                       # [b, L, 2 inner]
    xs, gate = xz[..., :inner], xz[..., inner:]
    conv = np.zeros_like(xs)
    for t in range(length):
        for j in range(cw):  # tap j reads position t - (cw - 1) + j
            src = t - (cw - 1) + j
            if src >= 0:
                conv[:, t] += w["conv.weight"][:, 0, j] * xs[:, src]
    u = np_silu(conv + w["conv.bias"])                           # [b, L, inner]
    proj = u @ w["x_proj.weight"].T
    dt, B, C = proj[..., :rank], proj[..., rank:rank + n], proj[..., rank + n:]
    delta = dt @ w["dt_weight"].T                                 # softplus(delta + bias) inside naive
    y, _ = naive(u.transpose(0, 2, 1), delta.transpose(0, 2, 1), -np.exp(w["A_log"]), B.transpose(0, 2, 1),
                 C.transpose(0, 2, 1), w["D"], gate.transpose(0, 2, 1), w["dt_bias"], np.zeros((2, inner, n)))
    want = y.transpose(0, 2, 1) @ w["out_proj.weight"].T
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("mixer", MIXERS)
def test_every_attention_head_starts_at_temperature_4_with_zero_biases(mixer):
    """VAR's attn_l2_norm init: the learned per-head scale starts at 4 (stored as its log) and the q / v biases
    at 0, and the model's init leaves them so. Bug: log_temperature initialised to 4 (a temperature e^4 ~ 55,
    near-one-hot attention from the first step)."""
    torch.manual_seed(0)
    model = create_model("scalewise_tiny", mixer=mixer, depth=2, **DIGITS)
    for block in model.blocks:
        heads = model.family_config.num_heads
        torch.testing.assert_close(block.attn.log_temperature.detach().exp(), torch.full((1, heads, 1, 1), 4.0))
        assert not block.attn.q_bias.any() and not block.attn.v_bias.any()


@pytest.mark.parametrize("width, rank", [(4, 1), (16, 1), (17, 2), (40, 3), (1024, 64)])
def test_the_scan_mixers_step_rank_is_width_over_16_rounded_up(width, rank):
    """Mamba's dt_rank "auto": ceil(width / 16). Bug: width // 16 floored at 1 (the same for the tiny models'
    widths and VAR's 1024; a rank short for any width not a multiple of 16)."""
    mixer = SelectiveScanMixer(width, expand=2, state_dim=3, conv_width=3)
    assert mixer.rank == rank
    assert mixer.dt_weight.shape == (2 * width, rank) and mixer.x_proj.out_features == rank + 2 * 3


def test_the_scan_mixers_step_init_is_log_uniform_with_dt_weight_uniform_in_one_over_sqrt_rank():
    """Mamba's init at rank > 1 (the tiny models' rank 1 hides the bound): dt_weight ~ U(-rank^-1/2, rank^-1/2),
    std bound / sqrt(3); step sizes softplus(dt_bias) log-uniform in [1e-3, 0.1], so a quarter of them in each
    half-decade (5-sigma binomial bands). Bugs: the bound from the inner width, step sizes uniform in
    [1e-3, 0.1] (nine in ten past 0.01)."""
    torch.manual_seed(0)
    mixer = SelectiveScanMixer(512, expand=2, state_dim=3, conv_width=3)  # inner 1024, rank 32
    mixer.reset_scan_parameters()
    bound = 32 ** -0.5
    w = mixer.dt_weight.detach()
    assert w.abs().max() <= bound and 0.9 * bound / math.sqrt(3) < w.std() < 1.1 * bound / math.sqrt(3)
    steps = torch.nn.functional.softplus(mixer.dt_bias.detach().double())
    counts = torch.histc(steps.log10(), bins=4, min=-3, max=-1)
    assert counts.sum() == 1024 and ((counts - 256).abs() < 5 * math.sqrt(1024 * 0.25 * 0.75)).all(), counts


@pytest.mark.parametrize("mixer", MIXERS)
def test_init_follows_vars_rules(mixer):
    """VAR's init (see initialize_weights' docstring), checked on the untouched model: every AdaLN gate row
    x 1e-3 and the scale/shift rows x 0.5 of std sqrt(1 / (3 width)); the head's norm rows x 0.5; the
    embeddings at that std and the residual projections (attention, MLP, scan) at it / sqrt(2 depth); drop
    path linear from 0 to --drop_path over the blocks; Mamba's A = -(1..N), D = 1 and step sizes
    softplus(dt_bias) in [1e-3, 0.1]. Bugs: only the first branch's gate shrunk, the scale/shift (or the head
    norm's) halving dropped, a projection left undivided, the rates divided by depth (the last block short
    of --drop_path), the inverse softplus dropped from dt_bias, A's order reversed."""
    torch.manual_seed(0)
    model = create_model("scalewise_tiny", mixer=mixer, drop_path=0.3, depth=3, **DIGITS)
    width = model.family_config.width
    std = (1 / width / 3) ** 0.5
    assert [b.drop_path for b in model.blocks] == pytest.approx([0.0, 0.15, 0.3])
    for p in (model.pos_start, model.pos_embed, model.class_emb.weight, model.word_embed.weight):
        assert 0.8 * std < p.std() < 1.2 * std
    for block in model.blocks:
        residual = [block.attn.proj.weight, block.ffn.fc2.weight] + ([block.scan.out_proj.weight] if block.scan else [])
        for w in residual:  # the residual projections / sqrt(2 depth)
            assert 0.8 * std / (2 * 3) ** 0.5 < w.std() < 1.2 * std / (2 * 3) ** 0.5
        ada = block.ada_lin[1].weight.detach()
        gates = block.branches * width
        assert ada[:gates].std() < 2e-3 * std
        assert 0.4 * std < ada[gates:].std() < 0.6 * std
        if block.scan is not None:
            a_log = block.scan.A_log.detach()
            assert torch.equal(a_log, torch.log(torch.arange(1.0, block.scan.state_dim + 1)).expand_as(a_log))
            assert torch.equal(block.scan.D, torch.ones_like(block.scan.D))
            steps = torch.nn.functional.softplus(block.scan.dt_bias.detach())
            assert (steps >= 1e-3 * 0.999).all() and (steps <= 0.1 * 1.001).all()
    assert 0.4 * std < model.head_nm.ada_lin[1].weight.std() < 0.6 * std


def test_both_cfg_halves_read_the_same_inputs():
    """With CFG the unconditional rows must see the same resized f_hat as the conditional ones (the guided
    sample is one image seen under two class vectors). Bug: the batch doubled with zeros (or a stale
    canvas) for the null half; the cached-vs-teacher-forcing check cannot see it, as it replays whatever
    was fed."""
    model, rec = tiny(), Recorder()
    torch.manual_seed(2)
    model.sample_tokens(2, cfg=3.0, labels=torch.tensor([4, 6]), backend=rec)
    for _, args, _ in rec.steps[1:]:
        assert args[0].shape[0] == 4 and args[0][:2].abs().sum() > 0
        assert torch.equal(args[0][2:], args[0][:2])


def test_one_step_a_scale_whatever_num_iter():
    """sampling_steps names an evaluation's step count: the number of scales. Bug: it returns num_iter."""
    model = tiny()
    assert [model.sampling_steps(n) for n in (1, 4, 64)] == [4, 4, 4]


def test_kept_residual_is_the_resized_gap_on_kept_positions_and_zero_elsewhere():
    """Editing's forced residual: resize(known - f_hat where kept, 0 elsewhere). Bug: the mask applied to known
    alone (resize(where(keep, known, 0) - f_hat)): the sampler's f_hat over open positions leaks into the
    forced cells through the bicubic taps, so a covered cell next to the open region is pulled by it."""
    rng = np.random.default_rng(11)
    f_hat, known = rng.normal(size=(2, 3, 4, 4)), rng.normal(size=(2, 3, 4, 4))
    keep = np.zeros((2, 1, 4, 4), dtype=bool)
    keep[..., :, :2] = True  # the left half
    keep[1, 0, 3, 3] = True
    for side in (1, 2, 3):
        got = kept_residual(torch.from_numpy(f_hat), torch.from_numpy(known), torch.from_numpy(keep), side)
        np.testing.assert_allclose(got.numpy(), np_resize(np.where(keep, known - f_hat, 0.0), side), rtol=0,
                                   atol=1e-12)


@pytest.mark.parametrize("mixer", MIXERS)
def test_drop_path_drops_branches_never_the_residual_stream(mixer):
    """Stochastic depth drops a branch's gated output, never x itself: with every gate 0 (ada_lin zero) a
    block is the identity bit for bit in training, whatever is dropped. Bug: the drop wrapped round
    x + branch, zeroing (or rescaling by 1 / (1 - p)) the whole stream of a dropped sample."""
    width = 8
    scan = StandInScan(width) if mixer == "mvar" else None
    block = randomize_(ScaleBlock(width, 2, mlp_ratio=2.0, scan=scan, drop_path=0.5), std=0.5, seed=12).train()
    with torch.no_grad():
        block.ada_lin[1].weight.zero_()
        block.ada_lin[1].bias.zero_()
    gen = torch.Generator().manual_seed(13)
    x, cond = torch.randn(64, 3, width, generator=gen), torch.randn(64, width, generator=gen)
    torch.manual_seed(0)
    assert torch.equal(block(x, cond), x)

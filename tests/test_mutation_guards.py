"""Tests that fail on realistic bugs the rest of the suite let through (issue 32), and MAR's diffusion head
in float64 against an independent float64 computation written from the DDPM formulas (MAR's diffusion head;
models/diffusion.py's docstring).

Each test names the bug it guards against; the oracles are numpy formulas, literal values, or the
public behaviour of another entry point (teacher forcing for sampling), never the code under test.
"""
import os
import types

import numpy as np
import pytest
import torch

import engine_mar
from models.heads.diffloss import timestep_embedding
from models.heads.arinar import InnerAR
from tests.conftest import randomize_, tiny_mar
from tests.pipeline_fixtures import eval_setup
from tests.test_diffloss import C, numpy_alpha_bar, numpy_loss, numpy_net
from util.evaluation import eval_folder
from util.editing import mask_to_tokens

pytestmark = pytest.mark.usefixtures("one_thread")


def watch_head(model, monkeypatch):
    """Record what MAR.forward gives its head: (target, z) of head.loss and (x_t, t, output) of its net."""
    seen = {}
    head, loss = model.head, model.head.loss

    def spy_loss(target, z):
        seen.update(target=target.detach(), z=z.detach())
        return loss(target, z)

    monkeypatch.setattr(head, "loss", spy_loss)
    if hasattr(head, "net"):
        head.net.register_forward_hook(lambda module, args, out: seen.update(x_t=args[0], t=args[1], out=out))
    return seen


def masked_batch(model, batch=3, masked=5, seed=0, dtype=torch.float32):
    """Latents with distinct random values, labels, and a fixed mask of `masked` tokens per image."""
    gen = torch.Generator().manual_seed(seed)
    tokens = model.config.tokens
    side = tokens.seq_h * tokens.patch_size
    latents = torch.randn(batch, tokens.vae_embed_dim, side, side, generator=gen, dtype=dtype)
    mask = torch.rand(batch, model.seq_len, generator=gen).argsort(1) < masked
    return latents, torch.arange(batch) % model.class_num, mask


def assert_rows_carry_their_tokens_z(seen, model, latents, labels, mask, repeats):
    """Every row the head trains on pairs a masked token with that token's own z, each token `repeats` times."""
    tokens = model.patchify(latents)
    with torch.no_grad():
        z_all = model.condition(tokens, mask, model.class_embedding(labels, len(labels)))
    targets, conds = tokens[mask], z_all[mask]
    assert seen["target"].shape[0] == repeats * targets.shape[0]
    # which masked token each row's target is (the values are distinct random numbers)
    match = (seen["target"][:, None, :] == targets[None]).all(-1)
    assert (match.sum(1) == 1).all()
    owner = match.float().argmax(1)
    assert torch.bincount(owner, minlength=targets.shape[0]).tolist() == [repeats] * targets.shape[0]
    torch.testing.assert_close(seen["z"], conds[owner], rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- diffusion_batch_mul pairing
def test_each_repeated_row_carries_its_own_tokens_z(monkeypatch):
    """Bug: targets tiled (.repeat) but z interleaved (.repeat_interleave), so a target meets another token's z."""
    model = randomize_(tiny_mar(head="diffloss", diffloss_d=1, diffloss_w=32, diffusion_batch_mul=3), std=0.2).eval()
    seen = watch_head(model, monkeypatch)
    latents, labels, mask = masked_batch(model)
    model(latents, labels, mask)
    assert_rows_carry_their_tokens_z(seen, model, latents, labels, mask, repeats=3)


# ----------------------------------------------------------------------------- issue item 7: float64
def float64_diffusion_mar():
    model = tiny_mar(head="diffloss", diffloss_d=2, diffloss_w=32, num_sampling_steps=6).double().eval()
    randomize_(model.diffloss, std=0.1, seed=1)  # the zero-initialised output layers would hide the net
    return model


def test_float64_mar_diffusion_loss_matches_numpy_from_the_spec(monkeypatch):
    """Bug: any float32 step in a float64 run (e.g. the timestep table), which moves the numbers by ~1e-6.

    The net's output, the per-row loss and MAR's masked mean against numpy float64 written from the spec
    (tests/test_diffloss.py's numpy_net and numpy_loss), with the noise read back from x_t."""
    model = float64_diffusion_mar()
    seen = watch_head(model, monkeypatch)
    latents, labels, mask = masked_batch(model, dtype=torch.float64)
    torch.manual_seed(3)
    loss = model(latents, labels, mask)
    assert loss.dtype == torch.float64
    assert_rows_carry_their_tokens_z(seen, model, latents, labels, mask, repeats=4)

    state = {k: v.detach() for k, v in model.diffloss.net.state_dict().items()}
    x0, z, x_t = (seen[k].numpy() for k in ("target", "z", "x_t"))
    t = seen["t"].numpy()
    out = numpy_net(state, x_t, t.astype(np.float64), z)
    np.testing.assert_allclose(seen["out"].detach().numpy(), out, rtol=1e-11, atol=1e-13)
    alpha_bar = numpy_alpha_bar()[t][:, None]
    noise = (x_t - np.sqrt(alpha_bar) * x0) / np.sqrt(1 - alpha_bar)
    expected = numpy_loss(x0, t, noise, out)
    assert loss.item() == pytest.approx(expected.mean(), rel=1e-11)
    assert np.abs(noise).max() < 6 and abs(noise.std() - 1) < 0.2  # read back, it is the N(0, I) draw


def numpy_cfg_sampler(state, z_cond, z_uncond, x, w, steps):
    """The respaced reverse process at temperature 0 with CFG, numpy float64 from the spec: the network on
    [x; x] with [z_cond; z_uncond] at the ORIGINAL kept timesteps, eps = eps_u + w (eps_c - eps_u), the
    conditional half's variance values, and the posterior mean of the x_0 prediction."""
    kept = np.round(np.linspace(0, 999, steps)).astype(int)
    ab = numpy_alpha_bar()[kept]
    ab_prev = np.append(1.0, ab[:-1])
    beta = 1 - ab / ab_prev
    n = len(x)
    for i in reversed(range(steps)):
        out = numpy_net(state, np.concatenate([x, x]), np.full(2 * n, float(kept[i])),
                        np.concatenate([z_cond, z_uncond]))
        eps = out[n:, :C] + w * (out[:n, :C] - out[n:, :C])
        x0 = (x - np.sqrt(1 - ab[i]) * eps) / np.sqrt(ab[i])
        x = (beta[i] * np.sqrt(ab_prev[i]) * x0 + (1 - ab_prev[i]) * np.sqrt(1 - beta[i]) * x) / (1 - ab[i])
    return x


def test_float64_guided_diffusion_sampling_matches_numpy_from_the_spec():
    """Bug: the CFG scale 2.9 rounded through a float32 tensor (2.9000000954) in a float64 run."""
    model = float64_diffusion_mar()
    gen = torch.Generator().manual_seed(4)
    z = torch.randn(2 * 5, 32, generator=gen, dtype=torch.float64)
    torch.manual_seed(5)
    x_start = torch.randn(5, C, dtype=torch.float64)  # the sampler's first draw
    torch.manual_seed(5)
    got = model.diffloss.sample(z, temperature=0.0, cfg=2.9)
    assert got.dtype == torch.float64
    state = {k: v.detach() for k, v in model.diffloss.net.state_dict().items()}
    expected = numpy_cfg_sampler(state, z[:5].numpy(), z[5:].numpy(), x_start.numpy(), 2.9, steps=6)
    # the first reverse step (from t = 999, alpha_bar ~ 1e-9) amplifies float64 rounding to ~2e-10 here;
    # the cfg rounded through float32 moves the result by ~1e-6
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-8, atol=0)


def test_timestep_table_is_computed_in_at_least_float32():
    """Bug: the sinusoids computed in a bf16 model's own dtype (t f reaches 999 rad: bf16 keeps 3 digits)."""
    emb = timestep_embedding(torch.tensor([999, 517]), dtype=torch.bfloat16)
    assert emb.dtype == torch.float32
    freqs = np.exp(-np.log(10000) * np.arange(128) / 128)
    expected = np.concatenate([np.cos(np.outer([999, 517], freqs)), np.sin(np.outer([999, 517], freqs))], 1)
    np.testing.assert_allclose(emb.numpy(), expected, rtol=0, atol=2e-4)  # float32 phase error ~999 x 6e-8


# ----------------------------------------------------------------------------- the variational-bound term
def test_vb_term_sends_no_gradient_into_the_eps_prediction():
    """Bug: eps not detached in the learned-variance term, so the KL pulls on the noise prediction.

    d loss / d eps must be the MSE term's alone, -2 (noise - eps) / C; d loss / d v must be the whole
    loss's, checked by central differences of the numpy loss."""
    head = randomize_(tiny_mar(head="diffloss", diffloss_d=1, diffloss_w=32).double().diffloss, std=0.1, seed=2)
    gen = torch.Generator().manual_seed(6)
    n = 24
    x0 = torch.rand(n, C, generator=gen, dtype=torch.float64) * 1.6 - 0.8
    z, noise = torch.randn(n, 32, generator=gen, dtype=torch.float64), torch.randn(n, C, generator=gen,
                                                                                  dtype=torch.float64)
    t = torch.cat([torch.tensor([0, 1, 500, 999]), torch.randint(0, 1000, (n - 4,), generator=gen)])
    outs = []

    def keep_output(module, args, out):  # returns None: the output itself is left as it is
        out.retain_grad()
        outs.append(out)

    handle = head.net.register_forward_hook(keep_output)
    head.loss(x0, z, t=t, noise=noise).sum().backward()
    handle.remove()
    out = outs[0]
    eps = out[:, :C].detach()
    np.testing.assert_allclose(out.grad[:, :C].numpy(), (-2 * (noise - eps) / C).numpy(), rtol=1e-12, atol=1e-15)

    base, h = out.detach().numpy(), 1e-5
    loss = numpy_loss(x0.numpy(), t.numpy(), noise.numpy(), base)
    rounding = 1e-14 * np.abs(loss) / h  # what a central difference of a float64 loss of this size can resolve
    for c in range(C, 2 * C):
        up, down = base.copy(), base.copy()
        up[:, c] += h
        down[:, c] -= h
        numeric = (numpy_loss(x0.numpy(), t.numpy(), noise.numpy(), up)
                   - numpy_loss(x0.numpy(), t.numpy(), noise.numpy(), down)) / (2 * h)
        assert np.all(np.abs(out.grad[:, c].numpy() - numeric) <= 1e-5 * np.abs(numeric) + rounding), c
    assert out.grad[:, C:].abs().min() > 0  # the variance values do learn from the bound


# ----------------------------------------------------------------------------- feature groups
def point_mass_inner(group, seed=0):
    """An inner model whose every mixture is one component with std ~2e-9, its mean a random function of
    the condition and the features so far: sampling is then deterministic and teacher forcing must
    reproduce it. Head output layout for g > 1: [K g means | K g log-variances | K logits]."""
    torch.manual_seed(seed)
    m = randomize_(InnerAR(token_dim=16, cond_dim=24, width=32, depth=2, num_heads=4, num_gaussians=3,
                           feature_group=group), std=0.3, seed=seed).double()
    k = 3
    with torch.no_grad():
        m.head.weight[k * group:].zero_()
        m.head.bias[k * group:2 * k * group] = -40.0
        m.head.bias[2 * k * group:] = torch.tensor([60.0, 0.0, 0.0], dtype=torch.float64)
    return m


@pytest.mark.parametrize("cfg", [1.0, 2.0])
@pytest.mark.parametrize("group", [2, 4])
def test_feature_group_sampling_lays_out_groups_as_teacher_forcing_reads_them(group, cfg):
    """Bugs: sampled groups written to the wrong feature slots (e.g. strided, features[:, t::steps]) or
    fed back in another order than the training layout x.view(N, steps, g)."""
    m = point_mass_inner(group)
    z = torch.randn(12, 24, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    torch.manual_seed(8)
    x = m.sample(z if cfg != 1 else z[:6], 1.0, cfg)
    assert x.shape == (6, 16) and x.dtype == torch.float64
    with torch.no_grad():
        mu = m.mixture(m(x, z[:6]))[0]  # teacher forcing on the sample: [6, 16/g, K, g]
    torch.testing.assert_close(x.view(6, 16 // group, group), mu[:, :, 0], rtol=0, atol=1e-7)
    # power: each step's mean depends on the features before it, so a misplaced group would show
    changed = x.clone()
    changed[:, 0] += 1.0
    with torch.no_grad():
        assert (m.mixture(m(changed, z[:6]))[0][:, 1, 0] - mu[:, 1, 0]).abs().min() > 1e-3


# ----------------------------------------------------------------------------- the canvas dtype
@pytest.mark.parametrize("head", ["arinar", "diffloss"])
def test_float64_model_samples_in_float64_and_keeps_given_tokens_bit_for_bit(head):
    """Bug: the sampling canvas made float32 whatever the model, rounding the given and drawn tokens."""
    model = randomize_(tiny_mar(head=head, diffloss_d=1, diffloss_w=32, num_sampling_steps=4), std=0.1)
    model = model.double().eval()
    gen = torch.Generator().manual_seed(9)
    known = torch.randn(2, 16, 4, 4, generator=gen, dtype=torch.float64) / 3  # not float32 numbers
    keep = torch.rand(2, 16, generator=gen) < 0.5
    torch.manual_seed(10)
    out = model.sample_tokens(2, num_iter=3, cfg=2.0, labels=torch.tensor([1, 2]), known=known, keep=keep)
    assert out.dtype == torch.float64
    tokens, given = model.patchify(out), model.patchify(known)
    assert (given[keep].float().double() != given[keep]).all()  # so a float32 detour would show
    assert torch.equal(tokens[keep], given[keep])
    drawn = tokens[~keep]
    assert (drawn.float().double() != drawn).float().mean() > 0.99  # the head's float64 draws, unrounded


# ----------------------------------------------------------------------------- editing masks
def cells_touching(pixel, side, grid):
    """The cells [i L / n, (i + 1) L / n) that pixel [p, p + 1) overlaps, from the geometry alone."""
    return {i for i in range(grid) if pixel < (i + 1) * side / grid and pixel + 1 > i * side / grid}


@pytest.mark.parametrize("side, grid", [(10, 4), (7, 3), (13, 4), (9, 2)])
def test_mask_pixel_marks_every_cell_it_touches_when_the_grid_does_not_divide(side, grid):
    """Bug: a cell's last pixel row/column dropped (floor instead of ceil for the cell's end)."""
    for row in range(side):
        for col in range(side):
            white = np.zeros((side, side), dtype=bool)
            white[row, col] = True
            expected = np.zeros((grid, grid), dtype=bool)
            for r in cells_touching(row, side, grid):
                for c in cells_touching(col, side, grid):
                    expected[r, c] = True
            assert np.array_equal(mask_to_tokens(white, grid), expected), (row, col)


def test_mask_pixel_on_a_cells_last_row_and_column_literal():
    white = np.zeros((10, 10), dtype=bool)
    white[2, 7] = True  # 10 px in 4 cells of 2.5 px: row 2 is cell 0's last row and cell 1's first
    assert np.argwhere(mask_to_tokens(white, 4)).tolist() == [[0, 2], [0, 3], [1, 2], [1, 3]]


# ----------------------------------------------------------------------------- evaluation batch seeds
SEEDS = {(0, 0): 1587444311861459787, (0, 1): 2716135651556083485, (1, 0): 5748807728629170775,
         (1, 11): 8604544418009115461, (11, 1): 4271776655222741394, (3, 0): 1732098702159256494,
         (3, 1): 4031147608896858097, (4, 0): 920679067174201282}


def test_batch_seeds_are_pinned_and_never_collide_between_nearby_seeds():
    """Bugs: seed + batch (seed 3's batch 1 is seed 4's batch 0), or "{seed}{batch}" hashed without a
    separator ((1, 11) and (11, 1)); and any change of the rule, which would change every evaluation's images."""
    assert {key: eval_folder.batch_seed(*key) for key in SEEDS} == SEEDS
    grid = {eval_folder.batch_seed(s, b) for s in range(128) for b in range(128)}
    assert len(grid) == 128 * 128 and all(0 <= v < 2 ** 63 for v in grid)


def test_the_last_batch_is_cut_short_at_num_images():
    """5 images in batches of 2: [0, 1], [2, 3], [4]. Bug caught: the last batch not cut at num_images (index 5
    drawn and written, one image more than asked, and its PNG counted by the metrics)."""
    assert [b.tolist() for b in eval_folder.batches(5, 2)] == [[0, 1], [2, 3], [4]]
    assert [b.tolist() for b in eval_folder.batches(4, 2)] == [[0, 1], [2, 3]]
    assert [b.tolist() for b in eval_folder.batches(3, 8)] == [[0, 1, 2]]


def test_the_weights_digest_is_sha256_over_each_name_then_its_bytes():
    """An evaluation names the weights it sampled with by this digest (settings.json), and a published model's card
    finds its evaluations by it: the rule is pinned, written here with hashlib and numpy. Bug caught: the names left
    out of the hash (a state dict with renamed entries, another model's, taken for the same weights)."""
    import hashlib
    state = {"w": torch.tensor([[1.0, -2.0]]), "step": torch.tensor([3], dtype=torch.int64)}
    expected = hashlib.sha256(b"w" + np.array([1.0, -2.0], "<f4").tobytes() + b"step" + np.array([3], "<i8").tobytes())
    assert eval_folder.state_digest(state) == expected.hexdigest()
    assert eval_folder.state_digest({"v": state["w"], "step": state["step"]}) != expected.hexdigest()


def test_evaluation_draws_each_batch_from_its_pinned_seed(tmp_path, monkeypatch):
    """Bug: the evaluation loop seeding batch b with something else (seed + b, the rank, ...)."""
    seeds, real = [], engine_mar.generate

    def recording_generate(*args, **kwargs):
        seeds.append(torch.initial_seed())
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_mar, "generate", recording_generate)
    for seed in (3, 4):
        args, model, tokenizer, _ = eval_setup(tmp_path / str(seed), seed=seed, num_images=4, eval_bsz=2,
                                               num_iter=1)
        folder = tmp_path / str(seed) / "eval"
        (folder / "images").mkdir(parents=True)
        engine_mar.draw_or_reuse_batches(model, tokenizer, args, 1.0, 1.0, str(folder))
    assert seeds == [SEEDS[3, 0], SEEDS[3, 1], SEEDS[4, 0], eval_folder.batch_seed(4, 1)]


def test_seconds_per_image_leave_out_the_first_drawn_batch(tmp_path, monkeypatch):
    """Bug: `timed = times` for `times[1:] or times`: the first drawn batch (warm-up: compilation, CUDA graph
    capture) counted in the speed. A scripted clock (not the real one): batch 0 takes 10 s, batches 1 and 2
    take 1 s, 2 images each: (1 + 1) / 4 = 0.5 s per image, not (10 + 1 + 1) / 6 = 2; one drawn batch alone
    is its own estimate (10 / 2)."""
    clock = {"now": 100.0, "cost": iter([10.0, 1.0, 1.0, 10.0])}
    real = engine_mar.generate

    def timed_generate(*args, **kwargs):
        clock["now"] += next(clock["cost"])
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_mar, "generate", timed_generate)
    monkeypatch.setattr(engine_mar, "time", types.SimpleNamespace(time=lambda: clock["now"]))  # engine_mar's only
    args, model, tokenizer, _ = eval_setup(tmp_path, num_images=6, eval_bsz=2, num_iter=1)
    (tmp_path / "eval" / "images").mkdir(parents=True)
    assert engine_mar.draw_or_reuse_batches(model, tokenizer, args, 1.0, 1.0, str(tmp_path / "eval")) == (6, 0, 0.5)
    args.num_images = 2
    (tmp_path / "one" / "images").mkdir(parents=True)
    assert engine_mar.draw_or_reuse_batches(model, tokenizer, args, 1.0, 1.0, str(tmp_path / "one")) == (2, 0, 5.0)


def test_every_drawn_image_is_written_and_a_failed_write_stops_the_evaluation(tmp_path, monkeypatch):
    """PNGs are written in the background while the next batch is drawn: bugs are a batch never waited
    for (the last), a write that fails silently in its thread, or images written under another index."""
    from util.images import load_png
    drawn, real = [], engine_mar.generate
    monkeypatch.setattr(engine_mar, "generate", lambda *a, **k: drawn.append(real(*a, **k)) or drawn[-1])
    args, model, tokenizer, _ = eval_setup(tmp_path, seed=3, num_images=6, eval_bsz=2, num_iter=1)
    folder = tmp_path / "eval"
    (folder / "images").mkdir(parents=True)
    assert engine_mar.draw_or_reuse_batches(model, tokenizer, args, 1.0, 1.0, str(folder))[:2] == (6, 0)
    for i, image in enumerate(np.concatenate(drawn)):
        assert np.array_equal(load_png(eval_folder.png_path(str(folder / "images"), i)), image)

    # a write failing in the last batch (images 4 and 5 of 6), or in a rank's only batch (2 images): no
    # later batch waits for it, only the loop's final wait
    real_save = engine_mar.save_png

    def full_disk_from_image_4(image, path):
        if int(os.path.basename(path)[:6]) >= 4 or args.num_images == 2:
            raise OSError(28, "No space left on device")
        real_save(image, path)
    monkeypatch.setattr(engine_mar, "save_png", full_disk_from_image_4)
    for name, num_images in (("last", 6), ("only", 2)):
        (tmp_path / name / "images").mkdir(parents=True)
        args.num_images = num_images
        with pytest.raises(OSError, match="No space left on device"):
            engine_mar.draw_or_reuse_batches(model, tokenizer, args, 1.0, 1.0, str(tmp_path / name))


def test_an_evaluation_folder_is_reused_when_its_settings_hold_tuples(tmp_path):
    """settings.json is compared as JSON reads it back: a tuple setting (a model config's) equals the list stored.
    Bug caught: the settings compared as given, so a rerun of the same evaluation was refused as another's."""
    settings = {"num_iter": 4, "cfg": 3.0, "cfg_schedule": "linear", "temperature": 0.9, "num_images": 8,
                "eval_weights": "ema", "model": {"patch": (2, 2)}}
    first = eval_folder.open_folder(str(tmp_path), 4, settings)
    assert eval_folder.open_folder(str(tmp_path), 4, settings) == first


def test_evaluations_on_another_device_type_get_their_own_folder():
    """The device type changes the images (kernels differ), so it is one of the settings naming the folder.
    Bug caught: left out of eval_settings, a CPU and a CUDA evaluation shared one folder and its PNGs."""
    args = types.SimpleNamespace(num_images=8, eval_bsz=2, seed=1, cfg_schedule="linear", cfg_sampler="exact",
                                 precision="fp32", vae_path=None, compile=False, cuda_graphs=False, eval_weights="ema")
    config = types.SimpleNamespace(to_dict=lambda: {"family": "mar"})
    cpu, cuda = (eval_folder.eval_settings(args, config, 3.0, 0.9, "ab" * 32, device, 4) for device in ("cpu", "cuda"))
    assert cpu["device"] == "cpu" and cuda["device"] == "cuda"
    assert eval_folder.folder_name(4, cpu) != eval_folder.folder_name(4, cuda)


def test_an_evaluation_folder_is_named_by_its_main_settings_and_their_sha256():
    """The name shows the epoch, steps, cfg, schedule, temperature, image count and weights, then the first 8 hex
    digits of sha256 over the sorted settings' JSON (hashlib here). Bug caught: the weights left out of the name
    (an EMA and a live evaluation told apart only by the digest)."""
    import hashlib
    import json
    settings = {"num_iter": 64, "cfg": 2.5, "cfg_schedule": "linear", "temperature": 1.0, "num_images": 50000,
                "eval_weights": "live", "seed": 0}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    assert eval_folder.folder_name(399, settings) == f"eval-ep399-iter64-cfg2.5-linear-temp1-n50000-live-{digest}"

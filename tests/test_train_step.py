"""The training step, piece by piece: every part of it (latent scale, lr, scaler, clipping, optimizer
step, zero_grad, EMA, label drop) must leave a trace that a hand-written step reproduces.

The expectations are independent of the code under test: the learning rates are literal numbers
worked out from the schedule's formula, and the reference step is plain tensor arithmetic.
"""
import dataclasses
import math

import pytest
import torch
from scipy import stats

from engine_mar import train_one_epoch
from models.tokenizer import PixelTokenizer
from tests.conftest import randomize_, tiny_mar
from tests.pipeline_fixtures import load, make_image_folder, run_main, tiny_flags
from util.train.config import TrainConfig
from util.train.state import LAST, TrainState
from util.train.ema import EMA

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS, BATCH, CLIP, EMA_RATE, LATENT_SCALE = 4, 8, 0.5, 0.75, 0.5
# base lr 0.1, warmup 2 epochs, cosine to 0 at epoch 4: lr(e) = 0.05 e in warmup, else 0.05 (1 + cos(pi (e-2) / 2))
LR_EPOCH_1 = [0.05, 0.0625, 0.075, 0.0875]                      # e = 1, 1.25, 1.5, 1.75
LR_EPOCH_2 = [0.1, 0.09619398, 0.08535534, 0.06913417]          # e = 2, 2.25, 2.5, 2.75
LR_EPOCH_3_FROM_STEP_2 = [0.01464466, 0.00380602]               # e = 3.5, 3.75 (a resumed epoch)


def step_config():
    return TrainConfig(grad_clip=CLIP, lr=0.1, min_lr=0.0, warmup_epochs=2, epochs=4, lr_schedule="cosine",
                       precision="fp32", log_freq=100)


class RecordingSGD(torch.optim.SGD):
    """Plain SGD (its update is linear in the gradient, so a skipped clip or unscale shows) that
    records the learning rate of every step it takes."""

    def __init__(self, params, lr):
        super().__init__(params, lr=lr)
        self.lrs = []

    def step(self, closure=None):
        self.lrs.append(self.param_groups[0]["lr"])
        return super().step(closure)


def batches(count, seed, batch=BATCH, classes=10):
    """(images, labels): 16-channel 4x4 "images" that a pixel tokenizer hands to tiny_mar as latents."""
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 16, 4, 4, generator=gen), torch.randint(0, classes, (batch,), generator=gen))
            for _ in range(count)]


def scaled_pixel_tokenizer():
    tokenizer = PixelTokenizer(img_channels=16, levels=None)
    tokenizer.scale = LATENT_SCALE  # a scale other than 1, so a step that forgets it shows
    return tokenizer


def reference_steps(model, ema, data, lrs):
    """What one training step is, written out: loss on scaled latents, gradient, clip to CLIP by the
    global norm, p -= lr * g, ema = rate * ema + (1 - rate) * p. Returns the gradient norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    norms = []
    model.train()
    for (images, labels), lr in zip(data, lrs):
        loss = model(images * LATENT_SCALE, labels)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))
        norms.append(norm)
        factor = min(1.0, CLIP / (norm + 1e-6))
        with torch.no_grad():
            for p, g, e in zip(params, grads, ema):
                p.sub_(lr * factor * g)
                e.mul_(EMA_RATE).add_((1 - EMA_RATE) * p)
    return norms


def test_train_one_epoch_matches_a_hand_written_step(tmp_path):
    torch.manual_seed(0)
    model = randomize_(tiny_mar(), std=0.1)
    reference = randomize_(tiny_mar(), std=0.1)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))
    ema = EMA(model, EMA_RATE)
    ref_ema = [p.detach().clone() for p in reference.parameters()]
    initial = [p.detach().clone() for p in model.parameters()]

    train_config = step_config()
    optimizer = RecordingSGD(model.parameters(), lr=123.0)  # the loop must set every step's lr itself
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, enabled=True)
    tokenizer = scaled_pixel_tokenizer()
    epochs = [(1, 0, batches(STEPS, 1), LR_EPOCH_1), (2, 0, batches(STEPS, 2), LR_EPOCH_2),
              (3, 2, batches(2, 3), LR_EPOCH_3_FROM_STEP_2)]
    state, norms = TrainState(), []
    for epoch, start, data, lrs in epochs:
        state.epoch, state.step_in_epoch = epoch, start
        model.eval()  # the loop must put the model in training mode (dropout, label drop) itself
        torch.manual_seed(10 + epoch)
        # (clones: to_latents scales a pixel batch in place)
        train_one_epoch(model, tokenizer, [(x.clone(), y) for x, y in data], optimizer, scaler, ema, state, train_config,
                        STEPS)
        torch.manual_seed(10 + epoch)  # the same masks, dropout and label drops as the loop drew
        norms += reference_steps(reference, ref_ema, data, lrs)

    expected_lrs = LR_EPOCH_1 + LR_EPOCH_2 + LR_EPOCH_3_FROM_STEP_2
    assert optimizer.lrs == pytest.approx(expected_lrs, rel=1e-6, abs=1e-12)
    assert (state.epoch, state.step_in_epoch, state.global_step) == (3, 4, 10)
    assert min(norms) > 2 * CLIP  # every step was clipped, so the clip matters to the result
    for (name, p), ref, start in zip(model.named_parameters(), reference.parameters(), initial):
        assert not torch.equal(p, start) or name == "mask_token", name
        torch.testing.assert_close(p, ref, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    for name, value, ref in zip(ema.names, ema.params, ref_ema):
        torch.testing.assert_close(value, ref, rtol=1e-4, atol=1e-6, msg=lambda m: f"EMA {name}: {m}")
    assert all(p.grad is None for p in model.parameters())  # gradients cleared after the step
    assert model.training


def test_training_drops_labels_at_the_configured_rate(tmp_path, monkeypatch):
    """The class vectors the outer model sees during training: the fake class at rate label_drop_prob."""
    torch.manual_seed(0)
    model = randomize_(tiny_mar(label_drop_prob=0.5), std=0.1)
    seen = []
    real = model.condition_at

    def spy(tokens, keep, class_vec, *args, **kwargs):  # what the class rows are, against the weights of the moment
        seen.append((class_vec.detach().clone(), model.fake_latent.detach().clone(),
                     model.class_emb.weight.detach().clone()))
        return real(tokens, keep, class_vec, *args, **kwargs)

    monkeypatch.setattr(model, "condition_at", spy)
    data = batches(4, 5, batch=40)
    model.eval()
    train_one_epoch(model, PixelTokenizer(img_channels=16, levels=None), data,
                    torch.optim.SGD(model.parameters(), lr=1e-3), torch.amp.GradScaler("cpu", enabled=False),
                    EMA(model, 0.9), TrainState(), step_config(), len(data))
    assert len(seen) == len(data)
    dropped = 0
    for (class_vec, fake, table), (_, labels) in zip(seen, data):
        is_fake = (class_vec == fake).all(-1)
        assert torch.equal(class_vec[~is_fake], table[labels[~is_fake]])  # kept rows: their own class
        dropped += int(is_fake.sum())
    assert stats.binomtest(dropped, 160, 0.5).pvalue > 1e-4, dropped


def test_run_logs_per_iteration_lr_and_keeps_the_ema(tmp_path):
    """End to end through main_mar: the logged lr per step is the schedule at epoch + k / steps, and
    with --ema_rate 0 the saved EMA is exactly the final live weights (it was updated after every step)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = make_image_folder(tmp_path / "data", per_class=4)  # 8 images, batch 2: 4 steps per epoch
    run_main(tiny_flags(data_path=data, output_dir=tmp_path / "run", epochs=2, lr_schedule="cosine", ema_rate=0.0))
    lr = 1e-2 * 2 / 256  # blr x batch / 256
    # epoch 0 warms up linearly; epoch 1 is the cosine half-cycle 0.5 (1 + cos(pi k / 4))
    expected = [0.0, 0.25, 0.5, 0.75, 1.0, 0.85355339, 0.5, 0.14644661]
    events = EventAccumulator(str(tmp_path / "run")).Reload()
    logged = [s.value for s in events.Scalars("train/lr")]
    assert logged == pytest.approx([lr * f for f in expected], rel=1e-6, abs=1e-12)

    ckpt = load(tmp_path / "run" / LAST)
    for key, value in ckpt["model"].items():
        torch.testing.assert_close(ckpt["model_ema"][key], value, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("label_drop_prob", [0.0, 0.5])
@pytest.mark.parametrize("head", ["arinar", "diffloss", "gmm"])
@pytest.mark.parametrize("preset", ["mar_tiny", "causal_tiny", "scalewise_tiny", "mvar_tiny"])
def test_every_parameter_gets_a_gradient_in_a_training_step(preset, head, label_drop_prob):
    """DDP (find_unused_parameters off) fails at the second step when a parameter was left out of the
    first step's graph: MAR's fake class with --label_drop_prob 0 was."""
    from models import create_model
    digits = dict(tokenizer="pixel", img_size=8, vae_stride=1, vae_embed_dim=1, img_channels=1, patch_size=2,
                  class_num=10)
    torch.manual_seed(0)
    model = create_model(preset, head=head, label_drop_prob=label_drop_prob, **digits).train()
    latents, labels = torch.randn(4, 1, 8, 8), torch.tensor([0, 3, 5, 9])
    model(latents, labels).backward()
    missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing


@pytest.mark.parametrize("preset", ["mar_tiny", "causal_tiny", "scalewise_tiny"])
def test_training_forwards_leave_the_labels_range_to_the_loop(monkeypatch, preset):
    """Reading the labels' range on a GPU makes the host wait for its queued work, at every step in a
    training forward; the training loop checks them on the host, sampling once per call."""
    from models import create_model
    from models.families import causal, mar, scalewise
    digits = dict(tokenizer="pixel", img_size=8, vae_stride=1, vae_embed_dim=1, img_channels=1, patch_size=2,
                  class_num=10)
    torch.manual_seed(0)
    model = create_model(preset, **digits).train()
    asked = []
    for module in (mar, causal, scalewise):
        real = module.check_labels
        monkeypatch.setattr(module, "check_labels", lambda *a, _real=real, **k: (asked.append(k.get("values", True)),
                                                                                 _real(*a, **k))[1])
    model(torch.randn(4, 1, 8, 8), torch.tensor([0, 3, 5, 9])).backward()
    assert asked and not any(asked)
    asked.clear()
    model.eval().sample_tokens(1, num_iter=2, labels=torch.tensor([3]))
    assert any(asked)


def test_training_loop_refuses_labels_out_of_range(tmp_path):
    model = tiny_mar(class_num=10)
    loader = [(torch.randn(2, 3, 64, 64), torch.tensor([3, 10]))]
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\) \(class_num\); got values in \[3, 10\]"):
        train_one_epoch(model, PixelTokenizer(), loader, torch.optim.SGD(model.parameters(), lr=0.1), None,
                        EMA(model, 0.9), TrainState(), step_config(), steps_in_epoch=1)


def one_step_setup(seed=0):
    """A tiny model, two copies of one batch and a constant-lr config (no warm-up) for single-step checks."""
    torch.manual_seed(seed)
    model = randomize_(tiny_mar(), std=0.1)
    data = batches(2, seed + 1)
    config = TrainConfig(grad_clip=0.0, lr=0.1, min_lr=0.0, warmup_epochs=0, epochs=1, lr_schedule="constant",
                         precision="fp32", log_freq=100)
    return model, data, config


def test_grad_clip_0_means_no_clipping():
    """--grad_clip 0 is "no clipping": with `>= 0` for `> 0` the loop clips every gradient to norm 0 and the
    weights never move. The step must be p - lr * g with the full gradient g."""
    model, data, config = one_step_setup()
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    images, labels = data[0]
    torch.manual_seed(7)
    model.train()
    grads = torch.autograd.grad(model(images, labels), params, allow_unused=True)
    torch.manual_seed(7)  # the same masks and label drops in the loop's step
    train_one_epoch(model, PixelTokenizer(img_channels=16, levels=None), [(images.clone(), labels)],
                    torch.optim.SGD(params, lr=1.0), torch.amp.GradScaler("cpu", enabled=False), EMA(model, 0.9),
                    TrainState(), config, 1)
    assert math.sqrt(sum(float(g.pow(2).sum()) for g in grads if g is not None)) > 1.0  # a clip to 0 would show
    for p, start, g in zip(params, before, grads):
        expected = start if g is None else start - 0.1 * g
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-7)


def test_a_skipped_step_backs_off_the_fp16_loss_scale():
    """An overflowed (inf) gradient under fp16: skip_step must call scaler.update(), which halves the scale
    (2^10 -> 2^9) and ends the scaler's step; without it the next step's unscale_ raises ("unscale_() has
    already been called") and the scale never backs off. The next, finite step is applied."""
    model, data, config = one_step_setup()
    first = next(model.parameters())

    class OverflowOnce(torch.amp.GradScaler):
        """An overflow in the first backward: an inf in the scaled gradient, found by unscale_."""
        calls = 0

        def unscale_(self, optimizer):
            OverflowOnce.calls += 1
            if OverflowOnce.calls == 1:
                first.grad.view(-1)[0] = float("inf")
            return super().unscale_(optimizer)

    scaler = OverflowOnce("cpu", init_scale=2.0 ** 10, growth_interval=1000, enabled=True)
    state, scales = TrainState(), []
    before = [p.detach().clone() for p in model.parameters()]
    train_one_epoch(model, PixelTokenizer(img_channels=16, levels=None), data,
                    torch.optim.SGD(model.parameters(), lr=1.0), scaler, EMA(model, 0.9), state, config, 2,
                    on_step=lambda s: scales.append(scaler.get_scale()))
    assert scales == [2.0 ** 9, 2.0 ** 9]
    assert (state.global_step, state.skipped_steps, state.skips_in_a_row) == (2, 1, 0)
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))  # step 2 was applied


class RecordingWriter:
    def __init__(self):
        self.scalars = {}

    def add_scalar(self, tag, value, step):
        self.scalars.setdefault(tag, []).append((step, value))


def test_logged_losses_are_the_rank_mean_and_the_window_mean(monkeypatch, caplog):
    """Two ranks emulated (the all-reduce doubles every sum, as two identical ranks would): the TensorBoard loss
    is the sum over ranks / 2, i.e. this rank's own loss here, not the sum (`/ world` left out). The progress
    lines (--log_freq 2, 3 steps, global steps 6-8) come at iterations 2 (a multiple of log_freq, counted in the
    epoch, not in global steps) and 3 (the epoch's last), each with the mean loss of the steps since the last
    line (the window is reset after each line)."""
    import re
    import engine_mar
    model, data, config = one_step_setup()
    data = data + batches(1, 9)
    config = dataclasses.replace(config, log_freq=2)
    losses = []
    real_forward = type(model).forward

    def forward(self, *args, **kwargs):
        loss = real_forward(self, *args, **kwargs)
        losses.append(float(loss.detach()))
        return loss

    monkeypatch.setattr(type(model), "forward", forward)
    monkeypatch.setattr(engine_mar.distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(engine_mar.distributed, "all_reduce_sum", lambda t: t.mul_(2))
    writer = RecordingWriter()
    caplog.set_level("INFO", logger="engine_mar")
    train_one_epoch(model, PixelTokenizer(img_channels=16, levels=None), data,
                    torch.optim.SGD(model.parameters(), lr=1e-3), torch.amp.GradScaler("cpu", enabled=False),
                    EMA(model, 0.9), TrainState(global_step=5), config, 3, writer=writer)
    assert len(losses) == 3
    logged = writer.scalars["train/loss"]
    assert [step for step, _ in logged] == [6, 7, 8]
    assert [value for _, value in logged] == pytest.approx(losses, rel=1e-6)
    lines = [re.search(r"step (\d+)/3 \(global (\d+)\)  loss (\S+)", r.getMessage()) for r in caplog.records
             if "images/s" in r.getMessage()]
    assert [(int(m[1]), int(m[2])) for m in lines] == [(2, 7), (3, 8)]
    assert [float(m[3]) for m in lines] == pytest.approx([(losses[0] + losses[1]) / 2, losses[2]], abs=1e-4)


def test_each_epoch_draws_its_own_flips(tmp_path, monkeypatch):
    """The data set is told the epoch before each epoch's loader (its flips are coins of (seed, epoch, index));
    bug: set_epoch never called, so every epoch would reuse epoch 0's flips. Recorded: the epoch the data set
    held at each item read, 2 epochs x 4 items."""
    from util.data.datasets import ImageFolderADM
    seen, real = [], ImageFolderADM.__getitem__
    monkeypatch.setattr(ImageFolderADM, "__getitem__", lambda self, i: (seen.append(self.epoch), real(self, i))[1])
    data = make_image_folder(tmp_path / "data", per_class=2)
    run_main(tiny_flags(data_path=data, output_dir=tmp_path / "run", epochs=2))
    assert seen == [0] * 4 + [1] * 4

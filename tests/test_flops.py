"""util/flops.py: FLOP counts against textbook formulas and a measured backward, the peak table's
name matching, and the training log's MFU (which must leave the training run's draws alone)."""
import logging

import pytest
import torch
import torch.nn.functional as F

from engine_mar import train_one_epoch
from models.tokenizer import PixelTokenizer
from tests.conftest import randomize_, tiny_mar
from util import flops
from util.train.config import TrainConfig
from util.train.state import TrainState
from util.train.ema import EMA

pytestmark = pytest.mark.usefixtures("one_thread")


def test_linear_is_two_flops_per_multiply_add():
    layer = torch.nn.Linear(8, 16)
    count, out = flops.count_flops(layer, torch.randn(5, 8))
    assert count == 2 * 5 * 8 * 16 and out.shape == (5, 16)


def test_cpu_attention_is_counted_forward_and_backward():
    """torch counts its CUDA attention kernels only; the CPU one must count the same products:
    q k^T and scores v forward, five products of those sizes backward."""
    q, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8)
    k = torch.randn(2, 3, 7, 8, requires_grad=True)
    forward, _ = flops.count_flops(F.scaled_dot_product_attention, q, k, v)
    product = 2 * (2 * 3) * 5 * 7 * 8  # 2 FLOPs x batch x heads x queries x keys x head dim
    assert forward == 2 * product
    both, _ = flops.count_flops(lambda: F.scaled_dot_product_attention(q, k, v).sum().backward())
    assert both == 7 * product


@pytest.fixture(scope="module")
def flash_attn_standins():
    """Stand-ins with the signatures flash-attn (>= 2.6) registers its kernels under (the first
    arguments: tensors [b, s, h, d]); only sizes matter to a counter. A namespace of their own, so
    a real flash-attn, if installed, is left alone."""
    from torch import Tensor

    @torch.library.custom_op("arinar_flash_standin::_flash_attn_forward", mutates_args=())
    def forward(q: Tensor, k: Tensor, v: Tensor, dropout_p: float, softmax_scale: float, causal: bool) -> Tensor:
        return torch.empty_like(q)

    @torch.library.custom_op("arinar_flash_standin::_flash_attn_backward", mutates_args=("dq", "dk", "dv"))
    def backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, dq: Tensor, dk: Tensor, dv: Tensor,
                 dropout_p: float, softmax_scale: float, causal: bool) -> None:
        pass

    return torch.ops.arinar_flash_standin


def test_flash_attn_kernels_are_counted_like_sdpa(monkeypatch, flash_attn_standins):
    """The same sizes as the test above in flash-attn's layout (5 queries, 3 heads: a layout mix-up
    changes the count), forward and backward."""
    ops = flash_attn_standins
    formulas = flops.flash_attn_formulas
    monkeypatch.setattr(flops, "flash_attn_formulas", lambda namespace: formulas(ops))
    q, k, v = torch.randn(2, 5, 3, 8), torch.randn(2, 7, 3, 8), torch.randn(2, 7, 3, 8)
    product = 2 * (2 * 3) * 5 * 7 * 8
    forward, out = flops.count_flops(ops._flash_attn_forward, q, k, v, 0.0, 0.125, False)
    assert forward == 2 * product
    grads = [torch.empty_like(t) for t in (q, k, v)]
    backward, _ = flops.count_flops(ops._flash_attn_backward, out, q, k, v, out, *grads, 0.0, 0.125, False)
    assert backward == 5 * product
    assert formulas(torch.ops.no_such_namespace) == {}  # no flash-attn: nothing added


def masked_step_inputs():
    """A tiny MAR in training mode, a batch of 4 and a fixed mask of 12 of its 16 tokens."""
    torch.manual_seed(0)
    model = randomize_(tiny_mar(), std=0.1).train()
    latents, labels = torch.randn(4, 16, 4, 4), torch.randint(0, 10, (4,))
    mask = torch.zeros(4, 16, dtype=torch.bool)
    mask[:, :12] = True
    return model, latents, labels, mask


def test_training_step_count_is_close_to_a_measured_backward():
    """3x the forward against FlopCounterMode on a real forward + backward (same mask)."""
    model, latents, labels, mask = masked_step_inputs()
    measured, _ = flops.count_flops(lambda: model(latents, labels, mask=mask).backward())
    estimate = flops.training_step_flops(lambda: model(latents, labels, mask=mask), torch.device("cpu"), draws=1)
    assert estimate == pytest.approx(measured, rel=0.05)


def test_training_step_count_leaves_rng_and_gradients_alone():
    torch.manual_seed(0)
    model = randomize_(tiny_mar(), std=0.1).train()
    latents, labels = torch.randn(4, 16, 4, 4), torch.randint(0, 10, (4,))
    torch.manual_seed(1)
    flops.training_step_flops(lambda: model(latents, labels), torch.device("cpu"))
    after = torch.rand(3)
    torch.manual_seed(1)
    assert torch.equal(after, torch.rand(3))
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name, kind, tflops", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.4),       # SXM
    ("NVIDIA H100 PCIe", "bf16", 756.5),
    ("NVIDIA H100 NVL", "fp16", 835.5),
    ("NVIDIA H200", "bf16", 989.4),
    ("NVIDIA H200 NVL", "bf16", 835.5),
    ("NVIDIA A100-SXM4-80GB", "tf32", 156.0),
    ("NVIDIA A100 80GB PCIe", "bf16", 312.0),
    ("NVIDIA A10", "bf16", 125.0),                   # not an A100
    ("NVIDIA L40S", "bf16", 362.05),
    ("NVIDIA L40", "bf16", 181.05),                  # not an L40S
    ("NVIDIA GeForce RTX 4090", "bf16", 165.2),
    ("Tesla V100-SXM2-32GB", "fp16", 125.0),
    ("Tesla V100-PCIE-16GB", "fp16", 112.0),
    ("Tesla V100-SXM2-32GB", "bf16", None),         # no bf16 tensor cores: no MFU rather than a wrong one
    ("NVIDIA Graphics Device", "bf16", None),
])
def test_peak_by_device_name(name, kind, tflops):
    peak = flops.peak_for_name(name, kind)
    assert peak == (None if tflops is None else pytest.approx(tflops * 1e12))


def test_no_peak_and_no_mfu_on_cpu():
    assert flops.peak_flops("cpu", "bf16") is None
    assert flops.mfu(1e12, 1.0, None) is None
    assert flops.mfu(3e12, 2.0, 1e12) == pytest.approx(1.5)


class Writer:
    def __init__(self):
        self.scalars = {}

    def add_scalar(self, tag, value, step):
        self.scalars.setdefault(tag, []).append(value)


def train(peak, monkeypatch, caplog):
    """Two steps of train_one_epoch on a tiny model with `peak` pretended for the CPU."""
    monkeypatch.setattr(flops, "peak_flops", lambda device, precision: peak)
    torch.manual_seed(0)
    model = randomize_(tiny_mar(), std=0.1)
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(4, 16, 4, 4, generator=gen), torch.randint(0, 10, (4,), generator=gen)) for _ in range(2)]
    train_config = TrainConfig(grad_clip=0.0, lr=0.1, min_lr=0.0, warmup_epochs=0, epochs=1, precision="fp32",
                               log_freq=2)
    writer = Writer()
    torch.manual_seed(2)
    with caplog.at_level(logging.INFO, logger="engine_mar"):
        train_one_epoch(model, PixelTokenizer(img_channels=16, levels=None), data,
                        torch.optim.SGD(model.parameters(), lr=0.1), torch.amp.GradScaler("cpu", enabled=False),
                        EMA(model, 0.9), TrainState(), train_config, len(data), writer=writer)
    lines = [r.getMessage() for r in caplog.records if "images/s" in r.getMessage()]
    caplog.clear()
    return model, lines, writer.scalars


def test_training_log_shows_mfu_when_the_peak_is_known(monkeypatch, caplog):
    plain, plain_lines, plain_scalars = train(None, monkeypatch, caplog)
    assert "MFU" not in plain_lines[0] and "train/mfu" not in plain_scalars
    model, lines, scalars = train(1e12, monkeypatch, caplog)
    assert len(lines) == 1 and lines[0].endswith("%") and "images/s  MFU " in lines[0]
    # MFU / (images/s) = FLOPs per image / peak, and the FLOPs per step are about 3 forwards of 4 images
    forward, _ = flops.count_flops(lambda: model(torch.randn(4, 16, 4, 4), torch.randint(0, 10, (4,))))
    ratio = scalars["train/mfu"][0] / scalars["train/images_per_s"][0]
    assert ratio == pytest.approx(3 * forward / 4 / 1e12, rel=0.25)
    # counting the FLOPs drew nothing from the training run's random stream
    for a, b in zip(model.parameters(), plain.parameters()):
        assert torch.equal(a, b)


def test_count_agrees_with_flop_counter_mode():
    """The lean counter against torch's own FlopCounterMode on a whole training step."""
    from torch.utils.flop_counter import FlopCounterMode
    model, latents, labels, mask = masked_step_inputs()
    ours, _ = flops.count_flops(lambda: model(latents, labels, mask=mask).backward())
    with FlopCounterMode(display=False, custom_mapping=flops.CPU_ATTENTION) as counter:
        model(latents, labels, mask=mask).backward()
    assert ours == counter.get_total_flops() > 0


def test_attention_formulas_read_the_value_head_dim_apart_from_the_query_one(monkeypatch, flash_attn_standins):
    """q, k with head dim 8 and v with 4 (flash-attn's layout [b, s, h, d]): q k^T costs d, scores v costs
    d_v; backward recomputes q k^T (d), then dV (d_v), dScores (d_v), dQ (d), dK (d).
    Bugs: the value's head dim taken as the query's, or d and d_v swapped in the backward count."""
    ops = flash_attn_standins
    formulas = flops.flash_attn_formulas
    monkeypatch.setattr(flops, "flash_attn_formulas", lambda namespace: formulas(ops))
    q, k, v = torch.randn(2, 5, 3, 8), torch.randn(2, 7, 3, 8), torch.randn(2, 7, 3, 4)
    scores = 2 * (2 * 3) * 5 * 7  # 2 FLOPs x batch x heads x queries x keys, per unit of head dim
    forward, out = flops.count_flops(ops._flash_attn_forward, q, k, v, 0.0, 0.125, False)
    assert forward == scores * (8 + 4)
    grads = [torch.empty_like(t) for t in (q, k, v)]
    backward, _ = flops.count_flops(ops._flash_attn_backward, out, q, k, v, out, *grads, 0.0, 0.125, False)
    assert backward == scores * (3 * 8 + 2 * 4)


def test_fp32_runs_are_measured_against_tf32_when_torch_may_use_it(monkeypatch):
    """--precision fp32 with torch.set_float32_matmul_precision("high"/"medium") runs its matmuls on TF32
    tensor cores: the H100's TF32 peak (494.7 TFLOP/s); "highest" keeps true FP32 (66.9).
    Bug: the comparison inverted (the TF32 peak for "highest", FP32 otherwise)."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert flops.peak_flops("cuda", "fp32") == pytest.approx(494.7e12)
        torch.set_float32_matmul_precision("medium")  # any setting but "highest" (bug caught: only "high")
        assert flops.peak_flops("cuda", "fp32") == pytest.approx(494.7e12)
        assert flops.peak_flops("cuda", "bf16") == pytest.approx(989.4e12)
        torch.set_float32_matmul_precision("highest")
        assert flops.peak_flops("cuda", "fp32") == pytest.approx(66.9e12)
    finally:
        torch.set_float32_matmul_precision(before)


def test_human_units_switch_at_exactly_one_unit():
    """Bug: `>` for `>=`: exactly 1e12 FLOP printed as "1e+03 GFLOP"."""
    assert flops.human(1e12) == "1 TFLOP"
    assert flops.human(1e3) == "1 kFLOP"
    assert flops.human(13.1e12) == "13.1 TFLOP"
    assert flops.human(520e9) == "520 GFLOP"
    assert flops.human(999.0) == "999 FLOP"


def test_no_mfu_for_a_zero_length_window():
    """A window timed at 0 s (a coarse clock) has no MFU. Bug: `< 0` for `<= 0` (ZeroDivisionError mid-run)."""
    assert flops.mfu(1e12, 0.0, 1e12) is None

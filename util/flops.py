"""Model FLOPs of any callable, and the dense peak of the GPU it runs on: MFU for logs and benchmarks.

Counting uses the formulas of torch.utils.flop_counter.FlopCounterMode: the matmuls, convolutions
and attention kernels a call dispatches, whatever the model or head (element-wise work is not
counted, as is usual for MFU). Peaks are the vendors' dense (no structured sparsity) tensor-core
figures; an unknown device, or a CPU, has none and so no MFU.
"""
import re

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

aten = torch.ops.aten


def _attention_flops(q, k, v, *args, out_shape=None, **kwargs):
    """q k^T and (scores) v: 2 multiply-adds per element of each, as torch counts its CUDA kernels."""
    b, h, s_q, d = q
    s_k, d_v = k[2], v[3]
    return 2 * b * h * s_q * s_k * (d + d_v)


def _attention_backward_flops(grad_out, q, k, v, *args, out_shape=None, **kwargs):
    """The scores recomputed, then the gradients of v, scores, q and k: 5 products of the forward's size."""
    b, h, s_q, d = q
    s_k, d_v = k[2], v[3]
    return 2 * b * h * s_q * s_k * (3 * d + 2 * d_v)


# torch registers the CUDA attention kernels only; on CPU, SDPA runs this one (counted as they are)
CPU_ATTENTION = {aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops,
                 aten._scaled_dot_product_flash_attention_for_cpu_backward: _attention_backward_flops}


def heads_second(shape):
    """[b, s, h, d] (flash-attn's layout) -> [b, h, s, d] (SDPA's, which the formulas read)."""
    b, s, h, d = shape
    return b, h, s, d


def flash_attn_formulas(ops):
    """Formulas for flash-attn's kernels, which it registers as torch ops (namespace `ops`, e.g.
    torch.ops.flash_attn) from version 2.6 on: _flash_attn_forward(q, k, v, ...) and
    _flash_attn_backward(dout, q, k, v, ...), tensors [b, s, h, d]. Counted as SDPA's are; older
    versions call their extension directly, out of a counter's sight. {} when the ops are absent."""
    try:
        forward, backward = ops._flash_attn_forward, ops._flash_attn_backward
    except (AttributeError, RuntimeError):
        return {}
    return {forward: lambda q, k, v, *args, **kwargs: _attention_flops(*map(heads_second, (q, k, v))),
            backward: lambda grad_out, q, k, v, *args, **kwargs: _attention_backward_flops(
                grad_out, *map(heads_second, (q, k, v)))}


class _Counter(TorchDispatchMode):
    """FlopCounterMode's formulas without its per-module bookkeeping, which costs ~8x more per op:
    a sampling run dispatches hundreds of thousands of small ops (MAR's diffusion head: 100 per
    token per outer step)."""

    def __init__(self):
        super().__init__()
        custom = {**CPU_ATTENTION, **flash_attn_formulas(torch.ops.flash_attn)}
        self.formulas = FlopCounterMode(display=False, custom_mapping=custom).flop_registry
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = self.formulas.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def count_flops(fn, *args, **kwargs):
    """(FLOPs, result) of one call fn(*args, **kwargs), counted as it runs.

    Replays of captured CUDA graphs bypass the dispatcher and count nothing: count an eager call.
    """
    with _Counter() as counter:
        out = fn(*args, **kwargs)
    return counter.total, out


def training_step_flops(loss_fn, device, draws=4):
    """Model FLOPs of one training step (forward + backward) of `loss_fn() -> loss`: 3x its forward.

    Why 3x a forward instead of counting a real backward: each matmul's backward is two matmuls
    of its size (the input's and the weight's gradient), the convention of MFU (Kaplan et al. 2020;
    PaLM, Chowdhery et al. 2022, appendix B); a real backward would build gradients that the
    caller's optimizer, GradScaler or DDP hooks would see, and with --grad_checkpointing would also
    count the recomputed forward (hardware, not model, FLOPs). The forward runs without grad, on
    a forked RNG (the training run draws the same masks as without it), `draws` times averaged:
    a random mask ratio makes the head's share of the work vary from step to step.
    """
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        total = sum(count_flops(loss_fn)[0] for _ in range(draws))
    return 3 * total / draws


# Dense peak TFLOP/s by device name (torch.cuda.get_device_name), most specific pattern first.
# Vendor figures without sparsity (datasheets print "x | 2x*" with * = with sparsity; half is taken):
#   H100 SXM5 / PCIe: NVIDIA H100 whitepaper, table "H100 SXM5 / H100 PCIe": BF16/FP16 989.4 / 756.5,
#     TF32 494.7 / 378.0, FP32 66.9 / 51.2; H100 NVL datasheet: BF16 1,671*, TF32 835*, FP32 60.
#   H200 SXM / NVL: NVIDIA H200 datasheet: BF16/FP16 1,979* / 1,671*, TF32 989* / 835*, FP32 67 / 60.
#   A100 (SXM and PCIe): NVIDIA A100 datasheet: BF16/FP16 312 (624*), TF32 156 (312*), FP32 19.5.
#   L40S: NVIDIA L40S datasheet: BF16/FP16 362.05 | 733*, TF32 183 | 366*, FP32 91.6.
#   L40: NVIDIA L40 datasheet: BF16/FP16 181.05 | 362.1*, TF32 90.5 | 181*, FP32 90.5.
#   A10: NVIDIA A10 datasheet: BF16/FP16 125 | 250*, TF32 62.5 | 125*, FP32 31.2.
#   RTX 4090: NVIDIA Ada (AD102) whitepaper, appendix: FP16/BF16 tensor with FP32 accumulate 165.2,
#     TF32 82.6, FP32 82.6 (PyTorch accumulates in FP32, so the FP16-accumulate 330.3 does not apply).
#   RTX 3090: NVIDIA Ampere GA102 whitepaper: FP16/BF16 tensor with FP32 accumulate 71, TF32 35.6, FP32 35.6.
#   V100 SXM2 / PCIe: NVIDIA V100 datasheet: tensor (FP16) 125 / 112, FP32 15.7 / 14 (no BF16, no TF32).
#   T4: NVIDIA T4 datasheet: FP16 tensor 65, FP32 8.1 (no BF16, no TF32).
#   MI300X: AMD Instinct MI300X datasheet: BF16/FP16 1,307.4 (2,614.9 with sparsity), TF32 653.7, FP32 163.4.
PEAK_TFLOPS = (
    (r"H100.*PCIe", {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.2}),
    (r"H[12]00.*NVL", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (r"H100|H200", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    (r"L40S", {"bf16": 362.05, "fp16": 362.05, "tf32": 183.0, "fp32": 91.6}),
    (r"\bL40\b", {"bf16": 181.05, "fp16": 181.05, "tf32": 90.5, "fp32": 90.5}),
    (r"\bA10\b", {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    (r"RTX 4090", {"bf16": 165.2, "fp16": 165.2, "tf32": 82.6, "fp32": 82.6}),
    (r"RTX 3090", {"bf16": 71.0, "fp16": 71.0, "tf32": 35.6, "fp32": 35.6}),
    (r"V100.*SXM", {"fp16": 125.0, "fp32": 15.7}),
    (r"V100", {"fp16": 112.0, "fp32": 14.0}),
    (r"\bT4\b", {"fp16": 65.0, "fp32": 8.1}),
    (r"MI300X", {"bf16": 1307.4, "fp16": 1307.4, "tf32": 653.7, "fp32": 163.4}),
)


def peak_for_name(name, kind):
    """Dense peak FLOP/s of the device called `name` for kind bf16 / fp16 / tf32 / fp32; None if unknown."""
    for pattern, peaks in PEAK_TFLOPS:
        if re.search(pattern, name):
            return peaks[kind] * 1e12 if kind in peaks else None
    return None


def peak_flops(device, precision):
    """Dense peak FLOP/s of `device` for the run's --precision (fp32 / bf16 / fp16); None on CPU or an
    unknown GPU. fp32 matmuls use TF32 tensor cores only when torch is allowed to."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    kind = precision
    if precision == "fp32" and torch.get_float32_matmul_precision() != "highest":
        kind = "tf32"
    return peak_for_name(torch.cuda.get_device_name(device), kind)


def human(flops):
    """FLOPs for a log line: 13.1 TFLOP, 520 GFLOP, 37.1 MFLOP."""
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if flops >= scale:
            return f"{flops / scale:.3g} {unit}FLOP"
    return f"{flops:.3g} FLOP"


def mfu(flops, seconds, peak):
    """Achieved / peak FLOP/s, a fraction; None when the peak is unknown."""
    if peak is None or seconds <= 0:
        return None
    return flops / seconds / peak

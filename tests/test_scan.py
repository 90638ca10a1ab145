"""The selective scan (models/scan.py): the plain-PyTorch scan against a naive float64 loop, the state
carried across chunks, float32 math for low-precision inputs, and mamba-ssm's kernel where it exists."""
import math

import numpy as np
import pytest
import torch

import models.scan as scan
from models.scan import selective_scan, selective_scan_kernel, selective_scan_ref


def inputs(b=2, d=3, n=4, length=7, dtype=torch.float64, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)

    return dict(u=r(b, d, length), delta=r(b, d, length), A=-torch.exp(r(d, n)), B=r(b, n, length),
                C=r(b, n, length), D=r(d), z=r(b, d, length), delta_bias=r(d), initial_state=r(b, d, n))


def naive(u, delta, A, B, C, D, z, delta_bias, initial_state):
    """The recurrence element by element in Python floats (numpy float64), written from the Mamba paper."""
    u, delta, A, B, C, D, z, bias, h0 = (np.asarray(t, dtype=np.float64) for t in
                                         (u, delta, A, B, C, D, z, delta_bias, initial_state))
    b, d, length = u.shape
    n = A.shape[1]
    out, last = np.zeros((b, d, length)), np.zeros((b, d, n))
    for i in range(b):
        for c in range(d):
            h = h0[i, c].copy()
            for t in range(length):
                dt = math.log1p(math.exp(delta[i, c, t] + bias[c]))  # softplus
                for s in range(n):
                    h[s] = math.exp(dt * A[c, s]) * h[s] + dt * B[i, s, t] * u[i, c, t]
                y = sum(C[i, s, t] * h[s] for s in range(n)) + D[c] * u[i, c, t]
                out[i, c, t] = y * z[i, c, t] / (1 + math.exp(-z[i, c, t]))  # y * silu(z)
            last[i, c] = h
    return out, last


@pytest.mark.parametrize("cap", [1, 3 * 2 * 3 * 4, 1 << 26])
def test_reference_equals_a_naive_loop_in_float64(monkeypatch, cap):
    """Decays and drives made one step, three steps (of seven: a short last chunk) or all steps at a
    time: each the naive loop, and bit for bit the same as one another."""
    x = inputs()
    whole, whole_last = selective_scan_ref(**x, delta_softplus=True, return_last_state=True)
    monkeypatch.setattr(scan, "MAX_SCAN_VALUES", cap)
    out, last = selective_scan_ref(**x, delta_softplus=True, return_last_state=True)
    want_out, want_last = naive(**x)
    assert out.dtype == last.dtype == torch.float64  # never narrowed
    np.testing.assert_allclose(out.numpy(), want_out, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(last.numpy(), want_last, rtol=1e-12, atol=1e-12)
    assert torch.equal(out, whole) and torch.equal(last, whole_last)


def test_zero_initial_state_is_the_default():
    x = inputs()
    x["initial_state"] = torch.zeros_like(x["initial_state"])
    want_out, want_last = naive(**x)
    out, last = selective_scan_ref(**{**x, "initial_state": None}, delta_softplus=True, return_last_state=True)
    np.testing.assert_allclose(out.numpy(), want_out, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(last.numpy(), want_last, rtol=1e-12, atol=1e-12)


def split(x, at):
    seq = ("u", "delta", "B", "C", "z")
    return ({k: (v[..., :at] if k in seq else v) for k, v in x.items()},
            {k: (v[..., at:] if k in seq else v) for k, v in x.items()})


@pytest.mark.parametrize("at", [1, 3, 6])
def test_chunks_with_the_carried_state_equal_the_whole_sequence(at):
    """What the sampler does scale by scale: the state after one chunk starts the next."""
    x = inputs()
    whole, whole_last = selective_scan_ref(**x, delta_softplus=True, return_last_state=True)
    first, second = split(x, at)
    out1, state = selective_scan_ref(**first, delta_softplus=True, return_last_state=True)
    out2, last = selective_scan_ref(**{**second, "initial_state": state}, delta_softplus=True, return_last_state=True)
    torch.testing.assert_close(torch.cat([out1, out2], dim=-1), whole, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(last, whole_last, rtol=1e-13, atol=1e-13)
    # and dropping the carried state is visible (the test can fail)
    fresh = selective_scan_ref(**{**second, "initial_state": None}, delta_softplus=True)
    assert not torch.allclose(fresh, whole[..., at:], atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_are_scanned_in_float32(dtype):
    """Bug (float16): the math dtype promoted from float16 rather than float32, so fp16 inputs scan in fp16."""
    x = {k: v.to(dtype) for k, v in inputs(length=40).items()}
    out, last = selective_scan_ref(**x, delta_softplus=True, return_last_state=True)
    wide, wide_last = selective_scan_ref(**{k: v.float() for k, v in x.items()}, delta_softplus=True,
                                         return_last_state=True)
    assert out.dtype == dtype and last.dtype == torch.float32
    assert torch.equal(out, wide.to(dtype)) and torch.equal(last, wide_last)


def kernel_standin(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False):
    """mamba-ssm's selective_scan_fn as documented: no initial state, out in u's dtype, state float32."""
    return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


def test_cpu_and_float64_never_take_the_kernel(monkeypatch):
    monkeypatch.setattr(scan, "mamba_selective_scan", lambda *a, **k: pytest.fail("kernel called"))
    x = inputs()
    selective_scan(**x, delta_softplus=True)
    assert not scan.kernel_usable(x["u"], x["A"])


@pytest.mark.skipif(scan.mamba_selective_scan is None or not torch.cuda.is_available(),
                    reason="needs mamba-ssm and a CUDA device")
@pytest.mark.parametrize("with_state", [False, True])
def test_mamba_kernel_agrees_with_the_reference(with_state):
    x = inputs(b=2, d=64, n=16, length=300, dtype=torch.float32, device="cuda")
    if not with_state:
        x["initial_state"] = None
    assert scan.kernel_usable(x["u"], x["A"])
    out, last = selective_scan(**x, delta_softplus=True, return_last_state=True)
    want, want_last = selective_scan_ref(**x, delta_softplus=True, return_last_state=True)
    torch.testing.assert_close(out, want, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(last, want_last, rtol=1e-3, atol=1e-3)


def test_carried_readout_stays_float32_under_autocast():
    """The kernel path runs inside the sampler's bf16 autocast; the initial state's readout (M-VAR's
    dependency across scales) is scan math and must not drop to bf16 (an einsum there did)."""
    gen = torch.Generator().manual_seed(0)
    b, d, length, n = 2, 3, 5, 4
    dt, A = torch.rand(b, d, length, generator=gen), -torch.rand(d, n, generator=gen)
    C, h0 = torch.randn(b, n, length, generator=gen), torch.randn(b, d, n, generator=gen)
    want = [t.double() for t in (dt, A, C, h0)]
    want = torch.stack([(want[2][:, None, :, t] * want[3] * torch.exp(want[0][:, :, :t + 1].sum(-1, keepdim=True)
                                                                     * want[1])).sum(-1) for t in range(length)], -1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        readout, _ = scan.carried_readout(dt, A, C, h0)
    assert readout.dtype == torch.float32
    torch.testing.assert_close(readout.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cap", [1, 2 * 3 * 4 * 3, 1 << 26])
def test_an_initial_state_reaches_the_kernel_through_linearity(monkeypatch, cap):
    """The kernel path's bookkeeping, with a stand-in of the kernel's signature (runs on CPU). The
    initial state's readout goes one step, three steps (of seven: a short last chunk) or all steps at a
    time: the same as the reference scan from that state with nothing driving it (u = 0)."""
    monkeypatch.setattr(scan, "MAX_CARRIED_VALUES", cap)
    monkeypatch.setattr(scan, "mamba_selective_scan", kernel_standin)
    x = inputs()
    out, last = selective_scan_kernel(**x, delta_softplus=True, return_last_state=True)
    want, want_last = selective_scan_ref(**x, delta_softplus=True, return_last_state=True)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(last, want_last, rtol=1e-12, atol=1e-12)
    dt = scan.step_sizes(x["delta"], x["delta_bias"], True, torch.float64)
    readout, carried = scan.carried_readout(dt, x["A"], x["C"], x["initial_state"])
    free = selective_scan_ref(torch.zeros_like(x["u"]), x["delta"], x["A"], x["B"], x["C"], delta_bias=x["delta_bias"],
                              delta_softplus=True, return_last_state=True, initial_state=x["initial_state"])
    torch.testing.assert_close(readout, free[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(carried, free[1], rtol=1e-12, atol=1e-12)


def test_without_softplus_or_bias_the_step_sizes_are_delta_itself():
    """Bug: softplus applied whatever delta_softplus says (or the bias required): mamba-ssm's signature lets a
    caller pass ready step sizes. dt = softplus(raw) given as delta with delta_softplus=False and no bias must
    equal the naive loop on raw with softplus and a zero bias."""
    x = inputs()
    dt = torch.nn.functional.softplus(x["delta"])
    out, last = selective_scan_ref(**{**x, "delta": dt, "delta_bias": None}, delta_softplus=False,
                                   return_last_state=True)
    want_out, want_last = naive(**{**x, "delta_bias": torch.zeros_like(x["delta_bias"])})
    np.testing.assert_allclose(out.numpy(), want_out, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(last.numpy(), want_last, rtol=1e-12, atol=1e-12)


class FakeTensor:
    """What kernel_usable reads of a tensor: its dtype and whether it lives on CUDA (runs on CPU)."""

    def __init__(self, dtype, is_cuda=True):
        self.dtype, self.is_cuda = dtype, is_cuda


def test_kernel_refuses_any_float64_input_not_only_u(monkeypatch):
    """Bug: only u's dtype checked, so a float64 A, B, C or initial state on CUDA reaches mamba-ssm's kernel
    (no float64 support) instead of the exact plain scan."""
    monkeypatch.setattr(scan, "mamba_selective_scan", kernel_standin)
    f32, f64 = FakeTensor(torch.float32), FakeTensor(torch.float64)
    assert scan.kernel_usable(f32, f32, f32, f32, f32, None)
    assert scan.kernel_usable(FakeTensor(torch.bfloat16), f32, f32, f32, f32, f32)
    for i in range(5):  # delta, A, B, C, initial_state in turn
        others = [f32] * 5
        others[i] = f64
        assert not scan.kernel_usable(f32, *others), i
    assert not scan.kernel_usable(f64, f32, f32, f32, f32, None)
    assert not scan.kernel_usable(FakeTensor(torch.float32, is_cuda=False), f32, f32, f32, f32, None)


@pytest.mark.parametrize("softplus", [True, False])
def test_the_kernel_path_without_an_initial_state_passes_every_argument(monkeypatch, softplus):
    """Bugs: the kernel called from a zero state with D, z, delta_bias or delta_softplus dropped or fixed (the
    stand-in test above only takes the carried-state branch). Against the naive float64 loop from h_0 = 0;
    without softplus the ready step sizes softplus(delta + bias) are given as delta, with no bias."""
    monkeypatch.setattr(scan, "mamba_selective_scan", kernel_standin)
    x = inputs()
    zero = {**x, "initial_state": torch.zeros_like(x["initial_state"])}
    want_out, want_last = naive(**zero)
    if softplus:
        given = {**x, "initial_state": None}
    else:
        dt = torch.nn.functional.softplus(x["delta"] + x["delta_bias"][:, None])
        given = {**x, "delta": dt, "delta_bias": None, "initial_state": None}
    out, last = selective_scan_kernel(**given, delta_softplus=softplus, return_last_state=True)
    np.testing.assert_allclose(out.numpy(), want_out, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(last.numpy(), want_last, rtol=1e-12, atol=1e-12)
    assert not isinstance(selective_scan_kernel(**given, delta_softplus=softplus), tuple)


def test_an_empty_sequence_gives_an_empty_output_and_keeps_the_state():
    """Bug: the scan stacking its per-step outputs with no steps (torch.stack of nothing raises): a zero-length
    chunk of a sequence must give out [b, d, 0] in u's dtype and hand the initial state on unchanged."""
    x = {k: (v[..., :0] if k in ("u", "delta", "B", "C", "z") else v) for k, v in inputs().items()}
    out, last = selective_scan_ref(**x, delta_softplus=True, return_last_state=True)
    assert out.shape == (2, 3, 0) and out.dtype == torch.float64
    assert torch.equal(last, x["initial_state"])


@pytest.mark.parametrize("wide", ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"])
def test_any_float64_input_makes_the_math_float64(wide):
    """Bug: the math dtype read from some inputs only (e.g. not the initial state, D, z or the step bias), so
    one float64 input among float32 ones is narrowed and the scan runs in float32. The last state must be the
    naive float64 loop's to 1e-12, and out that loop's rounded once to u's dtype."""
    x = inputs()
    x = {k: (v if k == wide else v.float()) for k, v in x.items()}
    out, last = selective_scan_ref(**x, delta_softplus=True, return_last_state=True)
    want_out, want_last = naive(**{k: v.double() for k, v in x.items()})
    assert last.dtype == torch.float64 and out.dtype == x["u"].dtype
    np.testing.assert_allclose(last.numpy(), want_last, rtol=1e-12, atol=1e-12)
    if wide == "u":
        np.testing.assert_allclose(out.numpy(), want_out, rtol=1e-12, atol=1e-12)
    else:
        assert torch.equal(out, torch.from_numpy(want_out).float())


def test_selective_scan_asks_about_the_initial_state_before_taking_the_kernel(monkeypatch):
    """Bug: selective_scan's dispatch leaving the initial state out of kernel_usable, so a float64 state with
    float32 inputs on CUDA goes to the float32-only kernel. u is made to look like a CUDA tensor (runs on CPU);
    a float32 state takes the kernel (the check has power), a float64 one the exact scan."""
    calls = []

    def counting_kernel(*args, **kwargs):
        calls.append(1)
        return kernel_standin(*args, **kwargs)

    usable = scan.kernel_usable
    monkeypatch.setattr(scan, "kernel_usable", lambda u, *others: usable(FakeTensor(u.dtype), *others))
    monkeypatch.setattr(scan, "mamba_selective_scan", counting_kernel)
    x = {k: v.float() for k, v in inputs().items()}
    selective_scan(**x, delta_softplus=True)
    assert len(calls) == 1  # the kernel path, the state's readout added after
    calls.clear()
    out, last = selective_scan(**{**x, "initial_state": x["initial_state"].double()}, delta_softplus=True,
                               return_last_state=True)
    assert calls == [] and last.dtype == torch.float64
    for wide in ("D", "z", "delta_bias"):  # the kernel would narrow these too
        out, last = selective_scan(**{**x, wide: x[wide].double()}, delta_softplus=True, return_last_state=True)
        assert calls == [] and last.dtype == torch.float64, wide

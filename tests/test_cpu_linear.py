"""The few-row CPU linear (models/cpu_linear.py) against F.linear: every tile shape and remainder,
the chunked wide-input path, the fallbacks, and its use inside torch.compile with dynamic shapes."""
import pytest
import torch
import torch.nn.functional as F

from models.compiled_sampling import cxx_compiler
from models.cpu_linear import cpu_supports_kernel, load_small_linear

pytestmark = pytest.mark.skipif(cxx_compiler() is None or not cpu_supports_kernel(),
                                reason="the kernel needs a C++ compiler and an AVX2 CPU")


@pytest.fixture(scope="module")
def small_linear():
    return load_small_linear()


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 16, 97])
@pytest.mark.parametrize("fan_in, fan_out", [(8, 4), (24, 12), (768, 2304), (3072, 768), (2056, 20)])
def test_matches_f_linear(small_linear, rows, fan_in, fan_out):
    """Rows cover full tiles of 3 and remainders of 1 and 2; 3072 and 2056 inputs go in chunks of
    768 (2056 leaves a short last chunk)."""
    g = torch.Generator().manual_seed(rows * 7 + fan_in)
    x = torch.randn(rows, fan_in, generator=g)
    w = torch.randn(fan_out, fan_in, generator=g) / fan_in ** 0.5
    b = torch.randn(fan_out, generator=g)
    expected = F.linear(x.double(), w.double(), b.double()).float()
    torch.testing.assert_close(small_linear(x, w, b), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(small_linear(x, w, None), expected - b, rtol=1e-5, atol=1e-5)


def test_keeps_leading_dims_and_reads_strided_inputs(small_linear):
    x = torch.randn(6, 1, 80).transpose(0, 1)  # [1, 6, 80], not contiguous
    w, b = torch.randn(44, 80), torch.randn(44)
    out = small_linear(x, w, b)
    assert out.shape == (1, 6, 44)
    torch.testing.assert_close(out, F.linear(x, w, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fan_in, fan_out, dtype", [(12, 8, torch.float32), (16, 6, torch.float32),
                                                     (16, 8, torch.float64)])
def test_falls_back_to_f_linear(small_linear, fan_in, fan_out, dtype):
    """Inputs not a multiple of 8 wide, outputs not a multiple of 4, other dtypes: at::linear."""
    x, w, b = (torch.randn(*shape, dtype=dtype) for shape in [(5, fan_in), (fan_out, fan_in), (fan_out,)])
    torch.testing.assert_close(small_linear(x, w, b), F.linear(x, w, b))


def test_refuses_autograd(small_linear):
    w = torch.randn(8, 16, requires_grad=True)
    with pytest.raises(RuntimeError, match="no backward"):
        small_linear(torch.randn(3, 16), w, None)
    with torch.no_grad():
        torch.testing.assert_close(small_linear(torch.ones(3, 16), w, None), F.linear(torch.ones(3, 16), w),
                                   rtol=1e-5, atol=1e-5)


def test_works_inside_torch_compile_with_dynamic_rows(small_linear):
    w, b = torch.randn(32, 64), torch.randn(32)
    fn = torch.compile(lambda x: torch.relu(small_linear(x * 2, w, b)), dynamic=True)
    for rows in (3, 16, 41):
        x = torch.randn(rows, 64)
        torch.testing.assert_close(fn(x), torch.relu(F.linear(x * 2, w, b)), rtol=1e-5, atol=1e-5)

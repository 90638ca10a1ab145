"""A CPU matmul for the inner loop's few-row linears: `torch.ops.arinar.small_linear(x, weight, bias)`.

The inner loop multiplies 16-112 rows by each 768-wide weight per feature step, 28 MB of fp32
weights in all, more than this kind of CPU keeps in cache. There MKL's GEMM runs at a third to two
thirds of its large-matrix speed (it repacks the weight panels on every call). This kernel reads
each weight once, straight from nn.Linear's [out, in] layout: 4 weight rows stay in L1 while every
input row passes by in tiles of 3, 12 AVX2 accumulators of dot products, the next 4 weight rows
prefetched meanwhile. It gives F.linear's values up to float rounding (another summation order).

Sampling only (no backward). Off the fast case (not fp32, in % 8 or out % 4 not 0) it calls
at::linear. JIT-built on first use with torch's extension builder (needs a C++ compiler and ninja,
~40 s once, cached under TORCH_EXTENSIONS_DIR); used by CompiledSampling when the CPU has AVX2 + FMA.
"""
import functools
import os
import shutil

import torch

SOURCE = r"""
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

namespace {

inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// One pass over a K range: y (+)= x . w^T, x [M, len] with row stride ldx, w [N, len] with row
// stride ldw (both already offset to the range's start); `accumulate` adds to y, else adds b.
struct Pass {
    const float* x; int64_t ldx;
    const float* w; int64_t ldw;
    const float* b; float* y; int64_t N, len; bool accumulate;
};

// y[m0:m0+RM, n0:n0+RN] for one pass; PREFETCH also fetches the next RN weight rows.
template <int RM, int RN, bool PREFETCH>
inline void tile(const Pass& p, int64_t m0, int64_t n0) {
    __m256 acc[RM][RN];
    for (int i = 0; i < RM; i++)
        for (int j = 0; j < RN; j++) acc[i][j] = _mm256_setzero_ps();
    for (int64_t k = 0; k < p.len; k += 8) {
        if (PREFETCH && (k & 15) == 0)  // one 64-byte line per weight row every other step
            for (int j = 0; j < RN; j++) _mm_prefetch((const char*)(p.w + (n0 + RN + j) * p.ldw + k), _MM_HINT_T0);
        __m256 wv[RN];
        for (int j = 0; j < RN; j++) wv[j] = _mm256_loadu_ps(p.w + (n0 + j) * p.ldw + k);
        for (int i = 0; i < RM; i++) {
            __m256 xv = _mm256_loadu_ps(p.x + (m0 + i) * p.ldx + k);
            for (int j = 0; j < RN; j++) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
        }
    }
    for (int i = 0; i < RM; i++)
        for (int j = 0; j < RN; j++) {
            float* out = p.y + (m0 + i) * p.N + n0 + j;
            *out = hsum(acc[i][j]) + (p.accumulate ? *out : p.b ? p.b[n0 + j] : 0.f);
        }
}

constexpr int RM = 3, RN = 4;
// Wider inputs go in chunks copied out contiguously: a chunk of all input rows then stays in L2,
// 4 weight rows' chunk in L1, and rows 3072 floats apart no longer share L1 sets (the fc2 input
// at 96 rows is 1.2 MB, and its rows alias every 4 KB).
constexpr int64_t K_CHUNK = 768;

void one_pass(const Pass& p, int64_t M) {
    const int64_t blocks = p.N / RN;
    at::parallel_for(0, blocks, 16, [&](int64_t lo, int64_t hi) {
        for (int64_t nb = lo; nb < hi; nb++) {
            const int64_t n0 = nb * RN;
            int64_t m0 = 0;
            if (M >= RM) {  // the first tile fetches the next weight rows
                if (nb + 1 < blocks) tile<RM, RN, true>(p, 0, n0);
                else tile<RM, RN, false>(p, 0, n0);
                m0 = RM;
            }
            for (; m0 + RM <= M; m0 += RM) tile<RM, RN, false>(p, m0, n0);
            if (M - m0 == 2) tile<2, RN, false>(p, m0, n0);
            else if (M - m0 == 1) tile<1, RN, false>(p, m0, n0);
        }
    });
}

at::Tensor small_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
    const int64_t K = x.size(-1), N = weight.size(0);
    // registered for CPU only, so the device needs no check
    const bool fast = x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat
        && (!bias.has_value() || bias->scalar_type() == at::kFloat) && weight.dim() == 2 && weight.size(1) == K
        && K % 8 == 0 && N % RN == 0;
    TORCH_CHECK(!(at::GradMode::is_enabled() && (x.requires_grad() || weight.requires_grad())),
                "arinar::small_linear is for sampling (it has no backward): call it under torch.no_grad()");
    if (!fast) return at::linear(x, weight, bias);
    const at::Tensor x2 = x.reshape({-1, K}).contiguous(), w = weight.contiguous();
    const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
    const int64_t M = x2.size(0);
    at::Tensor y = at::empty({M, N}, x.options());
    const int64_t chunk = K > 4 * K_CHUNK / 3 ? K_CHUNK : K;
    for (int64_t k0 = 0; k0 < K; k0 += chunk) {
        const int64_t len = std::min(chunk, K - k0);
        const at::Tensor xc = chunk == K ? x2 : x2.narrow(1, k0, len).contiguous();
        Pass p{xc.data_ptr<float>(), xc.stride(0), w.data_ptr<float>() + k0, K,
               b.defined() ? b.data_ptr<float>() : nullptr, y.data_ptr<float>(), N, len, k0 > 0};
        one_pass(p, M);
    }
    std::vector<int64_t> shape = x.sizes().vec();
    shape.back() = N;
    return y.view(shape);
}

}  // namespace

TORCH_LIBRARY(arinar, m) { m.def("small_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor"); }
TORCH_LIBRARY_IMPL(arinar, CPU, m) { m.impl("small_linear", &small_linear); }
"""


def cpu_supports_kernel():
    """AVX2 + FMA (torch reports AVX2 or an AVX-512 level on such x86 CPUs)."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512", "AVX512_BF16", "AVX512_VNNI")


@functools.cache
def load_small_linear():
    """Build (once per process; the build is cached on disk) and return torch.ops.arinar.small_linear."""
    from torch.utils.cpp_extension import load_inline

    _put_ninja_on_path()
    load_inline("arinar_cpu_linear", cpp_sources=[SOURCE], is_python_module=False,
                extra_cflags=["-O3", "-mavx2", "-mfma"])
    torch.library.register_fake("arinar::small_linear")(
        lambda x, weight, bias: x.new_empty((*x.shape[:-1], weight.shape[0])))
    return torch.ops.arinar.small_linear


def _put_ninja_on_path():
    """torch's builder runs `ninja` from PATH; pip's ninja lives in the venv's bin, which a venv
    python called by path (as `make` does) does not have on PATH."""
    if shutil.which("ninja"):
        return
    try:
        import ninja
    except ImportError:
        raise RuntimeError("building the few-row CPU linear needs ninja: pip install ninja") from None
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")

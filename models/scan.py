"""Mamba's selective scan (S6), in plain PyTorch, with mamba-ssm's CUDA kernel when it is importable.

For each channel d and state index n, with dt = softplus(delta + delta_bias) (if asked):
    h_t = exp(dt_t * A[d, n]) * h_{t-1} + dt_t * B_t[n] * u_t
    y_t = sum_n C_t[n] * h_t[n] + D[d] * u_t,   out_t = y_t * silu(z_t) (if z is given)
`selective_scan` takes mamba-ssm's `selective_scan_fn` arguments, u, delta, z [b, d, L], A [d, n],
B, C [b, n, L], D and delta_bias [d], plus `initial_state` [b, d, n] (h_0; zero if None), which a
sampler uses to carry the state from one chunk of the sequence to the next. The math runs in at
least float32 (float64 stays float64); `out` comes back in u's dtype, the last state in the math's.

mamba-ssm is optional (like flash-attn): used on CUDA for float32/16/bf16 inputs when installed;
its kernel starts from a zero state, so a given initial state is added through the scan's
linearity: its contribution at step t is C_t . (exp(sum_{s<=t} dt_s A) h_0).
"""
import torch
import torch.nn.functional as F

try:  # optional extra, see README
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as mamba_selective_scan
except ImportError:  # pragma: no cover - depends on the environment
    mamba_selective_scan = None


def math_dtype(*tensors):
    """float32, or float64 when any input is float64 (never narrowed)."""
    dtype = torch.float32
    for t in tensors:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def step_sizes(delta, delta_bias, delta_softplus, dtype):
    dt = delta.to(dtype)
    if delta_bias is not None:
        dt = dt + delta_bias.to(dtype)[:, None]
    return F.softplus(dt) if delta_softplus else dt


# most [steps, b, d, n] values the plain scan's decays and drives take at once (fp32: 256 MiB each): at
# mvar_base's size, the last 16x16 scale of batch 256 with CFG would make 3.2e9 of each in one go
MAX_SCAN_VALUES = 1 << 26


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, initial_state=None):
    """The scan in plain PyTorch: a loop over the sequence (exact, runs everywhere; see module doc).
    Decays and drives are made for a chunk of steps at a time (at most MAX_SCAN_VALUES each); every
    step's arithmetic is the same whatever the chunk, so the chunking never changes a bit."""
    dtype = math_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
    # steps lead (and are laid out first) so that each step's slice below is contiguous
    steps_first = lambda t: t.to(dtype).permute(2, 0, 1).contiguous()  # noqa: E731  [b, *, L] -> [L, b, *]
    dt = steps_first(step_sizes(delta, delta_bias, delta_softplus, dtype))      # [L, b, d]
    u_steps, B_steps, C_steps = steps_first(u), steps_first(B), steps_first(C)
    A = A.to(dtype)
    h = (torch.zeros(u.shape[0], u.shape[1], A.shape[1], dtype=dtype, device=u.device) if initial_state is None
         else initial_state.to(dtype))
    chunk = max(1, MAX_SCAN_VALUES // h.numel())
    ys = []
    for start in range(0, dt.shape[0], chunk):
        span = slice(start, start + chunk)
        decay = torch.exp(dt[span].unsqueeze(-1) * A)                                  # [c, b, d, n]
        drive = (dt[span] * u_steps[span]).unsqueeze(-1) * B_steps[span].unsqueeze(2)  # [c, b, d, n]
        readout = C_steps[span].unsqueeze(2)                                           # [c, b, 1, n]
        # unbind once: indexing step t inside the loop would make autograd add every step's gradient
        # into a zero tensor of the full size (quadratic in L)
        for decay_t, drive_t, readout_t in zip(decay.unbind(0), drive.unbind(0), readout.unbind(0)):
            h = decay_t * h + drive_t
            ys.append((h * readout_t).sum(-1))
    y = torch.stack(ys, dim=-1) if ys else u.new_zeros(u.shape, dtype=dtype)
    return finish(y, u, D, z, h, return_last_state)


def finish(y, u, D, z, last_state, return_last_state):
    """The skip term and the gate, in y's dtype; out in u's dtype."""
    if D is not None:
        y = y + D.to(y.dtype)[:, None] * u.to(y.dtype)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    out = y.to(u.dtype)
    return (out, last_state) if return_last_state else out


def kernel_usable(u, *others):
    # the kernel computes in float32: any input that makes the math float64 takes the plain scan
    return mamba_selective_scan is not None and u.is_cuda and math_dtype(u, *others) == torch.float32


# most [b, d, steps, n] values the kernel path's carried-state readout makes at once (fp32: 256 MiB); at
# mvar_base's size, 512 rows (batch 256 with CFG) of a 16x16 scale make 3.2e9 in one go
MAX_CARRIED_VALUES = 1 << 26


def carried_readout(dt, A, C, h0):
    """What an initial state h0 [b, d, n] adds to the scan: C_t . (exp(sum_{s<=t} dt_s A) h0) for every
    step, [b, d, L], and its part of the last state, [b, d, n]. dt [b, d, L], A [d, n], C [b, n, L], all
    in the math dtype. Steps go a chunk at a time (the decays are [b, d, chunk, n]), each chunk's sums
    continuing from the last; A <= 0 and dt >= 0 in a Mamba block, so the exponentials never overflow."""
    b, d, length = dt.shape
    chunk = max(1, MAX_CARRIED_VALUES // (b * d * A.shape[1]))
    log_decay, parts = torch.zeros_like(h0), []
    for start in range(0, length, chunk):
        steps = dt[:, :, start:start + chunk].unsqueeze(-1) * A[:, None, :]              # [b, d, c, n]
        cum = log_decay.unsqueeze(2) + torch.cumsum(steps, dim=2)
        # a product and a sum, not an einsum: autocast would run an einsum (a bmm) in bf16
        readout = C[:, :, start:start + chunk].transpose(1, 2).unsqueeze(1)                # [b, 1, c, n]
        parts.append((torch.exp(cum) * h0.unsqueeze(2) * readout).sum(-1))
        log_decay = cum[:, :, -1]
    return torch.cat(parts, dim=2) if parts else dt.new_zeros(dt.shape), torch.exp(log_decay) * h0


def selective_scan_kernel(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False, initial_state=None):
    """mamba-ssm's kernel, with an initial state added through linearity (see module doc)."""
    if initial_state is None:
        return mamba_selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    y, last = mamba_selective_scan(u, delta, A, B, C, None, None, delta_bias, delta_softplus, True)
    dtype = math_dtype(u, A, initial_state)
    dt = step_sizes(delta, delta_bias, delta_softplus, dtype)
    carried_y, carried_last = carried_readout(dt, A.to(dtype), C.to(dtype), initial_state.to(dtype))
    return finish(y.to(dtype) + carried_y, u, D, z, last.to(dtype) + carried_last, return_last_state)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, initial_state=None):
    """The selective scan: mamba-ssm's kernel when usable (CUDA, no float64), else the plain-PyTorch one."""
    usable = kernel_usable(u, delta, A, B, C, D, z, delta_bias, initial_state)
    scan = selective_scan_kernel if usable else selective_scan_ref
    return scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, initial_state)

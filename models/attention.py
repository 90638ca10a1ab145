"""One attention entry point for the outer and inner transformers.

flash-attn is optional: it is used when importable, on CUDA, for fp16/bf16 inputs; otherwise
torch's scaled_dot_product_attention (which picks its own fused kernel) does the work.

CUDA launches the fused kernels with batch x heads (or batch alone) in a grid dimension capped at
65,535 blocks; past it they fail with "invalid argument" (issue 30: the inner model decodes one
row per token, 38,400 rows x 4 heads at batch 256 with 16 outer steps). Such calls are split
along the batch into chunks under the cap; below it the kernel is called directly.
"""
import torch
import torch.nn.functional as F

try:  # optional extra, see README
    from flash_attn import flash_attn_func
except ImportError:  # pragma: no cover - depends on the environment
    flash_attn_func = None

# most batch x heads rows one kernel call may take, per device type (none listed = no cap);
# tests set a small cap for "cpu" to run the chunked path
MAX_KERNEL_ROWS = {"cuda": 65535}


def flash_usable(q):
    return flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def attention(q, k, v, scale, causal=False, dropout_p=0.0, mask=None):
    """softmax(q k^T * scale) v over [B, H, L, head_dim] tensors.

    `causal` masks keys after each query, aligned top-left (query i sees keys 0..i); only use it
    when q and k have the same length. Decoding one new query against a KV cache needs no mask.
    `mask`: a bool tensor broadcastable to [B, H, L_q, L_k] (True = the query sees that key), taken
    by SDPA (flash-attn has no such masks).
    """
    cap = MAX_KERNEL_ROWS.get(q.device.type)
    batch, heads = q.shape[:2]
    if cap is None or batch * heads <= cap:
        return _kernel(q, k, v, scale, causal, dropout_p, mask)
    # rows are independent: slices along the batch are views (no copies of a sliced KV cache)
    step = max(1, cap // heads)
    per_image = mask is not None and mask.dim() == 4 and mask.shape[0] > 1
    return torch.cat([_kernel(q[i:i + step], k[i:i + step], v[i:i + step], scale, causal, dropout_p,
                              mask[i:i + step] if per_image else mask)
                      for i in range(0, batch, step)])


def _kernel(q, k, v, scale, causal, dropout_p, mask):
    if mask is None and flash_usable(q) and q.dtype == k.dtype == v.dtype:
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                              dropout_p=dropout_p, softmax_scale=scale, causal=causal)
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal, scale=scale)

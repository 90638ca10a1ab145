"""One attention entry point for the outer and inner transformers.

flash-attn is optional: it is used when importable, on CUDA, for fp16/bf16 inputs; otherwise
torch's scaled_dot_product_attention (which picks its own fused kernel) does the work.
"""
import torch
import torch.nn.functional as F

try:  # optional extra, see README
    from flash_attn import flash_attn_func
except ImportError:  # pragma: no cover - depends on the environment
    flash_attn_func = None


def flash_usable(q):
    return flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def attention(q, k, v, scale, causal=False, dropout_p=0.0, use_flash=True):
    """softmax(q k^T * scale) v over [B, H, L, head_dim] tensors.

    `causal` masks keys after each query, aligned top-left (query i sees keys 0..i); only use it
    when q and k have the same length. Decoding one new query against a KV cache needs no mask.
    """
    if use_flash and flash_usable(q) and q.dtype == k.dtype == v.dtype:
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                              dropout_p=dropout_p, softmax_scale=scale, causal=causal)
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal, scale=scale)

"""The elementwise work of a decoder layer as one Triton kernel per step of the layer (CUDA's pass).

Each kernel replaces a handful of eager ops that a captured graph would replay one by one (an
RMSNorm alone is ~8: cast, pow, mean, add, rsqrt, mul, cast, mul), and each has a torch reference,
the stock modules' ops in their order and dtypes, that its tests compare it with (Triton's
interpreter on CPU, compiled on CUDA):

    add_rms_norm   residual += x; normed = weight * rms_norm(residual)     (one read of each row)
    rope_kv_write  q, k rotated by the position's cos/sin row of a table; k and v written to the pool
    silu_mul       silu(gate) * up, from the fused gate/up output

Roundings follow the stock ops: each torch op on a half-precision tensor computes in float32 and
rounds its result, so each kernel rounds where the stock chain has a tensor of the model's dtype.
"""

from __future__ import annotations

import os

import torch

# Off CUDA the kernels run only in Triton's interpreter (as row_attention.py and lora_kernels.py).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

SILU_BLOCK = 1024  # columns per program of silu_mul


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual [N, C] (residual None: the first layer's, x itself) -> (normed, x + residual)."""
    num_rows, width = x.shape
    normed = torch.empty_like(x)
    summed = x if residual is None else torch.empty_like(x)
    if num_rows:
        _add_rms_norm_kernel[(num_rows,)](
            x, x if residual is None else residual, weight, normed, summed, width, eps,
            x.stride(0), x.stride(0) if residual is None else residual.stride(0),
            BLOCK_C=triton.next_power_of_2(width), HAS_RESIDUAL=residual is not None,
        )  # fmt: skip
    return normed, summed


def add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The lean forward's residual add and LlamaRMSNorm, op for op."""
    summed = x if residual is None else residual + x
    h = summed.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype), summed


def rope_kv_write(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    write_index: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    num_heads: int,
) -> torch.Tensor:
    """qkv [N, (H + 2·KVH)·D] (q, k, v side by side, as the fused projection makes them); cos, sin
    [P, D] tables by position; positions, write_index [N]; k_pool, v_pool [KVH, C, D].
    Writes rope(k) and v at write_index in the pools; returns rope(q) [N, H, D].
    rope(x) = x·cos + rotate_half(x)·sin, rotate_half(x) = cat(-x[D/2:], x[:D/2]) (transformers')."""
    num_kv_heads, _, head_dim = k_pool.shape
    q = torch.empty(qkv.shape[0], num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    if qkv.shape[0]:
        _rope_kv_write_kernel[(qkv.shape[0], num_heads + num_kv_heads)](
            qkv, cos, sin, positions, write_index, q, k_pool, v_pool,
            num_heads, num_kv_heads, head_dim,
            qkv.stride(0), cos.stride(0), k_pool.stride(0), k_pool.stride(1),
            BLOCK_D=triton.next_power_of_2(head_dim),
        )  # fmt: skip
    return q


def rope_kv_write_reference(qkv, cos, sin, positions, write_index, k_pool, v_pool, num_heads):
    """`rope_kv_write` as the stock attention computes it: [N, heads, D] tensors, then index_copy_."""
    num_kv_heads, _, head_dim = k_pool.shape
    q, k, v = qkv.view(qkv.shape[0], -1, head_dim).split([num_heads, num_kv_heads, num_kv_heads], dim=1)
    c, s = cos[positions][:, None], sin[positions][:, None]  # [N, 1, D]

    def rope(x):
        half = head_dim // 2
        return x * c + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * s

    k_pool.index_copy_(1, write_index, rope(k).transpose(0, 1))
    v_pool.index_copy_(1, write_index, v.transpose(0, 1))
    return rope(q)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [N, 2·I] -> silu(gate) * up [N, I]."""
    num_rows, width = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(num_rows, width, dtype=gate_up.dtype, device=gate_up.device)
    if num_rows:
        block = min(SILU_BLOCK, triton.next_power_of_2(width))
        _silu_mul_kernel[(num_rows, triton.cdiv(width, block))](
            gate_up, out, width, gate_up.stride(0), out.stride(0), BLOCK=block
        )
    return out


def silu_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


@triton.jit
def _rounded(x, dtype: tl.constexpr):
    """float32 x in `dtype`, rounded to nearest even as torch does: done by hand for bfloat16, whose
    cast in the interpreter truncates (triton 3.x); on the GPU the cast of the result is then exact."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _add_rms_norm_kernel(
    x, residual, weight, normed, summed, width, eps, stride_x, stride_r,
    BLOCK_C: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK_C)
    in_row = c < width
    h = tl.load(x + row * stride_x + c, mask=in_row, other=0.0)
    if HAS_RESIDUAL:  # the sum is a tensor of the model's dtype in the stock chain: rounded here too
        r = tl.load(residual + row * stride_r + c, mask=in_row, other=0.0)
        h = _rounded(h.to(tl.float32) + r.to(tl.float32), summed.dtype.element_ty)
        tl.store(summed + row * stride_x + c, h, mask=in_row)
    h = h.to(tl.float32)
    h = h * (1.0 / tl.sqrt(tl.sum(h * h, axis=0) / width + eps))
    w = tl.load(weight + c, mask=in_row, other=0.0).to(tl.float32)
    h = _rounded(w * _rounded(h, normed.dtype.element_ty).to(tl.float32), normed.dtype.element_ty)
    tl.store(normed + row * stride_x + c, h, mask=in_row)


@triton.jit
def _rope_kv_write_kernel(
    qkv, cos, sin, positions, write_index, q, k_pool, v_pool,
    num_heads, num_kv_heads, head_dim,
    stride_qkv, stride_table, stride_pool_head, stride_pool_token,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    row, head = tl.program_id(0).to(tl.int64), tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    in_dim = d < head_dim
    half = head_dim // 2
    partner = tl.where(d < half, d + half, d - half)  # rotate_half's source for each dim ...
    sign = tl.where(d < half, -1.0, 1.0)  # ... and its sign
    position = tl.load(positions + row).to(tl.int64)
    c = tl.load(cos + position * stride_table + d, mask=in_dim, other=0.0).to(tl.float32)
    s = tl.load(sin + position * stride_table + d, mask=in_dim, other=0.0).to(tl.float32)
    source = qkv + row * stride_qkv + head * head_dim  # q heads, then k heads: one layout
    x = tl.load(source + d, mask=in_dim, other=0.0)
    rotated = sign * tl.load(source + partner, mask=in_dim, other=0.0).to(tl.float32)
    dtype = q.dtype.element_ty
    # x·cos and rotate_half(x)·sin are each a tensor of the model's dtype in the stock chain
    cos_part = _rounded(x.to(tl.float32) * c, dtype).to(tl.float32)
    out = _rounded(cos_part + _rounded(rotated * s, dtype).to(tl.float32), dtype)
    if head < num_heads:
        tl.store(q + (row * num_heads + head) * head_dim + d, out, mask=in_dim)
    else:
        kv_head = (head - num_heads).to(tl.int64)
        slot = tl.load(write_index + row).to(tl.int64)
        pool = kv_head * stride_pool_head + slot * stride_pool_token + d
        tl.store(k_pool + pool, out, mask=in_dim)
        value = tl.load(source + num_kv_heads * head_dim + d, mask=in_dim, other=0.0)
        tl.store(v_pool + pool, value, mask=in_dim)


@triton.jit
def _silu_mul_kernel(gate_up, out, width, stride_in, stride_out, BLOCK: tl.constexpr):
    row, block = tl.program_id(0).to(tl.int64), tl.program_id(1)
    c = block * BLOCK + tl.arange(0, BLOCK)
    in_row = c < width
    gate = tl.load(gate_up + row * stride_in + c, mask=in_row, other=0.0)
    up = tl.load(gate_up + row * stride_in + width + c, mask=in_row, other=0.0).to(tl.float32)
    g = gate.to(tl.float32)
    activated = _rounded(g / (1.0 + tl.exp(-g)), out.dtype.element_ty).to(tl.float32)  # F.silu's result
    tl.store(out + row * stride_out + c, _rounded(activated * up, out.dtype.element_ty), mask=in_row)

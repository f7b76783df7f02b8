"""Rounding helpers shared by the Triton kernels (device code only).

bf16 inputs feed ``tl.dot`` in bf16 on the GPU; intermediate fp32 tiles that become dot
operands (attention probabilities, score gradients, log-prob coefficients) are rounded
to bf16 there by ``.to(tl.bfloat16)``, which rounds to nearest even. The interpreter's
fp32 -> bf16 conversion truncates instead, so under it the kernels round by bit
arithmetic and keep fp32 tiles holding bf16 values: the same numbers the GPU multiplies.
"""

import triton
import triton.language as tl


@triton.jit
def round_to_bf16(x):
    """fp32 x rounded to the nearest bf16 (ties to even), still fp32 (finite x)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def dot_operand(x, OPERAND: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """fp32 tile x as a ``tl.dot`` operand: ``x.to(OPERAND)`` (bf16 on the GPU for bf16
    inputs, else fp32), or under the interpreter with bf16 inputs, x rounded to bf16
    values kept in fp32."""
    if EMULATE_BF16:
        return round_to_bf16(x)
    else:
        return x.to(OPERAND)

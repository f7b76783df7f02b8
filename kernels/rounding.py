"""Rounding helpers shared by the Triton kernels (device code only).

bf16/fp16 inputs feed ``tl.dot`` in their own dtype on the GPU; intermediate fp32 tiles
that become dot operands (attention probabilities, score gradients, log-prob
coefficients) are rounded there by ``.to(tl.bfloat16)`` / ``.to(tl.float16)``, which
round to nearest even. Under the interpreter (whose bf16 arithmetic is wrong) the
operands stay fp32 tiles holding the rounded values, the same numbers the GPU
multiplies: fp16 through the interpreter's own conversion (numpy's, correct), bf16 by
bit arithmetic, because the interpreter's fp32 -> bf16 conversion truncates.
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
def rounded(x, ROUND_TO: tl.constexpr):
    """Under the interpreter (ROUND_TO "bf16" | "fp16"): fp32 x rounded as the GPU rounds
    it to that dtype, still fp32; x itself for ROUND_TO ""."""
    if ROUND_TO == "bf16":
        return round_to_bf16(x)
    elif ROUND_TO == "fp16":
        return x.to(tl.float16).to(tl.float32)
    else:
        return x


@triton.jit
def dot_operand(x, OPERAND: tl.constexpr, ROUND_TO: tl.constexpr):
    """fp32 tile x as a ``tl.dot`` operand: ``x.to(OPERAND)`` (the inputs' bf16/fp16 on
    the GPU, else fp32); under the interpreter, x rounded to the inputs' dtype
    (:func:`rounded`), still fp32."""
    if ROUND_TO != "":
        return rounded(x, ROUND_TO)
    else:
        return x.to(OPERAND)

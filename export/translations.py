"""Project custom ops as plain ONNX, for `torch.onnx.export(..., custom_translation_table=...)`.

`dsv3.fp8_linear` (used by `--keep-fp8` exports, whose FP8 weights stay e4m3 initializers with their block scales):
the weight is Cast to float and multiplied by its block scale (element -> block through a Gather on constant
block indices, so partial edge blocks work), the activations go through the same per-token-per-128 e4m3 round trip
as the op (amax with a 1e-4 floor, /448, Cast to FLOAT8E4M3FN and back), then a MatMul. Same arithmetic as the
op's reference; needs opset >= 19 for the float8 Cast.
"""

from __future__ import annotations

import numpy as np
import torch
from onnxscript import ir
from onnxscript import opset20 as op

BLOCK = 128


def _const(values, dtype=np.int64):
    return op.Constant(value=ir.tensor(np.asarray(values, dtype=dtype)))


def fp8_linear(x, weight, weight_scale_inv):
    n, k = int(weight.shape[0]), int(weight.shape[1])
    kb = -(-k // BLOCK)
    w = op.Cast(weight, to=ir.DataType.FLOAT)
    scale = op.Gather(op.Gather(weight_scale_inv, _const(np.arange(n) // BLOCK), axis=0),
                      _const(np.arange(k) // BLOCK), axis=1)
    w = op.Mul(w, scale)

    lead = op.Slice(op.Shape(x), _const([0]), _const([-1]))
    x2 = op.Reshape(op.Cast(x, to=ir.DataType.FLOAT), _const([-1, k]))
    if kb * BLOCK != k:
        x2 = op.Pad(x2, _const([0, 0, 0, kb * BLOCK - k]))
    blocks = op.Reshape(x2, _const([-1, kb, BLOCK]))
    amax = op.ReduceMax(op.Abs(blocks), _const([-1]), keepdims=1)
    s = op.Div(op.Max(amax, op.Constant(value_float=1e-4)), op.Constant(value_float=448.0))
    q = op.Clip(op.Div(blocks, s), op.Constant(value_float=-448.0), op.Constant(value_float=448.0))
    q = op.Cast(op.Cast(q, to=ir.DataType.FLOAT8E4M3FN), to=ir.DataType.FLOAT)
    xq = op.Reshape(op.Mul(q, s), _const([-1, kb * BLOCK]))
    if kb * BLOCK != k:
        xq = op.Slice(xq, _const([0]), _const([k]), _const([1]))
    y = op.MatMul(xq, op.Transpose(w, perm=[1, 0]))
    y = op.Reshape(y, op.Concat(lead, _const([n]), axis=0))
    return op.CastLike(y, x)


def translation_table() -> dict:
    import dsv3.kernels  # noqa: F401  (registers the ops)

    return {torch.ops.dsv3.fp8_linear.default: fp8_linear}

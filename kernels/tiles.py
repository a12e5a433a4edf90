"""Triton helpers shared by the kernels' inner loops (device side; host-side launch helpers are in `_launch`)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_tile(ptrs, row_mask, col_mask, ROWS: tl.constexpr, COLS: tl.constexpr):
    """A 2-D tile, masked only where a mask can be false (ROWS / COLS: apply row_mask / col_mask; masked-off
    elements read 0). Why: in a loop next to the MMA the masks cost issue slots, and where the static shapes say
    every block is whole (`routed_experts.even_blocks`, the prefill attention's EXACT_D) they are dropped."""
    if ROWS and COLS:
        return tl.load(ptrs, mask=row_mask[:, None] & col_mask[None, :], other=0.0)
    elif ROWS:
        return tl.load(ptrs, mask=row_mask[:, None], other=0.0)
    elif COLS:
        return tl.load(ptrs, mask=col_mask[None, :], other=0.0)
    else:
        return tl.load(ptrs)

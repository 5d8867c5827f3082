"""engine/models/ops.linear on the CPU: a few rows through a wide weight take `W x^T` (faster there), and equal
F.linear to float32 rounding; every other shape is F.linear itself."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.models import ops


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 8, 32, 33, 64])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_equals_f_linear_for_every_batch(rows: int, bias: bool) -> None:
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(ops.WIDE_OUTPUTS + 7, 96, generator=g)
    x = torch.randn(rows, 96, generator=g)
    b = torch.randn(w.shape[0], generator=g) if bias else None
    y = ops.linear(x, w, b)
    assert y.shape == (rows, w.shape[0]) and y.is_contiguous()
    torch.testing.assert_close(y, F.linear(x, w, b), rtol=1e-5, atol=1e-4)
    assert torch.equal(y.argmax(-1), F.linear(x, w, b).argmax(-1))


def test_only_a_few_rows_through_a_wide_float32_weight_take_the_other_order() -> None:
    wide, narrow = torch.zeros(ops.WIDE_OUTPUTS, 8), torch.zeros(ops.WIDE_OUTPUTS - 1, 8)
    assert ops._skinny_cpu(torch.zeros(2, 8), wide) and ops._skinny_cpu(torch.zeros(32, 8), wide)
    assert not ops._skinny_cpu(torch.zeros(1, 8), wide)  # one row: the same speed, F.linear's own order
    assert not ops._skinny_cpu(torch.zeros(33, 8), wide)
    assert not ops._skinny_cpu(torch.zeros(2, 8), narrow)
    assert not ops._skinny_cpu(torch.zeros(2, 8, dtype=torch.bfloat16), wide.bfloat16())
    assert not ops._skinny_cpu(torch.zeros(1, 2, 8), wide)

"""engine/models/ops.linear on the CPU: a decode step's few rows take `W x^T` (faster there) and equal F.linear to
float32 rounding; every other shape is F.linear itself."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.models import ops


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 8, 16, 17, 64])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_equals_f_linear_for_every_batch(rows: int, bias: bool) -> None:
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(4099, 96, generator=g)
    x = torch.randn(rows, 96, generator=g)
    b = torch.randn(w.shape[0], generator=g) if bias else None
    y = ops.linear(x, w, b)
    assert y.shape == (rows, w.shape[0]) and y.is_contiguous()
    torch.testing.assert_close(y, F.linear(x, w, b), rtol=1e-5, atol=1e-4)
    assert torch.equal(y.argmax(-1), F.linear(x, w, b).argmax(-1))


def test_a_row_view_is_read_as_it_is() -> None:
    w, x = torch.randn(300, 64), torch.randn(5, 128)[:, ::2]  # a strided view of 5 rows
    torch.testing.assert_close(ops.linear(x[2:3], w), F.linear(x[2:3], w), rtol=1e-5, atol=1e-4)


def test_only_a_decode_steps_float32_rows_take_the_other_order() -> None:
    w = torch.zeros(64, 8)
    assert ops._skinny_cpu(torch.zeros(1, 8), w) and ops._skinny_cpu(torch.zeros(16, 8), w)
    assert not ops._skinny_cpu(torch.zeros(17, 8), w)  # a prompt's rows: F.linear
    assert not ops._skinny_cpu(torch.zeros(2, 8, dtype=torch.bfloat16), w.bfloat16())
    assert not ops._skinny_cpu(torch.zeros(1, 2, 8), w)

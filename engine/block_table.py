"""Every request's block table as one row of a 2-D int32 array, so a step gathers a batch's tables with one index.

Rows are appended to, cut or released, never rebuilt. Building a step's `[B, max_blocks]` table is then
`array[rows, :width]` instead of padding B Python lists and converting them element by element, which at
batch 256 and 2k context cost milliseconds a step. Rows and columns grow by doubling; a released row is
reused by the next request.
"""

from __future__ import annotations

import numpy as np


class BlockTableArray:
    """Row r holds the block ids of the request mapped to r in its first `lengths[r]` columns."""

    def __init__(self, rows: int = 64, cols: int = 64) -> None:
        self.array = np.zeros((rows, cols), dtype=np.int32)
        self.lengths = np.zeros(rows, dtype=np.int32)
        self._row: dict[str, int] = {}
        self._free_rows = list(range(rows - 1, -1, -1))

    def row(self, request_id: str) -> int:
        return self._row[request_id]

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._row

    def length(self, request_id: str) -> int:
        """Blocks the request holds (0 without a row)."""
        r = self._row.get(request_id)
        return 0 if r is None else int(self.lengths[r])

    def get(self, request_id: str) -> list[int]:
        """The request's block ids in order ([] without a row)."""
        r = self._row.get(request_id)
        return [] if r is None else self.array[r, : self.lengths[r]].tolist()

    def rows(self, request_ids: list[str]) -> np.ndarray:
        return np.fromiter((self._row[r] for r in request_ids), dtype=np.int64, count=len(request_ids))

    def extend(self, request_id: str, block_ids: list[int]) -> None:
        """Append blocks to the request's row (creating the row on first use)."""
        r = self._row.get(request_id)
        if r is None:
            r = self._row[request_id] = self._take_row()
        n = int(self.lengths[r])
        end = n + len(block_ids)
        if end > self.array.shape[1]:
            self._grow(cols=max(end, 2 * self.array.shape[1]))
        self.array[r, n:end] = block_ids
        self.lengths[r] = end

    def truncate(self, request_id: str, keep: int) -> list[int]:
        """Keep the first `keep` blocks; returns the ids cut off."""
        r = self._row[request_id]
        n = int(self.lengths[r])
        cut = self.array[r, keep:n].tolist()
        self.lengths[r] = min(n, keep)
        return cut

    def release(self, request_id: str) -> list[int]:
        """Drop the request's row; returns the ids it held."""
        ids = self.get(request_id)
        r = self._row.pop(request_id, None)
        if r is not None:
            self.lengths[r] = 0
            self._free_rows.append(r)
        return ids

    def gather(self, request_ids: list[str]) -> np.ndarray:
        """[len(request_ids), widest table] int32; entries past a row's length are stale, never read."""
        rows = self.rows(request_ids)
        width = max(1, int(self.lengths[rows].max())) if len(rows) else 1
        return self.array[rows, :width]

    def _take_row(self) -> int:
        if not self._free_rows:
            old = self.array.shape[0]
            self._grow(rows=2 * old)
            self._free_rows = list(range(2 * old - 1, old - 1, -1))
        return self._free_rows.pop()

    def _grow(self, rows: int | None = None, cols: int | None = None) -> None:
        r, c = rows or self.array.shape[0], cols or self.array.shape[1]
        grown = np.zeros((r, c), dtype=np.int32)
        grown[: self.array.shape[0], : self.array.shape[1]] = self.array
        self.array = grown
        self.lengths = np.concatenate([self.lengths, np.zeros(r - len(self.lengths), dtype=np.int32)])

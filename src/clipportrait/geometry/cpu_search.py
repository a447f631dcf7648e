"""Compiled CPU loops of the nearest-triangle grid search (numba), for `geometry.deformation`.

`deformation.grid_nearest` refines candidate lists level by level and finally picks each point's
nearest candidate. Both inner loops run over (query, candidate) pairs. In plain PyTorch every pair
is materialised as gathered rows and pushed through ~60 element-wise ops, which made the search ~90%
of a CPU training step. Here one compiled loop per query does the same arithmetic in registers.

`NumbaSearch` has the interface of `deformation._TorchSearch` (``nearest`` and ``select`` on CSR
candidate lists) and the same rules:

- ``nearest``: the candidate with the smallest squared distance, the first one in list order on ties;
- ``select``: keep a candidate when its distance is <= min(the query's minimum + slack, limit).

The point-triangle distance is `deformation._pair_dist2`'s formula on the same per-triangle table
(`deformation._triangle_table`), in float32. The loops are compiled on first use and cached on disk
(numba's ``cache=True``); numba's thread count follows ``torch.get_num_threads()``.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

try:
    import numba
    from numba import njit, prange
except ImportError:  # the pure PyTorch search serves installs without numba
    numba = None
else:
    # numba's own thread pool instead of GNU OpenMP: with the OpenMP layer running in a process,
    # processes forked from it (DataLoader workers, DDP ranks started with fork) hang in torch's
    # OpenMP regions. An explicit NUMBA_THREADING_LAYER still wins.
    if "NUMBA_THREADING_LAYER" not in os.environ:
        numba.config.THREADING_LAYER = "workqueue"

Tensor = torch.Tensor


def available() -> bool:
    return numba is not None


if numba is not None:

    @njit(inline="always", cache=True)
    def _segment(qx, qy, qz, ex, ey, ez, inv_length2):
        t = (qx * ex + qy * ey + qz * ez) * inv_length2
        t = min(max(t, np.float32(0.0)), np.float32(1.0))
        rx, ry, rz = qx - t * ex, qy - t * ey, qz - t * ez
        return rx * rx + ry * ry + rz * rz

    @njit(inline="always", cache=True)
    def _dist2(px, py, pz, row):
        """Squared distance of point p to the triangle of table row ``row`` (24 floats)."""
        qx, qy, qz = px - row[0], py - row[1], pz - row[2]
        v = qx * row[15] + qy * row[16] + qz * row[17]
        w = qx * row[18] + qy * row[19] + qz * row[20]
        if v >= 0 and w >= 0 and v + w <= 1:  # NaN gradients (degenerate triangles) fail this test
            s = qx * row[12] + qy * row[13] + qz * row[14]
            return s * s
        edge = min(_segment(qx, qy, qz, row[3], row[4], row[5], row[21]),
                   _segment(qx, qy, qz, row[6], row[7], row[8], row[22]))
        return min(edge, _segment(qx - row[3], qy - row[4], qz - row[5], row[9], row[10], row[11], row[23]))

    @njit(parallel=True, cache=True)
    def _nearest(points, starts, counts, cand, rows, best_d2, best_tri):
        for q in prange(points.shape[0]):
            best, tri = np.float32(np.inf), -1
            px, py, pz = points[q, 0], points[q, 1], points[q, 2]
            base = starts[q]
            for i in range(counts[q]):
                t = cand[base + i]
                d = _dist2(px, py, pz, rows[t])
                if d < best:
                    best, tri = d, t
            best_d2[q] = best
            best_tri[q] = tri

    @njit(parallel=True, cache=True)
    def _select_count(points, starts, counts, cand, rows, slack, limit, pair_start, dist2, threshold2, kept):
        # Squared distances are stored and compared with the squared bound: one square root per query.
        for q in prange(points.shape[0]):
            px, py, pz = points[q, 0], points[q, 1], points[q, 2]
            base, out = starts[q], pair_start[q]
            low = np.float32(np.inf)
            for i in range(counts[q]):
                d = _dist2(px, py, pz, rows[cand[base + i]])
                dist2[out + i] = d
                low = min(low, d)
            bound = min(np.float32(math.sqrt(low)) + slack[q], limit[q])
            bound2 = bound * bound
            threshold2[q] = bound2
            n = 0
            for i in range(counts[q]):
                if dist2[out + i] <= bound2:
                    n += 1
            kept[q] = n

    @njit(parallel=True, cache=True)
    def _select_write(starts, counts, cand, pair_start, dist, threshold, kept_start, out):
        for q in prange(starts.shape[0]):
            base, pairs, j = starts[q], pair_start[q], kept_start[q]
            for i in range(counts[q]):
                if dist[pairs + i] <= threshold[q]:
                    out[j] = cand[base + i]
                    j += 1


def _exclusive_cumsum(counts: np.ndarray) -> np.ndarray:
    out = np.zeros_like(counts)
    np.cumsum(counts[:-1], out=out[1:])
    return out


class NumbaSearch:
    """`deformation._TorchSearch`'s candidate loops compiled with numba (CPU tensors only)."""

    def __init__(self) -> None:
        if numba is None:
            raise RuntimeError("the numba CPU search needs numba (pip install numba)")

    @staticmethod
    def _arrays(queries: Tensor, starts: Tensor, counts: Tensor, cand: Tensor, table: Tensor):
        if queries.device.type != "cpu":
            raise ValueError(f"the numba search runs on CPU tensors, got {queries.device}")
        numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
        return (queries.detach().float().contiguous().numpy(), starts.contiguous().numpy(),
                counts.contiguous().numpy(), cand.contiguous().numpy(), table.T.float().contiguous().numpy())

    def nearest(self, queries: Tensor, starts: Tensor, counts: Tensor, cand: Tensor, table: Tensor):
        """Per query (Q,3): (min squared distance, global triangle id) over its candidates; (inf, -1)
        if none. ``table``: ``_triangle_table`` of all triangles (24, T)."""
        points, starts_np, counts_np, cand_np, rows = self._arrays(queries, starts, counts, cand, table)
        best_d2 = np.empty(len(points), np.float32)
        best_tri = np.empty(len(points), np.int64)
        _nearest(points, starts_np, counts_np, cand_np, rows, best_d2, best_tri)
        return torch.from_numpy(best_d2), torch.from_numpy(best_tri)

    def select(self, queries: Tensor, starts: Tensor, counts: Tensor, cand: Tensor, table: Tensor,
               slack: Tensor, limit: Tensor) -> tuple[Tensor, Tensor]:
        """Per query keep candidates with dist <= min(min dist + slack, limit).

        Returns (new counts, new candidate list in query order)."""
        points, starts_np, counts_np, cand_np, rows = self._arrays(queries, starts, counts, cand, table)
        pair_start = _exclusive_cumsum(counts_np)
        dist = np.empty(int(counts_np.sum()), np.float32)
        threshold = np.empty(len(points), np.float32)
        kept = np.empty(len(points), np.int64)
        _select_count(points, starts_np, counts_np, cand_np, rows, slack.float().contiguous().numpy(),
                      limit.float().contiguous().numpy(), pair_start, dist, threshold, kept)
        out = np.empty(int(kept.sum()), np.int64)
        _select_write(starts_np, counts_np, cand_np, pair_start, dist, threshold, _exclusive_cumsum(kept), out)
        return torch.from_numpy(kept), torch.from_numpy(out)

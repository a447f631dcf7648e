"""Surface-field deformation D: observation space -> canonical space (paper eq. 4-5, GNARF's SF).

For a sample point x, find the nearest triangle t_x^D of the observation mesh, the barycentric
coordinates [u, v, w] of x's projection onto it, and the signed offset along its normal; then

    D(x) = t_x^C [u, v, w]^T + <x - t_x^D [u, v, w]^T, n^D> n^C                        (eq. 5)

on the same triangle of the canonical mesh (shared face list). The radiance field is queried at
D(x) (eq. 4). Points farther than ``shell`` from the observation mesh blend smoothly (over ``blend``)
into a rigid fallback (identity unless a per-sample 4x4 transform is given).

Projection. ``projection="plane"`` (default) takes the barycentrics of the orthogonal projection of x
onto the nearest triangle's plane (they may leave [0, 1] slightly near edges); then x = t^D[u,v,w] +
offset n^D holds exactly, so D is the identity when observation = canonical and reproduces rigid
motions of the mesh exactly. ``projection="closest"`` clamps to the triangle (the closest point), as a
literal reading of "projection onto the triangle"; it bends the field near convex edges.

Nearest-triangle search is exact: a hierarchy of per-mesh voxel grids over the mesh's bounding box
grown by reach = shell + blend. Only points within reach need their nearest triangle (beyond, the
weight is 0 and the triangle is reported as -1). A cell of half-diagonal h with centre c keeps every
triangle t with dist(c, t) <= min(min_t' dist(c, t') + 2h, reach + h): the nearest triangle of any point
x of the cell satisfies the first bound by the triangle inequality, and the second if dist(x) <= reach.
Each level refines the previous one, whose lists contain all of a child cell's candidates. A query
then tests only its cell's few candidates.

Backends. "torch": the grid as CSR lists built level by level in plain PyTorch (any device), only
in the cells that hold query points; (point, triangle) pairs evaluated in chunks from per-triangle
constants laid out one row per scalar; eq. 5 in PyTorch. "triton" (CUDA; also under TRITON_INTERPRET=1 on CPU): the grid
with a fixed number of slots per cell, one kernel per level and no host synchronisation (a cell with
more candidates than slots keeps its parent's list, a superset, so it stays exact), and one fused
kernel per call doing the search, eq. 5, the blend weight and the fallback; its backward evaluates
eq. 5 in PyTorch on the saved triangle choice (gradients w.r.t. points, vertices and fallback).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

Tensor = torch.Tensor


@dataclass
class DeformationConfig:
    """Settings of the surface-field deformation (Hydra group ``deformation``)."""

    enabled: bool = True
    shell: float = 0.1  # world units (the head is ~0.5 tall): full deformation up to this distance
    blend: float = 0.05  # band beyond the shell over which the field blends into the rigid fallback
    projection: str = "plane"  # "plane" or "closest", see the module docstring
    grid_levels: list[int] = field(default_factory=lambda: [4, 8, 16, 32])  # each divides the next
    grid_capacity: int = 256  # Triton grid: candidate slots per finest cell (overflow stays exact, slower)
    pair_chunk: int = 1 << 21  # PyTorch backend: (query, triangle) pairs evaluated at once
    backend: str = "auto"  # "auto" (Triton on CUDA when importable), "torch", "triton"
    # The "torch" backend's pair loops on CPU: "numba" (compiled, geometry.cpu_search), "torch", or
    # "auto" (numba when importable)
    cpu_search: str = "auto"

    def validate(self) -> None:
        if self.shell < 0 or self.blend < 0:
            raise ValueError(f"deformation shell={self.shell}, blend={self.blend}: expected >= 0")
        if self.projection not in ("plane", "closest"):
            raise ValueError(f"deformation projection={self.projection!r}: expected 'plane' or 'closest'")
        if self.backend not in ("auto", "torch", "triton"):
            raise ValueError(f"deformation backend={self.backend!r}: expected 'auto', 'torch' or 'triton'")
        if self.cpu_search not in ("auto", "numba", "torch"):
            raise ValueError(f"deformation cpu_search={self.cpu_search!r}: expected 'auto', 'numba' or 'torch'")
        levels = list(self.grid_levels)
        if not levels or any(r < 1 for r in levels) or any(b % a for a, b in zip(levels, levels[1:])):
            raise ValueError(
                f"deformation grid_levels={levels}: expected positive resolutions, each dividing the next"
            )
        if self.grid_capacity < 1:
            raise ValueError(f"deformation grid_capacity={self.grid_capacity}: expected >= 1")
        if self.pair_chunk < 1:
            raise ValueError(f"deformation pair_chunk={self.pair_chunk}: expected >= 1")


@dataclass
class DeformationInfo:
    """Per-point diagnostics of a deformation call (all (B,N) except barycentrics (B,N,3))."""

    distance: Tensor  # unsigned distance to the observation mesh (inf where beyond shell + blend)
    triangle: Tensor  # nearest triangle index, -1 where beyond shell + blend (there the weight is 0)
    barycentrics: Tensor  # (u, v, w) used in eq. 5
    offset: Tensor  # signed offset along the observation normal
    weight: Tensor  # 1 = surface field, 0 = rigid fallback
    inside: Tensor  # bool, distance <= shell


# ----------------------------------------------------------------------------- triangle geometry


def _dot(x: Tensor, y: Tensor) -> Tensor:
    return (x * y).sum(-1)


def _safe(den: Tensor) -> Tensor:
    # Degenerate triangles give 0/0 in branches that torch.where then discards; keep them finite so
    # the discarded branch cannot poison gradients with NaN.
    return torch.where(den == 0, torch.ones_like(den), den)


def _nearest_edge_barycentrics(p: Tensor, a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """Barycentric weights (..., 3) of the point of the three edges of (a, b, c) closest to p (the first
    edge of AB, BC, CA on ties); a zero-length edge stands for its first corner."""

    def along(start: Tensor, end: Tensor) -> tuple[Tensor, Tensor]:
        edge = end - start
        length2 = _dot(edge, edge)
        t = torch.where(length2 > 0, (_dot(p - start, edge) / _safe(length2)).clamp(0, 1), torch.zeros_like(length2))
        gap = p - start - t[..., None] * edge
        return t, _dot(gap, gap)

    (t_ab, d_ab), (t_bc, d_bc), (t_ca, d_ca) = along(a, b), along(b, c), along(c, a)
    zero = torch.zeros_like(t_ab)
    bary_ab = torch.stack((1 - t_ab, t_ab, zero), -1)
    bary_bc = torch.stack((zero, 1 - t_bc, t_bc), -1)
    bary_ca = torch.stack((t_ca, zero, 1 - t_ca), -1)
    best = torch.where((d_bc < d_ab)[..., None], bary_bc, bary_ab)
    return torch.where((d_ca < torch.minimum(d_ab, d_bc))[..., None], bary_ca, best)


def closest_point_barycentrics(p: Tensor, a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """Barycentric weights (..., 3) of the point of triangle (a, b, c) closest to p (broadcast (...,3)).

    Voronoi-region classification of p against the triangle's vertices, edges and face (the standard
    construction: dot products of p - vertex with the two edge vectors), evaluated branch-free.

    A degenerate triangle (collinear corners, a repeated corner) has no face region: every region
    test meets ties at zero, and the classification picked a wrong edge for up to half of the points
    (a point beside a triangle whose a == b was given a, not its projection on ac). Such a triangle is
    the union of its edges, so its closest point is the nearest edge point. The rule is the PyTorch
    search's (``_triangle_table``): a triangle whose squared sine at a is below 1e-6 counts as
    degenerate, where float32 cannot resolve plane barycentrics; the nearest edge point of such a
    sliver is off by at most its inradius.
    """
    ab, ac = b - a, c - a
    ap, bp, cp = p - a, p - b, p - c
    d1, d2 = _dot(ab, ap), _dot(ac, ap)
    d3, d4 = _dot(ab, bp), _dot(ac, bp)
    d5, d6 = _dot(ab, cp), _dot(ac, cp)
    va, vb, vc = d3 * d6 - d5 * d4, d5 * d2 - d1 * d6, d1 * d4 - d3 * d2
    zero, one = torch.zeros_like(d1), torch.ones_like(d1)
    denom = _safe(va + vb + vc)
    v, w = vb / denom, vc / denom  # face interior
    # Later assignments take precedence: vertex regions, then edges, then the face.
    on_bc = (va <= 0) & (d4 - d3 >= 0) & (d5 - d6 >= 0)
    t_bc = (d4 - d3) / _safe((d4 - d3) + (d5 - d6))
    v, w = torch.where(on_bc, 1 - t_bc, v), torch.where(on_bc, t_bc, w)
    on_ac = (vb <= 0) & (d2 >= 0) & (d6 <= 0)
    v, w = torch.where(on_ac, zero, v), torch.where(on_ac, d2 / _safe(d2 - d6), w)
    at_c = (d6 >= 0) & (d5 <= d6)
    v, w = torch.where(at_c, zero, v), torch.where(at_c, one, w)
    on_ab = (vc <= 0) & (d1 >= 0) & (d3 <= 0)
    v, w = torch.where(on_ab, d1 / _safe(d1 - d3), v), torch.where(on_ab, zero, w)
    at_b = (d3 >= 0) & (d4 <= d3)
    v, w = torch.where(at_b, one, v), torch.where(at_b, zero, w)
    at_a = (d1 <= 0) & (d2 <= 0)
    v, w = torch.where(at_a, zero, v), torch.where(at_a, zero, w)
    regions = torch.stack((1 - v - w, v, w), dim=-1)
    bb, cc, bc = _dot(ab, ab), _dot(ac, ac), _dot(ab, ac)
    resolved = bb * cc - bc * bc > 1e-6 * bb * cc
    # The usual case needs no edge pass (eq. 5's mapping calls this for every near point). Only on the
    # CPU, where asking costs no device sync: CUDA graphs and compiled graphs cannot hold the question.
    if p.device.type == "cpu" and not torch.compiler.is_compiling() and bool(resolved.all()):
        return regions
    return torch.where(resolved[..., None], regions, _nearest_edge_barycentrics(p, a, b, c))


def plane_barycentrics(p: Tensor, a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """Barycentric weights (..., 3) of the orthogonal projection of p onto the plane of (a, b, c)."""
    ab, ac, ap = b - a, c - a, p - a
    bb, bc, cc = _dot(ab, ab), _dot(ab, ac), _dot(ac, ac)
    d1, d2 = _dot(ab, ap), _dot(ac, ap)
    det = _safe(bb * cc - bc * bc)
    v, w = (cc * d1 - bc * d2) / det, (bb * d2 - bc * d1) / det
    return torch.stack((1 - v - w, v, w), dim=-1)


def _interp(bary: Tensor, tri: Tensor) -> Tensor:
    """bary (...,3) times triangle corners (...,3,3) -> points (...,3)."""
    return (bary[..., :, None] * tri).sum(-2)


def _unit_normal(tri: Tensor) -> Tensor:
    n = torch.linalg.cross(tri[..., 1, :] - tri[..., 0, :], tri[..., 2, :] - tri[..., 0, :], dim=-1)
    return n / n.norm(dim=-1, keepdim=True).clamp_min(1e-20)


def _point_triangle_dist2(p: Tensor, tri: Tensor) -> Tensor:
    bary = closest_point_barycentrics(p, tri[..., 0, :], tri[..., 1, :], tri[..., 2, :])
    return ((p - _interp(bary, tri)) ** 2).sum(-1)


def nearest_triangle_bruteforce(
    points: Tensor, verts: Tensor, faces: Tensor, chunk: int = 1 << 22
) -> tuple[Tensor, Tensor]:
    """Reference search in float64 over all triangles: (triangle index (B,N), distance (B,N)).

    points (B,N,3) or (N,3), verts (B,V,3) or (V,3), faces (F,3). Exact point-triangle distances.
    """
    squeeze = points.dim() == 2
    points = points[None] if squeeze else points
    verts = verts[None] if verts.dim() == 2 else verts
    tris = verts.double()[:, faces]  # (B,F,3,3)
    num_faces = faces.shape[0]
    rows = max(1, chunk // num_faces)
    best_idx, best_dist = [], []
    for b in range(points.shape[0]):
        idx_parts, dist_parts = [], []
        for start in range(0, points.shape[1], rows):
            p = points[b, start : start + rows].double()
            d2 = _point_triangle_dist2(p[:, None, :], tris[b][None])
            dist, idx = d2.min(dim=1)
            idx_parts.append(idx)
            dist_parts.append(dist.sqrt())
        best_idx.append(torch.cat(idx_parts))
        best_dist.append(torch.cat(dist_parts))
    idx, dist = torch.stack(best_idx), torch.stack(best_dist)
    return (idx[0], dist[0]) if squeeze else (idx, dist)


# ----------------------------------------------------------------------------- candidate grids


@dataclass
class _Grid:
    """CSR candidate lists of a res^3 grid per mesh, cells numbered b*res^3 + (i*res + j)*res + k."""

    res: int
    lo: Tensor  # (B,3) box corner
    cell: Tensor  # (B,3) cell size
    offsets: Tensor  # (B*res^3 + 1,) int64
    tris: Tensor  # (nnz,) int64 global triangle ids b*F + t


def _triangle_table(tris: Tensor) -> Tensor:
    """Per-triangle constants (24, T) of ``_pair_dist2`` for triangles (T,3,3), one row per scalar so
    that gathering a row for a list of pairs gives a contiguous vector: corner a (3); edges b - a,
    c - a, c - b (9); unit normal (3); gradients of the plane barycentrics v and w (6); 1/|edge|^2 (3).

    Nearly degenerate triangles (squared sine of the angle at a below 1e-6, where float32 cannot
    resolve the barycentrics) get NaN gradients, so their inside test fails and their distance is
    the edges' (off by at most their tiny inradius); zero-length edges get 1/|edge|^2 = 0, which
    makes that edge's closest point its first corner (exact for a point-like edge)."""
    a, b, c = tris.unbind(-2)
    edges = torch.stack((b - a, c - a, c - b), 1)  # (T,3 edges,3)
    length2 = (edges * edges).sum(-1)
    inv_length2 = torch.where(length2 > 0, 1 / _safe(length2), torch.zeros_like(length2))
    bb, cc, bc = length2[:, 0, None], length2[:, 1, None], _dot(edges[:, 0], edges[:, 1])[:, None]
    det = bb * cc - bc * bc
    resolved = det > 1e-6 * bb * cc
    nan = torch.full_like(edges[:, 0], float("nan"))
    grad_v = torch.where(resolved, (cc * edges[:, 0] - bc * edges[:, 1]) / _safe(det), nan)
    grad_w = torch.where(resolved, (bb * edges[:, 1] - bc * edges[:, 0]) / _safe(det), nan)
    rows = torch.cat((a, edges.reshape(-1, 9), _unit_normal(tris), grad_v, grad_w, inv_length2), 1)
    return rows.T.contiguous()


def _dot_rows(x: list[Tensor], y: list[Tensor]) -> Tensor:
    return torch.addcmul(torch.addcmul(x[0] * y[0], x[1], y[1]), x[2], y[2])


def _segment_dist2(q: list[Tensor], edge: list[Tensor], inv_length2: Tensor) -> Tensor:
    """Squared distance of q (relative to the segment's start) to the segment start + [0, 1] edge."""
    t = (_dot_rows(q, edge) * inv_length2).clamp_(0, 1)
    r = [torch.addcmul(q[i], t, edge[i], value=-1) for i in range(3)]
    return _dot_rows(r, r)


def _pair_dist2(p: Tensor, rows: Tensor) -> Tensor:
    """Squared point-triangle distances of pairs: points p (3,P), triangles as gathered rows (24,P) of
    ``_triangle_table``. The squared plane distance where the orthogonal projection falls inside the
    triangle, else the nearest of its three edges (the closest point then lies on the boundary).

    Scalar rows instead of (P,3) tensors: reductions over a last dimension of 3 and per-pair
    gathers of 3x3 blocks dominated the CPU time of the (..., 3) formulation."""
    r = rows.unbind(0)
    q = [p[i] - r[i] for i in range(3)]
    e_ab, e_ac, e_bc = r[3:6], r[6:9], r[9:12]
    v, w = _dot_rows(q, r[15:18]), _dot_rows(q, r[18:21])
    inside = (v >= 0) & (w >= 0) & (v + w <= 1)
    s = _dot_rows(q, r[12:15])
    q_b = [q[i] - e_ab[i] for i in range(3)]
    edge = torch.minimum(_segment_dist2(q, e_ab, r[21]), _segment_dist2(q, e_ac, r[22]))
    edge = torch.minimum(edge, _segment_dist2(q_b, e_bc, r[23]))
    return torch.where(inside, s * s, edge)


# Pairs evaluated at once on the CPU (pair_chunk still bounds it): measured on a 2-core dev CPU,
# 2^16 was fastest; 2^14 pays ~1.2x in per-op dispatch, 2^19 ~1.7x in cache misses.
_CPU_PAIR_CHUNK = 1 << 16


class _TorchSearch:
    """Candidate loops in plain PyTorch: expand (query, candidate) pairs chunk by chunk."""

    def __init__(self, pair_chunk: int):
        self.pair_chunk = pair_chunk

    def _chunks(self, counts: Tensor):
        """Yield query ranges [q0, q1) whose candidate pairs fit in pair_chunk (at least one query)."""
        chunk = min(self.pair_chunk, _CPU_PAIR_CHUNK) if counts.device.type == "cpu" else self.pair_chunk
        ends = torch.cumsum(counts, 0).cpu()
        q0, n = 0, counts.numel()
        while q0 < n:
            base = int(ends[q0 - 1]) if q0 > 0 else 0
            q1 = int(torch.searchsorted(ends, torch.tensor(base + chunk), right=True))
            q1 = min(max(q1, q0 + 1), n)
            yield q0, q1
            q0 = q1

    @staticmethod
    def _pairs(starts: Tensor, counts: Tensor, cand: Tensor) -> tuple[Tensor, Tensor]:
        query = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
        # Pair i of query q is cand[starts[q] + i - first[q]], first[q] = its first pair.
        shift = starts - (torch.cumsum(counts, 0) - counts)
        return query, cand[shift[query] + torch.arange(query.numel(), device=counts.device)]

    def nearest(self, queries: Tensor, starts: Tensor, counts: Tensor, cand: Tensor, table: Tensor):
        """Per query (Q,3): (min squared distance, global triangle id) over its candidates; (inf, -1)
        if none. ``table``: ``_triangle_table`` of all triangles."""
        best_d2 = torch.full((queries.shape[0],), float("inf"), device=queries.device, dtype=queries.dtype)
        best_tri = torch.full((queries.shape[0],), -1, device=queries.device, dtype=torch.long)
        coords = queries.T.contiguous()
        for q0, q1 in self._chunks(counts):
            query, tri = self._pairs(starts[q0:q1], counts[q0:q1], cand)
            if query.numel() == 0:
                continue
            d2 = _pair_dist2(coords.index_select(1, query + q0), table.index_select(1, tri))
            seg_min = torch.full((q1 - q0,), float("inf"), device=d2.device, dtype=d2.dtype)
            seg_min = seg_min.scatter_reduce(0, query, d2, reduce="amin")
            # First candidate reaching the minimum (ties resolved by candidate order).
            pair_id = torch.arange(query.numel(), device=d2.device)
            marked = torch.where(d2 == seg_min[query], pair_id, torch.full_like(pair_id, query.numel()))
            first = torch.full((q1 - q0,), query.numel(), device=d2.device, dtype=torch.long)
            first = first.scatter_reduce(0, query, marked, reduce="amin")
            has = counts[q0:q1] > 0
            best_d2[q0:q1] = seg_min
            best_tri[q0:q1] = torch.where(has, tri[first.clamp(max=query.numel() - 1)], best_tri[q0:q1])
        return best_d2, best_tri

    def select(self, queries: Tensor, starts: Tensor, counts: Tensor, cand: Tensor, table: Tensor,
               slack: Tensor, limit: Tensor) -> tuple[Tensor, Tensor]:
        """Per query keep candidates with dist <= min(min dist + slack, limit).

        Returns (new counts, new candidate list in query order)."""
        new_counts = torch.zeros_like(counts)
        kept = []
        coords = queries.T.contiguous()
        for q0, q1 in self._chunks(counts):
            query, tri = self._pairs(starts[q0:q1], counts[q0:q1], cand)
            if query.numel() == 0:
                continue
            dist = _pair_dist2(coords.index_select(1, query + q0), table.index_select(1, tri)).sqrt()
            seg_min = torch.full((q1 - q0,), float("inf"), device=dist.device, dtype=dist.dtype)
            seg_min = seg_min.scatter_reduce(0, query, dist, reduce="amin")
            keep = dist <= torch.minimum(seg_min + slack[q0:q1], limit[q0:q1])[query]
            new_counts[q0:q1] = torch.bincount(query[keep], minlength=q1 - q0)
            kept.append(tri[keep])
        tris_out = torch.cat(kept) if kept else cand.new_zeros(0)
        return new_counts, tris_out


def make_search(cfg: DeformationConfig, device: torch.device):
    """The pair loops of the non-Triton search for ``device`` (see ``DeformationConfig.cpu_search``)."""
    from . import cpu_search

    if device.type == "cpu" and cfg.cpu_search != "torch":
        if cpu_search.available():
            return cpu_search.NumbaSearch()
        if cfg.cpu_search == "numba":
            raise RuntimeError("deformation cpu_search='numba' requested but numba is not importable")
    return _TorchSearch(cfg.pair_chunk)


def _decode_cells(cells: Tensor, res: int) -> tuple[Tensor, Tensor]:
    """Global cell ids b*res^3 + (i*res + j)*res + k -> (batch index, (i, j, k))."""
    local = cells % res**3
    return cells // res**3, torch.stack((local // res**2, local // res % res, local % res), -1)


def _encode_cells(batch: Tensor, ijk: Tensor, res: int) -> Tensor:
    return ((batch * res + ijk[..., 0]) * res + ijk[..., 1]) * res + ijk[..., 2]


def _parent_cells(cells: Tensor, res: int, parent_res: int) -> Tensor:
    batch, ijk = _decode_cells(cells, res)
    return _encode_cells(batch, ijk // (res // parent_res), parent_res)


def _refine(search: _TorchSearch, table: Tensor, lo: Tensor, cell: Tensor, res: int, cells: Tensor,
            starts: Tensor, counts: Tensor, cand: Tensor, reach: float) -> tuple[Tensor, Tensor]:
    """Candidate counts and lists (in ``cells`` order) of the given cells at resolution ``res``, each
    from its parent's list (``starts``/``counts`` per cell, into ``cand``) by the rule of the module
    docstring. ``cell``: (B,3) cell sizes at this resolution."""
    batch, ijk = _decode_cells(cells, res)
    centres = lo[batch] + (ijk.to(lo.dtype) + 0.5) * cell[batch]
    half_diag = 0.5 * cell.norm(dim=-1)[batch]
    tol = 1e-3 * half_diag + 1e-6  # float32 rounding of the distances
    return search.select(centres, starts, counts, cand, table, 2 * half_diag + tol, reach + half_diag + tol)


def build_candidate_grid(tris: Tensor, reach: float, levels: list[int], search: _TorchSearch) -> _Grid:
    """Exact candidate grid (CSR, PyTorch) for triangles ``tris`` (B,F,3,3) over their box grown by
    ``reach``, every cell of every level (the forward builds only the cells holding its points)."""
    batch, num_faces = tris.shape[:2]
    device = tris.device
    table = _triangle_table(tris.reshape(-1, 3, 3))
    lo, size = _grid_box(tris, reach)
    # Root: one cell per mesh listing all of its triangles.
    parent_res = 1
    offsets = torch.arange(batch + 1, device=device) * num_faces
    cand = torch.arange(batch * num_faces, device=device)
    for res in levels:
        cells = torch.arange(batch * res**3, device=device)
        parent = _parent_cells(cells, res, parent_res)
        starts, counts = offsets[parent], offsets[parent + 1] - offsets[parent]
        counts, cand = _refine(search, table, lo, size / res, res, cells, starts, counts, cand, reach)
        offsets = torch.cat((counts.new_zeros(1), torch.cumsum(counts, 0)))
        parent_res = res
    return _Grid(parent_res, lo, size / parent_res, offsets, cand)


def grid_nearest(points: Tensor, tris: Tensor, reach: float, levels: list[int],
                 search: _TorchSearch) -> tuple[Tensor, Tensor]:
    """Nearest triangle (local index, -1 if none) and squared distance (inf if none) for points
    (B,N,3) against triangles (B,F,3,3); exact for every point within ``reach`` of its mesh.

    The grid of ``build_candidate_grid`` restricted to the cells holding points (same lists, as each
    level refines its parent's list alone); points outside the box (beyond reach) are not searched."""
    batch, n = points.shape[:2]
    num_faces = tris.shape[1]
    device = points.device
    table = _triangle_table(tris.reshape(-1, 3, 3))
    lo, size = _grid_box(tris, reach)
    fine = levels[-1]
    rel = ((points - lo[:, None]) / (size / fine)[:, None]).reshape(-1, 3)
    searched = ((rel >= 0) & (rel < fine)).all(-1).nonzero()[:, 0]
    # Coarser cells derive from the finest one, so a point's cells nest at every level.
    fine_cells = _encode_cells(searched // n, rel[searched].floor().long().clamp_(0, fine - 1), fine)
    cells, point_cell = torch.unique(fine_cells, return_inverse=True)
    level_cells = [cells]
    for res, child_res in zip(reversed(levels[:-1]), reversed(levels[1:])):
        level_cells.insert(0, torch.unique(_parent_cells(level_cells[0], child_res, res)))
    # Root: one cell per mesh listing all of its triangles.
    level_cells.insert(0, torch.arange(batch, device=device))
    starts = torch.arange(batch, device=device) * num_faces
    counts = torch.full((batch,), num_faces, device=device)
    cand = torch.arange(batch * num_faces, device=device)
    for parents, cells, parent_res, res in zip(level_cells, level_cells[1:], [1, *levels], levels):
        parent = torch.searchsorted(parents, _parent_cells(cells, res, parent_res))
        counts, cand = _refine(search, table, lo, size / res, res, cells, starts[parent], counts[parent], cand, reach)
        starts = torch.cumsum(counts, 0) - counts
    d2, tri = search.nearest(points.reshape(-1, 3)[searched], starts[point_cell], counts[point_cell], cand, table)
    local = torch.where(tri >= 0, tri - searched // n * num_faces, tri)
    tri_all = torch.full((batch * n,), -1, device=device, dtype=torch.long).index_put_((searched,), local)
    d2_all = torch.full((batch * n,), float("inf"), device=device, dtype=d2.dtype).index_put_((searched,), d2)
    return tri_all.reshape(batch, n), d2_all.reshape(batch, n)


# ----------------------------------------------------------------------------- Triton kernels (CUDA)

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the PyTorch search is used
    triton = None

if triton is not None:

    @triton.jit
    def _closest_vw(px, py, pz, ax, ay, az, bx, by, bz, cx, cy, cz):
        """Barycentrics (v, w) of the closest point; same region logic as closest_point_barycentrics."""
        abx, aby, abz = bx - ax, by - ay, bz - az
        acx, acy, acz = cx - ax, cy - ay, cz - az
        d1 = abx * (px - ax) + aby * (py - ay) + abz * (pz - az)
        d2 = acx * (px - ax) + acy * (py - ay) + acz * (pz - az)
        d3 = abx * (px - bx) + aby * (py - by) + abz * (pz - bz)
        d4 = acx * (px - bx) + acy * (py - by) + acz * (pz - bz)
        d5 = abx * (px - cx) + aby * (py - cy) + abz * (pz - cz)
        d6 = acx * (px - cx) + acy * (py - cy) + acz * (pz - cz)
        va = d3 * d6 - d5 * d4
        vb = d5 * d2 - d1 * d6
        vc = d1 * d4 - d3 * d2
        den = va + vb + vc
        den = tl.where(den == 0, 1.0, den)
        v = vb / den
        w = vc / den
        on_bc = (va <= 0) & (d4 - d3 >= 0) & (d5 - d6 >= 0)
        den_bc = (d4 - d3) + (d5 - d6)
        t_bc = (d4 - d3) / tl.where(den_bc == 0, 1.0, den_bc)
        v = tl.where(on_bc, 1 - t_bc, v)
        w = tl.where(on_bc, t_bc, w)
        on_ac = (vb <= 0) & (d2 >= 0) & (d6 <= 0)
        den_ac = tl.where(d2 - d6 == 0, 1.0, d2 - d6)
        v = tl.where(on_ac, 0.0, v)
        w = tl.where(on_ac, d2 / den_ac, w)
        at_c = (d6 >= 0) & (d5 <= d6)
        v = tl.where(at_c, 0.0, v)
        w = tl.where(at_c, 1.0, w)
        on_ab = (vc <= 0) & (d1 >= 0) & (d3 <= 0)
        den_ab = tl.where(d1 - d3 == 0, 1.0, d1 - d3)
        v = tl.where(on_ab, d1 / den_ab, v)
        w = tl.where(on_ab, 0.0, w)
        at_b = (d3 >= 0) & (d4 <= d3)
        v = tl.where(at_b, 1.0, v)
        w = tl.where(at_b, 0.0, w)
        at_a = (d1 <= 0) & (d2 <= 0)
        v = tl.where(at_a, 0.0, v)
        w = tl.where(at_a, 0.0, w)
        return v, w

    @triton.jit
    def _tri_dist2(px, py, pz, ax, ay, az, bx, by, bz, cx, cy, cz):
        """Squared point-triangle distance."""
        v, w = _closest_vw(px, py, pz, ax, ay, az, bx, by, bz, cx, cy, cz)
        abx, aby, abz = bx - ax, by - ay, bz - az
        acx, acy, acz = cx - ax, cy - ay, cz - az
        qx = ax + v * abx + w * acx - px
        qy = ay + v * aby + w * acy - py
        qz = az + v * abz + w * acz - pz
        return qx * qx + qy * qy + qz * qz

    @triton.jit
    def _unit_cross(ex, ey, ez, fx, fy, fz):
        """(e x f) / |e x f|: the unit normal of a triangle with edges e, f (eq. 5's n^D and n^C)."""
        nx = ey * fz - ez * fy
        ny = ez * fx - ex * fz
        nz = ex * fy - ey * fx
        inv = 1.0 / tl.maximum(tl.sqrt(nx * nx + ny * ny + nz * nz), 1e-20)
        return nx * inv, ny * inv, nz * inv

    @triton.jit
    def _load_corner(tri_ptr, t, corner: tl.constexpr, mask):
        base = t * 9 + corner * 3
        x = tl.load(tri_ptr + base + 0, mask=mask, other=0.0)
        y = tl.load(tri_ptr + base + 1, mask=mask, other=0.0)
        z = tl.load(tri_ptr + base + 2, mask=mask, other=0.0)
        return x, y, z

    @triton.jit
    def _refine_kernel(pool_ptr, tri_ptr, lo_ptr, size_ptr, pstart_ptr, pcount_ptr, start_ptr, count_ptr,
                       seed_ptr, base, n_cells, res, parent_res, reach, CAP: tl.constexpr, BLOCK_C: tl.constexpr,
                       BLOCK_T: tl.constexpr):
        """One grid level: each cell keeps its parent's candidates t with dist(centre, t) <=
        min(dmin + 2h, reach + h), written to its CAP slots in the parent's order; a cell with more
        than CAP such candidates keeps its parent's list (a superset), so the grid stays exact. The
        triangle nearest to the centre (-1 for a cell without candidates) is the cell's search seed."""
        cells = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        cm = cells < n_cells
        per_mesh = res * res * res
        b = cells // per_mesh
        r = cells % per_mesh
        i = r // (res * res)
        j = (r // res) % res
        k = r % res
        factor = res // parent_res
        parent = (b * parent_res + i // factor) * parent_res + j // factor
        parent = parent * parent_res + k // factor
        pstart = tl.load(pstart_ptr + parent, mask=cm, other=0)
        pcount = tl.load(pcount_ptr + parent, mask=cm, other=0)
        sx = tl.load(size_ptr + b * 3 + 0, mask=cm, other=1.0) / res
        sy = tl.load(size_ptr + b * 3 + 1, mask=cm, other=1.0) / res
        sz = tl.load(size_ptr + b * 3 + 2, mask=cm, other=1.0) / res
        px = tl.load(lo_ptr + b * 3 + 0, mask=cm, other=0.0) + (i.to(tl.float32) + 0.5) * sx
        py = tl.load(lo_ptr + b * 3 + 1, mask=cm, other=0.0) + (j.to(tl.float32) + 0.5) * sy
        pz = tl.load(lo_ptr + b * 3 + 2, mask=cm, other=0.0) + (k.to(tl.float32) + 0.5) * sz
        half_diag = 0.5 * tl.sqrt(sx * sx + sy * sy + sz * sz)
        tol = 1e-3 * half_diag + 1e-6  # float32 rounding of the distances
        px2, py2, pz2 = px[:, None], py[:, None], pz[:, None]
        slots = tl.arange(0, BLOCK_T)[None, :]
        kmax = tl.max(pcount, axis=0)
        best = tl.full([BLOCK_C], float("inf"), tl.float32)
        best_t = tl.full([BLOCK_C], -1, tl.int32)
        s = 0
        while s < kmax:
            act = (s + slots) < pcount[:, None]
            t = tl.load(pool_ptr + pstart[:, None] + s + slots, mask=act, other=0)
            ax, ay, az = _load_corner(tri_ptr, t, 0, act)
            bx, by, bz = _load_corner(tri_ptr, t, 1, act)
            cx, cy, cz = _load_corner(tri_ptr, t, 2, act)
            d2 = tl.where(act, _tri_dist2(px2, py2, pz2, ax, ay, az, bx, by, bz, cx, cy, cz), float("inf"))
            row_min = tl.min(d2, axis=1)
            row_t = tl.sum(tl.where(slots == tl.argmin(d2, axis=1)[:, None], t, 0), axis=1)
            best_t = tl.where(row_min < best, row_t, best_t)
            best = tl.minimum(best, row_min)
            s += BLOCK_T
        dmin = tl.sqrt(best)
        slack = 2 * half_diag + tol
        thresh = tl.minimum(dmin + slack, reach + half_diag + tol)
        thresh2 = tl.where(dmin <= reach + half_diag + tol, thresh * thresh, -1.0)
        own = base + cells.to(tl.int64) * CAP
        written = tl.zeros([BLOCK_C], tl.int32)
        s = 0
        while s < kmax:
            act = (s + slots) < pcount[:, None]
            t = tl.load(pool_ptr + pstart[:, None] + s + slots, mask=act, other=0)
            ax, ay, az = _load_corner(tri_ptr, t, 0, act)
            bx, by, bz = _load_corner(tri_ptr, t, 1, act)
            cx, cy, cz = _load_corner(tri_ptr, t, 2, act)
            d2 = _tri_dist2(px2, py2, pz2, ax, ay, az, bx, by, bz, cx, cy, cz)
            keep = act & (d2 <= thresh2[:, None])
            keep_i = keep.to(tl.int32)
            pos = written[:, None] + tl.cumsum(keep_i, axis=1) - 1
            tl.store(pool_ptr + own[:, None] + pos, t, mask=keep & (pos < CAP))
            written += tl.sum(keep_i, axis=1)
            s += BLOCK_T
        overflow = written > CAP
        tl.store(start_ptr + cells, tl.where(overflow, pstart, own), mask=cm)
        tl.store(count_ptr + cells, tl.where(overflow, pcount, written), mask=cm)
        tl.store(seed_ptr + cells, tl.where(written > 0, best_t, -1), mask=cm)

    @triton.jit
    def _deform_kernel(pts_ptr, out_ptr, idx_ptr, obs_ptr, can_ptr, fb_ptr, lo_ptr, size_ptr, start_ptr, count_ptr,
                       pool_ptr, seed_ptr, sphere_ptr, total, n_per, num_faces, canon_batched, res, shell, blend,
                       reach2, MAP: tl.constexpr, PLANE: tl.constexpr, HAS_FALLBACK: tl.constexpr,
                       HARD_BLEND: tl.constexpr, BLOCK: tl.constexpr):
        """Per point: exact nearest triangle over its grid cell's candidates, then (MAP) eq. 5 on that
        triangle, the blend weight and the rigid fallback, writing the output point.

        The search starts from the cell's seed (the triangle nearest to its centre, usually within a
        few candidates of the point's own nearest) and skips a candidate whose bounding sphere is
        farther than the best distance so far: |x - s_t| - r_t is a lower bound of dist(x, t), so a
        skipped candidate cannot be nearer (a margin covers float32 rounding). A program is one warp,
        so the exact test runs only when some point of the block still needs that candidate. Exact
        ties go to the lowest triangle index, whatever the visiting order."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < total
        b = offs // n_per
        px = tl.load(pts_ptr + offs * 3 + 0, mask=m, other=0.0)
        py = tl.load(pts_ptr + offs * 3 + 1, mask=m, other=0.0)
        pz = tl.load(pts_ptr + offs * 3 + 2, mask=m, other=0.0)
        rx = (px - tl.load(lo_ptr + b * 3 + 0, mask=m, other=0.0)) / (tl.load(size_ptr + b * 3 + 0, mask=m, other=1.0) / res)
        ry = (py - tl.load(lo_ptr + b * 3 + 1, mask=m, other=0.0)) / (tl.load(size_ptr + b * 3 + 1, mask=m, other=1.0) / res)
        rz = (pz - tl.load(lo_ptr + b * 3 + 2, mask=m, other=0.0)) / (tl.load(size_ptr + b * 3 + 2, mask=m, other=1.0) / res)
        inside = m & (rx >= 0) & (rx < res) & (ry >= 0) & (ry < res) & (rz >= 0) & (rz < res)
        ci = tl.minimum(tl.maximum(tl.floor(rx), 0.0), res - 1.0).to(tl.int64)
        cj = tl.minimum(tl.maximum(tl.floor(ry), 0.0), res - 1.0).to(tl.int64)
        ck = tl.minimum(tl.maximum(tl.floor(rz), 0.0), res - 1.0).to(tl.int64)
        cell = ((b * res + ci) * res + cj) * res + ck
        start = tl.load(start_ptr + cell, mask=inside, other=0)
        count = tl.load(count_ptr + cell, mask=inside, other=0)
        seed = tl.load(seed_ptr + cell, mask=inside & (count > 0), other=-1)
        has_seed = seed >= 0
        t = tl.where(has_seed, seed, 0)
        ax, ay, az = _load_corner(obs_ptr, t, 0, has_seed)
        bx, by, bz = _load_corner(obs_ptr, t, 1, has_seed)
        cx, cy, cz = _load_corner(obs_ptr, t, 2, has_seed)
        best = tl.where(has_seed, _tri_dist2(px, py, pz, ax, ay, az, bx, by, bz, cx, cy, cz), float("inf"))
        best_t = tl.where(has_seed, seed, -1)
        # float32 rounding of the distances and of the bound, relative to the coordinates' magnitude
        tol = 1e-5 * (1.0 + tl.maximum(tl.maximum(tl.abs(px), tl.abs(py)), tl.abs(pz)))
        kmax = tl.max(count, axis=0)
        k = 0
        while k < kmax:
            act = k < count
            t = tl.load(pool_ptr + start + k, mask=act, other=0)
            sx = px - tl.load(sphere_ptr + t * 4 + 0, mask=act, other=0.0)
            sy = py - tl.load(sphere_ptr + t * 4 + 1, mask=act, other=0.0)
            sz = pz - tl.load(sphere_ptr + t * 4 + 2, mask=act, other=0.0)
            bound = tl.sqrt(sx * sx + sy * sy + sz * sz) - tl.load(sphere_ptr + t * 4 + 3, mask=act, other=0.0)
            need = act & (bound <= tl.sqrt(best) + tol)
            if tl.max(need.to(tl.int32), axis=0) > 0:
                ax, ay, az = _load_corner(obs_ptr, t, 0, need)
                bx, by, bz = _load_corner(obs_ptr, t, 1, need)
                cx, cy, cz = _load_corner(obs_ptr, t, 2, need)
                d2 = _tri_dist2(px, py, pz, ax, ay, az, bx, by, bz, cx, cy, cz)
                better = need & ((d2 < best) | ((d2 == best) & (t < best_t)))
                best = tl.where(better, d2, best)
                best_t = tl.where(better, t, best_t)
            k += 1
        found = (best_t >= 0) & (best <= reach2)
        local = tl.where(found, best_t - (b * num_faces).to(tl.int32), -1)
        tl.store(idx_ptr + offs, local, mask=m)
        if MAP:
            if HAS_FALLBACK:
                fb = fb_ptr + b * 16
                gx = tl.load(fb + 0, mask=m, other=0.0) * px + tl.load(fb + 1, mask=m, other=0.0) * py + tl.load(fb + 2, mask=m, other=0.0) * pz + tl.load(fb + 3, mask=m, other=0.0)
                gy = tl.load(fb + 4, mask=m, other=0.0) * px + tl.load(fb + 5, mask=m, other=0.0) * py + tl.load(fb + 6, mask=m, other=0.0) * pz + tl.load(fb + 7, mask=m, other=0.0)
                gz = tl.load(fb + 8, mask=m, other=0.0) * px + tl.load(fb + 9, mask=m, other=0.0) * py + tl.load(fb + 10, mask=m, other=0.0) * pz + tl.load(fb + 11, mask=m, other=0.0)
            else:
                gx, gy, gz = px, py, pz
            t = tl.where(found, best_t, 0)
            ax, ay, az = _load_corner(obs_ptr, t, 0, found)
            bx, by, bz = _load_corner(obs_ptr, t, 1, found)
            cx, cy, cz = _load_corner(obs_ptr, t, 2, found)
            tc = tl.where(found, local, 0) + (b * canon_batched * num_faces).to(tl.int32)
            qax, qay, qaz = _load_corner(can_ptr, tc, 0, found)
            qbx, qby, qbz = _load_corner(can_ptr, tc, 1, found)
            qcx, qcy, qcz = _load_corner(can_ptr, tc, 2, found)
            abx, aby, abz = bx - ax, by - ay, bz - az
            acx, acy, acz = cx - ax, cy - ay, cz - az
            if PLANE:
                apx, apy, apz = px - ax, py - ay, pz - az
                bb = abx * abx + aby * aby + abz * abz
                bc = abx * acx + aby * acy + abz * acz
                cc = acx * acx + acy * acy + acz * acz
                e1 = abx * apx + aby * apy + abz * apz
                e2 = acx * apx + acy * apy + acz * apz
                det = bb * cc - bc * bc
                det = tl.where(det == 0, 1.0, det)
                v = (cc * e1 - bc * e2) / det
                w = (bb * e2 - bc * e1) / det
            else:
                v, w = _closest_vw(px, py, pz, ax, ay, az, bx, by, bz, cx, cy, cz)
            u = 1 - v - w
            # Unit normals of both triangles (eq. 5's n^D and n^C).
            nx, ny, nz = _unit_cross(abx, aby, abz, acx, acy, acz)
            mx, my, mz = _unit_cross(qbx - qax, qby - qay, qbz - qaz, qcx - qax, qcy - qay, qcz - qaz)
            offset = ((px - (u * ax + v * bx + w * cx)) * nx + (py - (u * ay + v * by + w * cy)) * ny
                      + (pz - (u * az + v * bz + w * cz)) * nz)
            ox = u * qax + v * qbx + w * qcx + offset * mx
            oy = u * qay + v * qby + w * qcy + offset * my
            oz = u * qaz + v * qbz + w * qcz + offset * mz
            dist = tl.sqrt(best)
            if HARD_BLEND:
                weight = tl.where(dist <= shell, 1.0, 0.0)
            else:
                tb = tl.minimum(tl.maximum((dist - shell) / blend, 0.0), 1.0)
                weight = 1 - tb * tb * (3 - 2 * tb)
            weight = tl.where(found, weight, 0.0)
            ox = tl.where(found, weight * ox + (1 - weight) * gx, gx)
            oy = tl.where(found, weight * oy + (1 - weight) * gy, gy)
            oz = tl.where(found, weight * oz + (1 - weight) * gz, gz)
            tl.store(out_ptr + offs * 3 + 0, ox, mask=m)
            tl.store(out_ptr + offs * 3 + 1, oy, mask=m)
            tl.store(out_ptr + offs * 3 + 2, oz, mask=m)

    @triton.jit
    def _deform_backward_kernel(pts_ptr, grad_ptr, gin_ptr, idx_ptr, obs_ptr, can_ptr, fb_ptr, total, n_per,
                                num_faces, canon_batched, shell, blend, HAS_FALLBACK: tl.constexpr,
                                HARD_BLEND: tl.constexpr, BLOCK: tl.constexpr):
        """Gradient w.r.t. the points of the fused forward (plane projection) on its saved triangles:
        w J^T g + (1 - w) R^T g + <mapped - rigid, g> grad w, with J the Jacobian of eq. 5."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < total
        b = offs // n_per
        px = tl.load(pts_ptr + offs * 3 + 0, mask=m, other=0.0)
        py = tl.load(pts_ptr + offs * 3 + 1, mask=m, other=0.0)
        pz = tl.load(pts_ptr + offs * 3 + 2, mask=m, other=0.0)
        gx = tl.load(grad_ptr + offs * 3 + 0, mask=m, other=0.0)
        gy = tl.load(grad_ptr + offs * 3 + 1, mask=m, other=0.0)
        gz = tl.load(grad_ptr + offs * 3 + 2, mask=m, other=0.0)
        local = tl.load(idx_ptr + offs, mask=m, other=-1)
        found = local >= 0
        if HAS_FALLBACK:
            fb = fb_ptr + b * 16
            r00 = tl.load(fb + 0, mask=m, other=0.0)
            r01 = tl.load(fb + 1, mask=m, other=0.0)
            r02 = tl.load(fb + 2, mask=m, other=0.0)
            r10 = tl.load(fb + 4, mask=m, other=0.0)
            r11 = tl.load(fb + 5, mask=m, other=0.0)
            r12 = tl.load(fb + 6, mask=m, other=0.0)
            r20 = tl.load(fb + 8, mask=m, other=0.0)
            r21 = tl.load(fb + 9, mask=m, other=0.0)
            r22 = tl.load(fb + 10, mask=m, other=0.0)
            hx = r00 * px + r01 * py + r02 * pz + tl.load(fb + 3, mask=m, other=0.0)
            hy = r10 * px + r11 * py + r12 * pz + tl.load(fb + 7, mask=m, other=0.0)
            hz = r20 * px + r21 * py + r22 * pz + tl.load(fb + 11, mask=m, other=0.0)
            rgx = r00 * gx + r10 * gy + r20 * gz
            rgy = r01 * gx + r11 * gy + r21 * gz
            rgz = r02 * gx + r12 * gy + r22 * gz
        else:
            hx, hy, hz = px, py, pz
            rgx, rgy, rgz = gx, gy, gz
        t = tl.where(found, local + (b * num_faces).to(tl.int32), 0)
        ax, ay, az = _load_corner(obs_ptr, t, 0, found)
        bx, by, bz = _load_corner(obs_ptr, t, 1, found)
        cx, cy, cz = _load_corner(obs_ptr, t, 2, found)
        tc = tl.where(found, local, 0) + (b * canon_batched * num_faces).to(tl.int32)
        qax, qay, qaz = _load_corner(can_ptr, tc, 0, found)
        qbx, qby, qbz = _load_corner(can_ptr, tc, 1, found)
        qcx, qcy, qcz = _load_corner(can_ptr, tc, 2, found)
        abx, aby, abz = bx - ax, by - ay, bz - az
        acx, acy, acz = cx - ax, cy - ay, cz - az
        apx, apy, apz = px - ax, py - ay, pz - az
        bb = abx * abx + aby * aby + abz * abz
        bc = abx * acx + aby * acy + abz * acz
        cc = acx * acx + acy * acy + acz * acz
        det = bb * cc - bc * bc
        det = tl.where(det == 0, 1.0, det)
        e1 = abx * apx + aby * apy + abz * apz
        e2 = acx * apx + acy * apy + acz * apz
        v = (cc * e1 - bc * e2) / det
        w = (bb * e2 - bc * e1) / det
        # Gradients of the plane barycentrics v, w.
        dvx, dvy, dvz = (cc * abx - bc * acx) / det, (cc * aby - bc * acy) / det, (cc * abz - bc * acz) / det
        dwx, dwy, dwz = (bb * acx - bc * abx) / det, (bb * acy - bc * aby) / det, (bb * acz - bc * abz) / det
        nx, ny, nz = _unit_cross(abx, aby, abz, acx, acy, acz)
        kbx, kby, kbz = qbx - qax, qby - qay, qbz - qaz
        kcx, kcy, kcz = qcx - qax, qcy - qay, qcz - qaz
        mx, my, mz = _unit_cross(kbx, kby, kbz, kcx, kcy, kcz)
        offset = (apx - v * abx - w * acx) * nx + (apy - v * aby - w * acy) * ny + (apz - v * abz - w * acz) * nz
        abn = abx * nx + aby * ny + abz * nz
        acn = acx * nx + acy * ny + acz * nz
        ox, oy, oz = nx - dvx * abn - dwx * acn, ny - dvy * abn - dwy * acn, nz - dvz * abn - dwz * acn
        mapx = qax + v * kbx + w * kcx + offset * mx
        mapy = qay + v * kby + w * kcy + offset * my
        mapz = qaz + v * kbz + w * kcz + offset * mz
        kv = kbx * gx + kby * gy + kbz * gz
        kw = kcx * gx + kcy * gy + kcz * gz
        km = mx * gx + my * gy + mz * gz
        jx = dvx * kv + dwx * kw + ox * km
        jy = dvy * kv + dwy * kw + oy * km
        jz = dvz * kv + dwz * kw + oz * km
        # Blend weight and its gradient: smoothstep of the distance to the closest point.
        cv, cw = _closest_vw(px, py, pz, ax, ay, az, bx, by, bz, cx, cy, cz)
        dx = apx - cv * abx - cw * acx
        dy = apy - cv * aby - cw * acy
        dz = apz - cv * abz - cw * acz
        dist = tl.sqrt(dx * dx + dy * dy + dz * dz)
        if HARD_BLEND:
            weight = tl.where(dist <= shell, 1.0, 0.0)
            slope = tl.zeros_like(dist)
        else:
            tb = tl.minimum(tl.maximum((dist - shell) / blend, 0.0), 1.0)
            weight = 1 - tb * tb * (3 - 2 * tb)
            slope = -6 * tb * (1 - tb) / blend
        slope = slope / tl.where(dist > 0, dist, 1.0) * ((mapx - hx) * gx + (mapy - hy) * gy + (mapz - hz) * gz)
        outx = tl.where(found, weight * jx + (1 - weight) * rgx + slope * dx, rgx)
        outy = tl.where(found, weight * jy + (1 - weight) * rgy + slope * dy, rgy)
        outz = tl.where(found, weight * jz + (1 - weight) * rgz + slope * dz, rgz)
        tl.store(gin_ptr + offs * 3 + 0, outx, mask=m)
        tl.store(gin_ptr + offs * 3 + 1, outy, mask=m)
        tl.store(gin_ptr + offs * 3 + 2, outz, mask=m)

def _grid_box(tris: Tensor, reach: float) -> tuple[Tensor, Tensor]:
    """Corner (B,3) and size (B,3) of the meshes' bounding boxes grown by ``reach`` (and a margin that
    keeps every point within ``reach`` of a mesh strictly inside its box)."""
    corners = tris.reshape(tris.shape[0], -1, 3)
    cmin, cmax = corners.amin(1), corners.amax(1)
    margin = reach + 1e-4 * (cmax - cmin).amax(-1, keepdim=True) + 1e-6
    return cmin - margin, cmax - cmin + 2 * margin


@dataclass
class FixedGrid:
    """Candidate grid of fixed capacity, built without host synchronisation (Triton).

    Cell c (numbered b*res^3 + (i*res + j)*res + k) lists ``pool[starts[c] : starts[c] + counts[c]]``,
    global triangle ids b*F + t: its own slots, or its parent's list if it had more candidates than
    its level's capacity (a superset, so the search stays exact)."""

    res: int
    lo: Tensor  # (B,3) float32 box corner
    size: Tensor  # (B,3) float32 box size
    starts: Tensor  # (B*res^3,) int64
    counts: Tensor  # (B*res^3,) int32
    pool: Tensor  # int32: the root lists (all triangles) then each level's slots
    seeds: Tensor  # (B*res^3,) int32: the global id of the triangle nearest to the cell's centre, -1 if none
    spheres: Tensor  # (B*F, 4) float32: a bounding sphere (centre, radius) of each triangle


def level_capacities(levels: list[int], capacity: int, num_faces: int) -> list[int]:
    """Slots per cell at each level: ``capacity`` at the finest, growing with the cell's area for
    coarser levels (candidate counts scale with the surface near a cell), at most ``num_faces``."""
    return [min(num_faces, capacity * (levels[-1] // res) ** 2) for res in levels]


def _refine_launch(n_cells: int) -> tuple[int, int]:
    """(cells, candidate slots) per program of _refine_kernel: with few cells (coarse levels, small
    batches) one cell per program and wide candidate chunks keep the serial loop short; the others
    were picked by timing on an H100 (benchmarks/bench_geometry.py sizes)."""
    if n_cells < 8192:
        return 1, 256
    return (16, 32) if n_cells < 65536 else (4, 64)


def build_fixed_grid(tris: Tensor, reach: float, levels: list[int], capacity: int) -> FixedGrid:
    """Exact fixed-capacity candidate grid for float32 triangles ``tris`` (B,F,3,3): one kernel per level."""
    batch, num_faces = tris.shape[:2]
    device = tris.device
    lo, size = (x.contiguous() for x in _grid_box(tris, reach))
    caps = level_capacities(levels, capacity, num_faces)
    root = batch * num_faces
    total = root + sum(batch * res**3 * cap for res, cap in zip(levels, caps))
    pool = torch.empty(total, device=device, dtype=torch.int32)
    pool[:root] = torch.arange(root, device=device, dtype=torch.int32)
    starts = torch.arange(batch, device=device, dtype=torch.int64) * num_faces
    counts = torch.full((batch,), num_faces, device=device, dtype=torch.int32)
    flat = tris.reshape(-1, 9).contiguous()
    base, parent_res = root, 1
    for res, cap in zip(levels, caps):
        n_cells = batch * res**3
        new_starts = torch.empty(n_cells, device=device, dtype=torch.int64)
        new_counts = torch.empty(n_cells, device=device, dtype=torch.int32)
        seeds = torch.empty(n_cells, device=device, dtype=torch.int32)
        block_c, block_t = _refine_launch(n_cells)
        _refine_kernel[(triton.cdiv(n_cells, block_c),)](pool, flat, lo, size, starts, counts, new_starts, new_counts,
                                                         seeds, base, n_cells, res, parent_res, float(reach), CAP=cap,
                                                         BLOCK_C=block_c, BLOCK_T=block_t)
        starts, counts, base, parent_res = new_starts, new_counts, base + n_cells * cap, res
    return FixedGrid(parent_res, lo, size, starts, counts, pool, seeds, bounding_spheres(tris))


def bounding_spheres(tris: Tensor) -> Tensor:
    """(B*F, 4) spheres (centre, radius) holding each triangle of ``tris`` (B,F,3,3): centred on the
    centroid, the radius is the farthest corner's distance, grown a little against rounding."""
    centre = tris.mean(dim=2)
    radius = (tris - centre.unsqueeze(2)).norm(dim=-1).amax(dim=-1)
    return torch.cat([centre, (radius * (1 + 1e-5) + 1e-7).unsqueeze(-1)], dim=-1).reshape(-1, 4).contiguous()


_QUERY_LAUNCH = (32, 1)  # points per program, warps: a program loops to its points' largest candidate count


def grid_for(obs_tris: Tensor, cfg: DeformationConfig) -> FixedGrid:
    """The fixed-capacity candidate grid of observation triangles (B,F,3,3) under ``cfg``."""
    return build_fixed_grid(obs_tris.detach().float().contiguous(), cfg.shell + cfg.blend, list(cfg.grid_levels),
                            cfg.grid_capacity)


def triton_deform(points: Tensor, obs_tris: Tensor, canon_tris: Tensor, fallback: Tensor | None,
                  cfg: DeformationConfig, map_points: bool = True,
                  grid: FixedGrid | None = None) -> tuple[Tensor | None, Tensor]:
    """Fused search + eq. 5 + blend (Triton): output points (B,N,3) float32 (None unless
    ``map_points``) and the nearest triangle (B,N) int32, -1 where none is within shell + blend.

    points (B,N,3), obs_tris (B,F,3,3), canon_tris (B or 1,F,3,3), fallback (B,4,4) or None; no autograd.
    ``grid``: ``grid_for(obs_tris, cfg)`` when already built (it depends on the observation mesh only)."""
    batch, n = points.shape[:2]
    num_faces = obs_tris.shape[1]
    obs = obs_tris.float().contiguous()
    grid = grid_for(obs, cfg) if grid is None else grid
    pts = points.float().contiguous()
    idx = torch.empty(batch, n, device=points.device, dtype=torch.int32)
    out = torch.empty(batch, n, 3, device=points.device, dtype=torch.float32) if map_points else idx
    can = canon_tris.float().contiguous()
    fb = fallback.float().contiguous() if fallback is not None else pts
    total = batch * n
    if total:
        block, warps = _QUERY_LAUNCH
        _deform_kernel[(triton.cdiv(total, block),)](
            pts, out, idx, obs, can, fb, grid.lo, grid.size, grid.starts, grid.counts, grid.pool, grid.seeds,
            grid.spheres, total, n, num_faces, int(canon_tris.shape[0] > 1), grid.res, float(cfg.shell), float(cfg.blend),
            float(cfg.shell + cfg.blend) ** 2,
            MAP=map_points, PLANE=cfg.projection == "plane", HAS_FALLBACK=fallback is not None,
            HARD_BLEND=cfg.blend == 0, BLOCK=block, num_warps=warps)
    return (out if map_points else None), idx


# ----------------------------------------------------------------------------- eq. 5 in PyTorch


def _smooth_weight(distance: Tensor, shell: float, blend: float) -> Tensor:
    """1 up to ``shell``, 0 beyond ``shell + blend``, C1 smoothstep in between."""
    if blend == 0:
        return (distance <= shell).to(distance.dtype)
    t = ((distance - shell) / blend).clamp(0, 1)
    return 1 - t * t * (3 - 2 * t)


def _rigid(points: Tensor, fallback: Tensor | None) -> Tensor:
    return points if fallback is None else points @ fallback[:, :3, :3].transpose(1, 2) + fallback[:, None, :3, 3]


def map_from_triangles(points: Tensor, obs_verts: Tensor, canon_verts: Tensor, faces: Tensor,
                       fallback: Tensor | None, tri_idx: Tensor, cfg: DeformationConfig,
                       return_info: bool = False) -> Tensor | tuple[Tensor, DeformationInfo]:
    """Eq. 5, the blend weight and the rigid fallback given each point's nearest triangle (-1: none).

    Differentiable in points, vertices and fallback; only points with a triangle are gathered."""
    rigid = _rigid(points, fallback)
    b_idx, n_idx = (tri_idx >= 0).nonzero(as_tuple=True)
    face = faces[tri_idx[b_idx, n_idx]]  # (M,3)
    t_obs = obs_verts[b_idx[:, None], face]  # (M,3,3)
    canon_b = b_idx if canon_verts.shape[0] > 1 else torch.zeros_like(b_idx)
    t_can = canon_verts[canon_b[:, None], face]
    p = points[b_idx, n_idx]
    a, b, c = t_obs[:, 0], t_obs[:, 1], t_obs[:, 2]
    closest = closest_point_barycentrics(p, a, b, c)
    bary = closest if cfg.projection == "closest" else plane_barycentrics(p, a, b, c)
    dist = (p - _interp(closest, t_obs)).norm(dim=-1)
    n_obs, n_can = _unit_normal(t_obs), _unit_normal(t_can)
    offset = _dot(p - _interp(bary, t_obs), n_obs)
    mapped = _interp(bary, t_can) + offset[:, None] * n_can  # eq. 5
    weight = _smooth_weight(dist, cfg.shell, cfg.blend)
    blended = weight[:, None] * mapped + (1 - weight[:, None]) * rigid[b_idx, n_idx]
    out = rigid.index_put((b_idx, n_idx), blended)
    if not return_info:
        return out
    where = (b_idx, n_idx)
    zeros = points.new_zeros(tri_idx.shape)
    dist_all = torch.full_like(zeros, float("inf")).index_put(where, dist)
    info = DeformationInfo(
        distance=dist_all,
        triangle=tri_idx,
        barycentrics=points.new_zeros(points.shape).index_put(where, bary),
        offset=zeros.index_put(where, offset),
        weight=zeros.index_put(where, weight),
        inside=dist_all <= cfg.shell,
    )
    return out, info


def _points_grad_triton(points: Tensor, obs_tris: Tensor, canon_tris: Tensor, fallback: Tensor | None,
                        idx: Tensor, grad_out: Tensor, cfg: DeformationConfig) -> Tensor:
    """Gradient w.r.t. the points of the fused forward (plane projection), one Triton kernel."""
    batch, n = points.shape[:2]
    pts = points.detach().float().contiguous()
    grad_in = torch.empty_like(pts)
    total = batch * n
    if total:
        block, warps = 128, 4
        _deform_backward_kernel[(triton.cdiv(total, block),)](
            pts, grad_out.float().contiguous(), grad_in, idx, obs_tris.detach().float().contiguous(),
            canon_tris.detach().float().contiguous(), pts if fallback is None else fallback.detach().float().contiguous(),
            total, n, obs_tris.shape[1], int(canon_tris.shape[0] > 1), float(cfg.shell), float(cfg.blend),
            HAS_FALLBACK=fallback is not None, HARD_BLEND=cfg.blend == 0, BLOCK=block, num_warps=warps)
    return grad_in.to(points.dtype)


class _FusedDeformation(torch.autograd.Function):
    """Forward: the fused Triton kernel. Backward on the saved triangle choice: a Triton kernel for
    the points alone with the plane projection (what training needs), else eq. 5 in PyTorch (the
    PyTorch path's function, so the gradients are that path's)."""

    @staticmethod
    def forward(ctx, points, obs_verts, canon_verts, fallback, faces, cfg, grid):
        out, idx = triton_deform(points.detach(), obs_verts.detach()[:, faces], canon_verts.detach()[:, faces],
                                 None if fallback is None else fallback.detach(), cfg, grid=grid)
        ctx.save_for_backward(points, obs_verts, canon_verts, fallback, faces, idx)
        ctx.cfg = cfg
        return out.to(points.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        points, obs_verts, canon_verts, fallback, faces, idx = ctx.saved_tensors
        inputs = [points, obs_verts, canon_verts, fallback]
        needs = [t is not None and need for t, need in zip(inputs, ctx.needs_input_grad[:4])]
        if needs == [True, False, False, False] and ctx.cfg.projection == "plane":
            return (_points_grad_triton(points, obs_verts[:, faces], canon_verts[:, faces], fallback, idx,
                                        grad_out, ctx.cfg), None, None, None, None, None, None)
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(need) if t is not None else None for t, need in zip(inputs, needs)]
            out = map_from_triangles(*leaves[:3], faces, leaves[3], idx.long(), ctx.cfg)
            wanted = [t for t, need in zip(leaves, needs) if need]
            grads = iter(torch.autograd.grad(out, wanted, grad_out, allow_unused=True))
        return (*[next(grads) if need else None for need in needs], None, None, None)


# ----------------------------------------------------------------------------- the module


class SurfaceFieldDeformation(torch.nn.Module):
    """D(x) of eq. 5 with an exact grid-accelerated nearest-triangle search and a rigid fallback."""

    def __init__(self, faces: Tensor, cfg: DeformationConfig | None = None):
        super().__init__()
        cfg = cfg or DeformationConfig()
        cfg.validate()
        if faces.dim() != 2 or faces.shape[1] != 3 or faces.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"faces: expected an integer tensor of shape (F,3), got {faces.dtype} {tuple(faces.shape)}")
        if faces.numel() == 0 or int(faces.min()) < 0:
            raise ValueError("faces: expected a non-empty face list with non-negative vertex indices")
        self.cfg = cfg
        self.max_vertex = int(faces.max())  # checked per call without a device sync
        self.register_buffer("faces", faces.long(), persistent=False)

    def _check(self, points: Tensor, obs_verts: Tensor, canon_verts: Tensor) -> None:
        if points.dim() != 3 or points.shape[-1] != 3:
            raise ValueError(f"points: expected shape (B,N,3), got {tuple(points.shape)}")
        if obs_verts.dim() != 3 or obs_verts.shape[-1] != 3 or obs_verts.shape[0] != points.shape[0]:
            raise ValueError(f"obs_verts: expected shape ({points.shape[0]},V,3), got {tuple(obs_verts.shape)}")
        if canon_verts.dim() != 3 or canon_verts.shape[0] not in (1, points.shape[0]) or canon_verts.shape[1:] != obs_verts.shape[1:]:
            raise ValueError(
                f"canon_verts: expected shape (1 or {points.shape[0]},{obs_verts.shape[1]},3), got {tuple(canon_verts.shape)}"
            )
        if self.max_vertex >= obs_verts.shape[1]:
            raise ValueError(f"faces index vertex {self.max_vertex} but the meshes have {obs_verts.shape[1]} vertices")

    def bind(self, obs_verts: Tensor, canon_verts: Tensor, fallback: Tensor | None = None):
        """D bound to these meshes, for several calls (a render's coarse and importance passes): on
        the Triton path the observation meshes' candidate grid is built at the first call and reused
        (it depends on the observation mesh only, so the results are those of unbound calls)."""
        built: list[FixedGrid] = []

        def deform(points: Tensor) -> Tensor:
            if not (self.cfg.enabled and self._use_triton(points.device)):
                return self(points, obs_verts, canon_verts, fallback)
            if not built:
                self._check(points, obs_verts, canon_verts)
                with torch.no_grad():
                    built.append(grid_for(obs_verts[:, self.faces], self.cfg))
            return self(points, obs_verts, canon_verts, fallback, grid=built[0])

        return deform

    def _use_triton(self, device: torch.device) -> bool:
        backend = self.cfg.backend
        if backend == "torch" or (backend == "auto" and (device.type != "cuda" or triton is None)):
            return False
        if triton is None:
            raise RuntimeError("deformation backend='triton' requested but Triton is not importable")
        return True

    def forward(
        self,
        points: Tensor,
        obs_verts: Tensor,
        canon_verts: Tensor,
        fallback: Tensor | None = None,
        return_info: bool = False,
        grid: FixedGrid | None = None,
    ) -> Tensor | tuple[Tensor, DeformationInfo]:
        """Map observation-space points (B,N,3) to canonical space (B,N,3).

        obs_verts (B,V,3) / canon_verts (B or 1,V,3) share ``faces``. ``fallback`` is an optional
        (B,4,4) rigid transform for points beyond the shell (identity if None). Differentiable in
        points, vertices and fallback; the discrete triangle choice is not. ``grid``: the Triton
        path's candidate grid of ``obs_verts`` when already built (see ``bind``).
        """
        self._check(points, obs_verts, canon_verts)
        cfg = self.cfg
        if not cfg.enabled:
            if return_info:
                raise ValueError("return_info=True needs deformation enabled=True")
            return _rigid(points, fallback)
        if self._use_triton(points.device):
            if not return_info:
                return _FusedDeformation.apply(points, obs_verts, canon_verts, fallback, self.faces, cfg, grid)
            with torch.no_grad():
                _, tri_idx = triton_deform(points, obs_verts[:, self.faces], canon_verts[:, self.faces], fallback,
                                           cfg, map_points=False, grid=grid)
            return map_from_triangles(points, obs_verts, canon_verts, self.faces, fallback, tri_idx.long(), cfg, True)
        with torch.no_grad():
            search = make_search(cfg, points.device)
            tris_det = obs_verts.detach().float()[:, self.faces]
            tri_idx, d2 = grid_nearest(points.detach().float(), tris_det, cfg.shell + cfg.blend,
                                       list(cfg.grid_levels), search)
            tri_idx = torch.where(d2 <= (cfg.shell + cfg.blend) ** 2, tri_idx, -1)  # weight 0 beyond reach
        return map_from_triangles(points, obs_verts, canon_verts, self.faces, fallback, tri_idx, cfg, return_info)

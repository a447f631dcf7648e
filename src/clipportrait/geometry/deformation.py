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
grown by shell + blend. A cell of half-diagonal h with centre c keeps every triangle t with
dist(c, t) <= min_t' dist(c, t') + 2h (the nearest triangle of any point in the cell satisfies this
by the triangle inequality); each level refines the previous one, whose lists contain all of a child
cell's candidates. Cells with min dist > shell + blend + h contain only fallback points. A query then
tests only its cell's few candidates. Backends: pure PyTorch (any device; pairs are evaluated in
chunks) and Triton kernels (CUDA) for the candidate loops.
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
    pair_chunk: int = 1 << 21  # PyTorch backend: (query, triangle) pairs evaluated at once
    backend: str = "auto"  # "auto" (Triton on CUDA when importable), "torch", "triton"

    def validate(self) -> None:
        if self.shell < 0 or self.blend < 0:
            raise ValueError(f"deformation shell={self.shell}, blend={self.blend}: expected >= 0")
        if self.projection not in ("plane", "closest"):
            raise ValueError(f"deformation projection={self.projection!r}: expected 'plane' or 'closest'")
        if self.backend not in ("auto", "torch", "triton"):
            raise ValueError(f"deformation backend={self.backend!r}: expected 'auto', 'torch' or 'triton'")
        levels = list(self.grid_levels)
        if not levels or any(r < 1 for r in levels) or any(b % a for a, b in zip(levels, levels[1:])):
            raise ValueError(
                f"deformation grid_levels={levels}: expected positive resolutions, each dividing the next"
            )
        if self.pair_chunk < 1:
            raise ValueError(f"deformation pair_chunk={self.pair_chunk}: expected >= 1")


@dataclass
class DeformationInfo:
    """Per-point diagnostics of a deformation call (all (B,N) except barycentrics (B,N,3))."""

    distance: Tensor  # unsigned distance to the observation mesh (inf where beyond shell + blend)
    triangle: Tensor  # nearest triangle index, -1 where beyond shell + blend
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


def closest_point_barycentrics(p: Tensor, a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """Barycentric weights (..., 3) of the point of triangle (a, b, c) closest to p (broadcast (...,3)).

    Voronoi-region classification of p against the triangle's vertices, edges and face (the standard
    construction: dot products of p - vertex with the two edge vectors), evaluated branch-free.
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
    return torch.stack((1 - v - w, v, w), dim=-1)


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


def _cell_centres(lo: Tensor, cell: Tensor, res: int) -> Tensor:
    ar = torch.arange(res, device=lo.device, dtype=lo.dtype) + 0.5
    ijk = torch.stack(torch.meshgrid(ar, ar, ar, indexing="ij"), dim=-1).reshape(-1, 3)
    return (lo[:, None] + ijk[None] * cell[:, None]).reshape(-1, 3)


def _child_to_parent(batch: int, res: int, parent_res: int, device: torch.device) -> Tensor:
    factor = res // parent_res
    ar = torch.arange(res, device=device) // factor
    i, j, k = torch.meshgrid(ar, ar, ar, indexing="ij")
    local = ((i * parent_res + j) * parent_res + k).reshape(-1)
    return (torch.arange(batch, device=device)[:, None] * parent_res**3 + local[None]).reshape(-1)


class _TorchSearch:
    """Candidate loops in plain PyTorch: expand (query, candidate) pairs chunk by chunk."""

    def __init__(self, pair_chunk: int):
        self.pair_chunk = pair_chunk

    def _chunks(self, counts: Tensor):
        """Yield query ranges [q0, q1) whose candidate pairs fit in pair_chunk (at least one query)."""
        ends = torch.cumsum(counts, 0).cpu()
        q0, n = 0, counts.numel()
        while q0 < n:
            base = int(ends[q0 - 1]) if q0 > 0 else 0
            q1 = int(torch.searchsorted(ends, torch.tensor(base + self.pair_chunk), right=True))
            q1 = min(max(q1, q0 + 1), n)
            yield q0, q1
            q0 = q1

    @staticmethod
    def _pairs(starts: Tensor, counts: Tensor, cand: Tensor) -> tuple[Tensor, Tensor]:
        query = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
        first = torch.cumsum(counts, 0) - counts
        rank = torch.arange(query.numel(), device=counts.device) - first[query]
        return query, cand[starts[query] + rank]

    def nearest(self, queries: Tensor, starts: Tensor, counts: Tensor, cand: Tensor, tris: Tensor):
        """Per query: (min squared distance, global triangle id) over its candidates; (inf, -1) if none."""
        best_d2 = torch.full((queries.shape[0],), float("inf"), device=queries.device, dtype=queries.dtype)
        best_tri = torch.full((queries.shape[0],), -1, device=queries.device, dtype=torch.long)
        for q0, q1 in self._chunks(counts):
            query, tri = self._pairs(starts[q0:q1], counts[q0:q1], cand)
            if query.numel() == 0:
                continue
            d2 = _point_triangle_dist2(queries[q0:q1][query], tris[tri])
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

    def select(self, queries: Tensor, starts: Tensor, counts: Tensor, cand: Tensor, tris: Tensor,
               slack: Tensor, limit: Tensor) -> tuple[Tensor, Tensor]:
        """Per query keep candidates with dist <= min dist + slack, none if min dist > limit.

        Returns (new counts, new candidate list in query order)."""
        new_counts = torch.zeros_like(counts)
        kept = []
        for q0, q1 in self._chunks(counts):
            query, tri = self._pairs(starts[q0:q1], counts[q0:q1], cand)
            if query.numel() == 0:
                continue
            dist = _point_triangle_dist2(queries[q0:q1][query], tris[tri]).sqrt()
            seg_min = torch.full((q1 - q0,), float("inf"), device=dist.device, dtype=dist.dtype)
            seg_min = seg_min.scatter_reduce(0, query, dist, reduce="amin")
            keep = (dist <= seg_min[query] + slack[q0:q1][query]) & (seg_min[query] <= limit[q0:q1][query])
            new_counts[q0:q1] = torch.bincount(query[keep], minlength=q1 - q0)
            kept.append(tri[keep])
        tris_out = torch.cat(kept) if kept else cand.new_zeros(0)
        return new_counts, tris_out


# ----------------------------------------------------------------------------- Triton kernels (CUDA)

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the PyTorch search is used
    triton = None

if triton is not None:

    @triton.jit
    def _tri_dist2(px, py, pz, ax, ay, az, bx, by, bz, cx, cy, cz):
        """Squared point-triangle distance; same region logic as closest_point_barycentrics."""
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
        qx = ax + v * abx + w * acx - px
        qy = ay + v * aby + w * acy - py
        qz = az + v * abz + w * acz - pz
        return qx * qx + qy * qy + qz * qz

    @triton.jit
    def _load_tri(tri_ptr, t, mask):
        base = t * 9
        ax = tl.load(tri_ptr + base + 0, mask=mask, other=0.0)
        ay = tl.load(tri_ptr + base + 1, mask=mask, other=0.0)
        az = tl.load(tri_ptr + base + 2, mask=mask, other=0.0)
        bx = tl.load(tri_ptr + base + 3, mask=mask, other=0.0)
        by = tl.load(tri_ptr + base + 4, mask=mask, other=0.0)
        bz = tl.load(tri_ptr + base + 5, mask=mask, other=0.0)
        cx = tl.load(tri_ptr + base + 6, mask=mask, other=0.0)
        cy = tl.load(tri_ptr + base + 7, mask=mask, other=0.0)
        cz = tl.load(tri_ptr + base + 8, mask=mask, other=0.0)
        return ax, ay, az, bx, by, bz, cx, cy, cz

    @triton.jit
    def _nearest_kernel(q_ptr, start_ptr, count_ptr, cand_ptr, tri_ptr, d2_ptr, idx_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        px = tl.load(q_ptr + offs * 3 + 0, mask=m, other=0.0)
        py = tl.load(q_ptr + offs * 3 + 1, mask=m, other=0.0)
        pz = tl.load(q_ptr + offs * 3 + 2, mask=m, other=0.0)
        start = tl.load(start_ptr + offs, mask=m, other=0)
        count = tl.load(count_ptr + offs, mask=m, other=0)
        best = tl.full([BLOCK], float("inf"), tl.float32)
        best_t = tl.full([BLOCK], -1, tl.int64)
        # A while loop on the block's largest count (also runs under TRITON_INTERPRET=1).
        kmax = tl.max(count, axis=0)
        k = 0
        while k < kmax:
            act = k < count
            t = tl.load(cand_ptr + start + k, mask=act, other=0)
            ax, ay, az, bx, by, bz, cx, cy, cz = _load_tri(tri_ptr, t, act)
            d2 = _tri_dist2(px, py, pz, ax, ay, az, bx, by, bz, cx, cy, cz)
            better = act & (d2 < best)
            best = tl.where(better, d2, best)
            best_t = tl.where(better, t, best_t)
            k += 1
        tl.store(d2_ptr + offs, best, mask=m)
        tl.store(idx_ptr + offs, best_t, mask=m)

    @triton.jit
    def _select_kernel(q_ptr, start_ptr, count_ptr, cand_ptr, tri_ptr, thresh2_ptr, out_start_ptr, out_count_ptr,
                       out_ptr, n, WRITE: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        px = tl.load(q_ptr + offs * 3 + 0, mask=m, other=0.0)
        py = tl.load(q_ptr + offs * 3 + 1, mask=m, other=0.0)
        pz = tl.load(q_ptr + offs * 3 + 2, mask=m, other=0.0)
        start = tl.load(start_ptr + offs, mask=m, other=0)
        count = tl.load(count_ptr + offs, mask=m, other=0)
        thresh2 = tl.load(thresh2_ptr + offs, mask=m, other=-1.0)
        out_start = tl.load(out_start_ptr + offs, mask=m, other=0)
        kept = tl.zeros([BLOCK], tl.int64)
        kmax = tl.max(count, axis=0)
        k = 0
        while k < kmax:
            act = k < count
            t = tl.load(cand_ptr + start + k, mask=act, other=0)
            ax, ay, az, bx, by, bz, cx, cy, cz = _load_tri(tri_ptr, t, act)
            d2 = _tri_dist2(px, py, pz, ax, ay, az, bx, by, bz, cx, cy, cz)
            keep = act & (d2 <= thresh2)
            if WRITE:
                tl.store(out_ptr + out_start + kept, t, mask=keep)
            kept += keep.to(tl.int64)
            k += 1
        if not WRITE:
            tl.store(out_count_ptr + offs, kept, mask=m)


class TritonSearch:
    """Candidate loops as Triton kernels: one program per BLOCK queries, looping over candidates."""

    BLOCK = 128

    def _grid(self, n: int):
        return (triton.cdiv(n, self.BLOCK),)

    def nearest(self, queries: Tensor, starts: Tensor, counts: Tensor, cand: Tensor, tris: Tensor):
        n = queries.shape[0]
        d2 = torch.empty(n, device=queries.device, dtype=torch.float32)
        idx = torch.empty(n, device=queries.device, dtype=torch.long)
        if n:
            _nearest_kernel[self._grid(n)](queries.float().contiguous(), starts.contiguous(), counts.contiguous(),
                                           cand.contiguous(), tris.float().contiguous(), d2, idx, n, BLOCK=self.BLOCK)
        return d2, idx

    def select(self, queries: Tensor, starts: Tensor, counts: Tensor, cand: Tensor, tris: Tensor,
               slack: Tensor, limit: Tensor) -> tuple[Tensor, Tensor]:
        n = queries.shape[0]
        d2, _ = self.nearest(queries, starts, counts, cand, tris)
        dmin = d2.sqrt()
        # Squared threshold; -1 rejects everything in cells wholly beyond the reach.
        thresh2 = torch.where(dmin <= limit, (dmin + slack) ** 2, torch.full_like(dmin, -1.0)).float()
        args = (queries.float().contiguous(), starts.contiguous(), counts.contiguous(), cand.contiguous(),
                tris.float().contiguous(), thresh2)
        new_counts = torch.zeros_like(counts)
        out_start = torch.zeros_like(counts)
        _select_kernel[self._grid(n)](*args, out_start, new_counts, cand, n, WRITE=False, BLOCK=self.BLOCK)
        out_start = torch.cumsum(new_counts, 0) - new_counts
        out = torch.empty(int(new_counts.sum()), device=cand.device, dtype=cand.dtype)
        _select_kernel[self._grid(n)](*args, out_start, new_counts, out, n, WRITE=True, BLOCK=self.BLOCK)
        return new_counts, out


def _make_search(backend: str, device: torch.device, pair_chunk: int):
    if backend == "torch" or (backend == "auto" and (device.type != "cuda" or triton is None)):
        return _TorchSearch(pair_chunk)
    if triton is None:
        raise RuntimeError("deformation backend='triton' requested but Triton is not importable")
    return TritonSearch()


def build_candidate_grid(
    tris: Tensor, reach: float, levels: list[int], search
) -> _Grid:
    """Exact candidate grid for triangles ``tris`` (B,F,3,3) over their bounding box grown by ``reach``."""
    batch, num_faces = tris.shape[:2]
    device, dtype = tris.device, tris.dtype
    flat = tris.reshape(-1, 3, 3)
    corners = tris.reshape(batch, -1, 3)
    # The margin keeps every point within `reach` of the mesh strictly inside the box.
    margin = reach + 1e-4 * (corners.amax(1) - corners.amin(1)).amax(-1, keepdim=True) + 1e-6
    lo = corners.amin(1) - margin
    size = corners.amax(1) + margin - lo
    # Root: one cell per mesh listing all of its triangles.
    parent_res = 1
    offsets = torch.arange(batch + 1, device=device) * num_faces
    cand = torch.arange(batch * num_faces, device=device)
    for res in levels:
        cell = size / res
        half_diag = 0.5 * cell.norm(dim=-1)  # (B,)
        centres = _cell_centres(lo, cell, res)
        parent = _child_to_parent(batch, res, parent_res, device)
        starts, counts = offsets[parent], offsets[parent + 1] - offsets[parent]
        per_cell = half_diag.repeat_interleave(res**3)
        tol = 1e-3 * per_cell + 1e-6  # float32 rounding of the distances
        counts, cand = search.select(centres, starts, counts, cand, flat, 2 * per_cell + tol, reach + per_cell + tol)
        offsets = torch.cat((counts.new_zeros(1), torch.cumsum(counts, 0)))
        parent_res = res
    return _Grid(parent_res, lo, size / parent_res, offsets, cand)


def grid_nearest(points: Tensor, grid: _Grid, tris: Tensor, search) -> tuple[Tensor, Tensor]:
    """Nearest triangle (local index, -1 if none within reach) and squared distance for points (B,N,3)."""
    batch, n = points.shape[:2]
    num_faces = tris.shape[1]
    res = grid.res
    rel = (points - grid.lo[:, None]) / grid.cell[:, None]
    outside = ((rel < 0) | (rel >= res)).any(-1)
    ijk = rel.floor().long().clamp(0, res - 1)
    cell = (torch.arange(batch, device=points.device)[:, None] * res + ijk[..., 0]) * res + ijk[..., 1]
    cell = (cell * res + ijk[..., 2]).reshape(-1)
    starts = grid.offsets[cell]
    counts = torch.where(outside.reshape(-1), torch.zeros_like(starts), grid.offsets[cell + 1] - starts)
    d2, tri = search.nearest(points.reshape(-1, 3), starts, counts, grid.tris, tris.reshape(-1, 3, 3))
    batch_base = torch.arange(batch, device=points.device).repeat_interleave(n) * num_faces
    local = torch.where(tri >= 0, tri - batch_base, tri)
    return local.reshape(batch, n), d2.reshape(batch, n)


# ----------------------------------------------------------------------------- the module


def _smooth_weight(distance: Tensor, shell: float, blend: float) -> Tensor:
    """1 up to ``shell``, 0 beyond ``shell + blend``, C1 smoothstep in between."""
    if blend == 0:
        return (distance <= shell).to(distance.dtype)
    t = ((distance - shell) / blend).clamp(0, 1)
    return 1 - t * t * (3 - 2 * t)


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
        if int(self.faces.max()) >= obs_verts.shape[1]:
            raise ValueError(f"faces index vertex {int(self.faces.max())} but the meshes have {obs_verts.shape[1]} vertices")

    def forward(
        self,
        points: Tensor,
        obs_verts: Tensor,
        canon_verts: Tensor,
        fallback: Tensor | None = None,
        return_info: bool = False,
    ) -> Tensor | tuple[Tensor, DeformationInfo]:
        """Map observation-space points (B,N,3) to canonical space (B,N,3).

        obs_verts (B,V,3) / canon_verts (B or 1,V,3) share ``faces``. ``fallback`` is an optional
        (B,4,4) rigid transform for points beyond the shell (identity if None). Differentiable in
        points and vertices; the discrete triangle choice is not.
        """
        self._check(points, obs_verts, canon_verts)
        rigid = points if fallback is None else points @ fallback[:, :3, :3].transpose(1, 2) + fallback[:, None, :3, 3]
        cfg = self.cfg
        if not cfg.enabled:
            if return_info:
                raise ValueError("return_info=True needs deformation enabled=True")
            return rigid
        obs_tris = obs_verts[:, self.faces]  # (B,F,3,3)
        canon_tris = canon_verts[:, self.faces].expand_as(obs_tris)
        reach = cfg.shell + cfg.blend
        with torch.no_grad():
            search = _make_search(cfg.backend, points.device, cfg.pair_chunk)
            tris_det = obs_tris.detach().float()
            grid = build_candidate_grid(tris_det, reach, list(cfg.grid_levels), search)
            tri_idx, _ = grid_nearest(points.detach().float(), grid, tris_det, search)
        found = tri_idx >= 0
        safe_idx = tri_idx.clamp_min(0)
        gather = safe_idx[..., None, None].expand(-1, -1, 3, 3)
        t_obs = torch.gather(obs_tris, 1, gather)  # (B,N,3,3)
        t_can = torch.gather(canon_tris, 1, gather)
        a, b, c = t_obs[..., 0, :], t_obs[..., 1, :], t_obs[..., 2, :]
        closest = closest_point_barycentrics(points, a, b, c)
        bary = closest if cfg.projection == "closest" else plane_barycentrics(points, a, b, c)
        dist = (points - _interp(closest, t_obs)).norm(dim=-1)
        n_obs, n_can = _unit_normal(t_obs), _unit_normal(t_can)
        offset = _dot(points - _interp(bary, t_obs), n_obs)
        mapped = _interp(bary, t_can) + offset[..., None] * n_can  # eq. 5
        weight = torch.where(found, _smooth_weight(dist, cfg.shell, cfg.blend), torch.zeros_like(dist))
        out = torch.where(found[..., None], weight[..., None] * mapped + (1 - weight[..., None]) * rigid, rigid)
        if not return_info:
            return out
        inf = torch.full_like(dist, float("inf"))
        info = DeformationInfo(
            distance=torch.where(found, dist, inf),
            triangle=tri_idx,
            barycentrics=bary,
            offset=torch.where(found, offset, torch.zeros_like(offset)),
            weight=weight,
            inside=found & (dist <= cfg.shell),
        )
        return out, info

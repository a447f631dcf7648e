"""Mesh decimation that keeps a subset of the original vertices (quadric-error half-edge collapse).

The deformation D (paper eq. (4)-(5)) runs on a simplified mesh (~2,500 triangles, paper sec. 4)
that must be the SAME triangulation for the observation and the canonical mesh. Decimating once on
a template and keeping only original vertices (no new positions) gives exactly that: for any
parameters, ``verts[:, kept_ids]`` with ``faces`` is the simplified mesh.

Each step collapses the half-edge u -> v with the smallest quadric error (Garland-Heckbert plane
quadrics, area weighted) evaluated at v, subject to: u is not on a boundary, the link condition
(common neighbours of u and v = faces sharing the edge; keeps the mesh a 2-manifold), and no
triangle around u flips or degenerates. Winding is preserved, so an outward-oriented closed mesh
stays closed and outward-oriented.
"""

from __future__ import annotations

import heapq

import numpy as np


def _plane_quadrics(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    tri = vertices[faces]
    normal = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    double_area = np.linalg.norm(normal, axis=1, keepdims=True)
    unit = normal / np.maximum(double_area, 1e-30)
    plane = np.concatenate((unit, -(unit * tri[:, 0]).sum(1, keepdims=True)), axis=1)  # (F,4)
    face_q = 0.5 * double_area[:, :, None] * plane[:, :, None] * plane[:, None, :]
    quadrics = np.zeros((len(vertices), 4, 4))
    for k in range(3):
        np.add.at(quadrics, faces[:, k], face_q)
    return quadrics


def decimate(
    vertices: np.ndarray, faces: np.ndarray, target_faces: int, max_normal_change_deg: float = 75.0
) -> tuple[np.ndarray, np.ndarray]:
    """Decimate ``faces`` (F,3) over ``vertices`` (V,3) to about ``target_faces`` triangles.

    Returns ``(kept_vertex_ids (Vs,), faces (Fs,3) indexing into kept_vertex_ids)``. Stops early
    (with more faces) if no valid collapse is left.
    """
    vertices = np.asarray(vertices, dtype=np.float64)
    faces = np.array(faces, dtype=np.int64, copy=True)
    if vertices.ndim != 2 or vertices.shape[1] != 3:
        raise ValueError(f"vertices: expected shape (V,3), got {vertices.shape}")
    if faces.ndim != 2 or faces.shape[1] != 3 or faces.min() < 0 or faces.max() >= len(vertices):
        raise ValueError(f"faces: expected (F,3) indices into {len(vertices)} vertices, got shape {faces.shape}")
    if target_faces < 4:
        raise ValueError(f"target_faces={target_faces}: expected >= 4")
    num_vertices = len(vertices)
    alive = np.ones(len(faces), dtype=bool)
    vertex_faces: list[set[int]] = [set() for _ in range(num_vertices)]
    for fi, tri in enumerate(faces):
        for vi in tri:
            vertex_faces[vi].add(fi)
    edges = np.sort(np.concatenate((faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]])), axis=1)
    unique_edges, counts = np.unique(edges, axis=0, return_counts=True)
    on_boundary = np.zeros(num_vertices, dtype=bool)
    on_boundary[unique_edges[counts == 1].ravel()] = True
    quadrics = _plane_quadrics(vertices, faces)
    version = np.zeros(num_vertices, dtype=np.int64)
    removed = np.zeros(num_vertices, dtype=bool)
    cos_limit = np.cos(np.radians(max_normal_change_deg))

    def neighbours(u: int) -> set[int]:
        return {int(w) for f in vertex_faces[u] for w in faces[f]} - {u}

    homogeneous = np.concatenate((vertices, np.ones((num_vertices, 1))), axis=1)

    def push_all(us: np.ndarray, vs: np.ndarray) -> None:
        """Queue half-edges us[i] -> vs[i] with cost vh^T (Q_u + Q_v) vh at vh = (v, 1)."""
        keep = ~on_boundary[us]
        us, vs = us[keep], vs[keep]
        vh = homogeneous[vs]
        costs = np.einsum("ni,nij,nj->n", vh, quadrics[us] + quadrics[vs], vh)
        for c, u, v in zip(costs.tolist(), us.tolist(), vs.tolist()):
            heapq.heappush(heap, (c, u, v, int(version[u]), int(version[v])))

    heap: list[tuple[float, int, int, int, int]] = []
    push_all(unique_edges[:, 0], unique_edges[:, 1])
    push_all(unique_edges[:, 1], unique_edges[:, 0])

    def collapse_is_valid(u: int, v: int, shared: set[int]) -> bool:
        if len(neighbours(u) & neighbours(v)) != len(shared) or len(shared) != 2:
            return False
        around = faces[list(vertex_faces[u] - shared)]
        tri = vertices[around]
        moved = np.where((around == u)[..., None], vertices[v], tri)
        old = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
        new = np.cross(moved[:, 1] - moved[:, 0], moved[:, 2] - moved[:, 0])
        norm_new, norm_old = np.linalg.norm(new, axis=1), np.linalg.norm(old, axis=1)
        flipped = (new * old).sum(1) < cos_limit * norm_new * norm_old
        return not (flipped.any() or (norm_new < 1e-3 * norm_old).any())

    num_alive = len(faces)
    while num_alive > target_faces and heap:
        _, u, v, ver_u, ver_v = heapq.heappop(heap)
        if removed[u] or removed[v] or ver_u != version[u] or ver_v != version[v]:
            continue
        shared = vertex_faces[u] & vertex_faces[v]
        if not shared or not collapse_is_valid(u, v, shared):
            continue
        for f in shared:
            alive[f] = False
            for w in faces[f]:
                vertex_faces[w].discard(f)
        num_alive -= len(shared)
        for f in vertex_faces[u]:
            faces[f][faces[f] == u] = v
            vertex_faces[v].add(f)
        vertex_faces[u] = set()
        removed[u] = True
        quadrics[v] += quadrics[u]
        # Only costs of edges into or out of v changed (v's quadric grew): re-queue those; the
        # version stamp retires their old heap entries.
        version[v] += 1
        ring = np.fromiter(neighbours(v), dtype=np.int64)
        centre = np.full_like(ring, v)
        push_all(centre, ring)
        push_all(ring, centre)
    kept_faces = faces[alive]
    kept_ids = np.unique(kept_faces)
    remap = np.full(num_vertices, -1, dtype=np.int64)
    remap[kept_ids] = np.arange(len(kept_ids))
    return kept_ids, remap[kept_faces]

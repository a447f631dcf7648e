"""EG3D camera-label conventions (DESIGN.md section 4): labels, look-at, rays, projection, mirroring."""

import math

import pytest
import torch

from clipportrait.geometry import cameras as C


def _random_labels(batch: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    labels = C.sample_ffhq_like(batch, generator=g, yaw_std=0.6, pitch_std=0.3)
    cam2world, K = C.split_labels(labels)
    # Vary the intrinsics too, so tests do not silently rely on fx = fy or cx = cy = 0.5.
    K = K.clone()
    K[:, 0, 0] *= 1.1
    K[:, 0, 2] = 0.47
    K[:, 1, 2] = 0.53
    return C.make_labels(cam2world, K)


def test_label_round_trip_and_rotation_is_orthonormal():
    """make_labels/split_labels invert each other, and look-at rotations are proper rotations."""
    cam2world = C.lookat_cam2world(torch.tensor([0.3, -0.5]), torch.tensor([0.1, 0.4]))
    K = C.intrinsics(focal=3.0, cx=0.4, cy=0.6, batch=2)
    c2w_back, K_back = C.split_labels(C.make_labels(cam2world, K))
    assert torch.equal(c2w_back, cam2world) and torch.equal(K_back, K)
    R = cam2world[:, :3, :3]
    assert torch.allclose(R.transpose(1, 2) @ R, torch.eye(3).expand(2, 3, 3), atol=1e-6)
    assert torch.allclose(torch.linalg.det(R), torch.ones(2), atol=1e-6)
    assert torch.equal(cam2world[:, 3], torch.tensor([0.0, 0.0, 0.0, 1.0]).expand(2, 4))


def test_inverse_3x3_matches_linalg_in_float64():
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(64, 3, 3, dtype=torch.float64, generator=gen)
    m[0] = torch.tensor([[4.26, 0.0, 0.5], [0.0, 4.26, 0.5], [0.0, 0.0, 1.0]])  # FFHQ-like intrinsics
    inverse, det = C.inverse_3x3(m)
    assert torch.allclose(inverse, torch.linalg.inv(m), rtol=1e-9, atol=1e-9)
    assert torch.allclose(det, torch.linalg.det(m), rtol=1e-9, atol=1e-12)
    assert C.inverse_3x3(torch.zeros(1, 3, 3))[1].eq(0).all()


def test_split_labels_rejects_bad_input():
    """Wrong shapes and non-finite entries raise ValueError naming the argument."""
    with pytest.raises(ValueError, match="labels"):
        C.split_labels(torch.zeros(2, 24))
    with pytest.raises(ValueError, match="labels"):
        C.split_labels(torch.zeros(25))
    bad = C.neutral_labels(3)
    bad[1, 5] = float("nan")
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        C.split_labels(bad)
    with pytest.raises(ValueError, match="cam2world"):
        C.make_labels(torch.zeros(2, 3, 4), torch.zeros(2, 3, 3))
    singular = C.neutral_labels(3)
    singular[2, 16:] = 0.0  # K = 0: no ray through any pixel
    with pytest.raises(ValueError, match=r"singular intrinsics in rows \[2\]"):
        C.ray_bundle(singular, 4)


def test_frontal_camera_axes_and_position():
    """Neutral camera sits at pivot + (0,0,2.7), looks at the pivot along -z, image down = world -y,
    image right = world +x (EG3D's look-at; checked element by element)."""
    cam2world, K = C.split_labels(C.neutral_labels())
    assert torch.allclose(cam2world[0, :3, 3], torch.tensor([0.0, 0.0, 2.9]))
    expected_R = torch.tensor([[1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, -1.0]])
    assert torch.allclose(cam2world[0, :3, :3], expected_R, atol=1e-7)
    assert torch.allclose(K[0], torch.tensor([[4.2647, 0, 0.5], [0, 4.2647, 0.5], [0, 0, 1]]))
    uv, depth = C.project_points(torch.tensor([[list(C.DEFAULT_PIVOT)]]), C.neutral_labels())
    assert torch.allclose(uv, torch.tensor([[[0.5, 0.5]]])) and torch.allclose(depth, torch.tensor([[2.7]]))


def test_yaw_and_pitch_directions():
    """Positive yaw moves the camera toward world +x, positive pitch moves it up; every camera on the
    orbit is at distance radius from the pivot and projects the pivot onto the image centre."""
    c2w = C.lookat_cam2world(torch.tensor([math.pi / 2, 0.0, 0.3]), torch.tensor([0.0, 0.5, -0.2]))
    pivot = torch.tensor(C.DEFAULT_PIVOT)
    assert torch.allclose(c2w[0, :3, 3], pivot + torch.tensor([2.7, 0.0, 0.0]), atol=1e-6)
    assert c2w[1, 1, 3] > 0.5 and c2w[2, 0, 3] > 0
    assert torch.allclose((c2w[:, :3, 3] - pivot).norm(dim=-1), torch.full((3,), 2.7))
    labels = C.make_labels(c2w, C.intrinsics(batch=3))
    uv, _ = C.project_points(pivot.expand(3, 1, 3), labels)
    assert torch.allclose(uv, torch.full((3, 1, 2), 0.5), atol=1e-6)


def test_projection_of_a_point_by_hand():
    """Frontal camera at (0,0,2.9): world (0.1, 0.2, 0.2) -> camera (x=0.1, y=-0.2, z=2.7);
    u = 4.2647*0.1/2.7 + 0.5 = 0.6579519, v = 4.2647*(-0.2)/2.7 + 0.5 = 0.1840963; on a 512 image
    that is column 0.6579519*512 = 336.87 (pixel 336) and row 94.26 (pixel 94): above-right of centre."""
    uv, depth = C.project_points(torch.tensor([[[0.1, 0.2, 0.2]]]), C.neutral_labels())
    assert torch.allclose(uv[0, 0], torch.tensor([0.6579519, 0.1840963]), atol=1e-6)
    assert torch.allclose(depth, torch.tensor([[2.7]]))


def test_ray_bundle_layout_and_passes_through_projected_points():
    """Ray k = i*R + j passes through the pixel-centre ((j+.5)/R, (i+.5)/R); a point placed on that ray
    projects back onto that centre, and the ray through a point's projection hits the point."""
    labels = _random_labels(2)
    res = 5
    origins, dirs = C.ray_bundle(labels, res)
    assert origins.shape == dirs.shape == (2, res * res, 3)
    assert torch.allclose(dirs.norm(dim=-1), torch.ones(2, res * res), atol=1e-6)
    i, j = 3, 1
    points = origins[:, i * res + j] + 2.5 * dirs[:, i * res + j]
    uv, depth = C.project_points(points[:, None], labels)
    assert torch.allclose(uv[:, 0], torch.tensor([(j + 0.5) / res, (i + 0.5) / res]).expand(2, 2), atol=1e-5)
    assert (depth > 0).all()
    # Conversely: project a random world point, then check the distance of the point to the ray
    # built from the same normalised coordinates at resolution 1 with a shifted principal point.
    x = torch.tensor([[0.13, -0.07, 0.31], [-0.2, 0.15, 0.05]])
    uv, _ = C.project_points(x[:, None], labels)
    c2w, K = C.split_labels(labels)
    K_shift = K.clone()
    K_shift[:, :2, 2] -= uv[:, 0] - 0.5  # pixel centre of a 1x1 image is (0.5, 0.5)
    o, d = C.ray_bundle(C.make_labels(c2w, K_shift), 1)
    to_point = x - o[:, 0]
    off_ray = to_point - (to_point * d[:, 0]).sum(-1, keepdim=True) * d[:, 0]
    assert off_ray.norm(dim=-1).max() < 1e-5


def test_pytorch3d_conversion_agrees_with_project_points():
    """pytorch3d's screen projection of the converted cameras (pixels, origin top-left) equals
    project_points * image size, for non-square images and non-centred principal points."""
    labels = _random_labels(3, seed=1)
    points = torch.randn(3, 7, 3) * 0.2
    height, width = 48, 64
    uv, depth = C.project_points(points, labels)
    cams = C.to_pytorch3d_cameras(labels, (height, width))
    screen = cams.transform_points_screen(points, image_size=((height, width),))
    expected = uv * torch.tensor([width, height])
    assert torch.allclose(screen[..., :2], expected, atol=1e-3)
    # pytorch3d's perspective projection stores 1/z in the third coordinate; view space holds z.
    view = cams.get_world_to_view_transform().transform_points(points)
    assert torch.allclose(view[..., 2], depth, atol=1e-5)


def test_mirror_labels_flips_projection():
    """Projecting the world-mirrored point (-x, y, z) with mirror_labels gives (1 - u, v), same depth;
    mirroring twice is the identity."""
    labels = _random_labels(4, seed=2)
    points = torch.randn(4, 6, 3) * 0.3
    uv, depth = C.project_points(points, labels)
    mirrored = C.mirror_labels(labels)
    uv_m, depth_m = C.project_points(points * torch.tensor([-1.0, 1.0, 1.0]), mirrored)
    assert torch.allclose(uv_m[..., 0], 1 - uv[..., 0], atol=1e-5)
    assert torch.allclose(uv_m[..., 1], uv[..., 1], atol=1e-5)
    assert torch.allclose(depth_m, depth, atol=1e-5)
    assert torch.allclose(C.mirror_labels(mirrored), labels)
    c2w_m, _ = C.split_labels(mirrored)
    assert torch.allclose(torch.linalg.det(c2w_m[:, :3, :3]), torch.ones(4), atol=1e-5)


def test_sample_ffhq_like_is_deterministic_and_clipped():
    """Same generator seed -> identical labels; yaw/pitch stay inside the clip and have roughly the
    requested spread; the pivot projects to the image centre for every sample."""
    a = C.sample_ffhq_like(2000, generator=torch.Generator().manual_seed(5))
    b = C.sample_ffhq_like(2000, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    c2w, K = C.split_labels(a)
    offset = c2w[:, :3, 3] - torch.tensor(C.DEFAULT_PIVOT)
    yaw = torch.atan2(offset[:, 0], offset[:, 2])
    pitch = torch.asin(offset[:, 1] / 2.7)
    assert yaw.abs().max() <= 0.9 + 1e-5 and pitch.abs().max() <= 0.45 + 1e-5
    assert 0.25 < yaw.std() < 0.33 and 0.12 < pitch.std() < 0.17
    uv, _ = C.project_points(torch.tensor(C.DEFAULT_PIVOT).expand(2000, 1, 3), a)
    assert torch.allclose(uv, torch.full_like(uv, 0.5), atol=1e-5)
    assert torch.allclose(K, C.intrinsics(batch=2000))

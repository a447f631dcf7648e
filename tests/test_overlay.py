"""Overlay of projected wireframe and landmarks (camera convention check by hand-computed pixels)."""

import numpy as np
import pytest
import torch
from PIL import Image
from pytorch3d.utils import ico_sphere

from clipportrait.geometry import cameras as C
from clipportrait.geometry.overlay import draw_overlay


def test_landmark_lands_on_hand_computed_pixel(tmp_path):
    """Frontal camera, 64^2 image: landmark (0.1, 0.2, 0.2) is at camera (0.1, -0.2, 2.7), so
    u = (4.2647*0.1/2.7 + 0.5)*64 = 42.11 -> column 42 and v = (4.2647*(-0.2)/2.7 + 0.5)*64 = 11.78
    -> row 11. That pixel turns red, the mirrored position (column 21) stays background, and the
    saved PNG holds the same pixels."""
    image = -torch.ones(3, 64, 64)  # black
    mesh = ico_sphere(1)
    verts = mesh.verts_packed() * 0.05 + torch.tensor([-0.15, -0.15, 0.2])  # lower-left, away from the dot
    out = draw_overlay(image, verts, mesh.faces_packed(), C.neutral_labels()[0],
                       landmarks=torch.tensor([[0.1, 0.2, 0.2]]), path=tmp_path / "o.png", landmark_radius=1)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert tuple(out[11, 42]) == (255, 0, 0)
    assert tuple(out[11, 21]) == (0, 0, 0)
    assert (out[..., 0] == 255).sum() <= 9  # a radius-1 dot, nothing else red
    # Wireframe: the small sphere at world (-0.15, -0.15) appears lower-left in the image.
    green = out[..., 1] == 255
    rows, cols = green.nonzero()
    assert green.sum() > 5 and rows.min() > 32 and cols.max() < 32
    assert np.array_equal(np.asarray(Image.open(tmp_path / "o.png")), out)


def test_uint8_input_and_bad_input():
    """uint8 HWC input is drawn on without modifying the caller's array; bad shapes raise ValueError."""
    base = np.full((32, 32, 3), 100, dtype=np.uint8)
    mesh = ico_sphere(1)
    out = draw_overlay(base, mesh.verts_packed() * 0.1 + torch.tensor([0, 0, 0.2]), mesh.faces_packed(), C.neutral_labels())
    assert (base == 100).all() and (out != 100).any()
    with pytest.raises(ValueError, match="image"):
        draw_overlay(torch.zeros(1, 8, 8), mesh.verts_packed(), mesh.faces_packed(), C.neutral_labels())
    with pytest.raises(ValueError, match="landmarks"):
        draw_overlay(base, mesh.verts_packed(), mesh.faces_packed(), C.neutral_labels(), landmarks=torch.zeros(3))

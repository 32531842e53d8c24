"""Graf geometry: hand-constructed lines with known angles (engine/geometry.py)."""
import math

import numpy as np
import pytest
import torch

from engine.tasks.hip_us.geometry import acute_line_angle_deg, graf_angles_deg, graf_type, is_type_ii


def _dir(angle_deg: float, length: float = 1.0) -> np.ndarray:
    a = math.radians(angle_deg)
    return np.array([math.cos(a), math.sin(a)]) * length


def hip_kpts(alpha_deg: float, beta_deg: float) -> np.ndarray:
    """Six landmarks with a vertical baseline P1-P2 and roof lines at the requested angles to it
    (direction (sin a, cos a) makes angle a with the baseline direction (0, 1))."""
    p1, p2 = np.array([100.0, 20.0]), np.array([100.0, 110.0])
    a, b = math.radians(alpha_deg), math.radians(beta_deg)
    p3 = np.array([60.0, 180.0])
    p5 = p3 + 40.0 * np.array([math.sin(a), -math.cos(a)])
    p4 = np.array([130.0, 100.0])
    p6 = p4 + 30.0 * np.array([-math.sin(b), math.cos(b)])
    return np.stack([p1, p2, p3, p4, p5, p6])


def test_perpendicular_lines_are_90_degrees():
    assert acute_line_angle_deg([0, 0], [5, 0], [2, -3], [2, 7]) == pytest.approx(90.0, abs=1e-12)


def test_parallel_and_antiparallel_lines_are_0_degrees():
    assert acute_line_angle_deg([0, 0], [4, 2], [1, 5], [9, 9]) == pytest.approx(0.0, abs=1e-12)
    assert acute_line_angle_deg([0, 0], [4, 2], [9, 9], [1, 5]) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("angle_deg", [30.0, 45.0, 60.0, 7.5, 89.0])
def test_constructed_angles(angle_deg):
    got = acute_line_angle_deg([3, 4], np.array([3, 4]) + _dir(0, 10), [-2, 1], np.array([-2, 1]) + _dir(angle_deg, 3))
    assert float(got) == pytest.approx(angle_deg, abs=1e-9)


@pytest.mark.parametrize("obtuse_deg, acute_deg", [(120.0, 60.0), (150.0, 30.0), (135.0, 45.0), (180.0, 0.0)])
def test_obtuse_directions_give_the_acute_angle(obtuse_deg, acute_deg):
    got = acute_line_angle_deg([0, 0], _dir(0), [0, 0], _dir(obtuse_deg))
    assert float(got) == pytest.approx(acute_deg, abs=1e-9)


def test_zero_length_line_gives_nan_numpy_and_torch():
    assert math.isnan(float(acute_line_angle_deg([1, 1], [1, 1], [0, 0], [1, 0])))
    assert math.isnan(float(acute_line_angle_deg([0, 0], [1, 0], [2, 3], [2, 3])))
    t = acute_line_angle_deg(torch.tensor([[1.0, 1.0], [0.0, 0.0]]), torch.tensor([[1.0, 1.0], [0.0, 1.0]]),
                             torch.zeros(2, 2), torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    assert torch.isnan(t[0]) and float(t[1]) == pytest.approx(90.0)


def test_batched_broadcasting_over_leading_dims():
    angles = np.array([[10.0, 20.0, 30.0], [100.0, 170.0, 90.0]])  # (2, 3)
    b2 = np.stack([np.stack([_dir(a) for a in row]) for row in angles])  # (2, 3, 2)
    got = acute_line_angle_deg(np.zeros(2), np.array([1.0, 0.0]), np.zeros((2, 3, 2)), b2)
    assert got.shape == (2, 3)
    np.testing.assert_allclose(got, [[10, 20, 30], [80, 10, 90]], atol=1e-9)


def test_torch_input_returns_tensor_matching_numpy():
    rng = np.random.default_rng(0)
    pts = rng.normal(size=(4, 5, 2))
    want = acute_line_angle_deg(pts[0], pts[1], pts[2], pts[3])
    got = acute_line_angle_deg(*(torch.from_numpy(p).float() for p in pts))
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), want, atol=1e-3)


def test_bad_point_shape_raises():
    with pytest.raises(ValueError, match="engine/tasks/hip_us/geometry.py.*a2"):
        acute_line_angle_deg([0, 0], [1, 0, 0], [0, 0], [1, 1])


def test_graf_angles_single_and_batched():
    alpha, beta = graf_angles_deg(hip_kpts(62.0, 73.0))
    assert float(alpha) == pytest.approx(62.0, abs=1e-9) and float(beta) == pytest.approx(73.0, abs=1e-9)
    batch = np.stack([hip_kpts(a, b) for a, b in [(50.0, 80.0), (68.5, 41.0), (60.0, 55.0)]])
    alpha, beta = graf_angles_deg(torch.from_numpy(batch))
    np.testing.assert_allclose(alpha.numpy(), [50.0, 68.5, 60.0], atol=1e-9)
    np.testing.assert_allclose(beta.numpy(), [80.0, 41.0, 55.0], atol=1e-9)


def test_graf_angles_use_the_right_landmarks():
    """Moving P4/P6 changes only beta; moving P3/P5 changes only alpha."""
    k = hip_kpts(62.0, 73.0)
    moved = k.copy()
    moved[5] += [7.0, -3.0]
    a0, b0 = graf_angles_deg(k)
    a1, b1 = graf_angles_deg(moved)
    assert float(a1) == pytest.approx(float(a0)) and abs(float(b1) - float(b0)) > 1.0
    moved = k.copy()
    moved[4] += [5.0, 2.0]
    a2, b2 = graf_angles_deg(moved)
    assert float(b2) == pytest.approx(float(b0)) and abs(float(a2) - float(a0)) > 1.0


def test_graf_angles_reject_wrong_landmark_count():
    with pytest.raises(ValueError, match="engine/tasks/hip_us/geometry.py.*6, 2"):
        graf_angles_deg(np.zeros((5, 2)))


def test_graf_type_threshold_at_60_degrees():
    assert graf_type(59.99) == "II"
    assert graf_type(60.0) == "I"
    assert graf_type(72.0) == "I"
    assert graf_type(43.0) == "II"
    np.testing.assert_array_equal(is_type_ii([59.0, 60.0, float("nan")]), [True, False, False])
    with pytest.raises(ValueError, match="finite"):
        graf_type(float("nan"))

"""Hip X-ray geometry (engine/tasks/hip_xray/geometry.py): acetabular index, IHDI local frame and grades
(docs/systems/hip_xray_efficientnet.md)."""
import math

import numpy as np
import pytest

from _xray_cases import hand_pelvis
from engine.tasks.hip_xray.geometry import (XRAY_FLIP_PAIRS, acetabular_index_deg, hilgenreiner_frame,
                                            ihdi_grades, ihdi_local_xy, roman)


def _base() -> np.ndarray:
    return hand_pelvis()  # tests/_xray_cases.py: AI and IHDI worked out by hand there


def _with_right_h(h_xy) -> np.ndarray:
    k = _base()
    k[9] = k[11] = h_xy  # h_r = (p10 + p12) / 2 exactly
    return k


def _with_left_h(h_xy) -> np.ndarray:
    k = _base()
    k[3] = k[5] = h_xy
    return k


def test_acetabular_index_hand_computed():
    ai_l, ai_r = acetabular_index_deg(_base())
    assert ai_l.shape == () and ai_r.shape == ()
    assert float(ai_l) == pytest.approx(math.degrees(math.atan2(30, 40)), abs=1e-12)  # 36.8699
    assert float(ai_r) == pytest.approx(math.degrees(math.atan2(20, 40)), abs=1e-12)  # 26.5651


def test_acetabular_index_matches_arccos_formula_on_a_batch():
    rng = np.random.default_rng(0)
    k = _base()[None] + rng.normal(0, 8, size=(50, 12, 2))
    ai_l, ai_r = acetabular_index_deg(k)
    v_h = k[:, 6] - k[:, 2]

    def arccos_angle(a, b):
        c = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
        return np.degrees(np.arccos(np.clip(c, -1, 1)))

    np.testing.assert_allclose(ai_l, arccos_angle(v_h, k[:, 2] - k[:, 0]), atol=1e-6)
    np.testing.assert_allclose(ai_r, arccos_angle(-v_h, k[:, 6] - k[:, 8]), atol=1e-6)
    assert ai_l.shape == (50,)


def test_local_xy_and_grades_hand_computed():
    xy = ihdi_local_xy(_base())
    np.testing.assert_allclose(xy, [[-15.0, 30.0], [10.0, 20.0]], atol=1e-12)
    f = hilgenreiner_frame(_base())
    np.testing.assert_allclose(f["u_h"], [1, 0])
    np.testing.assert_allclose(f["u_p"], [0, 1])  # image-down
    np.testing.assert_allclose(f["o_left"], [60, 100])
    np.testing.assert_allclose(f["o_right"], [240, 100])
    g_l, g_r = ihdi_grades(_base())
    assert (int(g_l), int(g_r)) == (1, 2)


@pytest.mark.parametrize("h_r, xy, grade", [
    ((250.0, 100.0), (10.0, 0.0), 4),    # y = 0 exactly, lateral: on the H-line counts as IV (y <= 0)
    ((240.0, 120.0), (0.0, 20.0), 2),    # x = 0 exactly, below: on the P-line is lateral side (x >= 0), y > x -> II
    ((260.0, 120.0), (20.0, 20.0), 3),   # y = x exactly: not y > x -> III
    ((240.0, 100.0), (0.0, 0.0), 4),     # the H/P-line crossing: y <= 0 -> IV
    ((270.0, 110.0), (30.0, 10.0), 3),   # lateral of the D-line, below H -> III
    ((230.0, 90.0), (-10.0, -10.0), 4),  # quadrant the publication leaves undefined (above H, medial to P): decided IV
    ((230.0, 100.0), (-10.0, 0.0), 4),   # y = 0 and medial: IV as well
    ((239.0, 101.0), (-1.0, 1.0), 1),    # just below and medial -> I
])
def test_right_hip_grade_boundaries(h_r, xy, grade):
    k = _with_right_h(h_r)
    got = ihdi_local_xy(k)[1]
    assert tuple(got) == xy  # exact floats land exactly on the boundary
    assert int(ihdi_grades(k)[1]) == grade


@pytest.mark.parametrize("h_l, xy, grade", [
    ((60.0, 130.0), (0.0, 30.0), 2),     # x = 0 on the left P-line
    ((40.0, 120.0), (20.0, 20.0), 3),    # left lateral is image-left: x_l = -(40 - 60) = 20, y = x -> III
    ((50.0, 100.0), (10.0, 0.0), 4),     # y = 0
    ((80.0, 90.0), (-20.0, -10.0), 4),   # undefined quadrant -> IV
])
def test_left_hip_grade_boundaries_are_mirrored(h_l, xy, grade):
    k = _with_left_h(h_l)
    assert tuple(ihdi_local_xy(k)[0]) == xy
    assert int(ihdi_grades(k)[0]) == grade


def _mirror(k: np.ndarray, width: float) -> np.ndarray:
    m = k.copy()
    m[..., 0] = width - 1 - m[..., 0]
    out = m.copy()
    for i, j in XRAY_FLIP_PAIRS:
        out[..., i, :], out[..., j, :] = m[..., j, :], m[..., i, :]
    return out


def test_mirror_flip_keeps_ai_and_swaps_sides():
    rng = np.random.default_rng(1)
    k = _base()[None] + rng.normal(0, 15, size=(40, 12, 2))
    f = _mirror(k, width=320.0)
    ai_l, ai_r = acetabular_index_deg(k)
    fai_l, fai_r = acetabular_index_deg(f)
    np.testing.assert_allclose(fai_l, ai_r, atol=1e-9)
    np.testing.assert_allclose(fai_r, ai_l, atol=1e-9)
    np.testing.assert_allclose(ihdi_local_xy(f)[:, ::-1], ihdi_local_xy(k), atol=1e-9)
    g_l, g_r = ihdi_grades(k)
    fg_l, fg_r = ihdi_grades(f)
    np.testing.assert_array_equal(fg_l, g_r)
    np.testing.assert_array_equal(fg_r, g_l)
    assert len(set(g_l.tolist()) | set(g_r.tolist())) >= 3  # the noise reaches several grades


@pytest.mark.parametrize("angle_deg", [17.0, 90.0, 150.0, -123.0])
def test_rotation_translation_scale_invariance(angle_deg):
    rng = np.random.default_rng(2)
    k = _base()[None] + rng.normal(0, 15, size=(40, 12, 2))
    t = math.radians(angle_deg)
    rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    r = 1.7 * (k - 150.0) @ rot.T + np.array([400.0, -30.0])
    for a, b in zip(acetabular_index_deg(k), acetabular_index_deg(r)):
        np.testing.assert_allclose(a, b, atol=1e-9)
    np.testing.assert_allclose(ihdi_local_xy(r), 1.7 * ihdi_local_xy(k), atol=1e-8)
    xy = ihdi_local_xy(k)
    clear = (np.abs(xy[..., 1]) > 1e-6) & (np.abs(xy[..., 0]) > 1e-6) & (np.abs(xy[..., 0] - xy[..., 1]) > 1e-6)
    for a, b in zip(ihdi_grades(k), ihdi_grades(r)):
        np.testing.assert_array_equal(a[clear[:, 0] & clear[:, 1]], b[clear[:, 0] & clear[:, 1]])


def test_degenerate_and_non_finite_inputs():
    k = np.stack([_base()] * 3)
    k[0, 6] = k[0, 2]           # p3 == p7: no Hilgenreiner line
    k[1, 0] = k[1, 2]           # p1 == p3: left roof undefined only
    k[2, 11] = np.nan           # right H-point unknown
    ai_l, ai_r = acetabular_index_deg(k)
    assert np.isnan(ai_l[0]) and np.isnan(ai_r[0])
    assert np.isnan(ai_l[1]) and math.isclose(ai_r[1], math.degrees(math.atan2(20, 40)))
    g_l, g_r = ihdi_grades(k)
    assert g_l.tolist() == [0, 2, 1] and g_r.tolist() == [0, 2, 0]
    # p1 == p3 puts the left P-line at p3 (100, 100): h_l (75, 130) is then x = 25, y = 30 -> II
    np.testing.assert_allclose(ihdi_local_xy(k[1])[0], [25.0, 30.0])
    assert np.isnan(ihdi_local_xy(k[0])).all()


def test_bad_shape_and_roman():
    with pytest.raises(ValueError, match=r"\(\.\.\., 12, 2\)"):
        acetabular_index_deg(np.zeros((6, 2)))
    assert [roman(g) for g in range(5)] == ["n/a", "I", "II", "III", "IV"]
    with pytest.raises(ValueError):
        roman(5)

"""Paediatric AP pelvis X-ray geometry (docs/systems/hip_xray_efficientnet.md): acetabular index (AI) and IHDI grade of
each hip.

Landmarks p1..p12 are indices 0..11 of a (..., 12, 2) array of (x, y) pixels, x right, y down
(data_pipelines/batch.py). Image-left hip: p1 lateral acetabular edge -> p3 medial (triradiate / Hilgenreiner point)
along the roof, p4..p6 femoral points; image-right hip: p7 medial -> p9 lateral, p10..p12 femoral points.

Acetabular index, degrees in [0, 180]:
    v_h = p7 - p3                      (Hilgenreiner line, image-left to image-right)
    AI_left  = angle(v_h,  p3 - p1)    AI_right = angle(-v_h, p7 - p9)
    angle(a, b) = arccos(a.b / (|a| |b|)), evaluated as atan2(|a x b|, a.b): the same angle, but accurate near 0 and
    180 deg where arccos of a rounded cosine loses half the digits.

IHDI grade (International Hip Dysplasia Institute), per hip:
    u_h = unit(p7 - p3); u_p = (-u_h.y, u_h.x), u_h turned +90 deg in image coordinates. For every anatomically
          ordered input (p7 to the right of p3) this is the perpendicular pointing image-down, as the published
          definition has it; taking it as a fixed rotation of u_h (rather than "whichever perpendicular has y > 0")
          makes the grades invariant to any rotation of the image, and mirror-consistent.
    P-line origins o_l = proj_H(p1), o_r = proj_H(p9) (orthogonal projection onto the line through p3 along u_h);
    H-points h_l = (p4 + p6) / 2, h_r = (p10 + p12) / 2;
    local x = (h - o).u_h, y = (h - o).u_p; the left hip is mirrored (x_l = -x_l), so +x is lateral and +y is
    inferior (below the H-line) on both sides.
    Grade: y <= 0                -> IV (at or above the H-line)
           y > 0 and x < 0       -> I  (below the H-line, medial to the P-line)
           y > 0 and x >= 0      -> II if y > x (medial to the 45-deg diagonal D-line) else III.
    The published definition leaves y <= 0 and x < 0 (above the H-line AND medial to the P-line) undefined. Here it is
    grade IV: the IHDI paper (Narayanan et al., J Pediatr Orthop 2015) defines grade IV as "H-point superior to the
    H-line" with no lateral condition, and such a point (anatomically the head inside the acetabular roof, so in
    practice a bad prediction) should err towards the severe grade, not pass as normal. So grade IV <=> y <= 0.
    Grade 0 means undefined: a degenerate Hilgenreiner line (p3 == p7) or non-finite coordinates.

Everything is vectorised numpy (float64) over any leading batch dims.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from data_pipelines.readers.xray_csv import NUM_XRAY_KPTS as NUM_XRAY_LANDMARKS
from data_pipelines.readers.xray_csv import XRAY_FLIP_PAIRS, XRAY_KPT_NAMES  # noqa: F401  (one source of truth: the reader)

P1, P2, P3, P4, P5, P6, P7, P8, P9, P10, P11, P12 = range(12)
GRADE_UNDEFINED = 0
_ROMAN = {0: "n/a", 1: "I", 2: "II", 3: "III", 4: "IV"}
_WHERE = "engine/tasks/hip_xray/geometry.py"


def roman(grade: Any) -> str:
    """IHDI grade 1..4 as 'I'..'IV'; 0 (undefined) as 'n/a'."""
    g = int(grade)
    if g not in _ROMAN:
        raise ValueError(f"{_WHERE}: IHDI grade must be 0..4, got {grade}")
    return _ROMAN[g]


def _as_kpts(kpts_K2: Any) -> np.ndarray:
    k = np.asarray(kpts_K2, dtype=np.float64)
    if k.ndim < 2 or k.shape[-2:] != (NUM_XRAY_LANDMARKS, 2):
        raise ValueError(f"{_WHERE}: landmarks must have shape (..., {NUM_XRAY_LANDMARKS}, 2), got {k.shape}")
    return k


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a[..., 0] * b[..., 0] + a[..., 1] * b[..., 1]


def _cross(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]


def vector_angle_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Angle in [0, 180] deg between vectors a and b (..., 2) = arccos(a.b / |a||b|); NaN if either is zero."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    ang = np.degrees(np.arctan2(np.abs(_cross(a, b)), _dot(a, b)))
    zero = ((a[..., 0] == 0) & (a[..., 1] == 0)) | ((b[..., 0] == 0) & (b[..., 1] == 0))
    return np.where(zero, np.nan, ang)


def acetabular_index_deg(kpts_K2: Any) -> tuple[np.ndarray, np.ndarray]:
    """(AI_left, AI_right) in degrees, each of shape kpts.shape[:-2] (0-d for one image); NaN when degenerate."""
    k = _as_kpts(kpts_K2)
    v_h = k[..., P7, :] - k[..., P3, :]
    ai_left = vector_angle_deg(v_h, k[..., P3, :] - k[..., P1, :])
    ai_right = vector_angle_deg(-v_h, k[..., P7, :] - k[..., P9, :])
    return ai_left, ai_right


def hilgenreiner_frame(kpts_K2: Any) -> dict[str, np.ndarray]:
    """The IHDI construction (module docstring): unit vectors u_h, u_p (..., 2), P-line origins o_left/o_right and
    H-points h_left/h_right (..., 2). u_h/u_p are NaN when p3 == p7."""
    k = _as_kpts(kpts_K2)
    v_h = k[..., P7, :] - k[..., P3, :]
    norm = np.hypot(v_h[..., 0], v_h[..., 1])[..., None]
    with np.errstate(invalid="ignore", divide="ignore"):
        u_h = np.where(norm > 0, v_h / np.where(norm > 0, norm, 1.0), np.nan)
    u_p = np.stack([-u_h[..., 1], u_h[..., 0]], axis=-1)
    p3 = k[..., P3, :]

    def proj(p: np.ndarray) -> np.ndarray:  # orthogonal projection onto the H-line through p3
        return p3 + _dot(p - p3, u_h)[..., None] * u_h

    return {"u_h": u_h, "u_p": u_p, "o_left": proj(k[..., P1, :]), "o_right": proj(k[..., P9, :]),
            "h_left": 0.5 * (k[..., P4, :] + k[..., P6, :]), "h_right": 0.5 * (k[..., P10, :] + k[..., P12, :])}


def ihdi_local_xy(kpts_K2: Any) -> np.ndarray:
    """Local (x, y) of each H-point, shape (..., 2 sides [left, right], 2 [x, y]); +x lateral, +y below the H-line
    (the left x mirrored). NaN where the frame is undefined."""
    f = hilgenreiner_frame(kpts_K2)
    d_l, d_r = f["h_left"] - f["o_left"], f["h_right"] - f["o_right"]
    left = np.stack([-_dot(d_l, f["u_h"]), _dot(d_l, f["u_p"])], axis=-1)
    right = np.stack([_dot(d_r, f["u_h"]), _dot(d_r, f["u_p"])], axis=-1)
    return np.stack([left, right], axis=-2)


def grade_from_local_xy(x: Any, y: Any) -> np.ndarray:
    """IHDI grade (int64 1..4, 0 undefined) from local coordinates; rules in the module docstring."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    grade = np.where(y <= 0, 4, np.where(x < 0, 1, np.where(y > x, 2, 3)))
    return np.where(np.isfinite(x) & np.isfinite(y), grade, GRADE_UNDEFINED).astype(np.int64)


def ihdi_grades(kpts_K2: Any) -> tuple[np.ndarray, np.ndarray]:
    """(grade_left, grade_right), int64 arrays of shape kpts.shape[:-2]: 1..4, 0 when undefined."""
    xy = ihdi_local_xy(kpts_K2)
    grades = grade_from_local_xy(xy[..., 0], xy[..., 1])
    return grades[..., 0], grades[..., 1]

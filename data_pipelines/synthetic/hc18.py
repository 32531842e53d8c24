"""Synthetic fetal-head ultrasound in HC18's layout (data_pipelines/readers/hc18.py): the embedded data of the fetal_head task.

Each image shows one ellipse "head": a bright skull ring (echo strongest where the ring is perpendicular to the beam,
i.e. at its top and bottom), a darker brain with a midline echo along the long axis, a mottled soft-tissue
background inside a fan-shaped sector, and multiplicative speckle (magnitude of a smoothed complex Gaussian field,
fully developed speckle, Goodman 1976). The annotation is exactly the ellipse that was drawn:
- mask: 1 where the pixel centre lies inside the ellipse (the README's rule);
- landmarks: the axis end points, ordered by the README's rule (hc18.order_axis_points);
- hc_mm = hc_fit_mm = Ramanujan perimeter of (a, b) x pixel size.

Exams: exam e holds 1 or 2 images (drawn from the seed alone); its images share the pixel size (0.10-0.20 mm) and
the head's size in mm, each image its own pose and a +-3 % size change. Every draw comes from numpy Generators seeded
by (seed, index) or (seed, exam), so an image is a pure function of (seed, its index).
"""
from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from data_pipelines.readers.hc18 import HC18_COLUMNS, HC18_KPT_NAMES, order_axis_points

log = logging.getLogger(__name__)

_EXAM_STREAM = 1_000_003      # second seed word of the exam-level generators (apart from image indices)
_PLAN_STREAM = 2_000_003


def ramanujan_perimeter(a: float, b: float) -> float:
    """pi (a + b) (1 + 3h / (10 + sqrt(4 - 3h))), h = ((a - b) / (a + b))^2 (engine/tasks/fetal_head/ellipse.py holds the same)."""
    h = ((a - b) / (a + b)) ** 2
    return math.pi * (a + b) * (1.0 + 3.0 * h / (10.0 + math.sqrt(4.0 - 3.0 * h)))


def exam_plan(n: int, seed: int) -> list[tuple[str, str]]:
    """(exam_id, stem) per image index: exams of 1 or 2 images (30 % twins), stems NNN_HC / NNN_2HC as in HC18."""
    rng = np.random.default_rng([seed, _PLAN_STREAM])
    plan: list[tuple[str, str]] = []
    exam = 0
    while len(plan) < n:
        size = 2 if rng.random() < 0.3 else 1
        for j in range(min(size, n - len(plan))):
            plan.append((f"{exam:03d}", f"{exam:03d}_{'' if j == 0 else j + 1}HC"))
        exam += 1
    return plan


def _head_pose(rng: np.random.Generator, exam_rng: np.random.Generator, hw: tuple[int, int]) -> dict[str, float]:
    """Centre, semi-axes (px), angle; the whole ellipse (and so every axis end) lies inside the image."""
    h, w = hw
    pixel_mm = float(exam_rng.uniform(0.10, 0.20))
    frac = float(exam_rng.uniform(0.22, 0.36))          # semi-major as a fraction of the width
    ratio = float(exam_rng.uniform(0.72, 0.90))         # b / a (fetal heads: cephalic index ~0.75-0.85)
    a = frac * w * float(rng.uniform(0.97, 1.03))
    b = ratio * a
    angle = float(rng.uniform(0.0, 180.0))
    t = math.radians(angle)
    half_x = math.hypot(a * math.cos(t), b * math.sin(t))   # bounding box of the rotated ellipse
    half_y = math.hypot(a * math.sin(t), b * math.cos(t))
    shrink = min(1.0, 0.46 * (h - 1) / half_y, 0.46 * (w - 1) / half_x)
    a, b, half_x, half_y = a * shrink, b * shrink, half_x * shrink, half_y * shrink
    cx = float(rng.uniform(half_x + 2.0, w - 3.0 - half_x))
    cy = float(rng.uniform(half_y + 2.0, h - 3.0 - half_y))
    return {"cx": cx, "cy": cy, "a": a, "b": b, "angle_deg": angle, "pixel_mm": pixel_mm}


def _ellipse_coords(hw: tuple[int, int], p: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
    """(u, v): pixel-centre coordinates along the long and short axis, relative to the centre."""
    ys, xs = np.mgrid[0:hw[0], 0:hw[1]].astype(np.float64)
    t = math.radians(p["angle_deg"])
    dx, dy = xs - p["cx"], ys - p["cy"]
    return dx * math.cos(t) + dy * math.sin(t), -dx * math.sin(t) + dy * math.cos(t)


def _render(rng: np.random.Generator, hw: tuple[int, int], p: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 image, uint8 0/1 mask) of one head."""
    h, w = hw
    u, v = _ellipse_coords(hw, p)
    r = np.sqrt((u / p["a"]) ** 2 + (v / p["b"]) ** 2)
    mask = (r <= 1.0).astype(np.uint8)
    dist_px = (r - 1.0) * 0.5 * (p["a"] + p["b"])               # ~signed distance to the outline
    thick = float(rng.uniform(2.0, 4.0))
    t = math.radians(p["angle_deg"])
    # outward normal direction ~ (u/a^2, v/b^2) in the ellipse frame; |normal_y| on screen: echo strength
    nu, nv = u / p["a"] ** 2, v / p["b"] ** 2
    ny = (nu * math.sin(t) + nv * math.cos(t)) / np.maximum(np.hypot(nu, nv), 1e-9)
    ring = np.exp(-0.5 * (dist_px / thick) ** 2) * (0.55 + 0.45 * np.abs(ny))
    texture = gaussian_filter(rng.standard_normal(hw), 6.0)
    texture = 0.5 + texture / (4.0 * texture.std() + 1e-9)
    inside = np.clip(1.0 - r, 0.0, 1.0) > 0
    midline = np.exp(-0.5 * (v / 1.5) ** 2) * (np.abs(u) < 0.8 * p["a"]) * inside
    tissue = np.where(inside, 0.18, 0.32) * texture + 0.35 * midline + 0.95 * ring
    ys, xs = np.mgrid[0:h, 0:w]
    fan = np.abs(np.arctan2(xs - (w - 1) / 2.0, ys + 0.25 * h)) < math.radians(rng.uniform(48.0, 58.0))
    field = gaussian_filter(rng.standard_normal(hw), 0.8) + 1j * gaussian_filter(rng.standard_normal(hw), 0.8)
    speckle = np.abs(field) / np.sqrt(np.mean(np.abs(field) ** 2))   # Rayleigh, unit mean power
    depth_gain = 1.0 - 0.35 * ys / h
    image = np.clip(tissue * speckle * depth_gain * fan * 235.0, 0, 255).astype(np.uint8)
    return image, mask


def synth_hc18_sample(index: int, seed: int = 0, image_hw: tuple[int, int] = (270, 400),
                      n: int | None = None) -> dict:
    """Image, mask and the annotations.csv row of image `index` (of a set of n images; n only fixes the exam plan,
    which is a prefix-stable function of the seed, so any n > index gives the same sample)."""
    exam_id, stem = exam_plan(index + 1 if n is None else n, seed)[index]
    hw = (int(image_hw[0]), int(image_hw[1]))
    rng = np.random.default_rng([seed, index])
    p = _head_pose(rng, np.random.default_rng([seed, _EXAM_STREAM, int(exam_id)]), hw)
    image, mask = _render(rng, hw, p)
    t = math.radians(p["angle_deg"])
    ends = np.array([[p["cx"] - p["a"] * math.cos(t), p["cy"] - p["a"] * math.sin(t)],
                     [p["cx"] + p["a"] * math.cos(t), p["cy"] + p["a"] * math.sin(t)],
                     [p["cx"] + p["b"] * math.sin(t), p["cy"] - p["b"] * math.cos(t)],
                     [p["cx"] - p["b"] * math.sin(t), p["cy"] + p["b"] * math.cos(t)]])
    kpts = order_axis_points(ends)
    hc_mm = ramanujan_perimeter(p["a"], p["b"]) * p["pixel_mm"]
    row = {"stem": stem, "width": hw[1], "height": hw[0], "pixel_size_mm": repr(p["pixel_mm"]),
           "hc_mm": f"{hc_mm:.4f}", "exam_id": exam_id, "center_x": f"{p['cx']:.4f}", "center_y": f"{p['cy']:.4f}",
           "semi_major_px": f"{p['a']:.4f}", "semi_minor_px": f"{p['b']:.4f}", "angle_deg": f"{p['angle_deg']:.4f}",
           "hc_fit_mm": f"{hc_mm:.4f}"}
    for k, name in enumerate(HC18_KPT_NAMES):
        row[f"{name}_x"], row[f"{name}_y"] = f"{kpts[k, 0]:.4f}", f"{kpts[k, 1]:.4f}"
    return {"image_HW": image, "mask_HW": mask, "row": row}


def generate_hc18_dataset(root: str | Path, n: int, seed: int = 0, image_hw: tuple[int, int] = (270, 400),
                          progress: bool = False) -> Path:
    """Write n synthetic images into root/images, root/masks and root/annotations.csv (HC18 layout)."""
    if n < 1:
        raise ValueError(f"generate_hc18_dataset: n must be >= 1, got {n}")
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        s = synth_hc18_sample(i, seed, image_hw, n)
        stem = s["row"]["stem"]
        Image.fromarray(s["image_HW"]).save(root / "images" / f"{stem}.png", compress_level=1)
        Image.fromarray(s["mask_HW"]).save(root / "masks" / f"{stem}.png", compress_level=1)
        rows.append(s["row"])
        if progress and (i + 1) % 50 == 0:
            log.info("synth_hc18: %d / %d images", i + 1, n)
    tmp = root / "annotations.csv.tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as fh:       # written last and renamed: a crash mid-way
        writer = csv.DictWriter(fh, fieldnames=list(HC18_COLUMNS))  # leaves no annotations.csv, so a rerun regenerates
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(root / "annotations.csv")
    return root

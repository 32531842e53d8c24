"""Synthetic paediatric AP-pelvis X-ray phantom: the embedded default dataset of the hip X-ray task
(docs/systems/hip_xray_efficientnet.md).

The 12 landmarks are built from design values, so the truth of every derived quantity is known:
- per hip an acetabular index AI ~ U(10, 40) deg and an IHDI grade (I 72 %, II 16 %, III 7 %, IV 5 %);
- geometry in a pelvis frame (reference units: pixels of a 256-px image, y down), Hilgenreiner (H) line horizontal
  at y = Y_H, triradiate points p3 = (-T, Y_H), p7 = (T, Y_H); a roof of length L leaves each triradiate point
  laterally and upwards at angle AI to the H-line, so with Lc = L cos AI, Ls = L sin AI:
      p1 = p3 + (-Lc, -Ls),  p9 = p7 + (Lc, -Ls),  p2 / p8 the roof midpoints.
  Then AI_left = angle(v_h, p3 - p1) and AI_right = angle(-v_h, p7 - p9) (v_h = p7 - p3) equal the design AI, and
  the Perkin-line origins are o_l = proj_H(p1) = (-T - Lc, Y_H), o_r = (T + Lc, Y_H).
- each hip's IHDI local frame (x lateral - the left side mirrored -, y down from the H-line, origin o): the H-point
  h = midpoint(p4, p6) is placed at a design (x, y) inside its grade's region and at least `m` = 0.1 L from every
  grade boundary (x = 0, y = 0, y = x), so rounding the points to integer pixels cannot change the grade;
  p4 / p6 are the medial / lateral corners of the metaphysis (a physis line of width 0.45 L through h, tilted by
  U(-12, 12) deg) and p5 the centre of the femoral-head ossification disc just above the physis.
A per-image pose (rotation +-8 deg, scale 0.92-1.08, shift +-3 %) moves the pelvis rigidly (AI and grade invariant).
After rounding the points to integers (the published CSV format), AI and grade are recomputed with the published
formulas (engine/tasks/hip_xray/geometry.py); a pose whose rounded points move an AI by >= 0.5 deg, change a grade or
leave the image is redrawn.

Image: additive attenuation of soft tissue, iliac wings with bright acetabular roofs (sourcil bands), sacrum,
ischio-pubic bones with obturator foramina, triradiate gaps, femoral metaphyses/shafts with cortices and head
ossification discs; then exposure gradient, Gaussian blur and noise, 8-bit grey PNG. Image i is a pure function of
(seed, i); a patient's second view shares its anatomy (AI, grades, H-points), not its pose.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from data_pipelines.readers.xray_csv import SPLIT_NAMES, XRAY_KPT_NAMES, write_xray_csv

REF_PX = 256.0                     # reference image size of the design units
ROOF_LEN, TRI_HALF, Y_H = 43.0, 31.0, -22.0   # L, T, H-line y (pelvis frame, relative to the image centre)
GRADE_P = {1: 0.72, 2: 0.16, 3: 0.07, 4: 0.05}
AI_RANGE_DEG = (10.0, 40.0)
PHYSIS_W, HEAD_R, PHYSIS_GAP = 0.5 * ROOF_LEN, 10.5, 3.0
MAX_AI_ROUNDING_DEG = 0.5


@dataclass(frozen=True)
class HipDesign:
    """One hip, mirrored local frame (x lateral, y down from the H-line), reference units."""
    ai_deg: float
    grade: int                   # IHDI 1..4
    h_xy: tuple[float, float]    # H-point relative to the Perkin/Hilgenreiner origin
    tilt_deg: float              # physis tilt


@dataclass
class XrayPhantom:
    image_HW: np.ndarray         # uint8 grey
    kpts_px_K2: np.ndarray       # (12, 2) float64, exact (before rounding to the CSV's integers)
    left: HipDesign
    right: HipDesign
    pose: dict


def ai_and_grades(kpts_K2: np.ndarray) -> tuple[float, float, int, int]:
    """(AI_left, AI_right, grade_left, grade_right) by the published formulas (docs/systems/hip_xray_efficientnet.md;
    the generator's own check)."""
    k = np.asarray(kpts_K2, dtype=np.float64)

    def angle(a, b):
        return math.degrees(math.atan2(abs(a[0] * b[1] - a[1] * b[0]), float(a @ b)))

    v_h = k[6] - k[2]
    u_h = v_h / np.linalg.norm(v_h)
    u_p = np.array([-u_h[1], u_h[0]])
    grades = []
    for lat, a, b, sign in ((0, 3, 5, -1.0), (8, 9, 11, 1.0)):
        o = k[2] + ((k[lat] - k[2]) @ u_h) * u_h
        d = 0.5 * (k[a] + k[b]) - o
        x, y = sign * float(d @ u_h), float(d @ u_p)
        grades.append(4 if y <= 0 else 1 if x < 0 else 2 if y > x else 3)
    return angle(v_h, k[2] - k[0]), angle(-v_h, k[6] - k[8]), grades[0], grades[1]


def _head_clearance(ai_deg: float, h_xy: tuple[float, float], tilt_deg: float) -> float:
    """Distance of the head disc's centre below the roof line (p3 -> p1) minus its radius (local frame)."""
    a, t = math.radians(ai_deg), math.radians(tilt_deg)
    cx = h_xy[0] + (HEAD_R + PHYSIS_GAP) * math.sin(t)
    cy = h_xy[1] - (HEAD_R + PHYSIS_GAP) * math.cos(t)
    # The roof line is sin(a) x + cos(a) y = -L sin(a) cos(a); its unit normal (sin a, cos a) points below it.
    return math.sin(a) * cx + math.cos(a) * cy + ROOF_LEN * math.sin(a) * math.cos(a) - HEAD_R


def sample_hip(rng: np.random.Generator) -> HipDesign:
    """AI, grade and the H-point drawn inside the grade's region with margin m = 0.1 L from its boundaries.

    A grade-I head sits in the socket: its disc is redrawn until it clears the bony roof by 3 units (the cartilage
    between the ossification centre and the roof), as on a real film."""
    grade = int(rng.choice(list(GRADE_P), p=list(GRADE_P.values())))
    ai = float(rng.uniform(*AI_RANGE_DEG))
    tilt = float(rng.uniform(-12.0, 12.0))
    L, m = ROOF_LEN, 0.1 * ROOF_LEN
    if grade == 1:      # below the H-line, medial to the Perkin line
        for _ in range(1000):
            x, y = rng.uniform(-0.55 * L, -0.15 * L), rng.uniform(0.3 * L, 0.65 * L)
            if _head_clearance(ai, (x, y), tilt) >= 3.0:
                break
    elif grade == 2:    # lateral to P, below the diagonal y = x
        x = rng.uniform(m, 0.32 * L)
        y = x + rng.uniform(1.5 * m, 0.45 * L)
    elif grade == 3:    # lateral to P, between the diagonal and the H-line
        x = rng.uniform(0.3 * L, 0.5 * L)
        y = rng.uniform(m, x - 1.5 * m)
    else:               # above the H-line, lateral to P
        x, y = rng.uniform(0.12 * L, 0.45 * L), rng.uniform(-0.45 * L, -m)
    return HipDesign(ai, grade, (float(x), float(y)), tilt)


def _hip_points(d: HipDesign) -> np.ndarray:
    """(6, 2) local points in order lateral edge, roof midpoint, triradiate point, medial corner, head centre,
    lateral corner (the left hip's p1..p6; the right hip's p9, p8, p7, p10, p11, p12)."""
    a, t = math.radians(d.ai_deg), math.radians(d.tilt_deg)
    lc, ls = ROOF_LEN * math.cos(a), ROOF_LEN * math.sin(a)
    h = np.array(d.h_xy)
    along, down = np.array([math.cos(t), math.sin(t)]), np.array([-math.sin(t), math.cos(t)])
    return np.array([[0.0, -ls], [-0.5 * lc, -0.5 * ls], [-lc, 0.0], h - 0.5 * PHYSIS_W * along,
                     h - (HEAD_R + PHYSIS_GAP) * down, h + 0.5 * PHYSIS_W * along])


def _to_pelvis(local_K2: np.ndarray, d: HipDesign, side: int) -> np.ndarray:
    """Local hip frame -> pelvis frame; side -1 = image-left (mirrored), +1 = image-right."""
    x_o = side * (TRI_HALF + ROOF_LEN * math.cos(math.radians(d.ai_deg)))
    return np.stack([x_o + side * local_K2[:, 0], Y_H + local_K2[:, 1]], axis=1)


def design_points(left: HipDesign, right: HipDesign) -> np.ndarray:
    """(12, 2) pelvis-frame landmarks p1..p12 of a design."""
    pl, pr = _to_pelvis(_hip_points(left), left, -1), _to_pelvis(_hip_points(right), right, 1)
    return np.concatenate([pl, pr[[2, 1, 0, 3, 4, 5]]])


def _pose_matrix(pose: dict, image_hw: tuple[int, int]) -> np.ndarray:
    """3x3 pelvis frame (reference units, origin at the image centre) -> image pixels."""
    h, w = image_hw
    u = min(h, w) / REF_PX * pose["scale"]
    c, s = math.cos(math.radians(pose["rot_deg"])), math.sin(math.radians(pose["rot_deg"]))
    return np.array([[u * c, -u * s, (w - 1) / 2 + pose["tx"] * w],
                     [u * s, u * c, (h - 1) / 2 + pose["ty"] * h], [0.0, 0.0, 1.0]])


def _draw_pose(rng: np.random.Generator) -> dict:
    return {"rot_deg": float(rng.uniform(-8, 8)), "scale": float(rng.uniform(0.92, 1.08)),
            "tx": float(rng.uniform(-0.03, 0.03)), "ty": float(rng.uniform(-0.03, 0.03))}


def _pose_ok(kpts_K2: np.ndarray, left: HipDesign, right: HipDesign, image_hw: tuple[int, int]) -> bool:
    """Rounded points inside the image (2-px margin), AIs within MAX_AI_ROUNDING_DEG, grades unchanged."""
    r = np.rint(kpts_K2)
    h, w = image_hw
    if not ((r[:, 0] >= 2) & (r[:, 0] <= w - 3) & (r[:, 1] >= 2) & (r[:, 1] <= h - 3)).all():
        return False
    ai_l, ai_r, g_l, g_r = ai_and_grades(r)
    return (abs(ai_l - left.ai_deg) < MAX_AI_ROUNDING_DEG and abs(ai_r - right.ai_deg) < MAX_AI_ROUNDING_DEG
            and (g_l, g_r) == (left.grade, right.grade))


# ----------------------------------------------------------------------------------------------------------------
# Rendering (reference units in the pelvis frame; every region is a closed-form test on the pixel grid)
# ----------------------------------------------------------------------------------------------------------------

def _segment_dist(x, y, a, b):
    abx, aby = float(b[0] - a[0]), float(b[1] - a[1])
    t = np.clip(((x - a[0]) * abx + (y - a[1]) * aby) / (abx * abx + aby * aby), 0.0, 1.0)
    return np.hypot(x - a[0] - t * abx, y - a[1] - t * aby)


def _hip_density(x, y, d: HipDesign, dens: list[float]) -> np.ndarray:
    """Attenuation of one hemipelvis + proximal femur in its local frame (x lateral, y down, origin o)."""
    a = math.radians(d.ai_deg)
    lc, ls = ROOF_LEN * math.cos(a), ROOF_LEN * math.sin(a)
    tan_a = math.tan(a)
    # Ilium: above the roof line (p3 -> p1) and, medial to p3, above the H-line; the wing flares laterally above p1.
    below_roof = np.minimum(-tan_a * (x + lc), 0.0)
    ilium = ((y < below_roof) & (x < 0.45 * np.maximum(0.0, -y - ls)) & (x > -lc - 13.0 - 0.1 * y)
             & (y > -0.5 * ls - 68.0 + 0.012 * (x + 12.0) ** 2))
    out = dens[0] * ilium * (1.0 + 0.25 * np.clip(1.0 + y / 60.0, 0.0, 1.0))
    out += dens[1] * (_segment_dist(x, y, (0.0, -ls), (-lc, 0.0)) < 2.2)           # sourcil: the bright roof
    # Ischio-pubic bone below the triradiate gap (y in [0, 4]) with the obturator foramen.
    g = 4.0
    pubis = ((y > g) & (y < g + 50.0) & (x > -TRI_HALF - lc + 2.0) & (x < -lc + 3.0 - 0.15 * (y - g))
             & (((x + lc + 14.0) / 9.0) ** 2 + ((y - g - 25.0) / 14.0) ** 2 > 1.0))
    out += dens[0] * pubis
    # Femur: metaphysis narrowing into the shaft below the physis, cortex brighter; head disc above the physis.
    t = math.radians(d.tilt_deg)
    du = (x - d.h_xy[0]) * math.cos(t) + (y - d.h_xy[1]) * math.sin(t)
    dv = -(x - d.h_xy[0]) * math.sin(t) + (y - d.h_xy[1]) * math.cos(t)
    half = np.maximum(0.5 * PHYSIS_W - 0.25 * dv, 7.0)
    shaft = (dv >= 0.0) & (np.abs(du) <= half)
    out += dens[2] * shaft + dens[3] * (shaft & (np.abs(du) > half - 2.5))
    out += dens[4] * (np.hypot(du, dv + HEAD_R + PHYSIS_GAP) <= HEAD_R)
    return out


def render_density(left: HipDesign, right: HipDesign, m_px: np.ndarray, image_hw: tuple[int, int],
                   dens: list[float]) -> np.ndarray:
    """float32 (H, W) attenuation image; m_px maps the pelvis frame to image pixels."""
    h, w = image_hw
    inv = np.linalg.inv(m_px).tolist()          # python floats keep the grid maths in float32
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    px = inv[0][0] * xs + inv[0][1] * ys + inv[0][2]
    py = inv[1][0] * xs + inv[1][1] * ys + inv[1][2]
    y_loc = py - Y_H
    out = dens[5] * (((px / 135.0) ** 2 + ((py - 30.0) / 190.0) ** 2) < 1.0)            # soft tissue
    half_sacrum = np.minimum(16.5 - 0.1 * y_loc, 5.0 - 0.5 * y_loc)
    sacrum = (np.abs(px) < half_sacrum) & (y_loc > -80.0) & (y_loc < -6.0)
    foramina = np.minimum.reduce([np.hypot(np.abs(px) - 8.0, y_loc + c) for c in (62.0, 46.0, 31.0)]) < 2.5
    out = out + dens[6] * (sacrum & ~foramina)
    for d, side in ((left, -1), (right, 1)):
        x_o = side * (TRI_HALF + ROOF_LEN * math.cos(math.radians(d.ai_deg)))
        out = out + _hip_density(side * (px - x_o), y_loc, d, dens)
    return out.astype(np.float32)


def render_xray_phantom(rng: np.random.Generator, image_hw: tuple[int, int] = (256, 256),
                        left: HipDesign | None = None, right: HipDesign | None = None,
                        max_tries: int = 200) -> XrayPhantom:
    """One phantom image with its exact landmarks; hips are drawn from rng unless given."""
    left = left if left is not None else sample_hip(rng)
    right = right if right is not None else sample_hip(rng)
    pelvis = design_points(left, right)
    for _ in range(max_tries):
        pose = _draw_pose(rng)
        m_px = _pose_matrix(pose, image_hw)
        kpts = pelvis @ m_px[:2, :2].T + m_px[:2, 2]
        if _pose_ok(kpts, left, right, image_hw):
            break
    else:
        raise RuntimeError(f"render_xray_phantom: no pose in {max_tries} tries keeps the rounded landmarks inside "
                           f"a {image_hw} image with the design AI/grades (image too small?)")
    # Densities: ilium, sourcil, femur, cortex, head, soft tissue, sacrum (each +-15 % per image).
    dens = (np.array([0.40, 0.30, 0.42, 0.12, 0.50, 0.16, 0.26]) * rng.uniform(0.85, 1.15, size=7)).tolist()
    u = min(image_hw) / REF_PX
    img = render_density(left, right, m_px, image_hw, dens)
    h, w = image_hw
    ramp = np.linspace(-1.0, 1.0, w, dtype=np.float32)[None, :] * np.float32(rng.uniform(-0.05, 0.05))
    img = gaussian_filter(img + 0.05 + ramp, sigma=float(rng.uniform(0.6, 1.2) * u), truncate=3.0)
    img = img + rng.normal(0.0, rng.uniform(0.01, 0.035), size=img.shape).astype(np.float32)
    image_HW = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
    return XrayPhantom(image_HW, kpts, left, right, pose)


# ----------------------------------------------------------------------------------------------------------------
# Dataset writer
# ----------------------------------------------------------------------------------------------------------------

def _plan(n: int, seed: int) -> list[tuple[int, int]]:
    """[(patient, view)] per image: 20 % of patients have a second view; a prefix of the plan does not depend on n."""
    rng = np.random.default_rng([seed, 0])
    plan: list[tuple[int, int]] = []
    patient = 0
    while len(plan) < n:
        patient += 1
        views = 2 if rng.random() < 0.2 else 1
        plan.extend((patient, v + 1) for v in range(min(views, n - len(plan))))
    return plan


def _assign_splits(plan: list[tuple[int, int]], fracs: tuple[float, float, float], seed: int) -> dict[int, str]:
    """Whole patients to train/val/test: the first three (seeded order) seed test, val, train (so each split is
    non-empty given >= 3 patients), then each patient goes to the split furthest below its target image count."""
    patients = sorted({p for p, _ in plan})
    size = {p: sum(1 for q, _ in plan if q == p) for p in patients}
    order = [patients[i] for i in np.random.default_rng([seed, 1]).permutation(len(patients))]
    target = {s: f * len(plan) for s, f in zip(SPLIT_NAMES, fracs)}
    count = dict.fromkeys(SPLIT_NAMES, 0)
    out: dict[int, str] = {}
    for k, p in enumerate(order):
        split = ("test", "val", "train")[k] if k < 3 else max(SPLIT_NAMES, key=lambda s: target[s] - count[s])
        out[p] = split
        count[split] += size[p]
    return out


def generate_xray_dataset(root: str | Path, n: int, seed: int = 0, image_hw: tuple[int, int] = (256, 256),
                          split_fracs: tuple[float, float, float] | None = None, progress: bool = False) -> list[Path]:
    """Write n phantom images + CSV annotations + dataset.json under root; returns the CSV paths.

    split_fracs None: flat `root/images`, `root/annotations`; (train, val, test) fractions: the published layout
    `root/<split>/{images,annotations}` with whole patients per split. File stems `xr<patient>_<view>`.
    dataset.json: {"spacing_mm" (nominal), "image_hw", "seed", "samples": [{"id", "image", "csv", "split",
    "patient_id", "ai_left_deg", "ai_right_deg" (design), "ai_left_deg_points", "ai_right_deg_points" (from the
    written integer points), "ihdi_left", "ihdi_right" (1..4 = I..IV), "h_local_left", "h_local_right" (design
    H-point (x lateral, y down) in image pixels), "rot_deg"}]}.
    """
    if n < 1:
        raise ValueError(f"generate_xray_dataset: n must be >= 1, got {n}")
    if split_fracs is not None and (len(split_fracs) != 3 or min(split_fracs) < 0 or
                                    abs(sum(split_fracs) - 1.0) > 1e-6):
        raise ValueError(f"generate_xray_dataset: split_fracs must be 3 fractions summing to 1, got {split_fracs}")
    root, image_hw = Path(root), (int(image_hw[0]), int(image_hw[1]))
    plan = _plan(n, seed)
    split_of = _assign_splits(plan, tuple(split_fracs), seed) if split_fracs is not None else {}
    hips: dict[int, tuple[HipDesign, HipDesign]] = {}
    rows, paths = [], []
    steps = range(n)
    if progress:
        from tqdm import tqdm
        steps = tqdm(steps, desc="synth xray", unit="img")
    for i in steps:
        patient, view = plan[i]
        if patient not in hips:
            rng_p = np.random.default_rng([seed, 2, patient])
            hips[patient] = (sample_hip(rng_p), sample_hip(rng_p))
        ph = render_xray_phantom(np.random.default_rng([seed, 3, i]), image_hw, *hips[patient])
        rows.append(_write_sample(root, ph, f"xr{patient:04d}_{view}", split_of.get(patient), patient))
        paths.append(root / rows[-1]["csv"])
    u = min(image_hw) / REF_PX
    meta = {"generator": "data_pipelines.synthetic.xray", "format": "xray_csv", "seed": seed, "n": n,
            "image_hw": list(image_hw), "split_fracs": list(split_fracs) if split_fracs else None,
            "spacing_mm": [round(0.6 / u, 6)] * 2, "kpt_names": list(XRAY_KPT_NAMES),
            "ihdi": "1=I, 2=II, 3=III, 4=IV", "samples": rows}
    (root / "dataset.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    return paths


def _write_sample(root: Path, ph: XrayPhantom, stem: str, split: str | None, patient: int) -> dict:
    base = root / split if split else root
    (base / "images").mkdir(parents=True, exist_ok=True)
    Image.fromarray(ph.image_HW, mode="L").save(base / "images" / f"{stem}.png", compress_level=3)
    csv = write_xray_csv(base / "annotations" / f"{stem}.csv", ph.kpts_px_K2)
    ai_l, ai_r, _, _ = ai_and_grades(np.rint(ph.kpts_px_K2))
    px_per_ref = min(ph.image_HW.shape) / REF_PX * ph.pose["scale"]
    return {"id": stem, "image": str((base / "images" / f"{stem}.png").relative_to(root)),
            "csv": str(csv.relative_to(root)), "split": split, "patient_id": f"xr{patient:04d}",
            "image_hw": list(ph.image_HW.shape), "ai_left_deg": ph.left.ai_deg, "ai_right_deg": ph.right.ai_deg,
            "ai_left_deg_points": ai_l, "ai_right_deg_points": ai_r, "ihdi_left": ph.left.grade,
            "ihdi_right": ph.right.grade, "h_local_left": [v * px_per_ref for v in ph.left.h_xy],
            "h_local_right": [v * px_per_ref for v in ph.right.h_xy], "rot_deg": ph.pose["rot_deg"]}

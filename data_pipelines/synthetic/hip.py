"""Synthetic infant-hip ultrasound phantom: the embedded default dataset of the hip task
(docs/systems/hip_us_multihipposenet.md).

Geometry (local frame, reference pixels of a 240x320 image, femoral-head centre at the origin, x right, y down =
depth; the skin/probe is at the top, cranial to the left - the unrotated Graf coronal view):
- femoral head: circle of radius R; the bony acetabular roof is the arc of radius R_b = R + g (g = cartilage gap)
  spanning `span` degrees, centred on the direction -n, n = (sin a, -cos a). Its end points are P5 (bony rim, at
  theta5 = angle(-n) + span/2) and P3 (lower limb of the ilium, theta3 = angle(-n) - span/2). The chord P3-P5 is
  perpendicular to -n, so it runs along (cos a, sin a): the Graf alpha of the sample is exactly `a`.
- ilium: a straight horizontal echogenic line leaving P5 cranially (to the left); P1, P2 lie on it, so the
  baseline P1-P2 is horizontal in the local frame.
- labrum (P4 at its centre) on the head's upper-left surface, lateral to the rim; P6 (echo loss) just lateral of the
  bony rim inside the cartilaginous roof; Y cartilage holding P3; perichondrium running cranially above the ilium;
  synovial fold and greater trochanter caudal (right) of the head.
A per-sample pose (rotation +-10 deg, scale, translation) moves everything rigidly; Graf alpha and beta are then
computed from the placed points (acute angles between the lines), so they are exact for the file as written.

Image: per-class echo levels (hyaline cartilage dark, labrum/perichondrium bright, ...), specular interfaces on
class boundaries, bright bone lines with acoustic shadow below them (beam straight down, linear probe), layered
soft-tissue texture, depth attenuation, and multiplicative Rayleigh speckle from a PSF-filtered complex Gaussian
field (fully developed speckle, Goodman 1976). Every random choice comes from numpy Generators seeded by
(seed, index) (and (seed, patient) for the anatomy shared by a patient's images).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from data_pipelines.masks import rasterize_polygons

REF_HW = (240, 320)
CLASS_LABELS_ZH = {1: "股骨头", 2: "大转子", 3: "盂唇", 4: "软骨性髋臼顶", 5: "滑膜皱襞", 6: "近端软骨膜", 7: "Y型软骨"}
CLASS_LABELS_EN = {1: "femoral_head", 2: "greater_trochanter", 3: "labrum", 4: "cartilage_roof", 5: "synovial_fold",
                   6: "perichondrium", 7: "y_cartilage"}
POINT_LABELS_ZH = ("基线点", "骨缘点", "髂骨下缘点", "盂唇中心点", "骨性髋臼顶凸面最高点", "回声失落点")
POINT_LABELS_EN = ("baseline", "bony_rim", "ilium_lower_limb", "labrum_centre", "acetabular_peak", "echo_loss")
RECT_LABEL = {False: "矩形框", True: "rectangle"}
# Which mask class each landmark sits in by construction (0: on bone, which is background in the mask).
LANDMARK_CLASS = (0, 0, 7, 3, 0, 4)
TYPE_ALPHA_RANGE_DEG = {"I": (60.5, 72.0), "II": (48.0, 59.5)}
# image_format of generate_hip_dataset -> PIL save options (the format follows from the suffix)
IMAGE_FORMATS = {"png": {"compress_level": 1}, "jpg": {"quality": 95}}

# Mean echo level per class (display brightness before speckle): 0 = soft-tissue background.
_ECHO = {0: 0.30, 1: 0.11, 2: 0.12, 3: 0.85, 4: 0.07, 5: 0.62, 6: 0.78, 7: 0.50}


@dataclass(frozen=True)
class HipAnatomy:
    """Patient-level shape parameters (reference pixels, degrees)."""
    alpha_deg: float
    radius: float          # femoral head R
    gap: float             # cartilage between head and bony roof
    span_deg: float        # angular extent of the bony roof arc
    labrum_offset_deg: float
    baseline_len: float    # |P1 - P2|
    trochanter_deg: float
    echo_scale: tuple[float, ...]   # per-class multiplier of _ECHO (index = class id)


@dataclass
class PhantomSample:
    image_HW: np.ndarray                  # uint8 grey
    polygons: dict[int, np.ndarray]       # class id -> (N, 2) float64 image pixels (as written)
    kpts_px_K2: np.ndarray                # (6, 2) float64, P1..P6
    alpha_deg: float
    beta_deg: float
    hip_type: str
    mask_HW: np.ndarray                   # uint8, rasterised from `polygons` (what the reader will produce)


def acute_angle_deg(a1, a2, b1, b2) -> float:
    """Acute angle between line a1-a2 and line b1-b2, degrees in [0, 90] (Graf: lines, not rays)."""
    u, v = np.subtract(a2, a1), np.subtract(b2, b1)
    ang = math.degrees(math.atan2(abs(u[0] * v[1] - u[1] * v[0]), float(np.dot(u, v))))
    return min(ang, 180.0 - ang)


def graf_angles_deg(kpts_K2: np.ndarray) -> tuple[float, float]:
    """(alpha, beta): alpha = angle(P3-P5, P1-P2), beta = angle(P4-P6, P1-P2)
    (docs/systems/hip_us_multihipposenet.md)."""
    p = np.asarray(kpts_K2, dtype=np.float64)
    return acute_angle_deg(p[2], p[4], p[0], p[1]), acute_angle_deg(p[3], p[5], p[0], p[1])


def sample_anatomy(rng: np.random.Generator, hip_type: str) -> HipAnatomy:
    lo, hi = TYPE_ALPHA_RANGE_DEG[hip_type]
    alpha = rng.uniform(lo + 0.5, hi - 0.5)
    return HipAnatomy(
        alpha_deg=alpha, radius=rng.uniform(41.0, 46.0), gap=rng.uniform(8.0, 10.0), span_deg=rng.uniform(96, 106),
        # a shallow roof (small alpha) goes with a labrum pushed up and out: beta rises as alpha falls
        labrum_offset_deg=56.0 + 0.6 * (66.0 - alpha) + rng.uniform(-3.0, 3.0),
        baseline_len=rng.uniform(78.0, 92.0), trochanter_deg=rng.uniform(-8.0, -2.0),
        echo_scale=tuple(rng.uniform(0.88, 1.12, size=8)),
    )


def _u(theta_deg) -> np.ndarray:
    t = np.radians(np.atleast_1d(np.asarray(theta_deg, dtype=np.float64)))
    return np.stack([np.cos(t), np.sin(t)], axis=-1)


def _arc(radius: float, t0: float, t1: float, n: int) -> np.ndarray:
    return radius * _u(np.linspace(t0, t1, n))


def _ellipse(centre, a: float, b: float, angle_deg: float, n: int = 28) -> np.ndarray:
    t = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
    ax, bx = _u(angle_deg)[0], _u(angle_deg + 90.0)[0]
    return np.asarray(centre) + a * np.cos(t)[:, None] * ax + b * np.sin(t)[:, None] * bx


def _band(centre_line: np.ndarray, half_width: float) -> np.ndarray:
    """Polygon of a band of the given half-width around a polyline (offset along the vertex normals)."""
    tang = np.gradient(centre_line, axis=0)
    tang /= np.linalg.norm(tang, axis=1, keepdims=True)
    normal = np.stack([-tang[:, 1], tang[:, 0]], axis=1)
    return np.concatenate([centre_line + half_width * normal, (centre_line - half_width * normal)[::-1]])


def _local_layout(an: HipAnatomy):
    """Polygons (class -> (N,2)), landmarks (6,2), bone polylines, in the local frame (see module docstring)."""
    r, rb, a = an.radius, an.radius + an.gap, an.alpha_deg
    t_mid = math.degrees(math.atan2(math.cos(math.radians(a)), -math.sin(math.radians(a))))    # angle of -n
    t5, t3 = t_mid + an.span_deg / 2, t_mid - an.span_deg / 2
    tl = t5 + an.labrum_offset_deg                                                            # labrum centre angle
    p5, p3 = rb * _u(t5)[0], rb * _u(t3)[0]
    p2 = p5 + np.array([-6.0, 0.0])
    p1 = p2 - np.array([an.baseline_len, 0.0])
    p6 = (r + 9.0) * _u(t5 + 9.0)[0]
    p4 = (r + 13.0) * _u(tl)[0]
    labrum = np.concatenate([_arc(r + 1, tl - 20, tl + 20, 11),
                             [(r + 26) * _u(tl + 17)[0], (r + 34) * _u(tl)[0], (r + 26) * _u(tl - 17)[0]]])
    tb = tl - 21.0
    roof = np.concatenate([_arc(r + 0.5, t5 - 35, tb, 16), _arc(r + 30, tb, t5 + 5, 8),
                           _arc(rb - 1.5, t5 + 1, t5 - 35, 10)])
    peri_arc = _arc(r + 36, tb - 4, t5 + 10, 6)            # over the cartilaginous roof, then cranially
    peri_line = np.concatenate([peri_arc, [peri_arc[-1] + (-18.0, 4.0), p5 + (-50.0, -14.0), p5 + (-80.0, -12.0)]])
    tan3 = np.array([math.sin(math.radians(t3)), -math.cos(math.radians(t3))])   # along the arc, past P3
    y_cart = _ellipse(p3 + 8.0 * _u(t3)[0] + 10.0 * tan3, 24.0, 15.0, math.degrees(math.atan2(tan3[1], tan3[0])))
    fold = np.concatenate([_arc(r + 2, -70, -27, 10), _arc(r + 26, -27, -70, 10)])
    tt = an.trochanter_deg
    trochanter = _ellipse((r + 40.0) * _u(tt)[0], 24.0, 30.0, tt)
    polygons = {1: _arc(r, 0, 360, 48)[:-1], 2: trochanter, 3: labrum, 4: roof, 5: fold,
                6: _band(peri_line, 5.0), 7: y_cart}
    bones = {
        "ilium": np.array([p5, p5 + (-400.0, 0.0)]),
        "roof": _arc(rb, t5, t3, 24),
        "neck": np.concatenate([_arc(r + 3, 62, 40, 4), [(r + 24) * _u(34)[0], (r + 50) * _u(30)[0]]]),
    }
    capsule = _arc(r + 33, tl + 10, tt - 12 + 360.0, 20)       # over the top of the head, labrum -> trochanter
    return polygons, np.stack([p1, p2, p3, p4, p5, p6]), bones, capsule


def _place(rng: np.random.Generator, polygons, kpts, hw, k_ref: float):
    """Rotation +-10 deg and scale about the head centre, then a translation keeping polygons 3 px inside and the
    landmarks 10 % of the size away from the borders (so that augmentation rarely pushes one out of the frame)."""
    h, w = hw
    phi = math.radians(rng.uniform(-10.0, 10.0))
    scale = rng.uniform(0.9, 1.08) * k_ref
    jitter = rng.uniform(-1.0, 1.0, size=2) * np.array([0.06 * w, 0.05 * h])
    rot = np.array([[math.cos(phi), -math.sin(phi)], [math.sin(phi), math.cos(phi)]])
    polys = np.concatenate(list(polygons.values()))
    margin = 0.1 * np.array([w, h])
    for _ in range(12):
        moved, moved_k = polys @ (scale * rot).T, kpts @ (scale * rot).T
        lo = np.maximum(3.0 - moved.min(axis=0), margin - moved_k.min(axis=0))
        hi = np.minimum(np.array([w - 4.0, h - 4.0]) - moved.max(axis=0),
                        np.array([w, h]) - margin - moved_k.max(axis=0))
        if np.all(lo <= hi):
            centre = np.clip(np.array([0.52 * w, 0.5 * h]) + jitter, lo, hi)
            return lambda p: np.asarray(p) @ (scale * rot).T + centre
        scale *= 0.95          # the drawn pose does not fit: shrink (deterministic, same draws)
    raise ValueError(f"render_phantom: image {w}x{h} too small for the phantom")


def _segment_distance(hw, polyline: np.ndarray, reach: float) -> np.ndarray:
    """Distance (px) from every pixel centre to a polyline, computed only within `reach` of each segment's bounding
    box (inf elsewhere): the bone/capsule profiles built from it vanish beyond a few pixels anyway."""
    h, w = hw
    best = np.full(hw, np.inf, dtype=np.float32)
    for a, b in zip(polyline[:-1], polyline[1:]):
        x0, x1 = int(max(min(a[0], b[0]) - reach, 0)), int(min(max(a[0], b[0]) + reach + 1, w))
        y0, y1 = int(max(min(a[1], b[1]) - reach, 0)), int(min(max(a[1], b[1]) + reach + 1, h))
        if x0 >= x1 or y0 >= y1:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        d = b - a
        t = np.clip(((xx - a[0]) * d[0] + (yy - a[1]) * d[1]) / max(float(d @ d), 1e-9), 0.0, 1.0)
        dist = np.hypot(xx - a[0] - t * d[0], yy - a[1] - t * d[1])
        np.minimum(best[y0:y1, x0:x1], dist, out=best[y0:y1, x0:x1])
    return best


def _rayleigh_speckle(rng, hw, psf_sigma) -> np.ndarray:
    """|PSF * (n1 + i n2)| normalised to mean 1: fully developed speckle (Rayleigh amplitude)."""
    re = gaussian_filter(rng.standard_normal(hw).astype(np.float32), psf_sigma)
    im = gaussian_filter(rng.standard_normal(hw).astype(np.float32), psf_sigma)
    amp = np.hypot(re, im) ** 0.6        # log-like display compression lowers the speckle contrast
    return amp / amp.mean()


def _echo_map(rng, mask, an: HipAnatomy, bones, capsule, k_px: float) -> np.ndarray:
    """Mean display brightness per pixel before speckle: class levels, interfaces, bone + shadow, soft tissue."""
    hw = mask.shape
    levels = np.array([_ECHO[c] * an.echo_scale[c] for c in range(8)], dtype=np.float32)
    echo = levels[mask]
    bg = mask == 0
    layers = gaussian_filter(rng.standard_normal(hw).astype(np.float32), (1.5 * k_px, 10.0 * k_px))
    echo[bg] *= 1.0 + 0.3 * layers[bg] / (layers.std() + 1e-6)                 # layered muscle/fascia texture
    edge = np.zeros(hw, dtype=bool)
    edge[1:] |= mask[1:] != mask[:-1]
    edge[:, 1:] |= mask[:, 1:] != mask[:, :-1]
    echo[edge] += 0.16                                                              # specular interfaces
    bone = np.zeros(hw, dtype=np.float32)
    for line in bones.values():
        bone = np.maximum(bone, np.exp(-0.5 * (_segment_distance(hw, line, 6 * k_px) / (1.5 * k_px)) ** 2))
    cap = np.exp(-0.5 * (_segment_distance(hw, capsule, 4 * k_px) / (0.8 * k_px)) ** 2)
    # acoustic shadow: everything below a bone pixel in its column (the beam runs straight down)
    shadow = np.maximum.accumulate(bone > 0.5, axis=0)
    shadow[1:] &= shadow[:-1]
    echo[bg & shadow] *= 0.25
    echo[bg] = np.maximum(echo[bg], 2.0 * bone[bg])                                # bone saturates
    echo[bg] += 0.25 * cap[bg]
    rows = np.arange(hw[0], dtype=np.float32)[:, None]
    echo += 0.35 * np.exp(-rows / (3.0 * k_px))                                     # near-field reverberation
    return echo


def render_phantom(rng: np.random.Generator, hip_type: str, image_hw: tuple[int, int] = REF_HW,
                   anatomy: HipAnatomy | None = None) -> PhantomSample:
    """One phantom image with its 7 polygons, 6 landmarks and true Graf angles; `anatomy` (a patient's shape) is
    drawn from `rng` when not given."""
    if hip_type not in TYPE_ALPHA_RANGE_DEG:
        raise ValueError(f"render_phantom: hip_type must be 'I' or 'II', got {hip_type!r}")
    an = anatomy if anatomy is not None else sample_anatomy(rng, hip_type)
    lo, hi = TYPE_ALPHA_RANGE_DEG[hip_type]
    an = replace(an, alpha_deg=float(np.clip(an.alpha_deg + rng.uniform(-1.0, 1.0), lo, hi)))   # per-view wobble
    k_ref = min(image_hw[0] / REF_HW[0], image_hw[1] / REF_HW[1])
    polys_l, kpts_l, bones_l, capsule_l = _local_layout(an)
    to_img = _place(rng, polys_l, kpts_l, image_hw, k_ref)
    polygons = {c: np.round(to_img(p), 2) for c, p in polys_l.items()}
    kpts = to_img(kpts_l)
    mask = rasterize_polygons(list(polygons.items()), image_hw)
    echo = _echo_map(rng, mask, an, {n: to_img(b) for n, b in bones_l.items()}, to_img(capsule_l), k_ref)
    gain = rng.uniform(0.85, 1.15)
    attenuation = rng.uniform(0.25, 0.6)
    rows = np.arange(image_hw[0], dtype=np.float32)[:, None] / image_hw[0]
    speckle = _rayleigh_speckle(rng, image_hw, (0.8 * k_ref, 1.6 * k_ref))
    coarse = _rayleigh_speckle(rng, image_hw, (1.4 * k_ref, 2.8 * k_ref))
    speckle = np.where(mask == 2, coarse, speckle)           # the trochanter's cartilage: coarser grain
    stars = (rng.random(image_hw) < 0.004) & (mask == 1)      # "starry sky" of the cartilaginous femoral head
    echo = echo + 2.7 * gaussian_filter(stars.astype(np.float32), 0.7 * k_ref)    # ~ +0.8 at a star's centre
    display = np.clip(gain * echo * np.exp(-attenuation * rows) * speckle, 0.0, 1.0) ** 0.85
    alpha, beta = graf_angles_deg(kpts)
    return PhantomSample(image_HW=np.round(255.0 * display).astype(np.uint8), polygons=polygons, kpts_px_K2=kpts,
                         alpha_deg=alpha, beta_deg=beta, hip_type=hip_type, mask_HW=mask)


# ----------------------------------------------------------------------------------------------------------------
# Dataset files
# ----------------------------------------------------------------------------------------------------------------

def _plan(n: int, seed: int, type2_ratio: float) -> list[tuple[int, str, int]]:
    """[(patient number, hip type, view k)] per image: patients hold 1-2 adjacent images; type II patients are
    numbered from 1001 (the published convention: image ids > 1000 are type II)."""
    rng = np.random.default_rng([seed, 0])
    sizes: list[int] = []
    while sum(sizes) < n:
        sizes.append(min(1 + int(rng.random() < 0.5), n - sum(sizes)))
    target, count = round(n * type2_ratio), 0
    is_type2 = [False] * len(sizes)
    for p in rng.permutation(len(sizes)):
        if count >= target:
            break
        if count + sizes[p] <= target or sizes[p] == 1:
            is_type2[p], count = True, count + sizes[p]
    n_type1 = sum(not t for t in is_type2)
    if n_type1 > 999:
        raise ValueError(f"generate_hip_dataset: {n_type1} type I patients exceed the id range 1..999")
    plan, next_id = [], {False: 1, True: 1001}
    for size, t2 in zip(sizes, is_type2):
        pid = next_id[t2]
        next_id[t2] += 1
        plan.extend((pid, "II" if t2 else "I", k + 1) for k in range(size))
    return plan


def _labelme_doc(sample: PhantomSample, image_name: str, english: bool, rng: np.random.Generator) -> dict:
    names = CLASS_LABELS_EN if english else CLASS_LABELS_ZH
    points = POINT_LABELS_EN if english else POINT_LABELS_ZH
    h, w = sample.image_HW.shape

    def shape(label, pts, kind):
        return {"label": label, "points": [[float(x), float(y)] for x, y in pts], "group_id": None,
                "description": "", "shape_type": kind, "flags": {}}

    shapes = [shape(names[c], p, "polygon") for c, p in sample.polygons.items()]
    shapes += [shape(points[i], [sample.kpts_px_K2[i]], "point") for i in range(len(points))]
    allp = np.concatenate(list(sample.polygons.values()))
    box = [np.maximum(allp.min(axis=0) - 4.0, 0.0).round(2),
           np.minimum(allp.max(axis=0) + 4.0, [w - 1, h - 1]).round(2)]
    shapes.append(shape(RECT_LABEL[english], box, "rectangle"))
    shapes = [shapes[i] for i in rng.permutation(len(shapes))]      # real files have no fixed shape order
    return {"version": "5.2.1", "flags": {}, "shapes": shapes, "imagePath": image_name, "imageData": None,
            "imageHeight": h, "imageWidth": w}


def generate_hip_dataset(out_dir: str | Path, n: int, seed: int = 0, type2_ratio: float = 0.35,
                         image_hw: tuple[int, int] = REF_HW, spacing_mm: float = 0.2, english_labels: bool = False,
                         progress: bool = False, image_format: str = "png") -> list[Path]:
    """Write n phantom images + labelme 5.x JSON files + dataset.json into out_dir; returns the JSON paths.

    File stems are `<patient>_<view>`; patients > 1000 are type II. dataset.json holds the true Graf angles:
    {"spacing_mm": [sx, sy], "samples": [{"id", "json", "image", "patient_id", "hip_type", "alpha_deg",
    "beta_deg"}]}. Image i is a pure function of (seed, i) for a given (n, type2_ratio).
    image_format: "png" (lossless, the default) or "jpg" (8-bit grey baseline JPEG, quality 95, what GPU JPEG
    decoders such as DALI's nvJPEG take); the JSON's imagePath and dataset.json name the file written. Landmarks and
    polygons do not depend on the format; the JPEG's pixels differ from the PNG's by the compression error.
    """
    if n < 1 or not 0.0 <= type2_ratio <= 1.0:
        raise ValueError(f"generate_hip_dataset: need n >= 1 and type2_ratio in [0, 1], got {n}, {type2_ratio}")
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"generate_hip_dataset: image_format must be one of {list(IMAGE_FORMATS)}, "
                         f"got {image_format!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plan = _plan(n, seed, type2_ratio)
    anatomies: dict[int, HipAnatomy] = {}
    records, paths = [], []
    steps = range(n)
    if progress:
        from tqdm import tqdm
        steps = tqdm(steps, desc="synth hip", unit="img")
    for i in steps:
        pid, hip_type, view = plan[i]
        if pid not in anatomies:
            anatomies[pid] = sample_anatomy(np.random.default_rng([seed, 1, pid]), hip_type)
        rng = np.random.default_rng([seed, 2, i])
        sample = render_phantom(rng, hip_type, image_hw, anatomy=anatomies[pid])
        stem = f"{pid}_{view}"
        image_name = f"{stem}.{image_format}"
        Image.fromarray(sample.image_HW, mode="L").save(out / image_name, **IMAGE_FORMATS[image_format])
        doc = _labelme_doc(sample, image_name, english_labels, rng)
        (out / f"{stem}.json").write_text(json.dumps(doc, ensure_ascii=False, indent=1), encoding="utf-8")
        records.append({"id": stem, "json": f"{stem}.json", "image": image_name, "patient_id": str(pid),
                        "hip_type": hip_type, "alpha_deg": sample.alpha_deg, "beta_deg": sample.beta_deg})
        paths.append(out / f"{stem}.json")
    meta = {"spacing_mm": [float(spacing_mm), float(spacing_mm)], "generator": "data_pipelines.synthetic.hip",
            "seed": seed, "image_hw": list(image_hw), "samples": records}
    (out / "dataset.json").write_text(json.dumps(meta, ensure_ascii=False, indent=1), encoding="utf-8")
    return paths

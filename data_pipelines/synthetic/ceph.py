"""Synthetic lateral cephalograms ("skull in profile") with the 19 landmarks of the public cephalometric benchmarks.

MedPose is measured on a dataset shaped like the lateral-cephalogram benchmarks (19 landmarks, grey radiographs of
~1000 x 1200 px at 0.1 mm per pixel, errors in mm and success-detection rates at 2 / 2.5 / 3 / 4 mm) while using
only data it generates; this module draws such images and knows where every landmark is.

Anatomy model. A skull frame in adult millimetres: sella at the origin, x anterior (the face looks to the image
right), y inferior, Frankfort horizontal (porion - orbitale) horizontal. Built from curves (centripetal Catmull-Rom
splines, arcs, ellipses) around anchor points whose adult positions follow textbook cephalometric norms (S-N 68 mm,
SN 7 deg above FH, saddle angle N-S-Ar ~123 deg, SNA ~82 deg, N-Me ~118 mm, gonial angle ~125 deg):
- cranial vault: outer and inner tables (ellipses) with the diploe between, the frontal bone coming down through
  glabella to nasion, a frontal sinus; anterior cranial base (planum) from the frontal bone back to the sella;
- sphenoid body with the sella turcica (a round pit, tuberculum in front, dorsum sellae and clinoids), sphenoid
  sinus, clivus down to basion and the inferior contour of the basi-occiput back from the sphenoid;
- orbit (lateral rim, an ellipse), external auditory meatus (dark hole in the dense petrous bone), nasal bone,
  maxilla (anterior contour ANS - A point - prosthion), hard palate (PNS - ANS band), pterygomaxillary fissure,
  zygomatic buttress, maxillary sinus;
- teeth: upper and lower incisors (crown with enamel, root) and five posterior teeth per arch along the occlusal
  plane; mandible: condyle, ramus, gonial angle (a fillet between the ramus and mandibular-plane tangents),
  body, symphysis with its lingual cortex, coronoid process and sigmoid notch;
- soft tissue: the head in profile (forehead, nose, subnasale, lips, chin, neck), pharyngeal airway, C2-C5.
The model is drawn at MODEL_SCALE (0.68) of adult size so that the 19 landmarks and a margin fit the 100 x 120 mm
field of a 1000 x 1200 image at 0.1 mm: landmark distances are about 2/3 of the clinical ones.

Landmarks sit on what is drawn: each is a vertex or an extremum of a drawn curve, taken from the dense curve itself
in the skull frame (so a rotated image keeps the anatomical definition): sella = centre of the pit; nasion = the
frontonasal notch (frontal outline meets the nasal bone); orbitale = lowest point of the orbit rim; porion = top of
the meatus; subspinale / supramentale = deepest (most posterior) points of the maxillary / symphyseal concavities;
pogonion = most anterior chin point; menton = lowest symphysis point; gnathion = where the bisector of the facial
(N-Pog) and mandibular planes meets the chin; gonion = midpoint of the gonial fillet (on that angle's bisector);
incisal incisions = incisor tips; upper / lower lip and soft-tissue pogonion = most anterior points of their
profile segments; subnasale = the columella-lip corner; PNS / ANS = the palate's posterior / anterior tips;
articulare = where the ramus's posterior border crosses the inferior contour of the basi-occiput.

Variation: per patient, CephAnatomy (skull size, face height, saddle angle, gonial angle, ramus height - the
mandibular plane's slope and the body length follow -, maxillary protrusion, overjet (the mandible's retrusion
relative to the maxilla), overbite, incisor inclinations, chin prominence, nasal bone angle, sella size, soft-tissue
and lip thickness, tissue densities); per image a pose (rotation +-4 deg, scale 0.95-1.05, translation) and the film
(textures, exposure gradient, blur, grain).

Coordinates: kpts_px_K2 are MedPose pixels (data_pipelines/batch.py: pixel centres at integer coordinates, x =
column, y = row). Shapes are rasterised with PIL at rounded vertex positions (a pixel is filled when its centre lies
in or on the polygon), so a drawn edge sits within half a pixel of the exact curve the landmark was taken from.
Pixel spacing: spacing_mm = 0.1 * 1000 / W, so the anatomy has the same size in mm at any image size.

Determinism: every draw comes from numpy Generators seeded by (seed, stream, index) - the patient plan from
(seed, PLAN), a patient's anatomy from (seed, PATIENT, patient), an image's pose and film from (seed, IMAGE, index)
- so image i is a pure function of (seed, i) whatever order images are written (the plan is a prefix-stable
function of the seed).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw
from scipy.ndimage import gaussian_filter

from data_pipelines.synthetic.writers import IMAGE_FORMATS, LAYOUTS, write_layout

CEPH_NAMES = ("sella", "nasion", "orbitale", "porion", "subspinale", "supramentale", "pogonion", "menton",
              "gnathion", "gonion", "lower_incisal_incision", "upper_incisal_incision", "upper_lip", "lower_lip",
              "subnasale", "soft_tissue_pogonion", "posterior_nasal_spine", "anterior_nasal_spine", "articulare")
DEFAULT_HW = (1200, 1000)
REF_WIDTH_PX, REF_SPACING_MM = 1000, 0.1
MODEL_SCALE = 0.68                 # model mm per adult mm (module docstring)
LAYERS = ("soft", "bone", "dense")  # soft tissue / textured bone / smooth cortex and teeth (densities add up)
_PLAN, _PATIENT, _IMAGE, _SPLIT = 11, 12, 13, 14   # second seed word of the plan / patient / image / split draws
SPLIT_NAMES = ("train", "val", "test")
_STEP_MM = 0.25                    # spacing of the dense curve samples (adult mm)

Pt = np.ndarray


@dataclass(frozen=True)
class CephAnatomy:
    """Patient-level shape parameters (adult mm, degrees) and tissue densities."""
    skull_scale: float           # overall size
    face_height: float           # vertical factor of the face below nasion (N-Me)
    saddle_deg: float            # N-S-Ar
    gonial_deg: float            # Ar-Go-Me, the mandible's angle
    ramus_height_mm: float       # Ar to the gonial vertex (the mandibular plane's slope and body length follow)
    maxilla_protrusion_mm: float  # ANS, A point, upper incisor forward of the norm
    overjet_mm: float            # upper minus lower incisal tip, horizontal: the mandible's retrusion (class II)
    overbite_mm: float           # vertical overlap of the incisal tips
    upper_incisor_deg: float     # forward tilt from vertical
    lower_incisor_deg: float
    symphysis_deg: float         # tilt of the chin about infradentale
    chin_mm: float               # pogonion prominence
    nasal_deg: float             # nasal bone tilt from vertical
    sella_radius_mm: float
    soft_tissue_mm: float        # facial soft-tissue thickness in front of A / B / pogonion
    lip_mm: float                # extra lip protrusion
    density: tuple[float, ...]   # multipliers: soft tissue, bone, cortex, teeth


def sample_anatomy(rng: np.random.Generator) -> CephAnatomy:
    return CephAnatomy(
        skull_scale=rng.uniform(0.93, 1.07), face_height=rng.uniform(0.92, 1.08), saddle_deg=rng.uniform(117, 129),
        gonial_deg=rng.uniform(117.0, 133.0), ramus_height_mm=rng.uniform(45.0, 55.0),
        maxilla_protrusion_mm=rng.uniform(-3.0, 3.0), overjet_mm=rng.uniform(1.5, 7.0),
        overbite_mm=rng.uniform(-0.5, 4.0), upper_incisor_deg=rng.uniform(14.0, 30.0),
        lower_incisor_deg=rng.uniform(16.0, 32.0), symphysis_deg=rng.uniform(-7.0, 7.0), chin_mm=rng.uniform(0.0, 3.0),
        nasal_deg=rng.uniform(26.0, 40.0), sella_radius_mm=rng.uniform(4.6, 6.2),
        soft_tissue_mm=rng.uniform(11.0, 15.0), lip_mm=rng.uniform(-1.5, 3.0),
        density=tuple(float(v) for v in rng.uniform(0.88, 1.12, size=4)),
    )


# ----------------------------------------------------------------------------------------------------------------
# Curves (adult mm, skull frame)
# ----------------------------------------------------------------------------------------------------------------

def _u(deg: float) -> Pt:
    return np.array([math.cos(math.radians(deg)), math.sin(math.radians(deg))])


def _arc(centre, radius: float, deg0: float, deg1: float, ry: float | None = None) -> Pt:
    """Points of a circular (or elliptic, ry) arc from deg0 to deg1, about _STEP_MM apart."""
    n = max(4, int(abs(math.radians(deg1 - deg0)) * max(radius, ry or 0.0) / _STEP_MM))
    t = np.radians(np.linspace(deg0, deg1, n))
    return np.asarray(centre, float) + np.stack([radius * np.cos(t), (ry or radius) * np.sin(t)], axis=1)


def _line(a, b) -> Pt:
    a, b = np.asarray(a, float), np.asarray(b, float)
    n = max(2, int(np.linalg.norm(b - a) / _STEP_MM))
    return a + np.linspace(0.0, 1.0, n)[:, None] * (b - a)


def _spline(ctrl, closed: bool = False) -> Pt:
    """Centripetal Catmull-Rom through the control points (no cusps or loops), sampled about _STEP_MM apart; open
    ends continue by reflection."""
    p = np.asarray(ctrl, dtype=float)
    ext = (np.concatenate([p[-1:], p, p[:2]]) if closed
           else np.concatenate([2 * p[:1] - p[1:2], p, 2 * p[-1:] - p[-2:-1]]))
    out = []
    for i in range(len(ext) - 3):
        p0, p1, p2, p3 = ext[i:i + 4]
        t1 = np.linalg.norm(p1 - p0) ** 0.5 + 1e-9
        t2 = t1 + np.linalg.norm(p2 - p1) ** 0.5 + 1e-9
        t3 = t2 + np.linalg.norm(p3 - p2) ** 0.5 + 1e-9
        t = np.linspace(t1, t2, max(2, int(np.linalg.norm(p2 - p1) / _STEP_MM)), endpoint=False)[:, None]
        a1 = ((t1 - t) * p0 + t * p1) / t1
        a2 = ((t2 - t) * p1 + (t - t1) * p2) / (t2 - t1)
        a3 = ((t3 - t) * p2 + (t - t2) * p3) / (t3 - t2)
        b1 = ((t2 - t) * a1 + t * a2) / t2
        b2 = ((t3 - t) * a2 + (t - t1) * a3) / (t3 - t1)
        out.append(((t2 - t) * b1 + (t - t1) * b2) / (t2 - t1))
    return np.concatenate(out + ([] if closed else [p[-1:]]))


def _band(centre_line: Pt, half_width: float) -> Pt:
    """Closed polygon of a band of the given half-width around a polyline (offset along the vertex normals)."""
    tang = np.gradient(centre_line, axis=0)
    tang /= np.linalg.norm(tang, axis=1, keepdims=True)
    normal = np.stack([-tang[:, 1], tang[:, 0]], axis=1)
    return np.concatenate([centre_line + half_width * normal, (centre_line - half_width * normal)[::-1]])


def _extreme(curve: Pt, near, radius: float, direction) -> Pt:
    """The curve point within `radius` of `near` that lies furthest along `direction` (an anatomical extremum)."""
    pts = curve[np.linalg.norm(curve - np.asarray(near), axis=1) <= radius]
    return pts[np.argmax(pts @ np.asarray(direction, float))].copy()


@dataclass
class _Part:
    kind: str            # "fill" (closed polygon) or "stroke" (polyline of width_mm)
    pts: Pt
    value: float         # density added inside
    layer: str           # one of LAYERS
    width_mm: float = 0.0


class _Model:
    """Parts and landmarks of one skull, collected by the builders below."""

    def __init__(self, an: CephAnatomy):
        self.an, self.parts, self.kpts = an, [], {}
        self.d_soft, self.d_bone, self.d_cortex, self.d_teeth = an.density

    def fill(self, pts, value, layer="bone"):
        self.parts.append(_Part("fill", np.asarray(pts, float), value, layer))

    def stroke(self, pts, width_mm, value, layer="dense"):
        self.parts.append(_Part("stroke", np.asarray(pts, float), value, layer, width_mm))


# ----------------------------------------------------------------------------------------------------------------
# Anatomy builders (adult mm). Densities are in "attenuation" units: the film maps D to 1 - exp(-1.5 D).
# ----------------------------------------------------------------------------------------------------------------

def _gonial_vertex(ar: Pt, me: Pt, gonial_deg: float, ramus_mm: float) -> tuple[Pt, Pt]:
    """(V, unit mandibular-plane direction V -> Me): the triangle Ar-V-Me has |Ar - V| = ramus_mm and the gonial
    angle at V, so by the law of sines the angle at Me follows; V lies below the line Me -> Ar (that direction
    turned clockwise on the image, y pointing down)."""
    dist = float(np.linalg.norm(ar - me))
    g = math.radians(gonial_deg)
    at_me = math.asin(min(1.0, ramus_mm * math.sin(g) / dist))
    length = dist * math.sin(math.pi - g - at_me) / math.sin(g)
    turn = np.array([[math.cos(at_me), math.sin(at_me)], [-math.sin(at_me), math.cos(at_me)]])
    towards_v = turn @ ((ar - me) / dist)
    return me + length * towards_v, -towards_v


def _anchors(an: CephAnatomy) -> dict[str, Any]:
    """Design anchor points of the face; vertical face distances scale by face_height from nasion down."""
    n = 68.0 * _u(-7.0)

    def face(x, y):
        return np.array([x, n[1] + (y - n[1]) * an.face_height])

    mx = an.maxilla_protrusion_mm
    a = face(n[0] - 1.0 + mx, 49.0)
    pr = face(a[0] + 2.5, 59.0)
    up = _u(90.0 - an.upper_incisor_deg)                       # upper incisor axis, apex -> tip
    uie = pr + 11.5 * up - 3.2 * np.array([up[1], -up[0]])     # the prosthion is on the labial surface
    lie = uie + np.array([-an.overjet_mm, -an.overbite_mm])
    lo = _u(-90.0 + an.lower_incisor_deg)                      # lower incisor axis, apex -> tip
    idn = lie - 10.5 * lo + 3.0 * np.array([-lo[1], lo[0]])   # infradentale, on the labial surface
    sym = math.radians(an.symphysis_deg)
    rot = np.array([[math.cos(sym), -math.sin(sym)], [math.sin(sym), math.cos(sym)]])

    def chin(dx, dy):                                          # symphysis offsets from infradentale
        return idn + rot @ np.array([dx, dy * an.face_height])

    me, ar = chin(-8.5, 33.0), 36.0 * _u(-7.0 + an.saddle_deg)
    v, m_dir = _gonial_vertex(ar, me, an.gonial_deg, an.ramus_height_mm)
    return {"N": n, "Ar": ar, "Ba": 44.0 * _u(1.0 + an.saddle_deg), "Or": face(n[0] - 10.5, 17.0),
            "ANS": face(n[0] + 3.0 + mx, 44.0), "PNS": face(n[0] + 3.0 + mx - 52.0, 45.0), "A": a, "Pr": pr,
            "UIE": uie, "LIE": lie, "Id": idn, "up": up, "lo": lo, "B": chin(-3.5, 10.0),
            "Pog": chin(-1.0 + an.chin_mm, 24.0), "Gn": chin(-3.5, 30.5), "Me": me, "V": v, "m": m_dir,
            "chin_lingual": [chin(-8.0, 1.5), chin(-11.0, 12.0), chin(-12.5, 24.0), chin(-14.5, 31.5)]}


def _cranium(m: _Model, k: dict[str, Pt]) -> None:
    """Vault, frontal sinus, nasal bone, anterior cranial base, orbit; nasion and orbitale."""
    n, an = k["N"], m.an
    g = n + np.array([3.0, -10.0])                             # glabella
    cv, a, b, t = np.array([-22.0, -18.0]), 93.0, 80.0, 6.0    # vault ellipse, table-to-table thickness
    outer = np.concatenate([_spline([n, g, cv + [a * math.cos(math.radians(-8)), b * math.sin(math.radians(-8))]]),
                            _arc(cv, a, -8.0, -232.0, b)])
    inner = _arc(cv, a - t, -232.0, -10.0, b - t)
    f = n + np.array([-12.5, -1.5])                           # frontal inner table meets the cranial base
    m.fill(np.concatenate([outer, inner, [f]]), 0.42 * m.d_bone)
    m.stroke(outer, 1.6, 0.32 * m.d_cortex)
    m.stroke(np.concatenate([inner, [f]]), 1.2, 0.26 * m.d_cortex)
    m.fill(_arc(n + np.array([-3.0, -11.0]), 3.5, 0.0, 360.0, 6.5), -0.3 * m.d_bone)   # frontal sinus
    tip = n + 22.0 * _u(90.0 - an.nasal_deg)
    m.stroke(_spline([n, n + 11.0 * _u(96.0 - an.nasal_deg) + [0.6, 0.0], tip]), 1.9, 0.5 * m.d_cortex)
    ts = an.sella_radius_mm * _u(-40.0)
    m.stroke(_spline([f, [40.0, -6.5], [20.0, -5.0], ts]), 1.6, 0.34 * m.d_cortex)        # planum / cribriform
    m.stroke(_spline([f + [-1.0, -2.0], [40.0, -16.0], [26.0, -13.0], [18.0, -7.0]]), 1.0, 0.15 * m.d_cortex)
    orbit_c, rx, ry = k["Or"] - np.array([0.0, 16.0]), 11.0, 16.0
    m.fill(_arc(orbit_c, rx, 0.0, 360.0, ry), 0.08 * m.d_bone)
    m.stroke(_arc(orbit_c, rx, 0.0, 360.0, ry), 1.1, 0.38 * m.d_cortex)
    m.kpts["nasion"] = n.copy()          # the notch vertex: frontal outline in from above, nasal bone out below
    m.kpts["orbitale"] = orbit_c + np.array([0.0, ry])


def _cranial_base(m: _Model, k: dict[str, Pt]) -> None:
    """Sphenoid body with the sella turcica, clivus, basi-occiput, petrous bone and meatus; S, Po, (Ar's contour)."""
    rs, ar, ba = m.an.sella_radius_mm, k["Ar"], k["Ba"]
    pit = _arc((0.0, 0.0), rs, -40.0, 220.0)                   # floor of the sella, open upwards
    clinoid = np.array([-rs - 0.6, -rs - 3.0])                 # posterior clinoid tip
    su = ar + np.array([17.0, -13.0])                          # sphenoid underside
    inferior = np.concatenate([_line(ba, ar), _spline([ar, su, [19.0, 12.0]])])
    dorsum = _spline([pit[-1], clinoid, clinoid + [-2.5, 0.8], [-rs - 3.5, 2.0]])
    clivus = _line([-rs - 3.5, 2.0], ba)
    block = np.concatenate([pit, dorsum, clivus, inferior, _spline([[19.0, 12.0], [21.5, -4.0], pit[0]])])
    m.fill(block, 0.5 * m.d_bone)
    m.fill(_arc((11.0, 8.0), 6.5, 0.0, 360.0, 5.5), -0.32 * m.d_bone)          # sphenoid sinus
    m.stroke(np.concatenate([pit, dorsum]), 1.2, 0.42 * m.d_cortex)
    m.stroke(_spline([pit[0] + [2.0, -1.2], [1.5, -rs - 1.6], [-1.0, -rs - 1.2]]), 1.1, 0.3 * m.d_cortex)
    m.stroke(clivus, 1.2, 0.25 * m.d_cortex)
    m.stroke(inferior, 1.2, 0.34 * m.d_cortex)
    po = np.array([-22.0, k["Or"][1]])
    m.fill(_arc(po + [-8.0, 6.0], 13.0, 0.0, 360.0, 11.0), 0.45 * m.d_bone)   # petrous / mastoid
    meatus = _arc(po + [0.0, 4.2], 4.0, 0.0, 360.0, 4.2)
    m.fill(meatus, -0.5 * m.d_bone)
    m.stroke(meatus, 0.9, 0.3 * m.d_cortex)
    m.kpts["sella"] = np.zeros(2)
    m.kpts["porion"] = po.copy()        # top of the meatus ellipse
    m.kpts["articulare"] = ar.copy()    # on `inferior`; the ramus's posterior border passes here too (_mandible)


def _occlusal(k: dict[str, Pt], an: CephAnatomy) -> tuple[Pt, Pt, Pt]:
    """(incisal overlap point, unit vector back along the occlusal plane, unit normal up): the plane tilts down
    anteriorly, more so with a steep mandibular plane."""
    back = -_u(6.0 + 0.25 * (an.gonial_deg - 100.0))
    return 0.5 * (k["UIE"] + k["LIE"]), back, np.array([-back[1], back[0]])


def _tooth(base: Pt, along: Pt, out: Pt, width: float, crown: float, root: float, two_roots: bool) -> tuple[Pt, Pt]:
    """(tooth, crown) polygons of a posterior tooth whose occlusal surface sits at `base` on the occlusal plane,
    `out` pointing from the crown to the root (up for the upper arch)."""
    w = width / 2
    crown_l = [(-w, 1.0), (-w + 1.2, 0.25), (w - 1.2, 0.25), (w, 1.0), (w, crown)]
    if two_roots:
        roots = [(w - 0.6, crown + 0.7 * root), (w / 2, crown + root), (0.0, crown + 3.0),
                 (-w / 2, crown + root), (-w + 0.6, crown + 0.7 * root)]
    else:
        roots = [(w - 0.8, crown + 0.6 * root), (0.0, crown + root), (-w + 0.8, crown + 0.6 * root)]
    local = np.array(crown_l + roots + [(-w, crown)])
    to_skull = np.stack([along, out])
    return base + local @ to_skull, base + np.array(crown_l + [(-w, crown)]) @ to_skull


def _incisor(tip: Pt, axis: Pt, labial: Pt, shape: Sequence[tuple[float, float]], crown_len: float) -> tuple[Pt, Pt]:
    """(tooth, crown) polygons of an incisor from (distance from the tip toward the apex, labial offset) pairs."""
    local = np.asarray(shape, float)
    pts = tip - local[:, :1] * axis + local[:, 1:] * labial
    return pts, pts[local[:, 0] <= crown_len + 1e-9]


_UPPER_INCISOR = [(0.0, 0.0), (1.2, 1.6), (5.0, 2.7), (10.5, 3.3), (16.0, 2.4), (23.5, 0.0), (16.0, -2.6),
                  (10.5, -3.3), (6.5, -3.6), (2.5, -1.8)]
_LOWER_INCISOR = [(0.0, 0.0), (1.0, 1.3), (4.5, 2.4), (9.5, 3.0), (14.0, 2.2), (21.5, 0.0), (14.0, -2.3),
                  (9.5, -2.8), (5.0, -2.6), (1.5, -1.2)]
# Posterior teeth per arch: (distance back from the incisors, width, crown height, root length, two roots).
_POSTERIOR = [(10.0, 7.0, 9.0, 16.0, False), (17.0, 6.8, 7.5, 13.0, False), (24.0, 6.8, 7.5, 13.0, False),
              (32.5, 10.0, 6.5, 12.0, True), (42.5, 9.5, 6.5, 12.0, True)]


def _maxilla(m: _Model, k: dict[str, Pt]) -> None:
    """Maxilla, hard palate, pterygomaxillary fissure, zygomatic buttress, maxillary sinus; A point, ANS, PNS."""
    ans, pns, a, pr = k["ANS"], k["PNS"], k["A"], k["Pr"]
    oi, back, up = _occlusal(k, m.an)
    anterior = _spline([ans, ans + [-4.0, 2.5], a, a + [1.0, 5.0], pr])
    crest = [oi + s * back + 8.5 * up for s in (6.0, 18.0, 30.0, 42.0)] + [oi + 49.0 * back + 12.0 * up]
    floor = _spline([pns, pns + [15.0, -1.5], ans + [-12.0, -1.0], ans])
    m.fill(np.concatenate([anterior, _spline([pr, *crest, pns]), floor]), 0.4 * m.d_bone)
    m.stroke(anterior, 1.1, 0.32 * m.d_cortex)
    oral = _spline([ans, ans + [-5.0, 2.8], a + [-7.0, 1.0], pns + [14.0, 4.5], pns + [4.0, 2.2], pns])
    m.fill(np.concatenate([floor, oral]), 0.3 * m.d_cortex, "dense")              # hard palate, tips at ANS/PNS
    m.stroke(floor, 0.9, 0.16 * m.d_cortex)
    tip = pns + [1.0, -3.0]                                                         # PTM fissure, tip above PNS
    m.stroke(_spline([tip, tip + [-3.5, -10.0], tip + [-2.0, -19.0], tip + [2.0, -21.0], tip + [4.5, -14.0],
                      tip + [1.5, -5.0], tip]), 0.9, 0.22 * m.d_cortex)
    orb = k["Or"]
    m.fill(_spline([orb + [-14.0, 3.0], orb + [4.0, 1.0], ans + [-6.0, -9.0], pns + [14.0, -4.0],
                    pns + [2.0, -14.0]], closed=True), 0.16 * m.d_bone)               # zygoma / maxillary body
    m.fill(_arc(ans + [-26.0, -13.0], 13.0, 0.0, 360.0, 8.0), -0.1 * m.d_bone)        # maxillary sinus
    m.stroke(_spline([orb + [-6.0, 7.0], orb + [-9.0, 16.0], oi + 34.0 * back + 16.0 * up]), 1.4, 0.2 * m.d_cortex)
    m.kpts["subspinale"] = _extreme(anterior, a, 4.0, (-1.0, 0.0))
    m.kpts["anterior_nasal_spine"] = ans.copy()
    m.kpts["posterior_nasal_spine"] = pns.copy()


def _teeth(m: _Model, k: dict[str, Pt]) -> None:
    """Incisors (tips = incisal incisions) and the posterior teeth of both arches; enamel denser than dentine."""
    oi, back, up = _occlusal(k, m.an)
    dt = m.d_teeth
    upx, lox = k["up"], k["lo"]
    for tip, axis, labial, shape, crown in ((k["UIE"], upx, np.array([upx[1], -upx[0]]), _UPPER_INCISOR, 10.5),
                                            (k["LIE"], lox, np.array([-lox[1], lox[0]]), _LOWER_INCISOR, 9.5)):
        tooth, enamel = _incisor(tip, axis, labial, shape, crown)
        m.fill(tooth, 0.45 * dt, "dense")
        m.fill(enamel, 0.3 * dt, "dense")
    for s, width, crown, root, two in _POSTERIOR:
        for out, gap in ((up, 0.2), (-up, 0.2)):
            tooth, enamel = _tooth(oi + s * back + gap * out, back, out, width, crown, root, two)
            m.fill(_spline(tooth, closed=True), 0.38 * dt, "dense")       # rounded cusps and apices
            m.fill(_spline(enamel, closed=True), 0.28 * dt, "dense")
    m.kpts["upper_incisal_incision"] = k["UIE"].copy()
    m.kpts["lower_incisal_incision"] = k["LIE"].copy()


def _gonial_fillet(ar: Pt, v: Pt, m_dir: Pt, radius: float) -> tuple[Pt, Pt]:
    """(arc, gonion): the angle rounded by an arc tangent to the ramus line (Ar -> V) and the mandibular plane
    (V along m_dir); gonion is the arc's midpoint, i.e. where the angle's bisector meets the contour."""
    u_r = (v - ar) / np.linalg.norm(v - ar)
    half = 0.5 * math.acos(float(np.clip(-u_r @ m_dir, -1.0, 1.0)))
    t1, t2 = v - radius / math.tan(half) * u_r, v + radius / math.tan(half) * m_dir
    bis = (m_dir - u_r) / np.linalg.norm(m_dir - u_r)
    c = v + radius / math.sin(half) * bis
    a1, a2 = (math.degrees(math.atan2(*(p - c)[::-1])) for p in (t1, t2))
    return _arc(c, radius, a1, a1 + ((a2 - a1 + 180.0) % 360.0 - 180.0)), c - radius * bis


def _mandible(m: _Model, k: dict[str, Pt]) -> None:
    """Condyle, ramus, gonial angle, body, symphysis, coronoid; Go, Me, Gn, Pog, B point."""
    ar, v, m_dir = k["Ar"], k["V"], k["m"]
    u_r = (v - ar) / np.linalg.norm(v - ar)
    f = np.array([u_r[1], -u_r[0]])                           # forward normal of the ramus
    cc, rc = ar - 5.5 * u_r + 5.0 * f, 5.0                    # condyle head; its back is on the ramus line
    front = math.degrees(math.atan2(f[1], f[0]))
    fillet, gonion = _gonial_fillet(ar, v, m_dir, 9.0)
    l1 = k["Me"] - 9.0 * m_dir
    chin = _spline([l1, k["Me"], k["Gn"], k["Pog"], k["B"], k["Id"]])
    oi, back, up = _occlusal(k, m.an)
    coronoid = ar - 2.0 * u_r + 30.0 * f
    crest = _spline([k["Id"], *[oi + s * back - 9.0 * up for s in (8.0, 19.0, 30.0)], ar + 38.0 * u_r + 30.0 * f,
                     ar + 22.0 * u_r + 27.0 * f, coronoid])
    notch = _spline([coronoid, ar + 7.0 * u_r + 17.0 * f, ar + 1.0 * u_r + 9.5 * f, cc + rc * f])
    condyle = _arc(cc, rc, front, front - 180.0)
    posterior = _line(condyle[-1], fillet[0])                  # passes through Ar (on the ramus line)
    lower = _line(fillet[-1], l1)
    m.fill(np.concatenate([condyle, posterior, fillet, lower, chin, crest, notch]), 0.46 * m.d_bone)
    m.stroke(np.concatenate([notch, condyle, posterior, fillet]), 1.3, 0.3 * m.d_cortex)
    m.stroke(np.concatenate([lower, chin]), 2.2, 0.4 * m.d_cortex)                  # thick lower cortex
    m.stroke(crest, 0.9, 0.18 * m.d_cortex)
    m.stroke(_spline(k["chin_lingual"]), 1.4, 0.3 * m.d_cortex)                     # lingual cortex of the chin
    me = _extreme(chin, k["Me"], 6.0, (0.0, 1.0))
    pog = _extreme(chin, k["Pog"], 7.0, (1.0, 0.0))
    m.kpts.update(menton=me, pogonion=pog, supramentale=_extreme(chin, k["B"], 6.0, (-1.0, 0.0)), gonion=gonion,
                  gnathion=_gnathion(chin, k["N"], pog, v, me, k["Gn"]))


def _gnathion(chin: Pt, n: Pt, pog: Pt, v: Pt, me: Pt, near: Pt) -> Pt:
    """Chin point on the bisector of the angle between the facial line (N-Pog) and the mandibular plane (V-Me)."""
    d1, d2 = pog - n, me - v
    t = np.linalg.solve(np.stack([d1, -d2], axis=1), v - n)    # N + t0 d1 = V + t1 d2
    p = n + t[0] * d1
    bis = (n - p) / np.linalg.norm(n - p) + (v - p) / np.linalg.norm(v - p)
    bis /= np.linalg.norm(bis)
    cand = chin[np.linalg.norm(chin - near, axis=1) <= 8.0]
    rel = cand - p
    off_ray = np.abs(rel[:, 0] * bis[1] - rel[:, 1] * bis[0]) + 1e3 * (rel @ bis < 0)
    return cand[np.argmin(off_ray)].copy()


def _soft_tissue(m: _Model, k: dict[str, Pt]) -> None:
    """Head profile (forehead, nose, lips, chin, neck), pharyngeal airway; Sn, UL, LL, soft pogonion."""
    an, n = m.an, k["N"]
    st, lip, fh = an.soft_tissue_mm, an.lip_mm, an.face_height
    scalp = _arc((-22.0, -18.0), 99.0, -232.0, -8.0, 86.0)      # vault + 6 mm
    sn = np.array([k["A"][0] + st, k["ANS"][1] + 4.0 * fh])
    prn = np.array([n[0] + 31.0, n[1] + 43.0 * fh])             # pronasale
    nose = _spline([scalp[-1], n + [9.5, -10.0], n + [7.0, 1.5], n + [13.0, 13.0], prn - [2.5, 7.0], prn,
                    prn + [-2.5, 5.0], sn + [6.0, -2.5], sn])
    ul = np.array([k["Pr"][0] + st + 1.0 + lip, k["Pr"][1] + 3.5])
    sto = np.array([ul[0] - 5.0, k["UIE"][1] - 2.0])            # stomion: the lips meet
    upper = _spline([sn, sn + [0.8, 6.0], ul, ul + [-2.0, 3.0], sto])
    ll = np.array([k["Id"][0] + st + lip, k["Id"][1] - 3.0])
    pog_s, me = k["Pog"] + [st - 1.5, 1.0], k["Me"]
    lower = _spline([sto, ll + [-2.5, -4.5], ll, k["B"] + [st - 1.0, 0.0], pog_s, me + [1.0, 8.5],
                     me + [-12.0, 12.0], me + [-26.0, 20.0], [me[0] - 30.0, 260.0]])
    m.fill(np.concatenate([scalp, nose, upper, lower, [[-85.0, 260.0], [-88.0, 60.0]]]), 0.3 * m.d_soft, "soft")
    pns = k["PNS"]
    airway = _spline([pns + [-8.0, -6.0], [-2.0, 47.0], [-10.0, 60.0], [-12.0, 80.0], [-11.0, 100.0],
                      [-9.0, 125.0], [-7.0, 170.0]])
    m.fill(_band(airway, 4.5), -0.2 * m.d_soft, "soft")
    m.kpts.update(subnasale=sn, upper_lip=_extreme(upper, ul, 4.0, (1.0, 0.0)),
                  lower_lip=_extreme(lower, ll, 5.0, (1.0, 0.0)),
                  soft_tissue_pogonion=_extreme(lower, pog_s, 7.0, (1.0, 0.0)))


def _spine(m: _Model) -> None:
    """C2 (body and dens) to C5 behind the airway: textured bodies with cortical rims."""
    c2 = _spline([[-31.0, 33.0], [-27.5, 36.0], [-25.0, 47.0], [-23.5, 79.0], [-38.0, 81.0], [-38.5, 50.0],
                  [-34.0, 36.5]], closed=True)
    bodies = [c2] + [_spline([[-39.5 - i, y], [-24.5 - i, y - 1.0], [-24.0 - i, y + 13.0], [-39.0 - i, y + 14.0]],
                             closed=True) for i, y in enumerate((86.0, 105.0, 124.0))]
    for body in bodies:
        m.fill(body, 0.42 * m.d_bone)
        m.stroke(np.concatenate([body, body[:1]]), 1.2, 0.25 * m.d_cortex)


def build_skull(an: CephAnatomy) -> tuple[list[_Part], Pt]:
    """(parts, landmarks (19, 2) in CEPH_NAMES order) of one anatomy, adult mm in the skull frame."""
    m, k = _Model(an), _anchors(an)
    _soft_tissue(m, k)
    _cranium(m, k)
    _cranial_base(m, k)
    _spine(m)
    _maxilla(m, k)
    _mandible(m, k)
    _teeth(m, k)
    return m.parts, np.stack([m.kpts[name] for name in CEPH_NAMES])


# ----------------------------------------------------------------------------------------------------------------
# Image: pose, rasterisation, film
# ----------------------------------------------------------------------------------------------------------------

def spacing_for(image_hw: tuple[int, int]) -> float:
    """mm per pixel of an image of this size: 0.1 mm at 1000 px wide, the field's width fixed at 100 mm."""
    return REF_SPACING_MM * REF_WIDTH_PX / int(image_hw[1])


def _pose(rng: np.random.Generator, kpts_K2: Pt, an: CephAnatomy, hw: tuple[int, int]) -> tuple[Pt, dict]:
    """2x3 affine adult mm -> pixels: rotation +-4 deg and scale 0.95-1.05 about the landmarks' box centre, which
    lands near the image centre; the translation keeps every landmark 4 % of the width inside the image (a pose that
    cannot fit shrinks by 3 % steps, the same draws reused, so the outcome stays a function of the seed)."""
    h, w = hw
    phi = math.radians(rng.uniform(-4.0, 4.0))
    scale = rng.uniform(0.95, 1.05)
    jitter = rng.uniform(-1.0, 1.0, size=2) * np.array([0.03 * w, 0.03 * h])
    rot = np.array([[math.cos(phi), -math.sin(phi)], [math.sin(phi), math.cos(phi)]])
    margin = 0.04 * w
    for _ in range(8):
        lin = MODEL_SCALE * an.skull_scale * scale / spacing_for(hw) * rot
        moved = kpts_K2 @ lin.T
        lo, hi = margin - moved.min(axis=0), np.array([w - 1.0, h - 1.0]) - margin - moved.max(axis=0)
        if np.all(lo <= hi):
            target = np.array([0.47 * (w - 1), 0.5 * (h - 1)]) + jitter
            shift = np.clip(target - 0.5 * (moved.min(axis=0) + moved.max(axis=0)), lo, hi)
            return np.concatenate([lin, shift[:, None]], axis=1), {"rot_deg": math.degrees(phi), "scale": scale}
        scale *= 0.97
    raise ValueError(f"ceph: a {w}x{h} image cannot hold the 19 landmarks at {spacing_for(hw):.4g} mm/px "
                     f"(the field is {w * spacing_for(hw):.0f} x {h * spacing_for(hw):.0f} mm; keep H/W near 1.2)")


def _rasterise(parts: list[_Part], affine: Pt, hw: tuple[int, int], px_per_mm: float) -> dict[str, np.ndarray]:
    """Per layer, the sum over parts of density x coverage; each part is drawn by PIL into the crop of its bounding
    box only (vertices rounded: a pixel counts when its centre lies in or on the shape, see the module docstring)."""
    h, w = hw
    layers = {name: np.zeros(hw, dtype=np.float32) for name in LAYERS}
    for part in parts:
        pts = np.rint(part.pts @ affine[:, :2].T + affine[:, 2])
        width = max(1, int(round(part.width_mm * px_per_mm)))
        pad = width + 1
        x0, y0 = (max(int(v), 0) for v in pts.min(axis=0) - pad)
        x1, y1 = min(int(pts[:, 0].max()) + pad, w), min(int(pts[:, 1].max()) + pad, h)
        if x0 >= x1 or y0 >= y1:
            continue
        canvas = Image.new("L", (x1 - x0, y1 - y0))
        flat = (pts - [x0, y0]).ravel().tolist()
        if part.kind == "fill":
            ImageDraw.Draw(canvas).polygon(flat, fill=1)
        else:
            ImageDraw.Draw(canvas).line(flat, fill=1, width=width)
        region = layers[part.layer][y0:y1, x0:x1]
        region += np.float32(part.value) * np.asarray(canvas)
    return layers


def _texture(rng: np.random.Generator, hw: tuple[int, int], cell_px: float) -> np.ndarray:
    """Unit-variance smooth noise with features of about cell_px: drawn on a coarse grid and resized (bicubic), so
    its cost does not grow with the image's resolution beyond the resize."""
    h, w = hw
    if cell_px < 2.0:
        noise = gaussian_filter(rng.standard_normal(hw, dtype=np.float32), 0.6 * cell_px)
    else:
        small = gaussian_filter(rng.standard_normal((int(h / cell_px) + 2, int(w / cell_px) + 2), dtype=np.float32),
                                0.7)
        noise = np.asarray(Image.fromarray(small, mode="F").resize((w, h), Image.BICUBIC))
    return noise / (noise.std() + 1e-6)


def _film(rng: np.random.Generator, layers: dict[str, np.ndarray], spacing_mm: float) -> np.ndarray:
    """Radiograph display in [0, 1]: trabecular texture in bone, a faint mottle in soft tissue, blur,
    1 - exp(-attenuation), a smooth exposure gradient with vignetting, and film grain."""
    hw = layers["soft"].shape
    tex = _texture(rng, hw, 0.6 / spacing_mm)
    # soft tissue is not uniform either: a faint centimetre-scale mottle keeps large regions from being flat
    mottle = _texture(rng, hw, 6.0 / spacing_mm)
    density = layers["soft"] * (1.0 + 0.08 * mottle) + layers["bone"] * (1.0 + 0.3 * tex) + layers["dense"]
    sigma_px = max(0.5, rng.uniform(0.06, 0.12) / spacing_mm)
    density = gaussian_filter(density, sigma_px, truncate=3.0)
    ys = np.linspace(-0.5, 0.5, hw[0], dtype=np.float32)[:, None]
    xs = np.linspace(-0.5, 0.5, hw[1], dtype=np.float32)[None, :]
    gx, gy, vig = rng.uniform(-0.15, 0.15), rng.uniform(-0.15, 0.15), rng.uniform(0.1, 0.35)
    exposure = (1.0 + gx * xs + gy * ys) * (1.0 - vig * (xs * xs + ys * ys))
    bg, gain = rng.uniform(0.03, 0.08), rng.uniform(0.82, 0.95)
    img = bg + gain * exposure * (1.0 - np.exp(-1.5 * density))
    img += rng.uniform(0.012, 0.028) * rng.standard_normal(hw, dtype=np.float32)
    return np.clip(img, 0.0, 1.0, out=img)


@dataclass
class CephImage:
    display_HW: np.ndarray       # float32 in [0, 1]
    kpts_px_K2: np.ndarray       # (19, 2) float64, CEPH_NAMES order, MedPose pixels
    spacing_mm: float
    pose: dict


def render_ceph(rng: np.random.Generator, anatomy: CephAnatomy | None = None,
                image_hw: tuple[int, int] = DEFAULT_HW) -> CephImage:
    """One cephalogram of `anatomy` (drawn from rng when not given): pose and film drawn from rng."""
    hw = (int(image_hw[0]), int(image_hw[1]))
    an = anatomy if anatomy is not None else sample_anatomy(rng)
    parts, kpts = build_skull(an)
    affine, pose = _pose(rng, kpts, an, hw)
    spacing = spacing_for(hw)
    layers = _rasterise(parts, affine, hw, MODEL_SCALE * an.skull_scale * pose["scale"] / spacing)
    display = _film(rng, layers, spacing)
    return CephImage(display, kpts @ affine[:, :2].T + affine[:, 2], spacing, pose)


def quantise(display_HW: np.ndarray, bit_depth: int = 8) -> np.ndarray:
    """[0, 1] -> uint8 (bit_depth 8) or uint16 (16), rounded to nearest."""
    if bit_depth not in (8, 16):
        raise ValueError(f"quantise: bit_depth must be 8 or 16, got {bit_depth}")
    top, dtype = (255.0, np.uint8) if bit_depth == 8 else (65535.0, np.uint16)
    return np.rint(display_HW * np.float32(top)).astype(dtype)


# ----------------------------------------------------------------------------------------------------------------
# Samples and dataset files
# ----------------------------------------------------------------------------------------------------------------

def _images_per_patient(patients_per_image) -> tuple[int, int]:
    lo, hi = ((patients_per_image, patients_per_image) if np.isscalar(patients_per_image)
              else tuple(patients_per_image))
    if not (int(lo) == lo and int(hi) == hi and 1 <= lo <= hi):
        raise ValueError(f"ceph: patients_per_image must be an int >= 1 or a (lo, hi) range of them, "
                         f"got {patients_per_image!r}")
    return int(lo), int(hi)


def patient_plan(n: int, seed: int, patients_per_image=1) -> list[tuple[int, int]]:
    """[(patient, view)] per image index, patients numbered from 1 with lo..hi images each (drawn per patient); a
    prefix of the plan does not depend on n."""
    lo, hi = _images_per_patient(patients_per_image)
    rng = np.random.default_rng([seed, _PLAN])
    plan: list[tuple[int, int]] = []
    patient = 0
    while len(plan) < n:
        patient += 1
        views = int(rng.integers(lo, hi + 1))
        plan.extend((patient, v + 1) for v in range(min(views, n - len(plan))))
    return plan


def assign_splits(plan: list[tuple[int, int]], fracs: Sequence[float], seed: int) -> dict[int, str]:
    """Whole patients to train / val / test: in a seeded order, each split with a positive fraction first gets one
    patient (test, val, train - so none is empty given enough patients), then each patient goes to the split
    furthest below its target image count."""
    size: dict[int, int] = {}
    for patient, _ in plan:
        size[patient] = size.get(patient, 0) + 1
    patients = sorted(size)
    order = [patients[i] for i in np.random.default_rng([seed, _SPLIT]).permutation(len(patients))]
    target = {s: f * len(plan) for s, f in zip(SPLIT_NAMES, fracs)}
    seeds = [s for s in ("test", "val", "train") if target[s] > 0]
    count = dict.fromkeys(SPLIT_NAMES, 0)
    out: dict[int, str] = {}
    for j, patient in enumerate(order):
        split = seeds[j] if j < len(seeds) else max(SPLIT_NAMES, key=lambda s: target[s] - count[s])
        out[patient] = split
        count[split] += size[patient]
    return out


def resolve_names(num_landmarks: int | None = 19, names: Sequence[str] | None = None) -> list[str]:
    """The landmark subset: `names` (each one of CEPH_NAMES, no repeats) or the first num_landmarks names."""
    if names is not None:
        bad = [nm for nm in names if nm not in CEPH_NAMES]
        if bad or not names or len(set(names)) != len(names):
            raise ValueError(f"ceph: names must be distinct members of CEPH_NAMES, got {list(names)!r}")
        return list(names)
    if not 1 <= int(num_landmarks) <= len(CEPH_NAMES):
        raise ValueError(f"ceph: num_landmarks must lie in 1..{len(CEPH_NAMES)}, got {num_landmarks}")
    return list(CEPH_NAMES[:int(num_landmarks)])


def ceph_sample(index: int, seed: int = 0, image_hw: tuple[int, int] = DEFAULT_HW, num_landmarks: int = 19,
                names: Sequence[str] | None = None, bit_depth: int = 8, patients_per_image=1) -> dict[str, Any]:
    """Sample dict of image `index` (data_pipelines/synthetic/writers.py), a pure function of its arguments: the
    landmark subset only selects rows, the pixels do not depend on it. "split" is None (the dataset assigns it)."""
    patient, view = patient_plan(index + 1, seed, patients_per_image)[index]
    rows = [CEPH_NAMES.index(nm) for nm in resolve_names(num_landmarks, names)]
    return _sample(index, patient, view, seed, image_hw, rows, bit_depth)


def _sample(index: int, patient: int, view: int, seed: int, image_hw: tuple[int, int], rows: list[int],
            bit_depth: int) -> dict[str, Any]:
    anatomy = sample_anatomy(np.random.default_rng([seed, _PATIENT, patient]))
    img = render_ceph(np.random.default_rng([seed, _IMAGE, index]), anatomy, image_hw)
    return {"id": f"ceph{patient:04d}_{view}", "image_HW": quantise(img.display_HW, bit_depth),
            "kpts_px_K2": img.kpts_px_K2[rows], "kpts_visible_K": np.ones(len(rows), dtype=bool),
            "spacing_mm": img.spacing_mm, "patient_id": f"ceph{patient:04d}", "split": None, "pose": img.pose}


def generate_ceph_dataset(root: str | Path, n: int, seed: int = 0, image_hw: tuple[int, int] = DEFAULT_HW,
                          num_landmarks: int = 19, layout: str = "coco", image_format: str = "png",
                          bit_depth: int = 8, patients_per_image=1,
                          split_fracs: tuple[float, float, float] | None = None, progress: bool = False,
                          names: Sequence[str] | None = None) -> list[Path]:
    """Write n synthetic cephalograms in `layout` ("coco", "table", "labelme"; writers.py) under root and return
    the annotation files written. patients_per_image: images per patient, an int or a (lo, hi) range (same anatomy,
    own pose and film per image). split_fracs (train, val, test): whole patients per split, recorded in the
    annotations ("split"). bit_depth 16 writes 16-bit PNGs. root/dataset.json records the generator's arguments."""
    if n < 1:
        raise ValueError(f"generate_ceph_dataset: n must be >= 1, got {n}")
    if layout not in LAYOUTS or image_format not in IMAGE_FORMATS or bit_depth not in (8, 16):
        raise ValueError(f"generate_ceph_dataset: layout {layout!r} / image_format {image_format!r} / bit_depth "
                         f"{bit_depth!r} not among {LAYOUTS} / {IMAGE_FORMATS} / (8, 16)")
    if image_format == "jpg" and bit_depth == 16:
        raise ValueError("generate_ceph_dataset: 16-bit images are written as PNG only")
    if split_fracs is not None and (len(split_fracs) != 3 or min(split_fracs) < 0 or
                                    abs(sum(split_fracs) - 1.0) > 1e-6):
        raise ValueError(f"generate_ceph_dataset: split_fracs must be 3 fractions summing to 1, got {split_fracs}")
    hw = (int(image_hw[0]), int(image_hw[1]))
    kpt_names = resolve_names(num_landmarks, names)
    plan = patient_plan(n, seed, patients_per_image)
    split_of = assign_splits(plan, split_fracs, seed) if split_fracs is not None else {}
    steps: Any = range(n)
    if progress:
        from tqdm import tqdm
        steps = tqdm(steps, desc="synth ceph", unit="img")

    rows = [CEPH_NAMES.index(nm) for nm in kpt_names]

    def samples():
        for i in steps:
            s = _sample(i, *plan[i], seed, hw, rows, bit_depth)      # = ceph_sample(i, ...), the plan made once
            s["split"] = split_of.get(plan[i][0])
            yield s

    meta = {"generator": "data_pipelines.synthetic.ceph", "seed": seed, "image_hw": list(hw), "bit_depth": bit_depth,
            "image_format": image_format, "patients_per_image": patients_per_image,
            "split_fracs": list(split_fracs) if split_fracs is not None else None, "model_scale": MODEL_SCALE}
    return write_layout(layout, root, samples(), kpt_names, image_format, meta)

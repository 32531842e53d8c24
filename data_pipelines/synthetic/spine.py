"""A synthetic sagittal spine MRI phantom with intervertebral-disc point labels, written as NIfTI.

Each subject is a small 3-D volume: bright rounded vertebral bodies along a gently curved spine with darker
intervertebral discs between them, a bright CSF canal with a darker cord behind the bodies, a smooth intensity bias
and noise. One voxel per disc in a label volume holds the disc index 1..num_discs (1 = most superior); some
subjects' fields of view stop above the lowest 1-3 discs, which are then absent from the labels (and the image).

Geometry is drawn in millimetres of the display view (rows superior -> inferior, columns anterior -> posterior,
data_pipelines/readers/nifti.py), built as a RAS array and then stored in a non-canonical orientation (PSR or LPI, alternating
by subject unless fixed) with a matching affine, so that readers must reorient. Spacing defaults to 2.5 mm
left-right (slice thickness), 1.25 mm superior-inferior and 1.0 mm anterior-posterior.

Layout (like the Spine Generic dataset): <root>/<subject>/<subject>_T2w.nii.gz (int16 image) and
<root>/<subject>/<subject>_T2w_labels-disc.nii.gz (int16 disc labels). Subject i is a pure function of (seed, i).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations as ornt

IMAGE_SUFFIX = "_T2w"
LABEL_SUFFIX = "_labels-disc"
DEFAULT_SHAPE = (16, 208, 112)            # (left-right slices, superior-inferior rows, anterior-posterior columns)
DEFAULT_SPACING_MM = (2.5, 1.25, 1.0)     # the same axes, mm per voxel
_MARGIN_MM = 8.0


@dataclass
class SpinePhantom:
    view_XRC: np.ndarray        # float32 intensities, (L-R slice, S-I row, A-P column)
    discs_XRC: np.ndarray       # int64 (num_discs, 3) voxel of each disc centre; -1 rows for absent discs
    present: np.ndarray         # bool (num_discs,)


def _disc_positions(rng: np.random.Generator, length_mm: float, num_discs: int) -> tuple[np.ndarray, int]:
    """S-I positions (mm from the top row centre) of the discs, and how many of the lowest lie outside the view."""
    d_max = (length_mm - 2 * _MARGIN_MM) / max(num_discs - 1, 1)
    if d_max < 8.0:
        raise ValueError(f"synth_spine: a {length_mm:.0f} mm field of view is too short for {num_discs} discs")
    step = min(rng.uniform(19.0, 23.0), 0.95 * d_max)
    rel = np.concatenate([[0.0], np.cumsum(step * rng.uniform(0.93, 1.07, num_discs - 1))])
    rel *= min(1.0, (length_mm - 2 * _MARGIN_MM) / max(rel[-1], 1e-9))
    missing = int(rng.choice([1, 2, 3])) if (num_discs > 4 and rng.random() < 0.35) else 0
    last = num_discs - 1 - missing               # lowest disc still inside the view
    lo, hi = _MARGIN_MM, length_mm - _MARGIN_MM - rel[last]
    if missing:     # the first absent disc lies at least 3 mm beyond the bottom pixel centre
        lo = max(lo, length_mm + 3.0 - rel[last + 1])
    top = rng.uniform(lo, max(lo, hi))
    return top + rel, missing


def _superellipse(u: np.ndarray, v: np.ndarray, hu: float, hv: float, soft: float = 0.12) -> np.ndarray:
    """1 inside |u/hu|^4 + |v/hv|^4 <= 1, falling smoothly to 0 over a `soft` band of that level set."""
    f = (np.abs(u) / hu) ** 4 + (np.abs(v) / hv) ** 4
    return np.clip((1.0 + soft - f) / (2 * soft), 0.0, 1.0)


def _render_view(rng: np.random.Generator, rows: int, cols: int, sp_si: float, sp_ap: float,
                 discs_mm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The 2-D view's layers: bone (bodies and discs, already weighted by the column mask), the column mask, the
    canal (added over the background), and the A-P centreline position of every disc (mm)."""
    s = (np.arange(rows) * sp_si)[:, None]                    # S-I mm of every row (pixel centres)
    a = (np.arange(cols) * sp_ap)[None, :]                    # A-P mm of every column
    width_mm = cols * sp_ap
    a0, amp = width_mm * rng.uniform(0.40, 0.52), rng.uniform(3.0, 8.0)
    period, phase = rng.uniform(250.0, 400.0), rng.uniform(0, 2 * math.pi)

    def centre(s_mm):   # the gently curved centreline (lordosis / kyphosis as one slow sinusoid)
        return a0 + amp * np.sin(2 * math.pi * np.asarray(s_mm) / period + phase)

    u = a - centre(s)                                         # A-P offset from the centreline, (rows, cols)
    step = float(np.median(np.diff(discs_mm))) if len(discs_mm) > 1 else 20.0
    half_w = min(0.7 * step, 0.3 * width_mm)                  # vertebral body half-depth (A-P)
    ext = np.concatenate([discs_mm[0] - step * np.arange(3, 0, -1), discs_mm, discs_mm[-1] + step * np.arange(1, 4)])
    disc_half = step * rng.uniform(0.11, 0.15)
    bodies = np.zeros((rows, cols))
    for top, bottom in zip(ext[:-1], ext[1:]):                # one body between each pair of neighbouring discs
        mid, half_h = (top + bottom) / 2, (bottom - top) / 2 - disc_half
        bodies = np.maximum(bodies, _superellipse(u, s - mid, half_w, half_h))
    column = np.clip((1.08 - (np.abs(u) / half_w) ** 4) / 0.16, 0.0, 1.0)
    body_i, disc_i = rng.uniform(560, 680), rng.uniform(220, 300)
    bone = column * (disc_i + (body_i - disc_i) * bodies)
    canal_u = u - (half_w + 3.0 + 5.0)                        # canal centre 3 mm behind the bodies, 10 mm wide
    csf = np.clip((5.0 - np.abs(canal_u)) / 1.0, 0.0, 1.0)
    cord = np.clip((3.0 - np.abs(canal_u)) / 1.0, 0.0, 1.0)
    canal = rng.uniform(820, 950) * csf - rng.uniform(380, 480) * cord
    return bone.astype(np.float32), column.astype(np.float32), canal.astype(np.float32), centre(discs_mm)


def render_subject(rng: np.random.Generator, shape: tuple[int, int, int] = DEFAULT_SHAPE,
                   spacing_mm: tuple[float, float, float] = DEFAULT_SPACING_MM, num_discs: int = 11) -> SpinePhantom:
    """One phantom in the display-view array (L-R slice, S-I row, A-P column) with its disc voxels."""
    nx, rows, cols = shape
    sp_lr, sp_si, sp_ap = spacing_mm
    discs_mm, missing = _disc_positions(rng, rows * sp_si, num_discs)
    bone, column, canal, disc_ap_mm = _render_view(rng, rows, cols, sp_si, sp_ap, discs_mm)
    x_mm = (np.arange(nx) - ((nx - 1) / 2 + rng.uniform(-1.5, 1.5))) * sp_lr     # L-R offset of the spine's midline
    bone_lr = np.clip((1.1 - (x_mm / 18.0) ** 2) / 0.2, 0.0, 1.0)[:, None, None]  # bodies ~36 mm wide
    canal_lr = np.clip((1.1 - (x_mm / 8.0) ** 2) / 0.2, 0.0, 1.0)[:, None, None]  # canal ~16 mm wide
    background = rng.uniform(90, 140)
    vol = background + bone_lr * (bone - background * column)[None] + canal_lr * canal[None]
    s_mm = np.arange(rows) * sp_si
    bias = 1.0 + rng.uniform(-0.12, 0.12) * (s_mm / s_mm[-1] - 0.5)             # smooth S-I coil bias
    vol = vol * bias[None, :, None] + rng.normal(0.0, rng.uniform(12, 25), vol.shape)
    centre_x = int(np.argmin(np.abs(x_mm)))
    discs = np.full((num_discs, 3), -1, dtype=np.int64)
    present = np.zeros(num_discs, dtype=bool)
    for k in range(num_discs):
        row, col = int(round(discs_mm[k] / sp_si)), int(round(disc_ap_mm[k] / sp_ap))
        if 0 <= row < rows and 0 <= col < cols and k < num_discs - missing:
            discs[k], present[k] = (centre_x, row, col), True
    return SpinePhantom(np.clip(vol, 0, 32767).astype(np.float32), discs, present)


def view_to_ras(view_XRC: np.ndarray) -> np.ndarray:
    """(L-R, S-I row, A-P column) display array -> RAS array: ras[x, y, z] = view[x, nz-1-z, ny-1-y] (the inverse
    of data_pipelines.readers.nifti.sagittal_image's mapping)."""
    return np.ascontiguousarray(view_XRC[:, ::-1, ::-1].transpose(0, 2, 1))


def _nifti(ras_XYZ: np.ndarray, spacing_ras: tuple[float, float, float], axcodes: str) -> nib.Nifti1Image:
    """A RAS array stored in orientation `axcodes` with the affine that keeps every voxel's world position."""
    affine = np.diag([*spacing_ras, 1.0])
    affine[:3, 3] = -affine[:3, :3] @ ((np.asarray(ras_XYZ.shape) - 1) / 2.0)   # world origin at the centre
    transform = ornt.ornt_transform(ornt.axcodes2ornt("RAS"), ornt.axcodes2ornt(tuple(axcodes)))
    data = ornt.apply_orientation(ras_XYZ, transform)
    img = nib.Nifti1Image(np.ascontiguousarray(data), affine @ ornt.inv_ornt_aff(transform, ras_XYZ.shape))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    img.header.set_xyzt_units("mm")
    return img


def generate_spine_dataset(root: str | Path, n: int, seed: int = 0, shape: tuple[int, int, int] = DEFAULT_SHAPE,
                           spacing_mm: tuple[float, float, float] = DEFAULT_SPACING_MM, num_discs: int = 11,
                           orientation: str | None = None, first_value: int = 1,
                           progress: bool = False) -> list[Path]:
    """Write n phantom subjects under root (layout in the module docstring); returns the image paths.

    shape / spacing_mm: (left-right slices, superior-inferior rows, anterior-posterior columns) of the display view.
    orientation: stored axis codes (e.g. "PSR", "LPI"); None alternates PSR (even subjects) and LPI (odd).
    first_value: the label value of the most superior disc (disc k holds first_value + k - 1).
    """
    if n < 1 or num_discs < 1 or len(shape) != 3 or min(shape) < 1 or min(spacing_mm) <= 0:
        raise ValueError(f"generate_spine_dataset: need n >= 1, num_discs >= 1, a 3-D shape and positive spacing; "
                         f"got n={n}, num_discs={num_discs}, shape={shape}, spacing_mm={spacing_mm}")
    root = Path(root)
    width = max(3, len(str(n - 1)))
    spacing_ras = (spacing_mm[0], spacing_mm[2], spacing_mm[1])     # (L-R, A-P, S-I)
    steps = range(n)
    if progress:
        from tqdm import tqdm
        steps = tqdm(steps, desc="synth spine", unit="vol")
    paths, records = [], []
    for i in steps:
        phantom = render_subject(np.random.default_rng([seed, i]), tuple(shape), tuple(spacing_mm), num_discs)
        labels = np.zeros(phantom.view_XRC.shape, dtype=np.int16)
        for k in np.flatnonzero(phantom.present):
            labels[tuple(phantom.discs_XRC[k])] = first_value + k
        code = orientation or ("PSR", "LPI")[i % 2]
        subject = f"sub-{i:0{width}d}"
        folder = root / subject
        folder.mkdir(parents=True, exist_ok=True)
        image_path = folder / f"{subject}{IMAGE_SUFFIX}.nii.gz"
        image = view_to_ras(np.rint(phantom.view_XRC).astype(np.int16))
        nib.save(_nifti(image, spacing_ras, code), str(image_path))
        label_path = folder / f"{subject}{IMAGE_SUFFIX}{LABEL_SUFFIX}.nii.gz"
        nib.save(_nifti(view_to_ras(labels), spacing_ras, code), str(label_path))
        paths.append(image_path)
        records.append({"subject": subject, "orientation": code, "discs_present": int(phantom.present.sum())})
    meta = {"generator": "data_pipelines.synthetic.spine", "seed": seed, "shape": list(shape),
            "spacing_mm": list(spacing_mm), "num_discs": num_discs, "first_value": first_value, "subjects": records}
    (root / "synth_spine.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    return paths

"""NIfTI volumes and point-label volumes -> the 2-D mid-sagittal image of the disc-labelling task
(docs/systems/spine_disc_hourglass.md).

Canonical orientation: every volume is reoriented to **RAS** with nibabel's orientation transforms (array axis 0 runs
towards Right, axis 1 towards Anterior, axis 2 towards Superior), whatever its stored orientation (PSR, LPI, ...).
The published code reorients to RPI instead; any fixed canonical frame works because the 2-D view is defined from
it, and RAS is nibabel's own canonical frame.

The 2-D view (rows = superior -> inferior, columns = anterior -> posterior, i.e. superior at the top and anterior on
the left, the usual radiological sagittal display): for a RAS array vol[x, y, z] and a sagittal slab of slices
x in [lo, hi),

    image[row, col] = mean_x vol[x, ny - 1 - col, nz - 1 - row]

so a voxel (x, y, z) lands at the 2-D point (col, row) = (ny - 1 - y, nz - 1 - z), and the 2-D spacing is
(A-P voxel size, S-I voxel size) in mm per pixel (x, y). The slab holds `slab` slices (published: 6) starting at
c - slab // 2, c = the labels' median left-right index rounded half up (the volume centre without labels), shifted
to stay inside the volume. The network input is this image z-scored per image: (I - mean) / std.

Point-label volumes (generic, not only discs): each non-zero voxel is one point whose VALUE is its label; the
landmark channel is value - first_label. A value outside [first_label, first_label + num_keypoints) is an error
(out_of_range="error") or dropped with a warning ("skip"); a value held by more than one voxel is an error.
Every problem raises DataError naming the file.
"""
from __future__ import annotations

import gzip
import io
import logging
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations as ornt

from data_pipelines.errors import DataError
from data_pipelines.images import display_uint8, zscore  # noqa: F401 (re-exported: readers' public names)

log = logging.getLogger(__name__)

CANONICAL_AXCODES = ("R", "A", "S")
OUT_OF_RANGE_MODES = ("error", "skip")


@dataclass
class Volume:
    """A volume in the canonical RAS array frame."""
    data_XYZ: np.ndarray          # float32, axis 0 -> Right, 1 -> Anterior, 2 -> Superior
    spacing_mm_3: np.ndarray      # float64 voxel size along the canonical axes (L-R, A-P, S-I)
    affine_4x4: np.ndarray        # canonical voxel index -> world RAS mm
    source_axcodes: str           # the stored orientation, e.g. "PSR"
    path: str


@dataclass
class PointLabels:
    """Point labels in the canonical voxel frame: one row per channel, NaN where the label is absent."""
    vox_K3: np.ndarray            # float64 (x, y, z) canonical voxel indices
    present_K: np.ndarray         # bool
    dropped_values: list[int] = field(default_factory=list)   # out-of-range values skipped (out_of_range="skip")


@dataclass
class SagittalSample:
    """The 2-D mid-sagittal input of one volume and its points (see the module docstring for the frame)."""
    image_HW: np.ndarray          # float32, z-scored slab mean; rows S -> I, columns A -> P
    kpts_px_K2: np.ndarray        # float32 (x = column, y = row); 0 where absent
    kpts_visible_K: np.ndarray    # bool: the label is present in the label volume
    lateral_mm_K: np.ndarray      # float64 |x - slab centre| * L-R spacing (information only); NaN where absent
    spacing_mm_2: np.ndarray      # float64 (A-P, S-I) mm per 2-D pixel
    slab_range: tuple[int, int]   # canonical L-R slices [lo, hi) averaged
    source_axcodes: str
    path: str
    label_path: str | None = None
    dropped_values: list[int] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------------- volumes
def _read_array(img, path: Path) -> np.ndarray:
    try:
        arr = np.asanyarray(img.dataobj)      # a file shorter than its header promises fails here
    except Exception as exc:
        raise DataError(path, f"cannot read the voxel data ({type(exc).__name__}: {exc})") from exc
    while arr.ndim > 3 and arr.shape[-1] == 1:   # (X, Y, Z, 1): a 3-D volume stored with a singleton time axis
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise DataError(path, f"expected a 3-D volume, got shape {tuple(arr.shape)}")
    if min(arr.shape) < 1:
        raise DataError(path, f"empty volume of shape {tuple(arr.shape)}")
    return arr


def _spacing(img, raw: bytes, path: Path) -> np.ndarray:
    """pixdim[1:4] as stored: nibabel's header check silently replaces zero voxel sizes with 1 on load, so the
    header is parsed a second time without the check."""
    zooms = np.asarray(type(img.header).from_fileobj(io.BytesIO(raw), check=False)["pixdim"][1:4], dtype=np.float64)
    if zooms.size < 3 or not np.all(np.isfinite(zooms)) or not np.all(zooms > 0):
        raise DataError(path, f"missing or zero voxel spacing (pixdim[1:4] = {zooms.tolist()})")
    return zooms


def _read_nifti(path: Path):
    """(image, uncompressed bytes) of a single-file NIfTI-1/2 (.nii or .nii.gz). The whole gzip stream is
    decompressed up front so its CRC and length are checked: nibabel's lazy reader stops after the voxel bytes
    and accepts a damaged deflate stream that still decodes."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except Exception as exc:
        raise DataError(path, f"corrupt or unreadable file ({type(exc).__name__}: {exc})") from exc
    size = {struct.unpack(f"{e}i", raw[:4])[0] for e in "<>"} if len(raw) >= 4 else set()
    kind = nib.Nifti1Image if 348 in size else nib.Nifti2Image if 540 in size else None
    if kind is None:
        raise DataError(path, "not a NIfTI-1/2 file (header size is neither 348 nor 540 bytes)")
    try:
        return kind.from_bytes(raw), raw
    except Exception as exc:
        raise DataError(path, f"not a readable NIfTI file ({type(exc).__name__}: {exc})") from exc


def to_canonical(arr: np.ndarray, affine: np.ndarray, path: Path | str = "") -> tuple[np.ndarray, np.ndarray,
                                                                                     np.ndarray, str]:
    """Reorient an array to RAS: returns (array, canonical affine, transform (3, 2) [new axis, flip] per stored
    axis, stored axcodes). The transform is nibabel's ornt_transform(stored, RAS)."""
    stored = ornt.io_orientation(np.asarray(affine, dtype=np.float64))
    if np.isnan(stored).any():
        raise DataError(path, f"the affine has no usable orientation (affine rows {np.round(affine[:3], 3).tolist()})")
    transform = ornt.ornt_transform(stored, ornt.axcodes2ornt(CANONICAL_AXCODES))
    out = ornt.apply_orientation(arr, transform)
    new_affine = np.asarray(affine, dtype=np.float64) @ ornt.inv_ornt_aff(transform, arr.shape)
    return np.ascontiguousarray(out), new_affine, transform, "".join(ornt.ornt2axcodes(stored))


def load_volume(path: str | Path) -> Volume:
    """Read a single-file NIfTI volume (.nii / .nii.gz) and reorient it to RAS; DataError(path, problem) for a
    missing, corrupt or non-3-D file, missing/zero spacing, a degenerate affine or non-finite voxels."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found")
    img, raw = _read_nifti(path)
    arr = _read_array(img, path)
    zooms = _spacing(img, raw, path)
    data, affine, transform, axcodes = to_canonical(arr, img.affine, path)
    spacing = np.empty(3, dtype=np.float64)
    spacing[transform[:, 0].astype(int)] = zooms     # stored axis i becomes canonical axis transform[i, 0]
    data = data.astype(np.float32, copy=False)
    if not np.isfinite(data).all():
        raise DataError(path, "the volume holds non-finite voxel values")
    return Volume(data, spacing, affine, axcodes, str(path))


# -------------------------------------------------------------------------------------------------- point labels
def _check_grid(labels: Volume, image: Volume) -> None:
    if labels.data_XYZ.shape != image.data_XYZ.shape:
        raise DataError(labels.path, f"label volume shape {labels.data_XYZ.shape} (RAS) differs from the image "
                                     f"{image.path} shape {image.data_XYZ.shape}")
    if not np.allclose(labels.affine_4x4, image.affine_4x4, atol=1e-2):
        log.warning("%s: affine differs from the image %s by up to %.3g mm; using the voxel grid as is", labels.path,
                    image.path, float(np.abs(labels.affine_4x4 - image.affine_4x4).max()))


def point_labels(labels: Volume, first_label: int = 1, num_keypoints: int = 11,
                 out_of_range: str = "error") -> PointLabels:
    """The point labels of a (canonical) label volume: each non-zero voxel is one point, channel = value -
    first_label. Duplicate values and (with out_of_range="error") values outside the channel range raise DataError."""
    if out_of_range not in OUT_OF_RANGE_MODES:
        raise ValueError(f"out_of_range must be one of {OUT_OF_RANGE_MODES}, got {out_of_range!r}")
    where = np.nonzero(labels.data_XYZ)
    values = labels.data_XYZ[where].astype(np.float64)
    rounded = np.rint(values)
    if values.size and np.abs(values - rounded).max() > 1e-3:
        bad = values[np.abs(values - rounded) > 1e-3][0]
        raise DataError(labels.path, f"label value {bad:g} is not an integer (point labels hold integer values)")
    ints = rounded.astype(np.int64)
    uniq, counts = np.unique(ints, return_counts=True)
    if (counts > 1).any():
        v = int(uniq[counts > 1][0])
        raise DataError(labels.path, f"duplicate label value {v}: {int(counts[counts > 1][0])} voxels hold it "
                                     f"(one voxel per point expected)")
    vox = np.full((num_keypoints, 3), np.nan)
    present = np.zeros(num_keypoints, dtype=bool)
    dropped: list[int] = []
    for n, v in enumerate(ints):
        ch = int(v) - first_label
        if not 0 <= ch < num_keypoints:
            if out_of_range == "error":
                raise DataError(labels.path, f"label value {int(v)} is outside [{first_label}, "
                                             f"{first_label + num_keypoints - 1}] (first_label={first_label}, "
                                             f"num_keypoints={num_keypoints})")
            dropped.append(int(v))
            continue
        vox[ch] = [where[0][n], where[1][n], where[2][n]]
        present[ch] = True
    if dropped:
        log.warning("%s: skipped label value(s) %s outside [%d, %d]", labels.path, sorted(dropped), first_label,
                    first_label + num_keypoints - 1)
    return PointLabels(vox, present, sorted(dropped))


# ----------------------------------------------------------------------------------------------- sagittal view
def slab_range(nx: int, centre_x: float, slab: int) -> tuple[int, int]:
    """Slices [lo, hi) of a `slab`-slice window starting at c - slab // 2 (c = centre rounded half up), shifted to
    lie inside [0, nx); the whole volume when slab >= nx."""
    if slab < 1:
        raise ValueError(f"slab must be >= 1, got {slab}")
    if slab >= nx:
        return 0, nx
    lo = int(math.floor(centre_x + 0.5)) - slab // 2
    lo = min(max(lo, 0), nx - slab)
    return lo, lo + slab


def sagittal_image(data_XYZ: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Mean of canonical slices [lo, hi) displayed with rows S -> I and columns A -> P (module docstring)."""
    view_YZ = data_XYZ[lo:hi].mean(axis=0, dtype=np.float64)
    return np.ascontiguousarray(view_YZ[::-1, ::-1].T.astype(np.float32))


def project_points(vox_K3: np.ndarray, shape_XYZ: tuple[int, int, int]) -> np.ndarray:
    """Canonical voxel (x, y, z) -> 2-D point (col, row) = (ny - 1 - y, nz - 1 - z)."""
    _, ny, nz = shape_XYZ
    return np.stack([(ny - 1) - vox_K3[:, 1], (nz - 1) - vox_K3[:, 2]], axis=1)


def load_sagittal(image_path: str | Path, label_path: str | Path | None = None, slab: int = 6,
                  first_label: int = 1, num_keypoints: int = 11, out_of_range: str = "error") -> SagittalSample:
    """One volume (and its point-label volume) -> the z-scored 2-D slab image and its points (module docstring)."""
    vol = load_volume(image_path)
    nx, ny, nz = vol.data_XYZ.shape
    if label_path is not None:
        lab_vol = load_volume(label_path)
        _check_grid(lab_vol, vol)
        pts = point_labels(lab_vol, first_label, num_keypoints, out_of_range)
    else:
        pts = PointLabels(np.full((num_keypoints, 3), np.nan), np.zeros(num_keypoints, dtype=bool))
    centre = float(np.median(pts.vox_K3[pts.present_K, 0])) if pts.present_K.any() else (nx - 1) / 2.0
    lo, hi = slab_range(nx, centre, slab)
    image = zscore(sagittal_image(vol.data_XYZ, lo, hi), vol.path)
    kpts = np.where(pts.present_K[:, None], project_points(pts.vox_K3, (nx, ny, nz)), 0.0)
    slab_centre = (lo + hi - 1) / 2.0
    lateral = np.abs(pts.vox_K3[:, 0] - slab_centre) * vol.spacing_mm_3[0]
    return SagittalSample(image_HW=image, kpts_px_K2=kpts.astype(np.float32), kpts_visible_K=pts.present_K.copy(),
                          lateral_mm_K=lateral, spacing_mm_2=vol.spacing_mm_3[[1, 2]].copy(), slab_range=(lo, hi),
                          source_axcodes=vol.source_axcodes, path=vol.path,
                          label_path=None if label_path is None else str(label_path),
                          dropped_values=pts.dropped_values)

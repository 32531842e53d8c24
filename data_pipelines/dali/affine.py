"""The DALI side of the keypoint-consistent augmentation: one affine matrix per sample moves the image (linear), the
mask (nearest) and the landmarks together, the same way as the torch path (data_pipelines/transforms.py, the
reference this module is held to by tests/test_dali_affine.py).

Conventions. MedPose puts pixel centres at integer coordinates and a matrix M maps source to destination pixels
(transforms.py). DALI's warp_affine puts pixel centres at +0.5 (pixel i covers [i, i+1)), so the image and the mask
are warped with the conjugated matrix T(+0.5) M T(-0.5) in DALI's frame, given as a source-to-destination map
(inverse_map=False). Landmarks are plain coordinates, so fn.coord_transform applies M itself.

The matrix is built on the pipeline's device with fn.transforms.* from the per-sample draws of the torch path
(transforms.AffineDraw, same composition as affine_from_draw), composed with the letterbox matrix, or taken as
given (`matrices`) for parity tests and externally chosen transforms. CPU-only pipelines (device_id=None) run where
no GPU is present; with a GPU the same graph runs its warps on the device.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from data_pipelines.transforms import AffineDraw

try:  # optional extra (setup.py "dali"); the package is nvidia-dali-cuda130, never the placeholder nvidia-dali
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def
    HAVE_DALI = True
except ImportError:  # pragma: no cover - depends on the installation
    fn = types = pipeline_def = None
    HAVE_DALI = False

WHERE = "data_pipelines/dali/affine.py"


def _require_dali() -> None:
    if not HAVE_DALI:
        raise RuntimeError(f"{WHERE}: NVIDIA DALI is not installed (pip install nvidia-dali-cuda130, or "
                           f"'medpose[dali]'); use data.loader=torch")


def draw_vector(d: AffineDraw, hw: tuple[int, int]) -> np.ndarray:
    """An AffineDraw as the float32 vector the pipeline reads: flip sign, angle (deg), scale, tan(shear), then the
    centre c and the final offset c + t of the frame (H, W)."""
    h, w = hw
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    return np.array([-1.0 if d.flipped else 1.0, d.angle_deg, d.scale, np.tan(np.radians(d.shear_deg)),
                     cx, cy, cx + d.tx, cy + d.ty], dtype=np.float32)


def _chain(draw, pre, half_pixel: bool):
    """fn.transforms chain of affine_from_draw(...) @ pre (each call applies after the previous one); half_pixel
    wraps it in T(+0.5) ... T(-0.5) for DALI's pixel-centre convention."""
    t = fn.transforms.translation(offset=[-0.5, -0.5]) if half_pixel else None
    t = pre if t is None else fn.transforms.combine(t, pre)
    t = fn.transforms.translation(t, offset=-draw[4:6])
    t = fn.transforms.scale(t, scale=fn.stack(draw[0], 1.0))
    t = fn.transforms.scale(t, scale=fn.stack(draw[2], draw[2]))
    t = fn.transforms.shear(t, shear=fn.stack(draw[3], 0.0))
    t = fn.transforms.rotation(t, angle=draw[1])
    t = fn.transforms.translation(t, offset=draw[6:8])
    return fn.transforms.translation(t, offset=[0.5, 0.5]) if half_pixel else t


def _conjugate_half_pixel(m_2x3):
    t = fn.transforms.combine(fn.transforms.translation(offset=[-0.5, -0.5]), m_2x3)
    return fn.transforms.translation(t, offset=[0.5, 0.5])


def _warp_graph(out_hw: tuple[int, int], pad_value: float, from_draws: bool):
    image = fn.external_source(name="image", layout="HWC", dtype=types.FLOAT)
    mask = fn.external_source(name="mask", layout="HWC", dtype=types.UINT8)
    points = fn.external_source(name="points", dtype=types.FLOAT)
    pre = fn.external_source(name="matrix", dtype=types.FLOAT)        # (2, 3): letterbox, or the whole matrix
    if from_draws:
        draw = fn.external_source(name="draw", dtype=types.FLOAT)
        m_img, m_pts = _chain(draw, pre, half_pixel=True), _chain(draw, pre, half_pixel=False)
    else:
        m_img, m_pts = _conjugate_half_pixel(pre), pre
    size = [int(out_hw[0]), int(out_hw[1])]
    image_out = fn.warp_affine(image, matrix=m_img, size=size, inverse_map=False, fill_value=float(pad_value),
                               interp_type=types.INTERP_LINEAR)
    mask_out = fn.warp_affine(mask, matrix=m_img, size=size, inverse_map=False, fill_value=0,
                              interp_type=types.INTERP_NN)
    return image_out, mask_out, fn.coord_transform(points, MT=m_pts), m_pts


class DaliWarper:
    """Warps batches with a DALI pipeline (CPU-only when device_id is None).

    run(images_HWC float32 [0, 1], masks_HW uint8, points_K2, matrices 3x3 (or letterbox matrices with `draws`))
    -> (images (N, H', W', C) float32, masks (N, H', W') uint8, points (N, K, 2) float32, matrices (N, 2, 3)) for
    a batch of N <= batch_size samples (a smaller last batch is fed as it is).
    """

    def __init__(self, out_hw: tuple[int, int], batch_size: int, pad_value: float = 0.5, from_draws: bool = False,
                 device_id: int | None = None, num_threads: int = 1, seed: int = 0):
        _require_dali()
        self.out_hw, self.batch_size, self.from_draws = tuple(out_hw), int(batch_size), bool(from_draws)
        graph = pipeline_def(_warp_graph, batch_size=self.batch_size, num_threads=num_threads, device_id=device_id,
                             seed=seed, prefetch_queue_depth=1)
        self.pipe = graph(self.out_hw, pad_value, self.from_draws)
        self.pipe.build()

    def run(self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray], points: Sequence[np.ndarray],
            matrices: Sequence[np.ndarray], draws: Sequence[AffineDraw] | None = None,
            frame_hw: tuple[int, int] | None = None):
        n = len(images)
        if not (len(masks) == len(points) == len(matrices) == n) or not 1 <= n <= self.batch_size:
            raise ValueError(f"{WHERE}: a batch needs 1 to {self.batch_size} images, masks, point sets and matrices "
                             f"(as many of each); got {n}, {len(masks)}, {len(points)}, {len(matrices)}")
        if self.from_draws and (draws is None or len(draws) != n or frame_hw is None):
            raise ValueError(f"{WHERE}: a pipeline built from draws needs one AffineDraw per sample and frame_hw")
        self.pipe.feed_input("image", [np.ascontiguousarray(i, dtype=np.float32) for i in images])
        self.pipe.feed_input("mask", [np.ascontiguousarray(np.asarray(m, dtype=np.uint8)[..., None]) for m in masks])
        self.pipe.feed_input("points", [np.ascontiguousarray(p, dtype=np.float32).reshape(-1, 2) for p in points])
        self.pipe.feed_input("matrix", [np.ascontiguousarray(np.asarray(m, dtype=np.float32)[:2]) for m in matrices])
        if self.from_draws:
            self.pipe.feed_input("draw", [draw_vector(d, frame_hw) for d in draws])
        outs = self.pipe.run()
        image, mask, pts, mat = (np.stack([np.array(o.as_cpu()[i] if hasattr(o, "as_cpu") else o[i])
                                           for i in range(n)]) for o in outs)
        return image, mask[..., 0], pts, mat

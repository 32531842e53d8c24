"""What a reader produces: records (one per sample) and the dataset's description; nothing here decodes pixels eagerly.

Readers are parsers (data_pipelines/readers/): they turn files into `Record`s and one `DataInfo`, and validate them.
Everything after that - decoding, letterbox, augmentation, targets, the DALI source, splits, `predict` preprocessing
- is the one code path of data_pipelines/dataset.py and data_pipelines/build.py, shared by every reader.

Coordinates follow data_pipelines/batch.py: (x, y) pixels of the ORIGINAL image, pixel centres at integers.

`DataInfo` is what the model and the task learn from the data: landmark names (K), mask class names (num_classes),
the left/right index pairs a horizontal flip swaps, the image channels the network gets, where the pixel spacing
comes from, and an optional point-order rule re-imposed after every warp (HC18: the axis ends are ordered by
position, so a flip or rotation may swap their labels). It is written into the resolved config's checkpoint so that
`eval` and `predict` need nothing else.

`Preprocess` is how an original image becomes the network input (input size, resize rule, padding, colour,
equalisation, normalisation, intensity domain): the training loader, evaluation and `predict` all apply it, so a
deployment reproduces it from the checkpoint alone.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Hashable, Mapping, Sequence

import numpy as np

RESIZE_MODES = ("letterbox", "stretch")
NORMALIZE_MODES = ("none", "imagenet")
VALUE_MODES = ("uint8", "zscore")
SPACING_SOURCES = ("per_image", "config", "unknown")
SPLIT_NAMES = ("train", "val", "test")


@dataclass
class ImageSource:
    """Where a sample's pixels come from: a file (DALI may decode it), the bytes of an embedded file, or pixels a
    reader already decoded (uint8 (C, H, W), or float32 (1, H, W) for z-scored MRI slabs)."""
    path: str | None = None
    data: bytes | None = None
    pixels: np.ndarray | None = None
    name: str = ""                      # how errors name it

    def encoded(self) -> str | bytes | None:
        """The encoded file (path or bytes), None when the reader holds decoded pixels."""
        return self.path if self.path is not None else self.data


@dataclass
class MaskSource:
    """A class-id mask in the original frame: polygons (class id, (N, 2) px; rasterised with labelme's pixel-centre
    rule, later classes over earlier), uncompressed COCO RLEs (class 1), a PNG of class ids, or decoded pixels."""
    polygons: list[tuple[int, np.ndarray]] = field(default_factory=list)
    rles: list[dict] = field(default_factory=list)
    path: str | None = None
    pixels: np.ndarray | None = None
    max_class: int = 255                # a PNG value above this is an error naming the file


@dataclass
class Record:
    """One sample as a reader parsed it (original frame)."""
    id: str                             # unique within a dataset (file stem, COCO file name, ...)
    where: str                          # the annotation file errors name
    image: ImageSource
    hw: tuple[int, int]                 # (H, W) of the original image, checked against the decoded pixels
    kpts_px_K2: np.ndarray              # float32 (K, 2); 0 where not labelled
    kpts_visible_K: np.ndarray          # bool (K,): labelled
    mask: MaskSource | None = None
    spacing_mm: np.ndarray | None = None   # float64 (2,) mm per original pixel (x, y); None = unknown
    patient_id: str = ""                # group that never straddles two splits
    split: str | None = None            # a split the data itself assigns (folder, column, COCO field)
    stratum: Hashable | None = None     # stratification label of the splits (hip: Graf type)
    extras: dict[str, Any] = field(default_factory=dict)   # task extras returned by original() (hc_mm, ...)
    meta: dict[str, Any] = field(default_factory=dict)     # extra per-sample meta (json, csv paths ...)
    entry: str = ""                     # the entry within `where` errors name ("images[3] (id 7)"), if any

    @property
    def num_keypoints(self) -> int:
        return int(len(self.kpts_px_K2))


@dataclass(frozen=True)
class DataInfo:
    """The dataset's description (module docstring); plain values only, so it round-trips through YAML/JSON."""
    kpt_names: tuple[str, ...]
    class_names: tuple[str, ...] | None = None
    flip_pairs: tuple[tuple[int, int], ...] = ()
    channels: int = 3
    spacing: str = "per_image"
    point_order: str | None = None

    @property
    def num_keypoints(self) -> int:
        return len(self.kpt_names)

    @property
    def num_classes(self) -> int:
        """Mask classes including the background, 0 when the data has no masks."""
        return len(self.class_names) if self.class_names else 0

    def to_dict(self) -> dict[str, Any]:
        return {"kpt_names": list(self.kpt_names), "class_names": None if self.class_names is None
                else list(self.class_names), "flip_pairs": [list(p) for p in self.flip_pairs],
                "channels": int(self.channels), "spacing": self.spacing, "point_order": self.point_order}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DataInfo":
        return cls(tuple(d["kpt_names"]), None if d.get("class_names") is None else tuple(d["class_names"]),
                   tuple((int(a), int(b)) for a, b in d.get("flip_pairs", ())), int(d.get("channels", 3)),
                   d.get("spacing", "per_image"), d.get("point_order"))


@dataclass(frozen=True)
class Preprocess:
    """Original image -> network input (module docstring)."""
    input_hw: tuple[int, int]
    resize: str = "letterbox"           # letterbox (aspect kept, padded) | stretch (plain resize)
    pad_value: float = 128.0 / 255.0    # fill outside the image, in the unit image's range
    color: str = "auto"                 # images.COLOR_MODES
    channels: int = 3                   # network input channels; grey is replicated when 3
    equalize: bool = False              # histogram equalisation of the 8-bit grey original (hip X-ray, published)
    normalize: str = "none"             # none | imagenet (mean/std after replication to 3 channels)
    values: str = "uint8"               # uint8: images / 255; zscore: float slabs (MRI), augmented on a unit copy
    decoder: str = "pil"                # pil | cv2 (the torch path's decoder; DALI decodes with DALI)
    preresize: bool = False             # decode once, area-downscale to ~the input scale, keep that (large images)

    def __post_init__(self):
        if len(self.input_hw) != 2 or min(self.input_hw) < 2:
            raise ValueError(f"Preprocess: input_hw must be (H, W) with both >= 2, got {self.input_hw}")
        for name, value, allowed in (("resize", self.resize, RESIZE_MODES), ("normalize", self.normalize,
                                     NORMALIZE_MODES), ("values", self.values, VALUE_MODES),
                                     ("channels", self.channels, (1, 3))):
            if value not in allowed:
                raise ValueError(f"Preprocess: {name} must be one of {allowed}, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["input_hw"] = [int(n) for n in self.input_hw]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Preprocess":
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        kw["input_hw"] = tuple(int(n) for n in kw["input_hw"])
        return cls(**kw)


def check_record_points(records: Sequence[Record], k: int, where: str) -> None:
    """Every record carries K points and K visibility flags (a reader bug otherwise, named by `where`)."""
    for r in records:
        if r.kpts_px_K2.shape != (k, 2) or r.kpts_visible_K.shape != (k,):
            raise ValueError(f"{where}: record {r.id} has points {r.kpts_px_K2.shape} / visibility "
                             f"{r.kpts_visible_K.shape}, expected ({k}, 2) / ({k},)")

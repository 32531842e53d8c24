"""What a reader is: a parser of one annotation layout into Records + DataInfo (data_pipelines/records.py), plus the
few facts the shared pipeline needs from it. Readers are plain `Reader` values in data_pipelines.readers.READERS.

Options every landmark reader of user data takes (GENERIC_OPTIONS, in `data.reader_args`):
  channels   auto | 1 | 3: network input channels; auto = 1 when every image is grey, else 3 (from the headers);
  flip_pairs None = pairs found from the landmark names (left_eye / right_eye, l_knee / r_knee, ...), or a list of
             [a, b] pairs of names or 0-based indices, [] for none: a horizontal flip swaps them;
  resize     letterbox (aspect kept, padded: landmarks keep their geometry) | stretch;
  equalize   histogram equalisation of grey originals before everything else;
  normalize  none | imagenet.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from data_pipelines.errors import DataError, OptionError
from data_pipelines.images import header_channels, open_image
from data_pipelines.records import NORMALIZE_MODES, RESIZE_MODES, DataInfo, Preprocess, Record

PAD_VALUE = 128.0 / 255.0           # letterbox padding of the ultrasound / generic readers (the published input)
GENERIC_OPTIONS: dict[str, Any] = {"channels": "auto", "flip_pairs": None, "resize": "letterbox", "equalize": False,
                                   "normalize": "none"}


@dataclass
class ReadResult:
    records: list[Record]
    info: DataInfo
    skipped: list[tuple[str, str]]
    where: Path | str                   # the folder / annotation file named when nothing is usable
    split_source: str = "split fields"  # what assigned Record.split, for messages


def _never(opts, data_cfg):
    return None


@dataclass(frozen=True)
class Reader:
    """One annotation layout. Functions take (root: Path, opts: checked reader_args, data_cfg) as named."""
    name: str
    layout: str                                         # the expected files in one line (errors, --help)
    defaults: dict[str, Any]
    check_options: Callable[[dict, Any], dict]          # (opts, data_cfg) -> opts with values checked
    has_data: Callable[[Path, dict], bool]              # whether root holds this format's data
    describe: Callable[[Path, dict, Any], DataInfo]     # cheap: headers only, no pixel decode
    read: Callable[[Path, dict, Any, bool], ReadResult]  # parse + validate every sample (skip_bad)
    preprocess: Callable[[dict, Any, DataInfo], Preprocess]
    predict_record: Callable[[Path, dict, Any], Record | None]   # one input file of this format (truth) or None
    annotation_suffixes: tuple[str, ...] = ()           # predict inputs with these suffixes are annotations
    heatmaps: Callable[[dict], bool] = lambda opts: True
    oversample: Callable[[dict, Any], dict | None] = _never
    augment_overrides: dict[str, Any] = field(default_factory=dict)
    dali: bool = True
    missing: Callable[[Path, dict], str] | None = None  # what to say when root holds no data (default: the layout)

    def missing_message(self, root: Path, opts: dict) -> str:
        return self.missing(root, opts) if self.missing is not None else f"no {self.name} data here ({self.layout})"


# -------------------------------------------------------------------------------------------------- option checks
def check_generic_options(opts: dict[str, Any]) -> dict[str, Any]:
    """The GENERIC_OPTIONS values (module docstring); OptionError naming the option."""
    if opts["channels"] not in ("auto", 1, 3):
        raise OptionError(f"data.reader_args.channels: must be auto, 1 or 3, got {opts['channels']!r}")
    if opts["resize"] not in RESIZE_MODES:
        raise OptionError(f"data.reader_args.resize: '{opts['resize']}' is not one of {', '.join(RESIZE_MODES)}")
    if opts["normalize"] not in NORMALIZE_MODES:
        raise OptionError(f"data.reader_args.normalize: '{opts['normalize']}' is not one of "
                          f"{', '.join(NORMALIZE_MODES)}")
    if not isinstance(opts["equalize"], bool):
        raise OptionError(f"data.reader_args.equalize: must be true or false, got {opts['equalize']!r}")
    if opts["flip_pairs"] is not None and not isinstance(opts["flip_pairs"], (list, tuple)):
        raise OptionError(f"data.reader_args.flip_pairs: a list of [a, b] pairs (names or 0-based indices), or null "
                          f"for pairs found from the names; got {opts['flip_pairs']!r}")
    return opts


def generic_preprocess(opts: dict, data_cfg, info: DataInfo, pad_value: float = PAD_VALUE) -> Preprocess:
    return Preprocess(tuple(int(n) for n in data_cfg.input_hw), resize=opts["resize"], pad_value=pad_value,
                      color="auto", channels=info.channels, equalize=opts["equalize"], normalize=opts["normalize"],
                      preresize=bool(getattr(data_cfg, "preresize", False)))


def channels_of(opts: dict, image_sources: Sequence[str | bytes]) -> int:
    """reader_args.channels, or for "auto": 1 when every image's header says grey (L, 16-bit, ...), else 3."""
    if opts["channels"] != "auto":
        return int(opts["channels"])
    for src in image_sources:
        with open_image(src) as img:
            if header_channels(img.mode) != 1:
                return 3
    return 1


# ---------------------------------------------------------------------------------------------------- flip pairs
_SIDE_PREFIX = re.compile(r"^(left|right|l|r)([_\-. ])(.+)$", re.IGNORECASE)
_SIDE_SUFFIX = re.compile(r"^(.+?)([_\-. ])(left|right|l|r)$", re.IGNORECASE)
_OTHER_SIDE = {"left": "right", "right": "left", "l": "r", "r": "l"}


def _mirror_name(name: str) -> str | None:
    """left_eye -> right_eye, femur_l -> femur_r, Left-Knee -> Right-Knee; None for a name without a side."""
    for pattern, group in ((_SIDE_PREFIX, 1), (_SIDE_SUFFIX, 3)):
        found = pattern.match(name)
        if found:
            side = found.group(group)
            other = _OTHER_SIDE[side.lower()]
            other = other.upper() if side.isupper() else other.capitalize() if side[0].isupper() else other
            return name[:found.start(group)] + other + name[found.end(group):]
    return None


def flip_pairs_from_names(names: Sequence[str]) -> tuple[tuple[int, int], ...]:
    """Index pairs swapped by a horizontal flip: names differing only in their side word (left_*/right_*, l_*/r_*,
    *_left/*_right, *_l/*_r; separators _ - . or space). A side name without its partner stays unpaired."""
    index = {n: i for i, n in enumerate(names)}
    pairs = []
    for i, name in enumerate(names):
        j = index.get(_mirror_name(name) or "")
        if j is not None and i < j:
            pairs.append((i, j))
    return tuple(pairs)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def resolve_flip_pairs(spec: Sequence[Sequence[int | str]] | None, names: Sequence[str]) -> tuple[tuple[int, int], ...]:
    """reader_args.flip_pairs (pairs of 0-based indices or keypoint names) or, when None, pairs from the names."""
    if spec is None:
        return flip_pairs_from_names(names)
    index = {n: i for i, n in enumerate(names)}
    pairs, used = [], set()
    for pair in spec:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise OptionError(f"data.reader_args.flip_pairs: {pair!r} is not a pair")
        ab = [index.get(v) if isinstance(v, str) else v if _is_int(v) and 0 <= v < len(names) else None for v in pair]
        if None in ab or ab[0] == ab[1] or used & set(ab):
            raise OptionError(f"data.reader_args.flip_pairs: {list(pair)!r} must name two different keypoints "
                              f"(0-based index or name of {list(names)}) not used in another pair")
        used.update(ab)
        pairs.append((ab[0], ab[1]))
    return tuple(pairs)


def spacing_pair(value: Any, what: str) -> Any:
    """A spacing given as one number or [sx, sy] (mm per pixel, > 0) -> float pair, else OptionError."""
    vals = [value, value] if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    if not (isinstance(vals, (list, tuple)) and len(vals) == 2 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in vals)):
        raise OptionError(f"{what}: spacing must be a number or [sx, sy] in mm per pixel, both > 0; got {value!r}")
    return (float(vals[0]), float(vals[1]))


def dataset_spacing(image_path: Path, cache: dict[Path, Any] | None = None) -> list[float] | None:
    """'spacing_mm' of the nearest dataset.json in the image's folder or up to three folders above it (the
    generators write one; so can users: {"spacing_mm": [sx, sy]}), None when there is none."""
    cache = {} if cache is None else cache
    for folder in list(Path(image_path).parents)[:4]:
        if folder not in cache:
            path = folder / "dataset.json"
            try:
                meta = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
            except (OSError, json.JSONDecodeError) as exc:
                raise DataError(path, f"unreadable dataset.json ({exc})") from None
            cache[folder] = meta if isinstance(meta, dict) else None
        if cache[folder] is not None and cache[folder].get("spacing_mm") is not None:
            return cache[folder]["spacing_mm"]
    return None

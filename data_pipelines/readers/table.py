"""Landmark tables (data.format = table): one row per image, CSV or TSV - the layout most landmark datasets ship in.

    image,sella_x,sella_y,nasion_x,nasion_y,...,spacing_mm,patient_id,split
    images/001.png,812.4,640.0,1433.9,598.2,...,0.1,p001,train

Columns (header row required; names are case-sensitive, surrounding spaces ignored):
  image                 the image file, relative to the table's folder (or reader_args.images);
  <name>_x, <name>_y    one pair per landmark, in header order (landmark names = the <name> parts), or
  x1, y1, ..., xK, yK   numbered pairs (landmark names L1..LK, or reader_args.names);
  spacing_mm            optional, mm per pixel (isotropic), or spacing_x_mm + spacing_y_mm;
  patient_id            optional: rows of one patient never straddle two splits (default: the image's stem);
  split                 optional train / val / test for every row: the splits are then used as given.
Other columns are ignored (and listed once in the log). A landmark with both cells empty is not labelled (visible
False); one empty cell of a pair is an error. Coordinates are pixels with pixel centres at integers (MedPose's
convention, data_pipelines/batch.py); reader_args.pixel_offset = 0.5 reads tables whose tools put the image's top-left
corner at (0, 0) (x_medpose = x - 0.5). Every problem names the table, the row and the column.

reader_args: table (file name; default: the one .csv / .tsv / .txt in data.root), images (folder the image paths are
relative to; default the table's folder), delimiter (auto: tab for .tsv, else sniffed from the header), names,
pixel_offset, spacing_mm (one value or [sx, sy] for rows without a spacing column), and the generic options of
data_pipelines/readers/base.py (channels, flip_pairs, resize, equalize, normalize).
"""
from __future__ import annotations

import csv
import logging
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from data_pipelines.errors import DataError, OptionError
from data_pipelines.images import verify_image
from data_pipelines.readers.base import (GENERIC_OPTIONS, Reader, ReadResult, channels_of, check_generic_options,
                                         generic_preprocess, resolve_flip_pairs, spacing_pair)
from data_pipelines.records import SPLIT_NAMES, DataInfo, ImageSource, Preprocess, Record
from data_pipelines.transforms import points_in_frame

log = logging.getLogger("medpose")

DEFAULTS: dict[str, Any] = {"table": "auto", "images": "", "delimiter": "auto", "names": None, "pixel_offset": 0.0,
                            "spacing_mm": None, "image_column": "image", **GENERIC_OPTIONS}
LAYOUT = "a table (CSV/TSV) with an image column and <name>_x/<name>_y (or x1,y1,..) columns, images beside it"
TABLE_SUFFIXES = (".csv", ".tsv", ".txt")
_NUMBERED = re.compile(r"^([xy])(\d+)$")
_SPECIAL = ("spacing_mm", "spacing_x_mm", "spacing_y_mm", "patient_id", "split")


def check_options(opts: dict[str, Any], data_cfg=None) -> dict[str, Any]:
    if not isinstance(opts["table"], str) or not opts["table"]:
        raise OptionError(f"data.reader_args.table: a file name (or auto), got {opts['table']!r}")
    if opts["delimiter"] not in ("auto", ",", ";", "\t", "|", " "):
        raise OptionError(f"data.reader_args.delimiter: auto or one of , ; tab | space; got {opts['delimiter']!r}")
    if opts["names"] is not None and not (isinstance(opts["names"], list) and all(isinstance(n, str) and n
                                                                                 for n in opts["names"])):
        raise OptionError(f"data.reader_args.names: a list of landmark names, got {opts['names']!r}")
    if not isinstance(opts["pixel_offset"], (int, float)) or isinstance(opts["pixel_offset"], bool):
        raise OptionError(f"data.reader_args.pixel_offset: a number, got {opts['pixel_offset']!r}")
    if opts["spacing_mm"] is not None:
        opts = {**opts, "spacing_mm": spacing_pair(opts["spacing_mm"], "data.reader_args.spacing_mm")}
    return check_generic_options(opts)


def find_table(root: Path, opts: dict) -> Path | None:
    """reader_args.table under root, or the one table file there (None when there is none)."""
    if opts["table"] != "auto":
        return root / opts["table"]
    if not root.is_dir():
        return None
    found = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in TABLE_SUFFIXES)
    if len(found) > 1:
        raise DataError(root, f"{len(found)} tables here ({', '.join(p.name for p in found)}); choose one with "
                              f"data.reader_args.table")
    return found[0] if found else None


def has_data(root: Path, opts: dict) -> bool:
    path = find_table(root, opts)
    return path is not None and path.is_file()


# ------------------------------------------------------------------------------------------------------- header
def _delimiter(path: Path, first_line: str, opts: dict) -> str:
    if opts["delimiter"] != "auto":
        return opts["delimiter"]
    if path.suffix.lower() == ".tsv":
        return "\t"
    counts = {d: first_line.count(d) for d in (",", "\t", ";", "|")}
    best = max(counts, key=counts.get)
    return best if counts[best] > 0 else ","


def _read_rows(path: Path, opts: dict) -> tuple[list[str], list[tuple[int, list[str]]]]:
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as exc:
        raise DataError(path, f"cannot read the table ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise DataError(path, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise DataError(path, "empty table: the first line must be a header (image, <name>_x, <name>_y, ...)")
    reader = csv.reader(lines, delimiter=_delimiter(path, lines[0], opts))
    rows = [(n + 1, [c.strip() for c in row]) for n, row in enumerate(reader)]
    header = rows[0][1]
    return header, [(n, row) for n, row in rows[1:] if any(c for c in row)]


def landmark_columns(header: list[str], path: Path, opts: dict) -> tuple[list[str], list[tuple[int, int]]]:
    """(names, [(x column, y column)]) from the header: <name>_x/<name>_y pairs or x1/y1 .. xK/yK."""
    col = {h: i for i, h in enumerate(header)}
    if len(col) != len(header):
        dup = next(h for h in header if header.count(h) > 1)
        raise DataError(path, f"header: column '{dup}' appears twice")
    numbered = {(m[1], int(m[2])): i for h, i in col.items() if (m := _NUMBERED.match(h.lower()))}
    named = [h[:-2] for h in header if h.lower().endswith("_x") and h[:-2] not in _SPECIAL]
    if numbered and named:
        raise DataError(path, "header mixes numbered (x1, y1, ...) and named (<name>_x, <name>_y) landmark columns")
    if numbered:
        ks = sorted({k for _, k in numbered})
        if ks != list(range(1, len(ks) + 1)) or any(("x", k) not in numbered or ("y", k) not in numbered for k in ks):
            raise DataError(path, f"header: numbered columns must be x1, y1, ..., xK, yK with no gap (found "
                                  f"{', '.join(sorted(h for h in header if _NUMBERED.match(h.lower())))})")
        pairs, names = [(numbered[("x", k)], numbered[("y", k)]) for k in ks], [f"L{k}" for k in ks]
    else:
        missing = [n for n in named if f"{n}_y" not in col and f"{n}_Y" not in col]
        if missing:
            raise DataError(path, f"header: '{missing[0]}_x' has no '{missing[0]}_y' column")
        pairs = [(col[f"{n}_x"] if f"{n}_x" in col else col[f"{n}_X"], col[f"{n}_y"] if f"{n}_y" in col
                  else col[f"{n}_Y"]) for n in named]
        names = named
    if not pairs:
        raise DataError(path, f"header: no landmark columns (expected <name>_x, <name>_y or x1, y1, ...; the header "
                              f"is {', '.join(header)})")
    if opts["names"] is not None:
        if len(opts["names"]) != len(pairs):
            raise OptionError(f"data.reader_args.names: {len(opts['names'])} names for {len(pairs)} landmark column "
                              f"pairs in {path}")
        names = list(opts["names"])
    return names, pairs


def _check_header(header: list[str], path: Path, opts: dict) -> None:
    if opts["image_column"] not in header:
        raise DataError(path, f"header: no '{opts['image_column']}' column (the image file of each row; header: "
                              f"{', '.join(header)})")
    if ("spacing_x_mm" in header) != ("spacing_y_mm" in header):
        raise DataError(path, "header: spacing_x_mm and spacing_y_mm go together")


# --------------------------------------------------------------------------------------------------------- rows
def _number(text: str, path: Path, line: int, column: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise DataError(path, f"row {line}, column '{column}': {text!r} is not a number") from None
    if not math.isfinite(v):
        raise DataError(path, f"row {line}, column '{column}': {text!r} is not finite")
    return v


def _row_points(row: list[str], pairs, header, path: Path, line: int, offset: float):
    k = len(pairs)
    pts, vis = np.zeros((k, 2), np.float32), np.zeros(k, bool)
    for j, (cx, cy) in enumerate(pairs):
        tx, ty = (row[cx] if cx < len(row) else ""), (row[cy] if cy < len(row) else "")
        if not tx and not ty:
            continue
        if not tx or not ty:
            raise DataError(path, f"row {line}: landmark '{header[cx][:-2] if header[cx].endswith('_x') else j + 1}' "
                                  f"has only one of its two coordinates")
        pts[j] = (_number(tx, path, line, header[cx]) - offset, _number(ty, path, line, header[cy]) - offset)
        vis[j] = True
    return pts, vis


def _row_spacing(row: list[str], col: dict, path: Path, line: int, default) -> np.ndarray | None:
    def cell(name):
        return row[col[name]] if name in col and col[name] < len(row) else ""
    if cell("spacing_mm"):
        s = _number(cell("spacing_mm"), path, line, "spacing_mm")
        pair = (s, s)
    elif cell("spacing_x_mm") or cell("spacing_y_mm"):
        pair = (_number(cell("spacing_x_mm"), path, line, "spacing_x_mm"),
                _number(cell("spacing_y_mm"), path, line, "spacing_y_mm"))
    else:
        return None if default is None else np.asarray(default, dtype=np.float64)
    if min(pair) <= 0:
        raise DataError(path, f"row {line}: spacing must be > 0 mm per pixel, got {pair}")
    return np.asarray(pair, dtype=np.float64)


def _image_id(rel: str) -> str:
    return str(Path(rel.replace("\\", "/")).with_suffix(""))


def _parse_row(line: int, row: list[str], ctx: dict) -> Record:
    path, col, header = ctx["path"], ctx["col"], ctx["header"]
    rel = row[col[ctx["image_column"]]] if col[ctx["image_column"]] < len(row) else ""
    if not rel:
        raise DataError(path, f"row {line}: the '{ctx['image_column']}' cell is empty")
    image = ctx["images"] / rel.replace("\\", "/")
    hw, _, _ = verify_image(str(image), f"{path} row {line}")
    pts, vis = _row_points(row, ctx["pairs"], header, path, line, ctx["offset"])
    outside = vis & ~points_in_frame(pts, hw)
    if outside.any():
        j = int(np.argmax(outside))
        raise DataError(path, f"row {line}: landmark '{ctx['names'][j]}' at ({pts[j, 0]:g}, {pts[j, 1]:g}) lies "
                              f"outside the {hw[1]}x{hw[0]} image {rel}")
    split = row[col["split"]].lower() if "split" in col and col["split"] < len(row) and row[col["split"]] else None
    if split is not None and split not in SPLIT_NAMES:
        raise DataError(path, f"row {line}, column 'split': {split!r} is not one of {', '.join(SPLIT_NAMES)}")
    rid = _image_id(rel)
    patient = row[col["patient_id"]] if "patient_id" in col and col["patient_id"] < len(row) else ""
    return Record(id=rid, where=str(path), entry=f"row {line}", image=ImageSource(path=str(image), name=str(image)),
                  hw=hw, kpts_px_K2=pts, kpts_visible_K=vis, spacing_mm=_row_spacing(row, col, path, line,
                                                                                    ctx["spacing"]),
                  patient_id=patient or Path(rid).name, split=split, meta={"table": str(path)})


def _context(root: Path, opts: dict, data_cfg) -> tuple[dict, list]:
    path = find_table(root, opts)
    if path is None or not path.is_file():
        raise DataError(path or root, "table not found" + ("" if path else f" (no {'/'.join(TABLE_SUFFIXES)} file)"))
    header, rows = _read_rows(path, opts)
    _check_header(header, path, opts)
    names, pairs = landmark_columns(header, path, opts)
    used = {opts["image_column"], *_SPECIAL} | {header[c] for p in pairs for c in p}
    ignored = [h for h in header if h not in used]
    if ignored:
        log.info("%s: columns ignored: %s", path, ", ".join(ignored))
    spacing = opts["spacing_mm"] if opts["spacing_mm"] is not None else getattr(data_cfg, "spacing_mm", None)
    ctx = {"path": path, "header": header, "col": {h: i for i, h in enumerate(header)}, "names": names,
           "pairs": pairs, "images": path.parent / opts["images"], "offset": float(opts["pixel_offset"]),
           "image_column": opts["image_column"], "spacing": spacing}
    return ctx, rows


def read(root: Path, opts: dict, data_cfg, skip_bad: bool) -> ReadResult:
    ctx, rows = _context(root, opts, data_cfg)
    records, skipped = [], []
    for line, row in rows:
        try:
            records.append(_parse_row(line, row, ctx))
        except DataError as exc:
            if not skip_bad:
                raise
            skipped.append((exc.path, exc.problem))
    if skipped:
        log.warning("%s: skipped %d bad row(s):\n%s", ctx["path"], len(skipped),
                    "\n".join(f"  {p}: {problem}" for p, problem in skipped))
    return ReadResult(records, _info(ctx, opts, records), skipped, ctx["path"], f"'split' column of {ctx['path'].name}")


def _info(ctx: dict, opts: dict, records) -> DataInfo:
    return DataInfo(tuple(ctx["names"]), None, resolve_flip_pairs(opts["flip_pairs"], ctx["names"]),
                    channels_of(opts, [r.image.path for r in records]), "per_image")


def describe(root: Path, opts: dict, data_cfg) -> DataInfo:
    """Names from the header; channels from the image headers (rows that do not parse are left to read())."""
    ctx, rows = _context(root, opts, data_cfg)
    col = ctx["col"][ctx["image_column"]]
    files = [ctx["images"] / row[col].replace("\\", "/") for _, row in rows if col < len(row) and row[col]]
    files = [str(f) for f in files if f.is_file()]
    return DataInfo(tuple(ctx["names"]), None, resolve_flip_pairs(opts["flip_pairs"], ctx["names"]),
                    channels_of(opts, files), "per_image")


def preprocess(opts: dict, data_cfg, info: DataInfo) -> Preprocess:
    return generic_preprocess(opts, data_cfg, info)


def predict_record(path: Path, opts: dict, data_cfg) -> Record | None:
    """The image's row in the run's table (truth, spacing) when it is listed there, else None."""
    root = Path(data_cfg.root)
    if not has_data(root, opts):
        return None
    try:
        ctx, rows = _context(root, opts, data_cfg)
    except DataError as exc:
        log.warning("no ground truth for %s: %s", path, exc)
        return None
    want = Path(path).resolve()
    col = ctx["col"][ctx["image_column"]]
    for line, row in rows:
        if col < len(row) and row[col] and (ctx["images"] / row[col].replace("\\", "/")).resolve() == want:
            try:
                return _parse_row(line, row, ctx)
            except DataError as exc:
                log.warning("no ground truth for %s: %s", path, exc)
                return None
    return None


READER = Reader(name="table", layout=LAYOUT, defaults=DEFAULTS, check_options=check_options, has_data=has_data,
                describe=describe, read=read, preprocess=preprocess, predict_record=predict_record)

"""The DALI loader: decode, intensity augmentation, one affine warp per sample and normalisation in one DALI
pipeline, on the GPU when there is one (device_id = local rank), on DALI's CPU operators otherwise. Yields the same
`Batch` as the torch path (data_pipelines/batch.py), image and mask already on the device.

What runs where, per sample:
  host (the pipeline's external source, one Python thread): the dataset's `DaliSource.item(i, epoch)` - the file's
      bytes (not decoded), the cached mask and landmarks, and the (seed, epoch, index) draws of the torch path
      (transforms.AffineDraw, transforms.IntensityDraw), so both loaders augment a sample alike;
  DALI: fn.decoders.image (device="mixed": nvJPEG / nvImageCodec on the GPU for JPEG, CPU decode then upload
      otherwise; "cpu" without a GPU) -> float [0, 1] -> brightness/contrast, gamma, speckle (DALI's own normal
      noise), Gaussian blur -> the matrix from fn.transforms.* (dali_affine._chain: augment o letterbox) ->
      fn.warp_affine (linear, letterbox pad value) for the image, (nearest) for the mask, fn.coord_transform for the
      landmarks -> CHW;
  host again: `DaliSource.finish` - visibility, flip-pair swaps, spacing, meta; the small tensors are collated.

Sharding and epochs are the sampler's (ShardedSampler over global ranks): training drops the incomplete tail on every
rank, evaluation (drop_last=False) sees each sample once in a smaller last batch (the external source takes any batch
up to the pipeline's size, so nothing is padded and nothing needs dropping before metrics).

Bad input: a failure in the host step names the file (naming_file). A failure inside DALI (an undecodable image) is
caught, each in-flight sample is checked on the host (`DaliSource.check`) to find the file, and a DataError naming it
is raised - or, with skip_bad, the file is dropped (counted in `skipped`, logged) and the batch's other samples are
fed again; never a hang. A generator left mid-epoch (max_steps, an exception) rebuilds the pipeline on the next epoch.

Differences from the torch path, by design: the speckle noise field (DALI's generator; its sigma is the same draw),
and the blur's border (DALI reflects, scipy repeats the edge pixel; same kernel radius). Geometric parity is tested
(tests/test_dali_pipeline.py).
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import warnings
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np
import torch

from data_pipelines.batch import Batch
from data_pipelines.dali.affine import HAVE_DALI, _chain, _require_dali, draw_vector, fn, pipeline_def, types
from data_pipelines.errors import DataError
from data_pipelines.sampler import ShardedSampler
from data_pipelines.transforms import IDENTITY_INTENSITY, AffineDraw, IntensityDraw

log = logging.getLogger(__name__)

IDENTITY_DRAW = AffineDraw(False, 0.0, 1.0, 0.0, 0.0, 0.0)
_END = object()             # end of an epoch, from the producer thread
_MIN_BLUR_SIGMA = 0.01      # blur "off": a 3-tap kernel whose side taps are exp(-5000) = 0 in float32 (exact copy)


@dataclass
class DaliItem:
    """One sample as the host hands it to the pipeline."""
    index: int
    name: str                           # the file to name in errors
    data: np.ndarray                    # uint8: the encoded file (decode="dali") or decoded pixels HWC ("host")
    mask_HW: np.ndarray | None          # uint8 class ids in the original frame (None: the dataset has no masks)
    kpts_px_K2: np.ndarray              # float32, original-frame pixels
    pre: np.ndarray                     # 3x3 original -> input frame before augmentation (letterbox / resize)
    draw: AffineDraw | None             # geometric augmentation (None: none)
    intensity: IntensityDraw | None     # intensity augmentation (None: none)
    ctx: Any = None                     # whatever the source's finish() needs


class DaliSource(Protocol):
    """What a dataset provides to run on the DALI loader (data_pipelines/dali/hip.py is the hip reader's)."""
    input_hw: tuple[int, int]
    pad_value: float          # letterbox fill, in [0, 1]
    channels: int             # 3: decode RGB, 1: decode grey
    decode: str               # "dali": DALI decodes `data`; "host": `data` is already HWC uint8 pixels
    has_mask: bool
    intensity: bool           # whether items carry intensity draws (the graph then applies them)
    skip_bad: bool
    skipped: list

    def item(self, i: int, epoch: int) -> DaliItem: ...
    def check(self, i: int) -> str | None: ...          # host decode of sample i: the problem, or None if it decodes
    def finish(self, items: Sequence[DaliItem], kpts_BK2: np.ndarray, image_BCHW: torch.Tensor,
               mask_BHW: torch.Tensor | None) -> Batch: ...


def _graph(source: Callable, out_hw, pad_value: float, channels: int, decode: str, has_mask: bool,
           intensity: bool, gpu: bool):
    cols = fn.external_source(source=source, num_outputs=6, batch=True)
    data, mask, points, pre, draw, inten = cols
    out_type = types.RGB if channels == 3 else types.GRAY
    if decode == "dali":
        image = fn.decoders.image(data, device="mixed" if gpu else "cpu", output_type=out_type)
    else:
        image = fn.reshape(data, layout="HWC")
        image = image.gpu() if gpu else image
    x = fn.cast(image, dtype=types.FLOAT) * (1.0 / 255.0)
    if intensity:
        import nvidia.dali.math as dmath
        param = (lambda k: inten[k].gpu()) if gpu else (lambda k: inten[k])
        x = dmath.clamp(param(1) * (x - 0.5) + 0.5 + param(0), 0.0, 1.0)        # brightness / contrast
        x = dmath.pow(x, param(2))                                              # gamma
        noise = fn.random.normal(x)
        x = dmath.clamp(x * (1.0 + param(3) * noise), 0.0, 1.0)                # multiplicative speckle
        window = fn.cast(inten[5], dtype=types.INT32)                           # scipy's radius int(3 s + 0.5)
        x = fn.gaussian_blur(x, sigma=inten[4], window_size=window)
    m_img, m_pts = _chain(draw, pre, half_pixel=True), _chain(draw, pre, half_pixel=False)
    size = [int(out_hw[0]), int(out_hw[1])]
    x = fn.warp_affine(x, matrix=m_img, size=size, inverse_map=False, fill_value=float(pad_value),
                       interp_type=types.INTERP_LINEAR)
    outs = [fn.transpose(x, perm=[2, 0, 1]), fn.coord_transform(points, MT=m_pts)]
    if has_mask:
        mask = fn.reshape(mask, layout="HWC")
        mask = mask.gpu() if gpu else mask
        outs.append(fn.warp_affine(mask, matrix=m_img, size=size, inverse_map=False, fill_value=0,
                                   interp_type=types.INTERP_NN))
    return tuple(outs)


def _columns(items: Sequence[DaliItem], frame_hw: tuple[int, int]) -> tuple[list, ...]:
    data, mask, points, pre, draw, inten = [], [], [], [], [], []
    for it in items:
        data.append(np.ascontiguousarray(it.data))
        mask.append(np.zeros((1, 1, 1), np.uint8) if it.mask_HW is None
                    else np.ascontiguousarray(np.asarray(it.mask_HW, dtype=np.uint8)[..., None]))
        points.append(np.ascontiguousarray(it.kpts_px_K2, dtype=np.float32).reshape(-1, 2))
        pre.append(np.ascontiguousarray(np.asarray(it.pre, dtype=np.float32)[:2]))
        draw.append(draw_vector(it.draw or IDENTITY_DRAW, frame_hw))
        d = it.intensity or IDENTITY_INTENSITY
        blur = float(d.blur_sigma)
        sigma = blur if blur > 0 else _MIN_BLUR_SIGMA
        window = 2 * int(3.0 * sigma + 0.5) + 1 if blur > 0 else 3
        inten.append(np.array([d.brightness, d.contrast, d.gamma, d.speckle, sigma, window], np.float32))
    return data, mask, points, pre, draw, inten


def _dali_to_torch(out, device: torch.device) -> torch.Tensor:
    """A dense DALI TensorList (CPU or GPU) as a torch tensor on `device`."""
    dense = out.as_tensor()
    if device.type == "cuda":
        from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type
        t = torch.empty(dense.shape(), dtype=to_torch_type[dense.dtype], device=device)
        feed_ndarray(dense, t, cuda_stream=torch.cuda.current_stream(device))
        return t
    return torch.from_numpy(np.array(dense))


def default_threads() -> int:
    """DALI's CPU threads for one rank: the cores this process may use (sched affinity), at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


class DaliBatches:
    """Iterable of Batch over one rank's shard, made by a DALI pipeline (see the module docstring).

    device_id: the CUDA device (the local rank) or None for a CPU-only pipeline. num_threads: DALI's CPU threads
    (default: default_threads()). prefetch: batches the pipeline works ahead. background: run the pipeline and the
    host steps (the external source, finish, the copy of the small tensors from pinned memory) in a producer thread
    that keeps `prefetch` finished batches ready, so that they overlap the training step instead of following it
    (the DataLoader's workers give the torch path the same overlap).
    """

    def __init__(self, source: DaliSource, batch_size: int, sampler: ShardedSampler, device_id: int | None = None,
                 num_threads: int | None = None, prefetch: int = 2, background: bool = True):
        _require_dali()
        if device_id is not None and not torch.cuda.is_available():
            raise RuntimeError(f"DALI loader: device_id={device_id} but CUDA is not available; use device_id=None")
        self.source, self.batch_size, self.sampler = source, int(batch_size), sampler
        self.device_id, self.prefetch, self.background = device_id, int(prefetch), bool(background)
        self.num_threads = int(num_threads) if num_threads else default_threads()
        self.device = torch.device("cuda", device_id) if device_id is not None else torch.device("cpu")
        self.epoch = 0
        self.pipe = None
        self._clean = False               # a pipeline at an epoch boundary (reset after StopIteration)
        self._pending: deque[int] = deque()
        self._inflight: deque[list[DaliItem]] = deque()
        self._error: BaseException | None = None
        self._stop = False

    # -- pipeline -----------------------------------------------------------------------------------------------
    def _build(self) -> None:
        src = self.source
        graph = pipeline_def(_graph, batch_size=self.batch_size, num_threads=self.num_threads,
                             device_id=self.device_id, seed=int(self.sampler.seed) * 1000 + int(self.sampler.rank),
                             prefetch_queue_depth=self.prefetch)
        self.pipe = graph(self._feed, src.input_hw, src.pad_value, src.channels, src.decode, src.has_mask,
                          src.intensity, self.device_id is not None)
        with warnings.catch_warnings():     # the mask / intensity columns go unused by some sources: by design
            warnings.filterwarnings("ignore", message="The external source node")
            self.pipe.build()
        self._clean = True

    def _feed(self):
        """The external source: the next batch of this rank's shard, as DALI's input columns."""
        if self._stop or not self._pending:
            raise StopIteration
        chunk = [self._pending.popleft() for _ in range(min(self.batch_size, len(self._pending)))]
        if len(chunk) < self.batch_size and self.sampler.drop_last:
            raise StopIteration
        try:
            items = [self.source.item(i, self.epoch) for i in chunk]
        except Exception as exc:            # surfaced after the batches already queued (StopIteration ends the epoch)
            self._error, self._stop = exc, True
            raise StopIteration
        self._inflight.append(items)
        return _columns(items, self.source.input_hw)

    # -- iteration ----------------------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return self.sampler.batches_per_epoch()

    def __iter__(self) -> Iterator[Batch]:
        return self._iter_background() if self.background else self._iter_foreground()

    def _iter_background(self) -> Iterator[Batch]:
        """The epoch's batches made by a producer thread, at most `prefetch` ahead. Leaving the loop early (max_steps,
        an exception) stops the producer; the next epoch then rebuilds the pipeline."""
        ready: queue.Queue = queue.Queue(maxsize=max(1, self.prefetch))
        stop = threading.Event()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.05)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            try:
                for batch in self._iter_foreground():
                    if not put(batch):
                        return
                put(_END)
            except BaseException as exc:     # handed to the consumer, raised there
                put(exc)

        worker = threading.Thread(target=produce, name="medpose-dali-producer", daemon=True)
        worker.start()
        try:
            while True:
                item = ready.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            worker.join(timeout=120)
            if worker.is_alive():   # pragma: no cover - a DALI run that never returns
                raise RuntimeError("DALI loader: the producer thread did not stop within 120 s")

    def _iter_foreground(self) -> Iterator[Batch]:
        if self.pipe is None or not self._clean:
            self._build()
        self._clean = False
        self._pending, self._inflight = deque(self.sampler), deque()
        self._error, self._stop = None, False
        while True:
            try:
                outs = self.pipe.run()
            except StopIteration:
                break
            except RuntimeError as exc:
                self._recover(exc)
                continue
            items = self._inflight.popleft()
            yield self._batch(items, outs)
        if self._error is not None:
            raise self._error
        self.pipe.reset()
        self._clean = True

    def _batch(self, items: list[DaliItem], outs) -> Batch:
        image = _dali_to_torch(outs[0], self.device)
        kpts = np.array(outs[1].as_tensor(), dtype=np.float64) if len(items) else np.zeros((0, 0, 2))
        mask = _dali_to_torch(outs[2], self.device)[..., 0].to(torch.int64) if self.source.has_mask else None
        batch = self.source.finish(items, kpts, image, mask)
        if self.device.type == "cuda":    # the small CPU tensors: pinned, copied asynchronously (no device sync)
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        return batch

    def _recover(self, exc: RuntimeError) -> None:
        """DALI failed on a batch in flight: find the file(s) on the host; raise, or skip them and re-feed."""
        inflight = [it for batch in self._inflight for it in batch]
        bad = []
        for it in inflight:
            problem = self.source.check(it.index)
            if problem is not None:
                bad.append((it, problem))
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if not bad:
            names = ", ".join(it.name for it in inflight) or "(no sample in flight)"
            raise DataError(inflight[0].name if inflight else "<DALI pipeline>",
                            f"the DALI pipeline failed on a batch holding {names} ({first_line}); each of them "
                            f"decodes on the host, so the cause is not one file") from exc
        if not self.source.skip_bad:
            it, problem = bad[0]
            raise DataError(it.name, f"{problem} (DALI: {first_line})") from exc
        bad_idx = {it.index for it, _ in bad}
        for it, problem in bad:
            self.source.skipped.append((it.name, problem))
            log.warning("DALI loader: skipped %s: %s", it.name, problem)
        keep = [it.index for it in inflight if it.index not in bad_idx]
        self._pending.extendleft(reversed(keep))
        self._inflight.clear()
        self._build()
        self._clean = False


DALI_FORMATS = frozenset({"PNG", "JPEG", "BMP"})     # what fn.decoders.image is trusted to decode like PIL


def image_header(source: str | bytes) -> tuple[str | None, str | None]:
    """(format, mode) from an image file's header (PIL reads no pixels); (None, None) when unreadable - the host
    decode then reports the file if DALI fails on it."""
    import io

    from PIL import Image
    try:
        with Image.open(source if isinstance(source, str) else io.BytesIO(source)) as img:
            return img.format, img.mode
    except (OSError, ValueError, SyntaxError):   # PIL on an unreadable header (UnidentifiedImageError is OSError)
        return None, None


def choose_decode(decode: str, owner: str, host_only: bool, sources, modes: frozenset[str]) -> str:
    """A source's decode mode: "dali" / "host" as asked; "auto" -> host when `host_only` (cached pixels, host-side
    preprocessing) or when any image of `sources` is not a DALI_FORMATS file in one of `modes`, else dali."""
    if decode not in ("auto", "dali", "host"):
        raise ValueError(f"{owner}: decode must be auto, dali or host, got '{decode}'")
    if decode != "auto":
        return decode
    if host_only:
        return "host"
    for source in sources:
        fmt, mode = image_header(source)
        if fmt not in DALI_FORMATS or mode not in modes:
            name = source if isinstance(source, str) else "an embedded image"
            log.info("DALI loader: %s is %s/%s; the host decodes this dataset's images", name, fmt, mode)
            return "host"
    return "dali"


def dali_available() -> bool:
    return HAVE_DALI

"""The run configuration: nested dataclasses are the schema.

A run file (YAML under launch/configs/) holds only what differs from these defaults; the command line overrides
with dotted keys (`optim.lr=3e-4`). Unknown keys and wrong types are errors that name the key and the file.
The resolved config is written to the run directory and stored in every checkpoint.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config problem; the message names the key and where it came from."""


@dataclass
class DataConfig:
    task: str = "hip_us"
    """Task (keys of engine.tasks.TASKS): landmarks (any landmarks, any data), hip_us, hip_xray, spine_disc,
    fetal_head, segmentation. Picks the metrics, figures and prediction outputs."""
    format: str = "auto"
    """Dataset format (keys of data_pipelines.READERS): coco, table (CSV/TSV), labelme, nifti, hc18, xray_csv;
    auto = the task's own. `medpose data inspect DIR` shows what a folder holds."""
    reader_args: dict[str, Any] = field(default_factory=dict)
    """Options of the chosen reader (e.g. xray_csv: resize, equalize; nifti: slab, first_label; coco: annotations).
    An unknown option is an error that lists the valid ones."""
    root: str = "runs/data/synth_hip"
    """Dataset folder (layout depends on data.format)."""
    synthetic: bool = True
    """Generate the task's synthetic data into `root` when the folder holds no data yet."""
    synth_n: int = 240
    """Number of phantom images to generate."""
    synth_seed: int = 0
    """Seed of the phantom generator (the dataset is a pure function of it)."""
    synth_type2_ratio: float = 0.35
    """Fraction of Graf type II hips in the phantom."""
    synth_image_hw: tuple[int, int] = (240, 320)
    """Phantom image size (H, W) in pixels."""
    input_hw: tuple[int, int] = (128, 160)
    """Network input (H, W); images are letterboxed into it. Both divisible by 32."""
    sigma_px: float = 2.0
    """Gaussian heatmap sigma in input pixels (published: 7 px at 384x512)."""
    heatmap_peak: float = 255.0
    """Heatmap peak value (published: 255)."""
    targets: Literal["auto", "loader", "device"] = "auto"
    """Where heatmap targets are rendered: loader (numba, in the DataLoader workers), device (by the loss, on the model's
    device: the Triton kernel of kernels/heatmap_render.py on a GPU, its torch reference elsewhere; same values), or
    auto = device when training on CUDA, else loader. Resolved and saved with the run's config."""
    spacing_mm: tuple[float, float] | None = None
    """mm per original pixel (x, y); None reads dataset.json beside the files."""
    test_frac: float = 0.2
    """Fraction of each class held out as the fixed test set."""
    split_seed: int | None = None
    """Seed of the test / fold split (patient-grouped, stratified); None = train.seed. Set it to compare training
    seeds (train.seed) on one test split: with None a new train.seed also draws a new test split."""
    num_folds: int = 5
    """Stratified, patient-grouped folds over the remaining data."""
    fold: int = 0
    """Which fold is validation."""
    oversample_type2: int = 2
    """Type II hips are repeated this many times in the training set (published: 2)."""
    size_balance: float = 0.0
    """Repeat training samples of rare object size (landmark spread, or mask polygon area; in mm where the spacing is
    known): 8 log-size bins over the training set, a sample repeated round(min(size_balance_max, (n_common / n_bin) **
    size_balance)) times. 0 = off, 1 = bins evened out up to the cap, 0.5 = square-root rule. The repeat counts
    are logged and recorded in splits.json (data_pipelines/size_balance.py)."""
    size_balance_max: int = 4
    """Most repeats of one sample under data.size_balance."""
    augment: bool = True
    """Keypoint-consistent geometric + intensity augmentation on the training set."""
    rotation_deg: float = 10.0
    """Max rotation of the random affine."""
    scale_range: tuple[float, float] = (0.9, 1.1)
    """Random scale range."""
    translate_frac: float = 0.05
    """Max translation as a fraction of the input size."""
    flip_p: float = 0.0
    """Horizontal flip probability (landmarks swapped by the task's flip table)."""
    num_workers: int = 2
    """DataLoader worker processes per rank (0 = load in the main process)."""
    cache_decoded: bool = True
    """Keep decoded images in memory (with preresize: the downscaled working copies, a few hundred kB each)."""
    preresize: bool = False
    """Decode each image once and keep an area-downscaled copy near the input scale (1.25x it): large images (1-4 Mpx)
    then cost a small warp per sample, and the downscale is anti-aliased. Evaluation is still scored in the original
    frame."""
    skip_bad: bool = False
    """Skip unreadable / malformed samples (counted and logged) instead of stopping with an error."""
    loader: Literal["auto", "torch", "dali"] = "auto"
    """Batch source: torch (DataLoader workers), dali (NVIDIA DALI decodes, augments and warps image, mask and
    landmarks, on the rank's GPU - device_id = local rank - or CPU-only without one; every reader but nifti;
    needs nvidia-dali-cuda130 and data.targets=device or auto), or auto = dali when training on CUDA with
    DALI installed and a reader that has a DALI path, else torch. Resolved and saved with the run's config."""
    dali_threads: int = 0
    """CPU threads of each rank's DALI pipeline (0: the cores this process may use, at most 8)."""

    def __post_init__(self):
        for n in self.input_hw:
            if n % 32:
                raise ConfigError(f"data.input_hw: {tuple(self.input_hw)} must be divisible by 32")
        if not 0 <= self.fold < self.num_folds:
            raise ConfigError(f"data.fold: {self.fold} must lie in [0, data.num_folds={self.num_folds})")
        if not 0.0 < self.test_frac < 1.0:
            raise ConfigError(f"data.test_frac: {self.test_frac} must lie in (0, 1)")
        if not float(self.size_balance) >= 0.0:
            raise ConfigError(f"data.size_balance: {self.size_balance} must be >= 0 (0 = off)")
        if isinstance(self.size_balance_max, bool) or int(self.size_balance_max) != self.size_balance_max \
                or self.size_balance_max < 1:
            raise ConfigError(f"data.size_balance_max: {self.size_balance_max} must be an integer >= 1")


@dataclass
class ModelConfig:
    name: str = "multihipposenet"
    """Key of models.MODELS."""
    criterion: str = ""
    """Key of models.CRITERIA; empty = the model's own loss (same key as model.name)."""
    args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the model builder (checked against its signature)."""
    criterion_args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the loss builder."""
    decode: Literal["dark", "softargmax", "argmax"] = "dark"
    """Heatmap decoding for landmarks."""
    init_from: str = ""
    """Start from these weights (a `medpose pretrain` encoder file, a checkpoint or a state_dict): tensors whose
    name and shape match are loaded, the rest keep their initialisation; the counts are logged."""


@dataclass
class OptimConfig:
    name: Literal["adam", "adamw", "sgd", "rmsprop"] = "adam"
    """Optimizer (rmsprop: the stacked-hourglass publication's choice)."""
    lr: float = 1e-3
    """Peak learning rate."""
    weight_decay: float = 0.0
    """Weight decay."""
    momentum: float = 0.9
    """SGD momentum (rmsprop keeps torch's default of none, as the hourglass publication did)."""
    scheduler: Literal["cosine", "constant", "step", "poly"] = "cosine"
    """LR schedule over train.max_steps (after warmup), per iteration; poly = lr * (1 - t/T)^poly_power."""
    warmup_steps: int = 0
    """Linear warmup steps."""
    min_lr_ratio: float = 0.02
    """Cosine floor as a fraction of lr."""
    step_milestones: tuple[int, ...] = ()
    """Steps where the `step` schedule multiplies the LR by step_gamma."""
    step_gamma: float = 0.1
    """Multiplier of the `step` schedule."""
    poly_power: float = 0.9
    """Exponent of the `poly` schedule (0.9 as in the segmentation zoo)."""
    grad_clip: float = 0.0
    """Clip the global gradient norm to this value (0 = no clipping; the norm is still logged)."""


@dataclass
class TrainConfig:
    max_steps: int = 1000
    """Optimizer steps."""
    batch_size: int = 4
    """Micro-batch size per rank."""
    stop_at_step: int = 0
    """Stop early at this step (0 = run to max_steps) keeping max_steps' LR schedule: time-boxed jobs, preemption."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (global batch = batch_size * grad_accum * world_size)."""
    eval_every: int = 200
    """Evaluate on the validation split every N steps (0 = only at the end)."""
    log_every: int = 10
    """Write training metrics every N steps."""
    ckpt_every: int = 200
    """Save a checkpoint every N steps (and always at the end)."""
    keep_last: int = 2
    """Checkpoints kept besides best.pt, at least 1 (the previous stays until the new one is complete)."""
    seed: int = 967
    """Base seed; each rank uses seed + rank."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto: bf16 autocast on CUDA, fp32 on CPU."""
    nan_policy: Literal["stop", "skip"] = "stop"
    """Non-finite loss or gradient norm: stop with a message, or skip the step."""
    max_skipped_steps: int = 20
    """With nan_policy=skip, stop after this many consecutive skipped steps."""
    best_metric: str = "auto"
    """Validation figure that picks best.pt; auto = the task's choice (hip_us: the validation loss, as published)."""
    best_mode: Literal["auto", "min", "max"] = "auto"
    """Whether smaller or larger best_metric is better; auto = the task's choice."""
    deterministic: bool = False
    """torch.use_deterministic_algorithms (slower on GPU)."""

    def __post_init__(self):
        for key in ("max_steps", "batch_size", "grad_accum", "log_every", "keep_last"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key}: must be >= 1, got {getattr(self, key)}")


@dataclass
class EvalConfig:
    sdr_radii_mm: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0)
    """Success-detection-rate radii (report keys sdr_<r>mm; published: 0.5 / 1 / 1.5 mm)."""
    angle_tolerances_deg: tuple[float, ...] = (3.0, 5.0, 10.0)
    """Graf-angle tolerances (report keys alpha_within_<t>deg / beta_within_<t>deg)."""
    num_workers: int = 0
    """DataLoader workers for evaluation."""
    task_args: dict[str, Any] = field(default_factory=dict)
    """Options of the task's metrics (e.g. spine_disc: fn_si_mm, fp_si_mm); checked against the task's signature."""
    flip_test: bool = False
    """Flip test: also predict the left/right-mirrored image and average the two (models/flip_test.py), swapping the
    dataset's flip_pairs; twice the evaluation cost. Needs a model trained with mirrored images (data.flip_p > 0)."""
    corrupt: str = ""
    """Robustness evaluation of the final test report and `medpose eval`: "KIND:LEVEL,LEVEL,..." (several kinds joined
    with ";"), KIND one of salt_pepper (noise density), gaussian (sigma, fraction of the intensity range), speckle
    (multiplicative sigma), blur (sigma in original pixels); the split is evaluated once more per level with its images
    corrupted in their original frame (engine/corrupt.py). Empty: none."""

    def __post_init__(self):
        if self.corrupt:
            from .corrupt import parse_corruptions
            parse_corruptions(self.corrupt, "eval.corrupt")


# DeepSpeed keys the engine derives from its own config (one source of truth): `extra` may not set them.
DEEPSPEED_OWNED_KEYS = {
    "train_batch_size": "train.batch_size x train.grad_accum x world size",
    "train_micro_batch_size_per_gpu": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "gradient_clipping": "optim.grad_clip",
    "bf16": "train.precision",
    "fp16": "train.precision",
    "optimizer": "optim.* (the engine passes its torch optimizer)",
    "scheduler": "optim.scheduler (the engine passes its torch scheduler)",
}


@dataclass
class DeepSpeedConfig:
    """Options of dist.strategy=deepspeed; the DeepSpeed JSON is generated from these and the rest of the config."""
    zero_stage: Literal[0, 1, 2, 3] = 2
    """ZeRO stage: 0 = plain data parallel, 1 = optimizer states, 2 = + gradients, 3 = + parameters partitioned."""
    offload_optimizer: Literal["none", "cpu"] = "none"
    """Keep optimizer states (and the fp32 step) in CPU memory; needs zero_stage >= 1."""
    offload_params: Literal["none", "cpu"] = "none"
    """Keep partitioned parameters in CPU memory; needs zero_stage = 3."""
    consolidate_on_save: bool = True
    """Rank 0 also writes the consolidated fp32 weights into every checkpoint file (medpose eval and predict read
    them)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Rare DeepSpeed options, deep-merged last into the generated JSON (not the keys the engine derives)."""

    def __post_init__(self):
        if self.offload_optimizer != "none" and self.zero_stage < 1:
            raise ConfigError(f"dist.deepspeed.offload_optimizer: {self.offload_optimizer!r} needs zero_stage >= 1, "
                              f"got zero_stage={self.zero_stage}")
        if self.offload_params != "none" and self.zero_stage != 3:
            raise ConfigError(f"dist.deepspeed.offload_params: {self.offload_params!r} needs zero_stage = 3, "
                              f"got zero_stage={self.zero_stage}")
        for key in self.extra:
            if key in DEEPSPEED_OWNED_KEYS:
                raise ConfigError(f"dist.deepspeed.extra.{key}: set by {DEEPSPEED_OWNED_KEYS[key]}, "
                                  f"not through extra")
        zero = self.extra.get("zero_optimization")
        if isinstance(zero, dict) and "stage" in zero:
            raise ConfigError("dist.deepspeed.extra.zero_optimization.stage: set by dist.deepspeed.zero_stage, "
                              "not through extra")


@dataclass
class DistConfig:
    strategy: Literal["auto", "single", "ddp", "deepspeed"] = "auto"
    """auto: ddp when launched with more than one process, else single; deepspeed: see dist.deepspeed."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """Process-group backend; auto = nccl on CUDA, gloo on CPU."""
    timeout_s: int = 600
    """Collective timeout."""
    find_unused_parameters: bool = False
    """DDP find_unused_parameters."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """Options of the deepspeed strategy."""


@dataclass
class PerfConfig:
    """Speed levers of the training step, each switchable on its own (benchmarks/train_levers.py measures each alone
    and all together against a plain PyTorch loop). None changes what is computed except `train.precision` (not
    here) and channels_last/compile, which reorder floating-point work (results equal to rounding)."""
    channels_last: bool = False
    """Model weights and input batches in channels-last (NHWC) memory format: oneDNN convolutions on the CPU and
    tensor-core convolutions on the GPU prefer it."""
    compile: Literal["none", "model", "loss", "both"] = "none"
    """torch.compile the model, the criterion or both, in place (state_dict keys unchanged). The first steps pay the
    compilation (minutes for the largest networks on a CPU)."""
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    """torch.compile mode; reduce-overhead adds CUDA graphs on the GPU (host-bound small networks)."""
    optimizer_impl: Literal["auto", "for", "foreach", "fused"] = "auto"
    """The optimizer's implementation: auto = torch's default, for = one parameter at a time, foreach = multi-tensor,
    fused = one fused kernel (adam, adamw, sgd)."""
    host_sync: Literal["step", "log"] = "step"
    """step: the loss finiteness, the loss parts and the gradient norm are read back to the host every micro-batch
    (the NaN guard decides on the spot). log: they stay on the device and are read once per train.log_every and
    before every checkpoint, so the host never waits for the device; a non-finite step is still never applied (the
    fused optimizer skips it on the device), counted and handled by train.nan_policy at the next read. Needs
    optim.name adam/adamw, precision fp32/bf16 and a single/ddp strategy; the LR schedule then advances on
    skipped steps too."""
    cpu_malloc: Literal["auto", "system", "keep"] = "auto"
    """keep: glibc keeps freed memory for reuse instead of returning each large block to the OS (every large tensor
    of every step would otherwise be page-faulted in afresh: ~1.5x slower steps measured on a 2-core CPU); system:
    glibc's defaults; auto: keep when training on the CPU under glibc."""


@dataclass
class LogConfig:
    runs_root: str = "runs"
    """Where run directories are created."""
    name: str = "run"
    """Run name (directory runs_root/name, suffixed when it exists and not resuming)."""
    run_dir: str | None = None
    """Explicit run directory (overrides runs_root/name)."""
    tensorboard: bool = True
    """Write TensorBoard event files."""
    progress: bool = True
    """Progress bar on rank 0."""
    overlays: int = 8
    """Held-out overlay figures written by evaluation."""


@dataclass
class PretrainConfig:
    """`medpose pretrain`: contrastive self-supervised pre-training (InfoNCE against a memory bank)."""
    layer: str = "auto"
    """Module (dotted name) whose output feeds the projection; auto = the top-level block with the smallest output."""
    bank_size: int = 1024
    """Negative keys kept in the memory bank (FIFO)."""
    dim: int = 128
    """Projection size (global average pool -> Linear -> L2 normalisation)."""
    temperature: float = 0.07
    """InfoNCE temperature."""
    momentum: float = 0.99
    """Key encoder = exponential moving average of the query encoder (0: the same weights, no gradient)."""
    steps: int = 200
    """Optimizer steps."""
    batch_size: int = 16
    """Images per step (two views each)."""
    crop_scale: tuple[float, float] = (0.2, 1.0)
    """Random resized crop: area fraction range."""
    jitter: float = 0.4
    """Colour jitter strength (brightness, contrast, saturation)."""
    blur_p: float = 0.5
    """Probability of a Gaussian blur per view."""

    def __post_init__(self):
        for key in ("bank_size", "dim", "steps", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"pretrain.{key}: must be >= 1, got {getattr(self, key)}")
        if not self.temperature > 0:
            raise ConfigError(f"pretrain.temperature: must be > 0, got {self.temperature}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"pretrain.momentum: must lie in [0, 1), got {self.momentum}")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"pretrain.crop_scale: need 0 < low <= high <= 1, got {tuple(self.crop_scale)}")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    log: LogConfig = field(default_factory=LogConfig)
    perf: PerfConfig = field(default_factory=PerfConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


def check_flip_test(cfg: Config, where: str = "config") -> None:
    """eval.flip_test needs a model trained on mirrored images (data.flip_p > 0): checked before training, evaluation
    and prediction, not when a saved config is read (an old checkpoint stays loadable with the flip test off)."""
    if cfg.eval.flip_test and not float(cfg.data.flip_p or 0.0) > 0:
        raise ConfigError(f"{where}: eval.flip_test: the model is trained without mirrored images (data.flip_p=0), "
                          f"so a mirrored image is outside what it learned and averaging it in degrades the result; "
                          f"train with data.flip_p > 0 (left/right landmark pairs swap on a flip) or set "
                          f"eval.flip_test=false")


def _plain(obj):
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


# ------------------------------------------------------------------ type checking and coercion

def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Return `value` as type `tp` or raise ConfigError naming key and source."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    fail = ConfigError(f"{source}: key '{key}': expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key, source)
            except ConfigError:
                continue
        raise fail
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{source}: key '{key}': must be one of {list(args)}, got {value!r}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise fail
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{source}: key '{key}': expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, key, source) for v, a in zip(value, args))
        item = args[0] if args else Any
        out = [_coerce(v, item, key, source) for v in value]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise fail
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise fail
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise fail
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
            try:
                return float(value)
            except ValueError:
                raise fail from None
        raise fail
    if tp is str:
        if isinstance(value, str):
            return value
        raise fail
    raise ConfigError(f"{source}: key '{key}': unsupported schema type {tp}")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _build(cls, values: dict[str, Any], prefix: str, source: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: key '{prefix.rstrip('.')}': expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{source}: unknown key '{prefix}{unknown[0]}' (valid keys under "
                          f"'{prefix.rstrip('.') or 'top level'}': {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in values.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{prefix}{name}.", source)
        else:
            kwargs[name] = _coerce(value, tp, prefix + name, source)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


_FLAT_DICTS = ("args", "criterion_args", "reader_args", "task_args")  # option dicts: merged one level deep


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in _FLAT_DICTS:
            out[k] = _deep_merge(out[k], v)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """`optim.lr=3e-4` → (['optim', 'lr'], 3e-4). Values are parsed as YAML (lists as [a, b])."""
    if "=" not in text:
        raise ConfigError(f"command line: override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"command line: override '{text}' has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"command line: override '{text}': value is not valid YAML ({e})") from None
    return parts, value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                base: dict | None = None) -> Config:
    """Defaults ← `base` (e.g. a checkpoint's config) ← YAML file ← dotted overrides."""
    raw: dict[str, Any] = dict(base or {})
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(loaded).__name__}")
        raw = _deep_merge(raw, loaded)
    cfg = _build(Config, raw, "", source)
    if overrides:
        merged = cfg.to_dict()
        for text in overrides:
            parts, value = parse_override(text)
            node = merged
            for p in parts[:-1]:
                if not isinstance(node.get(p), dict):
                    raise ConfigError(f"command line: unknown key '{'.'.join(parts)}'")
                node = node[p]
            node[parts[-1]] = value
        cfg = _build(Config, merged, "", "command line")
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

"""`medpose export`: a checkpoint's network as ONNX or TorchScript, with a sidecar JSON that reproduces `predict`.

The exported graph is the network alone: image_BCHW (float32, already preprocessed) in, the raw outputs that decoding
needs out, in the fixed order of DECODE_OUTPUTS (heatmap_BKHW, kpts_px_BK2, seg_logits_BCHW: whichever the model
returns in eval mode). Training-only or diagnostic outputs (the stacked hourglass's per-stack heatmaps and attention
map, deep-supervision logits) are not exported: decoding never reads them. Preprocessing (reading, resizing,
normalisation), the flip test, decoding (heatmap -> points, seg argmax) and the task's clinical measures stay in
Python (engine/onnx_predict.py, `medpose predict --onnx`), driven by the sidecar `<model file>.json`, which records
the resolved run config, the data description (landmark names, flip pairs, channels, spacing rule), the
preprocessing, the task's learned state, the output names, versions and the checkpoint's sha256.

ONNX export: torch's TorchScript-based exporter (fast, works from torch 2.4 on, no extra package) with opset 17;
the networks it cannot export (NEEDS_DYNAMO, NEEDS_DYNAMO_DYNAMIC_BATCH) and any other that fails with it go through torch's dynamo exporter
(torch >= 2.5 and the onnxscript package). TorchScript export: torch.jit.trace (scripting fails on the dict outputs
and the library backbones). With dynamic_batch the batch dimension is symbolic; otherwise it is fixed at `batch`.
Networks that cannot be exported to a format are listed in CANNOT_EXPORT with the reason (the README table is
checked against it by tests/test_export.py).

Ensembles (several checkpoints, or a `train --folds` base folder): the graph holds every member and returns the mean
of their raw outputs (engine/ensemble.Ensemble, the averaging `eval` / `predict --checkpoint` do), so one file serves
the k-fold ensemble. The sidecar carries the first member's config, preprocessing and task state (those `predict`
uses) and lists every member with its sha256. The flip test, which `predict --onnx` applies to the averaged outputs,
then equals the mean of each member's flip-averaged outputs that `predict --checkpoint` computes: flip averaging
(mirror, swap the pairs, mean) is linear in the outputs.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import inspect
import json
import logging
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

log = logging.getLogger("medpose")

EXPORT_FORMATS = ("onnx", "torchscript")
EXPORTERS = ("auto", "legacy", "dynamo")
DECODE_OUTPUTS = ("heatmap_BKHW", "kpts_px_BK2", "seg_logits_BCHW")
INPUT_NAME = "image_BCHW"
ONNX_OPSET = 17
SIDECAR_KIND = "medpose-export"
SIDECAR_VERSION = 1
# fp32 agreement required between the exported network and PyTorch eager (|a - b| <= ATOL + RTOL |b|)
ATOL = RTOL = 1e-4

# networks whose fp32 outputs are themselves further than ATOL from a float64 run of the same weights, so two fp32
# implementations (PyTorch, onnxruntime) cannot agree within it: name -> (atol = rtol, why)
LOOSER_TOLERANCE: dict[str, tuple[float, str]] = {
    "multihipposenet": (5e-4, "its eager fp32 heatmaps are up to 1e-4 from a float64 run at unit-range inputs "
                              "(measured on the tiny build); onnxruntime's differ from PyTorch's by up to 3e-4"),
}


def tolerance(model_name: str) -> float:
    """atol = rtol for comparing an export of `model_name` with PyTorch (ATOL unless LOOSER_TOLERANCE says more)."""
    return LOOSER_TOLERANCE.get(model_name, (ATOL, ""))[0]


# model name -> format -> why it cannot be exported (one line each; README "Export" lists them)
CANNOT_EXPORT: dict[str, dict[str, str]] = {
    "segnet": {"torchscript": "torch.jit.trace stops in max_unpool2d's output-size check (a Python bool of a traced "
                              "tensor); its ONNX export works (dynamo exporter)"},
}

# networks the TorchScript-based ONNX exporter cannot convert; they are exported with the dynamo exporter
NEEDS_DYNAMO: dict[str, str] = {
    "pspnet": "adaptive_avg_pool2d to bin sizes that do not divide the feature map",
    "segnet": "max_unpool2d with an output size",
}
# ... and those it cannot convert with a symbolic batch dimension (--dynamic-batch) only
NEEDS_DYNAMO_DYNAMIC_BATCH: dict[str, str] = {
    "cenet": "the RMP block's pooling sizes come from the input shape (a Gather the old exporter rejects)",
    "shape_unet": "a convolution whose kernel the old exporter cannot size once the batch is symbolic",
}


def needs_dynamo(model_name: str, dynamic_batch: bool) -> bool:
    return model_name in NEEDS_DYNAMO or (dynamic_batch and model_name in NEEDS_DYNAMO_DYNAMIC_BATCH)


_EXTRA_HINT = "pip install 'medpose[export]' (or the pinned versions in requirements-lock.txt)"


class ExportError(ValueError):
    """A network or checkpoint that cannot be exported as asked: the message names the model, format and reason."""


def require(module: str, package: str | None = None, what: str = "model export") -> Any:
    """Import an optional export dependency, or stop with one line naming the missing package."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ExportError(f"{what} needs the '{package or module}' package, which is not installed: "
                          f"{_EXTRA_HINT}") from None


def cannot_export_reason(model_name: str, fmt: str) -> str | None:
    return CANNOT_EXPORT.get(model_name, {}).get(fmt)


def refuse_unexportable(model_names: Sequence[str], fmt: str) -> None:
    """ExportError naming the first of these networks (an ensemble's members) that cannot be exported to fmt."""
    for name in dict.fromkeys(model_names):
        reason = cannot_export_reason(name, fmt)
        if reason is not None:
            raise ExportError(f"{name} cannot be exported to {fmt}: {reason}")


def sidecar_path(model_path: str | Path) -> Path:
    """Where the sidecar of an exported file lives: beside it, `<file name>.json` (model.onnx -> model.onnx.json)."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.name + ".json")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class DecodeOutputs(nn.Module):
    """The network with its output dict flattened to a tuple in `output_names` order (what the exporters need)."""

    def __init__(self, model: nn.Module, output_names: Sequence[str]):
        super().__init__()
        self.model = model
        self.output_names = tuple(output_names)

    def forward(self, image_BCHW: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(image_BCHW)
        return tuple(out[k] for k in self.output_names)


def example_input(input_chw: Sequence[int], batch: int, seed: int = 0) -> torch.Tensor:
    """A reproducible (batch, C, H, W) float32 input in the unit range the preprocessing produces."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand((batch, *[int(n) for n in input_chw]), generator=g, dtype=torch.float32)


def decode_output_names(model: nn.Module, input_chw: Sequence[int], model_name: str = "model") -> list[str]:
    """The DECODE_OUTPUTS keys the eval-mode network returns (one forward at batch 1)."""
    model.eval()
    with torch.no_grad():
        out = model(example_input(input_chw, 1))
    if not isinstance(out, dict):
        raise ExportError(f"{model_name}: the network returns a {type(out).__name__}, not the engine's output dict")
    names = [k for k in DECODE_OUTPUTS if torch.is_tensor(out.get(k))]
    if not names:
        raise ExportError(f"{model_name}: the network returns none of {', '.join(DECODE_OUTPUTS)} "
                          f"(got {', '.join(sorted(out))}); nothing to decode")
    return names


def _onnx_export_kwargs() -> set[str]:
    return set(inspect.signature(torch.onnx.export).parameters)


def _export_onnx_legacy(wrapper: DecodeOutputs, x: torch.Tensor, path: Path, dynamic_batch: bool) -> None:
    kwargs: dict[str, Any] = {"input_names": [INPUT_NAME], "output_names": list(wrapper.output_names),
                              "opset_version": ONNX_OPSET, "do_constant_folding": True}
    if dynamic_batch:
        kwargs["dynamic_axes"] = {n: {0: "batch"} for n in (INPUT_NAME, *wrapper.output_names)}
    if "dynamo" in _onnx_export_kwargs():     # torch >= 2.5 (2.9+ defaults to the dynamo exporter)
        kwargs["dynamo"] = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, (x,), str(path), **kwargs)


def _export_onnx_dynamo(wrapper: DecodeOutputs, x: torch.Tensor, path: Path, dynamic_batch: bool) -> None:
    if "dynamo" not in _onnx_export_kwargs():
        raise ExportError(f"the dynamo ONNX exporter needs torch >= 2.5 (this is {torch.__version__})")
    require("onnxscript", what="the dynamo ONNX exporter")
    kwargs: dict[str, Any] = {"input_names": [INPUT_NAME], "output_names": list(wrapper.output_names),
                              "dynamo": True, "external_data": False}
    if dynamic_batch:
        kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch", min=1, max=4096)},)
    accepted = _onnx_export_kwargs()
    for key in ("verbose", "report"):
        if key in accepted:
            kwargs[key] = False
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapper, (x,), str(path), **kwargs)
    finally:
        quiet.setLevel(level)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:300]}" if text else type(err).__name__


def export_network(model: nn.Module, path: str | Path, fmt: str, input_chw: Sequence[int],
                   output_names: Sequence[str] | None = None, dynamic_batch: bool = False, batch: int = 1,
                   exporter: str = "auto", model_name: str = "model",
                   member_names: Sequence[str] = ()) -> dict[str, Any]:
    """Write `model` (eval mode, CPU, fp32) as `fmt` to `path`; returns {"output_names", "exporter", "batch"
    (None when dynamic)}. exporter (ONNX only): auto = the TorchScript-based exporter, the dynamo one for NEEDS_DYNAMO
    networks and as a fallback; legacy / dynamo force one. member_names: an ensemble's networks (model_name then
    only labels messages): one that cannot be exported stops it, one that needs the dynamo exporter routes it."""
    if fmt not in EXPORT_FORMATS:
        raise ExportError(f"unknown export format '{fmt}' (choose from {', '.join(EXPORT_FORMATS)})")
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown ONNX exporter '{exporter}' (choose from {', '.join(EXPORTERS)})")
    if batch < 1:
        raise ExportError(f"batch must be >= 1, got {batch}")
    networks = list(member_names) or [model_name]
    refuse_unexportable(networks, fmt)
    model = model.float().cpu().eval()
    names = list(output_names or decode_output_names(model, input_chw, model_name))
    wrapper = DecodeOutputs(model, names).eval()
    # a dynamic batch is traced at 2, so no size-1 dimension is baked into the graph
    x = example_input(input_chw, 2 if dynamic_batch else batch)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    used = "torch.jit.trace"
    with torch.no_grad():
        if fmt == "torchscript":
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    traced = torch.jit.trace(wrapper, (x,), check_trace=False)
                    torch.jit.save(traced, str(path))
            except Exception as e:
                raise ExportError(f"{model_name} cannot be exported to torchscript: {_first_line(e)}") from e
        else:
            require("onnx")
            order = {"legacy": ["legacy"], "dynamo": ["dynamo"],
                     "auto": ["dynamo"] if any(needs_dynamo(n, dynamic_batch) for n in networks)
                     else ["legacy", "dynamo"]}[exporter]
            errors = []
            for kind in order:
                try:
                    (_export_onnx_legacy if kind == "legacy" else _export_onnx_dynamo)(wrapper, x, path,
                                                                                        dynamic_batch)
                    used = kind
                    break
                except ExportError as e:
                    errors.append(f"{kind} exporter: {e}")
                except Exception as e:
                    errors.append(f"{kind} exporter: {_first_line(e)}")
                    log.debug("export of %s with the %s exporter failed", model_name, kind, exc_info=True)
            else:
                raise ExportError(f"{model_name} cannot be exported to onnx: " + "; ".join(errors))
    return {"output_names": names, "exporter": used, "batch": None if dynamic_batch else int(batch)}


# ---------------------------------------------------------------------------------------------- running exports

def load_exported(path: str | Path, fmt: str | None = None, output_names: Sequence[str] | None = None):
    """A callable numpy (B, C, H, W) float32 -> {output name: numpy array} for an exported file (ONNX through
    onnxruntime on the CPU, TorchScript through torch.jit.load). Output names come from the file (ONNX) or the
    sidecar (TorchScript)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: exported model file not found")
    fmt = fmt or ("torchscript" if path.suffix in (".pt", ".ts", ".pth") else "onnx")
    if fmt == "onnx":
        ort = require("onnxruntime", what="running an ONNX model")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        input_name = session.get_inputs()[0].name

        def run(image_BCHW: np.ndarray) -> dict[str, np.ndarray]:
            got = session.run(names, {input_name: np.ascontiguousarray(image_BCHW, dtype=np.float32)})
            return dict(zip(names, got))
        return run
    side = sidecar_path(path)
    names = list(output_names) if output_names else (json.loads(side.read_text())["model"]["output_names"]
                                                    if side.is_file() else None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # torch >= 2.10 deprecates TorchScript; loading still works
        module = torch.jit.load(str(path), map_location="cpu").eval()

    def run_ts(image_BCHW: np.ndarray) -> dict[str, np.ndarray]:
        with torch.no_grad():
            out = module(torch.as_tensor(np.ascontiguousarray(image_BCHW, dtype=np.float32)))
        out = out if isinstance(out, (tuple, list)) else (out,)
        keys = names or [f"output_{i}" for i in range(len(out))]
        return {k: v.numpy() for k, v in zip(keys, out)}
    return run_ts


def compare_outputs(got: dict[str, np.ndarray], ref: dict[str, np.ndarray], tol: float = ATOL) -> dict[str, float]:
    """Per output: the largest |got - ref| and the largest excess over tol + tol |ref| (<= 0 means within)."""
    out = {}
    for k, r in ref.items():
        if k not in got:
            raise ExportError(f"the exported model has no output '{k}' (it has {', '.join(got)})")
        g, r = np.asarray(got[k], dtype=np.float64), np.asarray(r, dtype=np.float64)
        if g.shape != r.shape:
            raise ExportError(f"output '{k}': the exported model gives {g.shape}, PyTorch {r.shape}")
        diff = np.abs(g - r)
        out[f"{k}_max_abs"] = float(diff.max()) if diff.size else 0.0
        out[f"{k}_excess"] = float((diff - (tol + tol * np.abs(r))).max()) if diff.size else -tol
    return out


def verify_export(model: nn.Module, output_names: Sequence[str], path: str | Path, fmt: str,
                  input_chw: Sequence[int], batches: Sequence[int], tol: float = ATOL) -> dict[str, dict[str, float]]:
    """Exported file vs PyTorch eager on reproducible unit-range inputs at each batch size; raises ExportError when
    an output differs by more than tol + tol |eager|. Returns {"batch<B>": compare_outputs(...)}."""
    run = load_exported(path, fmt, output_names)
    wrapper = DecodeOutputs(model.float().cpu().eval(), output_names)
    report = {}
    for b in batches:
        x = example_input(input_chw, b, seed=1000 + b)
        with torch.no_grad():
            ref = {k: v.numpy() for k, v in zip(output_names, wrapper(x))}
        figures = compare_outputs(run(x.numpy()), ref, tol)
        report[f"batch{b}"] = figures
        bad = {k: v for k, v in figures.items() if k.endswith("_excess") and v > 0}
        if bad:
            raise ExportError(f"{path}: the exported model differs from PyTorch at batch {b} beyond "
                              f"{tol:g} + {tol:g}|x|: " + ", ".join(f"{k[:-7]} max |diff| "
                                                                     f"{figures[k[:-7] + '_max_abs']:.3g}"
                                                                     for k in bad))
    return report


# ---------------------------------------------------------------------------------------------- checkpoints

def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def build_sidecar(cfg, state: dict[str, Any], task_state: dict[str, Any], checkpoint: Path,
                  model_file: Path, fmt: str, exported: dict[str, Any], flip_test: bool) -> dict[str, Any]:
    """Everything `predict --onnx` needs beside the graph (module docstring); the summary fields at the top say it
    in words for a deployment written in another language."""
    info, pre = state["info"], state["preprocess"]
    args = dict(cfg.model.args)
    return {
        "kind": SIDECAR_KIND, "version": SIDECAR_VERSION,
        "model": {"file": model_file.name, "format": fmt, "name": cfg.model.name, "exporter": exported["exporter"],
                  "opset": ONNX_OPSET if exported["exporter"] == "legacy" else None,
                  "input_name": INPUT_NAME, "input_shape": [exported["batch"] or "batch", int(pre.channels),
                                                            *[int(n) for n in pre.input_hw]],
                  "dtype": "float32", "batch": exported["batch"], "output_names": list(exported["output_names"])},
        "preprocess": {**pre.to_dict(),
                       "rule": "image -> unit range (uint8 / 255, or z-score for float volumes) -> colour/grey per "
                               "'color' and 'channels' -> 'resize' to input_hw (letterbox: aspect kept, padded "
                               "with pad_value) -> 'normalize' (imagenet: mean/std per channel)"},
        "landmarks": {"names": list(info.kpt_names), "flip_pairs": [list(p) for p in info.flip_pairs],
                      "point_order": info.point_order},
        "classes": None if info.class_names is None else list(info.class_names),
        "spacing": {"rule": info.spacing, "spacing_mm": cfg.data.spacing_mm,
                    "note": "mm per original pixel: the reader's own (annotation / header), else data.spacing_mm, "
                            "else a dataset.json with spacing_mm in the image's folder or up to three above"},
        "decode": {"task": cfg.data.task, "method": cfg.model.decode, "sigma_px": cfg.data.sigma_px,
                   "heatmap_peak": cfg.data.heatmap_peak, "heatmap_stride": args.get("heatmap_stride"),
                   "heatmaps_at": "network input resolution", "flip_test": bool(flip_test),
                   "points": "input-frame pixels mapped to the original image by the inverse of the "
                             "original->input matrix; segmentation logits resampled onto the original grid, "
                             "then arg-maxed"},
        "task_state": task_state,
        "data_state": {"info": info.to_dict(), "preprocess": pre.to_dict()},
        "config": cfg.to_dict(),
        "versions": {"medpose": _version("medpose"), "torch": str(torch.__version__), "onnx": _version("onnx"),
                     "onnxruntime": _version("onnxruntime"), "onnxscript": _version("onnxscript")},
        "checkpoint": {"file": str(checkpoint), "sha256": sha256_file(checkpoint)},
        "ensemble": None,
    }


def export_checkpoint(checkpoint: str | Path | Sequence[str | Path], out: str | Path, fmt: str = "onnx",
                      dynamic_batch: bool = False, batch: int = 1, exporter: str = "auto",
                      verify: bool = True) -> dict[str, Any]:
    """Export a checkpoint's network to `out` and write the sidecar beside it; returns the sidecar dict (with
    "verified": the eager-vs-export figures when verify). `checkpoint`: a file, a run directory, or several / a
    `train --folds` base folder (engine/ensemble.resolve_checkpoints): more than one exports their ensemble as one
    graph (module docstring)."""
    from engine.checkpoint import load_checkpoint_file
    from engine.ensemble import load_ensemble, resolve_checkpoints
    from engine.run import load_for_inference
    paths = resolve_checkpoints(checkpoint)
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: checkpoint file not found")
    if fmt not in EXPORT_FORMATS:
        raise ExportError(f"unknown export format '{fmt}' (choose from {', '.join(EXPORT_FORMATS)})")
    clients = [load_checkpoint_file(p).get("client", {}) for p in paths]
    names = [str(((c.get("config") or {}).get("model") or {}).get("name", "model")) for c in clients]
    refuse_unexportable(names, fmt)        # before the networks are built: a refusal costs only the file reads
    if len(paths) == 1:
        model, cfg, _, state = load_for_inference(paths[0], torch.device("cpu"))
        label = cfg.model.name
    else:
        model, cfg, _, state = load_ensemble(paths, torch.device("cpu"))
        label = f"ensemble of {len(paths)} ({', '.join(dict.fromkeys(names))})"
        log.info("export: %s: %s", label, ", ".join(map(str, paths)))
    task_state = clients[0].get("task") or {}
    pre = state["preprocess"]
    input_chw = (int(pre.channels), *[int(n) for n in pre.input_hw])
    out = Path(out)
    exported = export_network(model, out, fmt, input_chw, dynamic_batch=dynamic_batch, batch=batch,
                              exporter=exporter, model_name=label, member_names=names if len(paths) > 1 else ())
    sidecar = build_sidecar(cfg, state, _plain_json(task_state), paths[0], out, fmt, exported,
                            bool(getattr(cfg.eval, "flip_test", False)))
    if len(paths) > 1:
        sidecar["ensemble"] = {
            "members": [{"file": str(p), "sha256": sha256_file(p), "model": n} for p, n in zip(paths, names)],
            "combine": "the graph returns the mean of the members' raw outputs (logits, heatmaps, points); the "
                       "config, preprocessing and task state here are the first member's ('checkpoint')"}
    if verify:
        batches = (1, 2) if dynamic_batch else (batch,)
        tol = max(tolerance(n) for n in names)
        try:
            figures = verify_export(model, exported["output_names"], out, fmt, input_chw, batches, tol)
        except BaseException:
            out.unlink(missing_ok=True)      # no file that disagrees with PyTorch is left to be deployed
            raise
        sidecar["verified"] = {"atol": tol, "rtol": tol, **figures}
    sidecar_path(out).write_text(json.dumps(sidecar, indent=2))
    return sidecar


def _plain_json(obj: Any) -> Any:
    """A task state as JSON values (tensors and arrays as lists)."""
    if isinstance(obj, dict):
        return {str(k): _plain_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain_json(v) for v in obj]
    if torch.is_tensor(obj):
        return obj.tolist()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def read_sidecar(model_path: str | Path) -> dict[str, Any]:
    """The sidecar of an exported model; errors name the file and what is wrong."""
    side = sidecar_path(model_path)
    if not side.is_file():
        raise FileNotFoundError(f"{side}: no sidecar beside {Path(model_path).name} (medpose export writes "
                                f"<model file>.json; predict needs it for preprocessing and decoding)")
    try:
        data = json.loads(side.read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"{side}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or data.get("kind") != SIDECAR_KIND:
        raise ExportError(f"{side}: not a MedPose export sidecar (field 'kind' must be '{SIDECAR_KIND}')")
    for key in ("model", "config", "data_state"):
        if key not in data:
            raise ExportError(f"{side}: field '{key}' is missing")
    return data


__all__ = ["EXPORT_FORMATS", "DECODE_OUTPUTS", "CANNOT_EXPORT", "NEEDS_DYNAMO", "NEEDS_DYNAMO_DYNAMIC_BATCH", "LOOSER_TOLERANCE", "tolerance", "ExportError", "export_network",
           "export_checkpoint", "load_exported", "verify_export", "compare_outputs", "read_sidecar", "sidecar_path"]

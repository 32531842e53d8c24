"""Model export (engine/export.py, engine/onnx_predict.py, `medpose export`, `medpose predict --onnx`).

Every network of the model registry and the segmentation zoo is built at a tiny size and exported to ONNX and to
TorchScript with a dynamic batch; onnxruntime (CPU) and the loaded TorchScript module must give the PyTorch eager
outputs within 1e-4 (abs + rel, fp32) at batch sizes 1 and 2. The networks listed in CANNOT_EXPORT must still fail
(so the list stays honest), and so must the legacy ONNX exporter on NEEDS_DYNAMO. An end-to-end run trains a tiny
fetal-head model one step, exports it, and `predict --onnx` (in a fresh process, which must not import the trainer,
DeepSpeed or DALI) gives the rows of `predict --checkpoint`.
"""
from __future__ import annotations

import csv
import importlib
import inspect
import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import export as ex
from engine.export import CANNOT_EXPORT, DECODE_OUTPUTS, NEEDS_DYNAMO, NEEDS_DYNAMO_DYNAMIC_BATCH, ExportError
from launch.cli import main
from models.registry import MODELS
from models.seg import SEG_SPECS

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

REPO = Path(__file__).resolve().parents[1]
HW = (64, 64)          # a multiple of every zoo network's stride (32)
CHANNELS = 1

# tiny builds of the landmark networks (their own test files use the same sizes)
TINY_LANDMARK = {
    "multihipposenet": dict(expert_depth=18, width=8, num_experts=2, gn_groups=4, num_classes=3, num_keypoints=6),
    "hourglass": dict(num_stacks=2, num_features=16, depth=2, num_keypoints=3),
    "landmark_unet": dict(width=4, depth=3, num_keypoints=3),
    "landmark_hrnet": dict(backbone="hrnet_w18_small", head_channels=8, num_keypoints=3),
    "unet_multitask": dict(width=4, depth=3, num_keypoints=3),
    "shape_unet": dict(width=4, depth=3, num_keypoints=3),
    **{name: dict(backbone="timm:test_efficientnet", input_hw=HW, num_keypoints=3)
       for name in ("efficientnet", "efficientnet_cbam", "efficientnet_heatmap", "efficientnet_ms_cbam_3scales")},
}


def _zoo_small() -> dict[str, dict]:
    """The zoo's small builds, from the SMALL dicts of the zoo's own test files (a network added to the zoo brings
    its small build there, so it is exported here without an edit to this file)."""
    small: dict[str, dict] = {}
    for path in sorted(Path(__file__).parent.glob("test_seg*.py")):
        table = getattr(importlib.import_module(path.stem), "SMALL", None)
        if isinstance(table, dict):
            small.update({k: dict(v) for k, v in table.items() if k in SEG_SPECS and isinstance(v, dict)})
    return small


def tiny_args(name: str) -> dict:
    if name in SEG_SPECS:
        args = {"num_classes": 2, **_zoo_small().get(name, {})}
        params = inspect.signature(SEG_SPECS[name].build).parameters
        if "input_hw" in params:            # networks sized to their input (position embeddings)
            args["input_hw"] = list(HW)
        if "img_size" in params:
            args["img_size"] = HW[0]
    else:
        args = dict(TINY_LANDMARK.get(name, {}))
    return {**args, "in_channels": CHANNELS}


def build_tiny(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return MODELS[name](**tiny_args(name)).eval()


ALL = sorted(MODELS)


def test_every_model_is_covered_and_the_lists_name_real_models():
    assert set(SEG_SPECS) <= set(MODELS)
    missing = [n for n in ALL if n not in SEG_SPECS and n not in TINY_LANDMARK]
    assert not missing, f"landmark networks without a tiny build here: {missing}"
    assert [n for n in SEG_SPECS if n not in _zoo_small()] == []
    for name, per_format in CANNOT_EXPORT.items():
        assert name in MODELS and set(per_format) <= set(ex.EXPORT_FORMATS)
        assert all(reason and "\n" not in reason for reason in per_format.values())
    assert set(NEEDS_DYNAMO) | set(NEEDS_DYNAMO_DYNAMIC_BATCH) <= set(MODELS)
    assert set(ex.LOOSER_TOLERANCE) == {"multihipposenet"} and ex.tolerance("unet") == 1e-4


@pytest.mark.slow          # 43 networks x 2 formats: about two minutes on a busy 2-core CPU (make test runs it)
@pytest.mark.parametrize("fmt", ex.EXPORT_FORMATS)
@pytest.mark.parametrize("name", ALL)
def test_export_matches_pytorch_at_two_batch_sizes(name, fmt, tmp_path, monkeypatch):
    model = build_tiny(name)
    path = tmp_path / ("m.onnx" if fmt == "onnx" else "m.pt")
    reason = ex.cannot_export_reason(name, fmt)
    if reason is not None:
        # the list must stay honest: exporting it anyway still fails
        with pytest.raises(ExportError, match="cannot be exported"):
            ex.export_network(model, path, fmt, (CHANNELS, *HW), dynamic_batch=True, model_name=name)
        rest = {k: v for k, v in CANNOT_EXPORT[name].items() if k != fmt}
        monkeypatch.setitem(CANNOT_EXPORT, name, rest)
        with pytest.raises(ExportError, match=f"{name} cannot be exported to {fmt}: (?!.*{re.escape(reason)})"):
            ex.export_network(model, path, fmt, (CHANNELS, *HW), dynamic_batch=True, model_name=name)
        return
    info = ex.export_network(model, path, fmt, (CHANNELS, *HW), dynamic_batch=True, model_name=name)
    with torch.no_grad():
        eager_keys = model(torch.zeros(1, CHANNELS, *HW)).keys()
    assert info["output_names"] == [k for k in DECODE_OUTPUTS if k in eager_keys] and info["batch"] is None
    if fmt == "onnx":
        assert info["exporter"] == ("dynamo" if ex.needs_dynamo(name, True) else "legacy")
    run = ex.load_exported(path, fmt, info["output_names"])
    tol = ex.tolerance(name)            # 1e-4, or the looser figure LOOSER_TOLERANCE gives with its reason
    for b in (1, 2):                    # unit-range images, as the preprocessing gives them
        x = torch.rand(b, CHANNELS, *HW, generator=torch.Generator().manual_seed(b))
        with torch.no_grad():
            ref = model(x)
        got = run(x.numpy())
        assert sorted(got) == sorted(info["output_names"])
        for key in info["output_names"]:
            assert got[key].shape == tuple(ref[key].shape)
            np.testing.assert_allclose(got[key], ref[key].numpy(), atol=tol, rtol=tol, err_msg=f"{name} {key}")


@pytest.mark.parametrize("name,dynamic", [*((n, False) for n in sorted(NEEDS_DYNAMO)),
                                          *((n, True) for n in sorted(NEEDS_DYNAMO_DYNAMIC_BATCH))])
def test_networks_listed_for_the_dynamo_exporter_still_fail_with_the_legacy_one(name, dynamic, tmp_path):
    with pytest.raises(ExportError, match="legacy exporter"):
        ex.export_network(build_tiny(name), tmp_path / "m.onnx", "onnx", (CHANNELS, *HW), dynamic_batch=dynamic,
                          exporter="legacy", model_name=name)


def test_readme_table_lists_exactly_the_networks_that_cannot_export():
    text = (REPO / "README.md").read_text()
    section = text.split("### Export", 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    rows = {tuple(c.strip(" `") for c in line.strip().strip("|").split("|")[:2])
            for line in section.splitlines() if line.startswith("| `")}
    want = {(name, fmt) for name, per in CANNOT_EXPORT.items() for fmt in per}
    want |= {(name, "onnx (legacy exporter)") for name in NEEDS_DYNAMO}
    want |= {(name, "onnx --dynamic-batch (legacy exporter)") for name in NEEDS_DYNAMO_DYNAMIC_BATCH}
    assert rows == want


def test_export_needs_its_packages_and_says_which(tmp_path, monkeypatch):
    model = build_tiny("landmark_unet")
    for missing in ("onnx", "onnxruntime"):
        monkeypatch.setitem(sys.modules, missing, None)          # import fails as if not installed
    with pytest.raises(ExportError, match="'onnx' package"):
        ex.export_network(model, tmp_path / "m.onnx", "onnx", (CHANNELS, *HW))
    (tmp_path / "x.onnx").write_bytes(b"")
    with pytest.raises(ExportError, match="'onnxruntime' package"):
        ex.load_exported(tmp_path / "x.onnx")
    with pytest.raises(ExportError, match="unknown export format 'tflite'"):
        ex.export_network(model, tmp_path / "m.tfl", "tflite", (CHANNELS, *HW))


def test_fixed_batch_export_pads_the_last_group(tmp_path):
    """A file exported at a fixed batch of 2 runs 3 inputs as 2 + (1 padded); outputs equal eager per input."""
    from engine.onnx_predict import ExportedNetwork
    model = build_tiny("landmark_unet")
    info = ex.export_network(model, tmp_path / "m.onnx", "onnx", (CHANNELS, *HW), batch=2)
    assert info["batch"] == 2
    net = ExportedNetwork(tmp_path / "m.onnx", {"model": {"format": "onnx", "batch": 2, "output_names":
                                                          info["output_names"], "input_shape": [2, CHANNELS, *HW]}})
    x = torch.rand(3, CHANNELS, *HW, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(x)["heatmap_BKHW"]
    torch.testing.assert_close(net(x)["heatmap_BKHW"], ref, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def fetal_run(tmp_path_factory):
    """A one-step fetal-head run (UNet multi-task: mask + 4 landmarks + HC in mm), flip test on."""
    from data_pipelines.synthetic.hc18 import generate_hc18_dataset
    root = tmp_path_factory.mktemp("export_e2e")
    generate_hc18_dataset(root / "hc18", 8, seed=2, image_hw=(90, 120))
    run = root / "run"
    assert main(["train", "--no-test", "--config", "hc18_unet", "data.num_workers=0", "data.num_folds=4",
                 "log.progress=false", "log.tensorboard=false", "log.overlays=0", "data.synthetic=false",
                 f"data.root={root / 'hc18'}", "data.input_hw=[64, 96]", "data.sigma_px=2.0",
                 "model.name=unet_multitask", "model.args={width: 4, depth: 3, norm: gn}",
                 "model.criterion_args={num_classes: 2, balance: fixed}", "train.batch_size=2", "train.max_steps=1",
                 "train.eval_every=0", f"log.run_dir={run}", "eval.flip_test=true"]) == 0
    return root, run / "checkpoints" / "best.pt"


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _same_rows(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want) > 0 and [r["input"] for r in got] == [r["input"] for r in want]
    for g, w in zip(got, want):
        assert sorted(g) == sorted(w)
        for key, value in w.items():
            if key in ("input", "overlay"):
                continue
            if value in ("", None):
                assert g[key] in ("", None), key
            else:   # rows are rounded to 0.01: a 1e-5 difference may move the last digit
                assert abs(float(g[key]) - float(value)) <= 0.011, (key, g[key], value)


def test_export_and_predict_onnx_reproduce_predict_without_the_training_stack(fetal_run, tmp_path, capsys):
    root, ckpt = fetal_run
    images = root / "hc18" / "images"
    assert main(["predict", "--checkpoint", str(ckpt), str(images), "--out", str(tmp_path / "ref"),
                 "--overlays", "0"]) == 0
    want = _rows(tmp_path / "ref" / "predictions.csv")
    assert main(["export", "--checkpoint", str(ckpt), "--format", "onnx", "--dynamic-batch",
                 "--out", str(tmp_path / "model.onnx")]) == 0
    assert "matches PyTorch" in capsys.readouterr().out
    side = json.loads((tmp_path / "model.onnx.json").read_text())
    assert side["model"]["output_names"] == ["heatmap_BKHW", "seg_logits_BCHW"] and side["model"]["batch"] is None
    assert side["landmarks"]["names"] == ["ofd1", "ofd2", "bpd1", "bpd2"] and side["decode"]["flip_test"] is True
    assert side["preprocess"]["input_hw"] == [64, 96] and side["decode"]["task"] == "fetal_head"
    assert side["checkpoint"]["sha256"] == ex.sha256_file(ckpt)
    assert all(v <= 0 for b in ("batch1", "batch2") for k, v in side["verified"][b].items() if k.endswith("excess"))
    # a fresh process: predict --onnx, then which modules it loaded
    code = ("import sys, json\nfrom launch.cli import main\n"
            f"rc = main(['predict', '--onnx', {str(tmp_path / 'model.onnx')!r}, {str(images)!r}, '--out', "
            f"{str(tmp_path / 'onnx')!r}, '--overlays', '1', '--batch-size', '3'])\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('deepspeed',) or m.startswith('nvidia.dali') "
            "or m in ('engine.trainer', 'engine.run', 'engine.strategy_deepspeed')]\n"
            "print(json.dumps({'rc': rc, 'bad': bad, 'ort': 'onnxruntime' in sys.modules}))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {"rc": 0, "bad": [], "ort": True}
    got = _rows(tmp_path / "onnx" / "predictions.csv")
    assert Path(got[0]["overlay"]).is_file()
    _same_rows([{k: v for k, v in r.items() if k != "overlay"} for r in got], want)


def test_torchscript_export_at_a_fixed_batch_gives_the_same_rows(fetal_run, tmp_path):
    root, ckpt = fetal_run
    images = root / "hc18" / "images"
    assert main(["predict", "--checkpoint", str(ckpt), str(images), "--out", str(tmp_path / "ref"),
                 "--overlays", "0"]) == 0
    assert main(["export", "--checkpoint", str(ckpt), "--format", "torchscript", "--batch", "2",
                 "--out", str(tmp_path / "model.pt")]) == 0
    assert json.loads((tmp_path / "model.pt.json").read_text())["model"]["batch"] == 2
    assert main(["predict", "--onnx", str(tmp_path / "model.pt"), str(images), "--out", str(tmp_path / "ts"),
                 "--overlays", "0", "--batch-size", "3"]) == 0
    _same_rows(_rows(tmp_path / "ts" / "predictions.csv"), _rows(tmp_path / "ref" / "predictions.csv"))


def test_export_errors_are_one_line(fetal_run, tmp_path, capsys, monkeypatch):
    _, ckpt = fetal_run
    assert main(["export", "--checkpoint", str(tmp_path / "none.pt"), "--out", str(tmp_path / "m.onnx")]) == 2
    assert main(["export", "--checkpoint", str(ckpt), "--format", "tflite", "--out", str(tmp_path / "m.onnx")]) == 2
    monkeypatch.setitem(CANNOT_EXPORT, "unet_multitask", {"onnx": "a reason in one line"})
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "m.onnx")]) == 2
    assert main(["predict", "--onnx", str(tmp_path / "absent.onnx"), str(ckpt), "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"medpose export: error: {tmp_path / 'none.pt'}: checkpoint file not found",
                   "medpose export: error: unknown export format 'tflite' (choose from onnx, torchscript)",
                   "medpose export: error: unet_multitask cannot be exported to onnx: a reason in one line",
                   f"medpose predict: error: {tmp_path / 'absent.onnx.json'}: no sidecar beside absent.onnx "
                   f"(medpose export writes <model file>.json; predict needs it for preprocessing and decoding)"]
    assert not (tmp_path / "m.onnx").exists()


def test_an_export_that_disagrees_with_pytorch_is_refused_and_removed(fetal_run, tmp_path, monkeypatch):
    _, ckpt = fetal_run
    monkeypatch.setattr(ex, "tolerance", lambda name: -1.0)      # no difference, not even 0, is within -1
    with pytest.raises(ExportError, match="differs from PyTorch at batch 1"):
        ex.export_checkpoint(ckpt, tmp_path / "m.onnx", "onnx")
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "m.onnx.json").exists()

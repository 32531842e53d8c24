"""k-fold training and checkpoint ensembles (issue 18, part 2): `medpose train --folds` trains every fold in its own
run directory and scores the folds' ensemble on the shared test split; `eval` / `predict` take several checkpoints
(or a --folds base folder) and average the members' raw outputs per batch, after each member's flip test."""
import contextlib
import csv
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from engine.config import ConfigError, load_config
from engine.ensemble import Ensemble, average_outputs, resolve_checkpoints
from engine.evaluate import predict_batch
from engine.run import evaluate_checkpoint, evaluate_ensemble, load_for_inference
from launch.cli import main
from models.codecs import decode_outputs

COMMON = ["--config", "seg_zoo", "model.name=simple_unet", "model.args={num_classes: 2, base: 8}",
          "data.num_workers=0", "data.num_folds=2", "data.input_hw=[64, 96]", "data.synth_image_hw=[135, 200]",
          "log.progress=false", "log.tensorboard=false", "log.overlays=1", "train.batch_size=4", "optim.lr=2e-3",
          "train.max_steps=6", "train.eval_every=3", "train.ckpt_every=3", "train.log_every=3"]


@pytest.fixture(scope="module")
def hc18_root(tmp_path_factory):
    from data_pipelines.synthetic.hc18 import generate_hc18_dataset
    root = tmp_path_factory.mktemp("hc18")
    generate_hc18_dataset(root, 24, seed=5, image_hw=(135, 200))
    return root


@pytest.fixture(scope="module")
def folds_run(tmp_path_factory, hc18_root):
    """`medpose train --folds all` with 2 folds, once for the module: (base folder, console output)."""
    base = tmp_path_factory.mktemp("cv") / "base"
    import io
    from contextlib import redirect_stdout
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["train", *COMMON, f"data.root={hc18_root}", f"log.run_dir={base}", "--folds", "all"]) == 0
    return base, out.getvalue()


def _cfg(path: Path, *overrides):
    from engine.checkpoint import load_checkpoint_file
    return load_config(None, list(overrides), base=load_checkpoint_file(path)["client"]["config"])


def _members(base: Path) -> list[Path]:
    return [base / f"fold_{k}" / "checkpoints" / "best.pt" for k in (0, 1)]


def _batch(channels: int, hw, n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, channels, *hw, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------- (d) train --folds
def test_train_folds_all_writes_every_fold_folds_json_and_the_ensemble_report(folds_run):
    base, console = folds_run
    summary = json.loads((base / "folds.json").read_text())
    assert [e["fold"] for e in summary["folds"]] == [0, 1] and summary["num_folds"] == 2
    splits = [json.loads((base / f"fold_{k}" / "splits.json").read_text()) for k in (0, 1)]
    for k, (entry, split) in enumerate(zip(summary["folds"], splits)):
        run = base / f"fold_{k}"
        assert (run / "config.yaml").is_file() and load_config(run / "config.yaml").data.fold == k
        assert split["fold"] == k and entry["val_ids"] == split["val"]
        assert entry["checkpoint"] == str(run / "checkpoints" / "best.pt") and entry["checkpoint_kind"] == "best"
        assert entry["status"] == "trained" and entry["train_wall_time_s"] > 0 and entry["steps"] == 6
        assert entry["best_metric"] == "miou" and entry["best_step"] in (3, 6)
        assert entry["val"]["miou"] == entry["best_value"] and "dice" in entry["val"]
        assert (run / "figures" / "curve_loss.png").is_file()      # the fold's validation / training figures
        assert not (run / "report.json").exists()                  # no per-fold test report by default
    # the validation ids of the folds are disjoint and together cover every non-test id; the test split is shared
    val0, val1 = set(summary["folds"][0]["val_ids"]), set(summary["folds"][1]["val_ids"])
    assert val0 and val1 and not val0 & val1
    assert val0 | val1 == set(splits[0]["train"]) | set(splits[0]["val"])
    assert splits[0]["test"] == splits[1]["test"] and not (val0 | val1) & set(splits[0]["test"])
    # the ensemble of both folds' best checkpoints on the test split
    report = json.loads((base / "ensemble_test" / "report.json").read_text())
    assert report["run"]["checkpoints"] == [str(p) for p in _members(base)] and report["run"]["split"] == "test"
    assert report["figures"]["num_images"] == len(splits[0]["test"])
    assert summary["ensemble"]["checkpoints"] == report["run"]["checkpoints"]
    assert summary["ensemble"]["test"]["miou"] == report["miou"]
    assert summary["cv"]["per_fold"] == [e["best_value"] for e in summary["folds"]]
    assert "fold 0: val miou" in console and "fold 1: val miou" in console
    line = next(x for x in console.splitlines() if x.startswith("ensemble of 2 fold(s), test: "))
    assert f"miou {report['miou']:.4g}" in line and str(base / "ensemble_test" / "report.json") in console


def test_resume_auto_skips_finished_folds_and_rescores_the_ensemble(folds_run, hc18_root, tmp_path):
    base, _ = folds_run
    before = json.loads((base / "folds.json").read_text())
    mtimes = {p: p.stat().st_mtime_ns for p in _members(base)}
    assert main(["train", *COMMON, f"data.root={hc18_root}", f"log.run_dir={base}", "--folds", "all", "--resume",
                 "auto", "--no-test"]) == 0
    after = json.loads((base / "folds.json").read_text())
    assert [e["status"] for e in after["folds"]] == ["finished before"] * 2
    assert [e["train_wall_time_s"] for e in after["folds"]] == [e["train_wall_time_s"] for e in before["folds"]]
    assert [e["best_value"] for e in after["folds"]] == [e["best_value"] for e in before["folds"]]
    assert {p: p.stat().st_mtime_ns for p in _members(base)} == mtimes           # nothing retrained
    assert after["ensemble"] is None                                            # --no-test


def test_resume_auto_finishes_an_interrupted_fold(folds_run, hc18_root, tmp_path):
    """Fold 1 stopped after its step-3 checkpoint: --resume auto skips fold 0 and continues fold 1 from step 3."""
    import shutil
    base = tmp_path / "copy"
    shutil.copytree(folds_run[0], base)
    ckpts = base / "fold_1" / "checkpoints"
    (ckpts / "ckpt_step00000006.pt").unlink()
    (ckpts / "latest").write_text("ckpt_step00000003.pt\n")
    assert main(["train", *COMMON, f"data.root={hc18_root}", f"log.run_dir={base}", "--folds", "all", "--resume",
                 "auto"]) == 0
    summary = json.loads((base / "folds.json").read_text())
    assert [e["status"] for e in summary["folds"]] == ["finished before", "resumed"]
    assert summary["folds"][1]["steps"] == 6 and (ckpts / "ckpt_step00000006.pt").is_file()
    log = (base / "fold_1" / "train.log").read_text()
    assert "ckpt_step00000003.pt at step 3" in log
    assert json.loads((base / "ensemble_test" / "report.json").read_text())["run"]["checkpoints"] == \
        [str(base / f"fold_{k}" / "checkpoints" / "best.pt") for k in (0, 1)]


# --------------------------------------------------------------------------------- (a) an ensemble of one = the model
def test_ensemble_of_one_checkpoint_equals_the_single_model_exactly(folds_run, tmp_path):
    base, _ = folds_run
    ckpt = _members(base)[0]
    single = evaluate_checkpoint(_cfg(ckpt), ckpt, tmp_path / "single")
    one = evaluate_ensemble(_cfg(ckpt), [ckpt], tmp_path / "one")
    assert one["figures"] == single["figures"] and one["run"]["checkpoints"] == [str(ckpt)]
    assert (tmp_path / "one" / "per_image.jsonl").read_text() == (tmp_path / "single" / "per_image.jsonl").read_text()
    # and the CLI with one checkpoint writes what it always wrote
    assert main(["eval", "--checkpoint", str(ckpt), "--out", str(tmp_path / "cli")]) == 0
    cli = json.loads((tmp_path / "cli" / "report.json").read_text())
    assert cli["figures"] == single["figures"] and cli["run"]["checkpoint"] == str(ckpt)
    assert "checkpoints" not in cli["run"]
    # predict_batch: an Ensemble of one model gives that model's tensors unchanged
    model, cfg, task, state = load_for_inference(ckpt)
    image = _batch(state["preprocess"].channels, cfg.data.input_hw)
    decode = task.decoder(cfg)
    a, _ = predict_batch(model, image, decode, contextlib.nullcontext)
    b, _ = predict_batch(Ensemble([model], [ckpt]), image, decode, contextlib.nullcontext)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------- (b) two checkpoints: the mean of their outputs
def test_two_checkpoints_average_their_outputs_and_score_differently(folds_run, tmp_path):
    base, _ = folds_run
    p0, p1 = _members(base)
    (m0, cfg, task, state), (m1, *_) = load_for_inference(p0), load_for_inference(p1)
    image = _batch(state["preprocess"].channels, cfg.data.input_hw)
    decode = task.decoder(cfg)
    o0, _ = predict_batch(m0, image, decode, contextlib.nullcontext)
    o1, _ = predict_batch(m1, image, decode, contextlib.nullcontext)
    ens, preds = predict_batch(Ensemble([m0, m1], [p0, p1]), image, decode, contextlib.nullcontext)
    assert ens.keys() == o0.keys() == o1.keys() and "seg_logits_BCHW" in ens
    for key in ens:
        assert torch.allclose(ens[key], (o0[key] + o1[key]) / 2, rtol=1e-6, atol=1e-6), key
        assert not torch.allclose(ens[key], o0[key]) and not torch.allclose(ens[key], o1[key])
    # decoding sees the averaged dict (the same decode of the mean)
    expect = decode({k: (o0[k] + o1[k]) / 2 for k in o0})
    assert all(torch.equal(preds[k], expect[k]) for k in expect if torch.is_tensor(expect[k]))
    # Ensemble.forward (raw outputs, as report overlays call it) is the same mean
    with torch.no_grad():
        fwd = Ensemble([m0, m1]).eval()(image)
    assert torch.allclose(fwd["seg_logits_BCHW"], ens["seg_logits_BCHW"], rtol=1e-6, atol=1e-6)

    # evaluated: the ensemble's figures are neither member's, and report.json lists the members
    figs = [evaluate_checkpoint(_cfg(p), p, tmp_path / f"m{i}")["figures"] for i, p in enumerate((p0, p1))]
    rep = evaluate_checkpoint(_cfg(p0), [p0, p1], tmp_path / "ens")
    assert rep["run"]["checkpoints"] == [str(p0), str(p1)] and rep["run"]["ensemble_size"] == 2
    assert rep["figures"]["num_images"] == figs[0]["num_images"]
    assert rep["figures"] != figs[0] and rep["figures"] != figs[1]
    assert rep["figures"]["loss"] not in (figs[0]["loss"], figs[1]["loss"])
    # the CLI: repeated --checkpoint, and the --folds base folder, give the same ensemble (= the one train wrote)
    trained = json.loads((base / "ensemble_test" / "report.json").read_text())
    assert main(["eval", "--checkpoint", str(p0), "--checkpoint", str(p1), "--out", str(tmp_path / "cli2")]) == 0
    assert main(["eval", "--checkpoint", str(base), "--out", str(tmp_path / "cli_base")]) == 0
    for out in ("cli2", "cli_base"):
        got = json.loads((tmp_path / out / "report.json").read_text())
        assert got["figures"] == rep["figures"] == trained["figures"], out
        assert got["run"]["checkpoints"] == [str(p0), str(p1)]
    assert resolve_checkpoints([base]) == [p0, p1]


def test_predict_with_an_ensemble_writes_the_averaged_prediction(folds_run, hc18_root, tmp_path):
    base, _ = folds_run
    images = sorted((hc18_root / "images").glob("*.png"))[:2]
    rows = {}
    for name, ckpts in (("f0", ["--checkpoint", str(_members(base)[0])]), ("base", ["--checkpoint", str(base)]),
                        ("both", [a for p in _members(base) for a in ("--checkpoint", str(p))])):
        assert main(["predict", *ckpts, *map(str, images), "--out", str(tmp_path / name), "--overlays", "0"]) == 0
        with open(tmp_path / name / "predictions.csv", newline="") as fh:
            rows[name] = list(csv.DictReader(fh))
    assert rows["base"] == rows["both"] and len(rows["both"]) == 2
    # and the rows are those of the averaged logits, decoded like one model's
    from data_pipelines.predict_input import load_for_predict
    from engine.evaluate import sample_prediction
    models = [load_for_inference(p) for p in _members(base)]
    _, cfg, task, state = models[0]
    item = load_for_predict(images[0], cfg.data, state["info"], state["preprocess"])
    x = torch.as_tensor(item["input_CHW"])[None].float()
    outs = [predict_batch(m, x, task.decoder(cfg), contextlib.nullcontext)[0] for m, *_ in models]
    mean = {k: (outs[0][k] + outs[1][k]) / 2 for k in outs[0]}
    pred = sample_prediction(mean, task.decoder(cfg)(mean), 0, item["to_input_3x3"], item["image_HW3"].shape[:2])
    assert int(rows["both"][0]["head_area_px"]) == int((pred["mask_HW"] > 0).sum())


# --------------------------------------------------------------------------- (c) flip test and ensembling compose
class _Toy(nn.Module):
    """Outputs that are not mirror-symmetric and differ between instances: heatmaps, seg logits, points, a list."""

    def __init__(self, seed: int, k: int = 3):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(k, 3, generator=g))
        self.ramp = float(seed + 1)

    def forward(self, image_BCHW):
        b, c, h, w = image_BCHW.shape
        maps = torch.einsum("kc,bchw->bkhw", self.w, image_BCHW) + self.ramp * torch.arange(w, dtype=torch.float32)
        pts = torch.stack([maps.mean((2, 3)) * 3 + 5, maps.amax((2, 3))], -1)
        return {"heatmap_BKHW": maps, "seg_logits_BCHW": maps[:, :2] * 2, "kpts_px_BK2": pts,
                "heatmaps_SBKHW": torch.stack([maps, maps * 0.5]), "aux_list": [maps[:, :1], pts]}


@pytest.mark.parametrize("pairs", [(), ((0, 2),)])
def test_flip_test_and_ensemble_compose(pairs):
    image = _batch(3, (8, 12), n=2, seed=4)
    models = [_Toy(1), _Toy(7), _Toy(11)]
    decode = lambda out: decode_outputs(out, method="argmax", peak=1.0)
    each = [predict_batch(m, image, decode, contextlib.nullcontext, flip_pairs=pairs)[0] for m in models]
    plain = [predict_batch(m, image, decode, contextlib.nullcontext)[0] for m in models]
    ens, preds = predict_batch(Ensemble(models), image, decode, contextlib.nullcontext, flip_pairs=pairs)
    for key in ("heatmap_BKHW", "seg_logits_BCHW", "kpts_px_BK2"):
        want = (each[0][key] + each[1][key] + each[2][key]) / 3
        assert torch.allclose(ens[key], want, rtol=1e-6, atol=1e-5), key
        # the flip test really did something: not the mean of the plain outputs
        assert not torch.allclose(ens[key], (plain[0][key] + plain[1][key] + plain[2][key]) / 3), key
    want = (each[0]["heatmaps_SBKHW"] + each[1]["heatmaps_SBKHW"] + each[2]["heatmaps_SBKHW"]) / 3
    assert torch.allclose(ens["heatmaps_SBKHW"], want, rtol=1e-6, atol=1e-5)
    for i in range(2):          # a list output (no flip rule: the plain pass's) is averaged item by item
        want = (plain[0]["aux_list"][i] + plain[1]["aux_list"][i] + plain[2]["aux_list"][i]) / 3
        assert torch.allclose(ens["aux_list"][i], want, rtol=1e-6, atol=1e-5)
    assert torch.equal(preds["kpts_px_BK2"], decode(ens)["kpts_px_BK2"])


def test_flip_test_ensemble_evaluation_on_checkpoints(folds_run, tmp_path):
    """eval.flip_test=true with an ensemble: the figures of the ensemble differ from the plain ensemble's, and
    Ensemble predict_batch equals the mean of each real model's flip-averaged seg logits."""
    base, _ = folds_run
    p0, p1 = _members(base)
    (m0, cfg, task, state), (m1, *_) = load_for_inference(p0), load_for_inference(p1)
    image = _batch(state["preprocess"].channels, cfg.data.input_hw, seed=3)
    decode = task.decoder(cfg)
    f = [predict_batch(m, image, decode, contextlib.nullcontext, flip_pairs=())[0] for m in (m0, m1)]
    ens, _ = predict_batch(Ensemble([m0, m1]), image, decode, contextlib.nullcontext, flip_pairs=())
    assert torch.allclose(ens["seg_logits_BCHW"], (f[0]["seg_logits_BCHW"] + f[1]["seg_logits_BCHW"]) / 2,
                          rtol=1e-6, atol=1e-6)
    flip = evaluate_checkpoint(_cfg(p0, "eval.flip_test=true"), [p0, p1], tmp_path / "flip")
    plain = json.loads((base / "ensemble_test" / "report.json").read_text())
    assert flip["figures"]["num_images"] == plain["figures"]["num_images"]
    assert flip["figures"]["loss"] != plain["figures"]["loss"]


# ------------------------------------------------------------------------------------------------------ (e) errors
@pytest.mark.parametrize("folds,message", [
    ("0,2", "fold 2 is outside [0, data.num_folds=2)"),
    ("-1", "fold -1 is outside [0, data.num_folds=2)"),
    ("one", "give 'all' or fold indices"),
])
def test_bad_fold_index_is_a_clear_error(folds, message, tmp_path, hc18_root, capsys):
    run = tmp_path / "never"
    assert main(["train", *COMMON, f"data.root={hc18_root}", f"log.run_dir={run}", "--folds", folds]) == 2
    assert message in capsys.readouterr().err
    assert not run.exists()


def test_folds_with_a_resume_path_is_refused(tmp_path, hc18_root, capsys):
    assert main(["train", *COMMON, f"data.root={hc18_root}", f"log.run_dir={tmp_path / 'r'}", "--folds", "all",
                 "--resume", str(tmp_path / "x.pt")]) == 2
    assert "only --resume auto is supported" in capsys.readouterr().err


def _forged(src: Path, dst: Path, **data) -> Path:
    """A copy of checkpoint `src` whose stored config says other data.* values."""
    from engine.checkpoint import load_checkpoint_file
    ckpt = load_checkpoint_file(src)
    ckpt["client"]["config"]["data"].update(data)
    torch.save(ckpt, dst)
    return dst


def test_mismatched_members_name_both_files_and_the_field(folds_run, tmp_path, hc18_root, capsys):
    base, _ = folds_run
    p0 = _members(base)[0]
    other = _forged(p0, tmp_path / "other_hw.pt", input_hw=[96, 96])
    assert main(["eval", "--checkpoint", str(p0), "--checkpoint", str(other), "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert "data.input_hw" in err and str(p0) in err and str(other) in err
    image = sorted((hc18_root / "images").glob("*.png"))[0]
    assert main(["predict", "--checkpoint", str(p0), "--checkpoint", str(other), str(image), "--out",
                 str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert "data.input_hw" in err and str(p0) in err and str(other) in err
    task = _forged(p0, tmp_path / "other_task.pt", task="landmarks")
    with pytest.raises(ConfigError, match=r"data\.task.*other_task\.pt"):
        from engine.ensemble import load_ensemble
        load_ensemble([p0, task])


def test_a_model_override_on_an_ensemble_eval_is_refused(folds_run, tmp_path, capsys):
    """Each member is built from its own checkpoint, so model.name / model.args given to an ensemble evaluation would
    be silently void: refused, naming the field, both values and the first member."""
    base, _ = folds_run
    p0 = _members(base)[0]
    out = tmp_path / "e"
    assert main(["eval", "--checkpoint", str(base), "--out", str(out), "model.args={num_classes: 2, base: 16}"]) == 2
    err = capsys.readouterr().err
    assert "model.args={'num_classes': 2, 'base': 16" in err and "'base': 8" in err and str(p0) in err
    assert not (out / "report.json").exists()


def test_outputs_that_differ_are_named():
    a = {"heatmap_BKHW": torch.zeros(1, 3, 4, 4)}
    with pytest.raises(ConfigError, match=r"output keys: a\.pt gives \['heatmap_BKHW'\], b\.pt gives"):
        average_outputs([a, {"seg_logits_BCHW": torch.zeros(1, 2, 4, 4)}], ["a.pt", "b.pt"])
    with pytest.raises(ConfigError, match=r"output 'heatmap_BKHW': a\.pt gives shape \(1, 3, 4, 4\), b\.pt gives"):
        average_outputs([a, {"heatmap_BKHW": torch.zeros(1, 3, 2, 2)}], ["a.pt", "b.pt"])


def test_an_exported_ensemble_is_the_mean_of_its_members_and_predicts_as_predict_does(folds_run, hc18_root,
                                                                                        tmp_path, capsys):
    """`export --checkpoint BASE` (a folds folder) writes one ONNX graph averaging both folds: its outputs are the
    mean of the members' (not either member's), the sidecar lists both with their sha256, and `predict --onnx` gives
    the rows of `predict --checkpoint BASE`."""
    pytest.importorskip("onnxruntime")
    from engine import export as ex
    base, _ = folds_run
    p0, p1 = _members(base)
    model_file = tmp_path / "cv.onnx"
    assert main(["export", "--checkpoint", str(base), "--dynamic-batch", "--out", str(model_file)]) == 0
    assert "(ensemble of 2: simple_unet, simple_unet, onnx" in capsys.readouterr().out
    side = json.loads((tmp_path / "cv.onnx.json").read_text())
    assert [m["file"] for m in side["ensemble"]["members"]] == [str(p0), str(p1)]
    assert [m["sha256"] for m in side["ensemble"]["members"]] == [ex.sha256_file(p0), ex.sha256_file(p1)]
    assert side["checkpoint"]["sha256"] == ex.sha256_file(p0)
    # the graph's logits are the members' mean, far from either member alone
    (m0, _, _, state), (m1, *_) = (load_for_inference(p) for p in (p0, p1))
    x = _batch(state["preprocess"].channels, (64, 96), n=2, seed=7)
    with torch.no_grad():
        l0, l1 = (m(x)["seg_logits_BCHW"].numpy() for m in (m0, m1))
    got = ex.load_exported(model_file)(x.numpy())["seg_logits_BCHW"]
    mean = (l0 + l1) / 2
    assert abs(got - mean).max() < 1e-4 * (1 + abs(mean).max())
    assert abs(l0 - l1).max() > 100 * abs(got - mean).max()
    # predict --onnx == predict --checkpoint BASE
    images = sorted((hc18_root / "images").glob("*.png"))[:3]
    for name, src in (("ref", ["--checkpoint", str(base)]), ("onnx", ["--onnx", str(model_file)])):
        assert main(["predict", *src, *map(str, images), "--out", str(tmp_path / name), "--overlays", "0"]) == 0
    rows = {}
    for name in ("ref", "onnx"):
        with open(tmp_path / name / "predictions.csv", newline="") as fh:
            rows[name] = list(csv.DictReader(fh))
    assert len(rows["ref"]) == 3 and [r["input"] for r in rows["onnx"]] == [r["input"] for r in rows["ref"]]
    for got_row, want_row in zip(rows["onnx"], rows["ref"]):
        for key, value in want_row.items():
            if key not in ("input", "overlay") and value not in ("", None):
                assert abs(float(got_row[key]) - float(value)) <= 0.011 * max(1.0, abs(float(value)) / 100), key


def _predict_rows(tmp_path: Path, name: str, src: list[str], images) -> list[dict]:
    assert main(["predict", *src, *map(str, images), "--out", str(tmp_path / name), "--overlays", "0"]) == 0
    with open(tmp_path / name / "predictions.csv", newline="") as fh:
        return [{k: v for k, v in r.items() if k != "overlay"} for r in csv.DictReader(fh)]


def test_an_exported_ensemble_with_the_flip_test_predicts_as_the_checkpoints_do(folds_run, hc18_root, tmp_path):
    """Members whose config asks for the flip test: predict --onnx (flip test on the graph's mean) gives the rows of
    predict --checkpoint (each member flip-averaged, then averaged), and they differ from the rows without it."""
    pytest.importorskip("onnxruntime")
    from engine.checkpoint import load_checkpoint_file
    base, _ = folds_run
    flipped = []
    for k, src in enumerate(_members(base)):
        ckpt = load_checkpoint_file(src)
        ckpt["client"]["config"]["data"]["flip_p"] = 0.5
        ckpt["client"]["config"]["eval"]["flip_test"] = True
        torch.save(ckpt, tmp_path / f"flip_{k}.pt")
        flipped.append(str(tmp_path / f"flip_{k}.pt"))
    assert main(["export", *[a for f in flipped for a in ("--checkpoint", f)], "--out", str(tmp_path / "f.onnx"),
                 "--batch", "2"]) == 0
    assert json.loads((tmp_path / "f.onnx.json").read_text())["decode"]["flip_test"] is True
    images = sorted((hc18_root / "images").glob("*.png"))[:3]
    want = _predict_rows(tmp_path, "ref", [a for f in flipped for a in ("--checkpoint", f)], images)
    got = _predict_rows(tmp_path, "onnx", ["--onnx", str(tmp_path / "f.onnx")], images)
    plain = _predict_rows(tmp_path, "plain", ["--checkpoint", str(base)], images)
    assert [r["input"] for r in got] == [r["input"] for r in want] and len(want) == 3
    numeric = [k for k in want[0] if k != "input" and want[0][k] not in ("", None)]
    for g, w in zip(got, want):
        for key in numeric:
            assert abs(float(g[key]) - float(w[key])) <= 0.011 * max(1.0, abs(float(w[key])) / 100), key
    assert any(abs(float(p[k]) - float(w[k])) > 0.5 for p, w in zip(plain, want) for k in numeric)


def test_export_of_an_ensemble_stops_on_a_member_that_cannot_be_exported(folds_run, tmp_path, capsys, monkeypatch):
    from engine import export as ex
    base, _ = folds_run
    monkeypatch.setitem(ex.CANNOT_EXPORT, "simple_unet", {"onnx": "a reason in one line"})
    assert main(["export", "--checkpoint", str(base), "--out", str(tmp_path / "m.onnx")]) == 2
    assert capsys.readouterr().err.strip() == ("medpose export: error: simple_unet cannot be exported to onnx: "
                                               "a reason in one line")
    assert not (tmp_path / "m.onnx").exists()


# ------------------------------------------------------------------------------------- the base folder; under torchrun
def test_base_is_runs_root_name_suffixed_unless_resuming(tmp_path):
    from engine.dist import DistInfo
    from engine.folds import folds_base
    from engine.strategies import build_strategy
    single = build_strategy("single", DistInfo())
    cfg = load_config(None, [f"log.runs_root={tmp_path}", "log.name=cv"])
    assert folds_base(cfg, single, resuming=False) == tmp_path / "cv"
    (tmp_path / "cv" / "fold_0").mkdir(parents=True)
    assert folds_base(cfg, single, resuming=False) == tmp_path / "cv-2"
    assert folds_base(cfg, single, resuming=True) == tmp_path / "cv"
    given = load_config(None, [f"log.runs_root={tmp_path}", "log.name=cv", f"log.run_dir={tmp_path / 'cv'}"])
    assert folds_base(given, single, resuming=False) == tmp_path / "cv"


def test_folds_under_two_ranks(tmp_path, hc18_root):
    """torchrun, 2 ranks: every rank loops the folds; the ensemble's test figures (sharded over the ranks) equal the
    single-process evaluation of the same checkpoints."""
    from _dist_utils import torchrun
    base = tmp_path / "base"
    proc = torchrun(["-m", "launch.cli", "train", *COMMON, f"data.root={hc18_root}", f"log.run_dir={base}",
                     "train.max_steps=2", "train.eval_every=2", "train.batch_size=2", "--folds", "all"], nproc=2)
    summary = json.loads((base / "folds.json").read_text())
    assert [e["fold"] for e in summary["folds"]] == [0, 1] and [e["steps"] for e in summary["folds"]] == [2, 2]
    report = json.loads((base / "ensemble_test" / "report.json").read_text())
    assert report["run"]["world_size"] == 2 and report["run"]["checkpoints"] == summary["ensemble"]["checkpoints"]
    assert proc.stdout.count("ensemble of 2 fold(s), test:") == 1              # rank 0 prints
    members = [Path(p) for p in report["run"]["checkpoints"]]
    alone = evaluate_checkpoint(_cfg(members[0]), members, tmp_path / "alone")
    for key, value in alone["figures"].items():
        if key == "loss":       # the loss is a per-batch figure, and the ranks' batches are not one process's
            continue
        assert report["figures"][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key

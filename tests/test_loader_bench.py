"""benchmarks/loader_bench.py runs end to end in --quick mode (torch providers, and DALI's CPU pipeline when DALI is
installed), writes the rows it promises, keeps going when one provider fails, and computes its ratios right."""
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "loader_bench.py"
HAVE_DALI = importlib.util.find_spec("nvidia.dali") is not None
HAVE_CV2 = importlib.util.find_spec("cv2") is not None


@pytest.fixture(scope="module")
def lb():
    spec = importlib.util.spec_from_file_location("loader_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load(out: Path) -> dict:
    return json.loads((out / "loader_bench.json").read_text())


@pytest.mark.skipif(not HAVE_CV2, reason="opencv-python is not installed")
def test_quick_run_writes_every_row_with_consistent_numbers(lb, tmp_path, capsys):
    providers = "torch-pil,torch-cv2" + (",dali-cpu" if HAVE_DALI else "")
    out = tmp_path / "res"
    assert lb.main(["--quick", "--providers", providers, "--out", str(out), "--steps", "1"]) == 0
    data = _load(out)
    meta, rows = data["meta"], data["rows"]
    assert meta["cpu_count"] == os.cpu_count() and meta["torch"] == torch.__version__
    if not torch.cuda.is_available():
        assert meta["device"].startswith("CPU") and f"({os.cpu_count()} cores)" in meta["device"]
    assert meta["dali"] is None or meta["dali"][0].isdigit()

    thr = {r["provider"]: r for r in rows if r["section"] == "throughput"}
    expected = {"torch-pil-w0", "torch-pil-w2", "torch-cv2-w0", "torch-cv2-w2"}
    if HAVE_DALI:
        expected |= {"dali-cpu-t1", "dali-cpu-t2"}
    assert set(thr) == expected
    for name, r in thr.items():
        assert "error" not in r, (name, r.get("error"))
        assert (r["size"], r["format"], r["batch"], r["epochs"]) == ("128x160", "png", 8, 2)
        assert r["samples"] == 2 * (16 // 8) * 8            # 2 timed epochs of 2 full batches of 8
        assert r["samples_per_s"] > 0
        assert r["samples_per_s"] == pytest.approx(r["samples"] / r["seconds"])
        assert len(r["epoch_s"]) == 2 and sum(r["epoch_s"]) == pytest.approx(r["seconds"])
        assert r["batch_shape"] == [8, 3, 128, 160]
        assert len(r["first_batch_s"]) == 2 and all(0 < f < e for f, e in zip(r["first_batch_s"], r["epoch_s"]))
        after = (r["samples"] - 2 * 8) / (r["seconds"] - sum(r["first_batch_s"]))   # the 2nd batch of each epoch
        assert r["after_first_samples_per_s"] == pytest.approx(after)
    for w in (0, 2):                                           # same sampler: both decoders saw the same samples
        assert thr[f"torch-pil-w{w}"]["samples"] == thr[f"torch-cv2-w{w}"]["samples"]
    assert thr["torch-pil-w2"]["workers"] == 2 and thr["torch-pil-w2"]["decoder"] == "pil"
    assert thr["torch-cv2-w0"]["decoder"] == "cv2"
    base = thr["torch-pil-w2"]["samples_per_s"]
    assert thr["torch-pil-w2"]["speedup_vs_baseline"] == pytest.approx(1.0)
    for r in thr.values():
        assert r["speedup_vs_baseline"] == pytest.approx(r["samples_per_s"] / base)

    steps = {r["provider"]: r for r in rows if r["section"] == "step"}
    assert set(steps) == {"in-memory"} | expected
    mem = steps["in-memory"]
    assert mem["ratio_to_in_memory"] == pytest.approx(1.0) and mem["model"] == "demo"
    for name, r in steps.items():
        assert "error" not in r, (name, r.get("error"))
        assert r["ms_per_step"] > 0 and r["steps"] == 1 and r["size"] == "128x160"
        assert r["ratio_to_in_memory"] == pytest.approx(r["ms_per_step"] / mem["ms_per_step"])
        assert r["samples_per_s"] == pytest.approx(8e3 / r["ms_per_step"])
        assert r["params"] == mem["params"] and r["precision"] == ("bf16" if torch.cuda.is_available() else "fp32")

    printed = capsys.readouterr().out
    md = (out / "loader_bench.md").read_text()
    assert md in printed
    line = next(ln for ln in md.splitlines() if ln.startswith("| torch-pil-w2 | 128x160 | png | 2 | 32 |"))
    assert "| 1.00x |" in line and line.count("|") == 11
    assert "| in-memory | 128x160 | - |" in md and "| 1.00 |" in md


def test_a_failing_provider_records_its_error_and_the_run_goes_on(lb, tmp_path, monkeypatch):
    real = lb.HipDataset

    def flaky(files, **kw):
        if kw.get("image_decoder") == "cv2":
            raise RuntimeError("decoder exploded")
        return real(files, **kw)

    monkeypatch.setattr(lb, "HipDataset", flaky)
    out = tmp_path / "res"
    argv = ["--quick", "--providers", "torch-cv2,torch-pil,dali-gpu", "--workers", "0", "--steps", "0",
            "--n-images", "8", "--out", str(out)]
    assert lb.main(argv) == 0
    rows = {r["provider"]: r for r in _load(out)["rows"]}
    assert rows["torch-cv2-w0"]["error"] == "RuntimeError: decoder exploded"
    assert "samples_per_s" not in rows["torch-cv2-w0"]
    assert rows["torch-pil-w0"]["samples"] == 2 * 8 and rows["torch-pil-w0"]["samples_per_s"] > 0
    if not (HAVE_DALI and torch.cuda.is_available()):
        assert rows["dali-gpu-t1"]["skipped"] in ("no CUDA device",
                                                  "nvidia.dali is not installed (pip install nvidia-dali-cuda130)")
    assert all(r["section"] == "throughput" for r in rows.values())      # --steps 0: no step section
    md = (out / "loader_bench.md").read_text()
    assert "| torch-cv2-w0 | 128x160 | png | 0 | error: RuntimeError: decoder exploded |" in md


def test_ratios_and_markdown_from_rows(lb):
    def thr(provider, size, fmt, sps, workers=2):
        return dict(section="throughput", provider=provider, size=size, format=fmt, workers=workers, threads=None,
                    samples=64, seconds=64 / sps, samples_per_s=sps)

    rows = [thr("torch-pil-w2", "384x512", "png", 100.0), thr("torch-cv2-w2", "384x512", "png", 150.0),
            thr("torch-pil-w2", "384x512", "jpg", 200.0), thr("torch-cv2-w2", "384x512", "jpg", 300.0),
            thr("torch-pil-w16", "256x256", "png", 500.0, workers=16),      # no w2 baseline at this size
            dict(section="throughput", provider="dali-gpu-t2", size="384x512", format="png", workers=None,
                 threads=2, error="RuntimeError: no"),
            dict(section="step", provider="in-memory", size="384x512", format="-", batch=8, model="published",
                 steps=20, warmup_steps=3, ms_per_step=100.0, samples_per_s=80.0, params=1e6, precision="bf16"),
            dict(section="step", provider="torch-pil-w2", size="384x512", format="png", batch=8, model="published",
                 steps=20, warmup_steps=3, ms_per_step=250.0, samples_per_s=32.0, params=1e6, precision="bf16")]
    lb.add_ratios(rows)
    assert [r.get("speedup_vs_baseline") for r in rows[:5]] == [1.0, 1.5, 1.0, 1.5, None]
    assert rows[6]["ratio_to_in_memory"] == 1.0 and rows[7]["ratio_to_in_memory"] == 2.5
    meta = dict(device="GPU X", date="d", cpu="c", torch="t", dali="2.4", opencv="5", pillow="13", numba="0",
                args=dict(n_images=64, batch=8, epochs=3))
    md = lb.markdown(meta, rows)
    assert "| torch-cv2-w2 | 384x512 | jpg | 2 | 64 | 0.213 | 300.0 | 1.50x |" in md
    assert "| torch-pil-w16 | 256x256 | png | 16 | 64 | 0.128 | 500.0 |  |" in md
    assert "| dali-gpu-t2 | 384x512 | png | 2 | error: RuntimeError: no |" in md
    assert "| torch-pil-w2 | 384x512 | png | 250.0 | 32.0 | 2.50 |" in md
    assert "published MultiHipPoseNet, 1.00 M parameters, bf16, batch 8, 20 timed steps after 3" in md


def test_arguments_and_defaults(lb):
    cpu = torch.device("cpu")
    args = lb.resolve_args([], cpu)
    assert args.size_list == [(384, 512), (256, 256)] and args.format_list == ["png", "jpg"]
    assert args.worker_list == list(dict.fromkeys([2, os.cpu_count()]))
    assert args.thread_list == args.worker_list and args.n_images == 64 and args.epochs == 3
    assert (args.model, args.step_hw) == ("demo", (128, 160))
    assert lb.resolve_args([], torch.device("cuda", 0)).step_hw == (384, 512)
    quick = lb.resolve_args(["--quick", "--workers", "0,3,3"], cpu)
    assert quick.worker_list == [0, 3] and quick.thread_list == [1, 3] and quick.format_list == ["png"]
    assert quick.size_list == [(128, 160)] and quick.n_images == 16 and quick.steps == 2
    assert lb.parse_hw_list("384x512, 256X256") == [(384, 512), (256, 256)]
    assert lb.sigma_for((384, 512)) == 7.0 and lb.sigma_for((256, 256)) == 3.5 and lb.sigma_for((128, 160)) == 2.188
    for bad in (["--sizes", "384by512"], ["--providers", "torch-turbo"], ["--format", "gif"],
                ["--n-images", "4", "--batch", "8"], ["--workers", "-1"]):
        with pytest.raises(SystemExit) as err:
            lb.resolve_args(bad, cpu)
        assert err.value.code == 2


def test_summary_pivots_providers_per_size_and_format():
    spec = importlib.util.spec_from_file_location("loader_summary", SCRIPT.with_name("loader_summary.py"))
    summary = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summary)

    def thr(provider, fmt, sps):
        return dict(section="throughput", provider=provider, size="384x512", format=fmt, samples_per_s=sps)

    rows = [thr("dali-gpu-t4", "png", 800.0), thr("torch-pil-w16", "png", 300.0), thr("torch-pil-w2", "png", 100.0),
            thr("torch-cv2-w2", "png", 120.0), thr("torch-pil-w2", "jpg", 90.0),
            dict(section="throughput", provider="dali-cpu-t2", size="384x512", format="png", error="Boom: x"),
            dict(section="step", provider="in-memory", size="384x512", format="-", ms_per_step=200.0),
            dict(section="step", provider="dali-gpu-t4", size="384x512", format="png", ms_per_step=210.0)]
    meta = dict(device="GPU X", cpu="c", torch="t", dali="2.4")
    lines = summary.summarize(dict(meta=meta, rows=rows), "run.json")
    assert "| size | format | torch-pil-w2 | torch-pil-w16 | torch-cv2-w2 | dali-gpu-t4 |" in lines
    assert "| 384x512 | png | 100 (1.00x) | 300 (3.00x) | 120 (1.20x) | 800 (8.00x) |" in lines
    assert "| 384x512 | jpg | 90 (1.00x) | - | - | - |" in lines
    assert "| dali-gpu-t4 | 384x512 | png | 210.0 | 1.05 |" in lines
    assert lines[-1] == "failed: dali-cpu-t2 384x512 png: Boom: x"

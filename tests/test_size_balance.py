"""data.size_balance: object sizes, per-bin repeat counts, and the training set build_data makes from them."""
import json
import math

import numpy as np
import pytest

from data_pipelines.errors import OptionError
from data_pipelines.records import ImageSource, MaskSource, Record
from data_pipelines.size_balance import balance_by_size, object_size, size_repeats


def _rec(i, pts=None, spacing=None, polygons=None):
    pts = np.zeros((0, 2), np.float32) if pts is None else np.asarray(pts, np.float32)
    return Record(id=i, where=f"ann.csv", entry=f"row {i}", image=ImageSource(name=i), hw=(100, 100),
                  kpts_px_K2=pts, kpts_visible_K=np.ones(len(pts), bool),
                  mask=None if polygons is None else MaskSource(polygons=polygons),
                  spacing_mm=None if spacing is None else np.asarray(spacing, np.float64))


def test_object_size_from_landmarks_polygons_and_spacing():
    # axis ends of an ellipse with semi-axes 30 and 20 px: RMS distance from the centre sqrt((900+900+400+400)/4)
    ends = [[20, 50], [80, 50], [50, 30], [50, 70]]
    assert object_size(_rec("a", ends)) == pytest.approx((math.sqrt(650), "px"))
    assert object_size(_rec("a", ends, spacing=[0.2, 0.2])) == pytest.approx((0.2 * math.sqrt(650), "mm"))
    # anisotropic spacing: the geometric mean of the two
    assert object_size(_rec("a", ends, spacing=[0.1, 0.4]))[0] == pytest.approx(0.2 * math.sqrt(650))
    # no landmarks: the square root of the foreground polygons' area (a 10 x 40 rectangle; background polygons ignored)
    rect = np.array([[0, 0], [40, 0], [40, 10], [0, 10]], float)
    assert object_size(_rec("b", polygons=[(1, rect), (0, rect * 2)], spacing=[0.5, 0.5])) == \
        pytest.approx((0.5 * 20.0, "mm"))
    assert object_size(_rec("c")) is None
    assert object_size(_rec("d", [[5, 5]])) is None              # one landmark has no spread


def test_size_repeats_per_bin():
    sizes = [1.0] * 8 + [2.0] * 2 + [4.0]
    # two log bins: [1, 2) holds 8, [2, 4] holds 3 -> the rare bin repeated round(8 / 3) = 3 times
    reps, summary = size_repeats(sizes, power=1.0, max_repeat=4, bins=2)
    assert reps == [1] * 8 + [3] * 3
    assert summary["counts"] == [8, 3] and summary["repeats"] == [1, 3]
    assert summary["edges"] == pytest.approx([1.0, 2.0, 4.0])
    assert size_repeats(sizes, 0.5, 4, bins=2)[0] == [1] * 8 + [2] * 3      # round(sqrt(8 / 3)) = 2
    assert size_repeats(sizes, 1.0, 2, bins=2)[0] == [1] * 8 + [2] * 3      # capped
    assert size_repeats(sizes, 0.0, 4, bins=2)[0] == [1] * 11               # off
    assert size_repeats([3.0, 3.0], 1.0, 4)[0] == [1, 1]                    # one size: nothing to balance


def test_balance_by_size_multiplies_existing_repeats_and_names_sizeless_samples():
    big = [[0, 0], [40, 0]]
    small = [[0, 0], [10, 0]]
    records = {f"b{i}": _rec(f"b{i}", big) for i in range(6)}
    records.update({f"s{i}": _rec(f"s{i}", small) for i in range(2)})
    ids = [f"b{i}" for i in range(6)] + ["s0", "s0", "s1"]        # s0 already repeated twice (stratum rule)
    out = balance_by_size(ids, records, power=1.0, max_repeat=4, where="ann.csv", bins=2)
    assert out.count("s0") == 6 and out.count("s1") == 3 and all(out.count(f"b{i}") == 1 for i in range(6))
    assert balance_by_size(ids, records, 0.0, 4, "ann.csv") == ids
    records["s1"] = _rec("s1")
    with pytest.raises(OptionError, match=r"sample 's1' \(ann.csv row s1\).*data.size_balance=0"):
        balance_by_size(ids, records, 1.0, 4, "ann.csv")


def test_config_checks_the_keys():
    from engine.config import ConfigError, DataConfig
    assert DataConfig(size_balance=0.5, size_balance_max=3).size_balance_max == 3
    with pytest.raises(ConfigError, match="data.size_balance: -1"):
        DataConfig(size_balance=-1)
    with pytest.raises(ConfigError, match="data.size_balance_max: 0"):
        DataConfig(size_balance_max=0)
    with pytest.raises(ConfigError, match="data.size_balance_max: 2.5"):
        DataConfig(size_balance_max=2.5)


def test_build_data_repeats_rare_sizes_and_records_them(tmp_path):
    """On a synthetic HC18-layout set, the training set holds each training id as often as its size bin says, the
    validation and test sets are untouched, and splits.json records the repeats."""
    from data_pipelines.synthetic.hc18 import generate_hc18_dataset
    from engine.config import load_config
    from engine.run import build_data, make_strategy
    from launch.cli import CONFIG_DIR
    root = tmp_path / "hc18"
    generate_hc18_dataset(root, 40, seed=4, image_hw=(90, 120))

    def build(name, *overrides):
        cfg = load_config(CONFIG_DIR / "hc18_unet.yaml", ["data.synthetic=false", f"data.root={root}",
                                                           "data.split_seed=3", *overrides])
        return build_data(cfg, tmp_path / name, make_strategy(cfg)), cfg
    plain, _ = build("plain")
    bal, cfg = build("bal", "data.size_balance=1", "data.size_balance_max=3")
    assert plain["splits"]["test"] == bal["splits"]["test"] and plain["splits"]["val"] == bal["splits"]["val"]
    train = plain["splits"]["train_oversampled"]        # no stratum repeats for HC18: every training id once
    assert sorted(train) == plain["splits"]["train"]
    recs = {r.id: r for r in plain["train"].records}
    reps, _ = size_repeats([object_size(recs[i])[0] for i in train], 1.0, 3)
    assert max(reps) > 1                                  # the synthetic sizes are uneven enough to repeat some
    expect = [i for i, r in zip(train, reps) for _ in range(r)]
    assert bal["splits"]["train_oversampled"] == expect
    assert [r.id for r in bal["train"].records] == expect and len(bal["train"]) == sum(reps)
    assert len(bal["val"]) == len(plain["val"]) and len(bal["test"]) == len(plain["test"])
    saved = json.loads((tmp_path / "bal" / "splits.json").read_text())
    assert saved["train_oversampled"] == expect

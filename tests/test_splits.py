from collections import Counter

import numpy as np
import pytest

from data_pipelines.splits import holdout_split, oversample, read_splits, stratified_group_kfold, write_splits


def _cohort(n_patients=90, seed=0):
    """Patients with 1-2 images, ~35 % type II (by patient, like the phantom's ids)."""
    rng = np.random.default_rng(seed)
    ids, labels, groups = [], [], []
    for p in range(n_patients):
        label = "II" if rng.random() < 0.35 else "I"
        for k in range(1 + int(rng.random() < 0.5)):
            ids.append(f"{p}_{k + 1}")
            labels.append(label)
            groups.append(p)
    return ids, labels, groups


def test_holdout_keeps_patients_whole_and_stratifies():
    ids, labels, groups = _cohort()
    train, test = holdout_split(ids, labels, groups, test_frac=0.2, seed=3)
    assert sorted(train + test) == sorted(ids) and not set(train) & set(test)
    group_of = dict(zip(ids, groups))
    assert not {group_of[i] for i in train} & {group_of[i] for i in test}
    label_of = dict(zip(ids, labels))
    for lab in ("I", "II"):
        n_lab = sum(1 for x in labels if x == lab)
        n_test = sum(1 for i in test if label_of[i] == lab)
        assert abs(n_test - 0.2 * n_lab) <= 1.0          # whole groups of <= 2 images: at most one image off
    assert [i for i in ids if i in set(test)] == test      # input order kept


def test_holdout_is_a_function_of_the_seed():
    ids, labels, groups = _cohort()
    assert holdout_split(ids, labels, groups, seed=1) == holdout_split(ids, labels, groups, seed=1)
    assert holdout_split(ids, labels, groups, seed=1) != holdout_split(ids, labels, groups, seed=2)


def test_kfold_partitions_ids_keeps_groups_and_balances_classes():
    ids, labels, groups = _cohort(120, seed=1)
    folds = stratified_group_kfold(ids, labels, groups, k=5, seed=0)
    assert len(folds) == 5
    val_count = Counter(i for _, val in folds for i in val)
    assert set(val_count) == set(ids) and set(val_count.values()) == {1}   # each id in exactly one val fold
    group_of, label_of = dict(zip(ids, groups)), dict(zip(ids, labels))
    overall = labels.count("II") / len(labels)
    for train, val in folds:
        assert sorted(train + val) == sorted(ids)
        assert not {group_of[i] for i in train} & {group_of[i] for i in val}
        ratio = sum(label_of[i] == "II" for i in val) / len(val)
        assert abs(ratio - overall) < 0.05
        assert abs(len(val) - len(ids) / 5) <= 2


def test_kfold_is_deterministic_and_group_with_mixed_labels_stays_whole():
    ids, labels, groups = _cohort(40, seed=2)
    ids, labels, groups = ids + ["x_1", "x_2"], labels + ["I", "II"], groups + ["x", "x"]
    a = stratified_group_kfold(ids, labels, groups, k=4, seed=9)
    assert a == stratified_group_kfold(ids, labels, groups, k=4, seed=9)
    assert a != stratified_group_kfold(ids, labels, groups, k=4, seed=10)
    assert sum(("x_1" in val) and ("x_2" in val) for _, val in a) == 1


def test_split_argument_errors():
    with pytest.raises(ValueError, match="duplicate id 'a'"):
        holdout_split(["a", "a"], ["I", "I"], [1, 2])
    with pytest.raises(ValueError, match="differ in length"):
        stratified_group_kfold(["a", "b"], ["I"], [1, 2], k=2)
    with pytest.raises(ValueError, match="3 groups cannot fill 5 folds"):
        stratified_group_kfold(["a", "b", "c"], ["I"] * 3, [1, 2, 3], k=5)


def test_oversample_repeats_by_label():
    assert oversample(["a", "b", "c"], ["I", "II", "I"]) == ["a", "b", "b", "c"]
    assert oversample(["a", "b"], ["I", "II"], factor={"I": 3, "II": 1}) == ["a", "a", "a", "b"]
    with pytest.raises(ValueError, match="integer >= 1"):
        oversample(["a"], ["II"], factor={"II": 1.5})


def test_write_and_read_splits_roundtrip(tmp_path):
    splits = {"seed": 967, "test": ["1_1"], "folds": [{"train": ["2_1"], "val": ["3_1"]}]}
    path = write_splits(tmp_path / "runs" / "splits.json", splits)
    assert read_splits(path) == splits and not (tmp_path / "runs" / "splits.json.tmp").exists()


def test_split_seed_fixes_the_split_across_training_seeds(tmp_path):
    """data.split_seed draws the test / fold split; train.seed alone (split_seed None) draws both, as before."""
    from pathlib import Path
    from data_pipelines.synthetic.hc18 import generate_hc18_dataset
    from engine.config import load_config
    from engine.run import build_data, make_strategy
    from launch.cli import CONFIG_DIR
    root = tmp_path / "hc18"
    generate_hc18_dataset(root, 40, seed=4, image_hw=(90, 120))

    def split(*overrides):
        cfg = load_config(CONFIG_DIR / "hc18_unet.yaml", ["data.synthetic=false", f"data.root={root}", *overrides])
        out = Path(tmp_path / f"run{len(list(tmp_path.iterdir()))}")
        s = build_data(cfg, out, make_strategy(cfg))["splits"]
        return s["test"], s["val"], s["seed"]
    t1, v1, s1 = split("train.seed=1", "data.split_seed=7")
    t2, v2, s2 = split("train.seed=2", "data.split_seed=7")
    assert (t1, v1, s1) == (t2, v2, 7) and len(t1) >= 6
    a, _, sa = split("train.seed=1")
    b, _, sb = split("train.seed=2")
    assert (sa, sb) == (1, 2) and a != b                 # without split_seed the training seed moves the split

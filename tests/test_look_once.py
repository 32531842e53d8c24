"""Look-once disc labelling (models/look_once.py, engine/tasks/spine_disc/look_once.py) and ShapeUNet
(models/shape_unet.py), at tiny sizes on the CPU."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from models.look_once import (build_look_once, candidate_frame, label_discs, look_once_select, masked_nll,
                              point_set, precise_bn, synthetic_candidates, to_channel_lists)

K = 11


def _spine(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A sagittal disc column: 11 discs ~20 px apart, a gentle curve, the lowest 0-2 discs sometimes missing."""
    y = 30.0 + np.arange(K) * rng.uniform(17, 23) + rng.normal(0, 1, K)
    x = 60.0 + 6 * np.sin(np.arange(K) / 3 + rng.uniform(0, 3)) + rng.normal(0, 1, K)
    vis = np.ones(K, bool)
    drop = int(rng.integers(0, 3))
    if drop:
        vis[-drop:] = False
    return np.stack([x, y], 1), vis


def _sets(rng: np.random.Generator, count: int, n: int = 20, max_false: int = 14):
    pts, masks, labels = [], [], []
    while len(pts) < count:
        kp, vis = _spine(rng)
        xy, ch, sc, tr = synthetic_candidates(kp, vis, int(rng.integers(1, max_false + 1)), rng)
        p, m, idx = point_set(xy, sc, candidate_frame(xy, ch, sc), n)
        lab = np.zeros(n, np.int64)
        lab[m] = tr[idx[m]]
        pts.append(p)
        masks.append(m)
        labels.append(lab)
    return torch.from_numpy(np.stack(pts)), torch.from_numpy(np.stack(masks)), torch.from_numpy(np.stack(labels))


@pytest.fixture(scope="module")
def trained():
    """A width/8 classifier trained for 300 steps of 32 synthetic sets; (model, held-out accuracy, majority).
    At 120 steps the recovery below ranged 0.87-0.94 over training seeds 0-3 (and its 0.9 bar failed on one CPU
    model at seed 0); at 300 steps 0.94-0.97, with 6-8 % false candidates kept."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    net = build_look_once(20, attention=True, width_div=8)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(300):
        p, m, lab = _sets(rng, 32)
        loss = masked_nll(net(p, m)["log_probs_BN2"], lab, m)
        opt.zero_grad()
        loss.backward()
        opt.step()
    precise_bn(net, [_sets(rng, 64)[:2] for _ in range(4)])
    p, m, lab = _sets(np.random.default_rng(99), 200)
    with torch.no_grad():
        pred = net(p, m)["log_probs_BN2"].argmax(-1)
    acc = float((pred[m] == lab[m]).float().mean())
    majority = float(max(lab[m].float().mean(), 1 - lab[m].float().mean()))
    return net, acc, majority


def test_log_probs_shapes_and_normalisation():
    net = build_look_once(20, width_div=8).eval()
    p, m, _ = _sets(np.random.default_rng(1), 3)
    out = net(p, m)
    assert out["log_probs_BN2"].shape == (3, 20, 2) and out["attention_BN"].shape == (3, 20)
    torch.testing.assert_close(out["log_probs_BN2"].exp().sum(-1), torch.ones(3, 20))
    with pytest.raises(ValueError, match="must be"):
        net(p[:, :10], m[:, :10])


def test_input_transform_starts_at_identity():
    net = build_look_once(20, width_div=8).eval()
    p, m, _ = _sets(np.random.default_rng(2), 4)
    torch.testing.assert_close(net.stn(p.transpose(1, 2), m), torch.eye(2).expand(4, 2, 2))


def test_per_point_outputs_are_permutation_equivariant_without_attention():
    torch.manual_seed(3)
    net = build_look_once(20, attention=False, width_div=8)
    p, m, _ = _sets(np.random.default_rng(3), 8)
    net.train()
    net(p, m)                       # move the BatchNorm running statistics off their initial values
    net.eval()
    with torch.no_grad():
        for b in range(8):
            n_real = int(m[b].sum())
            perm = torch.cat([torch.randperm(n_real), torch.arange(n_real, 20)])
            a = net(p[b:b + 1], m[b:b + 1])["log_probs_BN2"][0]
            c = net(p[b:b + 1, perm], m[b:b + 1, perm])["log_probs_BN2"][0]
            torch.testing.assert_close(c, a[perm], atol=1e-5, rtol=1e-5)


def test_padding_content_does_not_change_real_points():
    torch.manual_seed(4)
    net = build_look_once(20, attention=True, width_div=8)
    p, m, _ = _sets(np.random.default_rng(4), 6, max_false=3)       # at most 14 real points: always padding
    net.train()
    net(p, m)
    net.eval()
    q = p.clone()
    q[~m] = torch.randn(int((~m).sum()), 2) * 5
    with torch.no_grad():
        a, c = net(p, m)["log_probs_BN2"], net(q, m)["log_probs_BN2"]
    torch.testing.assert_close(a[m], c[m])


def test_attention_equals_hand_computation():
    torch.manual_seed(5)
    net = build_look_once(20, attention=True, width_div=8).eval()
    with torch.no_grad():
        net.att_fc.weight.normal_(0, 0.5)
        net.att_fc.bias.normal_(0, 0.5)
    p, m, _ = _sets(np.random.default_rng(5), 2)
    att = net(p, m)["attention_BN"].detach().numpy()
    w = net.att_conv.weight.detach().numpy().reshape(2)
    b0 = float(net.att_conv.bias.detach())
    wl, bl = net.att_fc.weight.detach().numpy(), net.att_fc.bias.detach().numpy()
    for i in range(2):
        s = (p[i].numpy() @ w + b0) * m[i].numpy()          # Conv1d(2 -> 1), padded points zeroed
        ref = 1.0 / (1.0 + np.exp(-(wl @ s + bl)))          # sigmoid(Linear(N, N))
        np.testing.assert_allclose(att[i], ref, rtol=1e-5, atol=1e-6)


def test_training_on_synthetic_sets_reaches_high_accuracy(trained):
    _, acc, majority = trained
    # measured: 0.88 after 150 steps (untrained: about the majority share, 0.60)
    assert acc > 0.83, acc
    assert acc > majority + 0.2, (acc, majority)


def test_label_discs_orders_and_follows_channels():
    # 4 kept blobs, top to bottom; the second was found by channels 2 and 3 (one point each, 1 px apart); the DP
    # must keep the order and give each blob the channel where its evidence is
    xy = np.array([[10, 10], [10, 30], [11, 30], [10, 50], [10, 70], [40, 40]], float)
    chan = np.array([0, 2, 3, 3, 5, 1])
    score = np.array([0.9, 0.8, 0.6, 0.9, 0.7, 0.8])
    keep = np.array([True, True, True, True, True, False])
    kpts, present = label_discs(xy, chan, score, keep, keep.astype(float), 7, merge_dist=5.0)
    assert present.tolist() == [True, False, True, True, False, True, False]
    np.testing.assert_allclose(kpts[[0, 2, 3, 5]], [[10, 10], [10, 30], [10, 50], [10, 70]])


def test_look_once_recovers_discs_among_false_candidates(trained):
    net = trained[0]
    rng = np.random.default_rng(7)
    hits = truths = kept_false = 0
    for _ in range(30):
        kp, vis = _spine(rng)
        xy, ch, sc, tr = synthetic_candidates(kp, vis, 8, rng)
        kpts, present = look_once_select([to_channel_lists(xy, ch, sc, K)], net)
        found = kpts[0][present[0]]
        d_true = np.linalg.norm(kp[vis][:, None] - found[None], axis=2)
        hits += int((d_true.min(axis=1) < 1e-6).sum()) if len(found) else 0
        truths += int(vis.sum())
        kept_false += int((d_true.min(axis=0) > 1e-6).sum()) if len(found) else 0
    assert hits / truths > 0.9, hits / truths
    assert kept_false / truths < 0.2, kept_false / truths      # keeping every candidate: 240 / 296 = 0.81


def test_time_is_not_combinatorial_in_false_candidates(trained):
    net = trained[0]
    rng = np.random.default_rng(8)
    kp, vis = _spine(rng)

    def best_time(n_false: int) -> float:
        cands = [to_channel_lists(*synthetic_candidates(kp, vis, n_false, rng)[:3], K)]
        look_once_select(cands, net)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            look_once_select(cands, net)
            times.append(time.perf_counter() - t0)
        return min(times)
    t1, t100 = best_time(1), best_time(100)
    # one N = 20 forward pass per ~N - 11 new candidates (about 11 passes for 111 candidates) plus linear bookkeeping;
    # the combinations an exhaustive search scores grow from ~3e3 to ~1e11 between these two sets
    assert t100 < 25 * t1 + 0.05, (t1, t100)


def test_bad_checkpoint_is_a_named_error(tmp_path):
    from engine.checkpoint import CheckpointError
    from engine.config import ConfigError
    from engine.tasks import build_task
    from engine.tasks.spine_disc.look_once import load_look_once
    with pytest.raises(CheckpointError, match="not found"):
        load_look_once(tmp_path / "missing.pt")
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(CheckpointError, match="not a look-once classifier checkpoint"):
        load_look_once(other)
    bad = tmp_path / "bad.pt"
    torch.save({"kind": "look_once", "weights": {"x": torch.zeros(1)}, "args": {"num_points": 20}}, bad)
    with pytest.raises(CheckpointError, match="do not fit"):
        load_look_once(bad)
    with pytest.raises(ConfigError, match="look_once_checkpoint.*missing.pt: no such file"):
        build_task("spine_disc", {"postprocess": "look_once", "look_once_checkpoint": str(tmp_path / "missing.pt")})
    with pytest.raises(ConfigError, match="postprocess"):
        build_task("spine_disc", {"postprocess": "search"})


def test_train_command_then_task_decodes_heatmaps(tmp_path):
    """`medpose train --config spine_look_once` writes look_once.pt; spine_disc's look_once decoder then labels
    Gaussian heatmaps whose channels also fire at false places."""
    from engine.config import load_config
    from engine.tasks import build_task
    from launch.cli import main
    run = tmp_path / "lo"
    assert main(["train", "--config", "spine_look_once", f"data.root={tmp_path / 'spine'}", "data.synth_n=10",
                 "model.args={width_div: 8, val_sets: 40}", "train.max_steps=120", "optim.lr=3e-3",
                 f"log.run_dir={run}"]) == 0
    ckpt = run / "look_once.pt"
    from engine.checkpoint import safe_torch_load
    stored = safe_torch_load(ckpt)
    assert stored["kind"] == "look_once" and stored["metrics"]["accuracy"] > 0.8, stored["metrics"]
    task = build_task("spine_disc", {"postprocess": "look_once", "look_once_checkpoint": str(ckpt)})
    cfg = load_config(None, ["data.task=spine_disc", "data.heatmap_peak=1.0", "model.decode=argmax"])
    rng = np.random.default_rng(11)
    kp, _ = _spine(rng)
    h, w = 300, 128
    yy, xx = np.mgrid[0:h, 0:w]
    heat = np.zeros((1, K, h, w), np.float32)
    for k in range(K):
        heat[0, k] = np.exp(-((xx - kp[k, 0]) ** 2 + (yy - kp[k, 1]) ** 2) / (2 * 2.0 ** 2))
    for k in (2, 6):      # a weaker false blob far from the spine in two channels
        heat[0, k] += 0.7 * np.exp(-((xx - 110) ** 2 + (yy - kp[k, 1] + 7) ** 2) / (2 * 2.0 ** 2))
    out = task.decoder(cfg)({"heatmap_BKHW": torch.from_numpy(heat)})
    assert out["kpt_present_BK"][0].all()
    np.testing.assert_allclose(out["kpts_px_BK2"][0].numpy(), kp, atol=0.5)


# ------------------------------------------------------------------------------------------------------ ShapeUNet
def test_shape_unet_gradient_input_equals_sobel_reference():
    from scipy import ndimage
    from models.shape_unet import build_shape_unet
    rng = np.random.default_rng(12)
    img = rng.normal(size=(2, 1, 32, 16)).astype(np.float32)
    net = build_shape_unet(in_channels=1, num_keypoints=3, width=4, depth=2)
    x = net.shape_input(torch.from_numpy(img)).numpy()
    assert x.shape == (2, 3, 32, 16)
    np.testing.assert_array_equal(x[:, 0], img[:, 0])
    for b in range(2):
        gx = ndimage.sobel(img[b, 0].astype(np.float64), axis=1, mode="nearest") / 8
        gy = ndimage.sobel(img[b, 0].astype(np.float64), axis=0, mode="nearest") / 8
        np.testing.assert_allclose(x[b, 1], gx, atol=1e-5)
        np.testing.assert_allclose(x[b, 2], gy, atol=1e-5)
    ramp = torch.arange(16, dtype=torch.float32).expand(1, 1, 8, 16)
    g = net.shape_input(ramp)[0]
    torch.testing.assert_close(g[1, :, 1:-1], torch.ones(8, 14))     # a unit ramp has gx = 1 inside
    torch.testing.assert_close(g[2], torch.zeros(8, 16))


def test_shape_unet_trains_with_the_hourglass_loss():
    from models.registry import CRITERIA, build_criterion
    from models import MODELS
    from models.hourglass import StackedHeatmapLoss
    assert CRITERIA["shape_unet"] is StackedHeatmapLoss
    torch.manual_seed(13)
    net = MODELS["shape_unet"](in_channels=1, num_keypoints=2, width=4, depth=2)
    crit = build_criterion("shape_unet")
    img = torch.randn(2, 1, 32, 16)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(16.0), indexing="ij")
    target = torch.stack([torch.exp(-((xx - 5) ** 2 + (yy - 10) ** 2) / 8),
                          torch.exp(-((xx - 9) ** 2 + (yy - 20) ** 2) / 8)])
    targets = {"heatmap_BKHW": target.expand(2, 2, 32, 16) * 10, "kpts_visible_BK": torch.ones(2, 2, dtype=torch.bool)}
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        loss = crit(net(img), targets)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.3 * losses[0], (losses[0], losses[-1])

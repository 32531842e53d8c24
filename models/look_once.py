""""Look once" disc labelling: a PointNet-style per-point classifier (true disc / false candidate) over a fixed
number of 2-D candidate points, replacing the skeleton search of models/skeleton.py
(docs/systems/spine_disc_hourglass.md).

Network (`LookOnceClassifier`), points as (B, 2, N):
  input transform  a small PointNet on the points (Conv1d 2->64->128->1024, max-pool, Linear 1024->512->256->4)
                   predicting a 2x2 matrix T (initialised to the identity); the points are replaced by p T;
  point features   shared Conv1d 2->64 (kept as the local feature) ->128->1024, max-pooled over the points to a
                   global 1024 feature, concatenated to every point's 64 features (1088);
  head             shared Conv1d 1088->512->256->128, multiplied by the relational attention
                   a = sigmoid(Linear(N, N)(Conv1d(2->1)(x))) of the (normalised) input points x, one weight per
                   point, then Conv1d 128->2 and log-softmax (trained with the NLL loss).
Every convolution but the last is followed by BatchNorm and ReLU (the 1024 feature before pooling has no ReLU).
`width_div` divides every width (1 = the published network; tests use 8).

Fixed N: a sample with fewer candidates is padded; one with more is classified in passes of N (`look_once_select`).
Padded points are masked out of both max-pools and their attention input is set to 0, so at eval time (BatchNorm on
running statistics) the outputs of the real points do not depend on what the padding holds. The shared convolutions and the
max-pool make the per-point outputs permutation-equivariant; the attention's Linear(N, N) does not (it mixes points
by position), which is why point sets are always ordered superior -> inferior (`point_set`).

Normalisation: points are expressed relative to "disc 1" and divided by the disc 1 - disc 5 distance. At inference no
label is available, so both discs are the best candidates of heatmap channels 1 and 5 (or of the nearest channels
that have candidates, scaled to four disc intervals; `candidate_frame`) - the same rule is used when training.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

WHERE = "models/look_once.py"


def _conv_bn(cin: int, cout: int, relu: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv1d(cin, cout, 1), nn.BatchNorm1d(cout)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def _masked_max(f_BCN: torch.Tensor, mask_BN: torch.Tensor) -> torch.Tensor:
    """Max over the real points (mask True); a set without any real point gives zeros."""
    neg = torch.finfo(f_BCN.dtype).min
    g = f_BCN.masked_fill(~mask_BN[:, None, :], neg).amax(dim=2)
    return torch.where(mask_BN.any(dim=1, keepdim=True), g, torch.zeros_like(g))


class PointSTN2d(nn.Module):
    """Input transform for 2-D points: a 2x2 matrix per set, identity + a learnt correction (last layer zeroed at
    initialisation, so training starts from the identity)."""

    def __init__(self, d: int = 1):
        super().__init__()
        self.features = nn.Sequential(_conv_bn(2, 64 // d), _conv_bn(64 // d, 128 // d), _conv_bn(128 // d, 1024 // d))
        self.fc = nn.Sequential(nn.Linear(1024 // d, 512 // d), nn.BatchNorm1d(512 // d), nn.ReLU(inplace=True),
                                nn.Linear(512 // d, 256 // d), nn.BatchNorm1d(256 // d), nn.ReLU(inplace=True))
        self.out = nn.Linear(256 // d, 4)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x_B2N: torch.Tensor, mask_BN: torch.Tensor) -> torch.Tensor:
        g = _masked_max(self.features(x_B2N), mask_BN)
        eye = torch.eye(2, dtype=x_B2N.dtype, device=x_B2N.device).reshape(1, 4)
        return (self.out(self.fc(g)) + eye).reshape(-1, 2, 2)


class LookOnceClassifier(nn.Module):
    """forward(points_BN2, mask_BN) -> {"log_probs_BN2": log-softmax over (false, true), "attention_BN"}."""

    def __init__(self, num_points: int = 20, attention: bool = True, width_div: int = 1):
        super().__init__()
        if num_points < 2 or width_div not in (1, 2, 4, 8, 16):
            raise ValueError(f"{WHERE}: num_points must be >= 2 and width_div one of 1, 2, 4, 8, 16; got "
                             f"{num_points}, {width_div}")
        self.num_points, d = int(num_points), int(width_div)
        self.stn = PointSTN2d(d)
        self.conv1 = _conv_bn(2, 64 // d)
        self.conv2 = nn.Sequential(_conv_bn(64 // d, 128 // d), _conv_bn(128 // d, 1024 // d, relu=False))
        self.head = nn.Sequential(_conv_bn(1088 // d, 512 // d), _conv_bn(512 // d, 256 // d),
                                  _conv_bn(256 // d, 128 // d))
        self.att_conv = nn.Conv1d(2, 1, 1) if attention else None
        self.att_fc = nn.Linear(self.num_points, self.num_points) if attention else None
        self.out = nn.Conv1d(128 // d, 2, 1)

    def forward(self, points_BN2: torch.Tensor, mask_BN: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        b, n = points_BN2.shape[:2]
        if points_BN2.dim() != 3 or points_BN2.shape[-1] != 2 or n != self.num_points:
            raise ValueError(f"{WHERE}: points must be (B, {self.num_points}, 2), got {tuple(points_BN2.shape)}")
        mask = torch.ones(b, n, dtype=torch.bool, device=points_BN2.device) if mask_BN is None else mask_BN.bool()
        x = points_BN2.transpose(1, 2)                                       # (B, 2, N)
        t = self.stn(x, mask)
        xt = torch.bmm(t.transpose(1, 2), x)                                 # rows p T as columns: T^T p
        local = self.conv1(xt)
        g = _masked_max(self.conv2(local), mask)
        h = self.head(torch.cat([local, g[:, :, None].expand(-1, -1, n)], dim=1))
        if self.att_fc is not None:
            s = self.att_conv(x)[:, 0] * mask                                # (B, N), padded points -> 0
            att = torch.sigmoid(self.att_fc(s))
            h = h * att[:, None, :]
        else:
            att = torch.ones(b, n, dtype=h.dtype, device=h.device)
        return {"log_probs_BN2": F.log_softmax(self.out(h), dim=1).transpose(1, 2), "attention_BN": att}


def build_look_once(num_points: int = 20, attention: bool = True, width_div: int = 1) -> LookOnceClassifier:
    """The published widths with width_div = 1; width_div divides every width (tiny test models)."""
    return LookOnceClassifier(num_points, attention, width_div)


@torch.no_grad()
def precise_bn(model: LookOnceClassifier, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Re-estimate every BatchNorm's running statistics as the plain average over `batches` (points, mask) with the
    final weights. The exponential running average lags behind weights that moved fast (short runs, high learning
    rates), and eval-mode outputs on stale statistics can be far from the training-mode ones."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None                                  # cumulative average over the passes below
    model.train()
    for pts, mask in batches:
        model(pts, mask)
    for m, mom in zip(bns, saved):
        m.momentum = mom
    model.eval()


def masked_nll(log_probs_BN2: torch.Tensor, labels_BN: torch.Tensor, mask_BN: torch.Tensor) -> torch.Tensor:
    """NLL over the real points only (mean)."""
    m = mask_BN.bool()
    return F.nll_loss(log_probs_BN2[m], labels_BN[m].long())


# --------------------------------------------------------------------------------------------------- point sets
def candidate_frame(xy_M2: np.ndarray, chan_M: np.ndarray, score_M: np.ndarray, ref: tuple[int, int] = (0, 4)
                    ) -> tuple[np.ndarray, float] | None:
    """(origin, scale) of the normalisation from candidates alone: origin = best candidate of the lowest channel
    that has any (channel 1 when present), scale = distance to the best candidate of the channel closest to
    origin-channel + 4 (channel 5), times 4 / their channel difference (the disc 1 - disc 5 distance when the
    intervals are even). None when fewer than two channels have candidates or the two points coincide."""
    chans = np.unique(chan_M)
    if len(chans) < 2:
        return None
    best = {}
    for c in chans:
        idx = np.flatnonzero(chan_M == c)
        best[int(c)] = xy_M2[idx[np.argmax(score_M[idx])]]
    c0 = int(chans[0])
    others = [int(c) for c in chans[1:]]
    c1 = min(others, key=lambda c: (abs(c - (c0 + ref[1] - ref[0])), c))
    dist = float(np.linalg.norm(best[c1] - best[c0]))
    if dist <= 1e-6:
        return None
    return best[c0].astype(np.float64), dist * (ref[1] - ref[0]) / (c1 - c0)


def point_set(xy_M2: np.ndarray, score_M: np.ndarray, frame: tuple[np.ndarray, float], num_points: int
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(points_N2 float32 normalised, mask_N bool, index_N int: the candidate each slot holds, -1 for padding).
    More than N candidates: the N highest-scoring are kept (the others count as rejected). Order: superior ->
    inferior (normalised y, then x), padding last."""
    origin, scale = frame
    m = len(xy_M2)
    keep = np.arange(m) if m <= num_points else np.sort(np.argsort(-score_M, kind="stable")[:num_points])
    norm = (xy_M2[keep] - origin) / scale
    order = np.lexsort((norm[:, 0], norm[:, 1]))
    keep, norm = keep[order], norm[order]
    pts = np.zeros((num_points, 2), dtype=np.float32)
    mask = np.zeros(num_points, dtype=bool)
    index = np.full(num_points, -1, dtype=np.int64)
    pts[:len(keep)], mask[:len(keep)], index[:len(keep)] = norm, True, keep
    return pts, mask, index


def flatten_candidates(cands: list[list[tuple[float, float, float]]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-channel candidate lists (models.skeleton.heatmap_candidates) -> (xy (M, 2), channel (M,), score (M,))."""
    rows = [(x, y, s, ch) for ch, cs in enumerate(cands) for (x, y, s) in cs]
    if not rows:
        return np.zeros((0, 2)), np.zeros(0, dtype=np.int64), np.zeros(0)
    a = np.asarray(rows, dtype=np.float64)
    return a[:, :2], a[:, 3].astype(np.int64), a[:, 2]


def label_discs(xy_M2: np.ndarray, chan_M: np.ndarray, score_M: np.ndarray, keep_M: np.ndarray, prob_M: np.ndarray,
                num_discs: int, merge_dist: float) -> tuple[np.ndarray, np.ndarray]:
    """Disc positions (K, 2) (NaN where absent) and presence (K,) from the kept candidates.

    Kept candidates closer than `merge_dist` are one disc found by several channels (a blob: the position of its
    highest-scoring member, per-channel evidence = the best score of its members in that channel). More than K
    blobs: the K most probable are kept. The blobs, ordered superior -> inferior, get strictly increasing disc
    indices chosen by dynamic programming to maximise the summed evidence of each blob in its index's channel, so
    the labels follow both the anatomy's order and the channels that found the points."""
    k = int(num_discs)
    out = np.full((k, 2), np.nan)
    present = np.zeros(k, dtype=bool)
    idx = np.flatnonzero(keep_M)
    if len(idx) == 0:
        return out, present
    idx = idx[np.argsort(-score_M[idx], kind="stable")]
    blobs: list[list[int]] = []
    for i in idx:                                  # greedy by score: the first member is the blob's position
        for bl in blobs:
            if np.linalg.norm(xy_M2[i] - xy_M2[bl[0]]) < merge_dist:
                bl.append(int(i))
                break
        else:
            blobs.append([int(i)])
    if len(blobs) > k:
        blobs = sorted(blobs, key=lambda bl: -max(prob_M[j] for j in bl))[:k]
    blobs.sort(key=lambda bl: (xy_M2[bl[0], 1], xy_M2[bl[0], 0]))
    n = len(blobs)
    ev = np.zeros((n, k))
    for b, bl in enumerate(blobs):
        for j in bl:
            if 0 <= chan_M[j] < k:
                ev[b, chan_M[j]] = max(ev[b, chan_M[j]], score_M[j])
    # dp[b, l]: best evidence of blobs 0..b with blob b labelled l (labels strictly increasing)
    dp = np.full((n, k), -np.inf)
    back = np.zeros((n, k), dtype=np.int64)
    dp[0] = ev[0]
    for b in range(1, n):
        run_best, run_arg = -np.inf, -1
        for lab in range(k):
            if lab >= 1 and dp[b - 1, lab - 1] > run_best:
                run_best, run_arg = dp[b - 1, lab - 1], lab - 1
            if run_arg >= 0:
                dp[b, lab], back[b, lab] = run_best + ev[b, lab], run_arg
    labels = np.zeros(n, dtype=np.int64)
    labels[-1] = int(np.argmax(dp[-1]))
    for b in range(n - 1, 0, -1):
        labels[b - 1] = back[b, labels[b]]
    for b, lab in enumerate(labels):
        out[lab], present[lab] = xy_M2[blobs[b][0]], True
    return out, present


@torch.no_grad()
def look_once_select(cands_per_image: list[list[list[tuple[float, float, float]]]], classifier: LookOnceClassifier,
                     threshold: float = 0.5, merge_frac: float = 0.4) -> tuple[np.ndarray, np.ndarray]:
    """Look-once labelling of a batch: per image the candidates of every channel are normalised, ordered, padded
    to N and classified (one forward pass for the whole batch); points with P(true) > threshold are labelled by
    `label_discs` (merge distance = merge_frac x one disc interval, a quarter of the frame's scale).

    More than N candidates: the N highest-scoring are classified first; the rejected ones are final, the accepted ones
    stay in the set and the free slots are filled with the next-best unseen candidates, until every candidate has been
    seen (each pass sees a set like the training sets: the discs found so far plus a few new candidates; the number of
    passes grows linearly with the candidates, at least one slot frees per pass). The last pass's P(true) counts.
    Returns (kpts (B, K, 2) pixels, NaN where absent; present (B, K)).
    An image whose candidates give no frame (fewer than two channels with candidates) keeps each channel's best."""
    b = len(cands_per_image)
    k = len(cands_per_image[0]) if b else 0
    n = classifier.num_points
    kpts = np.full((b, k, 2), np.nan)
    present = np.zeros((b, k), dtype=bool)
    state: dict[int, dict] = {}
    for i, cands in enumerate(cands_per_image):
        xy, ch, sc = flatten_candidates(cands)
        fr = candidate_frame(xy, ch, sc) if len(xy) else None
        if fr is None:
            for c, cs in enumerate(cands):
                if cs:
                    kpts[i, c], present[i, c] = cs[0][:2], True
            continue
        order = np.argsort(-sc, kind="stable")
        state[i] = {"xy": xy, "ch": ch, "sc": sc, "frame": fr, "prob": np.zeros(len(xy)),
                    "pool": order[:n], "rest": order[n:], "done": False}
    classifier.eval()
    dev = next(classifier.parameters()).device
    while True:
        active = [i for i, st in state.items() if not st["done"]]
        if not active:
            break
        sets = []
        for i in active:
            st = state[i]
            pts, mask, index = point_set(st["xy"][st["pool"]], st["sc"][st["pool"]], st["frame"], n)
            sets.append((i, pts, mask, st["pool"][index[mask]]))
        pts = torch.from_numpy(np.stack([s[1] for s in sets])).to(dev)
        mask = torch.from_numpy(np.stack([s[2] for s in sets])).to(dev)
        prob = classifier(pts, mask)["log_probs_BN2"][..., 1].exp().cpu().numpy()
        for row, (i, _, m, members) in enumerate(sets):
            st = state[i]
            st["prob"][members] = prob[row][m]
            if len(st["rest"]) == 0:
                st["done"] = True
                continue
            accepted = members[st["prob"][members] > threshold]
            if len(accepted) >= n:                       # keep at least one slot free: always progress
                accepted = accepted[np.argsort(-st["prob"][accepted], kind="stable")[:n - 1]]
            room = n - len(accepted)
            st["pool"], st["rest"] = np.concatenate([accepted, st["rest"][:room]]), st["rest"][room:]
    for i, st in state.items():
        p_m = st["prob"]
        kpts[i], present[i] = label_discs(st["xy"], st["ch"], st["sc"], p_m > threshold, p_m, k,
                                          merge_frac * st["frame"][1] / 4.0)
    return kpts, present


# -------------------------------------------------------------------------------------- synthetic training sets
def synthetic_candidates(kpts_K2: np.ndarray, visible_K: np.ndarray, n_false: int, rng: np.random.Generator,
                         spread: float = 1.5, min_true: float = 0.5, min_false: float = 0.25,
                         true_score: tuple[float, float] = (0.6, 1.0), false_score: tuple[float, float] = (0.5, 0.9)
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Candidates around a labelled spine: every visible disc (in its own channel) plus `n_false` false points.
    A false point is drawn from a Gaussian of sd `spread` disc intervals around a random disc and rejected when
    closer than `min_true` intervals to a disc or `min_false` to another false point (at most 200 draws per point;
    a crowded image may get fewer). Its channel is the nearest disc's +-1, its score uniform in `false_score`.
    Returns (xy (M, 2), channel (M,), score (M,), is_true (M,))."""
    vis = np.asarray(visible_K, dtype=bool) & np.isfinite(kpts_K2).all(axis=1)
    true_idx = np.flatnonzero(vis)
    if len(true_idx) < 2:
        raise ValueError(f"{WHERE}: synthetic candidates need at least 2 visible discs, got {len(true_idx)}")
    t = np.asarray(kpts_K2, dtype=np.float64)[true_idx]
    interval = float(np.median(np.linalg.norm(np.diff(t, axis=0), axis=1) / np.diff(true_idx)))
    k = len(kpts_K2)
    falses: list[np.ndarray] = []
    for _ in range(n_false):
        for _attempt in range(200):
            p = t[rng.integers(len(t))] + rng.normal(0.0, spread * interval, size=2)
            if np.min(np.linalg.norm(t - p, axis=1)) < min_true * interval:
                continue
            if falses and np.min(np.linalg.norm(np.asarray(falses) - p, axis=1)) < min_false * interval:
                continue
            falses.append(p)
            break
    f = np.asarray(falses).reshape(-1, 2)
    near = true_idx[np.argmin(np.linalg.norm(f[:, None] - t[None], axis=2), axis=1)] if len(f) else np.zeros(0, int)
    f_chan = np.clip(near + rng.integers(-1, 2, size=len(f)), 0, k - 1)
    xy = np.concatenate([t, f])
    chan = np.concatenate([true_idx, f_chan]).astype(np.int64)
    score = np.concatenate([rng.uniform(*true_score, size=len(t)), rng.uniform(*false_score, size=len(f))])
    is_true = np.concatenate([np.ones(len(t), bool), np.zeros(len(f), bool)])
    return xy, chan, score, is_true


def to_channel_lists(xy_M2: np.ndarray, chan_M: np.ndarray, score_M: np.ndarray, num_channels: int
                     ) -> list[list[tuple[float, float, float]]]:
    """Flat candidates -> per-channel lists sorted by score (the form models.skeleton.heatmap_candidates returns)."""
    out: list[list[tuple[float, float, float]]] = [[] for _ in range(num_channels)]
    for j in np.argsort(-score_M, kind="stable"):
        out[int(chan_M[j])].append((float(xy_M2[j, 0]), float(xy_M2[j, 1]), float(score_M[j])))
    return out


def decode_look_once(heatmap_BKHW: torch.Tensor, classifier: LookOnceClassifier, method: str = "argmax",
                     rel_threshold: float = 0.5, abs_threshold: float = 0.1, peak: float = 1.0,
                     max_per_channel: int = 3, threshold: float = 0.5, window: int = 3
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Disc positions from heatmaps with the look-once labelling, in the form of models.skeleton.decode_discs
    (same candidates, same sub-pixel / window refinement): ((B, K, 2) float32 pixels, NaN where absent; (B, K))."""
    from .skeleton import _window_centroid, heatmap_candidates
    if method not in ("argmax", "softargmax"):
        raise ValueError(f"{WHERE}: method must be 'argmax' or 'softargmax', got {method!r}")
    if heatmap_BKHW.dim() != 4:
        raise ValueError(f"{WHERE}: heatmap must be (B, K, H, W), got {tuple(heatmap_BKHW.shape)}")
    hm = heatmap_BKHW.detach().float().cpu().numpy()
    cands = [heatmap_candidates(h, rel_threshold, abs_threshold, max_per_channel, peak) for h in hm]
    kpts, present = look_once_select(cands, classifier, threshold)
    if method == "softargmax":       # on the channels' maximum: a kept point may carry another channel's label
        for i, k in zip(*np.nonzero(present)):
            kpts[i, k] = _window_centroid(hm[i].max(axis=0), float(kpts[i, k, 0]), float(kpts[i, k, 1]), window)
    return torch.from_numpy(kpts.astype(np.float32)), torch.from_numpy(present)

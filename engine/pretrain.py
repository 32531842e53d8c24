"""`medpose pretrain`: contrastive self-supervised pre-training of any model's encoder
(docs/systems/segmentation_zoo.md).

Two views of every unlabelled training image (random resized crop with area 0.2-1, colour jitter 0.4, Gaussian
blur, horizontal flip: the published view augmentations, applied on the device as tensors) go through the model up
to `pretrain.layer`; the projection (global average pool -> Linear -> L2 normalisation, 128-d) of view 1 is the
query q, that of view 2 through the key encoder (an exponential moving average of the query encoder, momentum
`pretrain.momentum`; 0 = the same weights without gradient) the positive key k+. InfoNCE against a FIFO memory bank
of the last 1024 keys, temperature 0.07:

    loss = -log( exp(q.k+ / T) / (exp(q.k+ / T) + sum_bank exp(q.k_j / T)) )

After each step the batch's keys replace the oldest bank entries. The result, `<run>/encoder.pt`, holds the model's
own state_dict (projection excluded) and loads into fine-tuning with `model.init_from=<run>/encoder.pt`
(`init_weights`: tensors whose name and shape match are loaded, the counts logged).
"""
from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import atomic_torch_save, seed_everything, versions
from .config import Config, ConfigError, save_config
from .logger import LOG

WHERE = "engine/pretrain.py"


# ---------------------------------------------------------------------------------------------- initialisation
def init_weights(model: nn.Module, path: str | Path) -> dict[str, int]:
    """Load the tensors of `path` (encoder file, engine checkpoint or plain state_dict) whose name and shape match
    `model`'s; returns {"loaded", "skipped_shape", "missing", "total"}. A file of which less than half (by element
    count) fits is an error naming the file."""
    from models.seg.common import read_state_dict
    path = Path(path)
    try:
        state = read_state_dict(path, "model.init_from", entries=("encoder", "model"))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    own = model.state_dict()
    take = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped_shape = sum(1 for k, v in state.items() if k in own and own[k].shape != v.shape)
    fit = sum(v.numel() for v in take.values()) / max(sum(v.numel() for v in state.values()), 1)
    if fit < 0.5:    # a stray bias or BatchNorm counter of the same shape is not "the encoder"
        raise ConfigError(f"{path}: model.init_from: only {100 * fit:.1f} % of its weights match the model's names "
                          f"and shapes (is it from another model.name or model.args?)")
    model.load_state_dict(take, strict=False)
    counts = {"loaded": len(take), "skipped_shape": skipped_shape, "missing": len(own) - len(take),
              "total": len(own)}
    LOG.info("model.init_from %s: loaded %d of the model's %d tensors (%d shape mismatches, %d left as initialised)",
             path, counts["loaded"], counts["total"], counts["skipped_shape"], counts["missing"])
    return counts


# ---------------------------------------------------------------------------------------------- the method
class MemoryBank(nn.Module):
    """FIFO queue of L2-normalised keys (size x dim); starts with random unit vectors, as in MoCo."""

    def __init__(self, size: int, dim: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("keys", F.normalize(torch.randn(size, dim, generator=g), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.int64))

    @torch.no_grad()
    def push(self, k: torch.Tensor) -> None:
        """Replace the oldest entries by `k` (wrapping around); a batch larger than the bank keeps its last rows."""
        size = self.keys.shape[0]
        k = k.detach()[-size:]
        idx = (int(self.ptr) + torch.arange(k.shape[0], device=k.device)) % size
        self.keys[idx] = k.to(self.keys)
        self.ptr.fill_((int(self.ptr) + k.shape[0]) % size)


def info_nce(q: torch.Tensor, k_pos: torch.Tensor, bank: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean InfoNCE loss of queries q (B, D) with positives k_pos (B, D) against bank (N, D); all L2-normalised."""
    l_pos = (q * k_pos).sum(1, keepdim=True)
    l_neg = q @ bank.t()
    logits = torch.cat([l_pos, l_neg], 1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


class FeatureProjector(nn.Module):
    """model -> output of `layer` (forward hook) -> global average pool -> Linear -> L2 normalise."""

    def __init__(self, model: nn.Module, layer: str, channels: int, dim: int):
        super().__init__()
        self.model, self.layer = model, layer
        self.proj = nn.Linear(channels, dim)
        self._feat: torch.Tensor | None = None
        model.get_submodule(layer).register_forward_hook(self._keep)

    def _keep(self, _module, _inputs, output) -> None:
        self._feat = output[0] if isinstance(output, (list, tuple)) else output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._feat = None
        self.model(x)
        if not torch.is_tensor(self._feat) or self._feat.dim() != 4:
            raise ValueError(f"{WHERE}: pretrain.layer '{self.layer}' gave no (B, C, H, W) feature map")
        return F.normalize(self.proj(self._feat.float().mean((2, 3))), dim=1)


def pick_layer(model: nn.Module, x: torch.Tensor, layer: str) -> tuple[str, int]:
    """(layer name, channels). auto: the top-level child whose 4-D output has the fewest pixels (the bottleneck;
    the last one on ties). A named layer must exist and give a 4-D output."""
    outs: dict[str, torch.Size] = {}
    hooks = []
    names = [layer] if layer != "auto" else [n for n, _ in model.named_children()]
    for n in names:
        try:
            mod = model.get_submodule(n)
        except AttributeError:
            raise ConfigError(f"pretrain.layer: the model has no module '{n}' (top-level: "
                              f"{', '.join(c for c, _ in model.named_children())})") from None

        def hook(_m, _i, out, n=n):
            out = out[0] if isinstance(out, (list, tuple)) else out
            if torch.is_tensor(out) and out.dim() == 4:
                outs[n] = out.shape
        hooks.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        was = model.training
        model.eval()
        model(x)
        model.train(was)
    for h in hooks:
        h.remove()
    if not outs:
        raise ConfigError(f"pretrain.layer={layer}: no (B, C, H, W) output found; name a feature layer")
    name = min(outs, key=lambda n: (outs[n][2] * outs[n][3], -names.index(n)))
    return name, int(outs[name][1])


def make_views(images: torch.Tensor, pc, generator: torch.Generator) -> torch.Tensor:
    """One randomly augmented view per image (B, C, H, W) -> same shape, on the images' device."""
    from torchvision.transforms.v2 import functional as TF
    b, c, h, w = images.shape
    out = []
    for i in range(b):
        r = torch.rand(8, generator=generator).tolist()
        area = (pc.crop_scale[0] + r[0] * (pc.crop_scale[1] - pc.crop_scale[0])) * h * w
        aspect = math.exp(math.log(3 / 4) + r[1] * (math.log(4 / 3) - math.log(3 / 4)))
        ch = int(round(min(h, math.sqrt(area / aspect))))
        cw = int(round(min(w, math.sqrt(area * aspect))))
        top, left = int(r[2] * (h - ch)), int(r[3] * (w - cw))
        v = TF.resized_crop(images[i], top, left, max(ch, 1), max(cw, 1), [h, w], antialias=True)
        j = pc.jitter
        v = TF.adjust_brightness(v, 1 + j * (2 * r[4] - 1))
        v = TF.adjust_contrast(v, 1 + j * (2 * r[5] - 1)) if c in (1, 3) else v
        if r[6] < pc.blur_p:
            v = TF.gaussian_blur(v, [9, 9], [0.1 + 1.9 * r[7]])
        if torch.rand(1, generator=generator).item() < 0.5:
            v = TF.horizontal_flip(v)
        out.append(v)
    return torch.stack(out)


# ---------------------------------------------------------------------------------------------- the run
def pretrain(cfg: Config, out_dir: str | Path) -> dict[str, Any]:
    """Single-process contrastive pre-training on the training split of cfg.data; writes out_dir/encoder.pt,
    metrics.jsonl, config.yaml and a loss curve; returns a summary."""
    import types

    from tqdm import tqdm

    from engine.run import build_data, build_model, resolve_config
    from models.seg import SEG_SPECS
    cfg = resolve_config(cfg)
    pc = cfg.pretrain
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")
    seed_everything(cfg.train.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    single = types.SimpleNamespace(info=types.SimpleNamespace(is_main=True, rank=0, world_size=1),
                                   barrier=lambda: None)
    data = build_data(cfg, out_dir, single)
    train_set = data["train"]
    if len(train_set) < 2:
        raise ConfigError(f"data.root={cfg.data.root}: pretrain needs >= 2 training images, got {len(train_set)}")
    model = build_model(cfg).to(device).train()
    spec = SEG_SPECS.get(cfg.model.name)
    probe = train_set[0]["image_CHW"][None].to(device)
    if spec is not None and (probe.shape[-2] % spec.multiple or probe.shape[-1] % spec.multiple):
        raise ConfigError(f"data.input_hw: {tuple(probe.shape[-2:])} must be divisible by {spec.multiple} "
                          f"for {cfg.model.name}")
    layer, channels = pick_layer(model, probe, pc.layer)
    LOG.info("pretrain: features from '%s' (%d channels), bank %d x %d, T %.3g", layer, channels, pc.bank_size,
             pc.dim, pc.temperature)
    query = FeatureProjector(model, layer, channels, pc.dim).to(device)
    key = copy.deepcopy(query).requires_grad_(False) if pc.momentum > 0 else query
    bank = MemoryBank(pc.bank_size, pc.dim, seed=cfg.train.seed).to(device)
    opt = torch.optim.Adam(query.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    g = torch.Generator().manual_seed(cfg.train.seed)
    order = torch.randperm(len(train_set), generator=g).tolist()
    pos, rows, t0 = 0, [], time.perf_counter()
    with open(out_dir / "metrics.jsonl", "w") as log, tqdm(total=pc.steps, desc="pretrain", unit="step",
                                                            disable=not cfg.log.progress) as bar:
        for step in range(1, pc.steps + 1):
            idx = []
            while len(idx) < pc.batch_size:
                if pos == len(order):
                    order, pos = torch.randperm(len(train_set), generator=g).tolist(), 0
                idx.append(order[pos])
                pos += 1
            images = torch.stack([train_set[i]["image_CHW"] for i in idx]).to(device)
            v1, v2 = make_views(images, pc, g), make_views(images, pc, g)
            q = query(v1)
            with torch.no_grad():
                if key is not query:
                    for pk, pq in zip(key.parameters(), query.parameters()):
                        pk.mul_(pc.momentum).add_(pq.detach(), alpha=1 - pc.momentum)
                k = key(v2)
            loss = info_nce(q, k, bank.keys.clone(), pc.temperature)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{WHERE}: non-finite InfoNCE loss at step {step}; lower optim.lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bank.push(k)
            with torch.no_grad():
                pos_sim = float((q * k).sum(1).mean())
            row = {"step": step, "loss": float(loss.detach()), "pos_sim": pos_sim, "samples_per_s":
                   step * pc.batch_size / max(time.perf_counter() - t0, 1e-9)}
            rows.append(row)
            log.write(json.dumps(row) + "\n")
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.3f}")
    atomic_torch_save({"encoder": model.state_dict(), "projection": query.proj.state_dict(), "layer": layer,
                       "model": cfg.model.name, "model_args": dict(cfg.model.args), "config": cfg.to_dict(),
                       "versions": versions(), "steps": pc.steps}, out_dir / "encoder.pt")
    _plot(rows, out_dir / "pretrain_loss.png", math.log(pc.bank_size + 1))
    summary = {"encoder": str(out_dir / "encoder.pt"), "layer": layer, "first_loss": rows[0]["loss"],
               "last_loss": rows[-1]["loss"], "chance_loss": math.log(pc.bank_size + 1), "steps": pc.steps}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _plot(rows: list[dict], path: Path, chance: float) -> None:
    from matplotlib.figure import Figure

    from engine.plots import _save
    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot()
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="InfoNCE loss")
    ax.axhline(chance, color="grey", linestyle="--", label="chance: log(bank + 1)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)

"""Train both stages from a prepared cache (see ``models.prepare``).

    python -m models.train --cache var/cache/train --val-cache var/cache/val \\
        --out var/train/cspine-v1 --seg-steps 900 --frac-steps 1500 --threads 2

Fixed seeds (``--seed``), per-epoch validation logs, a progress bar, checkpoints of the best
validation score (``seg.pt``, ``frac.pt``) and ``history.json``. ``--device cuda --amp`` trains
with mixed precision on a GPU (real RSNA data); the shipped synthetic weights train on CPU.
Export with ``python -m models.export``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from models.arch import (
    FracConfig,
    FractureNet,
    SegConfig,
    SegUNet3D,
    count_parameters,
    seg_class_probabilities,
)
from models.config import default_preprocessing
from models.data import load_prepared
from service.evaluation import metrics
from service.inference.manifest import Preprocessing
from service.inference.pipeline import segmentation_labels

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- data


@dataclass
class Study:
    uid: str
    seg_image: np.ndarray
    seg_labels: np.ndarray
    stacks: np.ndarray
    stack_label: np.ndarray
    stack_target: np.ndarray
    slice_target: np.ndarray
    stack_canonical: np.ndarray
    fracture_mask: np.ndarray | None = None
    _centre: tuple[float, float] | None = None

    def spine_centre(self) -> tuple[float, float]:
        """In-plane (y, x) centroid of the labelled vertebrae on the segmentation grid."""
        if self._centre is None:
            yx = np.argwhere(self.seg_labels.any(axis=0))
            if len(yx):
                c = yx.mean(axis=0)
                self._centre = (float(c[0]), float(c[1]))
            else:
                self._centre = (self.seg_labels.shape[1] / 2, self.seg_labels.shape[2] / 2)
        return self._centre


def load_cache(paths: Sequence[Path], progress: bool = True, workers: int = 4) -> list[Study]:
    """Load prepared studies in threads (zlib and file reads release the GIL; a GPU run loads
    over a thousand studies), in the order given."""
    paths = list(paths)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        arrays = list(tqdm(pool.map(load_prepared, paths), total=len(paths),
                           desc="load cache", disable=not progress))
    return [Study(uid=path.stem, **a) for path, a in zip(paths, arrays, strict=True)]


def cache_files(cache: Path) -> list[Path]:
    """The prepared studies of a cache, without the temporary files of an interrupted run."""
    return sorted(p for p in cache.glob("*.npz") if not p.name.endswith(".tmp.npz"))


def split_by_uid(paths: Sequence[Path], val_fraction: float) -> tuple[list[Path], list[Path]]:
    """Deterministic split on a hash of the study UID (stable when studies are added)."""
    train, val = [], []
    for p in sorted(paths):
        bucket = zlib.crc32(p.stem.encode()) % 1000 / 1000.0
        (val if bucket < val_fraction else train).append(p)
    return train, val


def _pad_to(x: np.ndarray, shape: Sequence[int], value: float = 0) -> np.ndarray:
    pads = [(0, 0)] * (x.ndim - len(shape)) + [(0, max(0, s - n))
                                                for n, s in zip(x.shape[-len(shape):], shape,
                                                                strict=True)]
    return np.pad(x, pads, constant_values=value) if any(p[1] for p in pads) else x


def seg_batch(studies: Sequence[Study], rng: np.random.Generator, batch: int,
              patch: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Random patches (with random left-right flips and mild intensity jitter)."""
    images, labels = [], []
    for _ in range(batch):
        s = studies[int(rng.integers(len(studies)))]
        img = _pad_to(s.seg_image, patch)
        lab = _pad_to(s.seg_labels, patch)
        # z: anywhere; in plane: around the spine (a patch off the spine teaches nothing).
        starts = [int(rng.integers(0, lab.shape[0] - patch[0] + 1))]
        centre = s.spine_centre()
        for axis in (1, 2):
            n, p = lab.shape[axis], patch[axis]
            want = int(round(centre[axis - 1] - p / 2 + rng.integers(-8, 9)))
            starts.append(int(np.clip(want, 0, n - p)))
        sl = tuple(slice(a, a + p) for a, p in zip(starts, patch, strict=True))
        im = img[(slice(None), *sl)].astype(np.float32) / 255.0
        lb = lab[sl].astype(np.int64)
        if rng.random() < 0.5:
            im, lb = im[..., ::-1], lb[..., ::-1]
        im = im * rng.uniform(0.9, 1.1) + rng.uniform(-0.05, 0.05)
        images.append(np.ascontiguousarray(im))
        labels.append(np.ascontiguousarray(lb))
    return torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(labels))


@dataclass
class FracItems:
    study: np.ndarray
    index: np.ndarray
    target: np.ndarray
    positives: np.ndarray = field(init=False)
    negatives: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.positives = np.flatnonzero(self.target > 0.5)
        self.negatives = np.flatnonzero(self.target < 0.5)


def frac_items(studies: Sequence[Study], canonical_only: bool) -> FracItems:
    s_idx, i_idx, target = [], [], []
    for si, s in enumerate(studies):
        for i in range(len(s.stack_label)):
            if s.stack_target[i] < 0 or (canonical_only and not s.stack_canonical[i]):
                continue
            s_idx.append(si)
            i_idx.append(i)
            target.append(s.stack_target[i])
    return FracItems(np.array(s_idx, int), np.array(i_idx, int), np.array(target, np.float32))


def frac_batch(studies: Sequence[Study], items: FracItems, rng: np.random.Generator,
               batch: int, positive_fraction: float) -> tuple[torch.Tensor, ...]:
    """Draw a batch (crops mirrored at random): crops and masks stay ``uint8`` at full size
    and the per-crop intensity scale is returned, so that :func:`augment_stacks` and
    :func:`pool_masks` run on the training device (in numpy they were the step's
    bottleneck: 0.19 s for 64 crops, slower than a GPU step)."""
    chosen = []
    for _ in range(batch):
        pool = items.positives if (rng.random() < positive_fraction and len(items.positives)) \
            else items.negatives
        if not len(pool):
            pool = items.positives
        chosen.append(int(pool[int(rng.integers(len(pool)))]))
    first = studies[items.study[chosen[0]]].stacks[items.index[chosen[0]]]
    x = np.empty((len(chosen), *first.shape), np.uint8)
    masks = np.full((len(chosen), first.shape[0], *first.shape[-2:]), 255, np.uint8)
    y, ys = [], []
    for j, k in enumerate(chosen):
        s = studies[items.study[k]]
        i = items.index[k]
        flip = slice(None, None, -1 if rng.random() < 0.5 else 1)
        x[j] = s.stacks[i][..., flip]
        if s.fracture_mask is not None:  # else unknown (255) everywhere
            masks[j] = s.fracture_mask[i][..., flip]
        y.append(s.stack_target[i])
        ys.append(s.slice_target[i])
    scale = rng.uniform(0.92, 1.08, size=len(chosen)).astype(np.float32)
    return (torch.from_numpy(x), torch.tensor(np.array(y), dtype=torch.float32),
            torch.from_numpy(np.stack(ys).astype(np.float32)),
            torch.from_numpy(masks), torch.from_numpy(scale))


def pool_masks(masks: torch.Tensor) -> torch.Tensor:
    """Pixel fracture masks -> the fracture map's cells: a cell is positive if any pixel in
    it is; unknown (255) stays unknown (it is the largest value)."""
    b, n, h, w = masks.shape
    stride = FractureNet.PIXEL_STRIDE
    pooled = F.max_pool2d(masks.view(b * n, 1, h, w).float(), stride)
    return pooled.view(b, n, h // stride, w // stride).to(torch.uint8)


def augment_stacks(stacks: torch.Tensor, scale: torch.Tensor,
                   generator: torch.Generator) -> torch.Tensor:
    """``uint8`` crops -> [0, 1] floats with the intensity scale and Gaussian noise (sd 0.01,
    one field per slice shared by the windows) on every channel but the mask."""
    x = stacks.float() / 255.0
    b, n, _, h, w = x.shape
    noise = torch.randn((b, n, 1, h, w), generator=generator, device=x.device) * 0.01
    x[:, :, :-1] = torch.clamp(x[:, :, :-1] * scale.view(b, 1, 1, 1, 1) + noise, 0, 1)
    return x


# --------------------------------------------------------------------------- losses


JUNCTION_LABELS = (7, 8)
"""C7 and thoracic: the cervicothoracic junction, where the level is hardest to count."""


def seg_loss(raw: torch.Tensor, labels: torch.Tensor, config: SegConfig,
             junction_weight: float = 1.0) -> torch.Tensor:
    """The loss of either head (see :class:`models.arch.SegConfig`)."""
    if config.head == "ordinal":
        return ordinal_seg_loss(raw, labels, junction_weight)
    return softmax_seg_loss(raw, labels)


def ordinal_seg_loss(raw: torch.Tensor, labels: torch.Tensor,
                     junction_weight: float = 1.0) -> torch.Tensor:
    """Vertebra mask (BCE + soft Dice) plus smooth-L1 on the level inside the true mask.

    ``junction_weight`` counts C7 and thoracic voxels that many times in the level term.
    The net's costly error is C7 read as T1 (a C7 mask cut in half; the classifier then
    sees a cut bone edge and flags a fracture), and those voxels are a small share of a
    patch, so an unweighted mean barely sees it.
    """
    fg_target = (labels > 0).float()
    fg_logit = raw[:, 0].float()
    bce = F.binary_cross_entropy_with_logits(fg_logit, fg_target)
    fg = torch.sigmoid(fg_logit)
    dice = 1 - (2 * (fg * fg_target).sum() + 1.0) / (fg.sum() + fg_target.sum() + 1.0)
    inside = labels > 0
    if not inside.any():
        return bce + dice
    target = labels[inside]
    errors = F.smooth_l1_loss(raw[:, 1].float()[inside], target.float(), reduction="none")
    junction = torch.isin(target, torch.tensor(JUNCTION_LABELS, device=target.device))
    weights = torch.where(junction, junction_weight, 1.0).to(errors.dtype)
    level = (errors * weights).sum() / weights.sum()
    return bce + dice + level


def softmax_seg_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy plus soft Dice over the foreground classes present in the batch."""
    ce = F.cross_entropy(logits, labels)
    probs = torch.softmax(logits.float(), dim=1)
    onehot = F.one_hot(labels, logits.shape[1]).permute(0, 4, 1, 2, 3).float()
    dims = (0, 2, 3, 4)
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    present = onehot.sum(dims)[1:] > 0
    dice = (2 * inter[1:] + 1.0) / (denom[1:] + 1.0)
    dice_loss = (1 - dice[present]).mean() if present.any() else torch.zeros((), device=ce.device)
    return ce + dice_loss


def frac_loss(vertebra_logit: torch.Tensor, slice_logits: torch.Tensor, target: torch.Tensor,
              slice_target: torch.Tensor, pixel_logits: torch.Tensor | None = None,
              pixel_target: torch.Tensor | None = None, slice_weight: float = 0.5,
              pixel_weight: float = 1.0, pixel_pos_weight: float = 5.0) -> torch.Tensor:
    """Vertebra BCE + slice BCE (known slices) + fracture-map BCE (known maps)."""
    loss = F.binary_cross_entropy_with_logits(vertebra_logit.float(), target)
    known = slice_target >= 0
    if known.any():
        loss = loss + slice_weight * F.binary_cross_entropy_with_logits(
            slice_logits.float()[known], slice_target[known])
    if pixel_logits is not None and pixel_target is not None:
        known_px = pixel_target != 255
        if known_px.any():
            weight = torch.tensor(pixel_pos_weight, device=pixel_logits.device)
            loss = loss + pixel_weight * F.binary_cross_entropy_with_logits(
                pixel_logits.float()[known_px], pixel_target[known_px].float(),
                pos_weight=weight)
    return loss


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate_seg(net: SegUNet3D, studies: Sequence[Study], device: torch.device,
                 pre: Preprocessing) -> dict[str, float]:
    """Dice per class of the served label map (``segmentation_labels``: the same passes)."""
    net.eval()
    classes = len(pre.seg_classes)
    dices: dict[int, list[float]] = {c: [] for c in range(1, classes)}

    def predict(x: np.ndarray) -> np.ndarray:
        raw = net(torch.from_numpy(np.ascontiguousarray(x)).to(device))
        return seg_class_probabilities(raw, net.config).cpu().numpy()

    for s in studies:
        z, y, x = s.seg_labels.shape
        img = s.seg_image[:, :z, :y, :x].astype(np.float32) / 255.0
        pred = segmentation_labels(img, predict, pre)
        for c in dices:
            d = metrics.dice(s.seg_labels, pred, c)
            if d is not None:
                dices[c].append(d)
    per = {f"dice_{c}": float(np.mean(v)) for c, v in dices.items() if v}
    per["dice_mean_c1_c7"] = float(np.mean([per[f"dice_{c}"] for c in range(1, 8)
                                            if f"dice_{c}" in per]))
    if dices[7]:
        # The failure that costs specificity is per study (a C7 half read as T1), which a
        # mean over studies hides.
        per["c7_dice_below_half"] = float(np.mean(np.array(dices[7]) < 0.5))
    net.train()
    return per


@torch.no_grad()
def evaluate_frac(net: FractureNet, studies: Sequence[Study], device: torch.device,
                  batch: int = 32, flip_average: bool = False) -> dict[str, float]:
    """Vertebra- and patient-level AUC and log loss on the canonical crops of the cache.

    ``flip_average``: score each crop as the runtime does with ``crop_flip_average``.
    """
    net.eval()
    items = frac_items(studies, canonical_only=True)
    probs = np.zeros(len(items.target), np.float32)
    for start in range(0, len(items.target), batch):
        rows = range(start, min(start + batch, len(items.target)))
        x = torch.from_numpy(np.stack([studies[items.study[k]].stacks[items.index[k]]
                                       for k in rows]).astype(np.float32) / 255.0).to(device)
        p = torch.sigmoid(net(x)[0])
        if flip_average:
            p = (p + torch.sigmoid(net(torch.flip(x, dims=(-1,)))[0])) / 2
        probs[start:start + len(x)] = p.cpu().numpy()
    net.train()
    patient_p: dict[int, float] = {}
    patient_y: dict[int, float] = {}
    for k, p in enumerate(probs):
        si = int(items.study[k])
        patient_p[si] = max(patient_p.get(si, 0.0), float(p))
        patient_y[si] = max(patient_y.get(si, 0.0), float(items.target[k]))
    py = np.array(list(patient_y.values()))
    pp = np.array([patient_p[k] for k in patient_y])
    eps = 1e-6
    bce = -np.mean(items.target * np.log(probs + eps)
                   + (1 - items.target) * np.log(1 - probs + eps))
    return {
        "vertebra_auc": metrics.auc(items.target, probs).value or float("nan"),
        "patient_auc": metrics.auc(py, pp).value or float("nan"),
        "vertebra_bce": float(bce),
    }


# --------------------------------------------------------------------------- training loops


def _cosine(progress: float, step: int, base: float, warmup: int = 30) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 2 % over ``progress``."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _progress(step: int, total: int, started: float, budget_s: float | None) -> float:
    """Fraction of training done: by steps, or by time when a budget is set (whichever is
    further), so that the learning rate anneals fully even when the time budget binds."""
    by_steps = step / max(1, total)
    if budget_s is None:
        return by_steps
    return max(by_steps, (time.perf_counter() - started) / budget_s)


def _autocast(device: torch.device, amp: bool) -> Any:
    if not amp:
        return nullcontext()
    dtype = torch.bfloat16 if device.type == "cpu" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _batches(total: int, every: int) -> Iterator[tuple[int, bool]]:
    for step in range(total):
        yield step, (step + 1) % every == 0 or step + 1 == total


@dataclass
class TrainOptions:
    out: Path
    seg_steps: int = 900
    frac_steps: int = 1500
    seg_batch: int = 2
    seg_patch: tuple[int, int, int] = (72, 64, 64)
    frac_batch: int = 16
    positive_fraction: float = 0.35
    lr: float = 2e-3
    weight_decay: float = 1e-4
    eval_every: int = 150
    seed: int = 0
    device: str = "cpu"
    amp: bool = False
    progress: bool = True
    seg_config: SegConfig = field(default_factory=SegConfig)
    frac_config: FracConfig = field(default_factory=FracConfig)
    seg_budget_s: float | None = None
    """Stop the segmentation stage after this long (the LR schedule anneals to it)."""
    frac_budget_s: float | None = None
    """Same for the classifier stage."""
    seg_val_studies: int = 12
    """Validation volumes scored per segmentation evaluation (whole volumes are slow on CPU)."""
    seg_junction_weight: float = 1.0
    """Weight of C7 and thoracic voxels in the level loss (:func:`ordinal_seg_loss`)."""
    pre: Preprocessing = field(default_factory=default_preprocessing)
    """What the segmentation validation serves (``models.config``, written into the manifest)."""
    init_seg: Path | None = None
    """Start the segmentation net from this checkpoint (continued training)."""
    init_frac: Path | None = None
    """Start the classifier from this checkpoint."""


def train_seg(train: Sequence[Study], val: Sequence[Study], opts: TrainOptions,
              history: dict[str, Any]) -> SegUNet3D:
    device = torch.device(opts.device)
    rng = np.random.default_rng(opts.seed)
    torch.manual_seed(opts.seed)
    net = SegUNet3D(opts.seg_config)
    if opts.init_seg is not None:
        net.load_state_dict(torch.load(opts.init_seg, map_location="cpu",
                                       weights_only=False)["state"])
        logger.info("seg: continuing from %s", opts.init_seg)
    net = net.to(device)
    optim = torch.optim.AdamW(net.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
    scaler = torch.amp.GradScaler(enabled=opts.amp and device.type == "cuda")
    best = -math.inf
    log: list[dict[str, float]] = []
    started = time.perf_counter()
    running = 0.0
    bar = tqdm(total=opts.seg_steps, desc="seg", disable=not opts.progress)
    for step, evaluate in _batches(opts.seg_steps, opts.eval_every):
        progress = _progress(step, opts.seg_steps, started, opts.seg_budget_s)
        for group in optim.param_groups:
            group["lr"] = _cosine(progress, step, opts.lr)
        x, y = seg_batch(train, rng, opts.seg_batch, opts.seg_patch)
        with _autocast(device, opts.amp):
            loss = seg_loss(net(x.to(device)), y.to(device), opts.seg_config,
                            opts.seg_junction_weight)
        optim.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optim)
        scaler.update()
        running = 0.9 * running + 0.1 * loss.item() if step else loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{running:.3f}")
        over_time = (opts.seg_budget_s is not None
                     and _progress(step + 1, opts.seg_steps, started, opts.seg_budget_s) >= 1)
        if evaluate or over_time:
            scores = (evaluate_seg(net, val[:opts.seg_val_studies], device, opts.pre)
                      if val else {})
            entry = {"step": step + 1, "loss": running, "elapsed_s": time.perf_counter() - started,
                     **scores}
            log.append(entry)
            logger.info("seg epoch step %d: %s", step + 1,
                        {k: round(v, 4) for k, v in entry.items()})
            score = scores.get("dice_mean_c1_c7", -running)
            if score > best:
                best = score
                torch.save({"config": opts.seg_config.as_dict(), "state": net.state_dict(),
                            "step": step + 1, "val": scores}, opts.out / "seg.pt")
        if over_time:
            logger.warning("seg: time budget reached at step %d", step + 1)
            break
    bar.close()
    history["seg"] = {"log": log, "best": best, "seconds": time.perf_counter() - started,
                      "parameters": count_parameters(net)}
    state = torch.load(opts.out / "seg.pt", map_location="cpu", weights_only=False)
    net.load_state_dict(state["state"])
    return net.cpu().eval()


def train_frac(train: Sequence[Study], val: Sequence[Study], opts: TrainOptions,
               history: dict[str, Any]) -> FractureNet:
    device = torch.device(opts.device)
    rng = np.random.default_rng(opts.seed + 1)
    torch.manual_seed(opts.seed + 1)
    noise = torch.Generator(device=device).manual_seed(opts.seed + 2)
    net = FractureNet(opts.frac_config)
    if opts.init_frac is not None:
        net.load_state_dict(torch.load(opts.init_frac, map_location="cpu",
                                       weights_only=False)["state"])
        logger.info("frac: continuing from %s", opts.init_frac)
    net = net.to(device)
    optim = torch.optim.AdamW(net.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
    scaler = torch.amp.GradScaler(enabled=opts.amp and device.type == "cuda")
    items = frac_items(train, canonical_only=False)
    logger.info("frac: %d training crops (%d positive)", len(items.target),
                len(items.positives))
    best = -math.inf
    log: list[dict[str, float]] = []
    started = time.perf_counter()
    running = 0.0
    bar = tqdm(total=opts.frac_steps, desc="frac", disable=not opts.progress)
    for step, evaluate in _batches(opts.frac_steps, opts.eval_every):
        progress = _progress(step, opts.frac_steps, started, opts.frac_budget_s)
        for group in optim.param_groups:
            group["lr"] = _cosine(progress, step, opts.lr)
        x, y, ys, masks, scale = frac_batch(train, items, rng, opts.frac_batch,
                                            opts.positive_fraction)
        x = augment_stacks(x.to(device, non_blocking=True), scale.to(device), noise)
        with _autocast(device, opts.amp):
            v_logit, s_logits, p_logits = net.forward_all(x)
            loss = frac_loss(v_logit, s_logits, y.to(device), ys.to(device), p_logits,
                             pool_masks(masks.to(device)))
        optim.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optim)
        scaler.update()
        running = 0.9 * running + 0.1 * loss.item() if step else loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{running:.3f}")
        over_time = (opts.frac_budget_s is not None
                     and _progress(step + 1, opts.frac_steps, started, opts.frac_budget_s) >= 1)
        if evaluate or over_time:
            scores = (evaluate_frac(net, val, device, flip_average=opts.pre.crop_flip_average)
                      if val else {})
            entry = {"step": step + 1, "loss": running, "elapsed_s": time.perf_counter() - started,
                     **scores}
            log.append(entry)
            logger.info("frac epoch step %d: %s", step + 1,
                        {k: round(v, 4) for k, v in entry.items()})
            score = (float(np.nan_to_num(scores.get("patient_auc", 0.0)))
                     + float(np.nan_to_num(scores.get("vertebra_auc", 0.0)))
                     - 0.1 * scores.get("vertebra_bce", 0.0)) if scores else -running
            if score > best:
                best = score
                torch.save({"config": opts.frac_config.as_dict(), "state": net.state_dict(),
                            "step": step + 1, "val": scores}, opts.out / "frac.pt")
        if over_time:
            logger.warning("frac: time budget reached at step %d", step + 1)
            break
    bar.close()
    history["frac"] = {"log": log, "best": best, "seconds": time.perf_counter() - started,
                       "parameters": count_parameters(net), "crops": int(len(items.target)),
                       "positive_crops": int(len(items.positives))}
    state = torch.load(opts.out / "frac.pt", map_location="cpu", weights_only=False)
    net.load_state_dict(state["state"])
    return net.cpu().eval()


def train(train_studies: Sequence[Study], val_studies: Sequence[Study], opts: TrainOptions,
          stages: Sequence[str] = ("seg", "frac")) -> dict[str, Any]:
    """Train the requested stages; checkpoints and history.json land in ``opts.out``."""
    opts.out.mkdir(parents=True, exist_ok=True)
    history: dict[str, Any] = {"train_studies": len(train_studies),
                               "val_studies": len(val_studies), "seed": opts.seed,
                               "device": opts.device, "threads": torch.get_num_threads()}
    started = time.perf_counter()
    if "seg" in stages:
        train_seg(train_studies, val_studies, opts, history)
    if "frac" in stages:
        train_frac(train_studies, val_studies, opts, history)
    history["seconds"] = time.perf_counter() - started
    return merge_history(opts.out, history)


def merge_history(out: Path, history: dict[str, Any]) -> dict[str, Any]:
    """Merge into ``out/history.json`` under a lock: the two stages may train at the same
    time into one directory (``--stages seg`` and ``--stages frac``, a core each)."""
    import fcntl

    with open(out / "history.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        previous = out / "history.json"
        if previous.exists():
            old = json.loads(previous.read_text())
            old.update(history)
            history = old
        previous.write_text(json.dumps(history, indent=2))
    return history


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, required=True, help="prepared training studies")
    parser.add_argument("--val-cache", type=Path, help="prepared validation studies")
    parser.add_argument("--val-fraction", type=float, default=0.2,
                        help="split off this fraction of --cache when --val-cache is absent")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--stages", default="seg,frac")
    parser.add_argument("--seg-steps", type=int, default=900)
    parser.add_argument("--frac-steps", type=int, default=1500)
    parser.add_argument("--seg-batch", type=int, default=2)
    parser.add_argument("--frac-batch", type=int, default=16)
    parser.add_argument("--eval-every", type=int, default=150)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--amp", action="store_true", help="mixed precision")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch")
    parser.add_argument("--seg-minutes", type=float, default=None,
                        help="time budget of the segmentation stage (keeps the best checkpoint)")
    parser.add_argument("--frac-minutes", type=float, default=None,
                        help="time budget of the classifier stage")
    parser.add_argument("--seg-patch", default="72,64,64",
                        help="segmentation training patch z,y,x (voxels of the coarse grid)")
    parser.add_argument("--seg-val-studies", type=int, default=12,
                        help="validation volumes scored at each segmentation evaluation")
    parser.add_argument("--seg-junction-weight", type=float, default=1.0,
                        help="weight of C7 and thoracic voxels in the level loss")
    parser.add_argument("--no-pixel-head", action="store_true",
                        help="classifier without the fracture-map head (vertebra and slice "
                             "labels only; for studies without fracture boxes)")
    parser.add_argument("--init-seg", type=Path, help="continue from this seg checkpoint")
    parser.add_argument("--init-frac", type=Path, help="continue from this frac checkpoint")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True  # fixed crop shapes: pick the fastest kernels
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    np.random.seed(args.seed)
    paths = cache_files(args.cache)
    if args.val_cache:
        train_paths, val_paths = paths, cache_files(args.val_cache)
    else:
        train_paths, val_paths = split_by_uid(paths, args.val_fraction)
    logger.info("train %d studies, validate on %d", len(train_paths), len(val_paths))
    progress = not args.no_progress
    train_studies = load_cache(train_paths, progress)
    val_studies = load_cache(val_paths, progress)
    pre = default_preprocessing()
    opts = TrainOptions(
        out=args.out, seg_steps=args.seg_steps, frac_steps=args.frac_steps,
        seg_batch=args.seg_batch, frac_batch=args.frac_batch, eval_every=args.eval_every,
        seg_patch=tuple(int(v) for v in args.seg_patch.split(",")),  # type: ignore[arg-type]
        lr=args.lr, seed=args.seed, device=args.device, amp=args.amp, progress=progress,
        seg_config=SegConfig(in_channels=len(pre.windows), classes=len(pre.seg_classes)),
        frac_config=FracConfig(in_channels=pre.frac_channels, pixel_head=not args.no_pixel_head),
        seg_budget_s=args.seg_minutes * 60 if args.seg_minutes else None,
        frac_budget_s=args.frac_minutes * 60 if args.frac_minutes else None,
        init_seg=args.init_seg, init_frac=args.init_frac, pre=pre,
        seg_val_studies=args.seg_val_studies, seg_junction_weight=args.seg_junction_weight)
    history = train(train_studies, val_studies, opts, stages=args.stages.split(","))
    logger.info("done in %.0f s; history in %s", history["seconds"], args.out / "history.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())

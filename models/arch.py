"""The two networks of the cervical-spine model (PyTorch; exported to ONNX for the runtime).

Stage 1, :class:`SegUNet3D`: a small 3D U-Net on the whole neck resampled to a coarse
isotropic grid (about 2.5 mm), input (batch, windows, z, y, x), output per-voxel logits for
background, C1..C7 and "thoracic" (any T level, so that C7 is not confused with T1). A 3D net
sees the skull base and the thoracic cage together with each vertebra, which is what tells C3
from C5; a per-axial-slice net cannot.

Stage 2, :class:`FractureNet`: a 2.5D classifier on a fixed number of axial slices through one
vertebra. Each slice (window channels plus the vertebra's mask) goes through a small CNN; a
bidirectional GRU runs along the slices; one head scores each slice (localisation, key
images) and an attention-pooled head gives the vertebra's fracture logit. Input
(batch, slices, channels, height, width); batch and slice count are dynamic in the export.

Both are sized for CPU: together well under 30 MB of ONNX, trainable on 2 cores in an hour
on synthetic data.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch
from torch import nn

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SegConfig:
    in_channels: int = 3
    classes: int = 9
    """Background, C1..C7, thoracic."""
    widths: tuple[int, ...] = (8, 16, 32, 64)
    """Channels per level; the input size must be divisible by 2 ** (len(widths) - 1)."""
    head: str = "ordinal"
    """"softmax": one logit per class. "ordinal": a vertebra-vs-background logit and the
    level as a continuous value (1 = C1 ... 8 = thoracic). Levels are ordered along the
    spine, so regressing the level lets the net interpolate between landmarks (skull base,
    dens, ribs) instead of learning seven look-alike classes separately; it learns the
    counting in far fewer steps. The export turns either head into class probabilities."""
    ordinal_sharpness: float = 6.0
    """Softness of the level -> class mapping of the ordinal head (higher: crisper)."""

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class FracConfig:
    in_channels: int = 4
    """Window channels plus the vertebra mask."""
    widths: tuple[int, ...] = (16, 32, 48, 64)
    feature: int = 64
    hidden: int = 48
    """GRU hidden size per direction."""
    dropout: float = 0.2
    pixel_head: bool = True
    """A fracture map per slice (at 1/4 of the crop size) from the early features. Training
    supervises it with the fracture boxes (dense signal: far fewer steps than the vertebra
    label alone), and its maximum is each slice's evidence, so the slice and vertebra scores
    rest on where the fracture is (multiple-instance pooling)."""

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


class _ConvBlock3d(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv3d(cin, cout, 3, padding=1, bias=False),
            nn.InstanceNorm3d(cout, affine=True),
            nn.LeakyReLU(0.1, inplace=True),
            nn.Conv3d(cout, cout, 3, padding=1, bias=False),
            nn.InstanceNorm3d(cout, affine=True),
            nn.LeakyReLU(0.1, inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.body(x)
        return out


class SegUNet3D(nn.Module):
    """3D U-Net: (B, C, Z, Y, X) -> (B, classes, Z, Y, X) logits."""

    def __init__(self, config: SegConfig | None = None) -> None:
        super().__init__()
        self.config = config or SegConfig()
        widths = self.config.widths
        self.down = nn.ModuleList()
        cin = self.config.in_channels
        for w in widths:
            self.down.append(_ConvBlock3d(cin, w))
            cin = w
        self.pool = nn.MaxPool3d(2)
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for w_skip, w_in in zip(reversed(widths[:-1]), reversed(widths[1:]), strict=True):
            self.up.append(nn.ConvTranspose3d(w_in, w_skip, 2, stride=2))
            self.dec.append(_ConvBlock3d(2 * w_skip, w_skip))
        outputs = 2 if self.config.head == "ordinal" else self.config.classes
        self.head = nn.Conv3d(widths[0], outputs, 1)

    @property
    def divisor(self) -> int:
        return 2 ** (len(self.config.widths) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips: list[torch.Tensor] = []
        for i, block in enumerate(self.down):
            x = block(x)
            if i < len(self.down) - 1:
                skips.append(x)
                x = self.pool(x)
        for up, dec in zip(self.up, self.dec, strict=True):
            x = up(x)
            x = dec(torch.cat([x, skips.pop()], dim=1))
        out: torch.Tensor = self.head(x)
        return out


class _ConvBlock2d(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.body(x)
        return out


class FractureNet(nn.Module):
    """(B, S, C, H, W) -> (vertebra logit (B,), slice logits (B, S)).

    :meth:`forward_all` also returns the per-slice fracture map (B, S, H/4, W/4) logits
    that training supervises; the export uses :meth:`forward`.
    """

    PIXEL_STRIDE = 4

    def __init__(self, config: FracConfig | None = None) -> None:
        super().__init__()
        self.config = config or FracConfig()
        c = self.config
        self.blocks = nn.ModuleList()
        cin = c.in_channels
        for w in c.widths:
            self.blocks.append(_ConvBlock2d(cin, w))
            cin = w
        self.pixel = (nn.Sequential(nn.Conv2d(c.widths[1], 16, 3, padding=1),
                                    nn.ReLU(inplace=True), nn.Conv2d(16, 1, 1))
                      if c.pixel_head else None)
        self.project = nn.Sequential(nn.Linear(2 * cin, c.feature), nn.ReLU(inplace=True),
                                     nn.Dropout(c.dropout))
        self.gru = nn.GRU(c.feature, c.hidden, batch_first=True, bidirectional=True)
        self.slice_head = nn.Linear(2 * c.hidden, 1)
        self.attention = nn.Linear(2 * c.hidden, 1)
        self.vertebra_head = nn.Sequential(nn.Dropout(c.dropout), nn.Linear(4 * c.hidden, 1))

    def forward_all(self, x: torch.Tensor,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        b, s = x.shape[0], x.shape[1]
        f = x.flatten(0, 1)
        pixel: torch.Tensor | None = None
        for i, block in enumerate(self.blocks):
            f = block(f)
            if i == 1 and self.pixel is not None:
                pixel = self.pixel(f)
        # Mean and max pooling: a fracture line is small, the mean alone would dilute it.
        g = torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], dim=1)
        g = self.project(g).reshape(b, s, -1)
        h, _ = self.gru(g)
        slice_logits = self.slice_head(h).squeeze(-1)
        weights = torch.softmax(self.attention(h).squeeze(-1), dim=1)
        pooled = torch.cat([(weights.unsqueeze(-1) * h).sum(dim=1), h.amax(dim=1)], dim=1)
        vertebra_logit = self.vertebra_head(pooled).squeeze(-1)
        pixel_map = None
        if pixel is not None:
            pixel_map = pixel.reshape(b, s, pixel.shape[-2], pixel.shape[-1])
            evidence = pixel_map.amax(dim=(2, 3))
            slice_logits = slice_logits + evidence
            # Smooth maximum over slices: the vertebra is as fractured as its worst slice.
            # log(S) from a tensor, not a Python int, so the export keeps S dynamic.
            count = torch.ones_like(evidence).sum(dim=1)
            vertebra_logit = vertebra_logit + torch.logsumexp(evidence, dim=1) - torch.log(count)
        return vertebra_logit, slice_logits, pixel_map

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vertebra_logit, slice_logits, _ = self.forward_all(x)
        return vertebra_logit, slice_logits


def seg_class_probabilities(raw: torch.Tensor, config: SegConfig) -> torch.Tensor:
    """Raw head output -> (B, classes, ...) probabilities (background first).

    Ordinal head: P(background) = 1 - sigmoid(fg); P(class k) = sigmoid(fg) * w_k with
    w = softmax_k(-sharpness * |level - k|) over k = 1..classes-1.
    """
    if config.head != "ordinal":
        return torch.softmax(raw, dim=1)
    fg = torch.sigmoid(raw[:, :1])
    level = raw[:, 1:2]
    ks = torch.arange(1, config.classes, dtype=raw.dtype, device=raw.device)
    ks = ks.reshape(1, -1, *([1] * (raw.dim() - 2)))
    weights = torch.softmax(-config.ordinal_sharpness * torch.abs(level - ks), dim=1)
    return torch.cat([1 - fg, fg * weights], dim=1)


class SegExport(nn.Module):
    """What ``seg.onnx`` computes: class probabilities (background, C1..C7, thoracic)."""

    def __init__(self, net: SegUNet3D) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return seg_class_probabilities(self.net(image), self.net.config)


class FracExport(nn.Module):
    """What ``frac.onnx`` computes: sigmoid probabilities for the vertebra and each slice."""

    def __init__(self, net: FractureNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, stack: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vertebra_logit, slice_logits = self.net(stack)
        return torch.sigmoid(vertebra_logit), torch.sigmoid(slice_logits)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())

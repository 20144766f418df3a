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
        self.head = nn.Conv3d(widths[0], self.config.classes, 1)

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
    """(B, S, C, H, W) -> (vertebra logit (B,), slice logits (B, S))."""

    def __init__(self, config: FracConfig | None = None) -> None:
        super().__init__()
        self.config = config or FracConfig()
        c = self.config
        layers: list[nn.Module] = []
        cin = c.in_channels
        for w in c.widths:
            layers.append(_ConvBlock2d(cin, w))
            cin = w
        self.encoder = nn.Sequential(*layers)
        self.project = nn.Sequential(nn.Linear(2 * cin, c.feature), nn.ReLU(inplace=True),
                                     nn.Dropout(c.dropout))
        self.gru = nn.GRU(c.feature, c.hidden, batch_first=True, bidirectional=True)
        self.slice_head = nn.Linear(2 * c.hidden, 1)
        self.attention = nn.Linear(2 * c.hidden, 1)
        self.vertebra_head = nn.Sequential(nn.Dropout(c.dropout), nn.Linear(4 * c.hidden, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, s = x.shape[0], x.shape[1]
        f = self.encoder(x.flatten(0, 1))
        # Mean and max pooling: a fracture line is small, the mean alone would dilute it.
        f = torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], dim=1)
        f = self.project(f).reshape(b, s, -1)
        h, _ = self.gru(f)
        slice_logits = self.slice_head(h).squeeze(-1)
        weights = torch.softmax(self.attention(h).squeeze(-1), dim=1)
        pooled = torch.cat([(weights.unsqueeze(-1) * h).sum(dim=1), h.amax(dim=1)], dim=1)
        vertebra_logit = self.vertebra_head(pooled).squeeze(-1)
        return vertebra_logit, slice_logits


class SegExport(nn.Module):
    """What ``seg.onnx`` computes: logits -> softmax probabilities over the classes."""

    def __init__(self, net: SegUNet3D) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(image), dim=1)


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

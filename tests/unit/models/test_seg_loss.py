"""The segmentation's ordinal loss, and the weight it puts on the cervicothoracic junction."""

from __future__ import annotations

import torch

from models.train import ordinal_seg_loss


def _labels() -> torch.Tensor:
    labels = torch.zeros((1, 4, 4, 4), dtype=torch.long)
    labels[0, 0] = 5  # a C5 slab
    labels[0, 1] = 7  # C7
    labels[0, 2] = 8  # thoracic
    return labels


def _raw(labels: torch.Tensor, c7_level: float) -> torch.Tensor:
    """A confident foreground and the true level everywhere, except C7 read as ``c7_level``."""
    raw = torch.zeros((1, 2, 4, 4, 4))
    raw[:, 0] = torch.where(labels[0] > 0, 8.0, -8.0)
    raw[:, 1] = labels[0].float()
    raw[0, 1][labels[0] == 7] = c7_level
    return raw


def test_unit_weight_is_the_plain_mean_of_the_level_errors() -> None:
    labels = _labels()
    perfect = ordinal_seg_loss(_raw(labels, 7.0), labels)
    wrong = ordinal_seg_loss(_raw(labels, 8.0), labels)
    # One of the three labelled slabs is off by one level: smooth-L1 0.5 on a third.
    assert float(wrong - perfect) == torch.tensor(0.5 / 3).item()


def test_junction_weight_makes_c7_read_as_thoracic_cost_more() -> None:
    labels = _labels()
    perfect = ordinal_seg_loss(_raw(labels, 7.0), labels, junction_weight=3.0)
    wrong = ordinal_seg_loss(_raw(labels, 8.0), labels, junction_weight=3.0)
    # Weights C5 1, C7 3, thoracic 3: the C7 error is 3/7 of the level term.
    assert abs(float(wrong - perfect) - 0.5 * 3 / 7) < 1e-6
    plain = ordinal_seg_loss(_raw(labels, 8.0), labels) - ordinal_seg_loss(_raw(labels, 7.0),
                                                                           labels)
    assert float(wrong - perfect) > float(plain)


def test_a_patch_without_vertebrae_has_no_level_term() -> None:
    labels = torch.zeros((1, 4, 4, 4), dtype=torch.long)
    raw = torch.zeros((1, 2, 4, 4, 4))
    raw[:, 0] = -8.0
    far = raw.clone()
    far[:, 1] = 100.0  # any level: nothing to count
    assert float(ordinal_seg_loss(far, labels, junction_weight=3.0)) == float(
        ordinal_seg_loss(raw, labels, junction_weight=3.0))

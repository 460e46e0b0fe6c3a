"""Each loss against its formula, computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from torchkiln.errors import ConfigError
from torchkiln.losses import (
    F1Loss,
    FocalLoss,
    LabelSmoothingLoss,
    ListNetLoss,
    WeightedSum,
    balanced_class_weights,
    balanced_pos_weight,
    from_specs,
    make_loss,
)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(12, 4, generator=g, dtype=torch.float64), torch.randint(0, 4, (12,), generator=g)


def test_focal_with_gamma_zero_is_cross_entropy(batch):
    logits, y = batch
    assert FocalLoss(gamma=0)(logits, y).item() == pytest.approx(nn.CrossEntropyLoss()(logits, y).item(), rel=1e-6)
    w = [0.5, 2.0, 1.0, 3.0]
    weighted = nn.CrossEntropyLoss(weight=torch.tensor(w, dtype=torch.float64))(logits, y)
    assert FocalLoss(gamma=0, alpha=w)(logits, y).item() == pytest.approx(weighted.item(), rel=1e-6)


def test_focal_matches_its_formula_by_hand(batch):
    logits, y = batch
    gamma, alpha = 2.0, 0.25
    total = 0.0
    for row, t in zip(logits.tolist(), y.tolist()):
        p = math.exp(row[t]) / sum(math.exp(v) for v in row)
        total += -alpha * (1 - p) ** gamma * math.log(p)
    assert FocalLoss(gamma=gamma, alpha=alpha)(logits, y).item() == pytest.approx(total / len(y), rel=1e-6)


def test_focal_gradient_passes_gradcheck(batch):
    logits, y = batch
    logits = logits.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: FocalLoss(gamma=2.0, alpha=[1.0, 2.0, 0.5, 1.0])(x, y), (logits,))
    targets = (torch.rand(12, 4, dtype=torch.float64) > 0.5).double()
    assert torch.autograd.gradcheck(lambda x: FocalLoss(gamma=1.5, alpha=0.25)(x, targets), (logits,))


def test_multilabel_focal_equals_torchvision(batch):
    from torchvision.ops import sigmoid_focal_loss

    logits, _ = batch
    targets = (torch.rand(12, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) > 0.5).double()
    expected = sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0, reduction="mean")
    assert FocalLoss(gamma=2.0, alpha=0.25)(logits, targets).item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_label_smoothing_equals_cross_entropy_option(batch, eps):
    logits, y = batch
    expected = nn.CrossEntropyLoss(label_smoothing=eps)(logits, y)
    assert LabelSmoothingLoss(eps)(logits, y).item() == pytest.approx(expected.item(), rel=1e-6)


def test_f1_loss_is_one_minus_soft_macro_f1(batch):
    logits, y = batch
    p = logits.softmax(1).numpy()
    onehot = np.eye(4)[y.numpy()]
    f1s = []
    for c in range(4):
        tp = (p[:, c] * onehot[:, c]).sum()
        fp = (p[:, c] * (1 - onehot[:, c])).sum()
        fn = ((1 - p[:, c]) * onehot[:, c]).sum()
        f1s.append(2 * tp / (2 * tp + fp + fn))
    assert F1Loss(eps=0.0)(logits, y).item() == pytest.approx(1 - np.mean(f1s), rel=1e-6)
    # Confident and right -> near 0; multi-label targets use sigmoid.
    assert F1Loss()(torch.eye(4) * 50, torch.arange(4)).item() < 1e-6
    assert F1Loss()(torch.full((3, 2), 50.0), torch.ones(3, 2)).item() < 1e-6


def test_weighted_sum_is_the_sum_of_its_parts(batch):
    logits, y = batch
    specs = [{"type": "FocalLoss", "weight": 0.7, "args": {"gamma": 2}}, {"type": "F1Loss", "weight": 0.3}]
    loss = from_specs(specs)
    assert isinstance(loss, WeightedSum)
    expected = 0.7 * FocalLoss(gamma=2)(logits, y) + 0.3 * F1Loss()(logits, y)
    assert loss(logits, y).item() == pytest.approx(expected.item(), rel=1e-6)


def test_torch_losses_by_name_with_list_arguments(batch):
    logits, y = batch
    ce = make_loss("CrossEntropyLoss", {"weight": [1, 2, 3, 4], "label_smoothing": 0.1})
    expected = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2, 3, 4]), label_smoothing=0.1)
    assert ce(logits.float(), y).item() == pytest.approx(expected(logits.float(), y).item(), rel=1e-6)
    bce = make_loss("BCEWithLogitsLoss", {"pos_weight": [2.0, 1.0]})
    x, t = torch.randn(5, 2), torch.ones(5, 2)
    assert bce(x, t).item() == pytest.approx((-2 * torch.log(torch.sigmoid(x[:, 0]))).mean().item() / 2
                                             + (-torch.log(torch.sigmoid(x[:, 1]))).mean().item() / 2, rel=1e-5)
    for name in ("MSELoss", "L1Loss", "SmoothL1Loss", "HuberLoss"):
        assert isinstance(make_loss(name), getattr(nn, name))


def test_balanced_weights_match_sklearn():
    from sklearn.utils.class_weight import compute_class_weight

    y = torch.tensor([0] * 50 + [1] * 10 + [2] * 5)
    expected = compute_class_weight("balanced", classes=np.arange(3), y=y.numpy())
    np.testing.assert_allclose(balanced_class_weights(y, 3).numpy(), expected, rtol=1e-6)
    assert balanced_class_weights(y, 4)[3] == 0  # a class without samples gets no weight
    multi = torch.tensor([[1, 0], [1, 0], [0, 0], [1, 1]])
    np.testing.assert_allclose(balanced_pos_weight(multi).numpy(), [1 / 3, 3.0], rtol=1e-6)
    loss = make_loss("CrossEntropyLoss", {"weight": "balanced"}, labels=lambda: y, num_classes=3)
    np.testing.assert_allclose(loss.weight.numpy(), expected, rtol=1e-6)
    with pytest.raises(ConfigError, match="'balanced' needs the training labels"):
        make_loss("CrossEntropyLoss", {"weight": "balanced"})
    with pytest.raises(ConfigError, match="expected a number, a list or 'balanced'"):
        make_loss("CrossEntropyLoss", {"weight": "balance"}, labels=lambda: y)


def test_listnet_by_hand():
    scores = torch.tensor([2.0, 0.5, -1.0, 0.3, 0.1], dtype=torch.float64)
    rel = torch.tensor([2.0, 1.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    group = torch.tensor([7, 7, 7, 3, 3])
    expected = 0.0
    for idx in ([0, 1, 2], [3, 4]):
        pt = rel[idx].softmax(0)
        expected += -(pt * scores[idx].log_softmax(0)).sum().item()
    assert ListNetLoss()(scores, rel, group).item() == pytest.approx(expected / 2, rel=1e-6)

import pytest
import torch

from genserve.models.nade import NADE, NADEConfig
from tests.models.test_image import (
    check_autoregressive,
    check_onnx,
    randomise,
)

torch.set_num_threads(1)

CASES = [(2, 0), (3, 0), (2, 3), (3, 2)]  # (levels, n_classes)


def make(height: int = 2, width: int = 2, levels: int = 2, n_classes: int = 0, hidden: int = 6) -> NADE:
    return randomise(NADE(NADEConfig(height=height, width=width, levels=levels, n_classes=n_classes, hidden=hidden)))


@pytest.mark.parametrize(("levels", "n_classes"), CASES)
def test_autoregressive_in_raster_order(levels, n_classes):
    model = make(3, 4, levels, n_classes)
    model.block = 5  # across blocks too
    labels = torch.arange(4) % n_classes if n_classes else None
    check_autoregressive(lambda values: model._logits_from_values(values, labels), torch.arange(12), 12)


def test_blocks_do_not_change_the_logits():
    """Pixel blocks of 1, 5 (uneven) and all at once give the same logits and gradients."""
    x = torch.randint(0, 3, (4, 3, 4), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 1, 0])
    results = []
    for block in (1, 5, 12):
        model = make(3, 4, 3, 2, hidden=7)
        model.block = block
        logits = model.pixel_logits(x, labels)
        (grad,) = torch.autograd.grad(logits.square().sum(), model.W)
        results.append((logits.detach(), grad))
    for logits, grad in results[1:]:
        torch.testing.assert_close(logits, results[0][0], atol=1e-12, rtol=0)
        torch.testing.assert_close(grad, results[0][1], atol=1e-10, rtol=0)


@torch.no_grad()
def test_logits_match_the_definition():
    """h_i = sigmoid(c + e_y + W[:, <i] x_<i), logits_i = V_i h_i + b_i, pixel by pixel."""
    model = make(2, 3, 3, 2, hidden=5)
    x = torch.randint(0, 3, (3, 2, 3), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([1, 0, 1])
    logits = model.pixel_logits(x, labels)
    v = model.scaled(x).flatten(1)
    for i in range(6):
        h = torch.sigmoid(model.c + model.class_embedding(labels) + v[:, :i] @ model.W[:, :i].T)
        torch.testing.assert_close(logits[:, i], h @ model.V[i].T + model.b[i], atol=1e-12, rtol=0)


@pytest.mark.parametrize("n_classes", [0, 3])
def test_onnx(n_classes):
    model = make(3, 2, 3, n_classes)
    model.block = 4  # two blocks, one of them short
    check_onnx(model.float())

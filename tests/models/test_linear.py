"""models/linear.py: oneDNN computes what F.linear does, only where no gradient is wanted, and only for products
large enough to gain; a GPT decoding with every layer on oneDNN gives the logits MKL gives."""

import pytest
import torch
import torch.nn.functional as F

import genserve.models.linear as ml
from genserve.models.gpt import GPT, GPTConfig

pytestmark = pytest.mark.skipif(not ml.ONEDNN, reason="this torch build has no oneDNN linear")


@pytest.fixture
def everything_on_onednn(monkeypatch):
    """Thresholds at zero: every float32 CPU product without gradient goes to oneDNN."""
    for name in ("ONEDNN_MIN_MACS", "ONEDNN_MIN_MACS_NARROW", "ONEDNN_MIN_WIDTH"):
        monkeypatch.setattr(ml, name, 0)


@pytest.mark.parametrize("shape", [(1, 768), (4, 1, 768), (3, 17, 768)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_onednn_equals_f_linear(shape, with_bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g)
    weight = torch.randn(1024, 768, generator=g)
    bias = torch.randn(1024, generator=g) if with_bias else None
    with torch.inference_mode():
        assert ml.uses_onednn(x, weight) == (x.numel() * 1024 >= ml.ONEDNN_MIN_MACS)
        got = ml.linear(x, weight, bias)
    want = (x.double() @ weight.double().T + (0 if bias is None else bias.double())).float()
    assert got.shape == (*shape[:-1], 1024)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_non_contiguous_inputs(everything_on_onednn):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 8, generator=g).T  # (8, 64), a transposed view
    weight = torch.randn(256, 64, generator=g)
    with torch.no_grad():
        assert ml.uses_onednn(x, weight)
        torch.testing.assert_close(ml.linear(x, weight), F.linear(x, weight), rtol=1e-5, atol=1e-5)


def test_training_small_products_and_other_dtypes_stay_on_f_linear():
    weight = torch.randn(1024, 768, requires_grad=True)
    x = torch.randn(8, 768)
    assert not ml.uses_onednn(x, weight)  # a gradient is wanted: autograd needs F.linear
    ml.linear(x, weight).sum().backward()
    torch.testing.assert_close(weight.grad, x.sum(0).expand(1024, 768))
    with torch.no_grad():
        assert ml.uses_onednn(x, weight)
        assert not ml.uses_onednn(x[:1, :128], torch.randn(384, 128))  # 49k multiply-adds: MKL is quicker
        assert not ml.uses_onednn(x.double(), weight.double())  # oneDNN here is float32 only
        assert ml.uses_onednn(torch.randn(4096, 128), torch.randn(384, 128))  # narrow, but many rows


def test_gpt_decoding_on_onednn_matches_recomputation_on_mkl(everything_on_onednn, monkeypatch):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=97, context_length=32, n_layer=2, n_head=4, n_embd=64)).eval()
    tokens = torch.randint(0, 97, (2, 6))
    with torch.inference_mode():
        cache = model.allocate(slots=2, max_len=32)
        slots = torch.tensor([1, 0])
        steps = [model.prefill(cache, slots, tokens, torch.tensor([6, 6]))]
        nxt = torch.randint(0, 97, (2, 5))
        for t in range(5):
            steps.append(model.decode(cache, slots, nxt[:, t]))
    monkeypatch.setattr(ml, "ONEDNN", False)
    with torch.inference_mode():
        expected = model.logits(torch.cat([tokens, nxt], dim=1))
    for t, logits in enumerate(steps):
        torch.testing.assert_close(logits, expected[:, 5 + t], rtol=0, atol=1e-4)


def test_export_traces_f_linear_whatever_the_batch():
    """torch.export (the ONNX graphs) sees no branch on the dynamic batch size: inside it, linear is F.linear."""

    class Dense(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(768, 1024)

        def forward(self, x):
            return ml.linear(x, self.layer.weight, self.layer.bias)

    module = Dense().eval()
    with torch.no_grad():
        program = torch.export.export(module, (torch.randn(4, 768),), dynamic_shapes=({0: torch.export.Dim("batch")},))
        x = torch.randn(700, 768)  # past both thresholds, where eager runs on oneDNN
        torch.testing.assert_close(program.module()(x), module(x), rtol=1e-5, atol=1e-4)

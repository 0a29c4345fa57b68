"""Export to ONNX, checked by running the graph in ONNX Runtime: the scoring functions (the GMM) and the
transformer's prefill and decode graphs (their KV cache kept outside, by service/onnx_text.py)."""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.export import Dim

from genserve.models.gpt import GPT


def export_onnx(
    module: nn.Module,
    example: torch.Tensor,
    input_name: str,
    output_names: list[str],
) -> bytes:
    """Serialised ONNX model of `module.forward` with a dynamic batch dimension."""
    module = module.eval()
    batch = torch.export.Dim("batch", min=1)
    # The exporter is chatty (optional torchvision ops, deprecations); none of it concerns us.
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module,
                (example,),
                dynamo=True,
                input_names=[input_name],
                output_names=output_names,
                dynamic_shapes=({0: batch},),
                verbose=False,
            )
    finally:
        quiet.setLevel(level)
    return program.model_proto.SerializeToString()


def check_onnx(module: nn.Module, onnx_bytes: bytes, example: torch.Tensor, atol: float = 1e-4) -> float:
    """Run the graph in ONNX Runtime and return the largest deviation from torch; raise past atol."""
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    feeds = {session.get_inputs()[0].name: example.numpy()}
    got = session.run(None, feeds)
    with torch.no_grad():
        want = module(example)
    want = want if isinstance(want, tuple) else (want,)
    worst = max((float(np.max(np.abs(g - w.numpy()))) for g, w in zip(got, want, strict=True) if g.size),
                default=0.0)  # an empty output (a non-mixture's responsibilities) agrees trivially
    if not worst <= atol:
        raise RuntimeError(f"ONNX Runtime and torch disagree by {worst:.3g} (> {atol})")
    return worst


# ---- the transformer: a prompt graph and a one-token graph, the KV cache outside both -------------------------


class _GPTPrefill(nn.Module):
    """tokens (B, T) -> logits (B, T, V), keys and values (n_layer, B, n_head, T, head_dim).

    The GPT's own modules (embeddings, LayerNorms, c_attn, c_proj, MLP): one definition of the math."""

    def __init__(self, gpt: GPT):
        super().__init__()
        self.gpt = gpt

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        gpt = self.gpt
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        x = gpt.wte(tokens) + gpt.wpe(pos)
        keys, values = [], []
        for block in gpt.h:
            q, k, v = block.attn._heads(block.ln_1(x))
            keys.append(k)
            values.append(v)
            x = x + block.attn._out(F.scaled_dot_product_attention(q, k, v, is_causal=True))
            x = x + block.mlp(block.ln_2(x))
        return gpt.lm_head(gpt.ln_f(x)), torch.stack(keys), torch.stack(values)


class _GPTDecode(nn.Module):
    """One token per row at `positions`, attending over the given past and itself.

    tokens (B,), positions (B,), past_keys / past_values (n_layer, B, n_head, P, head_dim), past_mask (B, P) True
    where a past position is visible -> logits (B, V), new_keys / new_values (n_layer, B, n_head, 1, head_dim)."""

    def __init__(self, gpt: GPT):
        super().__init__()
        self.gpt = gpt

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, past_keys: torch.Tensor,
                past_values: torch.Tensor, past_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        gpt = self.gpt
        x = (gpt.wte(tokens) + gpt.wpe(positions))[:, None, :]  # (B, 1, C)
        # The new token always sees itself; (B, 1, 1, P + 1) broadcasts over heads and the one query.
        itself = torch.ones_like(past_mask[:, :1])
        visible = torch.cat([past_mask, itself], dim=1)[:, None, None, :]
        new_keys, new_values = [], []
        for i, block in enumerate(gpt.h):
            q, k, v = block.attn._heads(block.ln_1(x))  # (B, H, 1, hd)
            new_keys.append(k)
            new_values.append(v)
            keys = torch.cat([past_keys[i], k], dim=2)
            vals = torch.cat([past_values[i], v], dim=2)
            x = x + block.attn._out(F.scaled_dot_product_attention(q, keys, vals, attn_mask=visible))
            x = x + block.mlp(block.ln_2(x))
        return gpt.lm_head(gpt.ln_f(x[:, 0])), torch.stack(new_keys), torch.stack(new_values)


GPT_PREFILL_INPUTS = ["tokens"]
GPT_PREFILL_OUTPUTS = ["logits", "keys", "values"]
GPT_DECODE_INPUTS = ["tokens", "positions", "past_keys", "past_values", "past_mask"]
GPT_DECODE_OUTPUTS = ["logits", "new_keys", "new_values"]


def _decode_example(gpt: GPT, batch: int, past: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    c = gpt.config
    g = torch.Generator().manual_seed(seed)
    shape = (c.n_layer, batch, c.n_head, past, c.head_dim)
    lengths = torch.randint(1, past + 1, (batch,), generator=g)
    lengths[0] = past
    return (torch.randint(0, c.vocab_size, (batch,), generator=g), lengths,
            torch.randn(shape, generator=g), torch.randn(shape, generator=g),
            torch.arange(past)[None, :] < lengths[:, None])


def _export(module: nn.Module, args: tuple[torch.Tensor, ...], input_names: list[str], output_names: list[str],
            dynamic_shapes: tuple) -> bytes:
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module, args, dynamo=True, input_names=input_names,
                                        output_names=output_names, dynamic_shapes=dynamic_shapes, optimize=False,
                                        verbose=False)
    finally:
        quiet.setLevel(level)
    return program.model_proto.SerializeToString()


def export_gpt_onnx(model: GPT) -> tuple[bytes, bytes]:
    """The prefill and decode graphs of a GPT (float32, CPU), with dynamic batch, prompt and past lengths."""
    gpt = model
    weight = model.wte.weight
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        gpt = copy.deepcopy(model).to(device="cpu", dtype=torch.float32)
    gpt = gpt.eval()
    c = gpt.config
    batch, length, past = Dim("batch", min=1), Dim("length", min=1, max=c.context_length), Dim("past", min=1)
    tokens = torch.randint(0, c.vocab_size, (2, min(3, c.context_length)))
    prefill = _export(_GPTPrefill(gpt).eval(), (tokens,), GPT_PREFILL_INPUTS, GPT_PREFILL_OUTPUTS,
                      ({0: batch, 1: length},))
    cache = {1: batch, 3: past}
    decode = _export(_GPTDecode(gpt).eval(), _decode_example(gpt, 3, 4), GPT_DECODE_INPUTS, GPT_DECODE_OUTPUTS,
                     ({0: batch}, {0: batch}, cache, cache, {0: batch, 1: past}))
    return prefill, decode


@torch.no_grad()
def check_gpt_onnx(model: GPT, prefill: bytes, decode: bytes, atol: float = 1e-4, seed: int = 0) -> float:
    """Run both graphs in ONNX Runtime against the torch GPT's own prefill and KV-cache decode: right-padded prompts
    of different lengths (one of a single token, so a past of one position), then one decode step on the graphs'
    keys and values. Returns the largest deviation, relative to the size of the values where they exceed 1; raises
    past atol."""
    import onnxruntime as ort

    gpt = model.eval()
    device = gpt.wte.weight.device
    options = ort.SessionOptions()
    options.log_severity_level = 3
    run_prefill, run_decode = (ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"]).run
                               for graph in (prefill, decode))
    c = gpt.config
    g = torch.Generator().manual_seed(seed)
    worst = 0.0

    def compare(got: np.ndarray, want: torch.Tensor) -> None:
        nonlocal worst
        want = want.float().cpu()
        scale = max(1.0, float(want.abs().max()))
        worst = max(worst, float(np.max(np.abs(got - want.numpy()))) / scale)

    for T in sorted({1, min(5, c.context_length - 1)}):
        lengths = torch.tensor([T, max(1, T - 2)])
        tokens = torch.randint(0, c.vocab_size, (2, T), generator=g)
        logits, keys, values = run_prefill(None, {"tokens": tokens.numpy()})
        compare(logits, gpt.logits(tokens.to(device)))
        state = gpt.allocate(2, T + 1)
        slots = torch.arange(2, device=device)
        gpt.prefill(state, slots, tokens.to(device), lengths.to(device))
        compare(keys, state.k[:, :, :, :T])
        compare(values, state.v[:, :, :, :T])
        nxt = torch.randint(0, c.vocab_size, (2,), generator=g)
        feeds = {"tokens": nxt.numpy(), "positions": lengths.numpy(), "past_keys": keys, "past_values": values,
                 "past_mask": (torch.arange(T)[None, :] < lengths[:, None]).numpy()}
        logits, new_keys, new_values = run_decode(None, feeds)
        compare(logits, gpt.decode(state, slots, nxt.to(device)))
        rows = torch.arange(2)
        compare(new_keys[:, :, :, 0], state.k[:, rows, :, lengths].transpose(0, 1))
        compare(new_values[:, :, :, 0], state.v[:, rows, :, lengths].transpose(0, 1))
    if not worst <= atol:
        raise RuntimeError(f"ONNX Runtime and torch disagree by {worst:.3g} (> {atol}) on the GPT graphs")
    return worst


# ---- image models: log p(x | y) and the per-pixel conditionals --------------------------------------------------

IMAGE_ONNX_INPUTS = ("images", "labels")  # int64 (N, H, W); int64 (N,), conditional models only
IMAGE_ONNX_OUTPUTS = ("log_prob", "pixel_log_probs")  # float32 (N,); float32 (N, H*W)


class _ImageScore(nn.Module):
    def __init__(self, model: nn.Module, conditional: bool):
        super().__init__()
        self.model, self.conditional = model, conditional

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.score_given(images, labels if self.conditional else None)


def _image_example(model, n: int = 3, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, model.levels, (n, model.height, model.width), generator=g)
    if model.n_classes:
        return images, torch.randint(0, model.n_classes, (n,), generator=g)
    return (images,)


def export_image_onnx(model: nn.Module) -> bytes:
    """The graph of `model.score_given` (an ImageModel), float32 on the CPU, dynamic batch.

    A conditional model's graph takes labels; the marginal over labels (no label given) is
    computed outside it, from one run per class (models.image.marginalise_labels)."""
    model = copy.deepcopy(model).to(device="cpu", dtype=torch.float32).eval()
    args = _image_example(model)
    batch = Dim("batch", min=1)
    names = list(IMAGE_ONNX_INPUTS[: len(args)])
    dynamic = tuple({0: batch} for _ in args)
    return _export(_ImageScore(model, bool(model.n_classes)), args, names, list(IMAGE_ONNX_OUTPUTS), dynamic)


def check_image_onnx(model: nn.Module, onnx_bytes: bytes, atol: float = 1e-4, n: int = 16, seed: int = 1) -> float:
    """Largest deviation of ONNX Runtime from torch over random images (and labels), in nats; raise past atol.

    Every per-pixel conditional must agree to atol; log p(x), a float32 sum of H*W of them (about -550 nats
    for MNIST, where float32's own spacing is 6e-5), to atol relative to max(1, |log p(x)|)."""
    import onnxruntime as ort

    model = copy.deepcopy(model).to(device="cpu", dtype=torch.float32).eval()
    args = _image_example(model, n=n, seed=seed)
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    got = session.run(None, {name: a.numpy() for name, a in zip(IMAGE_ONNX_INPUTS, args, strict=False)})
    with torch.no_grad():
        want = model.score_given(*args) if model.n_classes else model.score_given(args[0], None)
    (got_lp, got_px), (want_lp, want_px) = got, [w.numpy() for w in want]
    worst_pixel = float(np.max(np.abs(got_px - want_px)))
    worst_total = float(np.max(np.abs(got_lp - want_lp) / np.maximum(1.0, np.abs(want_lp))))
    if not (worst_pixel <= atol and worst_total <= atol):
        raise RuntimeError(f"ONNX Runtime and torch disagree by {worst_pixel:.3g} nats on a pixel's conditional "
                           f"and {worst_total:.3g} relatively on log p(x) (tolerance {atol})")
    return max(worst_pixel, worst_total)

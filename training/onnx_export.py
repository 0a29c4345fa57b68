"""Export of scoring functions to ONNX, checked by running the graph in ONNX Runtime."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings

import numpy as np
import torch
from torch import nn


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
    worst = max(float(np.max(np.abs(g - w.numpy()))) for g, w in zip(got, want, strict=True))
    if not worst <= atol:
        raise RuntimeError(f"ONNX Runtime and torch disagree by {worst:.3g} (> {atol})")
    return worst

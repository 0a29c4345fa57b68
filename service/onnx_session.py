"""The one way genserve opens an ONNX Runtime session: for the records and image models' graphs
(service/records_runtime.py, service/image_runtime.py) and the transformer's prefill and decode graphs
(service/onnx_text.py).

The device is the one chosen at load time (service.devices.pick_device): "cuda" asks for the CUDA execution
provider, used when this onnxruntime has it, with the CPU provider behind it for what CUDA does not run; anything
else is the CPU. `session_device` says which one a session really got. Graph optimisation is ONNX Runtime's
default (all levels); it logs errors only (severity 3).
"""

from __future__ import annotations

from typing import Any

CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"


def providers_for(device: str) -> list[str]:
    """The execution providers for `device`, best first: CUDA's only when asked for and available."""
    import onnxruntime as ort

    providers = [CPU_PROVIDER]
    if str(device).startswith("cuda") and CUDA_PROVIDER in ort.get_available_providers():
        providers.insert(0, CUDA_PROVIDER)
    return providers


def open_session(graph: bytes, device: str, threads: int | None = None) -> Any:
    """An `onnxruntime.InferenceSession` for the serialised `graph` on `device`; `threads` sets the intra-op
    thread pool (None: ONNX Runtime's default, one per physical core)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(graph, sess_options=options, providers=providers_for(device))


def session_device(session: Any) -> str:
    """"cuda" when the session runs on the CUDA provider, else "cpu"."""
    used = session.get_providers()
    return "cuda" if used and used[0] == CUDA_PROVIDER else "cpu"

"""The serving app a user would write instead of genserve: FastAPI and uvicorn around one ONNX Runtime session on
the same artifact's graph, in one process. bench/served.py runs it beside genserve as the baseline of what a
single process costs per request.

    BASELINE_ONNX=path/to/model.onnx uvicorn bench.baseline_app:app --port 8001

It checks what pydantic checks (lists of numbers) and nothing else: no feature count, limits, keys, metrics,
versions or batching, no replicas to scale or restart.
"""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI
from pydantic import BaseModel


def open_session(path: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    # One thread, as each genserve replica runs in the benchmark (OMP_NUM_THREADS=1).
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


session = open_session(os.environ["BASELINE_ONNX"])
input_name = session.get_inputs()[0].name
app = FastAPI()


class Records(BaseModel):
    records: list[list[float]]


class LogProb(BaseModel):
    log_prob: list[float]


@app.post("/log_prob")
async def log_prob(body: Records) -> LogProb:
    x = np.asarray(body.records, dtype=np.float64)
    return LogProb(log_prob=session.run(None, {input_name: x})[0].tolist())


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}

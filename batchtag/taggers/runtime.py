"""One ONNX Runtime CPU session, set up the same way for every model stage."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort


def cpu_session(model_path: Path, threads: int = 1) -> ort.InferenceSession:
    """Sequential, ``threads`` intra-op threads that do not spin: idle worker threads would
    otherwise busy-wait between operators and take CPU from the image decoding that runs
    beside inference on a 2-core machine. Warnings (unused initialisers etc.) are noise here."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return ort.InferenceSession(str(model_path), sess_options=opts, providers=["CPUExecutionProvider"])

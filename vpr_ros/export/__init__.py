"""Export: ONNX graphs (checked for ONNX Runtime and TensorRT), TensorRT engines, parity checks.

``vpr export onnx MODEL -o FILE`` and ``vpr export tensorrt MODEL|ONNX -o ENGINE`` are thin over
:func:`export_onnx` and :func:`build_engine`; the runtime side (reading what they write) lives in
:mod:`vpr_ros.runtime`. Names are imported lazily so ``import vpr_ros.export`` stays cheap.
"""

from __future__ import annotations

from typing import Any

__all__ = ["export_onnx", "export_model_onnx", "check_onnx_graph", "build_engine",
           "verify_onnx_export", "encoder_parity"]

_WHERE = {"export_onnx": "onnx_export", "export_model_onnx": "onnx_export",
          "check_onnx_graph": "onnx_export", "build_engine": "tensorrt_build",
          "verify_onnx_export": "parity", "encoder_parity": "parity"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"vpr_ros.export.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'vpr_ros.export' has no attribute {name!r}")

"""The small random DINOv2-S + QAA model the export, parity and encoder-bench tests share.

One definition and one folder per pytest session, so the model is created and exported once
(``cached_onnx`` reuses the export) however many of those test files run.
"""

from __future__ import annotations

from pathlib import Path

import pytest

DINO_QAA_YAML = """
name: test_dinov2s_qaa
backbone: {name: dinov2, params: {arch: vits14, registers: 0, trainable_blocks: 2}}
aggregator:
  name: qaa
  params: {num_queries: 32, num_clusters: 8, cluster_dim: 32, feature_heads: 4, score_heads: 6}
input: {size: [112, 112], resize: stretch}
weights: {backbone: none}
"""


def shared_dirs(factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(models, exports) folders under the session's temp base, created if missing."""
    base = factory.getbasetemp() / "vpr_backends"
    (base / "exports").mkdir(parents=True, exist_ok=True)
    (base / "models").mkdir(parents=True, exist_ok=True)
    (base / "models" / "test_dinov2s_qaa.yaml").write_text(DINO_QAA_YAML)
    return base / "models", base / "exports"


def dino_qaa_model_dir(factory: pytest.TempPathFactory) -> Path:
    """The model directory (random weights, trained-like layer scales), made once."""
    from vpr_ros.bench.encoder_bench import ensure_model_dir

    models, _ = shared_dirs(factory)
    return ensure_model_dir(models / "test_dinov2s_qaa.yaml", models)

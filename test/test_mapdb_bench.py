"""`vpr bench search`: runs end to end on small synthetic and file-given descriptors, reports
every figure per index kind as JSON, agrees exactly with itself for the exact index, and reports
sizes that cannot fit in memory as skipped instead of exhausting the machine."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from vpr_ros.bench.search_bench import (clustered_descriptors, distractor_block, fit_dim,
                                        format_table, normalize, real_data)
from vpr_ros.cli import main


def run_bench(capsys: pytest.CaptureFixture, *args: str) -> dict:
    assert main(["bench", "search", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_synthetic_bench_reports_every_kind(capsys: pytest.CaptureFixture,
                                            tmp_path: Path) -> None:
    report = run_bench(capsys, "--dim", "32", "--n", "1500,1000000000", "--queries", "40",
                       "--latency-queries", "5", "--batch", "16", "--workdir", str(tmp_path),
                       "--index", "flat:float32,flat:float16,binary:float32:rerank=50,hnsw")
    rows = {(r["index"].split()[0], r["dtype"], r["n"]): r for r in report["results"]}
    assert len(rows) == 8 and report["largest_n"] == 1500
    for kind in ("flat", "binary", "hnsw"):
        assert "skipped" in rows[(kind, "float32", 10**9)]
    for key in [("flat", "float32", 1500), ("flat", "float16", 1500)]:
        r = rows[key]
        assert r["r1_agreement"] == 1.0 and r["r10_agreement"] == 1.0 and r["scan_gb_s"] > 0
    for r in (rows[(k, "float32", 1500)] for k in ("binary", "hnsw")):
        assert r["r1_agreement"] >= 0.9, r
        for key in ("build_s", "save_s", "load_s", "p50_ms", "p99_ms", "batch_qps",
                    "rss_build_mib", "descriptor_mib"):
            assert r[key] >= 0, key
        assert r["p99_ms"] >= r["p50_ms"]
    assert report["machine"]["cores"] >= 1 and "synthetic" in report["data"]
    assert "| flat | float32 | 1500 | 32 |" in format_table(report)
    assert list(tmp_path.iterdir()) == []  # saved maps are cleaned up


def test_real_descriptor_bench_grows_the_file_with_distractors(capsys: pytest.CaptureFixture,
                                                              tmp_path: Path) -> None:
    real = clustered_descriptors(300, 48, clusters=30, seed=1)
    np.save(tmp_path / "map.npy", real)
    np.save(tmp_path / "q.npy", normalize(real[:20] + 0.05 * np.random.default_rng(0)
                                          .standard_normal((20, 48)).astype(np.float32)))
    report = run_bench(capsys, "--dim", "64", "--n", "1000", "--descriptors",
                       str(tmp_path / "map.npy"), "--queries-file", str(tmp_path / "q.npy"),
                       "--index", "flat,binary", "--latency-queries", "3", "--no-save-load")
    assert "real: 300 rows of map.npy" in report["data"]["real"]
    flat, binary = report["results"]
    assert flat["r1_agreement"] == 1.0 and binary["r1_agreement"] >= 0.9
    assert "load_s" not in flat


def test_distractors_keep_the_real_geometry_but_not_the_identity() -> None:
    real = clustered_descriptors(200, 64, clusters=10, seed=3)
    for j in (1, 2, 4):
        d = distractor_block(real, j, seed=0)
        np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1.0, atol=1e-5)
        if j % 4:  # an isometry: pairwise similarities are the real ones
            np.testing.assert_allclose(d @ d.T, real @ real.T, atol=1e-5)
            assert np.abs((d * real).sum(axis=1)).mean() < 0.3
        else:  # noisy near-duplicates, cosine ~0.71 with their originals
            assert 0.6 < (d * real).sum(axis=1).mean() < 0.8
    data = real_data(450, 32, 10, _save(real), None)
    blocks = list(data.blocks())
    assert sum(len(b) for b in blocks) == 450 and len(data.queries) == 10
    assert fit_dim(real, 32).shape == (200, 32) and fit_dim(real, 80)[:, 64:].max() == 0


def _save(x: np.ndarray) -> Path:
    import tempfile

    path = Path(tempfile.mkdtemp()) / "real.npy"
    np.save(path, x)
    return path


def test_index_specs_take_parameters() -> None:
    from vpr_ros.bench.search_bench import parse_index
    from vpr_ros.errors import ConfigError

    assert parse_index("binary:float16:rerank=300+bits=1024") == \
        ("binary", "float16", {"rerank": 300, "bits": 1024})
    assert parse_index("hnsw") == ("hnsw", "float32", {})
    assert parse_index("binary:float16:codes=itq+rerank=50") == \
        ("binary", "float16", {"codes": "itq", "rerank": 50})
    for bad in ("annoy", "flat:float64", "binary:float16:rerank", "binary::codes=a-b"):
        with pytest.raises(ConfigError, match="index"):
            parse_index(bad)

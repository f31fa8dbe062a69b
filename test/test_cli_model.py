"""`vpr model init` / `vpr model info` through the installed entry point (a real subprocess)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def vpr(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    exe = shutil.which("vpr")
    if exe is None:
        pytest.skip("the `vpr` entry point is not installed (pip install -e .)")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=300,
                          check=check)


def test_init_then_info_json(tmp_path: Path) -> None:
    out = tmp_path / "m"
    r = vpr("model", "init", str(REPO / "config/models/gem_effnetlite0.yaml"), "-o", str(out))
    assert "fingerprint" in r.stdout
    info = json.loads(vpr("model", "info", str(out), "--json").stdout)
    assert info["descriptor_dim"] == 1280
    assert info["backbone"]["parameters"]["trainable"] == 0
    assert 3.0e6 < info["backbone"]["parameters"]["total"] < 4.0e6   # EfficientNet-Lite0 trunk
    assert 0.3 < info["gflops"] < 1.0                                 # ~0.4 GMAC x 2 at 224
    assert len(info["fingerprint"]) == 24


def test_user_errors_are_one_line_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("backbone: {name: nosuchnet}\naggregator: {name: gem}\n")
    r = vpr("model", "init", str(bad), "-o", str(tmp_path / "x"), check=False)
    assert r.returncode == 2
    assert "unknown backbone 'nosuchnet'" in r.stderr and "Traceback" not in r.stderr
    r = vpr("model", "info", str(tmp_path / "missing"), check=False)
    assert r.returncode == 2 and "not a model directory" in r.stderr

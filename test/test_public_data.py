"""Public data sets are found by folder name on the documented search path."""

from __future__ import annotations

from pathlib import Path

import pytest

from vpr_ros.datasets.public_data import data_search_path, find_dataset, missing_reason


def test_env_folder_comes_first_and_is_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "euroc_micro").mkdir()
    monkeypatch.setenv("VPR_DATA_DIR", str(tmp_path))
    assert data_search_path()[0] == tmp_path
    assert find_dataset("euroc_micro") == tmp_path / "euroc_micro"


def test_missing_dataset_is_none_with_a_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VPR_DATA_DIR", str(tmp_path))
    assert find_dataset("no_such_set_xyz") is None
    reason = missing_reason("no_such_set_xyz", "github.com/example/repo")
    assert "no_such_set_xyz" in reason and str(tmp_path) in reason and "example/repo" in reason

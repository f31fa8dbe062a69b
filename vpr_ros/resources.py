"""Where the package's own files are: the repository's config/ (source or editable install) or
the ament share directory (colcon install)."""

from __future__ import annotations

from pathlib import Path

from vpr_ros.errors import ConfigError


def config_dir() -> Path:
    repo = Path(__file__).resolve().parents[1] / "config"
    if repo.is_dir():
        return repo
    try:
        from ament_index_python.packages import get_package_share_directory

        share = Path(get_package_share_directory("vpr_ros")) / "config"
        if share.is_dir():
            return share
    except Exception:  # ament_index raises its own lookup error types
        pass
    raise ConfigError("cannot find vpr_ros's config/ folder (neither beside the sources nor in "
                      "an ament share directory); reinstall the package")


def config_file(*parts: str) -> Path:
    path = config_dir().joinpath(*parts)
    if not path.is_file():
        raise ConfigError(f"{path}: missing from the installed package")
    return path

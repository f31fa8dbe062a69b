"""The project's exception hierarchy.

Every error a user can cause (a bad file, a wrong name, a mismatched map) is raised as a
:class:`VPRError` subclass whose message says what was wrong, what was expected and what to do.
The CLI prints these without a traceback; the node logs them and keeps running. Anything that is
not a ``VPRError`` is a bug in this project.
"""

from __future__ import annotations


class VPRError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigError(VPRError):
    """A configuration (YAML, model.json, parameters) is malformed or names unknown things."""


class CheckpointError(VPRError):
    """A weight file is missing, truncated, of the wrong layout or of the wrong shapes."""


class ModelError(VPRError):
    """A model cannot be built or used as asked (bad input size, unknown component, ...)."""


class InputError(VPRError):
    """An input image or batch is unusable (corrupt bytes, wrong encoding, wrong shape)."""


class MapError(VPRError):
    """A map on disk is missing, corrupt, truncated or of an unsupported version."""


class MapMismatchError(MapError):
    """A map and a model (or two maps) were made with different models and cannot be mixed."""


class BagError(VPRError):
    """A rosbag cannot be read, or lacks the topics or message types asked for."""


class BackendError(VPRError):
    """An inference backend is unavailable or its artifact does not fit this model/machine."""


class ExportError(VPRError):
    """Exporting a model to another format failed or produced a graph that fails checks."""

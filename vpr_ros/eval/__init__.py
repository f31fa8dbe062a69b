"""Evaluation: retrieval Recall@K through the map, loop-closure precision/recall, plots.

Everything goes through the runtime :class:`~vpr_ros.runtime.encoder.Encoder`, the
:class:`~vpr_ros.mapdb.place_map.PlaceMap` and the
:class:`~vpr_ros.localization.loop_closure.LoopClosureDetector`, so the figures are those of
the node, not of a separate research pipeline.
"""

"""Decisions on top of place-recognition search results: loop closures and relocalization.

Pure Python + numpy state machines, fed by the node with per-query candidates
(:func:`candidates_from_results` adapts a map's ``(ids, scores)``) and stamps, so every
decision can be replayed and tested on recorded sequences without ROS or a map on disk.
"""

from vpr_ros.localization.evaluation import LoopEvaluation, evaluate_loop_closure
from vpr_ros.localization.geometry import (Candidate, candidates_from_columns,
                                           candidates_from_results, same_place)
from vpr_ros.localization.hypotheses import (Hypothesis, Verifier, build_hypotheses,
                                             evidence_margin)
from vpr_ros.localization.loop_closure import (
    InsertDecision,
    LoopClosure,
    LoopClosureConfig,
    LoopClosureDetector,
    LoopClosureStats,
    SearchExclusion,
)
from vpr_ros.localization.params import ParamSpec
from vpr_ros.localization.relocalizer import Relocalization, Relocalizer, RelocalizerConfig
from vpr_ros.localization.sequence import (KeyframeTrack, SequenceConfig, SequenceMatch,
                                           SequenceMatcher, SequenceResult)

__all__ = [
    "Candidate",
    "Hypothesis",
    "KeyframeTrack",
    "SequenceConfig",
    "SequenceMatch",
    "SequenceMatcher",
    "SequenceResult",
    "Verifier",
    "build_hypotheses",
    "evidence_margin",
    "InsertDecision",
    "LoopClosure",
    "LoopClosureConfig",
    "LoopClosureDetector",
    "LoopClosureStats",
    "LoopEvaluation",
    "ParamSpec",
    "Relocalization",
    "Relocalizer",
    "RelocalizerConfig",
    "SearchExclusion",
    "candidates_from_columns",
    "candidates_from_results",
    "evaluate_loop_closure",
    "same_place",
]

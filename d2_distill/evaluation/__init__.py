"""Evaluators of d2_distill (beyond detectron2's COCOEvaluator)."""

from .harmony import HarmonyEvaluator, harmony_stats

__all__ = ["HarmonyEvaluator", "harmony_stats"]

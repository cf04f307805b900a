"""Distillation methods. Importing this package registers them by DISTILL.METHOD name."""
from .base import DISTILL_METHOD_REGISTRY, DistillMethod, DistillStep, FeatureImitation
from . import feature, tar  # noqa: F401  (registers FEATURE, TAR)

__all__ = ["DISTILL_METHOD_REGISTRY", "DistillMethod", "DistillStep", "FeatureImitation"]

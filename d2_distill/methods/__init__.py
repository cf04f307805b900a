"""Distillation methods. Importing this package registers them by DISTILL.METHOD name."""
from .base import DISTILL_METHOD_REGISTRY, DistillMethod, DistillStep, FeatureImitation
from . import feature, tar, tbd  # noqa: F401  (registers FEATURE, TAR, TBD)

__all__ = ["DISTILL_METHOD_REGISTRY", "DistillMethod", "DistillStep", "FeatureImitation"]

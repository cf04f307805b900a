"""Distillation methods. Importing this package registers the built-in ones in
``DISTILL_METHOD_REGISTRY``; a new method is one module here (imported below so
that it registers) plus its losses in ``d2_distill.losses``."""
from .base import (
    DISTILL_METHOD_REGISTRY,
    DistillMethod,
    DistillStep,
    FeatureAdapters,
    FeatureLevelsMethod,
    method_class,
    method_names,
)
from . import feature, pkd, tar, tbd  # noqa: F401  (registers FEATURE, PKD, TAR, TBD)

__all__ = [
    "DISTILL_METHOD_REGISTRY",
    "DistillMethod",
    "DistillStep",
    "FeatureAdapters",
    "FeatureLevelsMethod",
    "method_class",
    "method_names",
]

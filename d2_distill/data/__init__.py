"""Datasets of d2_distill. Importing this package registers the synthetic shapes splits."""

from .shapes import (
    DATASET_VERSION,
    SPLITS,
    STYLE,
    THING_CLASSES,
    ShapesStyle,
    data_root,
    ensure_datasets,
    ensure_split,
    generate_split,
    register_shapes_datasets,
    render_image,
    split_paths,
)

__all__ = [
    "DATASET_VERSION",
    "SPLITS",
    "STYLE",
    "THING_CLASSES",
    "ShapesStyle",
    "data_root",
    "ensure_datasets",
    "ensure_split",
    "generate_split",
    "register_shapes_datasets",
    "render_image",
    "split_paths",
]

register_shapes_datasets()

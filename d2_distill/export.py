"""Student extraction and TorchScript / ONNX export.

A distiller checkpoint holds ``student.*`` (an unmodified detectron2 model) and
``method.*`` (adapters); the teacher is never saved, and export never builds or
reads it (DISTILL.TEACHER.WEIGHTS need not exist). :func:`export_student` turns
it into what vanilla detectron2 loads without this package:

* ``model_final.pth`` = ``{"model": student_state_dict}`` (tensors only, so
  ``torch.load(..., weights_only=True)`` reads it);
* ``config.yaml`` = :func:`d2_distill.student.vanilla_student_cfg` of the
  distiller config (the student's meta-architecture, ``MODEL.WEIGHTS`` set to
  that file, no ``DISTILL`` node), so ``get_cfg().merge_from_file`` accepts it.

:func:`trace_student` then traces the exported student with detectron2's own
``TracingAdapter`` (vanilla detectron2 only, on CPU) into ``model.ts`` and,
when the optional ``onnx`` package is installed, ``model.onnx``.
:func:`verify_traced` checks a traced model against the eager student.

Command line::

    python -m d2_distill.export --config-file CFG --weights CKPT --output DIR \\
        [--trace torchscript [onnx]] [--sample-images N] [KEY VALUE ...]
"""
from __future__ import annotations

import argparse
import logging
import os
import pickle
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .student import STUDENT_PREFIX, state_mismatch, student_inputs, student_state_dict, vanilla_student_cfg

__all__ = [
    "export_student",
    "trace_student",
    "verify_traced",
    "load_student",
    "student_inputs",
    "read_checkpoint",
    "main",
]

logger = logging.getLogger("d2_distill.export")  # the same name under python -m

TRACE_FORMATS = ("torchscript", "onnx")
ONNX_OPSET = 16


# ---------------------------------------------------------------------------
# Student extraction
# ---------------------------------------------------------------------------
def read_checkpoint(weights: str) -> dict:
    """Read a checkpoint file (path or URL) on CPU.

    ``torch.load(weights_only=True)`` first. Only when that is refused because the
    file pickles other objects does it fall back to detectron2's checkpoint
    reading with full unpickling, and it logs that it did. detectron2 ``.pkl``
    files (plain pickles, which torch.load cannot read) go to detectron2 directly.
    """
    if "://" in weights:
        from detectron2.utils.file_io import PathManager

        local = PathManager.get_local_path(weights)  # downloads and caches a URL
    else:
        local = weights
        if not os.path.isfile(local):
            raise FileNotFoundError(f"--weights {weights!r}: no such file")
    if local.endswith(".pkl"):
        logger.warning("%s is a pickle: reading it with detectron2's checkpoint loading (full unpickling)", weights)
        return _detectron2_read(weights, local)
    try:
        return torch.load(local, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        logger.warning(
            "%s cannot be read with torch.load(weights_only=True) (%s); falling back to "
            "detectron2's checkpoint loading with full unpickling -- only do this with files you trust",
            weights, first_line,
        )
    except Exception as e:
        raise ValueError(f"--weights {weights!r} could not be read as a checkpoint: {e}") from e
    return _detectron2_read(weights, local)


def _detectron2_read(weights: str, local: str) -> dict:
    """detectron2's DetectionCheckpointer file reading (``.pkl`` model-zoo files
    included), with full unpickling for ``.pth`` files: torch >= 2.6 made
    ``weights_only=True`` the default of the ``torch.load`` fvcore calls."""
    from detectron2.checkpoint import DetectionCheckpointer

    class _Reader(DetectionCheckpointer):
        def _torch_load(self, f):
            return torch.load(f, map_location="cpu", weights_only=False)

    reader = _Reader(torch.nn.Module())
    from urllib.parse import urlparse

    reader._parsed_url_during_load = urlparse(weights)  # what DetectionCheckpointer.load sets
    try:
        return reader._load_file(local)
    except Exception as e:
        raise ValueError(f"--weights {weights!r} could not be read as a checkpoint: {e}") from e
    finally:
        reader._parsed_url_during_load = None


def _model_state(checkpoint, weights: str) -> Dict[str, object]:
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), dict):
        state = checkpoint["model"]
    elif isinstance(checkpoint, dict) and checkpoint and all(isinstance(k, str) for k in checkpoint):
        state = checkpoint  # a bare state dict
    else:
        raise ValueError(f"{weights!r} holds no 'model' state dict")
    if state and all(k.startswith("module.") for k in state):  # saved from a DDP wrapper
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _student_state(state: Dict[str, object], weights: str) -> Dict[str, torch.Tensor]:
    student = {}
    for key, value in student_state_dict(state).items():
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(value)
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{weights!r}: {STUDENT_PREFIX}{key} is a {type(value).__name__}, not a tensor")
        student[key] = value.detach().cpu().contiguous()
    if not student:
        raise ValueError(
            f"{weights!r} is not a distiller checkpoint: it has no '{STUDENT_PREFIX}*' keys; "
            "a plain detectron2 checkpoint needs no export"
        )
    return student


def _check_loads_into(scfg, state: Dict[str, torch.Tensor]) -> None:
    """Build the student with vanilla detectron2 and check the state matches it key for key."""
    from detectron2.modeling import build_model

    cfg = scfg.clone()
    cfg.defrost()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.freeze()
    problem = state_mismatch(build_model(cfg).state_dict(), state)
    if problem:
        raise ValueError(
            f"the checkpoint's student does not match the {cfg.MODEL.META_ARCHITECTURE} built from the "
            f"config: {problem}"
        )


def export_student(
    config_file: str, weights: str, output_dir: str, opts: Sequence[str] = (), *, verify: bool = True
) -> Tuple[str, str]:
    """Extract the student of a distiller checkpoint.

    Args:
        config_file: the distiller config (``MODEL.META_ARCHITECTURE: Distiller``).
        weights: a distiller checkpoint (keys ``student.*`` and ``method.*``).
        output_dir: where ``model_final.pth`` and ``config.yaml`` are written.
        opts: config overrides (``KEY VALUE`` pairs), as on the training command line.
        verify: build the student with vanilla detectron2 and require the exported
            state to match it exactly (keys and shapes).

    Returns:
        (weights_path, config_path) of the exported student.
    """
    from detectron2.config import get_cfg

    from .engine.trainer import setup_cfg

    cfg = setup_cfg(config_file, list(opts))
    weights_path = os.path.abspath(os.path.join(output_dir, "model_final.pth"))
    config_path = os.path.abspath(os.path.join(output_dir, "config.yaml"))
    try:
        scfg = vanilla_student_cfg(cfg, weights_path)
    except ValueError as e:
        raise ValueError(f"{config_file!r}: {e}") from None

    state = _model_state(read_checkpoint(weights), weights)
    student = _student_state(state, weights)
    dropped = sorted({k.split(".", 1)[0] for k in state if not k.startswith(STUDENT_PREFIX)})
    if verify:
        _check_loads_into(scfg, student)

    os.makedirs(output_dir, exist_ok=True)  # only once there is something to write
    torch.save({"model": student}, weights_path)
    with open(config_path, "w") as f:
        f.write(scfg.dump())
    get_cfg().merge_from_file(config_path)  # the vanilla detectron2 config system accepts it
    logger.info(
        "Exported the %s student (%d tensors; dropped %s) to %s and %s",
        scfg.MODEL.META_ARCHITECTURE, len(student), ", ".join(p + ".*" for p in dropped) or "nothing",
        weights_path, config_path,
    )
    return weights_path, config_path


# ---------------------------------------------------------------------------
# Tracing (vanilla detectron2 only)
# ---------------------------------------------------------------------------
def load_student(config_yaml: str, weights: Optional[str] = None):
    """(cfg, model): the exported student built and loaded by vanilla detectron2, eval, CPU."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    cfg = get_cfg()
    cfg.merge_from_file(config_yaml)
    cfg.MODEL.DEVICE = "cpu"
    if weights:
        cfg.MODEL.WEIGHTS = weights
    cfg.freeze()
    model = build_model(cfg)
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    model.eval()
    return cfg, model


def _inference_func(model):
    """How the traced graph calls the model (detectron2's export convention): R-CNN
    models without post-processing (it resizes to the original image size, done
    outside the graph); other models (RetinaNet, ...) as they are."""
    from detectron2.modeling import GeneralizedRCNN

    if isinstance(model, GeneralizedRCNN):
        def inference(model, inputs):
            return [{"instances": model.inference(inputs, do_postprocess=False)[0]}]

        return inference
    return None


def _adapter(model, image_tensor: torch.Tensor):
    from detectron2.export import TracingAdapter

    return TracingAdapter(model, [{"image": image_tensor}], _inference_func(model))


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise RuntimeError(
            "ONNX export needs the 'onnx' package: pip install onnx "
            "(or the optional extra: pip install 'd2_distill[onnx]')"
        ) from None


def trace_student(
    config_yaml: str,
    weights: str,
    images: List[np.ndarray],
    output_dir: str,
    formats: Sequence[str] = ("torchscript",),
) -> Dict[str, str]:
    """Trace the exported student on ``images[0]`` (HWC BGR uint8).

    Writes ``model.ts`` (``torch.jit.trace``) and/or ``model.onnx``
    (``torch.onnx.export``, opset 16; needs ``pip install onnx``). The traced graph
    takes one CHW float32 BGR/RGB image tensor (the model's INPUT.FORMAT, already
    resized to the test size) and returns detectron2's flattened outputs: for
    R-CNN models the raw (not post-processed) instances at the input resolution.

    Returns:
        {format: path} of the files written.
    """
    formats = list(dict.fromkeys(formats))
    bad = [f for f in formats if f not in TRACE_FORMATS]
    if bad:
        raise ValueError(f"unknown trace format(s) {bad}; choose from {list(TRACE_FORMATS)}")
    if "onnx" in formats:
        _require_onnx()
    if not images:
        raise ValueError("trace_student needs at least one sample image")

    cfg, model = load_student(config_yaml, weights)
    image = student_inputs(cfg, images[0])["image"]
    adapter = _adapter(model, image)
    os.makedirs(output_dir, exist_ok=True)
    paths: Dict[str, str] = {}
    with torch.no_grad():
        if "torchscript" in formats:
            # check_trace=False: verify_traced compares with eager on several images instead
            traced = torch.jit.trace(adapter, adapter.flattened_inputs, check_trace=False)
            paths["torchscript"] = os.path.abspath(os.path.join(output_dir, "model.ts"))
            traced.save(paths["torchscript"])
            logger.info("Traced TorchScript model written to %s", paths["torchscript"])
        if "onnx" in formats:
            paths["onnx"] = os.path.abspath(os.path.join(output_dir, "model.onnx"))
            # The TorchScript-based exporter: detectron2's models are not
            # torch.export-able, and dynamo=True is torch's default now.
            torch.onnx.export(
                adapter, adapter.flattened_inputs, paths["onnx"], opset_version=ONNX_OPSET, dynamo=False
            )
            logger.info("ONNX model written to %s", paths["onnx"])
    return paths


def verify_traced(
    config_yaml: str, weights: str, torchscript_path: str, images: List[np.ndarray], atol: float = 1e-4
) -> float:
    """Run the traced model and the eager student (``model(inputs)``) on ``images``;
    require the same detections (count and classes equal, boxes and scores within
    ``atol``). Returns the largest absolute difference of boxes and scores."""
    from detectron2.modeling.postprocessing import detector_postprocess

    cfg, model = load_student(config_yaml, weights)
    traced = torch.jit.load(torchscript_path, map_location="cpu")
    max_diff = 0.0
    schema = None
    with torch.no_grad():
        for i, img in enumerate(images):
            inputs = student_inputs(cfg, img)
            eager = model([inputs])[0]["instances"]
            if schema is None:  # the output structure is fixed: learn it once, eagerly
                adapter = _adapter(model, inputs["image"])
                adapter(*adapter.flattened_inputs)
                schema = adapter.outputs_schema
            flat = traced(inputs["image"])
            raw = schema(flat)[0]["instances"]
            ours = detector_postprocess(raw, inputs["height"], inputs["width"])
            if len(ours) != len(eager):
                raise AssertionError(f"image {i}: traced model gives {len(ours)} detections, eager {len(eager)}")
            if not torch.equal(ours.pred_classes, eager.pred_classes):
                raise AssertionError(f"image {i}: traced and eager predicted classes differ")
            for name, a, b in (
                ("boxes", ours.pred_boxes.tensor, eager.pred_boxes.tensor),
                ("scores", ours.scores, eager.scores),
            ):
                if a.numel():
                    diff = float((a - b).abs().max())
                    max_diff = max(max_diff, diff)
                    if not diff <= atol:
                        raise AssertionError(f"image {i}: traced and eager {name} differ by {diff:.3g} > {atol}")
    return max_diff


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------
def _sample_images(cfg, n: int) -> List[np.ndarray]:
    from detectron2.data import DatasetCatalog
    from detectron2.data.detection_utils import read_image

    from .data import ensure_datasets

    if not cfg.DATASETS.TEST:
        raise ValueError("--trace needs sample images: the config has no DATASETS.TEST")
    name = cfg.DATASETS.TEST[0]
    ensure_datasets([name])
    records = DatasetCatalog.get(name)[:n]
    if not records:
        raise ValueError(f"dataset {name!r} has no images")
    return [read_image(r["file_name"], format="BGR") for r in records]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m d2_distill.export",
        description="Export the student of a distiller checkpoint as a vanilla detectron2 "
        "model (model_final.pth + config.yaml), optionally traced to TorchScript / ONNX.",
    )
    p.add_argument("--config-file", required=True, help="the distiller config the checkpoint was trained with")
    p.add_argument("--weights", required=True, help="the distiller checkpoint (e.g. OUTPUT_DIR/model_final.pth)")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--trace", nargs="+", default=None, metavar="{torchscript,onnx}",
                   help="also trace the student to these formats (onnx needs: pip install onnx)")
    p.add_argument("--sample-images", type=int, default=2,
                   help="images of the first DATASETS.TEST dataset to trace and verify on (default 2)")
    p.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="config overrides: KEY VALUE pairs")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.trace is not None:
        # nargs="+" also swallows the KEY VALUE overrides that follow: give them back
        k = next((i for i, v in enumerate(args.trace) if v not in TRACE_FORMATS), len(args.trace))
        if k == 0:
            parser.error(
                f"argument --trace: invalid choice {args.trace[0]!r} (choose from {', '.join(TRACE_FORMATS)})"
            )
        args.opts = args.trace[k:] + list(args.opts)
        args.trace = args.trace[:k]
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s]: %(message)s")
    try:
        if args.sample_images < 1:
            raise ValueError("--sample-images must be >= 1")
        if args.trace and "onnx" in args.trace:
            _require_onnx()  # before any work
        weights_path, config_path = export_student(args.config_file, args.weights, args.output, args.opts)
        print(f"student weights: {weights_path}")
        print(f"student config:  {config_path}")
        if args.trace:
            import d2_distill  # noqa: F401  (registers the built-in datasets)

            from .engine.trainer import setup_cfg

            images = _sample_images(setup_cfg(args.config_file, args.opts), args.sample_images)
            paths = trace_student(config_path, weights_path, images, args.output, args.trace)
            for fmt, path in paths.items():
                print(f"{fmt}: {path}")
            if "torchscript" in paths:
                diff = verify_traced(config_path, weights_path, paths["torchscript"], images)
                print(f"traced vs eager on {len(images)} image(s): max abs difference {diff:.3g}")
    except Exception as e:  # a clear message and a non-zero exit, no traceback
        logger.debug("export failed", exc_info=True)
        print(f"d2_distill.export: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

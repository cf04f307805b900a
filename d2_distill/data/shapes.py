"""A built-in synthetic object-detection dataset: coloured shapes on clutter.

Every image is generated procedurally from ``np.random.default_rng([seed, index])``
so a split is byte-for-byte reproducible from its seed and any single image can
be regenerated on its own. Images are 256x256 BGR PNGs with 1-5 labelled shapes (``ShapesStyle``)
of six classes (``THING_CLASSES``) on a textured background with unlabelled
distractors (lines, arcs, outlines and irregular blobs, some of which are drawn
over the labelled shapes). Colour is drawn independently of the class; size,
aspect ratio and rotation vary; later shapes occlude earlier ones.

Annotations describe the *visible* part of each object (its mask minus the
masks of everything drawn on top of it). An object is dropped when less than
30% of its full area or fewer than 20 pixels remain visible.

The splits are registered in detectron2's ``DatasetCatalog`` lazily: nothing is
generated at import or registration time. Loading a split (``DatasetCatalog.get``)
or calling :func:`ensure_split` generates it on first use under :func:`data_root`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable

import cv2
import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "THING_CLASSES",
    "SPLITS",
    "DATASET_VERSION",
    "ShapesStyle",
    "STYLE",
    "data_root",
    "split_paths",
    "render_image",
    "generate_split",
    "ensure_split",
    "register_shapes_datasets",
    "ensure_datasets",
]

THING_CLASSES: list[str] = ["circle", "triangle", "square", "star", "hexagon", "cross"]

SPLITS: dict[str, dict] = {
    "shapes_train": {"num_images": 2000, "seed": 0},
    "shapes_val": {"num_images": 200, "seed": 1},
    # for choosing settings (schedules, weights); results are reported on shapes_val
    "shapes_tune": {"num_images": 200, "seed": 4},
    "shapes_mini_train": {"num_images": 32, "seed": 2},
    "shapes_mini_val": {"num_images": 16, "seed": 3},
}

# Bump when the generator's output changes, so stale caches are not reused: the
# version names the folder a split is generated into.
DATASET_VERSION = "shapes_v2"

_ENV_VAR = "D2_DISTILL_DATA"


# ---- generator parameters -------------------------------------------------
@dataclass(frozen=True)
class ShapesStyle:
    """What a generated image looks like (the knobs of the dataset's difficulty).

    ``clutter`` scales the number of unlabelled distractors of every kind
    (lines, arcs, hollow outlines, filled blobs, and blobs drawn over objects):
    1.0 is shapes_v1's amount, 0 none. Extents are the longest side of a shape
    before rotation, in pixels of the 256 px image.
    """

    min_objects: int = 1
    max_objects: int = 5
    min_extent: float = 24.0
    max_extent: float = 120.0
    clutter: float = 0.25


# shapes_v1 was ShapesStyle(max_objects=8, min_extent=8.0, clutter=1.0): half of
# its objects were under 23 px and the clutter dominated what a few hundred
# iterations from scratch could learn (teachers at 5-6 AP).
STYLE = ShapesStyle()

_MIN_VISIBLE_FRACTION = 0.30
_MIN_VISIBLE_PIXELS = 20
_MIN_FRAGMENT_PIXELS = 4  # visible specks smaller than this are not part of the object
_MIN_COLOR_DISTANCE = 60.0  # fill colour vs. the background under the shape (RGB L2)


# ---------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------
def data_root() -> str:
    """Root folder of generated datasets: $D2_DISTILL_DATA, else ~/.cache/d2_distill/datasets."""
    root = os.environ.get(_ENV_VAR)
    if root:
        return os.path.expanduser(root)
    return os.path.join(os.path.expanduser("~"), ".cache", "d2_distill", "datasets")


def _check_split(name: str) -> dict:
    try:
        return SPLITS[name]
    except KeyError:
        raise ValueError(
            f"Unknown shapes split {name!r}; valid splits are: {', '.join(sorted(SPLITS))}"
        ) from None


def split_paths(name: str, root: str | None = None) -> tuple[str, str]:
    """(image_dir, json_path) of a split: <root>/<version>/<name>/images and <root>/<version>/<name>.json."""
    _check_split(name)
    base = os.path.join(root if root is not None else data_root(), DATASET_VERSION)
    return os.path.join(base, name, "images"), os.path.join(base, name + ".json")


# ---------------------------------------------------------------------------
# Shape geometry
# ---------------------------------------------------------------------------
def _normalise(pts: np.ndarray) -> np.ndarray:
    """Centre a polygon on its bounding box and scale its longest side to 1."""
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    return (pts - (lo + hi) / 2.0) / float((hi - lo).max())


def _regular(n: int, start: float = 0.0) -> np.ndarray:
    t = start + np.arange(n) * (2.0 * np.pi / n)
    return np.stack([np.cos(t), np.sin(t)], axis=1)


def _unit_shape(cls: int, rng: np.random.Generator) -> np.ndarray:
    """Polygon (K, 2) of class ``cls``: longest side 1, centred, aspect ratio applied."""
    name = THING_CLASSES[cls]
    if name == "circle":
        pts = _regular(48)
        ar = rng.uniform(1.0, 1.6)
    elif name == "triangle":
        ang = np.deg2rad(np.array([90.0, 210.0, 330.0]) + rng.uniform(-12.0, 12.0, 3))
        rad = rng.uniform(0.85, 1.0, 3)
        pts = np.stack([rad * np.cos(ang), rad * np.sin(ang)], axis=1)
        ar = rng.uniform(1.0, 1.4)
    elif name == "square":
        pts = np.array([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])
        ar = rng.uniform(1.0, 1.8)
    elif name == "star":
        inner = rng.uniform(0.38, 0.55)
        rad = np.tile([1.0, inner], 5)
        pts = _regular(10) * rad[:, None]
        ar = rng.uniform(1.0, 1.25)
    elif name == "hexagon":
        pts = _regular(6)
        ar = rng.uniform(1.0, 1.3)
    elif name == "cross":
        a = rng.uniform(0.14, 0.22)  # half arm thickness (plus sign of extent 1)
        h = 0.5
        pts = np.array(
            [[a, h], [a, a], [h, a], [h, -a], [a, -a], [a, -h],
             [-a, -h], [-a, -a], [-h, -a], [-h, a], [-a, a], [-a, h]]
        )
        ar = rng.uniform(1.0, 1.4)
    else:  # pragma: no cover
        raise AssertionError(name)
    pts = _normalise(pts)
    axis = int(rng.integers(2))  # squash x or y: keeps the longest side at 1
    pts[:, axis] /= ar
    return pts


def _blob_shape(rng: np.random.Generator) -> np.ndarray:
    """Smooth, lumpy closed outline (a few random radial harmonics): unlabelled distractor."""
    t = np.linspace(0.0, 2.0 * np.pi, 40, endpoint=False)
    rad = np.ones_like(t)
    for k in (2, 3, 4):
        rad += rng.uniform(0.08, 0.3) * np.cos(k * t + rng.uniform(0.0, 2.0 * np.pi))
    rad = np.maximum(rad, 0.25)
    return _normalise(np.stack([rad * np.cos(t), rad * np.sin(t)], axis=1))


def _place(unit: np.ndarray, extent: float, theta: float, cx: float, cy: float) -> np.ndarray:
    c, s = math.cos(theta), math.sin(theta)
    rot = np.array([[c, -s], [s, c]])
    return unit * extent @ rot.T + np.array([cx, cy])


# ---------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------
def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth random colour field + mottled texture, float32 (size, size, 3)."""
    coarse = rng.uniform(0.0, 255.0, (3, 3, 3)).astype(np.float32)
    img = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    mid = rng.normal(0.0, rng.uniform(10.0, 35.0), (8, 8, 3)).astype(np.float32)
    img += cv2.resize(mid, (size, size), interpolation=cv2.INTER_CUBIC)
    fine = rng.normal(0.0, rng.uniform(4.0, 18.0), (size // 4, size // 4, 3)).astype(np.float32)
    img += cv2.resize(fine, (size, size), interpolation=cv2.INTER_LINEAR)
    return np.clip(img, 0.0, 255.0)


def _color(rng: np.random.Generator) -> tuple:
    return tuple(float(v) for v in rng.uniform(0.0, 255.0, 3))


def _count(rng: np.random.Generator, lo: int, hi: int, scale: float) -> int:
    """A count drawn from [lo, hi], scaled by ``scale`` (the style's clutter)."""
    return int(round(scale * int(rng.integers(lo, hi + 1))))


def _draw_clutter(img: np.ndarray, rng: np.random.Generator, size: int, scale: float) -> None:
    """Unlabelled distractors under the objects: lines, arcs, outlines, blobs."""
    for _ in range(_count(rng, 2, 10, scale)):  # straight lines / polylines
        n = int(rng.integers(2, 5))
        pts = rng.uniform(-0.1 * size, 1.1 * size, (n, 2))
        cv2.polylines(img, [np.round(pts * 16).astype(np.int32)], False, _color(rng),
                      int(rng.integers(1, 4)), cv2.LINE_AA, 4)
    for _ in range(_count(rng, 1, 5, scale)):  # arcs
        center = (int(rng.integers(0, size)), int(rng.integers(0, size)))
        axes = (int(rng.integers(6, size // 2)), int(rng.integers(6, size // 2)))
        start = float(rng.uniform(0.0, 360.0))
        span = float(rng.uniform(60.0, 270.0))
        cv2.ellipse(img, center, axes, float(rng.uniform(0, 180)), start, start + span,
                    _color(rng), int(rng.integers(1, 4)), cv2.LINE_AA)
    for _ in range(_count(rng, 0, 3, scale)):  # hollow outlines of shape-like polygons
        unit = _unit_shape(int(rng.integers(len(THING_CLASSES))), rng)
        pts = _place(unit, rng.uniform(20.0, 90.0), rng.uniform(0, 2 * np.pi),
                     rng.uniform(0, size), rng.uniform(0, size))
        cv2.polylines(img, [np.round(pts * 16).astype(np.int32)], True, _color(rng),
                      int(rng.integers(1, 3)), cv2.LINE_AA, 4)
    for _ in range(_count(rng, 1, 5, scale)):  # small filled irregular blobs
        pts = _place(_blob_shape(rng), rng.uniform(5.0, 35.0), 0.0,
                     rng.uniform(0, size), rng.uniform(0, size))
        cv2.fillPoly(img, [np.round(pts * 16).astype(np.int32)], _color(rng), cv2.LINE_AA, 4)


def _rasterise(pts: np.ndarray, size: int):
    """Anti-aliased coverage of a polygon in a local window.

    Returns (alpha, full_area, (y0, y1, x0, x1)): alpha is the float32 coverage
    cropped to the image, full_area the pixel count of the whole (unclipped) shape.
    None if the shape misses the image.
    """
    x0, y0 = np.floor(pts.min(axis=0)).astype(int) - 2
    x1, y1 = np.ceil(pts.max(axis=0)).astype(int) + 3
    canvas = np.zeros((y1 - y0, x1 - x0), np.uint8)
    local = np.round((pts - [x0, y0]) * 16).astype(np.int32)
    cv2.fillPoly(canvas, [local], 255, cv2.LINE_AA, 4)
    full_area = int(np.count_nonzero(canvas >= 128))
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, size), min(y1, size)
    if cx0 >= cx1 or cy0 >= cy1 or full_area == 0:
        return None
    crop = canvas[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
    return crop.astype(np.float32) / 255.0, full_area, (cy0, cy1, cx0, cx1)


def _paint(img, rng, alpha, box, label_color_check: bool) -> None:
    """Fill a rasterised shape with a random colour (+ gradient) over ``img``."""
    y0, y1, x0, x1 = box
    region = img[y0:y1, x0:x1]
    a = alpha[..., None]
    color = np.array(_color(rng), np.float32)
    if label_color_check:
        # Avoid objects that are (nearly) invisible against the background.
        inside = alpha >= 0.5
        if inside.any():
            under = region[inside].mean(axis=0)
            for _ in range(8):
                if float(np.linalg.norm(color - under)) >= _MIN_COLOR_DISTANCE:
                    break
                color = np.array(_color(rng), np.float32)
    h, w = alpha.shape
    g = rng.uniform(-1.0, 1.0, 2) * rng.uniform(0.0, 50.0) / max(h, w, 1)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ramp = (xx - w / 2.0) * g[0] + (yy - h / 2.0) * g[1]
    fill = color + ramp[..., None]
    region *= 1.0 - a
    region += a * fill


def _annotate(mask: np.ndarray, box) -> dict | None:
    """bbox / area / polygons of a visible mask crop (in image coordinates)."""
    y0, _, x0, _ = box
    m = mask.astype(np.uint8)
    _, labels, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
    small = np.nonzero(stats[1:, cv2.CC_STAT_AREA] < _MIN_FRAGMENT_PIXELS)[0] + 1
    if small.size:
        m[np.isin(labels, small)] = 0
    area = int(np.count_nonzero(m))
    if area == 0:
        return None
    ys = np.nonzero(m.any(axis=1))[0]
    xs = np.nonzero(m.any(axis=0))[0]
    contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE,
                                   offset=(int(x0), int(y0)))
    # OpenCV returns pixel indices; +0.5 puts them in continuous coordinates.
    polys = [(c.reshape(-1).astype(np.float64) + 0.5).tolist() for c in contours if len(c) >= 3]
    if not polys:
        return None
    return {
        "bbox": [float(x0 + xs[0]), float(y0 + ys[0]),
                 float(xs[-1] - xs[0] + 1), float(ys[-1] - ys[0] + 1)],
        "area": float(area),
        "segmentation": polys,
    }


def render_image(seed: int, index: int, image_size: int = 256, style: ShapesStyle | None = None):
    """Render image ``index`` of the split with ``seed``, in ``style`` (default :data:`STYLE`).

    Returns (image, annotations): a uint8 BGR array (H, W, 3) and a list of dicts
    with "category_id" (1-based COCO id), "bbox" (xywh), "area" and "segmentation".
    """
    style = STYLE if style is None else style
    rng = np.random.default_rng([int(seed), int(index)])
    size = int(image_size)
    canvas = np.round(_background(rng, size)).astype(np.uint8)
    _draw_clutter(canvas, rng, size, style.clutter)  # on uint8: cv2 anti-aliases only 8-bit images
    img = canvas.astype(np.float32)

    # Draw list: labelled objects and a few unlabelled blobs that may cover them.
    n_obj = int(rng.integers(style.min_objects, style.max_objects + 1))
    items = [int(c) for c in rng.integers(0, len(THING_CLASSES), n_obj)]
    items += [-1] * _count(rng, 0, 2, style.clutter)
    order = rng.permutation(len(items))
    log_lo, log_hi = math.log(style.min_extent), math.log(style.max_extent)

    drawn = []  # (cls, mask crop, box, full_area), in drawing order
    for i in order:
        cls = items[i]
        if cls >= 0:
            extent = math.exp(rng.uniform(log_lo, log_hi))
            unit = _unit_shape(cls, rng)
        else:
            extent = rng.uniform(6.0, 30.0)
            unit = _blob_shape(rng)
        # Centres keep roughly >= 60% of the extent inside the image on each axis:
        # truncated objects happen, but rarely so much that they get dropped.
        margin = 0.1 * extent
        cx = rng.uniform(margin, size - margin)
        cy = rng.uniform(margin, size - margin)
        pts = _place(unit, extent, rng.uniform(0.0, 2.0 * np.pi), cx, cy)
        r = _rasterise(pts, size)
        if r is None:
            continue
        alpha, full_area, box = r
        _paint(img, rng, alpha, box, label_color_check=cls >= 0)
        drawn.append((cls, alpha >= 0.5, box, full_area))

    # Optional slight blur, then sensor noise over everything.
    if rng.random() < 0.3:
        img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.5, 1.0))
    sigma = rng.uniform(2.0, 10.0)  # uniform noise of this std (cheaper than Gaussian)
    noise = rng.random(img.shape, dtype=np.float32) - np.float32(0.5)
    noise *= np.float32(sigma * math.sqrt(12.0))
    img += noise
    image = np.clip(img + 0.5, 0.0, 255.0).astype(np.uint8)

    # Visible masks: walk from the top-most shape down, accumulating coverage.
    covered = np.zeros((size, size), bool)
    annotations = []
    for cls, mask, box, full_area in reversed(drawn):
        y0, y1, x0, x1 = box
        under = covered[y0:y1, x0:x1]
        visible = mask & ~under
        under |= mask
        if cls < 0:
            continue
        n_vis = int(np.count_nonzero(visible))
        if n_vis < _MIN_VISIBLE_PIXELS or n_vis < _MIN_VISIBLE_FRACTION * full_area:
            continue
        ann = _annotate(visible, box)
        if ann is None or ann["area"] < _MIN_VISIBLE_PIXELS:
            continue
        ann["category_id"] = cls + 1
        annotations.append(ann)
    annotations.reverse()  # back to drawing order
    return image, annotations


# ---------------------------------------------------------------------------
# Writing splits
# ---------------------------------------------------------------------------
def _num_workers(num_images: int) -> int:
    if num_images < 64:
        return 1
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 8))


def generate_split(image_dir: str, json_path: str, num_images: int, seed: int,
                   image_size: int = 256, style: ShapesStyle | None = None) -> None:
    """Generate ``num_images`` images into ``image_dir`` and COCO json ``json_path``.

    Images are written into a temporary sibling directory that is renamed into
    place, and the JSON (the completion marker) is written last through an
    atomic replace, so an interrupted run never leaves a complete-looking split.
    Output depends only on (num_images, seed, image_size, style).
    """
    style = STYLE if style is None else style
    image_dir = os.path.abspath(image_dir)
    json_path = os.path.abspath(json_path)
    parent = os.path.dirname(image_dir)
    os.makedirs(parent, exist_ok=True)
    os.makedirs(os.path.dirname(json_path), exist_ok=True)
    # Unique temporary names; os.mkdir / open respect the umask (mkdtemp would give 0700).
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp_dir = os.path.join(parent, f".{os.path.basename(image_dir)}.tmp-{tag}")
    os.mkdir(tmp_dir)
    tmp_json = None
    try:
        def work(idx: int):
            image, anns = render_image(seed, idx, image_size, style)
            file_name = f"{idx:06d}.png"
            if not cv2.imwrite(os.path.join(tmp_dir, file_name), image):
                raise OSError(f"cv2.imwrite failed for {os.path.join(tmp_dir, file_name)}")
            return file_name, anns

        workers = _num_workers(num_images)
        if workers > 1:
            # cv2 and numpy release the GIL for the heavy parts; threads keep this
            # safe inside forked / daemonic processes (e.g. data-loader workers).
            with ThreadPoolExecutor(max_workers=workers) as pool:
                results = list(pool.map(work, range(num_images)))
        else:
            results = [work(i) for i in range(num_images)]

        images, annotations = [], []
        for idx, (file_name, anns) in enumerate(results):
            image_id = idx + 1
            images.append({"id": image_id, "file_name": file_name,
                           "width": int(image_size), "height": int(image_size)})
            for ann in anns:
                ann = dict(ann, id=len(annotations) + 1, image_id=image_id, iscrowd=0)
                annotations.append(ann)
        coco = {
            "info": {"description": "d2_distill synthetic shapes", "version": DATASET_VERSION,
                     "seed": int(seed), "num_images": int(num_images),
                     "style": dataclasses.asdict(style)},
            "licenses": [],
            "categories": [{"id": i + 1, "name": n, "supercategory": "shape"}
                           for i, n in enumerate(THING_CLASSES)],
            "images": images,
            "annotations": annotations,
        }

        # Invalidate an existing split first: from here until the JSON lands, the
        # split reads as incomplete.
        with contextlib.suppress(FileNotFoundError):
            os.remove(json_path)
        if os.path.lexists(image_dir):
            shutil.rmtree(image_dir)
        os.rename(tmp_dir, image_dir)
        tmp_json = os.path.join(os.path.dirname(json_path),
                                f".{os.path.basename(json_path)}.tmp-{tag}")
        with open(tmp_json, "w") as f:
            json.dump(coco, f, sort_keys=True, separators=(",", ":"))
        os.replace(tmp_json, json_path)
        tmp_json = None
    finally:
        if os.path.isdir(tmp_dir):
            shutil.rmtree(tmp_dir, ignore_errors=True)
        if tmp_json is not None:
            with contextlib.suppress(OSError):
                os.remove(tmp_json)


@contextlib.contextmanager
def _file_lock(path: str):
    """Exclusive inter-process lock (no-op where fcntl is unavailable)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------
# detectron2 registration
# ---------------------------------------------------------------------------
# Root each of our registered splits resolves to: None means data_root() at use time.
_REGISTERED_ROOTS: dict[str, str | None] = {}


def _resolve_root(name: str, root: str | None) -> str:
    if root is not None:
        return root
    registered = _REGISTERED_ROOTS.get(name)
    return registered if registered is not None else data_root()


def _set_path_metadata(name: str, image_dir: str, json_path: str) -> None:
    """Point MetadataCatalog[name].json_file / image_root at the split's files.

    Metadata.set refuses to change a value, so a changed root (e.g. another
    $D2_DISTILL_DATA) recreates the entry, keeping its other fields.
    """
    from detectron2.data import MetadataCatalog

    meta = MetadataCatalog.get(name)
    if meta.get("json_file") == json_path and meta.get("image_root") == image_dir:
        return
    if meta.get("json_file") is not None or meta.get("image_root") is not None:
        kept = {k: v for k, v in vars(meta).items()
                if k not in ("name", "json_file", "image_root")}
        MetadataCatalog.remove(name)
        meta = MetadataCatalog.get(name)
        meta.set(**kept)
    meta.set(json_file=json_path, image_root=image_dir)


def ensure_split(name: str, root: str | None = None) -> tuple[str, str]:
    """Generate split ``name`` unless present (its JSON exists); return (image_dir, json_path).

    ``root`` defaults to the root given to :func:`register_shapes_datasets`, else
    :func:`data_root`. Also points the split's detectron2 metadata at these paths.
    """
    spec = _check_split(name)
    image_dir, json_path = split_paths(name, _resolve_root(name, root))
    if not os.path.isfile(json_path):
        lock = os.path.join(os.path.dirname(json_path), f".{name}.lock")
        with _file_lock(lock):
            if not os.path.isfile(json_path):  # another process may have finished it
                logger.info("generating %d images for %s in %s",
                            spec["num_images"], name, os.path.dirname(image_dir))
                generate_split(image_dir, json_path, spec["num_images"], spec["seed"])
    _set_path_metadata(name, image_dir, json_path)
    return image_dir, json_path


def _load_split(name: str):
    from detectron2.data.datasets import load_coco_json

    image_dir, json_path = ensure_split(name)
    return load_coco_json(json_path, image_dir, name)


def register_shapes_datasets(root: str | None = None) -> None:
    """Register every split in detectron2's DatasetCatalog / MetadataCatalog.

    Lazy: nothing is generated here. The loader calls :func:`ensure_split`, then
    detectron2's ``load_coco_json``. With ``root=None`` paths are resolved from
    :func:`data_root` when the data is loaded, not at registration time.
    Names already registered by someone else are left untouched.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog

    for name in SPLITS:
        if name in DatasetCatalog:
            if not getattr(DatasetCatalog[name], "_d2_distill_shapes", False):
                logger.debug("%s is already registered by someone else; skipping", name)
                continue
        else:
            loader = functools.partial(_load_split, name)
            loader._d2_distill_shapes = True
            DatasetCatalog.register(name, loader)
        _REGISTERED_ROOTS[name] = root
        MetadataCatalog.get(name).set(thing_classes=list(THING_CLASSES), evaluator_type="coco")
        # If the split already exists on disk, expose its paths right away (cheap check).
        image_dir, json_path = split_paths(name, _resolve_root(name, None))
        if os.path.isfile(json_path):
            _set_path_metadata(name, image_dir, json_path)


def ensure_datasets(names: Iterable[str] | str) -> None:
    """ensure_split for every name that is a shapes split; other names are ignored."""
    if isinstance(names, str):
        names = [names]
    for name in names:
        if name in SPLITS:
            ensure_split(name)

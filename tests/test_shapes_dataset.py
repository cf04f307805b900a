"""Tests of the synthetic shapes dataset (d2_distill.data.shapes)."""

import contextlib
import io
import json
import os

import cv2
import numpy as np
import pytest

import d2_distill.data  # noqa: F401  (registers the splits)
from d2_distill.data import shapes
from d2_distill.data.shapes import (
    SPLITS,
    STYLE,
    THING_CLASSES,
    ShapesStyle,
    ensure_datasets,
    ensure_split,
    generate_split,
    register_shapes_datasets,
    render_image,
    split_paths,
)


def _generate(tmp_path, name, num_images, seed):
    image_dir = str(tmp_path / name / "images")
    json_path = str(tmp_path / (name + ".json"))
    generate_split(image_dir, json_path, num_images, seed)
    return image_dir, json_path


def _files(image_dir):
    return sorted(os.listdir(image_dir))


def test_api_constants():
    assert THING_CLASSES == ["circle", "triangle", "square", "star", "hexagon", "cross"]
    assert SPLITS == {
        "shapes_train": {"num_images": 2000, "seed": 0},
        "shapes_val": {"num_images": 200, "seed": 1},
        "shapes_tune": {"num_images": 200, "seed": 4},
        "shapes_mini_train": {"num_images": 32, "seed": 2},
        "shapes_mini_val": {"num_images": 16, "seed": 3},
    }


def test_determinism(tmp_path):
    dir_a, json_a = _generate(tmp_path / "a", "s", 12, seed=7)
    dir_b, json_b = _generate(tmp_path / "b", "s", 12, seed=7)
    dir_c, json_c = _generate(tmp_path / "c", "s", 12, seed=8)

    names = _files(dir_a)
    assert len(names) == 12 and names == _files(dir_b) == _files(dir_c)
    with open(json_a, "rb") as fa, open(json_b, "rb") as fb, open(json_c, "rb") as fc:
        ja, jb, jc = fa.read(), fb.read(), fc.read()
    assert ja == jb
    assert ja != jc
    for n in names:
        with open(os.path.join(dir_a, n), "rb") as fa, open(os.path.join(dir_b, n), "rb") as fb:
            assert fa.read() == fb.read(), n
    differing = 0
    for n in names:
        with open(os.path.join(dir_a, n), "rb") as fa, open(os.path.join(dir_c, n), "rb") as fc:
            differing += fa.read() != fc.read()
    assert differing == len(names)

    # Any image can be regenerated alone, identical to the one in the split.
    img, anns = render_image(7, 5)
    assert np.array_equal(img, cv2.imread(os.path.join(dir_a, names[5]), cv2.IMREAD_COLOR))
    coco = json.loads(ja)
    assert [a["bbox"] for a in coco["annotations"] if a["image_id"] == 6] == [a["bbox"] for a in anns]
    # The split records the version and the style that made it.
    assert coco["info"]["version"] == shapes.DATASET_VERSION == "shapes_v2"
    assert coco["info"]["style"] == {"min_objects": 1, "max_objects": 5, "min_extent": 24.0,
                                     "max_extent": 120.0, "clutter": 0.25}


def test_style_changes_the_images_and_is_deterministic():
    a1, anns1 = render_image(3, 2, style=ShapesStyle(clutter=0.0))
    a2, anns2 = render_image(3, 2, style=ShapesStyle(clutter=0.0))
    b, _ = render_image(3, 2, style=ShapesStyle(clutter=1.0))
    assert np.array_equal(a1, a2) and anns1 == anns2
    assert not np.array_equal(a1, b)
    # the default style is STYLE, and passing it explicitly changes nothing
    d1, _ = render_image(3, 2)
    d2, _ = render_image(3, 2, style=STYLE)
    assert np.array_equal(d1, d2)


def test_clutter_knob_scales_the_distractors():
    """Without clutter the background is smooth: far fewer strong edges than with v1's amount."""
    def edges(style):
        total = 0
        for i in range(12):
            img, _ = render_image(5, i, style=ShapesStyle(min_objects=1, max_objects=1, clutter=style))
            total += int((cv2.Canny(cv2.GaussianBlur(img, (5, 5), 1.5), 60, 150) > 0).sum())
        return total

    none, half, full = edges(0.0), edges(0.5), edges(1.0)
    assert none < half < full


def test_validity(tmp_path):
    from pycocotools.coco import COCO

    image_dir, json_path = _generate(tmp_path, "s", 12, seed=11)
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(json_path)

    cats = coco.loadCats(coco.getCatIds())
    assert [c["id"] for c in cats] == [1, 2, 3, 4, 5, 6]
    assert [c["name"] for c in cats] == THING_CLASSES
    assert len(coco.getImgIds()) == 12
    assert sum(len(coco.getAnnIds(imgIds=[i])) for i in coco.getImgIds()) > 0
    ann_ids = list(coco.anns)
    assert len(ann_ids) == len(set(ann_ids))

    for img_id in coco.getImgIds():
        info = coco.loadImgs([img_id])[0]
        W, H = info["width"], info["height"]
        assert (W, H) == (256, 256)
        path = os.path.join(image_dir, info["file_name"])
        assert os.path.isfile(path)
        im = cv2.imread(path, cv2.IMREAD_UNCHANGED)
        assert im.shape == (H, W, 3) and im.dtype == np.uint8

        anns = coco.loadAnns(coco.getAnnIds(imgIds=[img_id]))
        assert len(anns) <= STYLE.max_objects
        for a in anns:
            x, y, w, h = a["bbox"]
            assert all(isinstance(v, float) for v in a["bbox"])
            assert w > 0 and h > 0
            assert x >= 0 and y >= 0 and x + w <= W and y + h <= H
            assert 1 <= a["category_id"] <= 6
            assert a["iscrowd"] == 0
            assert a["area"] >= 20
            assert a["area"] <= w * h
            assert len(a["segmentation"]) >= 1
            for poly in a["segmentation"]:
                assert len(poly) >= 6 and len(poly) % 2 == 0
                assert all(isinstance(v, float) for v in poly)
                p = np.asarray(poly).reshape(-1, 2)
                # polygons lie within their box
                assert p[:, 0].min() >= x and p[:, 0].max() <= x + w
                assert p[:, 1].min() >= y and p[:, 1].max() <= y + h
            # the polygon mask agrees with the recorded visible area
            m = coco.annToMask(a)
            assert abs(int(m.sum()) - a["area"]) <= 0.35 * a["area"] + 10


def test_statistics():
    widths, heights, per_image, classes = [], [], [], set()
    for i in range(50):
        _, anns = render_image(1234, i)
        per_image.append(len(anns))
        for a in anns:
            widths.append(a["bbox"][2])
            heights.append(a["bbox"][3])
            classes.add(a["category_id"])
    sides = np.stack([widths, heights], axis=1)
    longest = sides.max(axis=1)
    # v2: no tiny objects (the longest side is at least ~min_extent / 2 even when
    # rotated, squashed and partly occluded), still a wide range of sizes
    assert longest.min() >= 10
    assert (longest < 32).any()
    assert (longest > 80).any()
    assert classes == {1, 2, 3, 4, 5, 6}
    assert 1.5 <= np.mean(per_image) <= 4
    assert max(per_image) <= 5


def test_split_paths_and_errors(tmp_path):
    image_dir, json_path = split_paths("shapes_val", str(tmp_path))
    assert image_dir == os.path.join(str(tmp_path), shapes.DATASET_VERSION, "shapes_val", "images")
    assert json_path == os.path.join(str(tmp_path), shapes.DATASET_VERSION, "shapes_val.json")
    with pytest.raises(ValueError, match="shapes_mini_val"):
        split_paths("shapes_nope")
    with pytest.raises(ValueError):
        ensure_split("shapes_nope", str(tmp_path))


def test_data_root_env(tmp_path, monkeypatch):
    monkeypatch.setenv("D2_DISTILL_DATA", str(tmp_path))
    assert shapes.data_root() == str(tmp_path)
    monkeypatch.delenv("D2_DISTILL_DATA")
    assert shapes.data_root() == os.path.join(
        os.path.expanduser("~"), ".cache", "d2_distill", "datasets"
    )


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = shapes.render_image

    def flaky(seed, index, image_size=256, style=None):
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt
        return real(seed, index, image_size, style)

    monkeypatch.setattr(shapes, "render_image", flaky)
    image_dir = str(tmp_path / "s" / "images")
    json_path = str(tmp_path / "s.json")
    with pytest.raises(KeyboardInterrupt):
        generate_split(image_dir, json_path, 8, seed=0)
    assert not os.path.exists(json_path)
    assert not os.path.exists(image_dir)
    assert os.listdir(tmp_path / "s") == []  # no temporary leftovers


def test_registration_is_lazy_and_loads(tmp_path, monkeypatch, caplog):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    monkeypatch.setenv("D2_DISTILL_DATA", str(tmp_path))
    register_shapes_datasets()  # already registered at import: must be a no-op
    for name in SPLITS:
        assert name in DatasetCatalog.list()
        meta = MetadataCatalog.get(name)
        assert meta.thing_classes == THING_CLASSES
        assert meta.evaluator_type == "coco"
    assert os.listdir(tmp_path) == []  # registration generates nothing

    with caplog.at_level("INFO", logger=shapes.__name__):
        image_dir, json_path = ensure_split("shapes_mini_val")
    assert "generating 16 images" in caplog.text
    assert json_path.startswith(str(tmp_path)) and os.path.isfile(json_path)
    meta = MetadataCatalog.get("shapes_mini_val")
    assert meta.json_file == json_path and meta.image_root == image_dir

    dicts = DatasetCatalog.get("shapes_mini_val")
    assert len(dicts) == 16
    cats = set()
    for d in dicts:
        assert os.path.isfile(d["file_name"])
        W, H = d["width"], d["height"]
        assert "annotations" in d
        for a in d["annotations"]:
            cats.add(a["category_id"])
            x, y, w, h = a["bbox"]
            assert x >= 0 and y >= 0 and w > 0 and h > 0 and x + w <= W and y + h <= H
    assert cats <= set(range(6)) and len(cats) >= 2
    meta = MetadataCatalog.get("shapes_mini_val")
    assert meta.thing_classes == THING_CLASSES
    assert meta.thing_dataset_id_to_contiguous_id == {i + 1: i for i in range(6)}

    # Already generated: a second ensure does not regenerate.
    mtime = os.path.getmtime(json_path)
    caplog.clear()
    with caplog.at_level("INFO", logger=shapes.__name__):
        ensure_datasets(["shapes_mini_val", "coco_2017_val"])  # unknown names ignored
    assert "generating" not in caplog.text
    assert os.path.getmtime(json_path) == mtime

    # A different root re-points the metadata (Metadata.set cannot change values).
    other = tmp_path / "other"
    monkeypatch.setenv("D2_DISTILL_DATA", str(other))
    image_dir2, json_path2 = ensure_split("shapes_mini_val")
    assert json_path2.startswith(str(other))
    meta = MetadataCatalog.get("shapes_mini_val")
    assert meta.json_file == json_path2 and meta.image_root == image_dir2
    assert meta.thing_classes == THING_CLASSES and meta.evaluator_type == "coco"
    with open(json_path, "rb") as f1, open(json_path2, "rb") as f2:
        assert f1.read() == f2.read()
    assert len(DatasetCatalog.get("shapes_mini_val")) == 16

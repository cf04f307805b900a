"""Bad data and non-finite losses.

* Images with no boxes and with degenerate boxes (zero width / height, and a box
  under a pixel wide) go through the whole pipeline (DATALOADER.FILTER_EMPTY_ANNOTATIONS
  False) for TAR and TBD: no crash, every logged loss and every weight finite.
  detectron2's DatasetMapper drops the zero-area boxes (``filter_empty_instances``),
  so an image with only those reaches the model with no box at all; the sub-pixel box
  reaches it as is.
* A non-finite distillation loss stops training with detectron2's FloatingPointError,
  whose message names the offending loss.
"""
import itertools
import json
import math

import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json
from detectron2.data.samplers import TrainingSampler
from detectron2.utils.env import seed_all_rng

from d2_distill.data import ensure_datasets
from d2_distill.engine import DistillTrainer
from d2_distill.methods.tar import TARMethod

from helpers import cfg_for

DATASET = "shapes_bad_boxes"
# the training stream's first 4 images, in this order: batch 0 has no box at all
KINDS = ("empty", "degenerate_only", "mixed", "normal")


def _annotations(kind: str, real: list, next_id) -> list:
    x, y, w, h = real[0]["bbox"]
    zero_w = {"bbox": [x, y, 0.0, h], "area": 0.0}
    zero_h = {"bbox": [x, y, w, 0.0], "area": 0.0}
    tiny = {"bbox": [x, y, 0.5, h], "area": 0.5 * h}  # under a pixel wide: kept by detectron2
    if kind == "empty":
        extra, keep = [], []
    elif kind == "degenerate_only":
        extra, keep = [zero_w, zero_h], []
    elif kind == "mixed":
        extra, keep = [zero_w, tiny], real
    else:
        extra, keep = [], real
    out = [dict(a, id=next_id()) for a in keep]
    for e in extra:
        out.append(dict(e, id=next_id(), category_id=real[0]["category_id"], iscrowd=0))
    return out


@pytest.fixture(scope="module")
def bad_dataset(tmp_path_factory):
    """DATASET: 4 shapes_mini_val images, arranged so that the training stream
    (TrainingSampler seeded with cfg.SEED = 0) yields them in the order of KINDS."""
    if DATASET in DatasetCatalog.list():
        return DATASET
    ensure_datasets(["shapes_mini_val"])
    meta = MetadataCatalog.get("shapes_mini_val")
    src = json.load(open(meta.json_file))
    by_image = {}
    for a in src["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    images = [im for im in src["images"] if len(by_image.get(im["id"], [])) >= 2][:4]
    order = list(itertools.islice(iter(TrainingSampler(4, seed=0)), 4))  # position -> stream rank
    kind_at = {pos: KINDS[rank] for rank, pos in enumerate(order)}
    ids = itertools.count(1)
    out_images, out_anns = [], []
    for pos, im in enumerate(images):  # load_coco_json sorts by image id: id pos+1 is record pos
        out_images.append(dict(im, id=pos + 1))
        for a in _annotations(kind_at[pos], by_image[im["id"]], lambda: next(ids)):
            out_anns.append(dict(a, image_id=pos + 1))
    path = tmp_path_factory.mktemp("bad_data") / "bad_boxes.json"
    with open(path, "w") as f:
        json.dump({"images": out_images, "annotations": out_anns, "categories": src["categories"]}, f)

    image_root = meta.image_root
    DatasetCatalog.register(DATASET, lambda: load_coco_json(str(path), image_root, DATASET))
    MetadataCatalog.get(DATASET).set(thing_classes=list(meta.thing_classes), evaluator_type="coco")
    assert len(meta.thing_classes) == 6
    return DATASET


@pytest.mark.parametrize(
    "config, teacher_fixture",
    [("tar_faster_rcnn_paper.yaml", "frcnn_teacher_weights"), ("tbd_retinanet.yaml", "retina_teacher_weights")],
)
@pytest.mark.slow
def test_empty_and_degenerate_boxes_train_finite(config, teacher_fixture, bad_dataset, request, tmp_path):
    cfg = cfg_for(
        config,
        "DATASETS.TRAIN", f"('{bad_dataset}',)",
        "DATASETS.TEST", "()",
        "DATALOADER.FILTER_EMPTY_ANNOTATIONS", "False",
        teacher=request.getfixturevalue(teacher_fixture), out_dir=tmp_path, iters=2,
    )
    assert cfg.SEED == 0
    seed_all_rng(cfg.SEED)
    trainer = DistillTrainer(cfg)
    trainer.resume_or_load(resume=False)

    seen = []  # per iteration, per image: the gt boxes the model received
    loader = iter(trainer.data_loader)

    def recording():
        for batch in loader:
            seen.append([x["instances"].gt_boxes.tensor.clone() for x in batch])
            yield batch

    trainer._trainer._data_loader_iter_obj = recording()
    trainer.train()  # detectron2 raises FloatingPointError on a non-finite loss

    # the data really was bad: batch 0 without any box, a sub-pixel box in batch 1
    assert [len(b) for b in seen[0]] == [0, 0]
    widths = torch.cat([b[:, 2] - b[:, 0] for b in seen[1]])
    assert widths.numel() > 0 and widths.min() < 1.0
    assert all((b[:, 2:] > b[:, :2]).all() for step in seen for b in step)  # zero-area ones dropped

    hist = trainer.storage.histories()
    method_losses = {"tar_faster_rcnn_paper.yaml": {"loss_tar_feat", "loss_tar_cls", "loss_tar_reg"},
                     "tbd_retinanet.yaml": {"loss_tbd_hd", "loss_tbd_tfd"}}[config]
    assert method_losses <= set(hist)
    for k, h in hist.items():
        if k.startswith("loss_") or k == "total_loss":
            values = [v for v, _ in h.values()]
            assert len(values) == 2 and all(math.isfinite(v) for v in values), (k, values)
    for n, p in trainer.model.named_parameters():
        assert torch.isfinite(p).all(), n


def test_nan_distillation_loss_is_named(frcnn_teacher_weights, monkeypatch, tmp_path):
    forward = TARMethod.forward

    def nan_cls(self, step):
        losses = forward(self, step)
        losses["loss_tar_cls"] = losses["loss_tar_cls"] * float("nan")
        return losses

    monkeypatch.setattr(TARMethod, "forward", nan_cls)
    cfg = cfg_for("tar_faster_rcnn_paper.yaml", "DATASETS.TEST", "()", teacher=frcnn_teacher_weights,
                  out_dir=tmp_path, iters=2)
    seed_all_rng(cfg.SEED)
    trainer = DistillTrainer(cfg)
    trainer.resume_or_load(resume=False)
    with pytest.raises(FloatingPointError) as e:
        trainer.train()
    msg = str(e.value)
    assert "Loss became infinite or NaN at iteration=0" in msg
    assert "'loss_tar_cls': nan" in msg
    others = [k for k in ("loss_cls", "loss_box_reg", "loss_tar_feat", "loss_tar_reg") if f"'{k}': nan" in msg]
    assert others == [], msg  # only the offending loss is reported as NaN
    assert not (tmp_path / "model_final.pth").exists()

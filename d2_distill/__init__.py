"""d2_distill: knowledge distillation for detectron2 detectors."""

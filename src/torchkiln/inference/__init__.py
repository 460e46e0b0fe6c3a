"""Inference: `torchkiln.load(RUN_DIR or EXPORT_DIR)` -> a Predictor; input sources, test-time
augmentation and the prediction file (`kiln predict`). A task's columns are its writer
(tasks/predictions.py)."""

from torchkiln.inference.predictor import Predictor, PredictResult, load

__all__ = ["Predictor", "PredictResult", "load"]

"""Where numbers go: console, CSV/JSONL files, TensorBoard, plots."""

from torchkiln.loggers.base import Logger
from torchkiln.loggers.files import CSVLogger, JSONLLogger
from torchkiln.loggers.tensorboard import TensorBoardLogger

__all__ = ["Logger", "CSVLogger", "JSONLLogger", "TensorBoardLogger"]

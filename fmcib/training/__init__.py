"""Training: one engine (:class:`Trainer`) for every method, its data and optimisers, and full fine-tuning.

Runs on one CPU/GPU/MPS, or on several processes under ``torchrun`` (DistributedDataParallel).

Methods, one module each: :mod:`.finetune` (image fine-tuning), :mod:`.simclr`, :mod:`.jepa` (image JEPA and
LeJEPA), and for patients over time :mod:`.longitudinal` (the multimodal JEPA and the encoder family),
:mod:`.alignment` (CLIP-style stage), :mod:`.patients` (fine-tuning on patient labels) and :mod:`.layered`
(the staged schedule).
"""

from ..distributed import DistributedContext, init_distributed
from .crops import read_crops
from .data import Augmentation, PatchDataset
from .engine import Trainer, TrainingConfig, TrainingResult, TrainingTask
from .finetune import ClassificationTask, Classifier, FineTuneResult, finetune, predict, read_finetuned
from .optim import LARS, lr_factor
from .regularizers import sigreg

__all__ = [
    "Augmentation",
    "PatchDataset",
    "read_crops",
    "DistributedContext",
    "init_distributed",
    "Trainer",
    "TrainingConfig",
    "TrainingResult",
    "TrainingTask",
    "ClassificationTask",
    "Classifier",
    "FineTuneResult",
    "finetune",
    "predict",
    "read_finetuned",
    "LARS",
    "lr_factor",
    "sigreg",
]

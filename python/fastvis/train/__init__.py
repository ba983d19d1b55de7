"""Training: ``fastvis.train.Trainer`` and ``TrainConfig`` (the ``fastvis train`` /
``fastvis validate`` commands are built on them).

Modules: ``config`` (the settings), ``data`` (datasets and the deterministic distributed
batch schedule), ``transforms`` (tensor augmentations, mixup / cutmix, soft-target loss),
``optim`` (parameter groups, layer-wise lr decay, warmup + cosine, SAM), ``ema``,
``checkpoint`` (atomic files, last-k + best, RNG states), ``distributed`` (torchrun, gloo
SyncBatchNorm), ``report`` (metrics log, progress, plot), ``trainer`` (the loop).
"""
from .checkpoint import CheckpointError, CheckpointManager, atomic_torch_save, atomic_write_bytes
from .config import ConfigError, TrainConfig, load_config_file
from .data import (DataError, DigitsDataset, ImageFolderDataset, SyntheticDataset, BatchSchedule)
from .ema import ModelEma
from .optim import SAM, WarmupCosine, build_optimizer, layer_ids, param_groups
from .transforms import EvalTransform, Mixer, MixParams, TrainTransform, soft_target_cross_entropy
from .trainer import Trainer, TrainingError, evaluate_model

__all__ = [
    "Trainer", "TrainConfig", "TrainingError", "ConfigError", "DataError", "CheckpointError",
    "DigitsDataset", "ImageFolderDataset", "SyntheticDataset", "BatchSchedule",
    "TrainTransform", "EvalTransform", "Mixer", "MixParams", "soft_target_cross_entropy",
    "SAM", "WarmupCosine", "build_optimizer", "param_groups", "layer_ids", "ModelEma",
    "CheckpointManager", "atomic_torch_save", "atomic_write_bytes", "load_config_file", "evaluate_model",
]

"""Where a Lightning run keeps its files, and how they reach its MLflow run: shared by the callbacks and EMA."""
from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import MLFlowLogger


def run_dir(trainer: L.Trainer) -> Path:
    """Where this run writes its own files: the first logger's directory, else the root dir."""
    return Path(trainer.log_dir or trainer.default_root_dir)


def log_artifact(trainer: L.Trainer, path: Path, artifact_path: str | None = None) -> None:
    for logger in trainer.loggers:
        if isinstance(logger, MLFlowLogger):
            logger.experiment.log_artifact(logger.run_id, str(path), artifact_path)

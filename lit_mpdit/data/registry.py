"""The registry of data modules by name (`DATAMODULES`, `build_datamodule`, `datamodule_name`), building one
from a class path as LightningCLI does (`instantiate_datamodule`), and `reference_name`, the name FID
reference statistics are cached under.
"""
from __future__ import annotations

from typing import Any

import lightning as L

from lit_mpdit.data.base import HeldOutDataModule
from lit_mpdit.data.cifar10 import CIFAR10DataModule
from lit_mpdit.data.fashion_mnist import FashionMNISTDataModule, FashionMNISTSampleDataModule
from lit_mpdit.data.image_folder import ImageFolderDataModule
from lit_mpdit.data.latents import LatentsDataModule
from lit_mpdit.errors import ConfigError, check_choice

DATAMODULES: dict[str, type[HeldOutDataModule]] = {
    "fashion_mnist": FashionMNISTDataModule,
    "fashion_mnist_sample": FashionMNISTSampleDataModule,
    "cifar10": CIFAR10DataModule,
    "image_folder": ImageFolderDataModule,
    "latents": LatentsDataModule,
}


def build_datamodule(name: str, **kwargs: Any) -> HeldOutDataModule:
    """The data module registered as `name` (a key of DATAMODULES), built with `kwargs`."""
    check_choice("data", name, DATAMODULES)
    return DATAMODULES[name](**kwargs)


def datamodule_name(datamodule: L.LightningDataModule) -> str:
    """The registry name of a data module (reference statistics are cached under it)."""
    return next((name for name, cls in DATAMODULES.items() if type(datamodule) is cls), type(datamodule).__name__)


def instantiate_datamodule(class_path: str, init_args: dict[str, Any], option: str) -> HeldOutDataModule:
    """The data module `class_path` ("package.module.Class") built with `init_args`, as LightningCLI builds it."""
    import importlib

    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(f"{option}: cannot import data module {class_path!r} ({e})") from None
    return cls(**init_args)


def reference_name(datamodule: HeldOutDataModule, split: str) -> str:
    """Names the reference images `datamodule.reference_images(split, n)` gives, for the FID cache: the data
    module and split, their source folder when not the stored split, and the seed that draws a subset when it
    is not the default 0."""
    source = datamodule.reference_source(split)
    seed = f":seed{datamodule.seed}" if datamodule.seed else ""
    return f"{datamodule_name(datamodule)}:{split}{':' + source if source else ''}{seed}"

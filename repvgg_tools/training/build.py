"""Build the pieces of a training run from a recipe: datasets, loaders, model, optimizer, scheduler, loss, mixup.

Everything that has a timm factory uses it: ``create_transform``, ``Mixup``, ``create_optimizer_v2``,
``create_scheduler_v2``, ``ModelEmaV3`` and the losses of ``timm.loss``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from .config import RecipeError
from .regularizers import param_groups
from .state import DistInfo

__all__ = ["build_datasets", "build_loaders", "build_model", "build_optimizer", "build_scheduler",
           "build_mixup_and_loss", "build_ema"]


def build_datasets(recipe: Mapping[str, Any]) -> tuple[Dataset, Dataset, int]:
    """``(train, val, num_classes)`` for ``data.name`` digits or imagefolder.

    Raises:
        RecipeError: missing directories or a class count that disagrees with ``model.num_classes``.
    """
    from .. import data as d

    dc, ac = recipe["data"], recipe["aug"]
    if dc["name"] == "digits":
        kw = dict(image_size=dc["image_size"], channels=dc["channels"], val_fraction=dc["val_fraction"],
                  seed=dc["split_seed"])
        return d.digits_dataset("train", **kw), d.digits_dataset("val", **kw), d.DIGITS_CLASSES
    for key in ("train_dir", "val_dir"):
        if not dc[key]:
            raise RecipeError(f"data.name=imagefolder needs data.{key}=DIR (one sub-directory per class)")
    train_tf = d.train_transform(dc["image_size"], ac["train_crop"], tuple(ac["scale"]), tuple(ac["scale_jitter"]),
                                 ac["hflip"], ac["color_jitter"], ac["auto_augment"])
    val_tf = d.eval_transform(dc["image_size"], dc["eval_resize"])
    try:
        train, val = d.image_folder(dc["train_dir"], train_tf), d.image_folder(dc["val_dir"], val_tf)
    except ValueError as exc:
        raise RecipeError(str(exc)) from None
    if train.classes != val.classes:
        raise RecipeError(f"{dc['train_dir']} and {dc['val_dir']} have different class folders")
    return train, val, len(train.classes)


def build_loaders(recipe: Mapping[str, Any], train: Dataset, val: Dataset, info: DistInfo
                  ) -> tuple[DataLoader, DataLoader, DistributedSampler, torch.Generator]:
    """Training loader (DistributedSampler: a seeded, epoch-dependent order; also with one process) and a
    validation loader over this rank's shard. Returns the sampler and the worker-seed generator to reseed per
    epoch, which makes the data order and augmentation reproducible on resume."""
    per_rank = recipe["batch_size"] // info.world_size
    if per_rank < 1 or recipe["batch_size"] % info.world_size:
        raise RecipeError(f"batch_size={recipe['batch_size']} must be a multiple of the {info.world_size} processes")
    if len(train) < recipe["batch_size"]:
        raise RecipeError(f"batch_size={recipe['batch_size']} is larger than the training set ({len(train)} images)")
    if per_rank % 2 and (recipe["aug"]["mixup"] > 0 or recipe["aug"]["cutmix"] > 0):
        raise RecipeError(f"mixup/cutmix need an even batch per process, got {per_rank}")
    workers = recipe["data"]["workers"] if recipe["data"]["name"] == "imagefolder" else 0
    sampler = DistributedSampler(train, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                 seed=recipe["seed"], drop_last=True)
    gen = torch.Generator()
    pin = info.device.type == "cuda"
    train_loader = DataLoader(train, batch_size=per_rank, sampler=sampler, num_workers=workers, drop_last=True,
                              pin_memory=pin, generator=gen, persistent_workers=False)
    shard = Subset(val, list(range(info.rank, len(val), info.world_size)))
    val_loader = DataLoader(shard, batch_size=max(per_rank, 1) * 2, shuffle=False, num_workers=workers,
                            pin_memory=pin)
    return train_loader, val_loader, sampler, gen


def build_model(recipe: Mapping[str, Any], num_classes: int) -> nn.Module:
    """``create_model(model.arch, num_classes, **model.kwargs)``.

    Raises:
        RecipeError: unknown architecture or bad builder arguments.
    """
    from ..models import create_model

    mc = recipe["model"]
    try:
        return create_model(mc["arch"], num_classes=num_classes, **mc["kwargs"])
    except (ValueError, TypeError) as exc:
        raise RecipeError(f"model.arch={mc['arch']!r}: {exc}") from None


def build_optimizer(recipe: Mapping[str, Any], model: nn.Module) -> torch.optim.Optimizer:
    """timm ``create_optimizer_v2`` over our parameter groups (no decay on BN/bias; see ``custom_l2``)."""
    from timm.optim import create_optimizer_v2

    oc = recipe["optim"]
    groups = param_groups(model, oc["weight_decay"], oc["custom_l2"])
    try:
        return create_optimizer_v2(groups, opt=oc["opt"], lr=oc["lr"], weight_decay=oc["weight_decay"],
                                   momentum=oc["momentum"])
    except (ValueError, AssertionError, KeyError) as exc:
        raise RecipeError(f"optim.opt={oc['opt']!r}: {exc}") from None


def build_scheduler(recipe: Mapping[str, Any], optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """timm ``create_scheduler_v2``; None for ``sched.name: none``. The plateau scheduler watches val top-1."""
    from timm.scheduler import create_scheduler_v2

    sc = recipe["sched"]
    if sc["name"] == "none":
        return None
    per_step = sc["per_step"] and sc["name"] != "plateau"
    with warnings.catch_warnings():
        # timm deprecates its plateau scheduler because it does not checkpoint the wrapped torch scheduler's
        # counters; engine.py saves and restores that state itself, so resume is exact
        warnings.filterwarnings("ignore", message="PlateauLRScheduler is deprecated", category=FutureWarning)
        scheduler, _ = create_scheduler_v2(
            optimizer, sched=sc["name"], num_epochs=recipe["epochs"], decay_epochs=sc["decay_epochs"],
            patience_epochs=sc["patience"], decay_rate=sc["decay_rate"], min_lr=sc["min_lr"],
            warmup_lr=sc["warmup_lr"], warmup_epochs=sc["warmup_epochs"], plateau_mode="max",
            step_on_epochs=not per_step, updates_per_epoch=steps_per_epoch,
        )
    return scheduler


def build_mixup_and_loss(recipe: Mapping[str, Any], num_classes: int) -> tuple[Any, nn.Module]:
    """timm ``Mixup`` (or None) and the matching timm loss (soft-target CE with mixup, label smoothing CE, CE)."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    ac = recipe["aug"]
    if ac["mixup"] > 0 or ac["cutmix"] > 0:
        mixup = Mixup(mixup_alpha=ac["mixup"], cutmix_alpha=ac["cutmix"], label_smoothing=ac["label_smoothing"],
                      num_classes=num_classes)
        return mixup, SoftTargetCrossEntropy()
    if ac["label_smoothing"] > 0:
        return None, LabelSmoothingCrossEntropy(smoothing=ac["label_smoothing"])
    return None, nn.CrossEntropyLoss()


def build_ema(recipe: Mapping[str, Any], model: nn.Module):
    """timm ``ModelEmaV3`` of the (unwrapped) model, or None."""
    ec = recipe["ema"]
    if not ec["enabled"]:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=ec["decay"], use_warmup=ec["warmup"])

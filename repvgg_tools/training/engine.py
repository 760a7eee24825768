"""The training loop: one function, :func:`train`, that runs a validated recipe (single process or torchrun DDP).

Checkpoints (``last.pth`` every epoch, ``best.pth`` on a new best val top-1) are written atomically by rank 0 with
``save_checkpoint`` and carry ``arch``, ``num_classes`` and ``layout: ours`` so ``repvgg-convert`` needs no flags.
Resume restores model, optimizer, scheduler, AMP scaler, EMA, every rank's RNG states, epoch and step; the data
order is a function of (seed, epoch), so a resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..io.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from . import build
from .config import RecipeError
from .metrics import write_metrics
from .qat import prepare_qat, qat_state
from .regularizers import custom_l2
from .state import (
    DistInfo,
    all_reduce_sum,
    cleanup_distributed,
    gather_objects,
    get_rng_state,
    seed_everything,
    set_rng_state,
    setup_distributed,
)

__all__ = ["train", "evaluate"]

log = logging.getLogger(__name__)

_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _autocast(device: torch.device, amp: str):
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_AMP_DTYPES[amp])


@torch.no_grad()
def evaluate(model: nn.Module, loader, info: DistInfo, amp: str = "none", channels_last: bool = False
             ) -> dict[str, float]:
    """Top-1/top-5 accuracy (%) and mean cross-entropy over every rank's shard of the validation set."""
    model.eval()
    loss_sum = top1 = top5 = count = 0.0
    for images, target in loader:
        images, target = images.to(info.device), target.to(info.device)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with _autocast(info.device, amp):
            logits = model(images)
        logits = logits.float()
        loss_sum += nn.functional.cross_entropy(logits, target, reduction="sum").item()
        k = min(5, logits.shape[1])
        pred = logits.topk(k, dim=1).indices
        hit = pred.eq(target[:, None])
        top1 += hit[:, :1].sum().item()
        top5 += hit.any(dim=1).sum().item()
        count += len(target)
    loss_sum, top1, top5, count = all_reduce_sum([loss_sum, top1, top5, count], info)
    count = max(count, 1.0)
    return {"loss": loss_sum / count, "top1": 100.0 * top1 / count, "top5": 100.0 * top5 / count}


def _prepare_output(recipe: Mapping[str, Any], info: DistInfo) -> Path:
    out = Path(recipe["output"])
    if out.exists() and not out.is_dir():
        raise RecipeError(f"output={out} exists and is not a directory")
    taken = out.is_dir() and any((out / n).exists() for n in ("last.pth", "metrics.csv"))
    if taken and not recipe["resume"] and not recipe["force"]:
        raise RecipeError(f"output={out} already holds a run; pass resume={out / 'last.pth'} to continue it, "
                          "force=true to start over there, or another output=DIR")
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    return out


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().clone() for k, v in _unwrap(model).state_dict().items()}


def _scheduler_state(scheduler) -> dict[str, Any] | None:
    if scheduler is None:
        return None
    state = {"timm": scheduler.state_dict()}
    inner = getattr(scheduler, "lr_scheduler", None)  # the plateau scheduler wraps torch's ReduceLROnPlateau
    if inner is not None:
        state["torch"] = inner.state_dict()
    return state


def _load_scheduler_state(scheduler, state: Mapping[str, Any] | None) -> None:
    if scheduler is None or state is None:
        return
    scheduler.load_state_dict(state["timm"])
    if "torch" in state:
        scheduler.lr_scheduler.load_state_dict(state["torch"])


def train(recipe: Mapping[str, Any]) -> dict[str, Any]:
    """Run a validated recipe (see :mod:`repvgg_tools.training.config`); works under ``torchrun``.

    Returns:
        ``{"best_top1", "last": last metrics row, "checkpoint": path of last.pth, "history": rows}``.

    Raises:
        RecipeError: an option that cannot be honoured (missing data, taken output directory...).
        CheckpointError: an unreadable or mismatched resume checkpoint.
    """
    info = setup_distributed(recipe["device"])
    try:
        return _train(recipe, info)
    finally:
        cleanup_distributed()


def _train(recipe: Mapping[str, Any], info: DistInfo) -> dict[str, Any]:
    out = _prepare_output(recipe, info)
    seed_everything(recipe["seed"])  # same initial weights on every rank
    train_set, val_set, data_classes = build.build_datasets(recipe)
    num_classes = recipe["model"]["num_classes"]
    if num_classes != data_classes:
        raise RecipeError(f"model.num_classes={num_classes} but the data has {data_classes} classes")
    model = build.build_model(recipe, num_classes).to(info.device)
    if recipe["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    train_loader, val_loader, sampler, loader_gen = build.build_loaders(recipe, train_set, val_set, info)
    qat = recipe["quant"]["qat"]
    if qat:
        model = _prepare_qat(recipe, model, train_loader, info)
    steps = len(train_loader)
    if recipe["max_steps_per_epoch"]:
        steps = min(steps, recipe["max_steps_per_epoch"])
    optimizer = build.build_optimizer(recipe, model)
    scheduler = build.build_scheduler(recipe, optimizer, steps)
    mixup, criterion = build.build_mixup_and_loss(recipe, num_classes)
    ema = build.build_ema(recipe, model)
    amp = recipe["amp"]
    scaler = torch.amp.GradScaler(info.device.type, enabled=amp == "fp16")
    wd = recipe["optim"]["weight_decay"]
    use_l2 = recipe["optim"]["custom_l2"] and wd > 0

    start_epoch, step, history, best = 0, 0, [], -math.inf
    rng_states = None
    if recipe["resume"]:
        ckpt = load_checkpoint(recipe["resume"], map_location=info.device, mmap=False)
        if not isinstance(ckpt, Mapping) or "optimizer" not in ckpt or "epoch" not in ckpt:
            raise CheckpointError(f"{recipe['resume']}: not a training checkpoint of tools/train.py (no optimizer "
                                  "state); to fine-tune from weights, load them into a new run instead")
        if ckpt.get("arch") != recipe["model"]["arch"]:
            raise CheckpointError(f"{recipe['resume']}: holds {ckpt.get('arch')!r}, the recipe trains "
                                  f"{recipe['model']['arch']!r}")
        model.load_state_dict(ckpt["state_dict"])
        optimizer.load_state_dict(ckpt["optimizer"])
        _load_scheduler_state(scheduler, ckpt.get("scheduler"))
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        if ema is not None and "state_dict_ema" in ckpt:
            ema.module.load_state_dict(ckpt["state_dict_ema"])
        start_epoch, step = int(ckpt["epoch"]) + 1, int(ckpt["step"])
        history, best = list(ckpt.get("metrics", [])), float(ckpt.get("best_top1", -math.inf))
        rng_states = ckpt.get("rng")
        log.info("resumed %s at epoch %d (step %d)", recipe["resume"], start_epoch, step)

    ddp_model = model
    if info.distributed:
        ids = [info.local_rank] if info.device.type == "cuda" else None
        ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    seed_everything(recipe["seed"] + info.rank)  # ranks draw different dropout/mixup randomness
    if rng_states is not None:  # last: building the pieces above may draw random numbers
        set_rng_state(rng_states[info.rank] if len(rng_states) == info.world_size else rng_states[0])

    last_epoch = recipe["epochs"] - 1
    if recipe["stop_after"] is not None:
        last_epoch = min(last_epoch, recipe["stop_after"] - 1)
    ckpt_path = out / "last.pth"
    for epoch in range(start_epoch, last_epoch + 1):
        sampler.set_epoch(epoch)
        loader_gen.manual_seed(recipe["seed"] * 100003 + epoch * 1009 + info.rank)
        ddp_model.train()
        t0, loss_sum, seen = time.perf_counter(), 0.0, 0
        bar = _progress(recipe, info, steps, f"epoch {epoch + 1}/{recipe['epochs']}")
        for i, (images, target) in enumerate(train_loader):
            if i >= steps:
                break
            images, target = images.to(info.device, non_blocking=True), target.to(info.device, non_blocking=True)
            if mixup is not None:
                images, target = mixup(images, target)
            if recipe["channels_last"]:
                images = images.contiguous(memory_format=torch.channels_last)
            with _autocast(info.device, amp):
                loss = criterion(ddp_model(images), target)
            total = loss.float() + (0.5 * wd * custom_l2(model) if use_l2 else 0.0)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(total).backward()
            if recipe["clip_grad"]:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), recipe["clip_grad"])
            scaler.step(optimizer)
            scaler.update()
            step += 1
            if scheduler is not None:
                scheduler.step_update(num_updates=step)
            if ema is not None:
                ema.update(model, step=step)
            loss_sum += loss.item() * len(images)
            seen += len(images)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{optimizer.param_groups[0]['lr']:.4g}")
        if bar is not None:
            bar.close()
        train_time = time.perf_counter() - t0
        loss_sum, seen = all_reduce_sum([loss_sum, seen], info)
        row: dict[str, Any] = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"],
                               "train_loss": loss_sum / max(seen, 1), "train_images": int(seen),
                               "train_images_per_s": seen / train_time}
        if (epoch + 1) % recipe["eval_interval"] == 0 or epoch == last_epoch:
            metrics = evaluate(ddp_model, val_loader, info, amp, recipe["channels_last"])
            row.update(val_loss=metrics["loss"], val_top1=metrics["top1"], val_top5=metrics["top5"])
            if ema is not None:
                row["ema_top1"] = evaluate(ema.module, val_loader, info, amp, recipe["channels_last"])["top1"]
        row["epoch_time_s"] = time.perf_counter() - t0
        if scheduler is not None:
            scheduler.step(epoch + 1, row.get("val_top1"))
        history.append(row)
        improved = row.get("val_top1") is not None and row["val_top1"] > best
        if improved:
            best = row["val_top1"]
        rngs = gather_objects(get_rng_state(), info)
        if info.is_main:
            ckpt = {
                "state_dict": _state_dict(model), "arch": recipe["model"]["arch"], "num_classes": num_classes,
                "model_kwargs": dict(recipe["model"]["kwargs"]), "layout": "ours", "epoch": epoch, "step": step,
                "optimizer": optimizer.state_dict(), "scheduler": _scheduler_state(scheduler),
                "scaler": scaler.state_dict() if scaler.is_enabled() else None, "rng": rngs,
                "recipe": dict(recipe), "metrics": history, "best_top1": best, "world_size": info.world_size,
            }
            if ema is not None:
                ckpt["state_dict_ema"] = _state_dict(ema.module)
            if qat:  # a plain deploy state dict that every loader reads, and the scales the export writes
                ckpt["state_dict"], ckpt["quant"] = qat_state(model)
            save_checkpoint(ckpt, ckpt_path, force=True)
            if improved:
                save_checkpoint(ckpt, out / "best.pth", force=True)
            write_metrics(history, out)
            log.info("epoch %d: %s", epoch + 1, ", ".join(f"{k}={_fmt(v)}" for k, v in row.items() if k != "epoch"))
    return {"best_top1": best, "last": history[-1] if history else None, "checkpoint": str(ckpt_path),
            "history": history, "model": model, "ema": ema.module if ema is not None else None}


def _prepare_qat(recipe: Mapping[str, Any], model: nn.Module, train_loader, info: DistInfo) -> nn.Module:
    """quant.init's weights in ``model``, fused and fake-quantized, activation scales calibrated on training batches.

    A checkpoint of tools/train.py loads directly; any other layout goes through
    ``repvgg_tools.conversion.api.load_model``.
    """
    init = recipe["quant"]["init"]
    ckpt = load_checkpoint(init, map_location="cpu", mmap=False)
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, Mapping) else None
    try:
        if not isinstance(sd, Mapping):
            raise RuntimeError("no state dict")
        model.load_state_dict(sd)
    except RuntimeError:
        from ..conversion.api import load_model

        model, meta = load_model(init)
        if meta["arch"] != recipe["model"]["arch"]:
            raise RecipeError(f"quant.init={init} holds {meta['arch']!r}, the recipe trains "
                              f"{recipe['model']['arch']!r}") from None
    model = model.to(info.device)
    want, batches = recipe["quant"]["calib_samples"], []
    for images, _ in train_loader:
        batches.append(images[: want - sum(len(b) for b in batches)])
        if sum(len(b) for b in batches) >= want:
            break
    model = prepare_qat(model, batches)
    if recipe["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    return model.train()


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _progress(recipe: Mapping[str, Any], info: DistInfo, total: int, desc: str):
    if not (recipe["progress"] and info.is_main):
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, dynamic_ncols=True, leave=False)

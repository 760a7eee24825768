"""Training recipes: a schema of every option with its type and default, YAML loading and ``key=value`` overrides.

A recipe is a nested mapping. Top-level keys hold the run (``epochs``, ``batch_size``, ``seed``...), sections hold
the model, data, augmentation, optimizer, schedule and EMA. Any key of the schema can be overridden on the command
line with a dotted path, e.g. ``epochs=2 model.arch=repvgg_a0 optim.lr=0.05``. Unknown keys, wrong types and values
outside a key's choices raise :class:`RecipeError` with a message that names the key.
"""

from __future__ import annotations

import copy
import difflib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["RecipeError", "SCHEMA", "default_recipe", "load_recipe", "apply_overrides", "validate_recipe"]


class RecipeError(ValueError):
    """A recipe or override is invalid; the message names the key and says what is expected."""


class Opt:
    """One leaf of the schema: accepted types, default, optional choices, and whether ``None`` is allowed."""

    def __init__(self, types: type | tuple[type, ...], default: Any, choices: Iterable[Any] | None = None,
                 nullable: bool = False, doc: str = "") -> None:
        self.types = types if isinstance(types, tuple) else (types,)
        self.default, self.choices, self.nullable, self.doc = default, tuple(choices or ()), nullable, doc


_AMP = ("none", "bf16", "fp16")

SCHEMA: dict[str, Any] = {
    "epochs": Opt(int, 120, doc="length of the schedule"),
    "batch_size": Opt(int, 256, doc="global batch size (split across DDP processes)"),
    "seed": Opt(int, 0),
    "amp": Opt(str, "none", _AMP, doc="autocast dtype: none, bf16 or fp16 (fp16 uses a GradScaler)"),
    "device": Opt(str, "auto", doc="auto (cuda when available), cpu, cuda"),
    "channels_last": Opt(bool, False),
    "output": Opt(str, "runs/train", doc="directory for checkpoints and metrics"),
    "force": Opt(bool, False, doc="reuse a non-empty output directory"),
    "resume": Opt(str, None, nullable=True, doc="checkpoint to resume from (model, optimizer, schedule, RNG)"),
    "stop_after": Opt(int, None, nullable=True, doc="stop after this epoch (e.g. a time-limited job); resume later"),
    "max_steps_per_epoch": Opt(int, None, nullable=True, doc="cap optimizer steps per epoch (smoke tests)"),
    "eval_interval": Opt(int, 1, doc="evaluate every N epochs (and after the last)"),
    "clip_grad": Opt(float, None, nullable=True, doc="clip the gradient norm"),
    "progress": Opt(bool, True, doc="tqdm progress bars on rank 0"),
    "model": {
        "arch": Opt(str, "repvgg_a0", doc="a registered model (repvgg_tools.list_models())"),
        "num_classes": Opt(int, 1000),
        "kwargs": Opt(dict, {}, doc="extra arguments of the model builder, e.g. {dropout: 0.5} for VGG"),
    },
    "data": {
        "name": Opt(str, "imagefolder", ("imagefolder", "digits")),
        "train_dir": Opt(str, None, nullable=True),
        "val_dir": Opt(str, None, nullable=True),
        "image_size": Opt(int, 224),
        "eval_resize": Opt(int, 256, doc="shorter side before the centre crop at evaluation"),
        "workers": Opt(int, 4),
        "val_fraction": Opt(float, 0.2, doc="digits: held-out share of each class"),
        "split_seed": Opt(int, 0, doc="digits: split seed"),
        "channels": Opt(int, 3, (1, 3), doc="digits: image channels"),
    },
    "aug": {
        "train_crop": Opt(str, "rrc", ("rrc", "scale_jitter", "none")),
        "scale": Opt(list, [0.08, 1.0], doc="random-resized-crop area range"),
        "scale_jitter": Opt(list, [256, 512], doc="scale_jitter: shorter side S drawn from [min, max]"),
        "hflip": Opt(float, 0.5),
        "color_jitter": Opt(float, 0.0),
        "auto_augment": Opt(str, None, nullable=True, doc="a timm policy string, e.g. 'original' (ImageNet AA)"),
        "mixup": Opt(float, 0.0, doc="mixup alpha (0 = off)"),
        "cutmix": Opt(float, 0.0, doc="cutmix alpha (0 = off)"),
        "label_smoothing": Opt(float, 0.0),
    },
    "optim": {
        "opt": Opt(str, "momentum", doc="a timm optimizer name: momentum (SGD), sgd (Nesterov), adamw..."),
        "lr": Opt(float, 0.1),
        "momentum": Opt(float, 0.9),
        "weight_decay": Opt(float, 1e-4, doc="never applied to BatchNorm parameters and biases"),
        "custom_l2": Opt(bool, False, doc="the paper's L2 on each block's equivalent 3x3 kernel instead of decay "
                                          "on the branch kernels"),
    },
    "sched": {
        "name": Opt(str, "cosine", ("cosine", "plateau", "step", "none")),
        "warmup_epochs": Opt(int, 0),
        "warmup_lr": Opt(float, 1e-5),
        "min_lr": Opt(float, 0.0),
        "decay_rate": Opt(float, 0.1, doc="step/plateau: lr factor"),
        "decay_epochs": Opt(float, 30.0, doc="step: epochs between decays"),
        "patience": Opt(int, 5, doc="plateau: epochs without improvement of val top-1 before a decay"),
        "per_step": Opt(bool, True, doc="cosine/step: update the lr every step, not only every epoch"),
    },
    "quant": {
        "qat": Opt(bool, False, doc="quantization-aware fine-tuning of the deploy form (fuse, then fake-quantize "
                                    "with TensorRT's int8 scheme); repvgg-export --precision int8 writes its scales"),
        "init": Opt(str, None, nullable=True, doc="qat: the trained checkpoint to fine-tune (any layout "
                                                  "repvgg-convert reads)"),
        "calib_samples": Opt(int, 64, doc="qat: training images that calibrate the initial activation scales"),
    },
    "ema": {
        "enabled": Opt(bool, False),
        "decay": Opt(float, 0.9998),
        "warmup": Opt(bool, False, doc="ramp the decay up over the first steps (timm ModelEmaV3 warmup)"),
    },
}


def _defaults(schema: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _defaults(v) if isinstance(v, Mapping) else copy.deepcopy(v.default) for k, v in schema.items()}


def default_recipe() -> dict[str, Any]:
    """Every option at its default."""
    return _defaults(SCHEMA)


def _unknown(key: str, known: Iterable[str], where: str) -> RecipeError:
    hint = difflib.get_close_matches(key.split(".")[-1], list(known), n=1)
    extra = f" (did you mean {hint[0]!r}?)" if hint else ""
    return RecipeError(f"unknown recipe key {where + key!r}{extra}; known keys: {', '.join(sorted(known))}")


def _coerce(path: str, opt: Opt, value: Any) -> Any:
    if value is None:
        if opt.nullable:
            return None
        raise RecipeError(f"recipe key {path!r} may not be null")
    if isinstance(value, str) and value.lower() in ("null", "none", "~") and opt.nullable:
        return None
    types = opt.types
    if float in types and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:  # YAML 1.1 reads "1e-4" as a string
            value = float(value)
        except ValueError:
            pass
    if int in types and isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            pass
    if bool in types and isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
        value = value.lower() in ("true", "yes", "on")
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if not ok:
        names = " or ".join(t.__name__ for t in types)
        raise RecipeError(f"recipe key {path!r} must be {names}, got {type(value).__name__} {value!r}")
    if opt.choices and value not in opt.choices:
        raise RecipeError(f"recipe key {path!r} must be one of {', '.join(map(str, opt.choices))}, got {value!r}")
    return value


def _merge(base: dict, update: Mapping, schema: Mapping, prefix: str = "") -> None:
    if not isinstance(update, Mapping):
        raise RecipeError(f"recipe section {prefix.rstrip('.') or '(top level)'!r} must be a mapping")
    for key, value in update.items():
        key = str(key)
        if key not in schema:
            raise _unknown(key, schema.keys(), prefix)
        node = schema[key]
        if isinstance(node, Mapping):
            _merge(base[key], value or {}, node, f"{prefix}{key}.")
        else:
            base[key] = _coerce(prefix + key, node, value)


def validate_recipe(recipe: Mapping[str, Any]) -> dict[str, Any]:
    """Check a complete or partial recipe against the schema and return it merged over the defaults.

    Raises:
        RecipeError: unknown key, wrong type, value outside the choices, or inconsistent options.
    """
    merged = default_recipe()
    _merge(merged, recipe, SCHEMA)
    _check_consistency(merged)
    return merged


def _check_consistency(r: Mapping[str, Any]) -> None:
    positive = {"epochs": r["epochs"], "batch_size": r["batch_size"], "data.image_size": r["data"]["image_size"],
                "eval_interval": r["eval_interval"]}
    for key, value in positive.items():
        if value < 1:
            raise RecipeError(f"recipe key {key!r} must be >= 1, got {value}")
    if r["optim"]["lr"] <= 0:
        raise RecipeError(f"recipe key 'optim.lr' must be > 0, got {r['optim']['lr']}")
    q = r["quant"]
    if q["qat"]:
        if not q["init"]:
            raise RecipeError("quant.qat=true needs quant.init=CHECKPOINT (the trained model to fine-tune)")
        conflicts = {"resume": bool(r["resume"]), "ema.enabled": r["ema"]["enabled"],
                     "optim.custom_l2": r["optim"]["custom_l2"], "amp": r["amp"] != "none"}
        bad = [k for k, v in conflicts.items() if v]
        if bad:
            raise RecipeError(f"quant.qat=true does not support {', '.join(bad)} (QAT fine-tunes the fused deploy "
                              "form in float32 from quant.init)")
        if q["calib_samples"] < 1:
            raise RecipeError(f"recipe key 'quant.calib_samples' must be >= 1, got {q['calib_samples']}")
    for key in ("scale", "scale_jitter"):
        pair = r["aug"][key]
        if len(pair) != 2 or not all(isinstance(v, (int, float)) for v in pair) or pair[0] > pair[1]:
            raise RecipeError(f"recipe key 'aug.{key}' must be [min, max] with min <= max, got {pair!r}")


def load_recipe(path: str | os.PathLike, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """Read a YAML recipe, apply ``key=value`` overrides, validate, and return the full recipe.

    Raises:
        RecipeError: missing file, bad YAML, unknown key, bad value.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: no such recipe file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, Mapping):
        raise RecipeError(f"{path}: a recipe must be a mapping of keys to values")
    try:
        recipe = validate_recipe(data)
    except RecipeError as exc:
        raise RecipeError(f"{path}: {exc}") from None
    return apply_overrides(recipe, overrides)


def apply_overrides(recipe: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``dotted.key=value`` strings (values parsed as YAML) to a recipe and validate the result.

    Raises:
        RecipeError: malformed override, unknown key or bad value.
    """
    import yaml

    result = copy.deepcopy(dict(recipe))
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise RecipeError(f"override {item!r} must look like key=value (e.g. epochs=2 or optim.lr=0.05)")
        parts = key.split(".")
        schema: Any = SCHEMA
        node = result
        for i, part in enumerate(parts):
            if not isinstance(schema, Mapping) or part not in schema:
                known = schema.keys() if isinstance(schema, Mapping) else []
                raise _unknown(part, known, ".".join(parts[:i]) + "." if i else "")
            schema = schema[part]
            if i < len(parts) - 1:
                node = node[part]
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        if isinstance(schema, Mapping):
            raise RecipeError(f"override {key!r} names a section; set one of its keys: {', '.join(schema)}")
        node[parts[-1]] = _coerce(key, schema, value)
    _check_consistency(result)
    return result

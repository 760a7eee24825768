"""Checkpoints shaped exactly like the training files people have, built without the packages that wrote them.

The classes are defined in throw-away modules under the real module names (``yacs.config.CfgNode``,
``mmengine.logging.history_buffer.HistoryBuffer``) so the pickles name them as the real files do; the modules are
removed again before anything is loaded, as on a machine without those packages.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import textwrap
from pathlib import Path

import numpy as np
import torch

# the real classes' shape: yacs CfgNode is a dict subclass with its flags in __dict__; mmengine's HistoryBuffer keeps
# NumPy arrays; both are pickled by reference to their modules
FAKE_MODULES = {
    "yacs/__init__.py": "",
    "yacs/config.py": '''
        class CfgNode(dict):
            IMMUTABLE = "__immutable__"

            def __init__(self, init_dict=None, key_list=None, new_allowed=False):
                init_dict = {} if init_dict is None else init_dict
                for k, v in list(init_dict.items()):
                    if isinstance(v, dict):
                        init_dict[k] = CfgNode(v)
                super().__init__(init_dict)
                self.__dict__[CfgNode.IMMUTABLE] = False
                self.__dict__["__deprecated_keys__"] = set()
                self.__dict__["__renamed_keys__"] = {}
                self.__dict__["__new_allowed__"] = new_allowed

            def __getattr__(self, name):
                if name in self:
                    return self[name]
                raise AttributeError(name)
    ''',
    "mmengine/__init__.py": "",
    "mmengine/logging/__init__.py": "",
    "mmengine/logging/history_buffer.py": '''
        import numpy as np

        class HistoryBuffer:
            def __init__(self, log_history=(), count_history=(), max_length=1000000):
                self.max_length = max_length
                self._set_default_statistics()
                self._log_history = np.array(log_history)
                self._count_history = np.array(count_history)

            def _set_default_statistics(self):
                self._statistics_methods = {"min": "min", "max": "max", "current": "current", "mean": "mean"}
    ''',
}


class _FakePackages:
    """``with _FakePackages(tmp):`` makes ``yacs`` and ``mmengine`` importable, and forgets them on exit."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def __enter__(self):
        for rel, text in FAKE_MODULES.items():
            path = self.root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(textwrap.dedent(text))
        sys.path.insert(0, str(self.root))
        importlib.invalidate_caches()
        return self

    def __exit__(self, *exc):
        sys.path.remove(str(self.root))
        for name in [m for m in sys.modules if m.split(".")[0] in ("yacs", "mmengine")]:
            del sys.modules[name]


def _optimizer_state(sd: dict) -> dict:
    return {"state": {0: {"momentum_buffer": torch.zeros(3)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}


def official_main_checkpoint(path: Path, model_sd: dict, arch: str = "RepVGG-A0", ema_sd: dict | None = None) -> None:
    """What the official repo's ``main.py`` saves: model, optimizer, lr_scheduler, max_accuracy, epoch, a yacs
    ``CfgNode`` config (``config.MODEL.ARCH``), and with model EMA an ``ema`` state dict."""
    with _FakePackages(path.parent / "_fake_pkgs"):
        from yacs.config import CfgNode

        config = CfgNode({"MODEL": {"ARCH": arch, "NUM_CLASSES": 5, "LABEL_SMOOTHING": 0.1},
                          "TRAIN": {"EPOCHS": 120, "BASE_LR": 0.1, "EMA_ALPHA": 0.0},
                          "DATA": {"IMG_SIZE": 224, "DATASET": "imagenet"}, "AMP_OPT_LEVEL": "O0"})
        state = {"model": model_sd, "optimizer": _optimizer_state(model_sd),
                 "lr_scheduler": {"t_initial": 120, "base_values": [0.1]}, "max_accuracy": 72.41, "epoch": 119,
                 "config": config}
        if ema_sd is not None:
            state["ema"] = ema_sd
        torch.save(state, path)


def mmengine_checkpoint(path: Path, model_sd: dict) -> None:
    """What mmengine's runner saves for MMPretrain: meta (with the config text), state_dict, a message_hub of
    ``HistoryBuffer`` objects holding NumPy arrays and NumPy scalars, optimizer and param_schedulers."""
    with _FakePackages(path.parent / "_fake_pkgs"):
        from mmengine.logging.history_buffer import HistoryBuffer

        message_hub = {
            "log_scalars": {"train/lr": HistoryBuffer([0.1, 0.099], [1, 2]),
                            "train/loss": HistoryBuffer([2.3, 2.1], [1, 2])},
            "runtime_info": {"epoch": 2, "iter": 200, "max_iters": 1000, "best_score": np.float64(0.71),
                             "dataset_meta": {"classes": ("a", "b")}},
            "resumed_keys": {"epoch": True, "iter": True},
        }
        meta = {"mmengine_version": "0.10.4", "time": "20240101_000000", "epoch": 2, "iter": 200, "seed": 42,
                "cfg": "model = dict(type='ImageClassifier', backbone=dict(type='RepVGG', arch='A0'))",
                "experiment_name": "repvgg-a0_8xb32_in1k", "dataset_meta": {"classes": ("a", "b")}}
        torch.save({"meta": meta, "state_dict": model_sd, "message_hub": message_hub,
                    "optimizer": _optimizer_state(model_sd),
                    "param_schedulers": [{"base_values": [0.1], "last_step": 2}]}, path)


def timm_train_checkpoint(path: Path, model_sd: dict, ema_sd: dict, model_name: str) -> None:
    """What timm's ``train.py`` (``CheckpointSaver``) saves: epoch, arch (the class name, lowercased), state_dict,
    optimizer, version, ``args`` as an ``argparse.Namespace``, state_dict_ema and metric."""
    args = argparse.Namespace(model=model_name, lr=0.1, epochs=3, batch_size=64, model_ema=True, amp=False,
                              data_dir="/data/imagenet", mean=None, input_size=None, drop_path=None)
    torch.save({"epoch": 2, "arch": "byobnet", "state_dict": model_sd, "optimizer": _optimizer_state(model_sd),
                "version": 2, "args": args, "state_dict_ema": ema_sd, "metric": np.float64(0.42)}, path)


class RunsCode:
    """Unpickling this object calls ``fn(*args)``: a stand-in for a malicious checkpoint."""

    def __init__(self, fn, *args) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)

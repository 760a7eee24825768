"""A training file written by the real mmengine ``Runner``, as MMPretrain 1.x training writes it.

Run as a script (tests/test_mmengine_real.py does, in a subprocess, so that the test process never imports
mmengine)::

    python tests/mmengine_runner_file.py OUT_DIR [--arch repvgg_a0] [--num-classes 10]

It trains our ``repvgg_a0`` for one epoch of two iterations on random images through ``Runner.from_cfg``: SGD in an
``OptimWrapper``, a LinearLR warm-up and a CosineAnnealingLR (MMPretrain's RepVGG schedule, converted to iterations),
the default hooks. The model is an mmengine ``BaseModel`` whose parameters carry MMPretrain's RepVGG names
(``backbone.stem.branch_3x3.norm.weight``, ``backbone.stage_1.0.branch_norm.running_var``, ``head.fc.weight``); its
forward runs our RepVGG on them. At the end of the epoch a hook randomizes the BatchNorm affine parameters and
measures their running statistics on random images (so that a conversion is a real test), and the Runner's own
``CheckpointHook`` then writes ``OUT_DIR/work_dir/epoch_1.pth``: keys ``meta`` (``cfg`` pretty text, seed,
``dataset_meta``, mmengine version), ``state_dict``, ``message_hub`` (``HistoryBuffer`` objects), ``optimizer``,
``param_schedulers``. Written with mmengine 0.10.7, torch 2.14, NumPy 2.4 (the pickle then names
``numpy._core.multiarray``; NumPy 1.x writes ``numpy.core.multiarray``).

It also writes ``OUT_DIR/reference.pth``, plain data that ``torch.load(weights_only=True)`` reads: the trained
weights in our layout, an input and the model's output on it (eval mode), and the message hub's scalars and the meta
as the Runner held them.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from repvgg_tools import create_model, randomize_batchnorm
from repvgg_tools.conversion.layouts import LAYOUTS, rename_layout

OURS, MMPRETRAIN = LAYOUTS["ours"], LAYOUTS["mmpretrain"]
BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
INPUT_SHAPE = (2, 3, 32, 32)


def register_mmpretrain_names(owner: nn.Module, net: nn.Module) -> None:
    """Register copies of ``net``'s tensors on ``owner`` under MMPretrain's names (a tree of plain modules named
    ``backbone``, ``stem``, ``branch_3x3``...); ``net`` is kept, unregistered, as the function they run through."""
    ours = {**dict(net.named_parameters()), **dict(net.named_buffers())}
    for name, tensor in rename_layout(ours, OURS, MMPRETRAIN).items():
        *path, leaf = name.split(".")
        module = owner
        for part in path:
            if part not in module._modules:
                module.add_module(part, nn.Module())
            module = module._modules[part]
        if leaf in BUFFERS:
            module.register_buffer(leaf, tensor.detach().clone())
        else:
            module.register_parameter(leaf, nn.Parameter(tensor.detach().clone()))
    object.__setattr__(owner, "_repvgg", net)  # not a submodule: its own tensors never show in the state dict


def mmpretrain_tensors(owner: nn.Module) -> dict[str, torch.Tensor]:
    """``owner``'s registered tensors (MMPretrain's names), the same objects, not copies."""
    named = {**dict(owner.named_parameters()), **dict(owner.named_buffers())}
    return {k: v for k, v in named.items() if k.startswith(("backbone.", "head."))}


def run_mmpretrain_named(owner: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Our RepVGG's forward on ``owner``'s tensors (BatchNorm updates its running statistics in them)."""
    net = owner._repvgg
    net.train(owner.training)
    return functional_call(net, rename_layout(mmpretrain_tensors(owner), MMPRETRAIN, OURS), (x,), strict=True)


def calibrate_batchnorm(net: nn.Module, seed: int, batches: int = 4) -> None:
    """Running statistics measured on random images (not 0 and 1, as after two iterations at momentum 0.1, and not
    random either: random statistics in 22 blocks take float32 activations to 1e33)."""
    gen = torch.Generator().manual_seed(seed)
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches
    net.train()
    for _ in range(batches):
        net(torch.randn((8, *INPUT_SHAPE[1:]), generator=gen) * 2 + 0.5)
    for m in norms:
        m.momentum = 0.1


class MMPretrainLayoutModel(nn.Module):
    """Our RepVGG (training or deploy form) with MMPretrain's parameter names; no mmengine needed."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        register_mmpretrain_names(self, net)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_mmpretrain_named(self, x)


def plain(value):
    """NumPy scalars and arrays as Python numbers and lists, containers as dicts and lists."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def write_runner_file(out_dir: Path, arch: str = "repvgg_a0", num_classes: int = 10) -> Path:
    """Train through ``Runner.from_cfg`` and let its CheckpointHook write the file; returns its path."""
    from mmengine.config import Config
    from mmengine.dataset import default_collate
    from mmengine.hooks import Hook
    from mmengine.model import BaseModel
    from mmengine.registry import DATASETS, FUNCTIONS, HOOKS, MODELS
    from mmengine.runner import Runner
    from torch.utils.data import Dataset

    class RepVGGToolsClassifier(BaseModel):
        """MMPretrain's ImageClassifier as far as its checkpoint shows: ``backbone.*`` (RepVGG) and ``head.fc``."""

        def __init__(self, arch: str, num_classes: int, seed: int = 0, data_preprocessor=None) -> None:
            super().__init__(data_preprocessor=data_preprocessor)
            torch.manual_seed(seed)
            register_mmpretrain_names(self, create_model(arch, num_classes=num_classes))

        def forward(self, inputs, label=None, mode="tensor"):
            logits = run_mmpretrain_named(self, inputs)
            if mode == "loss":
                return {"loss": F.cross_entropy(logits, label)}
            return list(logits) if mode == "predict" else logits

    class RandomImages(Dataset):
        """Seeded random images and labels, with the ``metainfo`` the Runner saves as ``meta.dataset_meta``."""

        def __init__(self, length: int, num_classes: int) -> None:
            self.length, self.num_classes = length, num_classes
            self.metainfo = {"classes": tuple(f"class_{i}" for i in range(num_classes))}

        def __len__(self) -> int:
            return self.length

        def __getitem__(self, i: int) -> dict:
            gen = torch.Generator().manual_seed(i)
            image = torch.randn(INPUT_SHAPE[1:], generator=gen)
            return {"inputs": image, "label": torch.randint(self.num_classes, (), generator=gen)}

    class RandomizeBatchNorm(Hook):
        """After the last epoch, before CheckpointHook (lower priority) saves: BatchNorm affine parameters randomized,
        running statistics measured on random images."""

        priority = "NORMAL"

        def __init__(self, seed: int = 0) -> None:
            self.seed = seed

        def after_train_epoch(self, runner) -> None:
            model = runner.model
            tensors = mmpretrain_tensors(model)
            net = model._repvgg
            net.load_state_dict(rename_layout(tensors, MMPRETRAIN, OURS), strict=True)
            with torch.no_grad():
                calibrate_batchnorm(randomize_batchnorm(net, self.seed), self.seed)
                for k, v in rename_layout(net.state_dict(), OURS, MMPRETRAIN).items():
                    tensors[k].copy_(v)

    MODELS.register_module(module=RepVGGToolsClassifier, force=True)
    DATASETS.register_module(module=RandomImages, force=True)
    HOOKS.register_module(module=RandomizeBatchNorm, force=True)
    FUNCTIONS.register_module(name="repvgg_tools_collate", module=default_collate, force=True)

    work_dir = out_dir / "work_dir"
    cfg = Config(dict(
        model=dict(type="RepVGGToolsClassifier", arch=arch, num_classes=num_classes, seed=0),
        work_dir=str(work_dir),
        experiment_name=f"{arch}_1xb2_random",
        train_dataloader=dict(batch_size=2, num_workers=0,
                              dataset=dict(type="RandomImages", length=4, num_classes=num_classes),
                              sampler=dict(type="DefaultSampler", shuffle=True),
                              collate_fn=dict(type="repvgg_tools_collate")),
        train_cfg=dict(by_epoch=True, max_epochs=1),
        optim_wrapper=dict(optimizer=dict(type="SGD", lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=True)),
        param_scheduler=[
            dict(type="LinearLR", start_factor=0.25, by_epoch=False, begin=0, end=2),
            dict(type="CosineAnnealingLR", T_max=120, by_epoch=True, begin=0, end=120, convert_to_iter_based=True),
        ],
        default_hooks=dict(timer=dict(type="IterTimerHook"), logger=dict(type="LoggerHook", interval=1),
                           param_scheduler=dict(type="ParamSchedulerHook"),
                           checkpoint=dict(type="CheckpointHook", interval=1),
                           sampler_seed=dict(type="DistSamplerSeedHook")),
        custom_hooks=[dict(type="RandomizeBatchNorm", seed=7)],
        env_cfg=dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
                     dist_cfg=dict(backend="gloo")),
        randomness=dict(seed=0, deterministic=False),
        launcher="none",
        log_level="WARNING",
    ))
    runner = Runner.from_cfg(cfg)
    runner.train()
    path = work_dir / "epoch_1.pth"
    if not path.is_file():
        raise RuntimeError(f"the Runner wrote no {path}")

    model = runner.model.eval()
    x = torch.randn(INPUT_SHAPE, generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        output = model(x)
    hub = runner.message_hub.state_dict()
    scalars = {k: {"log_history": plain(v._log_history), "count_history": plain(v._count_history)}
               for k, v in hub["log_scalars"].items()}
    train_sd = rename_layout({k: v.detach().clone() for k, v in mmpretrain_tensors(model).items()}, MMPRETRAIN, OURS)
    torch.save({"arch": arch, "num_classes": num_classes, "train_state_dict": train_sd, "input": x, "output": output,
                "log_scalars": scalars, "runtime_info": plain(dict(hub["runtime_info"])),
                "param_names": list(mmpretrain_tensors(model))}, out_dir / "reference.pth")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--arch", default="repvgg_a0")
    parser.add_argument("--num-classes", type=int, default=10)
    args = parser.parse_args()
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # the Runner would move the model to a GPU: keep it on CPU
    args.out_dir.mkdir(parents=True, exist_ok=True)
    print(write_runner_file(args.out_dir, args.arch, args.num_classes))


if __name__ == "__main__":
    main()

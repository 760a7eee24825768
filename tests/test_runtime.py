"""fastest_cpu_runner: every backend is checked against the model, timed, and the fastest is returned."""

import logging

import pytest
import torch
from torch import nn

from repvgg_tools import randomize_batchnorm, verify_equivalence
from repvgg_tools.contract import RUNTIME_RTOL
from repvgg_tools.models import RepVGG
from repvgg_tools.runtime import CPU_BACKENDS, fastest_cpu_runner


def _tiny() -> RepVGG:
    torch.manual_seed(0)
    return randomize_batchnorm(RepVGG((8, 16, 16, 32, 64), (1, 1, 2, 2, 1), {2: 2}, num_classes=10), seed=1).eval()


def test_picks_the_fastest_backend_that_reproduces_the_training_model():
    pytest.importorskip("onnxruntime", exc_type=ImportError)
    model = _tiny()
    x = torch.randn(4, 3, 32, 32)
    runner = fastest_cpu_runner(model, x, iters=3, warmup=1)
    assert set(runner.timings_ms) == set(CPU_BACKENDS)
    assert runner.timings_ms[runner.backend] == min(runner.timings_ms.values())
    # the chosen runner reproduces the training model on other inputs and other batch sizes
    other = [torch.randn(2, 3, 32, 32), torch.randn(7, 3, 32, 32)]
    result = verify_equivalence(model, runner, inputs=other, rtol=RUNTIME_RTOL)
    assert result.passed, result
    assert model.stem.branch_3x3 is not None  # the caller's training model is left as it was


def test_backend_subset_and_unknown_backend():
    model = _tiny()
    x = torch.randn(1, 3, 32, 32)
    runner = fastest_cpu_runner(model, x, backends=("torch_channels_last",), iters=1, warmup=0)
    assert runner.backend == "torch_channels_last" and list(runner.timings_ms) == ["torch_channels_last"]
    assert verify_equivalence(model, runner, inputs=[x]).passed
    with pytest.raises(ValueError, match="unknown CPU backend"):
        fastest_cpu_runner(model, x, backends=("tensorrt",))


class ChannelsLastSkew(nn.Module):
    """A network whose channels_last path is wrong: every output is off by ``error`` (relative) when its input comes
    in channels_last memory format, as a backend with a broken kernel would be."""

    def __init__(self, net: nn.Module, error: float) -> None:
        super().__init__()
        self.net, self.error = net, error

    def forward(self, x):
        out = self.net(x)
        skewed = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        return out * (1 + self.error) if skewed else out


@pytest.mark.parametrize("factor", [2.0, 0.5])
def test_a_backend_with_wrong_outputs_is_rejected(factor, caplog):
    """The real candidate check: channels_last off by 2x the contract's tolerance is skipped (and alone, nothing is
    left); off by half of it, it is kept."""
    model = ChannelsLastSkew(_tiny(), factor * RUNTIME_RTOL).eval()
    x = torch.randn(4, 3, 32, 32)
    with caplog.at_level(logging.WARNING, logger="repvgg_tools.runtime"):
        runner = fastest_cpu_runner(model, x, backends=("torch", "torch_channels_last"), iters=1, warmup=0)
    skipped = [r.getMessage() for r in caplog.records if "skipping torch_channels_last" in r.getMessage()]
    if factor > 1:
        assert runner.backend == "torch" and list(runner.timings_ms) == ["torch"]
        assert len(skipped) == 1 and f"{factor * RUNTIME_RTOL:.2e}" in skipped[0], skipped
        with pytest.raises(ValueError, match="no CPU backend could run this model"):
            fastest_cpu_runner(model, x, backends=("torch_channels_last",), iters=1, warmup=0)
    else:
        assert set(runner.timings_ms) == {"torch", "torch_channels_last"} and not skipped

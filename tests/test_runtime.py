"""fastest_cpu_runner: every backend is checked against the model, timed, and the fastest is returned."""

import pytest
import torch

from repvgg_tools import randomize_batchnorm, verify_equivalence
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
    result = verify_equivalence(model, runner, inputs=other, rtol=1e-4)
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

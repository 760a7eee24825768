"""timm as the oracle: our graph fuser, without any of timm's methods, against timm's own reparameterize_model.

For the smallest member of each reparameterizable family in the installed timm (random weights, randomized BN
statistics, a 64x64 input), the graph fuser's model must give timm's outputs within 1e-5 and hold no more
Conv2d + BatchNorm2d modules than timm's result. Every family traces; if one stops tracing, the assertion names the
module that stopped it (``FuseReport.skipped``).
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

from repvgg_tools import randomize_batchnorm
from repvgg_tools.fx.fuser import graph_fuse
from repvgg_tools.verify import compare_outputs

# the smallest member of each family (the others share its blocks; building them all would cost minutes)
FAMILIES = ["mobileone_s0", "repvgg_a0", "fastvit_t8", "repghostnet_050", "repvit_m0_9", "ghostnetv3_050"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _conv_bn(model: nn.Module) -> int:
    return sum(isinstance(m, (nn.Conv2d, nn.modules.batchnorm._BatchNorm)) for m in model.modules())


def _methods_called(model: nn.Module) -> list[str]:
    """Spy: wrap every timm deploy method so a call would be recorded (the graph fuser must make none)."""
    calls: list[str] = []
    for name, module in model.named_modules():
        for attr in ("reparameterize", "switch_to_deploy", "fuse"):
            method = getattr(module, attr, None)
            if callable(method) and not isinstance(method, nn.Module):
                def spy(*a, _m=method, _n=f"{name}.{attr}", **k):
                    calls.append(_n)
                    return _m(*a, **k)
                setattr(module, attr, spy)
    return calls


def _family(name: str):
    """A family the installed timm lacks shows as a skip with its reason, not as a parameter that vanished."""
    if name in timm.list_models():
        return name
    return pytest.param(name, marks=pytest.mark.skip(reason=f"timm {timm.__version__} has no {name}"))


@pytest.mark.parametrize("name", [_family(n) for n in FAMILIES])
def test_graph_fuser_matches_timm_reparameterize_model(name):
    from timm.utils.model import reparameterize_model

    torch.manual_seed(0)
    model = randomize_batchnorm(timm.create_model(name, pretrained=False, num_classes=10), seed=1).eval()
    reference = reparameterize_model(copy.deepcopy(model))
    calls = _methods_called(model)
    x = torch.randn(2, 3, 64, 64)
    ours, report = graph_fuse(model, (x[:1],))
    assert not calls, f"the graph fuser called {calls}"
    assert not report.skipped, f"{name}: tracing stopped at {report.skipped}"
    assert report.fused
    with torch.no_grad():
        err = compare_outputs(ours(x), reference(x))[1]
        err_train = compare_outputs(ours(x), model(x))[1]
    assert err <= 1e-5 and err_train <= 1e-5, (err, err_train)
    assert _conv_bn(ours) <= _conv_bn(reference), (name, _conv_bn(ours), _conv_bn(reference), str(report))
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in ours.modules()), name
    assert _conv_bn(ours) < _conv_bn(model)

"""``verify``: output comparison relative to the output scale, and an equivalence check that catches broken
conversions."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from repvgg_tools import randomize_batchnorm, reparameterize, verify_equivalence
from repvgg_tools.contract import FP32_RTOL
from repvgg_tools.fusion import core as fusion
from repvgg_tools.models import RepVGG
from repvgg_tools.verify import DEFAULT_RTOL, VerifyResult, compare_outputs, flatten_outputs


def _tiny_repvgg(seed: int = 0) -> RepVGG:
    torch.manual_seed(seed)
    model = RepVGG((8, 16, 16, 32, 32), (1, 2, 2, 2, 1), {2: 2}, num_classes=10)
    return randomize_batchnorm(model, seed=seed).eval()


def test_compare_tensors_is_relative_to_reference_scale():
    ref = torch.tensor([[1000.0, -2000.0], [3.0, 4.0]])
    cand = ref.clone()
    cand[1, 0] += 0.5
    max_abs, max_rel = compare_outputs(cand, ref)
    assert max_abs == pytest.approx(0.5)
    assert max_rel == pytest.approx(0.5 / 2000.0)
    assert compare_outputs(ref, ref) == (0.0, 0.0)
    assert compare_outputs(torch.zeros(3), torch.zeros(3)) == (0.0, 0.0)
    assert compare_outputs(torch.ones(3), torch.zeros(3))[1] == math.inf
    # computed in float64: a float16 candidate against a float32 reference. These values are exact in float16 (0);
    # 3.1 is not, and the error is exactly the float16 rounding of the float32 value, relative to 2000
    assert compare_outputs(ref.half(), ref) == (0.0, 0.0)
    odd = ref.clone()
    odd[1, 0] = 3.1
    rounding = abs(float(odd[1, 0].half()) - float(odd[1, 0]))
    assert rounding > 0 and compare_outputs(odd.half(), odd) == (rounding, rounding / 2000.0)
    # the verdict is relative to the reference's scale: the same absolute error of 0.01 is within the fp32 tolerance
    # on this reference (max 2000: 5e-6) and a wrong answer on its small-valued row alone (max 4: 2.5e-3)
    wrong = ref.clone()
    wrong[1, 0] += 0.01
    assert compare_outputs(wrong, ref)[1] == pytest.approx(0.01 / 2000, rel=1e-6) and \
        compare_outputs(wrong, ref)[1] <= FP32_RTOL
    assert compare_outputs(wrong[1], ref[1])[1] == pytest.approx(0.01 / 4, rel=1e-6) and \
        compare_outputs(wrong[1], ref[1])[1] > FP32_RTOL
    assert compare_outputs(cand, ref)[1] > FP32_RTOL  # the 0.5 above: a wrong answer even at scale 2000


def test_compare_lists_and_dicts():
    a, b = torch.randn(2, 3), torch.randn(4)
    out_ref = {"logits": a, "feats": [b, b * 10]}
    out = {"feats": [b, b * 10 + 0.25], "logits": a}  # key order does not matter
    max_abs, max_rel = compare_outputs(out, out_ref)
    assert max_abs == pytest.approx(0.25)
    assert max_rel == pytest.approx(0.25 / (b * 10).abs().max().item())
    assert compare_outputs((a, b), [a, b]) == (0.0, 0.0)
    assert [t.shape for t in flatten_outputs(out_ref)] == [(4,), (4,), (2, 3)]  # sorted by key
    with pytest.raises(ValueError, match="count"):
        compare_outputs([a], [a, b])
    with pytest.raises(ValueError, match="shape"):
        compare_outputs(a, a.T)
    with pytest.raises(TypeError):
        compare_outputs("x", a)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_outputs_give_inf(bad):
    ref = torch.randn(5)
    cand = ref.clone()
    cand[2] = bad
    assert compare_outputs(cand, ref) == (math.inf, math.inf)
    assert compare_outputs(ref, cand) == (math.inf, math.inf)
    assert compare_outputs([ref, cand], [ref, ref]) == (math.inf, math.inf)


def test_verify_equivalence_passes_a_correct_conversion():
    model = _tiny_repvgg()
    deployed = reparameterize(model)
    result = verify_equivalence(model, deployed, (2, 3, 32, 32), num_inputs=3)
    assert isinstance(result, VerifyResult)
    assert result.passed and result.max_rel <= DEFAULT_RTOL and result.inputs == 3 and result.seconds >= 0
    assert result.rtol == DEFAULT_RTOL and "ok" in str(result) and result.as_dict()["passed"] is True
    # reproducible: same seed, same inputs, same numbers
    again = verify_equivalence(model, deployed, (2, 3, 32, 32), num_inputs=3)
    assert (again.max_abs, again.max_rel) == (result.max_abs, result.max_rel)


def test_verify_equivalence_catches_a_small_perturbation():
    model = _tiny_repvgg(seed=1)
    deployed = reparameterize(model)
    assert verify_equivalence(model, deployed, (2, 3, 32, 32)).passed
    with torch.no_grad():
        # a channel the ReLU does not silence (a perturbation of a dead channel cannot show in any output)
        channel = int(deployed.stem(torch.randn(4, 3, 32, 32)).mean((0, 2, 3)).argmax())
        w = deployed.stem.reparam.weight
        w[channel, 0, 1, 1] += 1e-2 * w.abs().max()  # one weight, by 1% of the layer's scale
    result = verify_equivalence(model, deployed, (2, 3, 32, 32))
    assert not result.passed and result.max_rel > DEFAULT_RTOL and "FAILED" in str(result)


def test_verify_equivalence_catches_a_dropped_branch():
    """A conversion that forgets the identity branch (a classic bug) must fail verification."""
    model = _tiny_repvgg(seed=2)
    broken = RepVGG((8, 16, 16, 32, 32), (1, 2, 2, 2, 1), {2: 2}, num_classes=10, deploy=True)
    state = reparameterize(model).state_dict()
    block = model.stages[0][1]
    assert block.branch_identity is not None
    with torch.no_grad():
        (k3, b3), (k1, b1) = block.branch_3x3.kernel_bias(), block.branch_1x1.kernel_bias()
        kernel, bias = fusion.merge_branches([k3, fusion.pad_kernel(k1, 3)], [b3, b1])
    state["stages.0.1.reparam.weight"], state["stages.0.1.reparam.bias"] = kernel, bias
    broken.load_state_dict(state, strict=True)
    assert not verify_equivalence(model, broken, (1, 3, 32, 32)).passed


def test_verify_equivalence_puts_modules_in_eval_mode():
    """Train-mode BatchNorm (batch statistics) is the most common false alarm: verification switches to eval."""
    model = _tiny_repvgg(seed=3)
    deployed = reparameterize(model)
    model.train()
    deployed.train()
    result = verify_equivalence(model, deployed, (4, 3, 32, 32))
    assert not model.training and not deployed.training
    assert all(not m.training for m in model.modules())
    assert result.passed, result
    # the model did not run in train mode: its running statistics were not updated
    bn = model.stem.branch_3x3.bn
    assert bn.num_batches_tracked.item() == 0


def test_verify_equivalence_inputs_dtype_and_callables():
    model = _tiny_repvgg(seed=4).double()
    deployed = reparameterize(model)
    # the default input dtype follows the reference's parameters: float64 here, so the float64 contract applies
    result = verify_equivalence(model, deployed, (1, 3, 32, 32), rtol=1e-12)
    assert result.passed, result
    x = [torch.randn(1, 3, 32, 32, dtype=torch.float64)]
    assert verify_equivalence(model, deployed, inputs=x, rtol=1e-12).inputs == 1
    # plain callables work too
    assert not verify_equivalence(lambda t: t * 2, lambda t: t * 2 + 1e-3, (3, 4)).passed
    assert verify_equivalence(torch.relu, nn.ReLU(), (3, 4), dtype=torch.float32).passed


def test_randomize_batchnorm_gives_nontrivial_statistics():
    bn = nn.BatchNorm2d(16)
    randomize_batchnorm(bn, seed=0)
    assert not torch.equal(bn.running_mean, torch.zeros(16)) and not torch.equal(bn.running_var, torch.ones(16))
    assert (bn.running_var > 0).all() and not torch.equal(bn.weight, torch.ones(16))
    other = randomize_batchnorm(nn.BatchNorm2d(16), seed=0)
    assert torch.equal(other.running_mean, bn.running_mean)  # seeded
    non_affine = randomize_batchnorm(nn.BatchNorm2d(4, affine=False, track_running_stats=False), seed=1)
    assert non_affine.running_mean is None

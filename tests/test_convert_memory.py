"""docs/convert.md's memory claim, measured: a --no-verify conversion peaks at no more than the checkpoint's size
above what the same command takes on a tiny checkpoint (the import baseline)."""

import pytest
import torch
from convert_helpers import tiny
from test_hostile_files import run_bounded

from repvgg_tools import create_model


@pytest.mark.slow
def test_conversion_peak_memory_stays_below_the_checkpoint_size(tmp_path):
    small, big = tmp_path / "small.pth", tmp_path / "big.pth"
    torch.save(tiny(0).state_dict(), small)
    torch.save(create_model("repvgg_b1", num_classes=1000).state_dict(), big)  # ~230 MB
    size_mb = big.stat().st_size / 2**20
    proc, baseline = run_bounded(small, tmp_path / "small_out.pth", "--no-verify", "--quiet", timeout=120)
    assert proc.returncode == 0, proc.stderr
    proc, peak = run_bounded(big, tmp_path / "big_out.pth", "--no-verify", "--quiet", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert peak - baseline <= size_mb, f"peak {peak:.0f} MB, baseline {baseline:.0f} MB, file {size_mb:.0f} MB"

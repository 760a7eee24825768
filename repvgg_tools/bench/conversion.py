"""``repvgg-bench --conversion``: checkpoint conversion time and peak RAM, ours vs timm vs the I/O floor, each in its
own process."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from .latency import TIMM_NAMES

CONVERT_OURS = """
import json, sys, time
from repvgg_tools.conversion.api import convert_file
def status(field):  # VmHWM is this process's own peak (ru_maxrss can carry the parent's across fork+exec)
    for line in open('/proc/self/status'):
        if line.startswith(field): return int(line.split()[1]) * 1024
base = status('VmRSS'); t0 = time.perf_counter()
convert_file(sys.argv[1], sys.argv[2], verify=False, force=True)
dt = time.perf_counter() - t0
peak = status('VmHWM')
print(json.dumps({"seconds": dt, "peak_above_baseline": peak - base}))
"""


CONVERT_FLOOR = """
import json, sys, time, torch
def status(field):
    for line in open('/proc/self/status'):
        if line.startswith(field): return int(line.split()[1]) * 1024
base = status('VmRSS'); t0 = time.perf_counter()
torch.save(torch.load(sys.argv[1], weights_only=True, mmap=True), sys.argv[2])
dt = time.perf_counter() - t0
peak = status('VmHWM')
print(json.dumps({"seconds": dt, "peak_above_baseline": peak - base}))
"""


CONVERT_TIMM = """
import json, sys, time, torch, timm
from timm.models import load_checkpoint
from timm.utils.model import reparameterize_model
def status(field):  # VmHWM is this process's own peak (ru_maxrss can carry the parent's across fork+exec)
    for line in open('/proc/self/status'):
        if line.startswith(field): return int(line.split()[1]) * 1024
base = status('VmRSS'); t0 = time.perf_counter()
model = timm.create_model(sys.argv[3], pretrained=False)
load_checkpoint(model, sys.argv[1], weights_only=True)
model = reparameterize_model(model.eval())
torch.save(model.state_dict(), sys.argv[2])
dt = time.perf_counter() - t0
peak = status('VmHWM')
print(json.dumps({"seconds": dt, "peak_above_baseline": peak - base}))
"""


def bench_conversion(arch: str = "repvgg_b3") -> dict:
    """Convert one timm-layout training checkpoint of ``arch`` with ours (``convert_file``, no verify) and timm's
    path (build, load, reparameterize, save), each in its own process, next to the I/O floor (a plain
    ``torch.load(mmap=True)`` + ``torch.save`` of the same file); compare time, peak RSS and the results."""
    import timm

    from repvgg_tools import randomize_batchnorm

    with tempfile.TemporaryDirectory(prefix="repvgg-bench-") as tmp:
        src = Path(tmp) / f"{arch}_timm.pth"
        model = randomize_batchnorm(timm.create_model(TIMM_NAMES[arch], pretrained=False), seed=0)
        torch.save(model.state_dict(), src)
        del model
        result = {"arch": arch, "checkpoint_bytes": src.stat().st_size}
        outs = {}
        for label, code, extra in (("io_floor", CONVERT_FLOOR, []), ("ours", CONVERT_OURS, []),
                                   ("timm", CONVERT_TIMM, [TIMM_NAMES[arch]])):
            out = Path(tmp) / f"{label}.pth"
            proc = subprocess.run([sys.executable, "-c", code, str(src), str(out), *extra], capture_output=True,
                                  text=True, cwd=Path(__file__).resolve().parents[2])
            if proc.returncode:
                result[label] = {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
                continue
            result[label] = json.loads(proc.stdout.strip().splitlines()[-1])
            if label != "io_floor":
                outs[label] = out
        if len(outs) == 2:
            a = torch.load(outs["ours"], weights_only=True, mmap=True)
            a = a.get("state_dict", a)
            b = torch.load(outs["timm"], weights_only=True, mmap=True)
            worst = 0.0
            for k, v in b.items():
                if k in a and v.is_floating_point():
                    worst = max(worst, ((a[k].double() - v.double()).abs().max() / v.double().abs().max()
                                        .clamp_min(1e-30)).item())
            result["same_keys"] = sorted(a) == sorted(b)
            result["max_rel_diff_ours_vs_timm"] = worst
    return result

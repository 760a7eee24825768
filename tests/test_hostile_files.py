"""Hostile and damaged checkpoints: each used to run code, poison the process, exhaust memory or time, or write a
wrong file with exit 0 on the previous main. Every case is refused in one line or handled: nothing written, input
unchanged, the process unchanged, and no file under 1 MB takes more than 1 GB or 30 s."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_helpers import one_line_error, run_convert
from convert_helpers import assert_deploy_equivalent, tiny
from hostile_files import (
    PROTO2,
    data_pkl_name,
    deep_nesting,
    global_,
    legacy_file,
    namespace,
    records,
    safetensors_with_header_byte,
    set_defaults_of_rebuild,
    shared_list_tower,
    with_extra_entry,
    with_prefix_ops,
    write_zip,
)

from repvgg_tools.conversion.api import ConversionError, convert_file, load_model
from repvgg_tools.conversion.branches import check_finite
from repvgg_tools.io.checkpoint import TEMP_TAG, CheckpointError, load_checkpoint, read_checkpoint

CLI = (sys.executable, "-m", "repvgg_tools.cli.convert")
# the wrapper reports the peak RSS of the command it runs (and of nothing else) on its last stdout line
PEAK_RSS = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)")


def run_bounded(*args, timeout: float = 30) -> tuple[subprocess.CompletedProcess, float]:
    """``repvgg-convert ARGS`` in its own process group, killed after ``timeout`` s; ``(result, peak RSS in MB)``."""
    proc = subprocess.Popen([sys.executable, "-c", PEAK_RSS, *CLI, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError(f"repvgg-convert {args} ran past {timeout} s") from None
    lines = out.strip().splitlines()
    result = subprocess.CompletedProcess(args, proc.returncode, "\n".join(lines[:-1]), err)
    return result, int(lines[-1]) / 1024



@pytest.fixture
def train(tmp_path) -> tuple:
    """A tiny RepVGG with random BN statistics, saved in a container as a training script would."""
    model = tiny(3)
    path = tmp_path / "train.pth"
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, path)
    return model, path


# -------------------------------------------------------------------------------------- code and process state
@pytest.mark.parametrize("foreign", [False, True], ids=["weights-only-path", "restricted-path"])
def test_build_on_a_function_is_refused_and_the_process_is_unchanged(train, tmp_path, foreign):
    model, src = train
    defaults = torch._utils._rebuild_tensor_v2.__defaults__
    hostile = with_prefix_ops(src, tmp_path / "hostile.pth", set_defaults_of_rebuild())
    if foreign:  # a training file's argument namespace: weights_only refuses it, the restricted reader reads on
        hostile = with_extra_entry(hostile, tmp_path / "hostile2.pth", "args", namespace())
    before = hostile.read_bytes()
    with pytest.raises(CheckpointError, match="refused to load.*BUILD"):
        convert_file(hostile, tmp_path / "out.pth")
    assert not (tmp_path / "out.pth").exists() and hostile.read_bytes() == before
    assert torch._utils._rebuild_tensor_v2.__defaults__ == defaults
    benign = torch.load(src, weights_only=True)["state_dict"]  # what the attack turned negative or trainable
    for k, v in model.state_dict().items():
        assert torch.equal(benign[k], v) and not benign[k].requires_grad
    one_line_error(run_convert(hostile, tmp_path / "out.pth"), 2, "BUILD")


def test_legacy_files_are_read_only_as_weights_only_reads_them(train, tmp_path):
    model, _ = train
    plain = tmp_path / "legacy.pth"
    torch.save(model.state_dict(), plain, _use_new_zipfile_serialization=False)
    convert_file(plain, tmp_path / "ok.pth")  # a legacy file weights_only reads converts as before
    assert_deploy_equivalent(model, torch.load(tmp_path / "ok.pth", weights_only=True))
    defaults = torch._utils._rebuild_tensor_v2.__defaults__
    for name, ops in (("build", set_defaults_of_rebuild() + b"}."), ("namespace", namespace() + b".")):
        hostile = legacy_file(tmp_path / f"{name}.pth", PROTO2 + ops)
        with pytest.raises(CheckpointError, match="legacy .*weights_only"):
            load_checkpoint(hostile)
        assert torch._utils._rebuild_tensor_v2.__defaults__ == defaults


def test_code_running_globals_stay_refused_on_the_restricted_path(train, tmp_path):
    _, src = train
    call = global_("os", "system") + b"(" + b"X\x04\x00\x00\x00true" + b"tR"
    getattr_on_real = global_("builtins", "getattr") + global_("collections", "OrderedDict") + \
        b"X\x06\x00\x00\x00__eq__\x86R"
    for i, ops in enumerate((call, getattr_on_real)):
        hostile = with_extra_entry(with_extra_entry(src, tmp_path / f"a{i}.pth", "args", namespace()),
                                   tmp_path / f"b{i}.pth", "x", ops)
        with pytest.raises(CheckpointError, match="refused to load"):
            load_checkpoint(hostile)


# ---------------------------------------------------------------------------------- memory and time, tiny files
def _tower(src, tmp_path, foreign):
    path = with_extra_entry(src, tmp_path / "tower.pth", "log", shared_list_tower(60))
    return with_extra_entry(path, tmp_path / "tower2.pth", "args", namespace()) if foreign else path


def _memo(src, tmp_path):
    huge = b"Nr\xff\xff\xff\x7f0"  # NONE, LONG_BINPUT 2**31-1, POP
    return with_extra_entry(with_prefix_ops(src, tmp_path / "m.pth", huge), tmp_path / "m2.pth", "args",
                            namespace())


def _deep(src, tmp_path, foreign):
    path = with_extra_entry(src, tmp_path / "deep.pth", "log", deep_nesting(100_000))
    return with_extra_entry(path, tmp_path / "deep2.pth", "args", namespace()) if foreign else path


def _expanded(model, tmp_path, inside):
    """8 GB declared over 4 bytes stored: in the state dict (refused: fusing or verifying would materialize it), or
    outside it (carried as it is stored)."""
    mask = torch.zeros(1).expand(1 << 31)
    sd = model.state_dict()
    torch.save({**sd, "mask": mask} if inside else {"state_dict": sd, "mask": [mask]}, tmp_path / "expanded.pth")
    return tmp_path / "expanded.pth"


def _expanded_kernel(tmp_path):
    c = 8192  # one block whose kernels declare 2.4 GB over one stored element
    sd = {"stem.branch_3x3.conv.weight": torch.ones(1).expand(c, c, 3, 3),
          "stem.branch_1x1.conv.weight": torch.ones(1).expand(c, c, 1, 1)}
    for branch in ("branch_3x3", "branch_1x1"):
        for name, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
            sd[f"stem.{branch}.bn.{name}"] = torch.full((c,), value)
    torch.save(sd, tmp_path / "kernel.pth")
    return tmp_path / "kernel.pth"


def _prefixes(model, tmp_path):
    sd = dict(model.state_dict())
    key = next(iter(sd))
    sd["module." * 100_000 + key] = sd.pop(key)  # 700 KB of prefixes on one key
    torch.save(sd, tmp_path / "prefixes.pth")
    return tmp_path / "prefixes.pth"


CASES = {
    "shared-list-tower": (lambda m, s, t: _tower(s, t, False), 0),
    "shared-list-tower-restricted": (lambda m, s, t: _tower(s, t, True), 0),
    "long-binput-memo": (lambda m, s, t: _memo(s, t), 0),
    "deep-nesting": (lambda m, s, t: _deep(s, t, False), 2),
    "deep-nesting-restricted": (lambda m, s, t: _deep(s, t, True), 2),
    "expanded-state-dict-tensor": (lambda m, s, t: _expanded(m, t, True), 2),
    "expanded-extra-tensor": (lambda m, s, t: _expanded(m, t, False), 0),
    "expanded-kernel": (lambda m, s, t: _expanded_kernel(t), 2),
    "million-prefixes": (lambda m, s, t: _prefixes(m, t), 0),
}


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("case", list(CASES))
def test_tiny_files_cannot_take_memory_or_time(train, tmp_path, case, suffix):
    model, src = train
    build, code = CASES[case]
    path = build(model, src, tmp_path)
    assert path.stat().st_size < 1 << 20
    before = path.read_bytes()
    proc, peak_mb = run_bounded(path, tmp_path / f"out{suffix}", "--quiet")
    assert peak_mb < 1024, f"{case}: peak RSS {peak_mb:.0f} MB"
    assert proc.returncode == code, proc.stderr
    if code:
        one_line_error(proc, 2, "")
        assert not (tmp_path / f"out{suffix}").exists()
    assert path.read_bytes() == before


def test_finiteness_is_scanned_over_what_is_stored():
    check_finite("ok", torch.zeros(1).expand(1 << 40))  # 4 TB declared: one element scanned
    with pytest.raises(ConversionError, match="NaN"):
        check_finite("bad", torch.tensor([float("nan")]).expand(1 << 40))
    with pytest.raises(ConversionError, match="NaN"):
        check_finite("bad", torch.tensor([0.0, float("inf"), 0.0]).as_strided((2, 2), (0, 1), 0))


# ------------------------------------------------------------------------------------ wrong output with exit 0
def test_a_short_record_is_refused_before_it_is_mapped(train, tmp_path):
    _, src = train
    recs = records(src)
    name = max((n for n in recs if "/data/" in n), key=lambda n: len(recs[n]))
    recs[name] = recs[name][:-16]
    bad = write_zip(tmp_path / "short.pth", recs)
    with pytest.raises(Exception, match="size"):  # torch's own reader (no mmap) refuses it too
        torch.load(bad, weights_only=True)
    for mmap in (True, False):
        with pytest.raises(CheckpointError, match="truncated or corrupt.*bytes"):
            load_checkpoint(bad, mmap=mmap)
    proc, _ = run_bounded(bad, tmp_path / "out.pth")
    one_line_error(proc, 2, "truncated or corrupt")
    assert not (tmp_path / "out.pth").exists()


def test_a_tensor_outside_the_state_dict_that_shares_a_kernel_keeps_its_values(tmp_path):
    model = tiny(4)
    sd = model.state_dict()
    kernel = "stages.1.0.branch_3x3.conv.weight"
    original = sd[kernel].clone()
    torch.save({"state_dict": sd, "init": {"w": sd[kernel], "step": 0}}, tmp_path / "shared.pth")
    convert_file(tmp_path / "shared.pth", tmp_path / "out.pth", verify=False)
    out = torch.load(tmp_path / "out.pth", weights_only=True)
    assert torch.equal(out["init"]["w"], original)
    assert_deploy_equivalent(model, out["state_dict"])


@pytest.mark.parametrize("verify", [False, True])
def test_a_self_overlapping_kernel_converts_correctly(tmp_path, verify):
    model = tiny(5)
    sd = dict(model.state_dict())
    kernel = "stages.2.0.branch_3x3.conv.weight"  # a kernel of a groupwise stage
    w, strides = sd[kernel], (9, 3, 3, 1)  # input channels overlap each other
    stored = torch.randn(sum((n - 1) * st for n, st in zip(w.shape, strides, strict=True)) + 1)
    view = stored.as_strided(w.shape, strides)
    with torch.no_grad():
        model.state_dict()[kernel].copy_(view)  # the model the view describes
    sd[kernel] = view
    torch.save(sd, tmp_path / "overlap.pth")
    proc = run_convert(tmp_path / "overlap.pth", tmp_path / "out.pth", *([] if verify else ["--no-verify"]))
    assert proc.returncode == 0, proc.stderr
    assert_deploy_equivalent(model, torch.load(tmp_path / "out.pth", weights_only=True))


# ------------------------------------------------------------------------------------------ valid files refused
def test_deflated_records_are_inflated_not_mapped(train, tmp_path):
    model, src = train
    deflated = write_zip(tmp_path / "deflated.pth", records(src), deflate=True)
    with pytest.raises(Exception):  # noqa: B017 - torch's mmap reader maps deflated bytes as weights and fails
        torch.load(deflated, weights_only=True, mmap=True)["state_dict"]["stem.branch_3x3.bn.running_var"].sum()
        raise AssertionError("read")
    convert_file(deflated, tmp_path / "out.pth")
    assert_deploy_equivalent(model, torch.load(tmp_path / "out.pth", weights_only=True)["state_dict"])


def test_safetensors_whose_header_starts_like_a_pickle(tmp_path):
    model = tiny(6)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    path = safetensors_with_header_byte(tmp_path / "train.safetensors", sd, 0x80)
    assert read_checkpoint(path).format == "safetensors"
    convert_file(path, tmp_path / "out.pth")
    out = torch.load(tmp_path / "out.pth", weights_only=True)
    assert out["pad"] == "x" * len(out["pad"])  # the metadata, carried
    assert_deploy_equivalent(model, out["state_dict"])


def test_placeholders_never_leave_the_reader(train, tmp_path):
    """What the restricted reader built is plain data: the output reloads with weights_only."""
    model, src = train
    path = with_extra_entry(src, tmp_path / "ns.pth", "args", namespace())
    model_, info = load_model(path)
    assert info["extras"]["args"] == {"__class__": "argparse.Namespace"}
    convert_file(path, tmp_path / "out.pth")
    assert torch.load(tmp_path / "out.pth", weights_only=True)["args"] == {"__class__": "argparse.Namespace"}
    assert data_pkl_name(records(tmp_path / "out.pth"))


# ---------------------------------------------------------------------------------------------------- leftovers
def test_a_killed_runs_leftover_is_removed_by_the_next_run(train, tmp_path):
    _, src = train
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftover = tmp_path / f".out.pth{TEMP_TAG}{dead.pid}-abc123.tmp"
    live = tmp_path / f".out.pth{TEMP_TAG}{os.getpid()}-def456.tmp"  # a write still in progress
    for p in (leftover, live):
        p.write_bytes(b"half a checkpoint")
    time.sleep(0.01)
    proc = run_convert(src, tmp_path / "out.pth")
    assert proc.returncode == 0, proc.stderr
    assert not leftover.exists() and live.exists()
    assert "removed" in proc.stderr and leftover.name in proc.stderr


def test_only_storages_of_the_file_rebuild_tensors(train, tmp_path):
    """A tensor rebuilt from something that is not a storage record (here an int) is refused, not crashed on."""
    _, src = train
    ops = (global_("torch._utils", "_rebuild_tensor_v2") + b"(K\x05K\x00K\x01\x85K\x01\x85\x89" +
           global_("collections", "OrderedDict") + b")RtR")
    hostile = with_extra_entry(src, tmp_path / "int.pth", "x", ops)
    with pytest.raises(CheckpointError):
        load_checkpoint(hostile)
    hostile = with_extra_entry(hostile, tmp_path / "int2.pth", "args", namespace())
    with pytest.raises(CheckpointError, match="storage"):
        load_checkpoint(hostile)


def test_a_valid_checkpoint_still_round_trips(train, tmp_path):
    model, src = train
    loaded = read_checkpoint(src)
    assert loaded.mapped and loaded.extras == {"epoch": 3}
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict[k], v)
    assert Path(src).exists()


def test_the_readers_limits_refuse_in_one_line():
    import io
    import pickle

    from repvgg_tools.io.pickle_rules import Limits, PickleLimitError
    from repvgg_tools.io.plain import to_plain
    from repvgg_tools.io.safe_pickle import SafeUnpickler

    data = pickle.dumps({"log": list(range(1000)), "text": "x" * 5000}, protocol=2)
    assert SafeUnpickler(io.BytesIO(data)).load()["text"] == "x" * 5000
    for limits, words in ((Limits(max_objects=500), "more than 500 objects"),
                          (Limits(max_bytes=4000), "more than 4000 bytes")):
        with pytest.raises(PickleLimitError, match=words):
            SafeUnpickler(io.BytesIO(data), limits=limits).load()
    nested: list = []
    for _ in range(50):
        nested = [nested]
    with pytest.raises(PickleLimitError, match="deeper than 20 levels"):
        to_plain(nested, Limits(max_depth=20))

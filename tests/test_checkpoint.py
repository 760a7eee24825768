"""Safe checkpoint I/O: formats, refusal of code-running pickles, containers, prefixes, private memory maps."""

import mmap
import os
import pickle
from pathlib import Path

import pytest
import torch

from repvgg_tools.io.checkpoint import (
    CheckpointError,
    atomic_write,
    load_checkpoint,
    read_checkpoint,
    read_state_dict,
    release_pages,
    save_checkpoint,
    strip_prefixes,
)


class RunsCode:
    """Unpickling this object would create ``marker`` (via ``exec``): a stand-in for a malicious checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def _sd(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"stem.weight": torch.randn(4, 3, 3, 3, generator=g), "head.bias": torch.randn(5, generator=g)}


def _same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("fmt", ["zip", "legacy", "safetensors", "safetensors_misnamed"])
def test_load_formats(tmp_path, fmt):
    sd = _sd()
    path = tmp_path / ("w.safetensors" if fmt == "safetensors" else "w.pth")
    if fmt == "zip":
        torch.save(sd, path)
    elif fmt == "legacy":
        torch.save(sd, path, _use_new_zipfile_serialization=False)
    else:
        from safetensors.torch import save_file

        save_file(sd, str(path))
    assert _same(dict(load_checkpoint(path)), sd)


def _bad_inputs(tmp_path: Path) -> dict:
    good = tmp_path / "good.pth"
    torch.save({k: v.repeat(50, 1, 1, 1) if v.dim() == 4 else v for k, v in _sd().items()}, good)
    legacy = tmp_path / "legacy.pth"
    torch.save(_sd(), legacy, _use_new_zipfile_serialization=False)
    cases = {
        "missing": (tmp_path / "nope.pth", "no such file"),
        "directory": (tmp_path, "directory"),
        "empty": (tmp_path / "empty.pth", "empty"),
        "text": (tmp_path / "notes.pth", "not a checkpoint"),
        "truncated_zip": (tmp_path / "trunc.pth", "truncated"),
        "truncated_legacy": (tmp_path / "trunc_legacy.pth", "truncated"),
        "bad_safetensors": (tmp_path / "bad.safetensors", "safetensors"),
    }
    cases["empty"][0].write_bytes(b"")
    cases["text"][0].write_text("epoch: 3\nlr: 0.1\n")
    cases["truncated_zip"][0].write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    cases["truncated_legacy"][0].write_bytes(legacy.read_bytes()[: legacy.stat().st_size - 100])
    cases["bad_safetensors"][0].write_bytes((1000).to_bytes(8, "little") + b'{"a": 1')
    return cases


def test_bad_inputs_raise_one_line_errors(tmp_path):
    for name, (path, words) in _bad_inputs(tmp_path).items():
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(path)
        msg = str(info.value)
        assert words in msg, (name, msg)
        assert "\n" not in msg and len(msg) < 300, (name, msg)


@pytest.mark.parametrize("writer", ["torch_zip", "raw_pickle"])
def test_code_running_pickle_is_refused_not_executed(tmp_path, writer):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    payload = {"state_dict": _sd(), "hook": RunsCode(marker)}
    if writer == "torch_zip":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=2)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="refused"):
        read_checkpoint(path)
    assert not marker.exists()


def test_mmap_load_is_private_even_if_shared_is_the_default(tmp_path):
    path = tmp_path / "w.pth"
    torch.save({"w": torch.zeros(50_000)}, path)
    before = path.read_bytes()
    previous = torch.serialization.get_default_mmap_options()
    torch.serialization.set_default_mmap_options(mmap.MAP_SHARED)
    try:
        sd = load_checkpoint(path, mmap=True)
        sd["w"].add_(1.0)
        del sd
    finally:
        torch.serialization.set_default_mmap_options(previous)
    assert path.read_bytes() == before


def test_release_pages_keeps_values_readable(tmp_path):
    path = tmp_path / "w.pth"
    data = torch.arange(300_000, dtype=torch.float32)
    torch.save({"a": data, "b": torch.ones(7)}, path)
    sd = load_checkpoint(path, mmap=True)
    assert float(sd["a"].sum()) == float(data.sum())  # page everything in
    released = release_pages(sd["a"])
    assert released >= 300_000 * 4 - 2 * mmap.PAGESIZE if os.uname().sysname == "Linux" else released == 0
    assert torch.equal(sd["a"], data)  # a released page reads the file again
    assert release_pages(sd["b"]) == 0  # smaller than a page: kept


def test_containers_ema_extras_and_dropped_optimizer(tmp_path):
    model, ema = _sd(0), _sd(1)
    ckpt = {"epoch": 7, "arch": "repvgg_a0", "args": {"lr": 0.1}, "optimizer": {"state": {}, "param_groups": []},
            "state_dict": {f"module.{k}": v for k, v in model.items()}, "state_dict_ema": ema}
    path = tmp_path / "ckpt.pth"
    torch.save(ckpt, path)
    sd, extras = read_state_dict(path)
    assert _same(sd, model)
    assert extras == {"epoch": 7, "arch": "repvgg_a0", "args": {"lr": 0.1}}
    contents = read_checkpoint(path)
    assert contents.container_key == "state_dict" and sorted(contents.dropped) == ["optimizer", "state_dict_ema"]
    sd, extras = read_state_dict(path, ema=True)
    assert _same(sd, ema) and "optimizer" not in extras


@pytest.mark.parametrize("key", ["model", "module", "state_dict"])
def test_nested_containers(tmp_path, key):
    path = tmp_path / "c.pth"
    torch.save({key: {"model": {f"_orig_mod.{k}": v for k, v in _sd().items()}}, "epoch": 1}, path)
    sd, extras = read_state_dict(path)
    assert _same(sd, _sd()) and extras == {"epoch": 1}


@pytest.mark.parametrize("ema_key", ["model_ema", "state_dict_ema", "ema"])
def test_ema_keys(tmp_path, ema_key):
    path = tmp_path / "c.pth"
    torch.save({"model": _sd(0), ema_key: _sd(2)}, path)
    assert _same(read_state_dict(path, ema=True)[0], _sd(2))


def test_ema_requested_but_absent(tmp_path):
    path = tmp_path / "c.pth"
    torch.save({"state_dict": _sd()}, path)
    with pytest.raises(CheckpointError, match="no EMA weights"):
        read_state_dict(path, ema=True)


def test_no_state_dict_inside(tmp_path):
    path = tmp_path / "c.pth"
    torch.save({"epoch": 3, "args": {"x": 1}}, path)
    with pytest.raises(CheckpointError, match="no state dict"):
        read_state_dict(path)


def test_prefixes_stripped_only_at_the_start():
    t = torch.ones(1)
    out = strip_prefixes({"module._orig_mod.stem.w": t, "backbone.module.x": t, "_orig_mod.head": t})
    assert list(out) == ["stem.w", "backbone.module.x", "head"]
    with pytest.raises(CheckpointError, match="collides"):
        strip_prefixes({"module.a": t, "a": t})


def test_safetensors_metadata_become_extras(tmp_path):
    path = tmp_path / "w.safetensors"
    save_checkpoint({**_sd(), "arch": "repvgg_b0", "epoch": 3}, path)
    sd, extras = read_state_dict(path)
    assert _same(sd, _sd()) and extras == {"arch": "repvgg_b0", "epoch": "3"}


def test_atomic_write_never_leaves_partial_files(tmp_path):
    path = tmp_path / "out.pth"
    path.write_bytes(b"old")

    def boom(tmp):
        Path(tmp).write_bytes(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(CheckpointError, match="already exists"):
        atomic_write(path, boom)
    with pytest.raises(RuntimeError):
        atomic_write(path, boom, force=True)
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.pth"]
    with pytest.raises(CheckpointError, match="does not exist"):
        save_checkpoint(_sd(), tmp_path / "missing_dir" / "x.pth")

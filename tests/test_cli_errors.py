"""Hostile and damaged inputs through the real commands (issue 17): never a traceback, never a wrong or clobbering
output. Every command runs in its own process on real files, as users and job schedulers run it."""

import glob
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import run_command as run_process
from convert_helpers import export_tiny

from repvgg_tools.cli.common import EXIT_USAGE, EXIT_VERIFY, run_command
from repvgg_tools.io.paths import CheckpointError, check_outputs

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
    p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))



def one_line_error(proc, rc, *fragments):
    assert proc.returncode == rc, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if not line.startswith("WARNING")]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], proc.stderr
    return lines[0]


def png_header_only(path: Path, width: int, height: int) -> None:
    """A valid PNG signature, an IHDR declaring ``width x height`` RGB pixels and a tiny IDAT: < 100 bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def tiny_sd():
    return export_tiny(3).state_dict()


def _first_conv_weight(sd):
    return next(k for k, v in sd.items() if k.endswith("weight") and v.dim() == 4)


# ------------------------------------------------------------------------------------------------ damaged checkpoints
DAMAGE = {"0-d weight": "has shape ()", "float8 weight": "float8_e4m3fn tensor", "complex weights": "complex64 tensor",
          "unknown model_kwargs": "model_kwargs {'bogus': 1} do not fit"}


@pytest.mark.parametrize("case", list(DAMAGE))
@pytest.mark.slow
def test_export_damaged_checkpoint_is_one_line_and_writes_nothing(tmp_path, tiny_sd, case):
    sd, extra = dict(tiny_sd), {}
    key = _first_conv_weight(sd)
    if case == "0-d weight":
        sd[key] = torch.tensor(1.0)
    elif case == "float8 weight":
        sd[key] = sd[key].to(torch.float8_e4m3fn)
    elif case == "complex weights":
        sd = {k: v.to(torch.complex64) if v.is_floating_point() else v for k, v in sd.items()}
    else:
        extra = {"model_kwargs": {"bogus": 1}}
    ckpt, out = tmp_path / "bad.pth", tmp_path / "out.onnx"
    torch.save({"state_dict": sd, "num_classes": 10, **extra}, ckpt)
    for command in ("repvgg_tools.cli.export", "repvgg_tools.cli.convert"):
        proc = run(command, ckpt, out, *(("--input-size", 32) if command.endswith("export") else ()))
        one_line_error(proc, EXIT_USAGE)
        assert DAMAGE[case] in proc.stderr and "internal error" not in proc.stderr, proc.stderr  # says what is wrong
        assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pth"]


@pytest.mark.parametrize("side", [20000, 8000])  # 400 MP: PIL's own bomb error; 64 MP: our limit, before decoding
@pytest.mark.slow
def test_calibration_image_declaring_absurd_size_is_refused_by_name(tmp_path, tiny_sd, side):
    from PIL import Image

    calib = tmp_path / "calib"
    calib.mkdir()
    rng = np.random.default_rng(0)
    for i in range(71):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(calib / f"img{i:03d}.png")
    bomb = calib / "bomb.png"
    png_header_only(bomb, side, side)
    assert bomb.stat().st_size < 100
    ckpt, out = tmp_path / "tiny.pth", tmp_path / "int8.onnx"
    torch.save({"state_dict": tiny_sd, "num_classes": 10}, ckpt)
    proc = run("repvgg_tools.cli.export", ckpt, out, "--input-size", 32, "--precision", "int8", "--calib-dir", calib,
               "--calib-samples", 8, "--verify-samples", 64)
    one_line_error(proc, EXIT_USAGE, str(bomb), "megapixels")
    assert not out.exists()


def test_load_images_names_a_truncated_image(tmp_path):
    from PIL import Image

    from repvgg_tools.export.calibration import load_images
    from repvgg_tools.export.precision import PrecisionError

    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8)).save(good)
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[:60])
    assert load_images([good], 32).shape == (1, 3, 32, 32)
    with pytest.raises(PrecisionError, match="cut.png: not a readable image"):
        load_images([good, cut], 32)


# ------------------------------------------------------------------------------------------------ output paths
USER_NET = """
from torch import nn


def build():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.BatchNorm2d(8), nn.ReLU())
"""


@pytest.mark.parametrize("force", [True, False])
def test_convert_two_outputs_naming_one_file_are_refused_before_writing(tmp_path, force):
    (tmp_path / "usernet_issue17.py").write_text(USER_NET)
    env = dict(ENV, PYTHONPATH=os.pathsep.join([str(tmp_path), ENV["PYTHONPATH"]]))
    sys.path.insert(0, str(tmp_path))
    try:
        from usernet_issue17 import build
    finally:
        sys.path.remove(str(tmp_path))
    ckpt, out, same = tmp_path / "in.pth", tmp_path / "out.pth", tmp_path / "X"
    torch.save(build().state_dict(), ckpt)
    proc = run("repvgg_tools.cli.convert", "--model", "usernet_issue17:build", ckpt, out, "--export-onnx", same,
               "--json", same, "--input-shape", 1, 3, 16, 16, *(("--force",) if force else ()), env=env)
    one_line_error(proc, EXIT_USAGE, "named as two outputs")
    assert not out.exists() and not same.exists()
    # a hard link to the input is the input, whatever its name
    os.link(ckpt, tmp_path / "alias.pth")
    proc = run("repvgg_tools.cli.convert", "--model", "usernet_issue17:build", ckpt, out, "--json",
               tmp_path / "alias.pth", "--force", env=env)
    one_line_error(proc, EXIT_USAGE, "is the input file")
    assert not out.exists()


def test_export_json_naming_the_output_is_refused(tmp_path, tiny_sd):
    ckpt, out = tmp_path / "tiny.pth", tmp_path / "out.onnx"
    torch.save({"state_dict": tiny_sd, "num_classes": 10}, ckpt)
    (tmp_path / "link.json").symlink_to(out)  # dangling: names the ONNX file about to be written
    proc = run("repvgg_tools.cli.export", ckpt, out, "--input-size", 32, "--json", tmp_path / "link.json", "--force")
    one_line_error(proc, EXIT_USAGE, "named as two outputs")
    assert not out.exists()


def test_check_outputs_rules(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("x")
    os.link(a, b)
    with pytest.raises(CheckpointError, match="named as two outputs"):
        check_outputs({"OUT": a, "--json": b}, (), force=True)
    with pytest.raises(CheckpointError, match="is the input file"):  # read-and-rewritten files are never an input
        check_outputs({"OUT": tmp_path / "new"}, (a,), force=False, updated={"--timing-cache": b})
    check_outputs({"OUT": tmp_path / "new", "--json": None}, (tmp_path / "c",), force=False,
                  updated={"--timing-cache": a})  # a cache may exist without --force


def test_build_trt_timing_cache_is_never_the_onnx_or_the_engine(tmp_path):
    onnx_path, engine = tmp_path / "m.onnx", tmp_path / "m.engine"
    onnx_path.write_bytes(b"not parsed: the paths are refused first")
    before = onnx_path.read_bytes()
    (tmp_path / "cache_link").symlink_to(onnx_path)
    for cache, words in ((onnx_path, "is the input file"), (tmp_path / "cache_link", "is the input file"),
                         (engine, "named as two outputs"), (tmp_path / "m.engine.json", "named as two outputs")):
        proc = run(ROOT / "tools" / "build_trt.py", "--onnx", onnx_path, "--engine", engine, "--timing-cache", cache)
        one_line_error(proc, EXIT_USAGE, words)
        assert onnx_path.read_bytes() == before and not engine.exists()


# ------------------------------------------------------------------------------------------------ the catch-all
def test_run_command_maps_exceptions_to_exit_codes(capsys):
    def raises(exc):
        def body():
            raise exc
        return body

    assert run_command(raises(ValueError("bad\ninput"))) == EXIT_USAGE
    assert capsys.readouterr().err == "error: bad input\n"
    assert run_command(raises(IndexError("oops"))) == EXIT_USAGE
    assert capsys.readouterr().err == "error: internal error (IndexError: oops); rerun with --traceback\n"
    assert run_command(raises(RuntimeError("mismatch")), verification=(RuntimeError,)) == EXIT_VERIFY
    assert run_command(raises(KeyboardInterrupt())) == 130
    assert capsys.readouterr().err.endswith("error: interrupted\n")
    with pytest.raises(IndexError):
        run_command(raises(IndexError("oops")), traceback=True)
    assert run_command(lambda: 0) == 0


# ------------------------------------------------------------------------------------------------ signals
@pytest.fixture(scope="module")
def big_ckpt(tmp_path_factory):
    """A repvgg_b1 training state dict (230 MB): its conversion writes long enough to be interrupted mid-write."""
    from repvgg_tools import create_model

    path = tmp_path_factory.mktemp("big") / "b1.pth"
    torch.save(create_model("repvgg_b1").state_dict(), path)
    return path


@pytest.mark.parametrize("signum, rc", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_while_writing_leaves_no_temp_file_and_no_output(tmp_path, big_ckpt, signum, rc):
    out = tmp_path / "deploy.pth"
    proc = subprocess.Popen([sys.executable, "-m", "repvgg_tools.cli.convert", big_ckpt, out, "-q", "--no-verify"],
                            env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not glob.glob(str(tmp_path / ".deploy.pth.*.tmp")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    assert proc.poll() is None, "the conversion ended before its temp file was seen: " + proc.stderr.read()
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == rc, err
    assert err.strip().splitlines()[-1] == "error: interrupted" and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == [], list(tmp_path.iterdir())


def run(module_or_script, *args, env=None):
    return run_process(str(module_or_script), *args, env=env or ENV, cwd=ROOT)

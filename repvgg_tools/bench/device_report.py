"""The GPU report of ``tools/gpu_report.py`` from its data: speed ratios next to the RepVGG paper's, ``report.md``
(every table, the budget's dropped rows, what a missing package disabled) and ``report.png`` (needs matplotlib).

The report data is a dict: ``environment``, ``config``, ``budget``, ``models``, ``throughput[model][form][precision]``,
``equivalence[model]``, ``onnx[model]``, ``tensorrt``, ``unavailable``; a row is its figures, or ``{"dropped": why}``,
``{"error": why}`` (``"OOM"`` when the GPU ran out of memory) or ``{"skipped": why}``.
"""

from __future__ import annotations

from pathlib import Path

from ..io.errors import one_line

__all__ = ["PAPER_IPS", "BASELINES", "FORMS", "PRECISIONS", "ratios", "render", "plot", "failures"]

# images/s at batch 128, 224x224, fp32 on a GTX 1080Ti (the RepVGG paper, Ding et al., CVPR 2021)
PAPER_IPS = {"repvgg_a0": 3256, "repvgg_a1": 2339, "repvgg_a2": 1322, "repvgg_b0": 1817, "repvgg_b1": 685,
             "repvgg_b1g4": 868, "repvgg_b2": 460, "resnet18": 2442, "resnet50": 719, "vgg16": 415}
BASELINES = ("resnet18", "resnet50")
FORMS = ("training", "deploy")
PRECISIONS = ("fp32", "fp16")


def _ips(report: dict, name: str, form: str, prec: str) -> float | None:
    return report["throughput"].get(name, {}).get(form, {}).get(prec, {}).get("images_per_s")


def ratios(report: dict) -> dict:
    """Speedups: deploy vs training per precision; each model's deploy form vs the ResNets as torchvision ships
    them (training form, eval mode: what the paper timed); the paper's ratios from its 1080Ti figures."""
    out = {}
    for name in report["throughput"]:
        r = {}
        for prec in PRECISIONS:
            t, d = _ips(report, name, "training", prec), _ips(report, name, "deploy", prec)
            r[f"deploy_vs_training_{prec}"] = d / t if t and d else None
            for base in BASELINES:
                b = _ips(report, base, "training", prec)
                r[f"vs_{base}_{prec}"] = d / b if d and b else None
        for base in BASELINES:
            r[f"paper_vs_{base}"] = PAPER_IPS[name] / PAPER_IPS[base] if name in PAPER_IPS else None
        out[name] = r
    return out


# ---------------------------------------------------------------------------------------------------- the report

def _f(value, spec: str = ".0f", none: str = "—") -> str:
    return none if value is None else format(value, spec)


def _x(ratio: float | None) -> str:
    return "—" if ratio is None else f"{ratio:.2f}x"


def _cell(row: dict | None, key: str = "images_per_s", spec: str = ".0f") -> str:
    """A table cell: the figure, or why there is none."""
    if not row:
        return "—"
    if "dropped" in row:
        return "dropped (budget)"
    if "error" in row:
        return "OOM" if row["error"] == "OOM" else "error"
    if "skipped" in row:
        return "skipped"
    return _f(row.get(key), spec)


def _verdict(ok) -> str:
    return "—" if ok is None else ("**ok**" if ok else "**FAILED**")


def render(report: dict) -> str:
    """report.md."""
    env, cfg, budget = report["environment"], report["config"], report["budget"]
    device = (f"{env['gpu']} (compute capability {env['capability']}, {env['gpu_memory_gib']} GiB), driver "
              f"{env['driver']}" if "gpu" in env else f"CPU only ({env['cpu']}, {env['torch_threads']} threads)")
    lines = ["# repvgg-tools GPU report", "",
             f"- Device: {device}", f"- torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}, Python "
             f"{env['python']}; installed: " + ", ".join(f"{k} {v}" for k, v in env["installed"].items() if v),
             f"- Setting: batch {cfg['batch']}, {cfg['size']}x{cfg['size']}, channels_last, "
             f"cudnn.benchmark={env['cudnn_benchmark']}, TF32 matmul={env['tf32_matmul']} / cuDNN={env['tf32_cudnn']}"
             f"; fp16 = torch.autocast(float16); medians of {cfg['iters']} timed runs after {cfg['warmup']} warm-up "
             f"runs ({'CUDA events' if 'gpu' in env else 'wall clock'}).",
             "- Models have random weights and randomized BatchNorm statistics (speed and equivalence do not depend "
             "on trained weights).",
             f"- Budget: {budget['budget_s']:g} s; used {budget['elapsed_s']:.1f} s; {len(budget['done'])} rows "
             f"measured, {len(budget['dropped'])} dropped.", ""]
    if "gpu" not in env:
        lines += ["CPU run: the timings only prove the tool works; they say nothing about GPU speed.", ""]
    lines += _throughput_md(report) + _equivalence_md(report) + _export_md(report)
    if budget["dropped"]:
        lines += ["## Dropped to fit the budget", "",
                  "Rows run cheap first; each is estimated from the seconds per FLOP last measured for rows like it "
                  "(before one was measured: the slowest rate so far) and dropped when the estimate exceeds the time "
                  "left.", "",
                  "| row | estimate (s) | time left (s) | reason |", "|---|---:|---:|---|"]
        lines += [f"| {d['key']} | {_f(d['estimate_s'], '.1f')} | {d['left_s']:.1f} | {d['reason']} |"
                  for d in budget["dropped"]]
        lines.append("")
    if report["unavailable"]:
        lines += ["## Not run: optional package missing", ""]
        lines += [f"- {name}: {reason}" for name, reason in report["unavailable"].items()]
        lines.append("")
    plot = report.get("plot", {})
    lines += ["## Plot", "", "![images/s](report.png)" if plot.get("file") else f"PNG skipped: {plot.get('skipped')}",
              ""]
    return "\n".join(lines)


def _throughput_md(report: dict) -> list[str]:
    lines = ["## Throughput (images/s), the paper's table", "",
             "Paper: RepVGG (Ding et al., 2021), GTX 1080Ti, batch 128, 224x224, fp32. Deploy vs training is the "
             "speedup of re-parameterization.", "",
             "| model | paper | training fp32 | deploy fp32 | deploy/training fp32 | training fp16 | deploy fp16 | "
             "deploy/training fp16 |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    rat = report["ratios"]
    for name, forms in report["throughput"].items():
        r = rat.get(name, {})
        lines.append(f"| {name} | {_f(PAPER_IPS.get(name))} | {_cell(forms.get('training', {}).get('fp32'))} | "
                     f"{_cell(forms.get('deploy', {}).get('fp32'))} | {_x(r.get('deploy_vs_training_fp32'))}"
                     f" | {_cell(forms.get('training', {}).get('fp16'))} | {_cell(forms.get('deploy', {}).get('fp16'))}"
                     f" | {_x(r.get('deploy_vs_training_fp16'))} |")
    lines += ["", "Each model's deploy form vs the ResNets as torchvision ships them (eval mode, BatchNorm not folded: "
              "what the paper timed), next to the paper's ratio:", "",
              "| model | vs ResNet-18 fp32 | paper | vs ResNet-50 fp32 | paper | vs ResNet-18 fp16 | "
              "vs ResNet-50 fp16 |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in rat.items():
        cells = [_f(r.get(k), ".2f") for k in ("vs_resnet18_fp32", "paper_vs_resnet18", "vs_resnet50_fp32",
                                               "paper_vs_resnet50", "vs_resnet18_fp16", "vs_resnet50_fp16")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    errors = [(n, f, p, row["error"]) for n, forms in report["throughput"].items() for f, precs in forms.items()
              for p, row in precs.items() if "error" in row]
    if errors:
        lines += ["", "Rows that could not run: " + "; ".join(f"{n} {f} {p}: {e}" for n, f, p, e in errors) + "."]
    return lines + [""]


def _equivalence_md(report: dict) -> list[str]:
    lines = ["## Equivalence on the device: deploy vs training", "",
             "Contract (docs/contract.md): fp32 max|a-b|/max|b| <= 1e-5; float64 <= 1e-12; fp16 autocast deploy vs "
             "fp32 training: cosine >= 0.9999 and the same top-1 on >= 99% of inputs. The fp32 noise column is the "
             "training form's own fp32 error against float64 (what the kernels contribute).", "",
             "| model | inputs | fp32 rel err | float64 rel err | fp32 noise | fp16 cosine | fp16 top-1 | fp16 rel err "
             "| verdict |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, e in report["equivalence"].items():
        if "samples" not in e:
            why = e.get("dropped") or e.get("error") or e.get("skipped") or "not run"
            lines.append(f"| {name} | " + " | ".join([""] * 7) + f" | {_cell(e)}: {why} |")
            continue
        top1 = e["fp16_top1_agreement"]
        bad = [p for p in ("fp32", "fp64", "fp16") if not e[f"{p}_passed"]]
        verdict = _verdict(not bad) + (f" ({', '.join(bad)})" if bad else "")
        lines.append(f"| {name} | {e['samples']} | {e['fp32_max_rel']:.2e} | {e['fp64_max_rel']:.2e} | "
                     f"{e['fp32_noise_training_vs_fp64']:.2e} | {e['fp16_cosine']:.6f} | "
                     f"{'—' if top1 is None else f'{top1:.0%}'} | {e['fp16_max_rel']:.2e} | {verdict} |")
    return lines + [""]


def _export_md(report: dict) -> list[str]:
    lines = ["## ONNX export (deploy form, fp32, checked on onnxruntime CPU)", ""]
    onnx = report["onnx"]
    if "skipped" in onnx:
        lines.append(f"Skipped: {onnx['skipped']}.")
    else:
        lines += ["| model | check | verdict |", "|---|---|---|"]
        lines += [f"| {n} | {r.get('summary', _cell(r) + ' ' + r.get('error', ''))} | {_verdict(r.get('passed'))} |"
                  for n, r in onnx.items()]
    lines += ["", "## TensorRT", ""]
    trt = report["tensorrt"]
    if "skipped" in trt:
        return lines + [f"Skipped: {trt['skipped']}.", ""]
    lines += [f"Backend: {trt['backend']} {trt['version']}" + (f"; {trt['unsupported']}" if "unsupported" in trt
                                                                else ""), "",
              "| model | engine | build (s) | vs PyTorch | verdict | images/s | vs PyTorch deploy |",
              "|---|---|---:|---|---|---:|---:|"]
    for name, precs in trt["rows"].items():
        for prec, r in precs.items():
            torch_prec = "fp32" if prec == "fp32" else "fp16"
            base = _ips(report, name, "deploy", torch_prec)
            speed = (f"{r['images_per_s'] / base:.2f}x ({torch_prec})" if base and r.get("images_per_s") else "—")
            lines.append(f"| {name} | {prec} | {_f(r.get('build_seconds'), '.1f')} | "
                         f"{r.get('summary', r.get('skipped', r.get('error', _cell(r))))} | "
                         f"{_verdict(r.get('passed'))} | {_cell(r)} | {speed} |")
    return lines + [""]


def plot(report: dict, path: Path) -> dict:
    """report.png: images/s of every model, form and precision, with the paper's figure; needs matplotlib."""
    try:
        import matplotlib as mpl
    except Exception as exc:  # ImportError, or a broken install raising anything else
        return {"skipped": f"matplotlib is not importable ({one_line(exc)})"}
    mpl.use("Agg")
    import matplotlib.pyplot as plt

    from ..io.checkpoint import atomic_write

    names = list(report["throughput"])
    series = [(f"{form} {prec}", form, prec) for prec in PRECISIONS for form in FORMS]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(names) + 3), 4.5))
    width = 0.8 / (len(series) + 1)
    for i, (label, form, prec) in enumerate(series):
        vals = [_ips(report, n, form, prec) or 0 for n in names]
        ax.bar([j + i * width for j in range(len(names))], vals, width, label=label)
    if (report["config"]["batch"], report["config"]["size"]) == (128, 224):  # the paper's setting, else not comparable
        ax.bar([j + len(series) * width for j in range(len(names))], [PAPER_IPS.get(n, 0) for n in names], width,
               label="paper (1080Ti fp32 deploy)", color="grey")
    ax.set_xticks([j + width * len(series) / 2 for j in range(len(names))], names, rotation=30, ha="right")
    env = report["environment"]
    ax.set_ylabel("images/s")
    ax.set_title(f"{env.get('gpu', 'CPU')}, batch {report['config']['batch']}, {report['config']['size']}px")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100), force=True)
    finally:
        plt.close(fig)
    return {"file": path.name}


def failures(report: dict) -> list[str]:
    """Every check that failed or could not run for an error (a dropped or skipped row, or a throughput row that
    ran out of GPU memory, is not a failure: the report says why it has no figure)."""
    def bad(label: str, row: dict) -> list[str]:
        if row.get("passed") is False:
            return [label]
        error = row.get("error")
        return [f"{label} ({error})"] if error and error != "OOM" else []

    out = [x for n, e in report["equivalence"].items() for x in bad(f"{n} equivalence", e)]
    onnx = report["onnx"] if "skipped" not in report["onnx"] else {}
    out += [x for n, r in onnx.items() for x in bad(f"{n} ONNX", r)]
    for name, precs in report["tensorrt"].get("rows", {}).items():
        out += [x for p, r in precs.items() for x in bad(f"{name} TensorRT {p}", r)]
    for name, forms in report["throughput"].items():
        out += [x for f, precs in forms.items() for p, r in precs.items() for x in bad(f"{name} {f} {p}", r)]
    return out

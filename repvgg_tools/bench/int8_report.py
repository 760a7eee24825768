"""The int8 study's report: aggregates per family, report.md's tables, report.png (matplotlib), strict JSON, and the
check of the output files before any work."""

from __future__ import annotations

import math
from pathlib import Path

REPORT_FILES = ("report.md", "report.json", "report.png")


def check_outputs(out: Path, force: bool) -> None:
    """Fail before any work when a report file exists (without --force) or the directory cannot be made; makes it.

    Raises:
        ValueError: (``CheckpointError`` included) with a one-line message.
    """
    from repvgg_tools.io.checkpoint import check_output_path

    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a directory")
    for name in REPORT_FILES:
        if (out / name).exists() or (out / name).is_symlink():
            check_output_path(out / name, force)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"{out}: cannot create the directory ({exc.strerror})") from None
    for name in REPORT_FILES:
        check_output_path(out / name, force)


def _f(v: float, digits: int = 1) -> str:
    return "inf" if v == math.inf else ("-inf" if v == -math.inf else f"{v:.{digits}f}")


def summary(fam: dict) -> dict:
    """Per-family aggregates of the per-layer statistics over all layers, and separately over the layers that fused
    an identity branch (``id_*``) and those that did not (``noid_*``)."""
    out = {}
    groups = {"": fam["layers"], "id_": [r for r in fam["layers"] if r["identity"]],
              "noid_": [r for r in fam["layers"] if not r["identity"]]}
    for prefix, layers in groups.items():
        if not layers:
            continue

        def vals(kind: str, key: str, layers=layers) -> list[float]:
            return [r[kind][key] for r in layers if key in r[kind]]

        for key in ("sqnr_per_channel", "sqnr_per_tensor"):
            v = [x for x in vals("weight", key) if math.isfinite(x)]
            out[f"{prefix}weight_{key}_mean"], out[f"{prefix}weight_{key}_min"] = sum(v) / len(v), min(v)
        for key in ("range_spread", "std_spread", "max_over_std"):
            out[f"{prefix}weight_{key}_max"] = max(vals("weight", key))
            out[f"{prefix}weight_{key}_mean"] = sum(vals("weight", key)) / len(layers)
        out[f"{prefix}act_outlier_ratio_max"] = max(vals("activation", "outlier_ratio"))
        out[f"{prefix}act_outlier_ratio_mean"] = sum(vals("activation", "outlier_ratio")) / len(layers)
        for key in [k for k in layers[0]["activation"] if k.startswith("sqnr_")]:
            v = [x for x in vals("activation", key) if math.isfinite(x)]
            out[f"{prefix}act_{key}_mean"] = sum(v) / len(v)
    return out


def markdown(report: dict) -> str:
    """The report's tables."""
    cfg = report["config"]
    lines = ["# int8 study: RepVGG vs QARepVGG", "",
             f"Command: `{cfg['command']}`  ", f"Wall time: {report['wall_seconds']:.0f} s; widths {cfg['widths']}, "
             f"depths {cfg['depths']}, {cfg['image_size']}x{cfg['image_size']}, {cfg['epochs']} epochs "
             f"(+{cfg['qat_epochs']} QAT at lr {cfg['qat_lr']}), SGD lr {cfg['lr']}, batch {cfg['batch_size']}, "
             f"seed {cfg['seed']}.", "",
             "Top-1 on held-out images (never used for calibration); int8 = TensorRT-style Q/DQ ONNX run as written "
             "on onnxruntime (exact_qdq). Weight SQNR: symmetric int8, per channel (as exported) and per tensor. "
             "Outlier ratio: max|x| / 99.9th percentile of |x| of a layer's input on held-out images. Spread: "
             "largest / smallest per-output-channel max|W| of the fused kernel.", ""]
    for ds, section in report["datasets"].items():
        methods = cfg["methods"]
        cols = ["fp32"] + [f"ptq_{m}" for m in methods] + (["qat_int8"] if cfg["qat_epochs"] else [])
        lines += [f"## {ds} ({section['classes']} classes, {section['samples']['train']} train / "
                  f"{section['samples']['calib']} calibration / {section['samples']['test']} held-out)", "",
                  "| family | params | " + " | ".join(c.replace("_", " ") for c in cols) + " |",
                  "|---|---:|" + "---:|" * len(cols)]
        for fam, r in section["families"].items():
            lines.append(f"| {fam} | {r['params']} | " + " | ".join(f"{r['accuracy'][c]:.2%}" for c in cols) + " |")
        lines += ["", "Statistics over the fused layers: all layers, the layers that fused an identity branch (id), "
                  "the others (no id); mean, and worst in brackets:", "",
                  "| family | layers | W SQNR per-channel dB | W SQNR per-tensor dB | range spread | std spread | "
                  "max/std | act max/p99.9 | " + " | ".join(f"act SQNR {m} dB" for m in methods) + " |",
                  "|---|---|" + "---:|" * (6 + len(methods))]
        for fam, r in section["families"].items():
            s = r["summary"]
            for prefix, label in (("", "all"), ("id_", "id"), ("noid_", "no id")):
                if f"{prefix}weight_sqnr_per_channel_mean" not in s:
                    continue
                g = {k.removeprefix(prefix): v for k, v in s.items() if k.startswith(prefix)}
                lines.append(
                    f"| {fam} | {label} | {_f(g['weight_sqnr_per_channel_mean'])} "
                    f"({_f(g['weight_sqnr_per_channel_min'])}) | {_f(g['weight_sqnr_per_tensor_mean'])} "
                    f"({_f(g['weight_sqnr_per_tensor_min'])}) | {_f(g['weight_range_spread_mean'])} "
                    f"({_f(g['weight_range_spread_max'])}) | {_f(g['weight_std_spread_mean'])} "
                    f"({_f(g['weight_std_spread_max'])}) | {_f(g['weight_max_over_std_mean'])} "
                    f"({_f(g['weight_max_over_std_max'])}) | {_f(g['act_outlier_ratio_mean'], 2)} "
                    f"({_f(g['act_outlier_ratio_max'], 2)}) | "
                    + " | ".join(_f(g[f"act_sqnr_{m}_mean"]) for m in methods) + " |")
        for fam, r in section["families"].items():
            lines += ["", f"Per layer, {fam} on {ds}:", "",
                      "| layer | W SQNR ch | W SQNR tensor | range spread | std spread | max/std | act max/p99.9 | "
                      + " | ".join(f"act SQNR {m}" for m in methods) + " |", "|---|" + "---:|" * (6 + len(methods))]
            for row in r["layers"]:
                w, a = row["weight"], row["activation"]
                tag = " (id)" if row["identity"] else ""
                lines.append(f"| {row['layer']}{tag} | {_f(w['sqnr_per_channel'])} | {_f(w['sqnr_per_tensor'])} | "
                             f"{_f(w['range_spread'])} | {_f(w['std_spread'])} | {_f(w['max_over_std'])} | "
                             f"{_f(a['outlier_ratio'], 2)} | "
                             + " | ".join(_f(a[f"sqnr_{m}"]) for m in methods) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path, force: bool) -> str | None:
    """report.png: per dataset, accuracy bars and per-layer weight / activation SQNR of both families. Returns a
    note when matplotlib is missing (no PNG), else None."""
    try:
        import matplotlib
    except ImportError:
        return "matplotlib is not installed: no report.png"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from repvgg_tools.io.checkpoint import atomic_write

    sections = report["datasets"]
    fig, axes = plt.subplots(len(sections), 3, figsize=(16, 4.2 * len(sections)), squeeze=False)
    colours = {"repvgg": "tab:red", "qarepvgg": "tab:blue"}
    methods = report["config"]["methods"]
    for row, (ds, section) in zip(axes, sections.items(), strict=True):
        fams = section["families"]
        cols = list(next(iter(fams.values()))["accuracy"])
        cols = [c for c in cols if c != "qat_fp32"]
        for i, (fam, r) in enumerate(fams.items()):
            xs = [j + (i - 0.5) * 0.38 for j in range(len(cols))]
            row[0].bar(xs, [r["accuracy"][c] for c in cols], 0.38, label=fam, color=colours[fam])
        row[0].set_xticks(range(len(cols)), [c.replace("_", "\n") for c in cols], fontsize=8)
        row[0].set_ylim(0, 1)
        row[0].set_title(f"{ds}: held-out top-1")
        row[0].legend(fontsize=8)
        for fam, r in fams.items():
            n = range(len(r["layers"]))
            row[1].plot(n, [x["weight"]["sqnr_per_channel"] for x in r["layers"]], "o-", color=colours[fam],
                        label=f"{fam} per-channel")
            row[1].plot(n, [x["weight"]["sqnr_per_tensor"] for x in r["layers"]], "s--", color=colours[fam],
                        label=f"{fam} per-tensor")
            for m, style in zip(methods, ("o-", "s--", "^:"), strict=False):
                row[2].plot(n, [x["activation"][f"sqnr_{m}"] for x in r["layers"]], style, color=colours[fam],
                            label=f"{fam} {m}")
        for i, layer in enumerate(next(iter(fams.values()))["layers"]):
            if layer["identity"]:
                for ax in row[1:]:
                    ax.axvspan(i - 0.4, i + 0.4, color="0.9", zorder=0)
        row[1].set_title(f"{ds}: fused weight SQNR (dB) per layer (grey: identity fused)")
        row[2].set_title(f"{ds}: activation SQNR (dB) per layer input")
        for ax in row[1:]:
            ax.set_xlabel("layer (graph order)")
            ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=90, format="png"), force=force)
    plt.close(fig)
    return None


def _finite(obj):
    """``obj`` with non-finite floats as the strings ``inf``, ``-inf``, ``nan`` (strict JSON has no such numbers)."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj

"""``repvgg-bench``'s report files: report.md and report.json from the measured rows, report.png (matplotlib)."""

from __future__ import annotations

import json
from pathlib import Path


def write_report(report: dict, out: Path) -> None:
    from repvgg_tools.io.checkpoint import atomic_write

    m = report["machine"]
    lines = ["# repvgg-tools benchmark", "",
             f"{m['cpu']}, {m['threads']} torch threads, torch {m['torch']}, timm {m.get('timm', '-')}, onnxruntime "
             f"{m.get('onnxruntime', '-')}; batch {report['batch']}, {report['size']}x{report['size']}, "
             f"{report['iters']} timed iterations after {report['warmup']} warm-up (medians); load average before "
             f"the run {m['loadavg']}.", "",
             f"Measured fp32 matmul peak: **{m['peak_gflops']:.1f} GFLOP/s** (2048x2048 torch.mm).", "",
             "Speed ratios are > 1 when the first named is faster (ratio of median latencies).", ""]
    for name, res in report["models"].items():
        s = res["summary"]
        lines += [f"## {name}", "", f"{res['flops'] / 1e9:.3f} GFLOPs per image (2 x multiply-adds; "
                  f"{res['flops'] / 2e9:.3f} GMACs)", "",
                  "| form | params | latency median (ms) | p90 (ms) | images/s | GFLOP/s | % of matmul peak |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for form, row in res["rows"].items():
            if "error" in row:
                lines.append(f"| {form} | error: {row['error']} | | | | | |")
                continue
            lines.append(f"| {form} | {row['params']:,} | {row['median_ms']:.2f} | {row['p90_ms']:.2f} | "
                         f"{row['images_per_s']:.1f} | {row['gflops_per_s']:.1f} | "
                         f"{100 * row['gflops_per_s'] / m['peak_gflops']:.0f}% |")
        lines += ["", f"- deploy (fastest: {s['fastest_deploy']}) vs training: "
                      f"**{s['deploy_speedup_vs_training']:.2f}x**",
                  f"- best torch deploy form vs the fastest deploy backend: {s['torch_deploy_vs_fastest']:.2f}x"]
        if "auto_vs_fastest" in s:
            lines.append(f"- `repvgg_tools.runtime.fastest_cpu_runner` vs the fastest deploy backend: "
                         f"{s['auto_vs_fastest']:.2f}x (design target >= 0.95)")
        if "ours_vs_timm_training" in s:
            lines.append(f"- ours vs timm, training form: {s['ours_vs_timm_training']:.2f}x")
        if "ours_vs_timm_deploy" in s:
            lines.append(f"- ours vs timm, deploy form (both NCHW): {s['ours_vs_timm_deploy']:.2f}x; "
                         f"our fastest deploy vs timm deploy: {s['ours_best_vs_timm_deploy']:.2f}x")
        lines.append("")
    conv = report.get("conversion")
    if conv:
        lines += ["## Checkpoint conversion", "", f"{conv['arch']} training checkpoint (timm layout, "
                  f"{conv['checkpoint_bytes'] / 1e6:.0f} MB), each in its own process, peak RSS above the process's "
                  "RSS after imports.", "", "| converter | time (s) | peak RAM above baseline (MB) | x checkpoint |",
                  "|---|---:|---:|---:|"]
        names = {"io_floor": "I/O floor (`torch.load(mmap=True)` + `torch.save`)",
                 "ours": "ours (`convert_file(verify=False)`)",
                 "timm": "timm (create, load_checkpoint, reparameterize_model, save)"}
        for label in ("io_floor", "ours", "timm"):
            r = conv.get(label, {})
            if "error" in r:
                lines.append(f"| {label} | error: {r['error']} | | |")
            elif r:
                lines.append(f"| {names[label]}")
                lines[-1] += (f" | {r['seconds']:.2f} | {r['peak_above_baseline'] / 1e6:.0f} | "
                              f"{r['peak_above_baseline'] / conv['checkpoint_bytes']:.2f} |")
        times = {k: conv[k]["seconds"] for k in ("io_floor", "ours", "timm") if "seconds" in conv.get(k, {})}
        if {"io_floor", "ours", "timm"} <= set(times):
            lines += ["", f"Ours: {times['ours'] / times['io_floor']:.2f}x the I/O floor, "
                      f"{times['ours'] / times['timm']:.2f}x timm's time."]
        if "max_rel_diff_ours_vs_timm" in conv:
            lines += ["", f"Same keys: {conv['same_keys']}; max relative difference of the fused tensors, ours vs "
                      f"timm: {conv['max_rel_diff_ours_vs_timm']:.2e}.", ""]
    trt = report.get("trt")
    if trt:
        lines += ["## GPU (--trt)", ""]
        if "skipped" in trt:
            lines.append(f"Skipped: {trt['skipped']}.")
        else:
            lines.append(f"{trt['gpu']}; backend: {trt.get('backend', trt.get('backend_error'))}")
            lines += ["", "| model | engine | p50 (ms) | p90 (ms) | images/s |", "|---|---|---:|---:|---:|"]
            for name in report["models"]:
                for eng, r in trt.get(name, {}).items():
                    if "error" in r:
                        lines.append(f"| {name} | {eng} | error: {r['error']} | | |")
                    else:
                        lines.append(f"| {name} | {eng} | {r['p50']:.3f} | {r['p90']:.3f} | {r['images_per_s']:.0f} |")
        lines.append("")
    text = "\n".join(lines)
    atomic_write(out / "report.md", lambda tmp: Path(tmp).write_text(text), force=True)
    atomic_write(out / "report.json", lambda tmp: Path(tmp).write_text(json.dumps(report, indent=1)), force=True)


def plot_report(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from repvgg_tools.io.checkpoint import atomic_write

    names = list(report["models"])
    forms = []
    for res in report["models"].values():
        forms += [f for f, r in res["rows"].items() if "median_ms" in r and f not in forms]
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(names) + 3), 4))
    width = 0.8 / max(len(forms), 1)
    for i, form in enumerate(forms):
        vals = [report["models"][n]["rows"].get(form, {}).get("images_per_s", 0) for n in names]
        ax.bar([j + i * width for j in range(len(names))], vals, width, label=form)
    ax.set_xticks([j + width * (len(forms) - 1) / 2 for j in range(len(names))], names)
    ax.set_ylabel("images/s (CPU)")
    ax.set_title(f"batch {report['batch']}, {report['size']}x{report['size']}, {report['machine']['threads']} threads")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    try:
        atomic_write(out / "report.png", lambda tmp: fig.savefig(tmp, format="png", dpi=100), force=True)
    finally:
        plt.close(fig)

"""``repvgg-bench --fuser``: the graph fuser vs timm's ``reparameterize_model`` on timm models, and its table."""

from __future__ import annotations

import statistics

import torch

FUSER_MODELS = ("mobileone_s0", "fastvit_t8")


def bench_fuser(names=FUSER_MODELS, repeats: int = 7, size: int = 64) -> dict:
    """Our graph fuser (no timm methods) vs timm's ``reparameterize_model`` on the same model, ``repeats`` runs of
    each, interleaved, the garbage collector paused inside each timing (both return a new model and leave the
    input as it was: timm deep-copies it all, ours copies what the fused model keeps). Times and ratios are the
    fastest run of each side, as ``timeit`` advises (slower runs measure other processes on the machine); the
    medians are kept too. Also modules before/after, max rel error between the two results and what our fuser
    left unfused."""
    import gc
    import time
    from collections import Counter

    import timm
    from timm.utils.model import reparameterize_model

    from repvgg_tools import randomize_batchnorm
    from repvgg_tools.fx.fuser import graph_fuse
    from repvgg_tools.verify import compare_outputs

    def counts(m):
        kinds = Counter(type(q).__name__ for q in m.modules())
        bns = sum(isinstance(q, torch.nn.modules.batchnorm._BatchNorm) for q in m.modules())
        return {"Conv2d": kinds["Conv2d"], "BatchNorm": bns, "modules": sum(kinds.values())}

    rows = {}
    for name in names:
        torch.manual_seed(0)
        model = randomize_batchnorm(timm.create_model(name, pretrained=False), seed=0).eval()
        x = torch.randn(1, 3, size, size)
        t_timm, t_ours, t_whole = [], [], []

        def timed(times: list, fn, *args, **kwargs):
            gc.collect()  # as timeit: no collector pause inside one side's timing from the other's garbage
            gc.disable()
            try:
                start = time.perf_counter()
                out = fn(*args, **kwargs)
                times.append(time.perf_counter() - start)
            finally:
                gc.enable()
            return out

        for _ in range(repeats):
            ref = timed(t_timm, reparameterize_model, model)
            ours, report = timed(t_ours, graph_fuse, model, (x,))
            timed(t_whole, graph_fuse, model, (x,), whole_model=True)
        with torch.no_grad():
            x = torch.randn(2, 3, size, size)
            rel = compare_outputs(ours(x), ref(x))[1]
        timm_s, ours_s, whole_s = min(t_timm), min(t_ours), min(t_whole)
        reasons = Counter(why.split(":", 1)[-1].strip()[:90] for _, why in report.unfused)
        medians = {"timm_s": statistics.median(t_timm), "ours_s": statistics.median(t_ours),
                   "whole_model_s": statistics.median(t_whole)}
        medians["ratio"] = medians["ours_s"] / medians["timm_s"]
        rows[name] = {"timm_s": timm_s, "ours_s": ours_s, "ratio": ours_s / timm_s, "whole_model_s": whole_s,
                      "whole_model_ratio": whole_s / timm_s, "median": medians, "before": counts(model),
                      "timm": counts(ref), "ours": counts(ours), "max_rel_vs_timm": rel,
                      "fused": len(report.fused), "unfused": dict(reasons.most_common(5)),
                      "skipped": [f"{w}: {why}" for w, why in report.skipped]}
    return rows


def fuser_markdown(rows: dict) -> str:
    lines = ["## Graph fuser vs timm reparameterize_model", "",
             "`ours`: fused modules replaced in place (the model keeps its class); `whole`: `graph_fuse(...,"
             " whole_model=True)` (the model becomes one GraphModule). Fastest of the interleaved runs (median ratio"
             " in the last column); both sides return a new model and leave the input as it was.", "",
             "| model | timm s | ours s | ratio | whole s | ratio | Conv2d/BN before | timm | ours | max rel vs timm "
             "| median ratio |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        cb = [f"{r[k]['Conv2d']}/{r[k]['BatchNorm']}" for k in ("before", "timm", "ours")]
        lines.append(f"| {name} | {r['timm_s']:.3f} | {r['ours_s']:.3f} | {r['ratio']:.2f}x | "
                     f"{r['whole_model_s']:.3f} | {r['whole_model_ratio']:.2f}x | {cb[0]} | {cb[1]} | {cb[2]} | "
                     f"{r['max_rel_vs_timm']:.1e} | {r['median']['ratio']:.2f}x |")
    for name, r in rows.items():
        for why, n in r["unfused"].items():
            lines.append(f"- {name}: {n} left unfused: {why}")
    return "\n".join(lines) + "\n"

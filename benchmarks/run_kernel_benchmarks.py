"""Run every kernel benchmark in one GPU session: one table per op group, one JSON, PNG plots.

Each group is a module of this folder with ``run() -> list[dict]`` (one dict per measured row):

    pointwise                    bench_pointwise.py                    norms, RoPE, activations (GB/s)
    attention                    bench_attention.py                    attention kernels (TFLOP/s)
    fused_linear_cross_entropy   bench_fused_linear_cross_entropy.py   LM head + loss

A module that is missing or fails is skipped with a message; the others still run. Options a module's ``run``
accepts (``with_compile``, ``sweep``) are passed to it. A module's own ``table``/``_table``/``print_table``
and ``plot``/``_plot`` are used when present; otherwise a generic table and bar chart are made from the rows.

    python benchmarks/run_kernel_benchmarks.py [--out benchmarks/results] [--only pointwise attention] [--compile]

Writes ``kernel_benchmarks_<device>.json`` and ``<group>_<device>.png`` (device tag: ``h100``, ``h200``, ...).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import platform
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
GROUPS = {
    "pointwise": "bench_pointwise",
    "attention": "bench_attention",
    "fused_linear_cross_entropy": "bench_fused_linear_cross_entropy",
}
LABEL_KEYS = ("provider", "variant", "kind")
CASE_KEYS = ("case", "shape", "op")
METRIC_KEYS = ("ms", "fwd_bwd_ms", "fwd_ms", "ms_all_tokens")


def _env() -> dict:
    import torch

    env = dict(time=time.strftime("%Y-%m-%d %H:%M:%S"), python=platform.python_version(), torch=torch.__version__,
               cuda=torch.version.cuda, device=None)
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        env["triton"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(device=torch.cuda.get_device_name(0), sm_count=p.multi_processor_count,
                   memory_gib=round(p.total_memory / 2**30, 1))
    from importlib import metadata

    for pkg in ("transformers", "liger_kernel"):
        try:
            env[pkg] = metadata.version(pkg.replace("_", "-"))
        except Exception:  # noqa: BLE001
            env[pkg] = None
    return env


def _generic_table(rows: list[dict]) -> str:
    keys: list[str] = []
    for r in rows:
        for k, v in r.items():
            if k not in keys and not isinstance(v, (list, dict)) and k not in ("device", "group"):
                keys.append(k)
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        cells = []
        for k in keys:
            v = r.get(k, "")
            cells.append(f"{v:.4g}" if isinstance(v, float) else str(v)[:60])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _generic_plot(rows: list[dict], path: str, title: str) -> bool:
    rows = [r for r in rows if "error" not in r]
    label_key = next((k for k in LABEL_KEYS if any(k in r for r in rows)), None)
    case_key = next((k for k in CASE_KEYS if any(k in r for r in rows)), None)
    metric = next((k for k in METRIC_KEYS if any(isinstance(r.get(k), (int, float)) for r in rows)), None)
    if not rows or label_key is None or metric is None:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def case_of(r):
        parts = [str(r.get(case_key, ""))] + [str(r[k]) for k in ("mode", "ignored_frac") if k in r]
        return "\n".join(parts)

    rows = [r for r in rows if isinstance(r.get(metric), (int, float))]
    labels = list(dict.fromkeys(str(r.get(label_key)) for r in rows))
    cases = list(dict.fromkeys(case_of(r) for r in rows))
    width = 0.8 / max(1, len(labels))
    fig, ax = plt.subplots(figsize=(max(8, 1.2 * len(cases) + 4), 5))
    for i, lab in enumerate(labels):
        vals = {case_of(r): r[metric] for r in rows if str(r.get(label_key)) == lab}
        xs = [j + i * width for j, c in enumerate(cases) if c in vals]
        ax.bar(xs, [vals[c] for c in cases if c in vals], width, label=lab[:40])
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
    ax.set_xticklabels(cases, fontsize=7)
    ax.set_ylabel(metric + " (lower is better)" if "ms" in metric else metric)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _call_run(mod, options: dict) -> list[dict]:
    params = inspect.signature(mod.run).parameters
    kwargs = {k: v for k, v in options.items() if k in params}
    return mod.run(**kwargs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--only", nargs="*", choices=sorted(GROUPS), help="run only these groups")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile where a module offers it")
    parser.add_argument("--sweep", action="store_true", help="also run launch-configuration sweeps")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    sys.path.insert(0, HERE)
    options = dict(with_compile=args.compile, sweep=args.sweep)

    env = _env()
    print("environment:", json.dumps(env), flush=True)
    from litespark_hf.efficiency.device import device_tag

    dev = device_tag(env["device"])
    json_path = os.path.join(args.out, f"kernel_benchmarks_{dev}.json")
    result = dict(env=env, config=dict(vars(args), groups=args.only or list(GROUPS)), groups={})
    tables = []
    for group in args.only or list(GROUPS):
        module_name = GROUPS[group]
        entry = dict(module=module_name + ".py", rows=[], error=None)
        result["groups"][group] = entry
        print(f"\n=== {group} ({module_name}.py)", flush=True)
        t0 = time.time()
        try:
            mod = importlib.import_module(module_name)
        except Exception as e:  # noqa: BLE001 - missing or broken module: skipped with a message
            entry["error"] = f"import failed: {type(e).__name__}: {e}"
            print(f"skipping {group}: {entry['error']}", flush=True)
            continue
        try:
            rows = _call_run(mod, options)
        except Exception as e:  # noqa: BLE001
            entry["error"] = f"run() failed: {type(e).__name__}: {e}"
            traceback.print_exc()
            print(f"skipping {group}: {entry['error']}", flush=True)
            continue
        entry["rows"] = rows
        entry["seconds"] = round(time.time() - t0, 1)
        with open(json_path, "w") as f:  # written after every group
            json.dump(result, f, indent=1, default=str)
        table_fn = next((getattr(mod, n) for n in ("table", "_table", "print_table") if hasattr(mod, n)), None)
        try:
            text = table_fn(rows) if table_fn else None
        except Exception as e:  # noqa: BLE001
            print(f"{group}: its table function failed ({type(e).__name__}: {e}); generic table", flush=True)
            text = None
        text = text if isinstance(text, str) else _generic_table(rows)
        tables.append((group, text))
        png = os.path.join(args.out, f"{group}_{dev}.png")
        plot_fn = next((getattr(mod, n) for n in ("plot", "_plot") if hasattr(mod, n)), None)
        try:
            if plot_fn is not None:
                plot_fn([r for r in rows if "error" not in r], png)
            else:
                _generic_plot(rows, png, f"{group}, {env.get('device')}")
        except Exception as e:  # noqa: BLE001
            print(f"{group}: plot failed ({type(e).__name__}: {e})", flush=True)

    with open(json_path, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(f"\nDevice: {env.get('device')}; torch {env['torch']}, triton {env.get('triton')}, "
          f"liger-kernel {env.get('liger_kernel')}")
    for group, text in tables:
        print(f"\n## {group}\n{text}", flush=True)
    for group, entry in result["groups"].items():
        if entry["error"]:
            print(f"\n{group}: skipped ({entry['error']})")
    print(f"\nwrote {json_path} and PNG plots to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

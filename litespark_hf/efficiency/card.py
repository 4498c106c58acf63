"""The model card's "Efficiency" section and its ``co2_eq_emissions`` metadata.

`update_model_card(output_dir, report)` edits ``output_dir/README.md`` in place (or creates a minimal card): it
replaces the section between the ``litespark-efficiency`` markers (so applying it again, after TRL regenerated the
card, leaves exactly one section) and sets the Hub's standard metadata field::

    co2_eq_emissions:
      emissions: 12.3            # grams CO2eq
      source: CodeCarbon
      training_type: pre-training
      geographical_location: France
      hardware_used: 1 x NVIDIA H100 80GB HBM3
"""

from __future__ import annotations

import os

__all__ = ["update_model_card", "efficiency_section", "co2_metadata", "START", "END"]

START = "<!-- litespark-efficiency:start -->"
END = "<!-- litespark-efficiency:end -->"


def _fmt(v, spec=",.0f", unit=""):
    if v is None:
        return "n/a"
    return f"{format(v, spec)}{unit}"


def co2_metadata(report: dict) -> dict | None:
    en = report.get("energy") or {}
    if en.get("emissions_g") is None:
        return None
    location = en.get("country_name") or en.get("country_iso_code")
    if en.get("region"):
        location = f"{en['region']}, {location}"
    return {
        "emissions": float(f"{float(en['emissions_g']):.6g}"),  # 6 significant digits, also for tiny runs
        "source": "CodeCarbon",
        "training_type": report.get("training_type", "pre-training"),
        "geographical_location": location,
        "hardware_used": report.get("hardware", {}).get("hardware_used"),
    }


def efficiency_section(report: dict) -> str:
    hw, tr, en = report.get("hardware", {}), report.get("training", {}), report.get("energy") or {}
    tps = tr.get("tokens_per_second_steady") or tr.get("tokens_per_second")
    mfu = tr.get("mfu_steady") if tr.get("mfu_steady") is not None else tr.get("mfu")
    peak = hw.get("peak_flops_per_device")
    rows = [
        ("Hardware", hw.get("hardware_used", "n/a") + (f" (peak {peak / 1e12:,.0f} TFLOP/s dense bf16 per device)"
                                                      if peak else "")),
        ("Precision", report.get("precision", "n/a")),
        ("Tokens seen", _fmt(tr.get("tokens_seen"))),
        ("Throughput", f"{_fmt(tps)} tokens/s" + (
            f" ({_fmt(tr.get('tokens_per_second_per_device'))} per device)" if hw.get("num_devices", 1) > 1 else "")),
        ("MFU", _fmt(mfu * 100 if mfu is not None else None, ".1f", "%")),
        ("Median step time", _fmt(tr.get("step_time_s_median"), ".3f", " s")),
        ("Peak GPU memory", _fmt(tr.get("peak_memory_gib"), ".1f", " GiB") if tr.get("peak_memory_gib") is not None
         else "n/a (CPU)"),
    ]
    if en.get("energy_kwh") is not None:
        est = " (estimate)" if en.get("is_estimate") else ""
        rows += [
            ("Energy", f"{en['energy_kwh']:.4g} kWh{est}: GPU {en.get('gpu_kwh', 0):.3g}, CPU {en.get('cpu_kwh', 0):.3g},"
                       f" RAM {en.get('ram_kwh', 0):.3g} kWh"),
            ("Energy per token", _fmt(en.get("joules_per_token"), ".4g", " J")),
            ("Tokens per kWh", _fmt(en.get("tokens_per_kwh"))),
            ("CO2", f"{en['emissions_g']:.4g} g CO2eq ({co2_metadata(report)['geographical_location']})"),
        ]
    elif en.get("error"):
        rows.append(("Energy", f"not measured ({en['error']})"))
    gain = report.get("gain") or {}
    if gain.get("speedup") or gain.get("energy_per_token_ratio"):
        parts = []
        if gain.get("speedup"):
            parts.append(f"{gain['speedup']:.2f}x tokens/s")
        if gain.get("energy_per_token_ratio"):
            parts.append(f"{gain['energy_per_token_ratio']:.2f}x energy per token")
        rows.append((f"Against {gain.get('baseline') or 'the baseline'}", ", ".join(parts)))
    lines = [START, "## Efficiency", "",
             "Measured during training by `litespark_hf.efficiency.EfficiencyCallback`"
             + (" (figures so far: the run was still going)" if report.get("partial") else "") + ".", "",
             "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    lines += ["", "MFU = (6N + 12·L·d·T) × tokens/s ÷ (peak × devices): N = "
              f"{_fmt(report.get('model', {}).get('num_parameters'))} parameters (tied embeddings once), L layers, "
              "d = heads × head_dim, T = sequence length.",
              (f"Energy: {en.get('source')}; {en.get('note')}." if en.get("energy_kwh") is not None else ""),
              END]
    return "\n".join(lines)


def _replace_section(text: str, section: str) -> str:
    if START in text and END in text:
        head, rest = text.split(START, 1)
        _, tail = rest.split(END, 1)
        return head.rstrip() + "\n\n" + section + "\n" + tail.lstrip("\n")
    return text.rstrip() + "\n\n" + section + "\n"


def update_model_card(output_dir: str, report: dict) -> str:
    """Write the Efficiency section and ``co2_eq_emissions`` into ``output_dir/README.md``; returns its path."""
    from huggingface_hub import ModelCard, ModelCardData

    path = output_dir if output_dir.endswith(".md") else os.path.join(output_dir, "README.md")
    if os.path.exists(path):
        card = ModelCard.load(path)
    else:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        data = ModelCardData(library_name="transformers", tags=["litespark_hf"])
        card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n# {os.path.basename(os.path.dirname(os.path.abspath(path)))}\n")
    co2 = co2_metadata(report)
    if co2 is not None:
        card.data.co2_eq_emissions = co2
    card.text = _replace_section(card.text, efficiency_section(report))
    card.save(path)
    return path

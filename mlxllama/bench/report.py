"""The bench result as a text table: each of our figures beside each peer's, with the ratio."""

from __future__ import annotations

OURS = "mlxllama"


def _fmt(v, unit: str) -> str:
    if isinstance(v, str):
        return v
    if v is None:
        return "-"
    if unit == "s":
        return f"{v:.2f} s"
    if unit == "GB":
        return f"{v:.2f} GB"
    return f"{v:,.1f}" if v < 100 else f"{v:,.0f}"


def _ratio(ours, theirs, lower_is_better: bool = False) -> str:
    if isinstance(theirs, str) and theirs.startswith(">") and ours and lower_is_better:
        return f">{float(theirs[1:].split()[0]) / ours:.1f}x"
    if not ours or not theirs or isinstance(ours, str) or isinstance(theirs, str):
        return "-"
    r = theirs / ours if lower_is_better else ours / theirs
    return f"{r:.2f}x"


def system_label(label: str, res: dict | None) -> str:
    dtype = (res or {}).get("dtype")
    if label == "mlx-lm" and dtype:
        return f"mlx-lm ({dtype}, defaults)"
    if label == "mlx-lm float32":
        return "mlx-lm (float32, best)"
    return label


def rows_for(entry: dict) -> list[tuple[str, str, dict]]:
    """(metric label, unit, {system label: value})."""
    systems = entry.get("systems", {})
    lengths = sorted({int(k) for r in systems.values() for k in (r.get("prefill") or {})})
    batches = sorted({int(k) for r in systems.values() for k in (r.get("decode") or {})})
    rows = []
    ttft = entry.get("ttft")
    if ttft:
        def shown(label):
            if ttft.get(label) is None and ttft.get(f"{label} timeout"):
                return f">{ttft[f'{label} timeout']:.0f} s"
            return ttft.get(label)

        rows.append(("cold start to first token", "s", {OURS: shown("mlxllama"), "mlx-lm": shown("mlx-lm")}))
    for P in lengths:
        rows.append((f"prefill {P} tokens, tok/s", "tok/s",
                     {k: (r.get("prefill") or {}).get(str(P)) for k, r in systems.items()}))
    for B in batches:
        rows.append((f"decode batch {B}, tok/s", "tok/s",
                     {k: (r.get("decode") or {}).get(str(B)) for k, r in systems.items()}))
    rows.append(("peak memory", "GB", {k: r.get("peak_memory_gb") for k, r in systems.items()}))
    return rows


def format_table(result) -> str:
    data = result if isinstance(result, dict) else {"machine": result.machine, "models": result.models}
    m = data["machine"]
    lines = [f"machine: {m.get('processor')} ({m.get('cpus')} CPUs), device {m.get('device')}"
             + (f" {m['gpu']}" if m.get("gpu") else "")
             + f", mlx {m.get('mlx')}, mlx-lm {m.get('mlx_lm')}, BLAS {m.get('blas')}, {m.get('date')}, "
             f"load average at start {m.get('load_average')}"]
    for entry in data["models"]:
        systems = entry.get("systems", {})
        labels = [OURS] + [k for k in systems if k != OURS]
        if entry.get("ttft") and "mlx-lm" not in labels:
            labels.append("mlx-lm")
        peers = [k for k in labels if k != OURS]
        header = ["", system_label(OURS, systems.get(OURS))]
        for p in peers:
            header += [system_label(p, systems.get(p)), "compiled/plain" if p == "mlxllama compiled" else f"ratio"]
        table = [header]
        for metric, unit, values in rows_for(entry):
            ours = values.get(OURS)
            row = [metric, _fmt(ours, unit)]
            for p in peers:
                theirs = values.get(p)
                if p == "mlxllama compiled":
                    row += [_fmt(theirs, unit), _ratio(theirs, ours, unit in ("s", "GB"))]
                else:
                    row += [_fmt(theirs, unit), _ratio(ours, theirs, unit in ("s", "GB"))]
            table.append(row)
        ttft = entry.get("ttft") or {}
        widths = [max(len(r[i]) for r in table) for i in range(len(header))]
        params = entry.get("params")
        lines += ["", f"== {entry['name']}" + (f", {params / 1e9:.2f}B params" if params else "") + f" ({entry['path']})"]
        for r in table:
            lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        theirs = ttft.get("mlx-lm") or ttft.get("mlx-lm timeout")
        if ttft.get("mlxllama") and theirs:
            more = "at least " if ttft.get("mlx-lm") is None else ""
            lines.append(f"cold start: {more}{theirs - ttft['mlxllama']:.2f} s sooner than `mlx_lm generate` "
                         "(CLIs as subprocesses, each at its defaults)")
        for k, r in systems.items():
            if r.get("error"):
                lines.append(f"{k}: failed: {r['error']}")
            for note in r.get("notes", []):
                lines.append(f"{k}: {note}")
        loads = [r["load_average_end"] for r in systems.values() if r.get("load_average_end") is not None]
        if loads:
            lines.append(f"1-minute load average after each system: {', '.join(f'{x:.1f}' for x in loads)} "
                         f"(on {data['machine'].get('cpus')} CPUs: figures above that were shared with other work)")
        lk = entry.get("lookup")
        if lk:
            if lk.get("error"):
                lines.append(f"prompt lookup: failed: {lk['error']}")
            else:
                lines.append(
                    f"prompt lookup ({lk['lookup']} drafted tokens) on {lk['prompts']} QA prompts: decode "
                    f"{lk['lookup_tps']:.1f} tok/s vs {lk['plain_tps']:.1f} plain = {lk['ratio']:.2f}x "
                    f"(whole answers incl. prompt: {lk['end_to_end_ratio']:.2f}x), "
                    f"{lk['accepted_drafts']} of {lk['tokens']} tokens from drafts, "
                    f"same output: {'yes' if lk['same_output'] else 'NO'}")
    lines.append("")
    lines.append("ratios: tok/s ours/theirs; seconds and GB theirs/ours (above 1: we are faster or smaller). "
                 "Prefill: best of the trials; decode batch 1: the median time between tokens over one run; "
                 "batch > 1: B(N-1)/(T(N)-T(1)), fastest of two trials when time allows; each system in a fresh process.")
    return "\n".join(lines)

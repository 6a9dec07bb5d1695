"""docs/figures.md from docs/figures.json (bench/all.py): one section per piece, each with its date, commit,
machine and the command that produced it, then its figures as tables."""

from __future__ import annotations

import json


def number(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines + [""]


def provenance(entry: dict) -> list[str]:
    machine = entry.get("machine", {})
    commit = (entry.get("commit") or "?")[:12] + (" (uncommitted changes)" if entry.get("dirty") else "")
    lines = [
        f"{entry.get('date', '?')}, commit {commit}, {machine.get('cores', '?')} cores, load average "
        f"{', '.join(str(x) for x in machine.get('load_average', []))}"
        + (" — QUICK MODE: the machinery only, these figures mean nothing" if entry.get("quick") else ""),
        "",
    ]
    commands = entry.get("command")
    commands = commands if isinstance(commands, list) else [commands] if commands else []
    if commands:
        shown = sorted(set(commands), key=commands.index)
        lines += ["```", *shown, "```", ""]
    return lines


def demo(result: dict) -> list[str]:
    gold = (
        f"{number(result['gold_sft'])} -> {number(result['gold_final'])} +- {number(result['gold_final_se'])}"
    )
    stages = ", ".join(f"{stage} {seconds:.1f}" for stage, seconds in result["stage_wall_s"].items())
    return table(
        ["wall", "held-out gold (SFT -> final)", "stage wall s (median run)"],
        [[wall_phrase(result, digits=1), gold, stages]],
    )


def wall_phrase(result: dict, digits: int = 0) -> str:
    """`32 s (31-35 s over 3 runs)`, or `32 s` for a single run."""
    walls = result.get("wall_s_runs") or [result["wall_s"]]
    low, high = min(walls), max(walls)
    spread = f" ({low:.{digits}f}-{high:.{digits}f} s over {len(walls)} runs)" if len(walls) > 1 else ""
    return f"{result['wall_s']:.{digits}f} s{spread}"


def learning(result: dict) -> list[str]:
    rows = []
    width = max((len(r.get("gold", [])) for r in result["rows"]), default=0)
    for row in result["rows"]:
        if "error" in row:
            rows.append([row["seed"], row["method"], "error: " + row["error"][:80]] + [""] * width)
            continue
        cells = [number(g) for g in row["gold"][:-1]]
        cells.append(f"{number(row['gold'][-1])} +- {number(row['gold_se'][-1])}")
        rows.append([row["seed"], row["method"], *cells, number(row["gain_over_it0"], 3)])
    header = ["seed", "method", "SFT", *[f"it {i}" for i in range(width - 1)], "gain over it 0"]
    lines = table(header, rows)
    means = result["summary"]["mean_gain_over_it0"]
    lines.append("Mean gain over iteration 0: " + ", ".join(f"{k} {number(v)}" for k, v in means.items()))
    ratios = [
        f"{name} / rloo: {result['summary'][key]} x"
        for key, name in (
            ("subspace_x_rloo_gain", "zopro subspace"),
            ("prompt_basis_x_rloo_gain", "prompt-gradient basis"),
        )
        if key in result["summary"]
    ]
    if ratios:
        lines.append(f"({'; '.join(ratios)})")
    return lines + [""]


def methods(result: dict) -> list[str]:
    reference = result["methods"].get("rloo", {})
    rows = []
    for name, row in result["methods"].items():
        if "error" in row:
            rows.append([name, "error: " + row["error"][:80]] + [""] * 8)
            continue
        memory = (
            row["peak_update_mem_mib"] / reference["peak_update_mem_mib"]
            if reference.get("peak_update_mem_mib")
            else None
        )
        speed = (
            row["time_per_update_s"] / reference["time_per_update_s"]
            if reference.get("time_per_update_s")
            else None
        )
        rows.append(
            [name, number(row["peak_update_mem_mib"], 1), number(row["time_per_update_s"]),
             number(row["forward_passes_per_update"], 0), number(memory, 2), number(speed, 2),
             number(row["peak_rollout_mem_mib"], 1), number(row["step_s"]),
             f"{row['sample_tokens_per_s']:.0f} / {row['generate_tokens_per_s']:.0f}"]
        )  # fmt: skip
    header = [
        "method",
        "update MiB",
        "s / update",
        "fwd / update",
        "mem x rloo",
        "time x rloo",
        "rollout MiB",
    ]
    header += ["s / step", "sampler / generate tok/s"]
    return [f"Model {result['config']['model']}:", "", *table(header, rows)]


def large_vocab(result: dict) -> list[str]:
    rows = [
        [name, number(row.get("peak_update_mem_mib"), 1), number(row.get("update_mem_x_logits")),
         number(row.get("peak_rollout_mem_mib"), 1), number(row.get("rollout_mem_x_logits"))]
        for name, row in result["methods"].items()
    ]  # fmt: skip
    lines = [
        f"{result['config']['model']}; one float32 logits tensor: {result['float32_logits_mib']} MiB",
        "",
    ]
    return lines + table(["method", "update MiB", "x logits", "rollout MiB", "x logits"], rows)


def trl(entries: dict) -> list[str]:
    lines = []
    for model, entry in entries.items():
        if "error" in entry:
            lines += [f"{model}: error: {entry['error']}", ""]
            continue
        report = entry["result"]
        rows = []
        for side, row in report["sides"].items():
            if side == "zopro_run":
                rows.append(
                    [side, number(row.get("median_step_s")), "-", number(row.get("tokens_per_step"), 0),
                     number(row.get("s_per_token_ms"), 2), f"rollout {number(row.get('median_rollout_s'))}",
                     "", f"{number(row.get('median_update_s'))} / +{number(row.get('update_peak_growth_mib'), 0)}",
                     "-", "off"]
                )  # fmt: skip
                continue
            phases = row.get("phases", {})

            def phase(name: str, phases=phases) -> str:
                values = phases.get(name)
                if not values:
                    return "-"
                return (
                    f"{values['median_s']:.3f} / +{values['peak_growth_mib']:.0f} ({values['peak_mib']:.0f})"
                )

            rows.append(
                [side, number(row["median_step_s"]), number(row["median_step_cpu_s"]),
                 number(row["tokens_per_step"], 0), number(row["s_per_token_ms"], 2), phase("generation"),
                 phase("scoring"), phase("update"), number(row["peak_rss_mib"], 0),
                 ("on" if row.get("gradient_checkpointing") else "off")
                 + (f", {row['rows_per_backward']} rows a backward" if row.get("rows_per_backward") else "")]
            )  # fmt: skip
        header = ["side", "s / step", "CPU s / step", "tokens / step", "ms / token", "generation s / MiB"]
        header += ["scoring s / MiB", "update s / MiB", "peak RSS MiB", "checkpointing"]
        lines += [f"**{model}** ({report['shapes']['prompts']} prompts x {report['shapes']['k']} answers x "
                  f"{report['shapes']['new_tokens']} tokens, {report['threads']} thread(s)); phases: median "
                  "seconds / peak RSS growth (absolute peak):", ""]  # fmt: skip
        lines += table(header, rows)
        for name, ratio in report["ratios"].items():
            lines.append(
                f"- {name}: " + ", ".join(f"{key} {number(value, 2)}" for key, value in ratio.items())
            )
        lines.append("")
    return lines


def distributed(result: dict) -> list[str]:
    rows = [
        [p["method"], p["ranks"], number(p.get("bytes_per_update"), 1), number(p.get("update_s_median")),
         number(p.get("step_s_median")), p.get("error", "")]
        for p in result["points"]
    ]  # fmt: skip
    lines = table(["method", "ranks", "bytes / update", "s / update", "s / step", "error"], rows)
    if "bytes_first_order_over_zeroth_order" in result:
        lines.append(f"rloo / zopro bytes per update: {result['bytes_first_order_over_zeroth_order']} x")
    return lines + [""]


def tui_open(result: dict) -> list[str]:
    rows = [
        [which, number(result[f"{which}_open"].get("first_render_s")), number(result[f"{which}_open"].get("exact_s")),
         number(result[f"{which}_open"].get("peak_rss_mib"), 0)]
        for which in ("first", "second") if f"{which}_open" in result
    ]  # fmt: skip
    lines = [
        f"{result.get('events')} events ({result.get('events_file_mib')} MiB), {result.get('size')}:",
        "",
    ]
    return lines + table(["open", "first picture s", "full history s", "peak RSS MiB"], rows)


TITLES = {
    "demo": ("The embedded default run", demo),
    "learning": ("What zeroth-order learns (recipes/tiny.toml)", learning),
    "methods": ("Update phase per method (zopro bench methods)", methods),
    "large_vocab": ("Large vocabulary (bench/large_vocab.py)", large_vocab),
    "trl": ("A full RLOO step next to TRL's RLOOTrainer (bench/trl_compare.py)", trl),
    "distributed": ("Bytes per update over ranks (zopro bench distributed)", distributed),
    "tui_open": ("Opening a one-million-event run (bench/tui_open.py)", tui_open),
}


def figures_markdown(figures: dict) -> str:
    lines = [
        "# Figures",
        "",
        "Generated by `zopro bench all` (bench/all.py) on "
        f"{figures.get('date', '?')}, commit {(figures.get('commit') or '?')[:12]}; the raw numbers are in "
        "figures.json beside this file. Every figure the README quotes comes from here; rerun one piece with "
        "`zopro bench all --only NAME`.",
        "",
    ]
    for name, (title, render) in TITLES.items():
        entry = figures["pieces"].get(name)
        if entry is None:
            continue
        lines += [f"## {title}", "", *provenance(entry)]
        if "error" in entry:
            lines += [f"error: {entry['error']}", ""]
            continue
        try:
            lines += render(entry["result"])
        except (KeyError, TypeError, ZeroDivisionError) as error:
            lines += [f"(not drawn as a table: {type(error).__name__} {error})", "", "```json"]
            lines += [json.dumps(entry.get("result", entry), indent=1), "```", ""]
    return "\n".join(lines).rstrip() + "\n"


def readme_snippet(name: str, entry: dict) -> str:
    """What the README shows between its `<!-- figures:NAME -->` markers: the piece's tables (or, for the
    demo, one phrase), with the date, the commit and the command."""
    if name == "demo":
        result = entry["result"]
        return (
            f"{wall_phrase(result)} on {result['cores']} cores, held-out gold {number(result['gold_sft'])} -> "
            f"{number(result['gold_final'])}; measured {entry['date'][:10]}, docs/figures.md"
        )
    _, render = TITLES[name]
    commit = (entry.get("commit") or "?")[:12]
    machine = entry.get("machine", {})
    where = f"{machine.get('cores', '?')} cores, load average {(machine.get('load_average') or ['?'])[0]}"
    head = f"Measured {entry['date'][:10]} on {where} (commit {commit}, `zopro bench all --only {name}`):"
    return "\n".join([head, "", *render(entry["result"])]).rstrip()


def update_readme(text: str, figures: dict) -> str:
    """README text with each `<!-- figures:NAME -->...<!-- /figures:NAME -->` region replaced by the piece's
    snippet (regions of pieces without figures, or that failed, are left as they are)."""
    for name, entry in figures["pieces"].items():
        start, end = f"<!-- figures:{name} -->", f"<!-- /figures:{name} -->"
        if start not in text or end not in text or "error" in entry or entry.get("quick"):
            continue
        try:
            snippet = readme_snippet(name, entry)
        except (KeyError, TypeError, ZeroDivisionError):
            continue
        before, rest = text.split(start, 1)
        _, after = rest.split(end, 1)
        inline = name == "demo"
        text = before + start + (snippet if inline else "\n" + snippet + "\n") + end + after
    return text

# SPDX-License-Identifier: GPL-2.0-or-later
"""Run the passt-repair benchmarks and print one table of figures measured side by side.

    .venv/bin/python -m bench                 # everything (1 to 2 minutes)
    .venv/bin/python -m bench --quick         # the same, fewer rounds (under a minute)
    .venv/bin/python -m bench --only rtt,startup
    .venv/bin/python -m bench --update-docs   # also rewrite the table in docs/performance.md

Needs root (CAP_NET_ADMIN for the helpers and the in-process reference), a C
compiler, and two CPUs for meaningful figures. A run writes
bench/build/results/{latest,quick,partial}.{json,md,png} (a full run of
everything is "latest"), which git ignores; --update-docs puts the tables into
docs/performance.md and the plot beside it. Ratios are of medians measured in
the same run.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench import fronts, rtt, selfcheck, startup
from bench.common import (
    BENCH,
    BUILD,
    HELPER_CPU,
    REFERENCE,
    ROOT,
    SERVER_CPU,
    HelperKind,
    build_ref_helper,
    log,
    pin_self,
    regular_install,
)

COMMANDS = ("on", "off")
SECTIONS = ("rtt", "throughput", "startup", "directory", "memory", "server", "migration")
COUNTS = (1, 8, 64, 253)
MIB = 1024 * 1024

GOALS = {
    "rtt_253": 1.10,
    "rtt_1": 1.05,
    "startup": 1.4,
    "startup_p99_ms": 10.0,
    "exit_ms": 1.0,
    "directory": 1.2,
    "rss_mib": 8.0,
}


def helper_kinds(bin_dir: Path, ref: Path, experiments: bool) -> list[HelperKind]:
    """The helpers whose requests are timed: shipped Python, C reference, and C with the same guarantee."""
    kinds = [
        HelperKind("python", "Python helper", (str(bin_dir / "passt-repair"),)),
        HelperKind(REFERENCE, "C reference", (str(ref),), exact=False),
    ]
    if experiments:
        kinds += [
            HelperKind("c_exact", "C, same guarantee", (str(ref), "--exact"), experiment=True),
        ]
    return kinds


def startup_kinds(bin_dir: Path, ref: Path) -> list[HelperKind]:
    """Programs whose start-up is timed."""
    kinds = [
        HelperKind("python", "Python helper (pip install .)", (str(bin_dir / "passt-repair"),)),
        HelperKind(REFERENCE, "C reference", (str(ref),), exact=False),
    ]
    editable = ROOT / ".venv" / "bin" / "passt-repair"
    if editable.exists():
        kinds.append(HelperKind("editable", "Python helper (pip install -e .)", (str(editable),)))
    return kinds


# ---------------------------------------------------------------------------
# Running


#: The library before issue 12's speed work, timed beside the present one as an experiment.
MIGRATION_BASELINE = "ec64f74"


def run_migration(counts: Sequence[int], experiments: bool) -> dict[str, Any]:
    """bench/bench_migration.py's measure(counts), if that module exists yet."""
    try:
        module = importlib.import_module("bench.bench_migration")
    except ModuleNotFoundError as e:
        if e.name != "bench.bench_migration":
            raise
        return {"skipped": "bench/bench_migration.py does not exist (yet)"}
    try:
        figures: dict[str, Any] = module.measure(list(counts), baseline=MIGRATION_BASELINE if experiments else None)
    except Exception as e:  # another engineer's benchmark: report its failure, keep the other figures
        log(f"migration benchmark failed: {type(e).__name__}: {e}")
        return {"skipped": f"bench_migration.measure() failed: {type(e).__name__}: {e}"}
    return figures


def _meta(quick: bool, sections: Sequence[str]) -> dict[str, Any]:
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "src"], capture_output=True, text=True)
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    return {
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit.stdout.strip() + ("+dirty src" if dirty.stdout.strip() else ""),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "server_cpu": SERVER_CPU,
        "helper_cpu": HELPER_CPU,
        "load_before": os.getloadavg(),
        "quick": quick,
        "sections": list(sections),
    }


def run(sections: Sequence[str], quick: bool, experiments: bool, counts: Sequence[int]) -> dict[str, Any]:
    pin_self(SERVER_CPU)
    ref = build_ref_helper()
    bin_dir = regular_install()
    kinds = helper_kinds(bin_dir, ref, experiments)
    results: dict[str, Any] = {"meta": _meta(quick, sections), "helpers": {k.key: _describe(k) for k in kinds}}
    skipped: dict[str, str] = {}
    results["skipped_experiments"] = skipped

    def usable(candidates: list[HelperKind], trial: Callable[[HelperKind], None], what: str) -> list[HelperKind]:
        """The candidates that pass `trial`; an experiment that fails is left out (the helper it was
        written against may have changed), a shipped program that fails stops the run."""
        kept = []
        for kind in candidates:
            try:
                trial(kind)
            except Exception as e:
                if not kind.experiment:
                    raise
                skipped[f"{kind.label} ({what})"] = f"{type(e).__name__}: {e}"
                log(f"left out of {what}: {kind.label}: {type(e).__name__}: {e}")
                continue
            kept.append(kind)
        return kept

    if {"rtt", "throughput", "memory"} & set(sections):
        kinds = usable(kinds, selfcheck.check, "round trips and throughput")
        log("self-check passed: every helper switches, and every exact one rolls a failed request back")
    if "rtt" in sections:
        rounds = {1: 6000, 8: 4000, 64: 2000, 253: 1200}
        if quick:
            rounds = {n: r // 8 for n, r in rounds.items()}
        rounds = {n: rounds.get(n, 500) for n in counts}
        # The headline pair alone: with more helpers taking turns on the helper CPU, each one's caches
        # are colder at every wake-up, which costs the interpreter more than the C program.
        results["rtt"] = rtt.measure_rtt([k for k in kinds if not k.experiment], counts, rounds)
        if len(kinds) > 2:
            log("round trips again, with the experiments taking turns too")
            results["rtt_experiments"] = rtt.measure_rtt(kinds, counts, {n: r // 2 for n, r in rounds.items()})
    if "throughput" in sections or "memory" in sections:
        results["throughput"] = rtt.measure_throughput(kinds, 100_000, 4 * 253)
    if "startup" in sections:
        skinds = startup_kinds(bin_dir, ref)
        results["helpers"].update({k.key: _describe(k) for k in skinds if k.key not in results["helpers"]})
        bare = [str(bin_dir / "python"), "-I", "-S", "-c", "pass"]
        skinds = usable(skinds, startup.try_start, "start-up")
        results["startup"] = startup.measure_startup(skinds, bare, 10 if quick else 60)
    if "directory" in sections:
        dkinds = [k for k in kinds if k.key in ("python", REFERENCE)]
        if experiments:
            floor = (str(bin_dir / "python"), "-I", "-S", str(BENCH / "variants" / "directory_floor.py"))
            dkinds.append(HelperKind("directory_floor", "Python floor (inotify, connect)", floor, False, True))
            results["helpers"].update({k.key: _describe(k) for k in dkinds[-1:]})
        dkinds = usable(dkinds, startup.try_directory, "directory mode")
        results["directory"] = startup.measure_directory(dkinds, 10 if quick else 60)
    if "server" in sections:
        server_rounds = {1: 4000, 253: 1000}
        results["server"] = fronts.measure(
            ref, list(server_rounds), {n: r // 8 if quick else r for n, r in server_rounds.items()}
        )
    if "migration" in sections:
        log("migration benchmark (bench/bench_migration.py)")
        results["migration"] = run_migration([100, 1000] if quick else [100, 1000, 10_000], experiments)
    results["meta"]["load_after"] = os.getloadavg()
    results["goals"] = goals(results)
    return results


def _describe(kind: HelperKind) -> dict[str, Any]:
    return {"label": kind.label, "argv": list(kind.argv), "exact": kind.exact, "experiment": kind.experiment}


# ---------------------------------------------------------------------------
# The table


def goals(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each goal of issue 5 that this run measured: the figure, the limit, met or not."""
    out: list[dict[str, Any]] = []

    def add(name: str, value: float, limit: float) -> None:
        out.append({"goal": name, "value": value, "limit": limit, "met": value <= limit})

    for n, limit in (("253", GOALS["rtt_253"]), ("1", GOALS["rtt_1"])):
        for cmd in ("on", "off"):
            entry = results.get("rtt", {}).get(n, {}).get(cmd)
            if entry and "ratio" in entry:
                add(f"round trip N={n} {cmd.upper()}, Python / C", entry["ratio"]["python"]["median"], limit)
    if "startup" in results:
        s = results["startup"]
        for key, mode in (("python", "socket mode"), ("python_dir", "directory mode, socket there")):
            if key in s:
                add(
                    f"start-up to connected / bare interpreter, {mode}",
                    s["ratio_to_bare"][key]["median"],
                    GOALS["startup"],
                )
                add(f"start-up to connected, p99 (ms), {mode}", s["p99_ms"][key], GOALS["startup_p99_ms"])
        if "python" in s.get("exit", {}):
            add("exit after the server closes, median (ms)", s["exit"]["python"]["median"] / 1000, GOALS["exit_ms"])
    if "directory" in results:
        add(
            "directory mode listen()->accept(), Python / C",
            results["directory"]["ratio"]["python"]["median"],
            GOALS["directory"],
        )
    rss = results.get("throughput", {}).get("rss", {}).get("python")
    if rss:
        add("peak RSS after 100,000 sockets (MiB)", rss["peak"] / MIB, GOALS["rss_mib"])
    elif "python" in results.get("startup", {}).get("rss_kib", {}):
        add("peak RSS after one request (MiB)", results["startup"]["rss_kib"]["python"] / 1024, GOALS["rss_mib"])
    migration = results.get("migration", {})
    if "to_c_1000" in migration:
        limit = migration["goals"]["to_c_1000"]
        add("migration of 1,000 connections end to end, Python / C", migration["to_c_1000"], limit)
    if "ratio_per_connection" in migration:
        big, small = migration["ratio_of"]
        add(
            f"migration per connection, {big:,} / {small:,}",
            migration["ratio_per_connection"]["python"],
            migration["goals"]["ratio_per_connection"],
        )
    return out


def _startup_label(helpers: dict[str, Any], key: str) -> str:
    base = key.removesuffix(startup.IN_DIRECTORY)
    return _label(helpers, base) + (", directory mode (socket there)" if base != key else "")


def _spread(blocks: Sequence[float]) -> str:
    return f"{min(blocks):.2f}-{max(blocks):.2f}" if blocks else "-"


def table(results: dict[str, Any]) -> str:
    """The figures as Markdown tables."""
    helpers = results["helpers"]
    lines: list[str] = []
    meta = results["meta"]
    lines.append(
        f"Measured {meta['when']} at {meta['commit']}: Linux {meta['kernel']}, Python {meta['python']}, "
        f"{meta['cpus']} x {meta['cpu']}; server on CPU {meta['server_cpu']}, helpers on CPU {meta['helper_cpu']}; "
        f"load {meta['load_before'][0]:.2f} before, {meta['load_after'][0]:.2f} after"
        f"{'; QUICK run' if meta['quick'] else ''}{'; SCHED_FIFO (--rt)' if 'FIFO' in meta['scheduling'] else ''}."
    )
    if results.get("goals"):
        lines += ["", "| goal | measured | limit | met |", "|---|---:|---:|:-:|"]
        for g in results["goals"]:
            lines.append(f"| {g['goal']} | {g['value']:.2f} | {g['limit']:.2f} | {'yes' if g['met'] else '**no**'} |")
    if "rtt" in results:
        keys = [k for k in results["rtt"][next(iter(results["rtt"]))]["on"] if k != "ratio"]
        lines += [
            "",
            "Round trip per message, median us (p25-p75); ratio of medians to the C reference, and its range over",
            "5 blocks of rounds; helper CPU time per message (both commands):",
            "",
            "| N | cmd | " + " | ".join(_label(helpers, k) for k in keys) + " | Python / C | blocks | in-process / C |",
            "|---:|---|" + "---:|" * len(keys) + "---:|---:|---:|",
        ]
        for n, per_n in results["rtt"].items():
            for cmd in COMMANDS:
                e = per_n[cmd]
                cells = [f"{e[k]['median']:.1f} ({e[k]['p25']:.0f}-{e[k]['p75']:.0f})" for k in keys]
                ratio = e["ratio"]["python"]
                lines.append(
                    f"| {n} | {cmd.upper()} | " + " | ".join(cells) + f" | **{ratio['median']:.3f}** | "
                    f"{_spread(ratio['blocks'])} | {e['ratio'][rtt.INPROC]['median']:.3f} |"
                )
            cpu = per_n["helper_cpu_us"]
            cells = [f"{cpu[k]:.1f}" if k in cpu else "" for k in keys]
            lines.append(f"| {n} | CPU/msg | " + " | ".join(cells) + f" | {cpu['python'] / cpu[REFERENCE]:.3f} | | |")
    if "rtt_experiments" in results:
        x = results["rtt_experiments"]
        others = [k for k in x[next(iter(x))]["on"] if k not in ("ratio", REFERENCE, rtt.INPROC)]
        lines += [
            "",
            "Experiments (not shipped), all taking turns in a second pass: round trip ratio to the C reference,",
            "median (block range); CPU/msg: helper CPU time per message, ratio to C:",
            "",
            "| N | cmd | " + " | ".join(_label(helpers, k) for k in others) + " |",
            "|---:|---|" + "---:|" * len(others),
        ]
        for n, per_n in x.items():
            for cmd in COMMANDS:
                e = per_n[cmd]
                cells = [f"{e['ratio'][k]['median']:.3f} ({_spread(e['ratio'][k]['blocks'])})" for k in others]
                lines.append(f"| {n} | {cmd.upper()} | " + " | ".join(cells) + " |")
            cpu = per_n["helper_cpu_us"]
            cells = [f"{cpu[k] / cpu[REFERENCE]:.2f}" for k in others]
            lines.append(f"| {n} | CPU/msg | " + " | ".join(cells) + " |")
    if "throughput" in results:
        t = results["throughput"]
        c = t["per_second"][REFERENCE]
        lines += [
            "",
            f"Throughput over {t['sockets']:,} sockets ({t['messages']} messages, ON and OFF alternating), "
            "and peak RSS:",
            "",
            "| helper | sockets/s | / C | VmHWM connected | VmHWM after |",
            "|---|---:|---:|---:|---:|",
        ]
        for key, rate in t["per_second"].items():
            rss = t["rss"].get(key)
            mem = f"{rss['connected'] / MIB:.1f} MiB | {rss['peak'] / MIB:.1f} MiB" if rss else "- | -"
            lines.append(f"| {_label(helpers, key)} | {rate:,.0f} | {rate / c:.3f} | {mem} |")
    if "startup" in results:
        s = results["startup"]
        lines += [
            "",
            "Start-up: spawn to the server's accept() (bare interpreter: spawn to exit), median ms (p25-p75), p99;",
            "then one request, and the server's close() to the helper's exit (waitpid), median ms; peak RSS (VmHWM):",
            "",
            "| program | ms | / bare | blocks | p99 ms | exit ms | peak RSS |",
            "|---|---:|---:|---:|---:|---:|---:|",
            f"| bare `python -I -S -c pass` | {s['bare']['median'] / 1000:.2f} ({s['bare']['p25'] / 1000:.2f}-"
            f"{s['bare']['p75'] / 1000:.2f}) | 1 | | {s['p99_ms']['bare']:.2f} | | "
            f"{s['rss_kib']['bare'] / 1024:.1f} MiB |",
        ]
        for key, ratio in s["ratio_to_bare"].items():
            e = s[key]
            label = _startup_label(helpers, key)
            exit_ms = f"{s['exit'][key]['median'] / 1000:.2f}" if key in s["exit"] else ""
            lines.append(
                f"| {label} | {e['median'] / 1000:.2f} ({e['p25'] / 1000:.2f}-{e['p75'] / 1000:.2f}) | "
                f"{ratio['median']:.2f} | {_spread(ratio['blocks'])} | {s['p99_ms'][key]:.2f} | {exit_ms} | "
                f"{s['rss_kib'][key] / 1024:.1f} MiB |"
            )
    if "directory" in results:
        d = results["directory"]
        lines += [
            "",
            "Directory mode: the helper waits in the directory; from the server's listen() (and bind()) to accept(),",
            "median us:",
            "",
            "| helper | listen() to accept() | bind() to accept() | / C | blocks |",
            "|---|---:|---:|---:|---:|",
        ]
        for key, e in d["listen_to_accept"].items():
            b = d["bind_to_accept"][key]
            r = d["ratio"].get(key)
            lines.append(
                f"| {_label(helpers, key)} | {e['median']:.0f} ({e['p25']:.0f}-{e['p75']:.0f}) | {b['median']:.0f} | "
                f"{r['median']:.2f} | {_spread(r['blocks'])} |"
                if r
                else f"| {_label(helpers, key)} | {e['median']:.0f} ({e['p25']:.0f}-{e['p75']:.0f}) | "
                f"{b['median']:.0f} | 1 | |"
            )
    if "server" in results:
        lines += ["", *fronts.table(results["server"])]
    if "migration" in results:
        lines += ["", "Migration (bench/bench_migration.py):", ""]
        m = results["migration"]
        if "skipped" in m:
            lines.append(f"skipped: {m['skipped']}")
        else:
            lines += migration_table(m)
    if results.get("skipped_experiments"):
        lines += ["", "Left out of this run:", ""]
        lines += [f"- {what}: {why}" for what, why in results["skipped_experiments"].items()]
    return "\n".join(lines)


def migration_table(m: dict[str, Any]) -> list[str]:
    """bench/bench_migration.py's table: each mover's parts, the ratios to the C reference, memory."""
    from bench.bench_migration import table as migration_figures

    return migration_figures(m)


def _label(helpers: dict[str, Any], key: str) -> str:
    return "in-process" if key == rtt.INPROC else str(helpers.get(key, {}).get("label", key))


# ---------------------------------------------------------------------------
# Output files


def plot(results: dict[str, Any], path: Path) -> None:
    """Round trips against N (ON and OFF), the ratios with their goals, start-up and directory mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: list[Callable[[Any], None]] = []
    wide: set[int] = set()  # panels that take a whole row
    helpers = results["helpers"]
    if "rtt" in results:
        counts = [int(n) for n in results["rtt"]]
        keys = [k for k in results["rtt"][str(counts[0])]["on"] if k != "ratio"]
        for cmd in ("on", "off"):

            def rtt_panel(ax: Any, cmd: str = cmd) -> None:
                for key in keys:
                    med = [results["rtt"][str(n)][cmd][key]["median"] for n in counts]
                    lo = [m - results["rtt"][str(n)][cmd][key]["p25"] for n, m in zip(counts, med, strict=True)]
                    hi = [results["rtt"][str(n)][cmd][key]["p75"] - m for n, m in zip(counts, med, strict=True)]
                    style = "--" if key != rtt.INPROC and helpers[key]["experiment"] else "-"
                    ax.errorbar(
                        counts, med, yerr=[lo, hi], fmt=style + "o", ms=3, capsize=2, label=_label(helpers, key)
                    )
                ax.set_xscale("log")
                ax.set_yscale("log")
                ax.set_xticks(counts, [str(n) for n in counts])
                ax.set_xlabel("descriptors per message (N)")
                ax.set_ylabel("round trip, us (median, p25-p75)")
                ax.set_title(f"Round trip, TCP_REPAIR {cmd.upper()}")
                ax.legend(fontsize=7)

            panels.append(rtt_panel)

        def ratio_panel(ax: Any) -> None:
            for cmd, marker in (("on", "o"), ("off", "s")):
                r = [results["rtt"][str(n)][cmd]["ratio"]["python"]["median"] for n in counts]
                ax.plot(counts, r, "-" + marker, lw=2, ms=4, label=f"Python helper {cmd.upper()}")
                x: dict[str, Any] = results.get("rtt_experiments", {})
                for key in x[str(counts[0])][cmd]["ratio"] if x else ():
                    if key in (rtt.INPROC, "python"):
                        continue
                    r = [x[str(n)][cmd]["ratio"][key]["median"] for n in counts]
                    ax.plot(counts, r, "--" + marker, lw=0.8, ms=3, label=f"{_label(helpers, key)} {cmd.upper()}")
            ax.axhline(GOALS["rtt_253"], color="grey", lw=0.8, ls=":")
            ax.axhline(GOALS["rtt_1"], color="grey", lw=0.8, ls=":")
            ax.axhline(1.0, color="black", lw=0.8)
            ax.set_xscale("log")
            ax.set_xticks(counts, [str(n) for n in counts])
            ax.set_xlabel("descriptors per message (N)")
            ax.set_ylabel("round trip / C reference")
            ax.set_title("Ratio to C (goals 1.05 at N=1, 1.10 at N=253); dashed: experiments")
            ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))

        wide.add(len(panels))
        panels.append(ratio_panel)
    if "startup" in results:

        def startup_panel(ax: Any) -> None:
            s = results["startup"]
            keys = ["bare", *s["ratio_to_bare"]]
            labels = ["bare python -I -S", *(_startup_label(helpers, k) for k in s["ratio_to_bare"])]
            ax.barh(
                labels,
                [s[k]["median"] / 1000 for k in keys],
                xerr=[
                    [s[k]["median"] / 1000 - s[k]["p25"] / 1000 for k in keys],
                    [s[k]["p75"] / 1000 - s[k]["median"] / 1000 for k in keys],
                ],
            )
            ax.axvline(
                s["bare"]["median"] / 1000 * GOALS["startup"],
                color="grey",
                ls=":",
                label=f"goal: {GOALS['startup']} x bare",
            )
            ax.set_xlabel("ms, spawn to accept() (bare: to exit)")
            ax.set_title("Start-up")
            ax.tick_params(axis="y", labelsize=7)
            ax.legend(fontsize=7)

        panels.append(startup_panel)
    if "directory" in results:

        def directory_panel(ax: Any) -> None:
            d = results["directory"]["listen_to_accept"]
            ax.barh(
                [_label(helpers, k) for k in d],
                [v["median"] for v in d.values()],
                xerr=[[v["median"] - v["p25"] for v in d.values()], [v["p75"] - v["median"] for v in d.values()]],
            )
            ax.set_xlabel("us, listen() to accept() (median, p25-p75)")
            ax.set_title("Directory mode")
            ax.tick_params(axis="y", labelsize=7)

        panels.append(directory_panel)
    if not panels:
        return
    places: list[tuple[int, int]] = []  # (row, column or -1 for the whole row)
    row, col = 0, 0
    for i in range(len(panels)):
        if i in wide:
            row, col = (row + 1, 0) if col else (row, 0)
            places.append((row, -1))
            row += 1
        else:
            places.append((row, col))
            row, col = (row + 1, 0) if col else (row, 1)
    rows = row + (1 if col else 0)
    fig = plt.figure(figsize=(13, 4.2 * rows))
    grid = fig.add_gridspec(rows, 2)
    for (r, c), panel in zip(places, panels, strict=True):
        panel(fig.add_subplot(grid[r, :] if c < 0 else grid[r, c]))
    fig.suptitle(f"passt-repair benchmarks, {results['meta']['when']}{' (quick)' if results['meta']['quick'] else ''}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


DOC = ROOT / "docs" / "performance.md"
DOC_PLOT = ROOT / "docs" / "performance.png"
DOC_START = "<!-- bench:results:start -->"
DOC_END = "<!-- bench:results:end -->"


def update_docs(text: str, image: Path) -> None:
    """Replace the results block of docs/performance.md with this run's table, and its plot with this run's."""
    doc = DOC.read_text()
    start, end = doc.index(DOC_START) + len(DOC_START), doc.index(DOC_END)
    shutil.copyfile(image, DOC_PLOT)
    DOC.write_text(doc[:start] + f"\n{text}\n\n![benchmark plot]({DOC_PLOT.name})\n" + doc[end:])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds: under a minute, noisier")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--counts", default=",".join(map(str, COUNTS)), help="descriptors per message for round trips")
    parser.add_argument("--no-experiments", action="store_true", help="leave out the experimental helpers")
    parser.add_argument("--update-docs", action="store_true", help="rewrite the results block of docs/performance.md")
    parser.add_argument(
        "--rt",
        action="store_true",
        help="run the server and every helper SCHED_FIFO, so other load on a busy machine disturbs less "
        "(changes how wake-ups are scheduled: not for the figures of record)",
    )
    args = parser.parse_args(argv)
    sections = [s for s in args.only.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s) {','.join(sorted(unknown))}; choose from {','.join(SECTIONS)}")
    if os.geteuid() != 0:
        print("bench: needs root (the helpers and the in-process reference set TCP_REPAIR)", file=sys.stderr)
        return 2
    counts = [int(n) for n in args.counts.split(",")]
    if any(not 1 <= n <= 253 for n in counts):
        parser.error("--counts: each N is 1 to 253")
    if args.rt:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))  # inherited by every program spawned
    results = run(sections, args.quick, not args.no_experiments, counts)
    results["meta"]["scheduling"] = "SCHED_FIFO 10 (--rt)" if args.rt else "SCHED_OTHER"
    text = table(results)
    print(text)
    # Generated files stay out of git: the record is docs/performance.md, rewritten by --update-docs.
    record = not args.quick and set(sections) == set(SECTIONS)
    out = BUILD / "results"
    name = "latest" if record else "quick" if args.quick else "partial"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / f"{name}.md").write_text(text + "\n")
    plot(results, out / f"{name}.png")
    log(f"wrote {os.path.relpath(out / name, ROOT)}.json, .md, .png")
    if args.update_docs:
        update_docs(text, out / f"{name}.png")
        log("updated docs/performance.md")
    return 0

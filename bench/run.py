"""`make bench`: every deltatune-vs-peft case in one command; prints the table and writes bench/results.md.

For each case (cases.py), in this order and each in its own spawned process:
1. memory: deltatune, peft and the reference, each built in a fresh process; peak memory over 3 steps above the
   process's memory once every library is imported (common.measure_memory; CUDA: max_memory_allocated);
2. fairness, before any ratio: deltatune and peft must have the same number of trainable parameters and agree on
   the case's check value (an eval-mode loss, logits or generated tokens; tolerance relative to its scale), computed
   on the same weights, adapter values and batch;
3. time: one process holds the three models and runs one step of each per round, order rotated every round,
   warm-up rounds dropped (common.time_interleaved); per-round paired ratios, their medians reported.
Targets (the issue's, for 2 CPU cores) are checked and marked; a miss is reported, not hidden.

    .venv/bin/python bench/run.py                           # all cases (about 15 minutes on 2 idle cores)
    .venv/bin/python bench/run.py --cases tiny-lora inference --rounds 6
    python bench/run.py --device cuda --dtype bfloat16      # bench/gpu.sh: the same cases on a GPU
Raw numbers go to bench/results/run-<time>.json (git-ignored); the table to bench/results.md (or --markdown).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import common
import torch
from cases import CASES, KEYS, Case

warnings.filterwarnings("ignore")
HERE = Path(__file__).resolve().parent


def _build(name: str, settings: dict[str, Any], key: str) -> common.Setup:
    torch.manual_seed(0)
    return CASES[name].build(key, settings)


def memory_of(name: str, settings: dict[str, Any], key: str) -> dict[str, float | None]:
    """Peak memory of 3 steps of one configuration, in this (fresh) process."""
    torch.set_num_threads(settings["threads"])
    case = CASES[name]
    if settings["device"] == "cpu":
        build = functools.partial(_build, name, settings)
        return common.measure_memory(build, key, settings["threads"], steps=3, extra_imports=case.extra_imports)
    common.import_libraries(case.extra_imports)
    setup = _build(name, settings, key)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(3):
        setup.step()
    torch.cuda.synchronize()
    return {"peak_rss": (torch.cuda.max_memory_allocated() - base) / common.MB}


def _scale(value: Any) -> float:
    return float(torch.as_tensor(value, dtype=torch.float64).abs().max().clamp(min=1.0))


def check_fair(case: Case, setups: dict[str, common.Setup]) -> dict[str, Any]:
    """deltatune and peft: the same trainable-parameter count and the same check value; raises otherwise."""
    counts = {k: sum(p.numel() for p in setups[k].model.parameters() if p.requires_grad) for k in ("deltatune", "peft")}
    if counts["deltatune"] != counts["peft"]:
        raise AssertionError(f"{case.name}: trainable parameters differ: {counts}")
    values = {k: setups[k].check() for k in ("deltatune", "peft")}
    ours = torch.as_tensor(values["deltatune"], dtype=torch.float64)
    theirs = torch.as_tensor(values["peft"], dtype=torch.float64)
    gap = float((ours - theirs).abs().max()) / _scale(theirs)
    if gap > case.check_tolerance:
        raise AssertionError(f"{case.name}: deltatune and peft disagree on the check value by {gap:.2e} "
                             f"(relative; tolerance {case.check_tolerance:.0e})")
    return {"trainable": counts["deltatune"], "check_gap": gap,
            "check": float(ours.mean()) if ours.numel() > 1 else float(ours)}


def time_case(name: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Build the three configurations in this process, check fairness, time them interleaved."""
    torch.set_num_threads(settings["threads"])
    case = CASES[name]
    common.import_libraries(case.extra_imports)
    setups = {key: _build(name, settings, key) for key in KEYS}
    fair = check_fair(case, setups)
    load = [os.getloadavg()[0]]
    times = common.time_interleaved({k: s.step for k, s in setups.items()}, settings["warmup"], settings["rounds"])
    load.append(os.getloadavg()[0])
    per_step = {k: s.per_step for k, s in setups.items()}
    return {"fair": fair, "wall": times["wall"], "cpu": times["cpu"], "per_step": per_step, "load": load}


def summarize(case: Case, timing: dict[str, Any], memory: dict[str, dict[str, Any]] | None) -> dict[str, Any]:
    wall = timing["wall"]
    rows = {}
    for key in KEYS:
        values = [t / timing["per_step"][key] for t in wall[key]]
        rows[key] = {"median_ms": statistics.median(values) * 1e3, "min_ms": min(values) * 1e3,
                     "max_ms": max(values) * 1e3,
                     "x_reference": common.paired_ratio(wall[key], wall["reference"]),
                     "peak_mb": None if memory is None else memory[key].get("peak_rss")}
    ratios = {"time deltatune/peft": common.paired_ratio(wall["deltatune"], wall["peft"]),
              "time deltatune/reference": rows["deltatune"]["x_reference"],
              "time peft/reference": rows["peft"]["x_reference"]}
    if memory is not None and all(memory[k].get("peak_rss") is not None for k in KEYS):
        above = {k: memory[k]["peak_rss"] - memory["reference"]["peak_rss"] for k in ("deltatune", "peft")}
        ratios["memory above reference, deltatune/peft"] = above["deltatune"] / above["peft"] if above["peft"] > 0 \
            else float("nan")
    verdicts = []
    for target in case.targets:
        if target.measure == "time":
            value = common.paired_ratio(wall[target.numerator], wall[target.denominator])
        else:
            value = ratios.get("memory above reference, deltatune/peft")
        met = value is not None and value <= target.limit
        verdicts.append({"target": target.describe(), "value": value, "met": met})
    return {"rows": rows, "ratios": ratios, "targets": verdicts}


def markdown(results: dict[str, dict[str, Any]], settings: dict[str, Any]) -> str:
    lines = ["# `make bench` results", "",
             f"{time.strftime('%Y-%m-%d %H:%M')}, {settings['device']}, {settings['dtype']}, {settings['threads']} "
             f"threads, torch {torch.__version__}, {settings['rounds']} timed rounds after {settings['warmup']} "
             "warm-up rounds. Times are medians (min-max) per step (per generated token for `generate`); "
             "`x ref` is the median of per-round ratios to the reference; peak memory is above the process's "
             "memory after imports, in a fresh process per configuration.", ""]
    for name, result in results.items():
        case = CASES[name]
        lines += [f"## {name}", "", case.title + ".", ""]
        if "error" in result:
            lines += [f"Failed: `{result['error']}`", ""]
            continue
        summary, fair = result["summary"], result["timing"]["fair"]
        lines += ["| config | ms | min-max | x ref | peak MB |", "| --- | --- | --- | --- | --- |"]
        for key, row in summary["rows"].items():
            peak = "n/a" if row["peak_mb"] is None else f"{row['peak_mb']:.0f}"
            lines.append(f"| {key} | {row['median_ms']:.1f} | {row['min_ms']:.1f}-{row['max_ms']:.1f} | "
                         f"{row['x_reference']:.3f} | {peak} |")
        lines += ["", "Ratios: " + ", ".join(f"{k} {v:.3f}" for k, v in summary["ratios"].items()) + ".",
                  f"Checked first: {fair['trainable']:,} trainable parameters in both libraries; check values agree "
                  f"to {fair['check_gap']:.1e} (relative)."]
        for verdict in summary["targets"]:
            value = "n/a" if verdict["value"] is None else f"{verdict['value']:.3f}"
            lines.append(f"Target {verdict['target']}: {value}, {'met' if verdict['met'] else '**missed**'}.")
        load = max(result["timing"]["load"])
        if load > max(os.cpu_count() or 1, settings["threads"]) + 0.5:
            lines.append(f"Warning: load average {load:.1f}: other processes competed for the cores.")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--rounds", type=int, default=8, help="timed rounds (one step of each configuration)")
    parser.add_argument("--warmup", type=int, default=2, help="rounds dropped before timing")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every process")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--no-memory", action="store_true", help="skip the fresh-process memory runs")
    parser.add_argument("--markdown", default=str(HERE / "results.md"), help="where to write the table")
    args = parser.parse_args()
    settings = {k: getattr(args, k) for k in ("rounds", "warmup", "threads", "device", "dtype")}
    results: dict[str, dict[str, Any]] = {}
    for name in args.cases:
        case = CASES[name]
        print(f"[{name}] {case.title}", flush=True)
        try:
            memory = None
            if not args.no_memory and case.memory:
                memory = {key: common.in_fresh_process(memory_of, name, settings, key) for key in KEYS}
            timing = common.in_fresh_process(time_case, name, settings)
            summary = summarize(case, timing, memory)
        except Exception as err:  # one failing case must not hide the others
            results[name] = {"error": f"{type(err).__name__}: {err}"}
            print(f"  failed: {results[name]['error']}", flush=True)
            continue
        results[name] = {"timing": timing, "memory": memory, "summary": summary}
        for key, row in summary["rows"].items():
            peak = "" if row["peak_mb"] is None else f"  peak {row['peak_mb']:.0f} MB"
            print(f"  {key:<10} {row['median_ms']:9.1f} ms  x ref {row['x_reference']:.3f}{peak}", flush=True)
        for verdict in summary["targets"]:
            value = "n/a" if verdict["value"] is None else f"{verdict['value']:.3f}"
            print(f"  target {verdict['target']}: {value} {'met' if verdict['met'] else 'MISSED'}", flush=True)
    text = markdown(results, settings)
    Path(args.markdown).write_text(text + "\n")
    path = common.write_json(common.default_json_path("run"), {"settings": settings, "results": results})
    print(f"wrote {args.markdown} and {path}")
    if any("error" in r for r in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()

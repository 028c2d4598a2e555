"""What a run leaves for a person: metrics.jsonl (one JSON object per event), loss_curve.png and a summary table.

metrics.jsonl records are {"split": "train", "step", "epoch", "loss", "lr", "tokens_per_s"} after each
optimizer step and {"split": "eval", "step", "eval_loss", "perplexity", ["exact_match" | "accuracy"]}
before training (step 0), every eval_steps and at the end.
"""

from __future__ import annotations

import json
import math
import os
import resource
from typing import Any

import torch

from deltatune.checkpoint import atomic_write_text
from deltatune.trainer.config import ConfigError

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss_curve.png"
SUMMARY_FILE = "summary.json"


class MetricsLog:
    """Appends records to output_dir/metrics.jsonl (main process only; the caller decides)."""

    def __init__(self, output_dir: str) -> None:
        self.path = os.path.join(output_dir, METRICS_FILE)

    def append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict[str, Any]]:
        """The records; a last line cut short (a run killed mid-append, a full disk) is dropped."""
        if not os.path.isfile(self.path):
            return []
        with open(self.path, encoding="utf-8") as f:
            lines = f.readlines()
        records = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                if number == len(lines) and not line.endswith("\n"):
                    break
                raise ConfigError(f"{self.path} line {number} is not a JSON record ({err.msg}); delete the line "
                                  "or the file to go on.") from err
        return records

    def keep_until(self, step: int) -> None:
        """Drop records after `step`: a resumed run writes them again from its checkpoint on."""
        kept = [r for r in self.read() if r["step"] <= step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def clear(self) -> None:
        if os.path.exists(self.path):
            os.remove(self.path)


def plot_losses(records: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if r["split"] == "train"]
    evals = [(r["step"], r["eval_loss"]) for r in records if r["split"] == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def peak_memory() -> tuple[float, str]:
    """(bytes, what was measured): the accelerator's peak allocation, else the process's peak resident size."""
    if torch.cuda.is_available():
        return float(torch.cuda.max_memory_allocated()), "GPU memory allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0, "process peak RSS"


def _number(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _base_weights(summary: dict[str, Any]) -> str:
    """The base model's weights as loaded, and with quantization what they would take unquantized."""
    loaded, full = summary["base_weights_bytes"], summary["base_weights_full_precision_bytes"]
    if not summary.get("quantize") or summary["quantize"] == "none":
        return f"{loaded / 2**20:,.1f} MiB (not quantized)"
    return (f"{loaded / 2**20:,.1f} MiB quantized {summary['quantize']}, {full / 2**20:,.1f} MiB without "
            f"({full / max(loaded, 1):.2f}x)")


def summary_table(summary: dict[str, Any]) -> str:
    trainable, total = summary["trainable_params"], summary["total_params"]
    memory, what = summary["peak_memory_bytes"], summary["peak_memory_kind"]
    rows = [
        ("method", summary["method"]),
        ("trainable params", f"{trainable:,} of {total:,} ({100 * trainable / total:.4f}%)"),
        ("steps", f"{summary['steps']} ({summary['epochs']:.2f} epochs)"),
        ("wall time", f"{summary['wall_time_s']:.1f} s"),
        ("base weights", _base_weights(summary)),
        ("peak memory", f"{memory / 2**20:,.0f} MiB ({what})"),
    ]
    before, after = summary.get("eval_before") or {}, summary.get("eval_after") or {}
    keys = [k for k in ("eval_loss", "perplexity", "exact_match", "accuracy") if k in before or k in after]
    width = max(len(name) for name, _ in rows + [(k, "") for k in keys])
    lines = [f"  {name:<{width}}  {value}" for name, value in rows]
    if keys:
        lines.append(f"  {'':<{width}}  {'before':>10}  {'after':>10}")
        lines += [f"  {k:<{width}}  {_number(before.get(k)):>10}  {_number(after.get(k)):>10}" for k in keys]
    lines.append(f"  {'adapter' if summary['method'] != 'full' else 'model':<{width}}  {summary['saved_to']}")
    return "\n".join(["Training summary", *lines])


def write_summary(output_dir: str, summary: dict[str, Any]) -> None:
    from deltatune.checkpoint import atomic_write_text

    atomic_write_text(os.path.join(output_dir, SUMMARY_FILE), json.dumps(summary, indent=2) + "\n")

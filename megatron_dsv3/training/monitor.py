"""Per-step metrics: JSONL in the run directory, and PNG plots at the end."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


class MetricsLog:
    """Appends one JSON object per step to `<run_dir>/metrics.jsonl` and keeps them in memory."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "metrics.jsonl"
        self.path.unlink(missing_ok=True)
        self.records: list[dict] = []

    def write(self, record: dict) -> None:
        self.records.append(record)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def plot_losses(records: list[dict], path: Path) -> None:
    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("lm_loss", "LM loss"), ("mtp_loss", "MTP loss (mean over depths)")):
        values = [r.get(key) for r in records]
        if any(v is not None for v in values):
            ax.plot(steps, values, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_expert_load(records: list[dict], path: Path) -> None:
    """Top: MaxVio per MoE layer over steps. Below: tokens per expert over steps, one heat map a layer."""
    layers = list(records[-1].get("expert_load", {})) if records else []
    if not layers:
        return
    steps = [r["step"] for r in records]
    fig, axes = plt.subplots(1 + len(layers), 1, figsize=(8, 2.6 * (1 + len(layers))), squeeze=False)
    for layer in layers:
        axes[0, 0].plot(steps, [r["expert_load"][layer]["max_violation"] for r in records], label=layer)
    axes[0, 0].set_ylabel("MaxVio")
    axes[0, 0].legend(fontsize=7)
    axes[0, 0].grid(alpha=0.3)
    for row, layer in enumerate(layers, start=1):
        loads_SE = [r["expert_load"][layer]["tokens_per_expert"] for r in records]
        experts = len(loads_SE[0])
        image = axes[row, 0].imshow(
            list(map(list, zip(*loads_SE))), aspect="auto", interpolation="nearest", cmap="viridis",
            extent=(steps[0] - 0.5, steps[-1] + 0.5, experts - 0.5, -0.5),
        )
        axes[row, 0].set_ylabel(f"{layer}\nexpert")
        fig.colorbar(image, ax=axes[row, 0], label="tokens")
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

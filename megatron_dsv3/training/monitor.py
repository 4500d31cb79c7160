"""Per-step metrics: JSONL in the run directory, TensorBoard when installed, and PNG plots at the end."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


logger = logging.getLogger(__name__)


class MetricsLog:
    """Appends one JSON object per step to `<run_dir>/metrics.jsonl` and keeps them in memory.

    `tensorboard`: also write each record as TensorBoard events under `<run_dir>/tensorboard`
    (True: requires the `tensorboard` package; "auto": when it is installed; False: never).
    Every number at the top of a record becomes a scalar of the same name (lm_loss, mtp_loss,
    lr, grad_norm, max_violation, ..., and on the steps evaluated val_lm_loss, val_ppl,
    val_mtp_loss and the EMA's ema_val_*); each MoE layer of `record["expert_load"]` gives the
    scalar `max_violation/<layer>` and the histogram `tokens_per_expert/<layer>`, whose bar
    over expert index e is the number of tokens routed to expert e.
    """

    def __init__(self, run_dir: Path, tensorboard: bool | Literal["auto"] = "auto", keep_steps_up_to: int = 0):
        """`keep_steps_up_to`: a resumed run keeps the records of the steps its checkpoint
        covers (and drops later ones, written before the interruption); 0 starts afresh."""
        self.path = run_dir / "metrics.jsonl"
        self.records: list[dict] = []
        if keep_steps_up_to and self.path.exists():
            kept = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
            self.records = [record for record in kept if record["step"] <= keep_steps_up_to]
        self.path.write_text("".join(json.dumps(record) + "\n" for record in self.records))
        # a resumed run's events replace those written after its checkpoint
        self.tensorboard = open_tensorboard_writer(run_dir / "tensorboard", tensorboard, purge_step=keep_steps_up_to + 1 if keep_steps_up_to else None)

    def write(self, record: dict) -> None:
        self.records.append(record)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            write_tensorboard_record(self.tensorboard, record)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def open_tensorboard_writer(log_dir: Path, tensorboard: bool | Literal["auto"], purge_step: int | None = None):
    """A `torch.utils.tensorboard.SummaryWriter` on `log_dir`, or None (False, or "auto" without the package)."""
    if not (tensorboard is True or tensorboard is False or tensorboard == "auto"):
        raise ValueError(f'tensorboard={tensorboard!r}: expected True, False or "auto". Fix: pass one of those.')
    if tensorboard is False:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        if tensorboard == "auto":
            logger.info("tensorboard is not installed: metrics go to metrics.jsonl only (pip install tensorboard to add TensorBoard)")
            return None
        raise ImportError(
            f"tensorboard=True but TensorBoard is not importable ({error}). Fix: pip install tensorboard, "
            'or pass tensorboard="auto" (TensorBoard when installed) or False.'
        ) from error
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


def write_tensorboard_record(writer, record: dict) -> None:
    """One step's record as the scalars and histograms described in `MetricsLog`."""
    step = record["step"]
    for key, value in record.items():
        if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
            writer.add_scalar(key, value, step)
    for layer, load in record.get("expert_load", {}).items():
        writer.add_scalar(f"max_violation/{layer}", load["max_violation"], step)
        tokens = load["tokens_per_expert"]
        writer.add_histogram_raw(
            f"tokens_per_expert/{layer}",
            min=0, max=len(tokens) - 1, num=sum(tokens),
            sum=sum(e * n for e, n in enumerate(tokens)),
            sum_squares=sum(e * e * n for e, n in enumerate(tokens)),
            bucket_limits=[e + 0.5 for e in range(len(tokens))],
            bucket_counts=list(tokens),
            global_step=step,
        )
    writer.flush()


def plot_losses(records: list[dict], path: Path) -> None:
    """Training LM and MTP loss per step; the validation losses (the training weights', and the
    EMA's) at the steps evaluated, as markers on lines."""
    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("lm_loss", "training LM loss"), ("mtp_loss", "training MTP loss (mean over depths)")):
        values = [r.get(key) for r in records]
        if any(v is not None for v in values):
            ax.plot(steps, values, label=label)
    for key, label in (("val_lm_loss", "validation LM loss"), ("val_mtp_loss", "validation MTP loss"),
                       ("ema_val_lm_loss", "validation LM loss, EMA weights")):
        evaluated = [(r["step"], r[key]) for r in records if key in r]
        if evaluated:
            ax.plot(*zip(*evaluated), marker="o", markersize=3, linestyle="--", label=label)
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

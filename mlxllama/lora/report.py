"""The run's record: a JSON-lines loss log and a loss-curve PNG drawn from it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

LOG_FILE = "loss_log.jsonl"
PLOT_FILE = "loss_curve.png"


class LossLog:
    """Appends one JSON object per line: {"step", "train_loss", ...} or {"step", "val_loss", ...}."""

    def __init__(self, path: str | Path, keep_until: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if keep_until is None:  # a fresh run
            self.path.write_text("", encoding="utf-8")
        else:  # resuming: drop what came after the checkpoint
            kept = [r for r in read_log(self.path) if r.get("step", 0) <= keep_until]
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
            os.replace(tmp, self.path)

    def write(self, **record: Any) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def read_log(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
    return out


def plot_losses(log_path: str | Path, png_path: str | Path, title: str = "LoRA fine-tuning") -> Path | None:
    """Training and validation loss against the step; None when there is nothing to draw."""
    records = read_log(log_path)
    train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    valid = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if not train and not valid:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train", color="tab:blue", marker="." if len(train) < 40 else None)
    if valid:
        ax.plot(*zip(*valid), label="valid", color="tab:orange", marker="o")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (cross-entropy per token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png_path = Path(png_path)
    tmp = png_path.with_name(f".{png_path.stem}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, png_path)
    return png_path

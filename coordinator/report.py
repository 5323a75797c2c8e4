"""Per-round metrics from the sites' evaluation reports: per site and pooled, as rows, tables and a plot."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.table import Table

from coordinator.store import Evaluation
from edge_runtime.metrics import auroc_from_histograms

POOLED = "pooled"
WEIGHTED = ("accuracy", "brier", "log_loss")  # pooled as n-weighted means, which is exact for these


@dataclass(frozen=True)
class MetricRow:
    round: int  # the round that produced the evaluated model (0 = initial model)
    model_version: str
    site: str
    n: int
    auroc: float
    accuracy: float
    brier: float
    log_loss: float


def metric_rows(evaluations: list[Evaluation]) -> list[MetricRow]:
    """One row per (model, site) plus a pooled row per model; AUROC pooled from score histograms."""
    by_model: dict[tuple[int, str], list[Evaluation]] = {}
    for e in evaluations:
        by_model.setdefault((e.round, e.model_version), []).append(e)
    rows: list[MetricRow] = []
    for (round_no, version), evals in sorted(by_model.items()):
        n_total = 0.0
        sums = dict.fromkeys(WEIGHTED, 0.0)
        pos = np.zeros(0)
        neg = np.zeros(0)
        for e in sorted(evals, key=lambda e: e.device_id):
            m = json.loads(e.metrics)
            n = float(m.get("n", 0))
            rows.append(
                MetricRow(
                    round_no,
                    version,
                    e.device_id,
                    int(n),
                    float(m.get("auroc", float("nan"))),
                    float(m.get("accuracy", float("nan"))),
                    float(m.get("brier", float("nan"))),
                    float(m.get("log_loss", float("nan"))),
                )
            )
            n_total += n
            for k in WEIGHTED:
                sums[k] += n * float(m.get(k, 0.0))
            p = np.frombuffer(e.pos_hist, "<i8")
            q = np.frombuffer(e.neg_hist, "<i8")
            pos = p.astype(np.float64) if pos.size == 0 else pos + p
            neg = q.astype(np.float64) if neg.size == 0 else neg + q
        if n_total > 0:
            rows.append(
                MetricRow(
                    round_no,
                    version,
                    POOLED,
                    int(n_total),
                    auroc_from_histograms(pos, neg),
                    sums["accuracy"] / n_total,
                    sums["brier"] / n_total,
                    sums["log_loss"] / n_total,
                )
            )
    return rows


def pooled_by_round(rows: list[MetricRow]) -> dict[int, MetricRow]:
    return {r.round: r for r in rows if r.site == POOLED}


def rounds_table(rows: list[MetricRow], title: str = "Global model after each round (held-out, pooled)") -> Table:
    table = Table(title=title)
    for col in ("round", "model", "n", "AUROC", "accuracy", "Brier", "log loss"):
        table.add_column(col, justify="right" if col not in ("model",) else "left")
    for r in sorted(pooled_by_round(rows).values(), key=lambda r: r.round):
        table.add_row(
            str(r.round),
            r.model_version,
            str(r.n),
            f"{r.auroc:.4f}",
            f"{r.accuracy:.4f}",
            f"{r.brier:.4f}",
            f"{r.log_loss:.4f}",
        )
    return table


def sites_table(rows: list[MetricRow], round_no: int) -> Table:
    table = Table(title=f"Per-site held-out metrics of the model after round {round_no}")
    for col in ("site", "n", "AUROC", "accuracy", "Brier"):
        table.add_column(col, justify="left" if col == "site" else "right")
    for r in rows:
        if r.round == round_no:
            table.add_row(r.site, str(r.n), f"{r.auroc:.4f}", f"{r.accuracy:.4f}", f"{r.brier:.4f}")
    return table


def plot_rounds(rows: list[MetricRow], path: Path, title: str = "Federated training") -> Path:
    """PNG of AUROC and Brier score per round, pooled and per site."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    sites = sorted({r.site for r in rows})
    for site in sites:
        pts = sorted((r.round, r.auroc, r.brier) for r in rows if r.site == site)
        if not pts:
            continue
        x, auc, brier = zip(*pts, strict=True)
        style = {"linewidth": 2.6, "color": "black"} if site == POOLED else {"linewidth": 1.0, "alpha": 0.75}
        axes[0].plot(x, auc, marker="o", markersize=3, label=site, **style)
        axes[1].plot(x, brier, marker="o", markersize=3, label=site, **style)
    axes[0].set_ylabel("AUROC (held-out)")
    axes[1].set_ylabel("Brier score (held-out)")
    for ax in axes:
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

"""PNG plots of a pruning report: per-layer reconstruction error and sparsity, SparseLLM's per-round curves."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def write_plots(report: dict, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    layers = report["layers"]
    written = []
    fig, ax = plt.subplots(figsize=(7, 4))
    errors = [entry["recon_error"] for entry in layers]
    ax.plot([entry["index"] for entry in layers], errors, marker="o")
    if any(e > 0 for e in errors):  # sparsity 0 gives all-zero errors, which a log axis cannot show
        ax.set_yscale("log")
    ax.set(
        xlabel="decoder layer",
        ylabel="||Y - Y_pruned||² / ||Y||²",
        title=f"{report['method']} {report['sparsity']['target']}: layer output error on calibration data",
    )
    ax.grid(alpha=0.3)
    written.append(folder / "recon_error.png")
    fig.savefig(written[-1], dpi=110, bbox_inches="tight")
    plt.close(fig)
    written += _allocation(report, folder)
    written += _recovery(report, folder)
    curves = [(entry["index"], entry["mlp"]) for entry in layers if entry.get("mlp")]
    if curves:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        cmap = plt.get_cmap("viridis")
        for k, (index, mlp) in enumerate(curves):
            color = cmap(k / max(len(curves) - 1, 1))
            rounds = range(1, len(mlp["objective"]) + 1)
            axes[0].plot(rounds, mlp["objective"], color=color, label=f"layer {index}")
            first = max(mlp["output_error"][0], 1e-30)
            axes[1].plot(rounds, [e / first for e in mlp["output_error"]], color=color)
        axes[0].set(xlabel="round", ylabel="normalised objective", title="SparseLLM objective per layer")
        if any(v > 0 for _, mlp in curves for v in mlp["objective"]):
            axes[0].set_yscale("log")
        axes[1].set(
            xlabel="round",
            ylabel="MLP output error / round 1 (= SparseGPT)",
            title="real MLP output error, relative to SparseGPT",
        )
        for ax in axes:
            ax.grid(alpha=0.3)
            ax.set_xticks(list(rounds))
        if len(curves) <= 12:
            axes[0].legend(fontsize=7)
        written.append(folder / "sparsellm_rounds.png")
        fig.savefig(written[-1], dpi=110, bbox_inches="tight")
        plt.close(fig)
    return written


def _allocation(report: dict, folder: Path) -> list[Path]:
    """Each layer's sparsity target, when an allocation made them differ."""
    layers = report["layers"]
    targets = [entry.get("target", 0.0) for entry in layers]
    if len(set(targets)) < 2:
        return []
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar([entry["index"] for entry in layers], targets, color="tab:blue")
    ax.axhline(report["sparsity"]["target_fraction"], color="black", lw=1, label="overall target")
    title = f"per-layer sparsity ({report['config'].get('allocation')})"
    ax.set(xlabel="decoder layer", ylabel="sparsity", title=title, ylim=(min(targets) - 0.05, max(targets) + 0.05))
    ax.legend()
    path = folder / "allocation.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return [path]


def _recovery(report: dict, folder: Path) -> list[Path]:
    """The recovery's loss per step, with its learning rate."""
    curve = report.get("recovery", {}).get("curve")
    if not curve:
        return []
    fig, ax = plt.subplots(figsize=(7, 4))
    tokens = [s["tokens"] for s in curve]
    ax.plot(tokens, [s["loss"] for s in curve], color="C0")
    ax.set(xlabel="training tokens", ylabel=f"loss ({report['recovery']['config']['loss']})",
           title=f"recovery of {report['method']} {report['sparsity']['target']}")  # fmt: skip
    ax.grid(alpha=0.3)
    lr = ax.twinx()
    lr.plot(tokens, [s["lr"] for s in curve], color="C1", alpha=0.5)
    lr.set_ylabel("learning rate", color="C1")
    path = folder / "recovery.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return [path]

"""The figures every run logs: learning curves, expert usage, selected experts vs budget."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

from hfedmoe.platform.records import History


def learning_curves(history: History, path: Path) -> Path:
    """Test accuracy and loss against round and against simulated time."""
    evaluated = [r for r in history.rounds if r.test_loss is not None]
    # causal_lm with free-form answers evaluates loss and perplexity but no accuracy
    scored = [r for r in evaluated if r.accuracy is not None]
    fig = Figure(figsize=(13, 3.6))
    axes = fig.subplots(1, 3)
    axes[0].plot([r.round + 1 for r in scored], [r.accuracy for r in scored], marker="o")
    axes[0].set(xlabel="round", ylabel="test accuracy", ylim=(0, 1))
    axes[1].plot(
        [r.round + 1 for r in evaluated], [r.test_loss for r in evaluated], marker="o", label="test"
    )
    axes[1].plot(
        [r.round + 1 for r in history.rounds], [r.train_loss for r in history.rounds], label="train"
    )
    axes[1].set(xlabel="round", ylabel="loss")
    axes[1].legend()
    axes[2].plot([r.simulated_seconds for r in scored], [r.accuracy for r in scored], marker="o")
    axes[2].set(xlabel="simulated time (s)", ylabel="test accuracy", ylim=(0, 1))
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def usage_heatmap(history: History, path: Path) -> Path:
    """Mean expert usage u_c(e) (eq 16) of the sampled clients, per layer and expert."""
    usage = np.mean(history.usage, axis=0) if history.usage else np.zeros((1, 1))
    fig = Figure(figsize=(1.0 + 0.45 * usage.shape[1], 1.0 + 0.45 * usage.shape[0]))
    ax = fig.subplots()
    image = ax.imshow(usage, cmap="viridis", aspect="auto")
    ax.set(xlabel="expert", ylabel="MoE layer", title="mean expert usage u_c(e)")
    ax.set_xticks(range(usage.shape[1]))
    ax.set_yticks(range(usage.shape[0]))
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def usage_by_group_heatmap(history: History, path: Path) -> Path:
    """Mean expert usage u_c(e) of each client group (tier or C_budget quarter), every
    expert of every layer side by side: which experts weak and strong clients route to."""
    groups = history.usage_by_group()
    if groups:
        matrix = np.stack([usage.reshape(-1) for usage in groups.values()])
        layers, experts = next(iter(groups.values())).shape
    else:
        matrix, layers, experts = np.zeros((1, 1)), 1, 1
    fig = Figure(figsize=(min(20, max(8, 3 + 0.08 * matrix.shape[1])), 1.8 + 0.45 * len(matrix)))
    ax = fig.subplots()
    image = ax.imshow(matrix, cmap="viridis", aspect="auto", interpolation="nearest")
    for boundary in range(1, layers):
        ax.axvline(boundary * experts - 0.5, color="white", linewidth=0.8)
    ax.set(xlabel=f"expert ({layers} layers x {experts}, layer by layer)")
    ax.set_yticks(range(len(matrix)), list(groups) or ["(no client succeeded)"])
    ax.set_title("mean expert usage u_c(e) by client group")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def selected_vs_budget(history: History, path: Path) -> Path:
    """Experts trained per step against what each client's C_budget allows, by tier.

    The x axis counts experts over all layers (C_budget times the layers under the
    per_layer scope); failed clients are marked at zero.
    """
    fig = Figure(figsize=(5.5, 4))
    ax = fig.subplots()
    tiers = sorted({c.tier for c in history.clients})
    for tier in tiers:
        ok = [c for c in history.clients if c.tier == tier and c.failure is None]
        ax.scatter(
            [c.step_limit for c in ok], [c.experts_per_step for c in ok], label=tier, alpha=0.6
        )
        failed = [c for c in history.clients if c.tier == tier and c.failure is not None]
        if failed:
            ax.scatter(
                [c.step_limit for c in failed],
                [0] * len(failed),
                marker="x",
                color="red",
                alpha=0.6,
            )
    top = max([c.step_limit for c in history.clients] + [1])
    ax.plot([0, top], [0, top], color="grey", linestyle="--", linewidth=1, label="C_budget")
    ax.set(xlabel="experts a step may train (C_budget)", ylabel="experts trained per step")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path

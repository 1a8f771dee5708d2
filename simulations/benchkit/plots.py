"""The standard benchmark's plots: accuracy per round, teacher vs parameter average."""

from __future__ import annotations

import textwrap
from pathlib import Path

from benchkit.tables import row_label


def plot(results: dict[tuple, dict], path: Path) -> None:
    """Test accuracy per round, one panel per alpha; seeds of a method differ by line style."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alphas = sorted({key[1] for key in results})
    labels = sorted({key[0] for key in results})
    colours = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    styles = ["-", "--", ":", "-."]
    # Method labels are whole run-configs: the legend goes below the axes, wrapped,
    # and the saved image grows to hold it (bbox "tight") instead of covering curves.
    fig, axes = plt.subplots(1, len(alphas), figsize=(7 * len(alphas), 4.5), squeeze=False)
    for ax, alpha in zip(axes[0], alphas, strict=True):
        for key, metrics in sorted(results.items(), key=lambda kv: (kv[0][0], kv[0][2:])):
            if key[1] != alpha:
                continue
            # One colour per method; seeds of the same method differ by line style.
            seeds = sorted({k[2] for k in results if len(k) > 2 and k[0] == key[0]})
            style = styles[seeds.index(key[2]) % len(styles)] if len(key) > 2 else "-"
            rounds = [r["round"] for r in metrics["rounds"]]
            ax.plot(
                rounds,
                [100 * r["test-accuracy"] for r in metrics["rounds"]],
                marker=".",
                linestyle=style,
                color=colours[key[0]],
                label="\n".join(textwrap.wrap(row_label(key), 90)),
            )
        ax.set_title(f"alpha={alpha:g}")
        ax.set_xlabel("round")
        ax.set_ylabel("test accuracy (%)")
        ax.set_ylim(bottom=max(0, ax.get_ylim()[0]))
        ax.grid(alpha=0.3)
    fig.tight_layout()  # before the legends: they hang below, outside the layout
    for ax in axes[0]:
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), frameon=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)


def plot_teacher_vs_average(results: dict[tuple, dict], path: Path) -> None:
    """Teacher vs parameter-average validation accuracy per round, one panel per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(k for k in results if "teacher-val-accuracy" in results[k]["rounds"][-1])
    labels = sorted({k[0] for k in keys})
    if not labels:
        return
    fig, axes = plt.subplots(
        1, len(labels), figsize=(5 * len(labels), 4), squeeze=False, sharey=True
    )
    for ax, label in zip(axes[0], labels, strict=True):
        for i, key in enumerate(k for k in keys if k[0] == label):
            rounds = [r for r in results[key]["rounds"] if "teacher-val-accuracy" in r]
            x = [r["round"] for r in rounds]
            tag = f"alpha={key[1]:g}" + (f" s{key[2]}" if len(key) > 2 else "")
            ax.plot(
                x,
                [100 * r["teacher-val-accuracy"] for r in rounds],
                color=f"C{i}",
                marker=".",
                label=f"teacher {tag}",
            )
            ax.plot(
                x,
                [100 * r["student-start-val-accuracy"] for r in rounds],
                color=f"C{i}",
                linestyle="--",
                label=f"average {tag}",
            )
        ax.set_title("\n".join(textwrap.wrap(label, 50)), fontsize=8)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("validation accuracy (%)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)

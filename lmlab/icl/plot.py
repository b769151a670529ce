"""The accuracy-vs-shots curve: one line per retriever, solid uncalibrated, dashed contextual calibration,
dotted batch calibration, with ± one standard deviation over seeds as error bars. matplotlib is optional
(`pip install lmlab[plot]`, also in the dev extra) and imported only here."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from lmlab.errors import LmlabError

STYLES = {"acc": ("-", "uncalibrated"), "acc_calibrated": ("--", "contextual cal."),
          "acc_batch_calibrated": (":", "batch cal.")}


def plot_curve(rows: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Write a PNG of accuracy vs shots from `summarize` rows (atomically)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise LmlabError("--plot needs matplotlib, which is not installed (pip install 'lmlab[plot]')") from None
    from lmlab.utils.atomic import atomic_path

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for n, method in enumerate(dict.fromkeys(r["retriever"] for r in rows)):
        mine = sorted((r for r in rows if r["retriever"] == method), key=lambda r: r["shots"])
        for metric, (style, label) in STYLES.items():
            if not all(metric in r for r in mine):
                continue
            ax.errorbar([r["shots"] for r in mine], [r[metric] for r in mine],
                        yerr=[r[metric + "_std"] for r in mine], linestyle=style, marker="o", capsize=3,
                        color=colors[n % len(colors)], label=f"{method}, {label}")
    ax.set_xscale("symlog", linthresh=1)
    shots = sorted({r["shots"] for r in rows})
    ax.set_xticks(shots, [str(s) for s in shots])
    ax.set_xlabel("demonstrations (shots)")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path

"""The PNG beside the JSON: requests/s against p99 latency, one panel per case."""

from __future__ import annotations

from pathlib import Path

from load.wrk import Measurement


def plot(ms: list[Measurement], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = sorted({m.case for m in ms}, key=lambda k: (k.startswith("cnn"), int(k.split("x")[1])))
    fig, axes = plt.subplots(1, len(cases), figsize=(4.2 * len(cases), 3.8), squeeze=False)
    # One colour per server across all panels: a panel missing a server must not shift the rest.
    colours = {server: f"C{i}" for i, server in enumerate(dict.fromkeys(m.server for m in ms))}
    for ax, case in zip(axes[0], cases, strict=True):
        for server, colour in colours.items():
            pts = sorted(
                (m for m in ms if m.case == case and m.server == server),
                key=lambda m: m.concurrency,
            )
            if not pts:
                continue
            ax.plot(
                [m.p99_ms for m in pts],
                [m.requests_per_s for m in pts],
                marker="o",
                label=server,
                color=colour,
            )
            for m in pts:
                ax.annotate(f"c{m.concurrency}", (m.p99_ms, m.requests_per_s), fontsize=6)
        ax.set_xscale("log")
        ax.set_title(case.replace("x", ", samples/request: "), fontsize=9)
        ax.set_xlabel("p99 latency (ms, log)")
        ax.set_ylabel("requests/s")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)

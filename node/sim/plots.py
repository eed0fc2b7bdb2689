"""PNG charts of a scenario's figures (matplotlib, Agg backend: no display needed).

``plot(result, directory)`` draws, from the curves already in the result (so a
chart shows exactly what the JSON says): for a convergence scenario, the
fraction of live nodes that know the joiner against time since the join, one
line per loss rate; for a route scenario, the fraction that route the moved
address to its new host against time since the claim. Redundancy results are
drawn by node.sim.redundancy.plot_redundancy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TITLES = {
    "convergence": ("time since the join (s)", "fraction of live nodes that know the joiner"),
    "routes": ("time since the new claim (s)", "fraction of live nodes routing to the new host"),
}


def plot(result: dict[str, Any], directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    if result["kind"] == "redundancy":
        from node.sim.redundancy import plot_redundancy

        written: list[Path] = plot_redundancy(result["redundancy"], directory)
        return written
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xlabel, ylabel = TITLES[result["kind"]]
    figure, axes = plt.subplots(figsize=(7, 4.2), dpi=110)
    end = 0.0
    for run in result["runs"]:
        times = [point[0] for point in run["curve"]]
        fractions = [point[1] for point in run["curve"]]
        label = f"loss {run['loss'] * 100:.0f}%"
        if run["p9999_s"] is not None:
            label += f" (99.99% at {run['p9999_s']:.2f} s)"
            end = max(end, run["p9999_s"])
        else:
            reached = run["informed"] / run["population"] if run["population"] else 0.0
            label += f" (99.99% not reached; {reached:.1%} by {result['model']['seconds']:g} s)"
            end = max(end, times[-1])
        axes.plot(times, fractions, label=label, linewidth=1.8)
    anchor = result.get("serf_anchor", {}).get("p9999_s_by_loss", {})
    for loss, seconds in sorted(anchor.items()):
        axes.axvline(seconds, linestyle=":", color="grey", linewidth=1)
        text = f"Serf's anchor, {float(loss) * 100:.0f}% loss: {seconds} s"
        axes.text(seconds, 0.5, text, rotation=90, va="center", ha="right", fontsize=8, color="0.4")
        end = max(end, seconds)
    axes.set_xlim(0, end * 1.15 if end else None)
    axes.set_ylim(0, 1.02)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    nodes = result["model"]["nodes"]
    axes.set_title(f"{result['scenario']}: {nodes} nodes, seed {result['seed']}")
    axes.grid(True, alpha=0.3)
    axes.legend(loc="lower right")
    figure.tight_layout()
    path = directory / f"{result['scenario']}-{result['kind']}.png"
    figure.savefig(path)
    plt.close(figure)
    return [path]

"""Plot requests/s and p99 latency of the three servers from bench results.

Runs in the bench-only tools venv (matplotlib):

    bench/.venv-tools/bin/python bench/plot.py bench/out/results.json docs/performance.png

Bars are the median of the alternating rounds; dots are the single rounds.
"""

import json
import statistics
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SERVERS = (("ec2metaproxy", "ec2metaproxy", "tab:green"),
           ("reference", "stdlib reference", "tab:blue"),
           ("lyft", "Lyft metadataproxy", "tab:orange"))
MODES = (("new_connection", "new connection\nper request"), ("keep_alive", "keep-alive"))
METRICS = (("rps", "requests/s (higher is better)", "linear"),
           ("p99_ms", "p99 latency, ms, log scale (lower is better)", "log"))


def draw(axis, results, metric, title, scale):
    width = 0.8 / len(SERVERS)
    for index, (key, label, colour) in enumerate(SERVERS):
        for position, (mode, _) in enumerate(MODES):
            values = [r[metric] for r in results[mode][key]]
            x = position + (index - (len(SERVERS) - 1) / 2) * width
            axis.bar(x, statistics.median(values), width * 0.9, color=colour,
                     label=label if position == 0 else None)
            axis.plot([x] * len(values), values, "k.", markersize=4)
    axis.set_xticks(range(len(MODES)), [name for _, name in MODES])
    axis.set_yscale(scale)
    axis.set_title(title)
    axis.grid(axis="y", alpha=0.3)


def main():
    results_file, png = sys.argv[1], sys.argv[2]
    with open(results_file, encoding="utf-8") as f:
        results = json.load(f)
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for axis, (metric, title, scale) in zip(axes, METRICS):
        draw(axis, results, metric, title, scale)
    axes[0].legend(loc="upper left")
    s, m = results["settings"], results["machine"]
    figure.suptitle(f"Credential GETs from {s['containers']} containers, {s['concurrency']} concurrent "
                    f"({s['rounds']} rounds; {m['cores']} cores, Python {m['python']}, {m['date']})",
                    fontsize=10)
    figure.tight_layout()
    figure.savefig(png, dpi=110)


if __name__ == "__main__":
    main()

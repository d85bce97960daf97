"""Draws docs/benchmarks.png from a results JSON of bench.py (needs matplotlib: .bench-venv).

.bench-venv/bin/python benches/plot.py bench-results/bench-full-....json docs/benchmarks.png
"""

import json
import statistics
import sys

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt

STYLE = {
    'floor': {'color': 'black', 'linestyle': '--', 'marker': 'o'},
    'pyfloor': {'color': 'grey', 'linestyle': ':', 'marker': '.'},
    'dslaunch-pyhost': {'color': 'tab:olive', 'linestyle': ':', 'marker': '.'},
    'dslaunch': {'color': 'tab:green', 'marker': 'o'},
    'dslaunch+fix': {'color': 'tab:green', 'linestyle': ':', 'marker': 'x'},
    'torchrun': {'color': 'tab:orange', 'marker': 's'},
    'deepspeed': {'color': 'tab:blue', 'marker': '^'},
}
PANELS = [
    ('noop-true', 'wall', 'launch to exit: N × /bin/true'),
    ('noop-python', 'wall', 'launch to exit: N × python -c pass'),
    ('failure', 'latency', 'failure propagation:\nfailing rank exit → launcher exit'),
    ('sigterm', 'wall', 'SIGTERM → launcher, ranks and\ngrandchildren all gone'),
]


def main(src: str, dst: str) -> None:
    with open(src) as f:
        res = json.load(f)
    trials = res['trials']
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 4.2))
    for ax, (scen, metric, title) in zip(axes, PANELS):
        for name, style in STYLE.items():
            pts = []
            for n in sorted({t['n'] for t in trials if t['scenario'] == scen}):
                vals = [
                    t[metric]
                    for t in trials
                    if t['scenario'] == scen and t['n'] == n and t['launcher'] == name and t.get(metric) is not None
                ]
                if vals:
                    pts.append((n, statistics.median(vals), min(vals), max(vals)))
            if not pts:
                continue
            xs = [p[0] for p in pts]
            ys = [p[1] for p in pts]
            err = [[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]]
            ax.errorbar(xs, ys, yerr=err, label=name, capsize=3, **style)
        ax.set_xscale('log', base=2)
        ax.set_yscale('log')
        ax.set_xlabel('ranks (N)')
        ax.set_ylabel('seconds (median; bars: min–max)')
        ax.set_title(title, fontsize=10)
        ax.grid(True, which='both', alpha=0.3)
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
            break
    meta = res['meta']
    fig.suptitle(
        f'dslaunch vs peers and the floor — {meta["versions"].get("cpus")} CPUs, shared machine, '
        f'{meta["reps"]} reps interleaved ({meta["date"][:10]})',
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(dst, dpi=110)
    print(f'chart: {dst}')


if __name__ == '__main__':
    main(sys.argv[1], sys.argv[2])

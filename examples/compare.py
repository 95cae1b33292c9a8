"""Trains softmax, double and hybrid attention on the examples over several
seeds and writes a markdown table (mean +- std) and plots.

Each run is a fresh process of the example script; its outputs stay in
OUTPUT_DIR/EXAMPLE/ATTENTION/seedN. Extra arguments per example with --set:

    python examples/compare.py --seeds 0 1 2 --set text "--epochs 2" --output-dir runs/compare
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
EXAMPLES = {
    "digits": ("digits.py", [("test_accuracy", "accuracy", max)]),
    "text": ("text_classification.py", [("test_accuracy", "accuracy", max),
                                         ("test_macro_f1", "macro F1", max)]),
    "g2p": ("grapheme_to_phoneme.py", [("test_word_error_rate", "WER", min),
                                       ("test_phoneme_error_rate", "PER", min)]),
}
ATTENTIONS = ("single", "double", "hybrid")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", nargs="+", choices=list(EXAMPLES), default=list(EXAMPLES))
    p.add_argument("--attention", nargs="+", choices=ATTENTIONS, default=list(ATTENTIONS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--set", nargs=2, action="append", default=[], metavar=("EXAMPLE", "ARGS"),
                   help='extra arguments for one example, e.g. --set g2p "--epochs 4"')
    p.add_argument("--output-dir", default="runs/compare")
    return p.parse_args(argv)


def run_example(example, attention, seed, extra, output_dir):
    """Runs one training unless its metrics already exist; returns them."""
    metrics_file = output_dir / "metrics.json"
    if not metrics_file.exists():
        command = [sys.executable, str(HERE / EXAMPLES[example][0]), "--attention", attention,
                   "--seed", str(seed), "--output-dir", str(output_dir), *extra]
        print("+", " ".join(command), flush=True)
        with open(output_dir.parent / f"seed{seed}.log", "w") as log:
            subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT,
                           env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    return json.loads(metrics_file.read_text())


def mean_std(values):
    return f"{np.mean(values):.4f} ± {np.std(values):.4f}"


def table(results, examples, attentions):
    lines = []
    for example in examples:
        columns = EXAMPLES[example][1]
        lines.append(f"**{example}**\n")
        lines.append("| attention | " + " | ".join(label for _, label, _ in columns)
                     + " | min column sum | keys below DNA bound | keys below 0.1 |")
        lines.append("|---" * (len(columns) + 4) + "|")
        for attention in attentions:
            runs = results[example][attention]
            cells = [mean_std([r[key] for r in runs]) for key, _, _ in columns]
            stats = [r["explaining_away"] for r in runs]
            cells += [
                mean_std([s["min_column_sum"] for s in stats]),
                f"{100 * np.mean([s['share_below_bound'] for s in stats]):.2f}%",
                f"{100 * np.mean([s['share_below_threshold'] for s in stats]):.2f}%",
            ]
            lines.append(f"| {attention} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(results, column_sums, examples, attentions, seed, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, len(examples), figsize=(5 * len(examples), 8), squeeze=False)
    for col, example in enumerate(examples):
        key, label, _ = EXAMPLES[example][1][0]
        values = [[r[key] for r in results[example][a]] for a in attentions]
        axes[0, col].bar(attentions, [np.mean(v) for v in values],
                         yerr=[np.std(v) for v in values], capsize=4, color="tab:green")
        axes[0, col].set_title(f"{example}: test {label} (mean ± std over seeds)")
        low = min(min(v) for v in values)
        axes[0, col].set_ylim(max(0.0, low - 0.1 * abs(low) - 0.02), None)
        for attention in attentions:
            axes[1, col].hist(column_sums[example][attention], bins=60, histtype="step",
                              label=attention, density=True)
        axes[1, col].set_yscale("log")
        axes[1, col].set_xlabel("attention received per key (column sum)")
        axes[1, col].set_title(f"{example}: column sums, seed {seed}")
        axes[1, col].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv=None):
    args = parse_args(argv)
    extras = {example: extra.split() for example, extra in args.set}
    root = pathlib.Path(args.output_dir)
    results, column_sums = {}, {}
    for example in args.examples:
        results[example], column_sums[example] = {}, {}
        for attention in args.attention:
            runs = []
            for seed in args.seeds:
                output_dir = root / example / attention / f"seed{seed}"
                output_dir.mkdir(parents=True, exist_ok=True)
                runs.append(run_example(example, attention, seed, extras.get(example, []), output_dir))
            results[example][attention] = runs
            sums = np.load(root / example / attention / f"seed{args.seeds[0]}" / "column_sums.npz")
            column_sums[example][attention] = np.concatenate([sums[k] for k in sums.files])
    markdown = table(results, args.examples, args.attention)
    command = "python examples/compare.py " + " ".join(
        arg if " " not in arg else f'"{arg}"' for arg in (argv if argv is not None else sys.argv[1:])
    )
    (root / "comparison.md").write_text(f"Command: `{command}`\n\n{markdown}\n")
    plot(results, column_sums, args.examples, args.attention, args.seeds[0], root / "comparison.png")
    print(markdown)
    print(f"table and plots in {root}")


if __name__ == "__main__":
    main()

"""Chooses the null query's initial log-mass: g2p trained from several values.

Each (value, seed) is a fresh process of examples/grapheme_to_phoneme.py with
`--attention double+null --null-init VALUE`; the table gives the mean over
seeds of the final validation loss and accuracy and of the test word and
phoneme error rates.

    python benchmarks/null_query_init.py --values -4 -2 0 2 4 --seeds 0 1 --limit 10000 --epochs 4
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
COLUMNS = [("val_loss", "final val loss"), ("val_accuracy", "final val accuracy"),
           ("test_word_error_rate", "test WER"), ("test_phoneme_error_rate", "test PER")]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--values", type=float, nargs="+", default=[-4.0, -2.0, 0.0, 2.0, 4.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--limit", type=int, default=10000)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--output-dir", default="runs/null_query_init")
    return p.parse_args(argv)


def run(value, seed, args, output_dir):
    metrics_file = output_dir / "metrics.json"
    if not metrics_file.exists():
        command = [
            sys.executable, str(ROOT / "examples" / "grapheme_to_phoneme.py"),
            "--attention", "double+null", "--null-init", str(value), "--seed", str(seed),
            "--limit", str(args.limit), "--epochs", str(args.epochs),
            "--output-dir", str(output_dir),
        ]
        print("+", " ".join(command), flush=True)
        with open(output_dir / "log.txt", "w") as log:
            subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT,
                           env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    metrics = json.loads(metrics_file.read_text())
    return {key: metrics["history"][key][-1] if key in metrics["history"] else metrics[key]
            for key, _ in COLUMNS}


def main(argv=None):
    args = parse_args(argv)
    root = pathlib.Path(args.output_dir)
    lines = ["| initial beta | " + " | ".join(label for _, label in COLUMNS) + " |",
             "|---" * (len(COLUMNS) + 1) + "|"]
    for value in args.values:
        results = []
        for seed in args.seeds:
            output_dir = root / f"beta{value:g}" / f"seed{seed}"
            output_dir.mkdir(parents=True, exist_ok=True)
            results.append(run(value, seed, args, output_dir))
        cells = [f"{np.mean([r[key] for r in results]):.4f} ± {np.std([r[key] for r in results]):.4f}"
                 for key, _ in COLUMNS]
        lines.append(f"| {value:g} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    (root / "table.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()

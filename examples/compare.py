"""Trains named attention configurations on the examples and compares them.

Over several seeds; writes a markdown table, paired differences to a
baseline, and plots.

A configuration is NAME=SPEC, SPEC being what the examples take as
--attention: one choice for every site (single, double, hybrid, each
optionally with +null) or SITE=CHOICE,... over the sites encoder, decoder and
cross (sites not named: double). Default:

    --configs softmax=single dna=double dna-encoders=encoder=double,decoder=single,cross=single
              dna-null=double+null hybrid=hybrid

An example runs each spec on the sites it has (digits and text: the encoder
only; lm: the decoder only). A configuration that is then the same as an earlier one on that
example (dna-encoders is dna on digits) is not run again there: it is left
out of that example's table with a note.

Each run is a fresh process of the example script; its outputs stay in
OUTPUT_DIR/EXAMPLE/CONFIG/seedN, and a run whose metrics.json exists is not
repeated. Extra arguments per example with --set:

    python examples/compare.py --seeds 0 1 2 --set text "--epochs 2" --output-dir runs/compare

comparison.md: per example and configuration, mean ± std over seeds of the
test metrics and of the explaining-away statistics and, for every
configuration but the first (the baseline), the mean difference to the
baseline of the main metric, paired by seed, with a 95% confidence interval
of a paired t-test; * marks intervals that exclude 0. comparison.png: the
main metric and the column sums; curves_EXAMPLE.png: training and validation
loss and accuracy per epoch, mean over seeds, to see whether training
converged.
"""

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402

EXAMPLES = {
    "digits": ("digits.py", [("test_accuracy", "accuracy", max)]),
    "text": ("text_classification.py", [("test_accuracy", "accuracy", max),
                                         ("test_macro_f1", "macro F1", max)]),
    "g2p": ("grapheme_to_phoneme.py", [("test_word_error_rate", "WER", min),
                                       ("test_phoneme_error_rate", "PER", min)]),
    "lm": ("tweet_lm.py", [("test_perplexity", "perplexity", min)]),
}
DEFAULT_CONFIGS = (
    "softmax=single",
    "dna=double",
    "dna-encoders=encoder=double,decoder=single,cross=single",
    "dna-null=double+null",
    "hybrid=hybrid",
)
# Names become directories.
CONFIG_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")
# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom.
T_95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
        2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
        2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
NORMAL_95 = 1.960


def config_argument(text):
    """NAME=SPEC -> (name, common.AttentionSpec over all sites)."""
    name, equals, spec = text.partition("=")
    if not equals or not CONFIG_NAME.fullmatch(name):
        raise argparse.ArgumentTypeError(
            f"malformed configuration {text!r}: expected NAME=SPEC (e.g. dna=double), "
            "NAME of letters, digits, '_', '.', '+' and '-'"
        )
    if name in common.SITES:
        raise argparse.ArgumentTypeError(
            f"configuration {text!r} is named after the site {name!r}; "
            f"give it a name: NAME=SPEC, e.g. mine={text}"
        )
    try:
        return name, common.AttentionSpec.parse(spec, common.SITES)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"configuration {name!r}: {error}") from None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", nargs="+", choices=list(EXAMPLES), default=list(EXAMPLES))
    p.add_argument("--configs", nargs="+", type=config_argument, metavar="NAME=SPEC",
                   default=[config_argument(c) for c in DEFAULT_CONFIGS],
                   help="named --attention specs, the first the baseline (default: "
                   + " ".join(DEFAULT_CONFIGS) + ")")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--set", nargs=2, action="append", default=[], metavar=("EXAMPLE", "ARGS"),
                   help='extra arguments for one example, e.g. --set g2p "--epochs 4"')
    p.add_argument("--output-dir", default="runs/compare")
    args = p.parse_args(argv)
    names = [name for name, _ in args.configs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        p.error(f"configuration names must differ; repeated: {', '.join(repeated)}")
    return args


def example_configs(example, configs):
    """The configurations run on `example`, {name: spec on its sites}, and
    those equal there to an earlier one, {name: that one's name}."""
    sites = common.EXAMPLE_SITES[example]
    run, same = {}, {}
    for name, spec in configs:
        spec = spec.restricted(sites)
        earlier = [other for other, chosen in run.items() if chosen == spec]
        if earlier:
            same[name] = earlier[0]
        else:
            run[name] = spec
    return run, same


def run_example(example, attention, seed, extra, output_dir):
    """Runs one training unless its metrics already exist; returns them."""
    metrics_file = output_dir / "metrics.json"
    if not metrics_file.exists():
        output_dir.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, str(HERE / EXAMPLES[example][0]), "--attention", str(attention),
                   "--seed", str(seed), "--output-dir", str(output_dir), *extra]
        print("+", " ".join(command), flush=True)
        log = output_dir.parent / f"seed{seed}.log"
        with open(log, "w") as handle:
            finished = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT,
                                      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
        if finished.returncode:
            raise SystemExit(f"{example} with --attention {attention} failed; see {log}")
    metrics = json.loads(metrics_file.read_text())
    # A configuration renamed or changed would otherwise resume another's runs.
    if metrics["attention"] != str(attention):
        raise SystemExit(
            f"{metrics_file} was trained with --attention {metrics['attention']}, not "
            f"{attention}: remove it or give the configuration another name"
        )
    return metrics


def t_quantile_95(degrees_of_freedom):
    """Two-sided 95% quantile of Student's t distribution."""
    if degrees_of_freedom < 1:
        raise ValueError(f"degrees of freedom must be at least 1, got {degrees_of_freedom}")
    return T_95[degrees_of_freedom - 1] if degrees_of_freedom <= len(T_95) else NORMAL_95


def paired_difference(values, baseline):
    """Mean of `values - baseline` (paired, e.g. by seed) and its 95% confidence
    interval from a paired t-test, or None with a single pair."""
    differences = np.subtract(values, baseline)
    mean = float(np.mean(differences))
    if len(differences) < 2:
        return mean, None
    half = t_quantile_95(len(differences) - 1) * np.std(differences, ddof=1)
    half /= np.sqrt(len(differences))
    return mean, (mean - half, mean + half)


def difference_cell(values, baseline):
    mean, interval = paired_difference(values, baseline)
    if interval is None:
        return f"{mean:+.4f} (one seed)"
    low, high = interval
    excludes_zero = low > 0 or high < 0
    return f"{mean:+.4f} [{low:+.4f}, {high:+.4f}]" + (" *" if excludes_zero else "")


def mean_std(values):
    return f"{np.mean(values):.4f} ± {np.std(values):.4f}"


def example_table(example, runs, specs, same):
    """Markdown rows of one example; `runs` maps config names to their runs."""
    columns = EXAMPLES[example][1]
    main_key, main_label, _ = columns[0]
    baseline = next(iter(runs))
    # Causal self-attention (a decoder) has a ceiling to report.
    ceiling = "decoder" in common.EXAMPLE_SITES[example]
    ceiling_labels = " | decoder rows at the ceiling | max weight on an earlier token" if ceiling else ""
    lines = [
        f"**{example}**\n",
        "| config | attention | " + " | ".join(label for _, label, _ in columns)
        + f" | min column sum | keys below DNA bound | keys below 0.1{ceiling_labels} "
        f"| Δ {main_label} vs {baseline} (95% CI) |",
        "|---" * (len(columns) + 6 + 2 * ceiling) + "|",
    ]
    for name, config_runs in runs.items():
        cells = [name, str(specs[name])]
        cells += [mean_std([r[key] for r in config_runs]) for key, _, _ in columns]
        stats = [r["explaining_away"] for r in config_runs]
        cells += [
            mean_std([s["min_column_sum"] for s in stats]),
            f"{100 * np.mean([s['share_below_bound'] for s in stats]):.2f}%",
            f"{100 * np.mean([s['share_below_threshold'] for s in stats]):.2f}%",
        ]
        if ceiling:
            ceilings = [s["causal_ceiling"] for s in stats]
            cells += [
                f"{100 * np.mean([c['diagonal_max_share'] for c in ceilings]):.1f}%",
                f"{max(c['max_earlier_weight'] for c in ceilings):.3f}",
            ]
        cells += [
            "baseline" if name == baseline else difference_cell(
                [r[main_key] for r in config_runs], [r[main_key] for r in runs[baseline]]
            ),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Δ: configuration minus baseline, paired by seed; * the 95% interval "
              f"excludes 0. Curves: curves_{example}.png."]
    if ceiling:
        lines += ["Decoder rows at the ceiling: the share of causal self-attention rows "
                  "(per head) whose largest weight is on the token itself; max weight on "
                  "an earlier token: the largest over seeds (at most 0.5 at the ceiling)."]
    lines += [f"{name}: the same as {earlier} on {example} (sites: "
              f"{', '.join(common.EXAMPLE_SITES[example])}), not run again."
              for name, earlier in same.items()]
    return "\n".join(lines + [""])


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(results, column_sums, seed, path):
    plt = pyplot()
    figure, axes = plt.subplots(2, len(results), figsize=(5 * len(results), 8), squeeze=False)
    for col, (example, runs) in enumerate(results.items()):
        key, label, _ = EXAMPLES[example][1][0]
        values = [[r[key] for r in config_runs] for config_runs in runs.values()]
        axes[0, col].bar(list(runs), [np.mean(v) for v in values],
                         yerr=[np.std(v) for v in values], capsize=4, color="tab:green")
        axes[0, col].tick_params(axis="x", labelrotation=30)
        axes[0, col].set_title(f"{example}: test {label} (mean ± std over seeds)")
        low = min(min(v) for v in values)
        axes[0, col].set_ylim(max(0.0, low - 0.1 * abs(low) - 0.02), None)
        for name, sums in column_sums[example].items():
            axes[1, col].hist(sums, bins=60, histtype="step", label=name, density=True)
        axes[1, col].set_yscale("log")
        axes[1, col].set_xlabel("attention received per key (column sum)")
        axes[1, col].set_title(f"{example}: column sums, seed {seed}")
        axes[1, col].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def mean_curve(runs, key):
    """The mean over runs of one history entry, over the epochs all runs have."""
    curves = [r["history"][key] for r in runs]
    epochs = min(len(c) for c in curves)
    return np.arange(1, epochs + 1), np.mean([c[:epochs] for c in curves], axis=0)


def plot_curves(example, runs, path):
    """Validation (solid) and training (dashed) curves, one colour per configuration."""
    plt = pyplot()
    history = next(iter(runs.values()))[0]["history"]
    metrics = [key.removeprefix("val_") for key in history if key.startswith("val_")]
    figure, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4.5), squeeze=False)
    for axis, metric in zip(axes[0], metrics):
        for index, (name, config_runs) in enumerate(runs.items()):
            colour = f"C{index}"
            axis.plot(*mean_curve(config_runs, f"val_{metric}"), "-", color=colour, label=name)
            axis.plot(*mean_curve(config_runs, metric), "--", color=colour)
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
        axis.set_title(f"{example}: {metric}, validation (solid), training (dashed)")
        axis.legend(title="mean over seeds")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def run_configs(example, specs, args, root):
    """Runs every configuration of `example` over the seeds: {name: runs}."""
    extra = dict(args.set).get(example, "").split()
    return {
        name: [run_example(example, spec, seed, extra, root / example / name / f"seed{seed}")
               for seed in args.seeds]
        for name, spec in specs.items()
    }


def first_seed_column_sums(example, names, seed, root):
    sums = {}
    for name in names:
        saved = np.load(root / example / name / f"seed{seed}" / "column_sums.npz")
        sums[name] = np.concatenate([saved[k] for k in saved.files])
    return sums


def main(argv=None):
    args = parse_args(argv)
    root = pathlib.Path(args.output_dir)
    results, column_sums, tables = {}, {}, []
    for example in args.examples:
        specs, same = example_configs(example, args.configs)
        for name, earlier in same.items():
            print(f"note: {name} is {earlier} on {example}; not run again", flush=True)
        results[example] = run_configs(example, specs, args, root)
        column_sums[example] = first_seed_column_sums(example, specs, args.seeds[0], root)
        tables.append(example_table(example, results[example], specs, same))
        plot_curves(example, results[example], root / f"curves_{example}.png")
    markdown = "\n".join(tables)
    command = "python examples/compare.py " + " ".join(
        arg if " " not in arg else f'"{arg}"' for arg in (argv if argv is not None else sys.argv[1:])
    )
    (root / "comparison.md").write_text(f"Command: `{command}`\n\n{markdown}\n")
    plot(results, column_sums, args.seeds[0], root / "comparison.png")
    print(markdown)
    print(f"table and plots in {root}")


if __name__ == "__main__":
    main()

"""Command line, strategy and metrics shared by the examples."""

import argparse
import dataclasses
import json
import pathlib
import time

import keras

import keras_dna

# Where an example has attention: encoder self-attention, decoder
# self-attention (causal) and decoder cross-attention.
SITES = ("encoder", "decoder", "cross")
EXAMPLE_SITES = {
    "digits": ("encoder",), "text": ("encoder",), "g2p": SITES, "lm": ("decoder",),
    # The diagnostic's slots read the points by cross-attention.
    "explaining_away": ("cross",),
}
DEFAULT_CHOICE = "double"
SCHEDULES = ("cosine", "constant")
WARMUP_FRACTION = 0.05
WEIGHT_DECAY = 1e-4
# DNA's per-head logits, which weight decay would pull to 0: not a neutral
# value for them (a null query of log-mass 0; a 50/50 hybrid mix), only an
# arbitrary point. Keras matches these against variable names.
NOT_WEIGHT_DECAYED = ("null_query_logits", "mixing_logits")
NULL_SUFFIX = "+null"


@dataclasses.dataclass(frozen=True)
class SiteAttention:
    """The attention of one site: a normalization, with or without a null query."""

    normalization: str = DEFAULT_CHOICE
    null_query: bool = False
    # The null query logits' initial value; None: the layer's default.
    null_init: float = None

    @classmethod
    def parse(cls, text):
        """`single`, `double` or `hybrid`, each optionally followed by `+null`."""
        normalization = text.removesuffix(NULL_SUFFIX)
        if normalization not in keras_dna.ops.NORMALIZATIONS:
            raise ValueError(
                f"unknown attention {text!r}; allowed: "
                f"{', '.join(keras_dna.ops.NORMALIZATIONS)}, each optionally with {NULL_SUFFIX}"
            )
        null_query = normalization != text
        if null_query and normalization == "single":
            raise ValueError(
                f"{text!r}: the null query joins double normalization's per-key "
                f"step, which softmax has not; use double{NULL_SUFFIX} or hybrid{NULL_SUFFIX}"
            )
        return cls(normalization, null_query)

    def layer_kwargs(self):
        """Keyword arguments of `DoublyNormalizedAttention` for this site."""
        kwargs = {"normalization": self.normalization, "null_query": self.null_query}
        if self.null_query and self.null_init is not None:
            kwargs["null_query_initializer"] = keras.initializers.Constant(self.null_init)
        return kwargs

    def __str__(self):
        return self.normalization + (NULL_SUFFIX if self.null_query else "")


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """The attention of each site of one model: `choices` holds pairs
    (site, SiteAttention) in the order of `SITES`."""

    choices: tuple

    @classmethod
    def parse(cls, text, sites):
        """Parses `CHOICE` (every site) or `SITE=CHOICE,...` (others: double).

        Raises:
            ValueError: naming what is wrong and what is allowed.
        """
        text = text.strip()
        if "=" not in text:
            if not text or "," in text:
                raise ValueError(
                    f"malformed attention {text!r}: expected one choice or SITE=CHOICE,..."
                )
            choice = SiteAttention.parse(text)
            return cls(tuple((site, choice) for site in sites))
        chosen = {}
        for entry in text.split(","):
            site, equals, choice = (part.strip() for part in entry.partition("="))
            if not (equals and site and choice) or "=" in choice:
                raise ValueError(f"malformed entry {entry!r} in {text!r}: expected SITE=CHOICE")
            if site not in sites:
                raise ValueError(
                    f"unknown site {site!r} in {text!r}; this example has: {', '.join(sites)}"
                )
            if site in chosen:
                raise ValueError(f"site {site!r} given twice in {text!r}")
            chosen[site] = SiteAttention.parse(choice)
        return cls(tuple((site, chosen.get(site, SiteAttention())) for site in sites))

    @classmethod
    def of(cls, attention, sites):
        """`attention` itself, or parsed if it is a string."""
        return cls.parse(attention, sites) if isinstance(attention, str) else attention

    def __getitem__(self, site):
        return dict(self.choices)[site]

    def layer_kwargs(self, site):
        """Keyword arguments of `DoublyNormalizedAttention` at `site`."""
        return self[site].layer_kwargs()

    def with_null_init(self, null_init):
        """This spec, its null queries starting at `null_init` (None: the default)."""
        return AttentionSpec(tuple(
            (site, dataclasses.replace(choice, null_init=null_init)) for site, choice in self.choices
        ))

    def restricted(self, sites):
        """This spec without the sites not in `sites` (a model lacking them)."""
        return AttentionSpec(tuple((s, a) for s, a in self.choices if s in sites))

    def __str__(self):
        """The canonical form: one choice when every site agrees, else SITE=CHOICE,..."""
        distinct = {str(a) for _, a in self.choices}
        if len(distinct) == 1:
            return distinct.pop()
        return ",".join(f"{site}={a}" for site, a in self.choices)


def attention_argument(sites):
    """An argparse `type` parsing an attention spec for `sites`."""

    def attention(text):
        try:
            return AttentionSpec.parse(text, sites)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return attention


def _example_spec(sites):
    return ",".join(f"{s}={c}" for s, c in zip(sites, ("single", "double+null", "hybrid")))


class _Parser(argparse.ArgumentParser):
    """Folds `--null-init` into the attention spec it modifies."""

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(args, namespace)
        parsed.attention = parsed.attention.with_null_init(parsed.null_init)
        return parsed


def parser(description, example, epochs, batch_size, learning_rate, output_dir):
    """The arguments every example takes; `example` names its attention sites."""
    sites = EXAMPLE_SITES[example]
    p = _Parser(description=description)
    p.add_argument(
        "--attention", type=attention_argument(sites), default=DEFAULT_CHOICE, metavar="SPEC",
        help="single (softmax), double (DNA) or hybrid, each optionally with +null "
        "(a null query), for every attention layer; or per site, comma-separated "
        f"SITE=CHOICE with SITE in {', '.join(sites)}, sites not named taking "
        f"{DEFAULT_CHOICE} (e.g. {_example_spec(sites)})",
    )
    p.add_argument("--null-init", type=float, default=None, metavar="BETA",
                   help="initial null query log-mass of the +null sites "
                   "(default: the layer's null_query_initializer)")
    p.add_argument("--strategy", choices=keras_dna.distribute.SPECS, default="auto",
                   help="distribution strategy (see keras_dna.distribute)")
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--learning-rate", type=float, default=learning_rate, metavar="RATE",
                   help="the peak learning rate of --schedule")
    p.add_argument("--schedule", choices=SCHEDULES, default="cosine",
                   help="learning rate: cosine (a linear warm-up over the first "
                   f"{WARMUP_FRACTION:.0%} of the steps, then cosine decay to zero "
                   "at the last epoch) or constant")
    p.add_argument("--batch-size", type=int, default=batch_size, help="global batch size")
    p.add_argument("--seed", type=int, default=0, help="initialization and shuffling seed")
    p.add_argument("--limit", type=int, default=None,
                   help="use only this many examples (for quick runs)")
    p.add_argument("--output-dir", default=output_dir)
    return p


def batches(features, targets, batch_size, shuffle, seed, transform=None):
    """A tf.data pipeline; training batches are whole (static shapes, as TPUs require)."""
    import tensorflow as tf

    data = tf.data.Dataset.from_tensor_slices((features, targets))
    if shuffle:
        data = data.shuffle(len(targets), seed=seed)
    data = data.batch(batch_size, drop_remainder=shuffle)
    if transform is not None:
        data = data.map(transform)
    return data.prefetch(tf.data.AUTOTUNE)


def learning_rate_schedule(schedule, peak, total_steps):
    """`peak` throughout ("constant"), or warmed up to `peak` and decayed to
    zero by `total_steps` ("cosine"): decaying to zero settles the weights at
    the end of a fixed epoch budget instead of leaving them wherever a
    constant rate has them (whether the budget suffices is another matter)."""
    if schedule == "constant":
        return peak
    warmup_steps = max(1, int(WARMUP_FRACTION * total_steps))
    return keras.optimizers.schedules.CosineDecay(
        0.0, max(1, total_steps - warmup_steps), warmup_target=peak, warmup_steps=warmup_steps
    )


def adamw(learning_rate):
    """The examples' optimizer: AdamW, decaying every weight but DNA's
    per-head logits (`NOT_WEIGHT_DECAYED`)."""
    optimizer = keras.optimizers.AdamW(learning_rate, weight_decay=WEIGHT_DECAY)
    optimizer.exclude_from_weight_decay(var_names=list(NOT_WEIGHT_DECAYED))
    return optimizer


def compile_and_fit(run, build, train_data, validation_data, loss=None, metrics=("accuracy",)):
    """Builds the model in the strategy's scope and trains it with `fit` at
    `--learning-rate` under `--schedule`; the loss defaults to cross-entropy
    of logits. `train_data`: a tf.data.Dataset of known length."""
    total_steps = int(train_data.cardinality()) * run.args.epochs
    if total_steps <= 0:
        raise ValueError("compile_and_fit: train_data must be a dataset of known, non-zero length")
    with run.strategy.scope():
        model = build()
        schedule = learning_rate_schedule(run.args.schedule, run.args.learning_rate, total_steps)
        model.compile(
            optimizer=adamw(schedule),
            # Keras masks (padding) leave padded positions out of the loss.
            loss=loss or keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=list(metrics),
        )
    history = model.fit(train_data, validation_data=validation_data, epochs=run.args.epochs)
    return model, history


class Run:
    """The strategy, output folder and timing of one example run."""

    def __init__(self, args):
        keras.utils.set_random_seed(args.seed)
        self.args = args
        self.strategy = keras_dna.distribute.strategy_from_spec(args.strategy)
        self.is_chief = keras_dna.distribute.is_chief(self.strategy)
        self.output_dir = pathlib.Path(args.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.start = time.time()

    def analyse_attention(self, model, inputs, **plot_options):
        """Explaining-away statistics of `model` on `inputs`; on the chief,
        also attention.png and the column sums (column_sums.npz).

        `plot_options` go to `keras_dna.analysis.plot_attention`: the
        plotted example's `query_labels` and `key_labels`, `layers`.
        """
        report = keras_dna.analysis.collect_attention(model, inputs)
        return self.save_attention(model.name, report, **plot_options)

    def save_attention(self, model_name, report, **plot_options):
        """`analyse_attention` for a report already collected."""
        import numpy as np

        if self.is_chief:
            keras_dna.analysis.plot_attention(
                {f"{model_name}, {self.args.attention}": report},
                self.output_dir / "attention.png",
                **plot_options,
            )
            np.savez(
                self.output_dir / "column_sums.npz",
                **{layer.name: layer.valid_column_sums for layer in report},
            )
        return {
            **keras_dna.analysis.explaining_away_statistics(report),
            "causal_ceiling": keras_dna.analysis.causal_ceiling_statistics(report),
        }

    def write_metrics(self, example, history, **metrics):
        """Writes metrics.json (chief only) and returns the metrics."""
        args = self.args
        record = {
            "example": example,
            "attention": str(args.attention),
            "null_init": args.null_init,
            "seed": args.seed,
            "epochs": args.epochs,
            "learning_rate": args.learning_rate,
            "schedule": args.schedule,
            "strategy": args.strategy,
            "replicas": self.strategy.num_replicas_in_sync,
            "seconds": round(time.time() - self.start, 1),
            **metrics,
            "history": {k: [float(v) for v in vs] for k, vs in history.history.items()},
        }
        if self.is_chief:
            (self.output_dir / "metrics.json").write_text(json.dumps(record, indent=2))
        return record

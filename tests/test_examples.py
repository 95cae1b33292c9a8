"""Each example runs end to end in a tiny configuration, exports, and serves."""

import csv
import json
import re
import pathlib
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))

import common  # noqa: E402
import digits  # noqa: E402
import grapheme_to_phoneme  # noqa: E402
import text_classification  # noqa: E402

import keras_dna  # noqa: E402


def _check_metrics(directory, attention):
    saved = json.loads((directory / "metrics.json").read_text())
    assert saved["attention"] == attention
    assert saved["replicas"] == 1
    stats = saved.get("explaining_away")
    if stats is not None and attention == "double":
        assert stats["share_below_bound"] == 0.0
    return saved


def test_digits_trains_exports_and_serves(tmp_path):
    metrics = digits.main(
        ["--epochs", "1", "--limit", "300", "--attention", "hybrid", "--output-dir", str(tmp_path)]
    )
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    _check_metrics(tmp_path, "hybrid")
    served = tf.saved_model.load(str(tmp_path / "saved_model"))
    logits = served.serve(tf.zeros((3, 28, 28)))
    assert logits.shape == (3, 10)
    assert np.isfinite(logits.numpy()).all()


def test_text_example_serves_raw_strings(tmp_path):
    text_classification.main([
        "--epochs", "1", "--limit", "600", "--vocabulary-size", "400",
        "--sequence-length", "24", "--output-dir", str(tmp_path),
    ])
    metrics = _check_metrics(tmp_path, "double")
    assert metrics["classes"] == ["negative", "neutral", "positive"]
    assert metrics["explaining_away"]["keys"] > 0
    served = tf.saved_model.load(str(tmp_path / "saved_model"))
    probabilities = served.serve(tf.constant(["what a lovely ride", "never again", ""])).numpy()
    assert probabilities.shape == (3, 3)
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, atol=1e-5)


def test_text_example_trains_on_a_users_csv(tmp_path):
    rng = np.random.default_rng(0)
    words = {"spam": ["win", "prize", "free", "click"], "ham": ["meeting", "lunch", "report", "call"]}
    path = tmp_path / "mine.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "message", "kind"])
        for i in range(200):
            kind = "spam" if i % 2 else "ham"
            writer.writerow([i, " ".join(rng.choice(words[kind], size=5)), kind])
    text_classification.main([
        "--data", str(path), "--text-column", "message", "--label-column", "kind",
        "--epochs", "3", "--vocabulary-size", "100", "--sequence-length", "8",
        "--attention", "single", "--output-dir", str(tmp_path / "run"),
    ])
    metrics = _check_metrics(tmp_path / "run", "single")
    assert metrics["classes"] == ["ham", "spam"]
    assert metrics["test_accuracy"] == 1.0  # the words give the class away


@pytest.mark.parametrize("text, canonical, sites", [
    ("hybrid", "hybrid", [("hybrid", False)] * 3),
    (" double+null ", "double+null", [("double", True)] * 3),
    ("encoder=double, decoder=single,cross=double+null",
     "encoder=double,decoder=single,cross=double+null",
     [("double", False), ("single", False), ("double", True)]),
    ("cross=hybrid", "encoder=double,decoder=double,cross=hybrid",
     [("double", False), ("double", False), ("hybrid", False)]),
    ("cross=single,encoder=single,decoder=single", "single", [("single", False)] * 3),
])
def test_attention_spec_parses_to_layer_arguments_and_a_canonical_string(text, canonical, sites):
    spec = common.AttentionSpec.parse(text, common.SITES)
    assert str(spec) == canonical
    assert [spec.layer_kwargs(site) for site in common.SITES] == [
        {"normalization": normalization, "null_query": null} for normalization, null in sites
    ]
    assert common.AttentionSpec.parse(canonical, common.SITES) == spec


@pytest.mark.parametrize("text, message", [
    ("", "malformed attention ''"),
    ("double,single", "expected one choice or SITE=CHOICE"),
    ("softmax",
     "unknown attention 'softmax'; allowed: double, single, hybrid, each optionally with \\+null"),
    ("double+nul", "unknown attention 'double\\+nul'"),
    ("encoder=double,encoder=single", "site 'encoder' given twice"),
    ("encoder=double,attention=single", "unknown site 'attention'.*has: encoder, decoder, cross"),
    ("encoder=", "malformed entry 'encoder='.*expected SITE=CHOICE"),
    ("encoder=double,", "malformed entry ''"),
    ("=double", "malformed entry '=double'"),
    ("encoder=double=single", "malformed entry"),
    ("encoder=double,cross", "malformed entry 'cross'"),
    ("decoder=triple", "unknown attention 'triple'"),
    ("cross=single+null", "softmax has not; use double\\+null or hybrid\\+null"),
])
def test_attention_spec_rejects_bad_specs_saying_why(text, message):
    with pytest.raises(ValueError, match=message):
        common.AttentionSpec.parse(text, common.SITES)


def test_an_example_rejects_sites_it_lacks_on_the_command_line(capsys):
    with pytest.raises(SystemExit):
        digits.parse_args(["--attention", "encoder=single,decoder=single"])
    assert "unknown site 'decoder'" in capsys.readouterr().err
    assert str(digits.parse_args(["--attention", "encoder=single"]).attention) == "single"
    assert str(digits.parse_args([]).attention) == "double"


def test_cosine_schedule_warms_up_to_the_peak_and_decays_to_zero():
    total = 200
    schedule = common.learning_rate_schedule("cosine", 1e-3, total)
    rates = np.array([float(schedule(step)) for step in range(total + 1)])
    warmup = int(common.WARMUP_FRACTION * total)
    assert rates[0] == 0.0
    assert np.all(np.diff(rates[: warmup + 1]) > 0)
    np.testing.assert_allclose(rates[warmup], 1e-3, rtol=1e-6)
    assert np.all(np.diff(rates[warmup:]) <= 0)
    assert rates[-1] < 1e-9
    assert common.learning_rate_schedule("constant", 1e-3, total) == 1e-3


def _decayed_variables(optimizer):
    """The names of a hybrid null-query layer's variables that one step of
    `optimizer` changes with zero gradients (so by weight decay alone)."""
    layer = keras_dna.DoublyNormalizedAttention(2, 4, normalization="hybrid", null_query=True)
    x = np.ones((1, 3, 8), "float32")
    layer(x, x)
    for logits in (layer.null_query_logits, layer.mixing_logits):
        logits.assign([1.5, -2.0])  # decay of logits at 0 would not show
    variables = layer.trainable_variables
    before = [variable.numpy() for variable in variables]
    optimizer.apply([np.zeros(variable.shape, "float32") for variable in variables], variables)
    return {v.name for v, old in zip(variables, before) if not np.array_equal(v.numpy(), old)}


def test_examples_optimizer_does_not_decay_dna_logits():
    assert _decayed_variables(common.adamw(1.0)) == {"kernel"}  # biases start at 0
    # AdamW's own default decays them too.
    plain = keras.optimizers.AdamW(1.0, weight_decay=common.WEIGHT_DECAY)
    assert {"null_query_logits", "mixing_logits"} <= _decayed_variables(plain)


def test_g2p_builds_each_site_with_its_own_attention():
    model = grapheme_to_phoneme.build_model(
        "encoder=double,decoder=single,cross=hybrid", letters=10, phonemes=12, width=16, heads=2,
        depth=2,
    )
    layers = {layer.name: layer for layer in model._flatten_layers()
              if isinstance(layer, keras_dna.DoublyNormalizedAttention)}
    assert {name: layer.get_config()["normalization"] for name, layer in layers.items()} == {
        "encoder0_attention": "double", "encoder1_attention": "double",
        "decoder0_self": "single", "decoder1_self": "single",
        "decoder0_cross": "hybrid", "decoder1_cross": "hybrid",
    }
    assert layers["decoder1_cross"].causal_normalization


@pytest.mark.parametrize("attention", ["double", "encoder=single,decoder=hybrid,cross=double"])
def test_g2p_decoder_does_not_see_later_phonemes(attention):
    model = grapheme_to_phoneme.build_model(attention, letters=10, phonemes=12, width=16, heads=2, depth=1)
    rng = np.random.default_rng(0)
    letters = rng.integers(1, 10, size=(3, grapheme_to_phoneme.MAX_LETTERS)).astype("int32")
    letters[0, 5:] = 0
    prefix = rng.integers(1, 12, size=(3, grapheme_to_phoneme.MAX_PHONEMES)).astype("int32")
    base = model([letters, prefix]).numpy()
    for position in (0, 4, 9):
        changed = prefix.copy()
        changed[:, position + 1 :] = rng.integers(1, 12, size=changed[:, position + 1 :].shape)
        out = model([letters, changed]).numpy()
        np.testing.assert_allclose(out[:, : position + 1], base[:, : position + 1], atol=1e-5)
        assert np.abs(out[:, position + 1 :] - base[:, position + 1 :]).max() > 1e-4


@pytest.mark.parametrize("attention", ["double", "encoder=double,decoder=single,cross=hybrid+null"])
def test_g2p_cached_decoding_equals_rerunning_the_decoder(attention):
    keras.utils.set_random_seed(6)
    letter_vocabulary, phoneme_vocabulary = list("abcdefgh"), list("PQRSTUVW") + ["<s>", "</s>"]
    model = grapheme_to_phoneme.build_model(
        attention, len(letter_vocabulary) + 2, len(phoneme_vocabulary) + 2, width=16, heads=2
    )
    rng = np.random.default_rng(6)
    letters = rng.integers(2, 10, size=(3, grapheme_to_phoneme.MAX_LETTERS)).astype("int32")
    letters[0, 5:] = 0  # a short word
    prefix = rng.integers(2, 12, size=(3, grapheme_to_phoneme.MAX_PHONEMES)).astype("int32")
    prefix[1, 4] = prefix[2, 9:] = 0  # padding ids, masked by the model
    full = np.asarray(model([letters, prefix]))
    decoder = grapheme_to_phoneme.CachedDecoder(model)
    memory, caches = decoder.start(letters)
    for position in range(grapheme_to_phoneme.MAX_PHONEMES):
        logits, caches = decoder.step(prefix, position, memory, letters > 0, caches)
        np.testing.assert_allclose(np.asarray(logits), full[:, position], atol=1e-5)
    decoded = {
        decoding: np.asarray(
            grapheme_to_phoneme.Speller(
                model, letter_vocabulary, phoneme_vocabulary, decoding
            ).decode_ids(tf.constant(letters))
        )
        for decoding in grapheme_to_phoneme.DECODINGS
    }
    np.testing.assert_array_equal(decoded["cached"], decoded["rerun"])
    with pytest.raises(ValueError, match="`decoding`"):
        grapheme_to_phoneme.Speller(model, letter_vocabulary, phoneme_vocabulary, "beam")


def test_g2p_trains_decodes_and_serves_words(tmp_path):
    metrics = grapheme_to_phoneme.main(
        ["--epochs", "1", "--limit", "200", "--batch-size", "64", "--output-dir", str(tmp_path)]
    )
    _check_metrics(tmp_path, "double")
    assert 0.0 <= metrics["test_phoneme_error_rate"]
    assert 0.0 <= metrics["test_word_error_rate"] <= 1.0
    served = tf.saved_model.load(str(tmp_path / "saved_model"))
    spelled = served.serve(tf.constant(["hello", "Keras"])).numpy()
    assert spelled.shape == (2,)
    for word in spelled:  # ARPAbet symbols, stress marks dropped
        assert all(re.fullmatch("[A-Z]+", phoneme) for phoneme in word.decode().split())


def _finished_run(directory, attention, accuracy, column_sums=None):
    """A run as `compare` leaves it: metrics.json (and, for the first seed,
    column_sums.npz)."""
    directory.mkdir(parents=True)
    record = {
        "attention": attention,
        "test_accuracy": accuracy,
        "explaining_away": {
            "min_column_sum": 0.25, "share_below_bound": 0.0, "share_below_threshold": 0.5,
        },
        "history": {
            "loss": [2.0, 1.5], "accuracy": [0.2, 0.4], "val_loss": [2.1, 1.7],
            "val_accuracy": [0.1, 0.3],
        },
    }
    (directory / "metrics.json").write_text(json.dumps(record))
    if column_sums is not None:
        np.savez(directory / "column_sums.npz", block0=np.asarray(column_sums))


def test_compare_trains_what_is_missing_and_writes_table_differences_and_curves(tmp_path):
    import compare

    # Three of the four runs are on disk already: compare resumes them and
    # trains the fourth (a digits run in a fresh process).
    runs_dir = tmp_path / "digits"
    _finished_run(runs_dir / "softmax" / "seed0", "single", 0.5, column_sums=[0.5, 1.5])
    _finished_run(runs_dir / "softmax" / "seed1", "single", 0.625)
    _finished_run(runs_dir / "dna" / "seed1", "double", 0.75)
    compare.main([
        "--examples", "digits", "--seeds", "0", "1", "--set", "digits", "--epochs 2 --limit 100",
        "--configs", "softmax=single", "dna=double", "dna-encoders=encoder=double,decoder=single",
        "--output-dir", str(tmp_path),
    ])
    assert [log.relative_to(runs_dir).as_posix() for log in runs_dir.rglob("*.log")] == [
        "dna/seed0.log"
    ]
    trained = json.loads((runs_dir / "dna" / "seed0" / "metrics.json").read_text())
    assert trained["attention"] == "double" and trained["seed"] == 0
    assert len(trained["history"]["val_accuracy"]) == 2
    assert trained["explaining_away"]["share_below_bound"] == 0.0
    table = (tmp_path / "comparison.md").read_text()
    assert "--set digits" in table
    assert "| Δ accuracy vs softmax (95% CI) |" in table
    assert "| softmax | single | 0.5625 ± 0.0625 | 0.2500 ± 0.0000 | 0.00% | 50.00% | baseline |" in table
    differences = [trained["test_accuracy"] - 0.5, 0.75 - 0.625]
    half = 12.706 * np.std(differences, ddof=1) / np.sqrt(2)  # t quantile, 1 degree of freedom
    mean = np.mean(differences)
    cell = f"{mean:+.4f} [{mean - half:+.4f}, {mean + half:+.4f}]"
    assert re.search(r"\| dna \| double \|.*\| " + re.escape(cell) + r"( \*)? \|", table)
    # On digits (encoder only) dna-encoders is dna: noted, not trained again.
    assert "dna-encoders: the same as dna on digits" in table
    assert not (runs_dir / "dna-encoders").exists()
    for png in ("comparison.png", "curves_digits.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


def test_compare_refuses_a_run_trained_with_other_attention(tmp_path):
    import compare

    _finished_run(tmp_path / "digits" / "dna" / "seed0", "single", 0.5, column_sums=[1.0])
    with pytest.raises(SystemExit, match="trained with --attention single, not double"):
        compare.main(["--examples", "digits", "--seeds", "0", "--configs", "dna=double",
                      "--output-dir", str(tmp_path)])


def test_paired_t_interval_matches_a_hand_computation():
    import compare

    # Differences 2, 3, 4: mean 3, standard deviation 1, t(0.975, 2) = 4.303.
    mean, (low, high) = compare.paired_difference([3.0, 5.0, 4.0], [1.0, 2.0, 0.0])
    assert mean == pytest.approx(3.0)
    assert (low, high) == pytest.approx((3 - 4.303 / np.sqrt(3), 3 + 4.303 / np.sqrt(3)))
    assert compare.paired_difference([0.5], [0.25]) == (0.25, None)
    assert compare.difference_cell([3.0, 5.0, 4.0], [1.0, 2.0, 0.0]).endswith(" *")
    assert not compare.difference_cell([1.0, 3.0], [2.0, 2.0]).endswith("*")
    assert [compare.t_quantile_95(df) for df in (1, 30, 31, 1000)] == [12.706, 2.042, 1.96, 1.96]
    with pytest.raises(ValueError, match="at least 1"):
        compare.t_quantile_95(0)


def test_compare_configs_default_and_errors(capsys):
    import compare

    configs = dict(compare.parse_args([]).configs)
    assert list(configs) == ["softmax", "dna", "dna-encoders", "dna-null", "hybrid"]
    assert str(configs["dna-encoders"]) == "encoder=double,decoder=single,cross=single"
    assert configs["dna-null"].layer_kwargs("cross") == {
        "normalization": "double", "null_query": True,
    }
    for argv, message in [
        (["--configs", "double"], "malformed configuration 'double': expected NAME=SPEC"),
        (["--configs", "a/b=double"], "malformed configuration"),
        (["--configs", "encoder=double"], "named after the site 'encoder'"),
        (["--configs", "x=triple"], "configuration 'x': unknown attention 'triple'"),
        (["--configs", "x=double", "x=single"], "names must differ; repeated: x"),
    ]:
        with pytest.raises(SystemExit):
            compare.parse_args(argv)
        assert message in capsys.readouterr().err


def test_explaining_away_data_and_matching():
    import explaining_away as task

    points, members, centres = task.point_sets(50)
    assert points.shape == (50, task.POINTS, 2) and centres.shape == (50, task.CLUSTERS, 2)
    sizes = np.stack([(members == c).sum(1) for c in range(task.CLUSTERS)], 1)
    assert sizes.min() >= 2 and (sizes.sum(1) == task.POINTS).all()
    gaps = np.linalg.norm(centres[:, :, None] - centres[:, None], axis=-1)
    first, second = np.triu_indices(task.CLUSTERS, 1)
    assert gaps[:, first, second].min() >= task.SEPARATION
    # The slots may come in any order.
    shuffled = centres[:, [2, 0, 1]]
    np.testing.assert_allclose(task.matched_distances(centres, shuffled), 0.0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(task.matched_squared_error(centres, shuffled)), 0.0, atol=1e-6)
    moved = shuffled.copy()
    moved[:, 0, 0] += 0.3  # the slot of centre 2 moves by 0.3
    np.testing.assert_allclose(task.matched_distances(centres, moved)[:, 2], 0.3, atol=1e-5)
    np.testing.assert_allclose(np.asarray(task.matched_squared_error(centres, moved)), 0.09 / 3, atol=1e-5)


def test_explaining_away_links_starved_clusters_to_misses():
    import explaining_away as task
    from keras_dna.analysis import LayerAttention

    members = np.repeat([0, 1, 2], [task.POINTS - 4, 2, 2])[None].repeat(2, axis=0)
    # Every slot reads clusters 0 and 2 evenly and never cluster 1.
    weights = np.where(members[:, None, None, :] == 1, 0.0, 1.0 / (task.POINTS - 2))
    weights = np.broadcast_to(weights, (2, 1, task.CLUSTERS, task.POINTS))
    valid = np.ones((2, task.CLUSTERS, task.POINTS), bool)
    report = [LayerAttention("read0", "single", weights, valid)]
    distances = np.full((2, task.CLUSTERS), 0.05)
    distances[0, 1] = 0.5  # cluster 1 of example 0 is missed
    linked = task.starvation_and_errors(report, members, distances)
    assert linked == {
        "analysed_clusters": 6,
        "starved_clusters": 2,
        "recall_of_starved_clusters": 0.5,
        "recall_of_other_clusters": 1.0,
    }


def test_explaining_away_reports_metric_beside_starvation(tmp_path):
    import explaining_away as task

    task.main(["--epochs", "1", "--limit", "400", "--output-dir", str(tmp_path)])
    saved = _check_metrics(tmp_path, "double")
    assert 0.0 <= saved["test_cluster_recall"] <= 1.0
    assert saved["test_centre_error"] > 0.0
    stats = saved["explaining_away"]
    assert stats["share_below_bound"] == 0.0
    assert stats["min_column_sum"] >= 1 / task.POINTS * (1 - 1e-4)
    assert stats["keys"] == 40 * 2 * 4 * task.POINTS  # test examples, layers, heads, points
    assert set(saved["per_layer"]) == {"read0", "read1", "all"}
    assert saved["analysed_clusters"] == 40 * task.CLUSTERS
    assert saved["starved_clusters"] == 0
    assert saved["recall_of_starved_clusters"] is None
    assert 0.0 <= saved["recall_of_other_clusters"] <= 1.0
    assert (tmp_path / "attention.png").read_bytes()[:4] == b"\x89PNG"

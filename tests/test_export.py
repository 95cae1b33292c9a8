"""SavedModel export of DNA models, served without keras_dna."""

import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import keras

from keras_dna import DoublyNormalizedAttention

SHAPES = [(1, 3, 4), (2, 7, 5), (5, 11, 9)]  # (batch, source length, target length)


def _seq2seq_model():
    """Masked encoder self-attention, causal decoder, causal cross-attention."""
    keras.utils.set_random_seed(0)
    source = keras.Input((None,), dtype="int32", name="source")
    target = keras.Input((None,), dtype="int32", name="target")
    x = keras.layers.Embedding(40, 16, mask_zero=True)(source)
    x = DoublyNormalizedAttention(2, 8, normalization="hybrid")(x, x)
    y = keras.layers.Embedding(40, 16)(target)
    y = DoublyNormalizedAttention(2, 8)(y, y, use_causal_mask=True)
    y = DoublyNormalizedAttention(2, 8, causal_normalization=True)(y, x)
    return keras.Model([source, target], keras.layers.Dense(40)(y))


def _inputs(batch, source_length, target_length, seed):
    rng = np.random.default_rng(seed)
    source = rng.integers(1, 40, size=(batch, source_length)).astype("int32")
    source[0, source_length // 2:] = 0  # padding, masked through Embedding
    target = rng.integers(1, 40, size=(batch, target_length)).astype("int32")
    return source, target


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    directory = tmp_path_factory.mktemp("export")
    model = _seq2seq_model()
    model.export(str(directory / "saved_model"), verbose=False)
    cases = {}
    for index, shape in enumerate(SHAPES):
        source, target = _inputs(*shape, seed=index)
        cases[f"source{index}"] = source
        cases[f"target{index}"] = target
        cases[f"expected{index}"] = model.predict([source, target], verbose=0)
    np.savez(directory / "cases.npz", **cases)
    return directory


def test_saved_model_serves_without_keras_dna(exported):
    script = textwrap.dedent(f"""
        import sys
        sys.modules["keras_dna"] = None  # any import of keras_dna now fails
        import numpy as np, tensorflow as tf
        served = tf.saved_model.load({str(exported / "saved_model")!r})
        cases = np.load({str(exported / "cases.npz")!r})
        for index in range({len(SHAPES)}):
            got = served.serve([cases[f"source{{index}}"], cases[f"target{{index}}"]]).numpy()
            error = np.abs(got - cases[f"expected{{index}}"]).max()
            print("case", index, got.shape, "max_error", error)
            assert error < 1e-5, error
        print("ok")
    """)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=240,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"), cwd=str(exported),
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    print(result.stdout)
    assert result.stdout.strip().endswith("ok")


def _saved_model_cli():
    path = pathlib.Path(sys.executable).parent / "saved_model_cli"
    return str(path) if path.exists() else shutil.which("saved_model_cli")


def test_saved_model_cli_shows_and_runs_the_signature(exported):
    cli = _saved_model_cli()
    assert cli, "saved_model_cli comes with tensorflow"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    directory = str(exported / "saved_model")
    shown = subprocess.run(
        [cli, "show", "--dir", directory, "--tag_set", "serve", "--signature_def", "serving_default"],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert "source" in shown.stdout and "target" in shown.stdout
    cases = np.load(exported / "cases.npz")
    inputs = f"source={cases['source1'].tolist()};target={cases['target1'].tolist()}"
    output_dir = exported / "cli_output"
    ran = subprocess.run(
        [cli, "run", "--dir", directory, "--tag_set", "serve", "--signature_def", "serving_default",
         "--input_exprs", inputs, "--outdir", str(output_dir), "--overwrite"],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    (result_file,) = output_dir.glob("*.npy")
    got = np.load(result_file)
    np.testing.assert_allclose(got, cases["expected1"], atol=1e-5)

"""`DoublyNormalizedAttention` and converted keras-hub decoders under JAX's
Keras distribution API.

The JAX backend and the number of virtual CPU devices are fixed when JAX
starts, so the training runs in a fresh process
(tests/scripts/jax_distribution.py), whatever backend this pytest session
uses.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np

SCRIPT = pathlib.Path(__file__).parent / "scripts" / "jax_distribution.py"
HUB_SCRIPT = pathlib.Path(__file__).parent / "scripts" / "jax_hub_decoder_parallel.py"
ROOT = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT = 300
DEVICES = 8
HIDDEN, HEADS, HEAD_DIM = 16, 4, 4
# Float32 tolerance: a distributed step only changes the order of float32
# sums (all-reduced gradients, head contractions across shards).
RTOL, ATOL = 1e-5, 1e-6


def _env():
    env = dict(os.environ)
    env.pop("JAX_ENABLE_X64", None)
    env["KERAS_BACKEND"] = "jax"
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={DEVICES}"
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    return env


def _run_script(script=SCRIPT):
    result = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True, text=True, timeout=TIMEOUT, env=_env(), cwd=ROOT,
    )
    lines = result.stdout.strip().splitlines()
    assert lines, f"no output (exit {result.returncode}):\n{result.stderr[-4000:]}"
    try:
        report = json.loads(lines[-1])
    except json.JSONDecodeError as error:
        raise AssertionError(
            f"last line is not JSON ({error}), exit {result.returncode}:\n"
            f"{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
        ) from None
    return result, report


def test_one_jax_training_step_matches_single_device_under_data_and_model_parallel():
    """One SGD step under DataParallel and ModelParallel equals one device's.

    The script builds a tiny model (sequence 6, hidden 16, 4 heads of size
    4) with a causal `DoublyNormalizedAttention` (`use_causal_mask=True`)
    and a `normalization="hybrid", null_query=True` one, and takes one
    `train_on_batch` step (SGD, batch 16) from the same initial weights:

    - on one device (the reference);
    - under `DataParallel` over 8 virtual CPU devices (batch split in 8,
      weights replicated);
    - under `ModelParallel` on a (2, 4) ("batch", "model") mesh: the batch
      split in 2 and the heads in 4, as keras-hub lays out
      `MultiHeadAttention` (query/key/value kernels `(None, "model", None)`,
      their biases `("model", None)`, the output kernel
      `("model", None, None)`), with the per-head `mixing_logits` and
      `null_query_logits` sharded `("model",)` along with their heads.

    Each distributed step must give the reference's loss and updated
    weights within float32 tolerance, and after the ModelParallel step the
    query kernel must still be split over the heads axis (one head per
    shard), the batch over the "batch" axis.
    """
    result, report = _run_script()
    cases = ("single_device", "data_parallel", "model_parallel")
    for name in cases:
        assert name in report, f"{name} missing from the report: {report}"
        assert "error" not in report[name], f"{name} raised:\n{report[name]['error']}"
    assert report["backend"] == "jax" and report["devices"] == DEVICES, report

    reference = report["single_device"]
    assert reference["query_kernel_devices"] == 1, reference
    # The step must move the weights far beyond the tolerance, or comparing
    # them would prove nothing; the DNA-only weights included.
    assert reference["max_update"] > 1e3 * ATOL, reference
    for weight in ("hybrid_attention/mixing_logits", "hybrid_attention/null_query_logits",
                   "causal_attention/query/kernel", "hybrid_attention/query/kernel"):
        assert reference["updates"][weight] > 1e2 * ATOL, (weight, reference["updates"])

    for name in ("data_parallel", "model_parallel"):
        case = report[name]
        print(
            f"{name}: loss {case['loss']!r} (single device {reference['loss']!r}), "
            f"max abs weight diff {case['max_abs_weight_diff']:.3g}, "
            f"tolerance ratio {case['tolerance_ratio']:.3g} ({case['worst_weight']})"
        )
        np.testing.assert_allclose(
            case["loss"], reference["loss"], rtol=RTOL, atol=ATOL, err_msg=f"{name}: loss"
        )
        # max over all weights of |w - w_ref| / (ATOL + RTOL |w_ref|).
        assert case["tolerance_ratio"] <= 1.0, (
            f"{name}: weights after the step differ from the single device's: "
            f"max abs diff {case['max_abs_weight_diff']:.3g} in {case['worst_weight']}"
        )
        assert case["max_abs_weight_diff"] < 1e-5, case

    data_parallel = report["data_parallel"]
    assert data_parallel["batch_shard_shapes"] == [[2, 6, HIDDEN]], data_parallel
    query = data_parallel["sharding"]["query_kernel"]
    assert query["spec"] == [None, None, None] and query["num_devices"] == DEVICES, query

    model_parallel = report["model_parallel"]
    assert model_parallel["batch_shard_shapes"] == [[8, 6, HIDDEN]], model_parallel
    sharding = model_parallel["sharding"]
    expected = {
        "query_kernel": ([None, "model", None], [HIDDEN, 1, HEAD_DIM]),
        "query_bias": (["model", None], [1, HEAD_DIM]),
        "output_kernel": (["model", None, None], [1, HEAD_DIM, HIDDEN]),
        "mixing_logits": (["model"], [1]),
        "null_query_logits": (["model"], [1]),
    }
    for weight, (spec, shard_shape) in expected.items():
        actual = sharding[weight]
        assert actual["spec"] == spec, (weight, actual)
        assert actual["shard_shapes"] == [shard_shape], (weight, actual)
        assert actual["num_shards"] == DEVICES and actual["num_devices"] == DEVICES, actual
    assert HEADS // 4 == sharding["query_kernel"]["shard_shapes"][0][1]

    assert report["failures"] == [], report["failures"]
    assert result.returncode == 0, result.stderr[-4000:]


def test_converted_llama_step_under_model_parallel_matches_one_device():
    """A converted keras-hub Llama (DNA, null query), one SGD step: under
    `ModelParallel` with `LlamaBackbone.get_layout_map` on a (2, 4) mesh of
    8 virtual CPU devices, the loss and every updated weight equal one
    device's within float32 tolerance, with the kernels sharded as the map
    says (see tests/scripts/jax_hub_decoder_parallel.py)."""
    result, report = _run_script(HUB_SCRIPT)
    assert result.returncode == 0, result.stderr[-4000:]
    assert report["devices"] == DEVICES, report
    assert len(set(report["null_query_logits"])) == 2, report
    assert report["query_kernel_spec"] == ["model", "batch", None], report
    assert report["max_update"] > 1e3 * ATOL, report
    np.testing.assert_allclose(report["loss"], report["reference_loss"], rtol=RTOL, atol=ATOL)
    assert report["max_weight_difference"] < 1e-5, report

"""One JAX training step of a tiny DNA model, on one device and distributed.

Used by tests/test_jax_distribution.py; also runs on its own:

    python tests/scripts/jax_distribution.py

The JAX backend and 8 virtual CPU devices must be chosen before JAX starts,
so this script sets them itself, before it imports Keras. It then runs the
same `train_on_batch` step (SGD, same initial weights, same batch of 16)

- on one device (no distribution): the reference;
- under `keras.distribution.DataParallel` over the 8 devices;
- under `keras.distribution.ModelParallel` on a (2, 4) ("batch", "model")
  mesh, with the attention heads sharded over "model" as keras-hub lays
  out `MultiHeadAttention`,

and compares each distributed step's loss and updated weights with the
reference. The model has a causal `DoublyNormalizedAttention` (default
"double" normalization, `use_causal_mask=True`) followed by a
`normalization="hybrid", null_query=True` one, so every case covers both.

The last line of stdout is a JSON object (see `main`). The exit status is 1
when a distributed step does not match the reference, when the query kernel
under ModelParallel is not sharded as asked, or when a case raises (its
traceback is in the JSON); it is 0 otherwise.
"""

import os
import re

DEVICE_COUNT = 8
_DEVICE_FLAG = "--xla_force_host_platform_device_count"

os.environ["KERAS_BACKEND"] = "jax"
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.pop("JAX_ENABLE_X64", None)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Keep any other XLA flags the caller set, but ask for our device count.
_flags = re.sub(rf"{_DEVICE_FLAG}=\S+", "", os.environ.get("XLA_FLAGS", "")).split()
os.environ["XLA_FLAGS"] = " ".join(_flags + [f"{_DEVICE_FLAG}={DEVICE_COUNT}"])

import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import numpy as np  # noqa: E402

import jax  # noqa: E402
import keras  # noqa: E402

import keras_dna  # noqa: E402

SEED = 1234
BATCH = 16  # divisible by 8 (DataParallel) and by 2 (ModelParallel's batch axis)
SEQUENCE = 6
HIDDEN = 16
HEADS = 4  # divisible by the 4 devices of ModelParallel's "model" axis
HEAD_DIM = 4
LEARNING_RATE = 0.1

# Float32 tolerance for a distributed step against the single-device one:
# the only expected differences are the order of float32 sums (gradients
# all-reduced over devices, heads contracted across shards).
RTOL = 1e-5
ATOL = 1e-6


def build_model():
    """Input -> causal DNA -> residual -> hybrid DNA with null query -> head."""
    inputs = keras.Input((SEQUENCE, HIDDEN), name="features")
    causal = keras_dna.DoublyNormalizedAttention(
        HEADS, HEAD_DIM, name="causal_attention"
    )(inputs, inputs, use_causal_mask=True)
    x = keras.layers.Add(name="residual_1")([inputs, causal])
    hybrid = keras_dna.DoublyNormalizedAttention(
        HEADS, HEAD_DIM, normalization="hybrid", null_query=True, name="hybrid_attention"
    )(x, x)
    x = keras.layers.Add(name="residual_2")([x, hybrid])
    x = keras.layers.GlobalAveragePooling1D(name="pool")(x)
    outputs = keras.layers.Dense(1, name="head")(x)
    model = keras.Model(inputs, outputs, name="tiny_dna")
    model.compile(optimizer=keras.optimizers.SGD(LEARNING_RATE), loss="mse")
    return model


def make_batch():
    rng = np.random.default_rng(SEED)
    x = rng.normal(size=(BATCH, SEQUENCE, HIDDEN)).astype("float32")
    y = rng.normal(size=(BATCH, 1)).astype("float32")
    return x, y


def layout_map(mesh):
    """Heads over "model", as keras-hub shards `MultiHeadAttention`.

    `mixing_logits` and `null_query_logits` hold one value per head, so they
    are sharded over "model" like the heads they belong to: each device then
    holds exactly the logits of its own heads, and the layer's per-head
    broadcasting is exercised against sharded weights (replicating them
    would be the easier case). Everything else (output bias, the Dense head)
    is left out of the map and so replicated.
    """
    layouts = keras.distribution.LayoutMap(mesh)
    attention = r".*_attention"
    layouts[rf"{attention}/(query|key|value)/kernel"] = (None, "model", None)
    layouts[rf"{attention}/(query|key|value)/bias"] = ("model", None)
    layouts[rf"{attention}/attention_output/kernel"] = ("model", None, None)
    layouts[rf"{attention}/(mixing_logits|null_query_logits)"] = ("model",)
    return layouts


def make_distribution(name):
    devices = keras.distribution.list_devices("cpu")
    if len(devices) != DEVICE_COUNT:
        raise RuntimeError(
            f"Expected {DEVICE_COUNT} virtual CPU devices, found {len(devices)} "
            f"({devices}); XLA_FLAGS={os.environ.get('XLA_FLAGS')!r}"
        )
    if name == "data_parallel":
        return keras.distribution.DataParallel(devices=devices)
    mesh = keras.distribution.DeviceMesh(
        shape=(2, 4), axis_names=("batch", "model"), devices=devices
    )
    return keras.distribution.ModelParallel(layout_map=layout_map(mesh), batch_dim_name="batch")


def sharding_of(variable):
    """The spec and per-device shard shapes of a variable's value."""
    value = variable.value
    sharding = value.sharding
    spec = getattr(sharding, "spec", None)
    return {
        "path": variable.path,
        "shape": list(value.shape),
        "spec": None if spec is None else [None if a is None else str(a) for a in spec],
        "shard_shapes": sorted({tuple(s.data.shape) for s in value.addressable_shards}),
        "num_shards": len(value.addressable_shards),
        "num_devices": len(sharding.device_set),
    }


def one_step(initial_weights, batch):
    """Builds the model (seeded), sets `initial_weights`, takes one step.

    Runs under whatever distribution is current, so that the variables get
    its layouts when they are created.
    """
    keras.utils.set_random_seed(SEED)
    model = build_model()
    seeded = [np.asarray(w) for w in model.get_weights()]
    if initial_weights is not None:
        model.set_weights(initial_weights)
    loss = float(model.train_on_batch(*batch))
    return model, seeded, loss


def weight_differences(weights, reference, names):
    """Max absolute difference, and the max of |a - b| / (ATOL + RTOL |b|)
    (<= 1 means within tolerance), with the weight where it occurs."""
    result = {"max_abs_weight_diff": 0.0, "tolerance_ratio": 0.0, "worst_weight": None}
    for name, a, b in zip(names, weights, reference):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        diff = np.abs(a - b)
        ratio = float((diff / (ATOL + RTOL * np.abs(b))).max())
        result["max_abs_weight_diff"] = max(result["max_abs_weight_diff"], float(diff.max()))
        if ratio >= result["tolerance_ratio"]:
            result["tolerance_ratio"], result["worst_weight"] = ratio, name
    return result


def run_case(name, reference, batch):
    start = time.perf_counter()
    distribution = make_distribution(name)
    with distribution.scope():
        model, seeded, loss = one_step(reference["initial_weights"], batch)
        weights = [np.asarray(w) for w in model.get_weights()]
        attention = model.get_layer("causal_attention")
        hybrid = model.get_layer("hybrid_attention")
        shardings = {
            "query_kernel": sharding_of(attention._query_dense.kernel),
            "query_bias": sharding_of(attention._query_dense.bias),
            "output_kernel": sharding_of(attention._output_dense.kernel),
            "mixing_logits": sharding_of(hybrid.mixing_logits),
            "null_query_logits": sharding_of(hybrid.null_query_logits),
        }
    # How the trainer splits the batch over the devices (it asks the
    # distribution for this layout).
    x = keras.distribution.distribute_tensor(
        batch[0], distribution.get_data_layout(batch[0].shape)
    )
    result = {
        "batch_shard_shapes": sorted({tuple(s.data.shape) for s in x.addressable_shards}),
        "loss": loss,
        "loss_diff": abs(loss - reference["loss"]),
        **weight_differences(weights, reference["weights"], reference["names"]),
        # Informational: whether seeded initialization alone already gives
        # the reference weights under this distribution (the step itself
        # always starts from the reference's initial weights).
        "seeded_init_max_diff": max(
            float(np.abs(a - b).max()) for a, b in zip(seeded, reference["initial_weights"])
        ),
        "sharding": shardings,
        "seconds": round(time.perf_counter() - start, 2),
    }
    return result


def check(results):
    """The failures, as messages (empty when everything matches)."""
    failures = []
    reference_loss = results["single_device"]["loss"]
    for name in ("data_parallel", "model_parallel"):
        case = results[name]
        if "error" in case:
            failures.append(f"{name} raised:\n{case['error']}")
            continue
        if not np.isclose(case["loss"], reference_loss, rtol=RTOL, atol=ATOL):
            failures.append(f"{name}: loss {case['loss']!r} != single device {reference_loss!r}")
        if case["tolerance_ratio"] > 1.0:
            failures.append(
                f"{name}: weights differ from single device beyond rtol={RTOL}, atol={ATOL} "
                f"(max abs diff {case['max_abs_weight_diff']:.3g} in {case['worst_weight']})"
            )
    sharded = results["model_parallel"].get("sharding", {}).get("query_kernel")
    expected_shard = [HIDDEN, HEADS // 4, HEAD_DIM]
    if sharded is not None and (
        sharded["spec"] != [None, "model", None]
        or sharded["shard_shapes"] != [tuple(expected_shard)]
    ):
        failures.append(f"model_parallel: query kernel not sharded over heads: {sharded}")
    return failures


def main():
    start = time.perf_counter()
    batch = make_batch()
    results = {
        "backend": keras.backend.backend(),
        "devices": len(jax.devices()),
        "rtol": RTOL,
        "atol": ATOL,
    }

    # The reference: no distribution, so everything on one device.
    keras.distribution.set_distribution(None)
    case_start = time.perf_counter()
    keras.utils.set_random_seed(SEED)
    initial_weights = [np.asarray(w) for w in build_model().get_weights()]
    model, _, loss = one_step(initial_weights, batch)
    reference = {
        "loss": loss,
        "initial_weights": initial_weights,
        "weights": [np.asarray(w) for w in model.get_weights()],
        "names": [w.path for w in model.weights],
    }
    value = model.get_layer("causal_attention")._query_dense.kernel.value
    results["single_device"] = {
        "loss": loss,
        # How far the step moved the weights: the comparisons below are only
        # meaningful if this is far above the tolerance.
        "max_update": max(
            float(np.abs(a - b).max()) for a, b in zip(reference["weights"], initial_weights)
        ),
        "updates": {
            name: float(np.abs(a - b).max())
            for name, a, b in zip(reference["names"], reference["weights"], initial_weights)
        },
        "query_kernel_devices": len(value.sharding.device_set),
        "seconds": round(time.perf_counter() - case_start, 2),
    }

    for name in ("data_parallel", "model_parallel"):
        try:
            results[name] = run_case(name, reference, batch)
        except Exception:  # reported in the JSON, and as a failure
            results[name] = {"error": traceback.format_exc()}
        finally:
            keras.distribution.set_distribution(None)

    results["failures"] = check(results)
    results["seconds"] = round(time.perf_counter() - start, 2)
    print(json.dumps(results, default=list), flush=True)
    if results["failures"]:
        print("\n\n".join(results["failures"]), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

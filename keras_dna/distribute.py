"""Distribution strategies from a short spec, and `fit` on several workers.

`strategy_from_spec("auto")` picks what the machine has; the examples take the
spec as `--strategy`. Keras 3's `Model.fit` does not run under
`tf.distribute.MultiWorkerMirroredStrategy` (keras-team/keras#20585); for the
Keras versions listed in `_MULTI_WORKER_FIT_TESTED`, `strategy_from_spec`
repairs that when it creates such a strategy (see
`enable_multi_worker_fit`).
"""

import json
import os

import keras
import tensorflow as tf

from keras_dna._compat import creation_strategy
from keras_dna._compat import in_multi_worker_mode
from keras_dna._compat import replace_tensorflow_trainer_steps
from keras_dna._compat import tensorflow_trainer_steps_replaced

SPECS = ("auto", "cpu", "mirrored", "multiworker", "tpu")

# Keras releases whose TensorFlow trainer the multi-worker repair was written
# against and tested with.
_MULTI_WORKER_FIT_TESTED = ("3.15",)


def strategy_from_spec(spec="auto"):
    """Returns a `tf.distribute.Strategy` for a spec string.

    Args:
        spec: One of
            - `"auto"`: a TPU if one resolves, else `MirroredStrategy` over
              several GPUs, `OneDeviceStrategy` on one GPU, or the default
              (single-device) strategy;
            - `"cpu"`: the default strategy, on the CPU;
            - `"mirrored"`: `MirroredStrategy` over the local GPUs (or the
              CPU when there are none);
            - `"multiworker"`: `MultiWorkerMirroredStrategy`, the cluster
              read from the `TF_CONFIG` environment variable;
            - `"tpu"`: `TPUStrategy`; see `tpu_strategy`.

    Returns:
        The strategy. Create models and optimizers in `strategy.scope()`.
    """
    if not isinstance(spec, str) or spec not in SPECS:
        raise ValueError(
            f"Argument `spec` must be one of {', '.join(map(repr, SPECS))}. "
            f"Received: spec={spec!r}"
        )
    if spec == "auto":
        if _tpu_environment():
            return tpu_strategy()
        gpus = tf.config.list_logical_devices("GPU")
        if len(gpus) > 1:
            return tf.distribute.MirroredStrategy()
        if len(gpus) == 1:
            return tf.distribute.OneDeviceStrategy(gpus[0].name)
        return tf.distribute.get_strategy()
    if spec == "cpu":
        return tf.distribute.get_strategy()
    if spec == "mirrored":
        return tf.distribute.MirroredStrategy()
    if spec == "multiworker":
        if "TF_CONFIG" not in os.environ:
            raise ValueError(
                "The 'multiworker' strategy reads its cluster from the "
                "TF_CONFIG environment variable, which is not set."
            )
        json.loads(os.environ["TF_CONFIG"])  # a clear error for bad JSON
        enable_multi_worker_fit()
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tpu_strategy()


def _tpu_environment():
    """Whether this process looks like it can reach a TPU.

    Checked without network calls: a TPU VM exposes /dev/accel*, a TPU node
    is named by TPU_NAME (or COLAB_TPU_ADDR).
    """
    return (
        bool(os.environ.get("TPU_NAME") or os.environ.get("COLAB_TPU_ADDR"))
        or any(name.startswith("accel") for name in _dev_entries())
    )


def _dev_entries():
    try:
        return os.listdir("/dev")
    except OSError:
        return []


def tpu_strategy(tpu=None):
    """TensorFlow's documented TPU recipe: resolve, connect, initialize.

    Not run by this project's tests: its machines have no TPU. Keep shapes
    static (padded batches, `drop_remainder=True`) so the model compiles
    under XLA, as TPUs require.

    Args:
        tpu: The TPU name or gRPC address; `None` resolves it from the
            environment (`"local"` on a TPU VM).
    """
    if tpu is None and not os.environ.get("TPU_NAME") and not os.environ.get("COLAB_TPU_ADDR"):
        tpu = "local"
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)


def is_chief(strategy):
    """Whether this process should write checkpoints and exports.

    True outside multi-worker training; under it, for the task named
    "chief", or for worker 0 of a cluster that has no chief.
    """
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or resolver.task_type is None:
        return True
    if resolver.task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return resolver.task_type == "worker" and resolver.task_id == 0 and not has_chief


def _multi_worker(strategy):
    return isinstance(
        strategy, tf.distribute.MultiWorkerMirroredStrategy
    ) and in_multi_worker_mode(strategy)


def enable_multi_worker_fit():
    """Makes Keras `Model.fit` work under `MultiWorkerMirroredStrategy`.

    Keras 3's TensorFlow trainer fails there in two places
    (keras-team/keras#20585): it averages the first input batch across the
    workers to learn its shapes, an eager collective that raises, and it
    reduces scalar logs along axis 0, which they do not have. This replaces
    those two steps, and only for strategies in multi-worker mode: the
    shapes come from this worker's first replica, and scalars are averaged
    over the workers without an axis.

    It reaches into Keras internals, so it is only applied to the Keras
    versions it was tested with (`_MULTI_WORKER_FIT_TESTED`) and raises a
    `RuntimeError` on others. Idempotent.
    """
    if tensorflow_trainer_steps_replaced():
        return
    version = ".".join(keras.__version__.split(".")[:2])
    if version not in _MULTI_WORKER_FIT_TESTED:
        raise RuntimeError(
            "keras_dna's multi-worker `fit` repair was tested with Keras "
            f"{', '.join(_MULTI_WORKER_FIT_TESTED)}; this is Keras "
            f"{keras.__version__}. Install a tested Keras, or check whether "
            "this Keras fixed keras-team/keras#20585."
        )
    replace_tensorflow_trainer_steps(_multi_worker_reduce, _multi_worker_symbolic_build)


def _multi_worker_reduce(reduce_per_replica):
    """Keras's `reduce_per_replica`, averaging scalars over the workers."""

    def reduce_values(values, strategy, reduction):
        if not _multi_worker(strategy) or reduction not in ("auto", "mean"):
            return reduce_per_replica(values, strategy, reduction)

        def reduce(value):
            if value.shape.rank == 0:
                return strategy.reduce("MEAN", value, axis=None)
            return reduce_per_replica(value, strategy, reduction)

        return tf.nest.map_structure(reduce, values)

    return reduce_values


def _multi_worker_symbolic_build(symbolic_build):
    """Keras's symbolic build, taking the shapes from this worker's first
    replica instead of an eager collective."""

    def build(model, iterator=None, data_batch=None):
        strategy = creation_strategy(model)
        if iterator is not None and strategy is not None and _multi_worker(strategy):
            for _, _, batches in iterator:
                data_batch = tf.nest.map_structure(
                    lambda x: strategy.experimental_local_results(x)[0]
                    if isinstance(x, tf.distribute.DistributedValues)
                    else x,
                    next(batches),
                )
                break
            iterator = None
        return symbolic_build(model, iterator=iterator, data_batch=data_batch)

    return build

"""Distribution, fault tolerance and SavedModel serving, each in subprocesses.

Logical CPU devices and TF_CONFIG must be set before TensorFlow starts, so
every training run is a fresh process running tests/scripts/train_distributed.py.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import keras_dna

SCRIPT = pathlib.Path(__file__).parent / "scripts" / "train_distributed.py"
ROOT = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT = 240
EPOCHS = 4


def _env(**extra):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(ROOT))
    env.pop("TF_CONFIG", None)
    env.update(extra)
    return env


def _train(output_dir, *args, env=None):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--epochs", str(EPOCHS), "--output-dir", str(output_dir), *args],
        capture_output=True, text=True, timeout=TIMEOUT, env=env or _env(),
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return _weights(output_dir)


def _weights(output_dir, role="chief"):
    data = np.load(pathlib.Path(output_dir) / f"weights_{role}.npz")
    weights = [data[k] for k in data.files if k.startswith("arr_")]
    return weights, data["losses"], int(data["replicas"])


def _max_difference(a, b):
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def single_device(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("single"))


def test_mirrored_over_two_devices_matches_single_device(single_device, tmp_path):
    weights, losses, replicas = _train(tmp_path, "--strategy", "mirrored", "--logical-cpus", "2")
    single_weights, single_losses, _ = single_device
    assert replicas == 2
    difference = _max_difference(weights, single_weights)
    print(f"mirrored (2 devices) vs single device: max weight difference {difference:.3g}")
    # Same global batches: only the order of float32 sums differs.
    assert difference < 1e-4
    np.testing.assert_allclose(losses, single_losses, rtol=1e-5)
    assert single_losses[-1] < single_losses[0]


def test_mixed_bfloat16_under_mirrored_strategy_trains(tmp_path):
    weights, losses, replicas = _train(
        tmp_path, "--strategy", "mirrored", "--logical-cpus", "2", "--dtype-policy", "mixed_bfloat16"
    )
    assert replicas == 2
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    assert all(np.isfinite(w).all() for w in weights)


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_multi_worker_fit_gives_identical_workers(single_device, tmp_path):
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    workers = []
    try:
        for index in range(2):
            config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
            workers.append(subprocess.Popen(
                [sys.executable, str(SCRIPT), "--strategy", "multiworker", "--epochs", str(EPOCHS),
                 "--output-dir", str(tmp_path / f"worker{index}")],
                env=_env(TF_CONFIG=config), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            ))
        outputs = [worker.communicate(timeout=TIMEOUT)[0] for worker in workers]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    for worker, output in zip(workers, outputs):
        assert worker.returncode == 0, output[-4000:]
    chief, chief_losses, replicas = _weights(tmp_path / "worker0", "chief")
    other, other_losses, _ = _weights(tmp_path / "worker1", "worker")
    assert replicas == 2
    print(f"multi-worker: chief vs worker max weight difference {_max_difference(chief, other):.3g}, "
          f"vs single device {_max_difference(chief, single_device[0]):.3g}")
    assert _max_difference(chief, other) == 0.0
    np.testing.assert_array_equal(chief_losses, other_losses)
    assert (tmp_path / "worker0" / "model.keras").exists()
    assert not (tmp_path / "worker1" / "model.keras").exists()
    # Two workers of one replica each see the same global batches as one device.
    assert _max_difference(chief, single_device[0]) < 1e-4


def test_killed_training_resumes_from_backup(single_device, tmp_path):
    backup = tmp_path / "backup"
    run = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--epochs", str(EPOCHS), "--backup-dir", str(backup),
         "--pause-after-epoch", "2", "--output-dir", str(run)],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.time() + TIMEOUT
        while not (run / "paused").exists():
            assert process.poll() is None, process.communicate()[0][-4000:]
            assert time.time() < deadline, "training never reached epoch 2"
            time.sleep(0.2)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL
    weights, losses, _ = _train(run, "--backup-dir", str(backup))
    single_weights, single_losses, _ = single_device
    # Only epochs 3 and 4 ran again, and they continued exactly.
    print(f"killed and resumed vs uninterrupted: max weight difference "
          f"{_max_difference(weights, single_weights):.3g}")
    assert len(losses) == EPOCHS - 2
    np.testing.assert_allclose(losses, single_losses[2:], rtol=1e-6)
    assert _max_difference(weights, single_weights) < 1e-6


def test_strategy_specs():
    import tensorflow as tf

    assert keras_dna.distribute.strategy_from_spec("cpu") is tf.distribute.get_strategy()
    assert keras_dna.distribute.strategy_from_spec("auto") is tf.distribute.get_strategy()
    assert keras_dna.distribute.is_chief(tf.distribute.get_strategy())
    with pytest.raises(ValueError, match="spec"):
        keras_dna.distribute.strategy_from_spec("gpu")
    with pytest.raises(ValueError, match="TF_CONFIG"):
        keras_dna.distribute.strategy_from_spec("multiworker")

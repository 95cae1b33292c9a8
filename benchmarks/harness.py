"""The benchmark suite's harness: every script builds, times, isolates and
writes its measurements through these functions.

- `parser`: the options every script has (`--output`);
- `build_with_same_weights`: layers built for the same inputs, all with the
  first one's weights, so that DNA and MHA differ in attention only;
- `blocking`: a step that returns once the backend has finished its work;
- `time_interleaved`: warm-up, then repeats that call every step once in
  turn (drift on this shared machine hits all steps alike); medians and
  spread, and ratios such as DNA/MHA taken within each repeat;
- `in_subprocess`: a function called in a fresh Python process, where peak
  memory or compile time must not include another measurement's;
- `write_results`: OUTPUT.json (settings and rows) and OUTPUT.md (the
  command that produced it, then the table).

Scripts run from the repository root as modules, for example
`python -m benchmarks.speed.layer_step`.
"""

import argparse
import importlib
import json
import os
import pathlib
import resource
import shlex
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = "benchmarks/results"
_RESULT_PREFIX = "RESULT "


def parser(description, output):
    """An `ArgumentParser` with `--output`, defaulting to
    `benchmarks/results/OUTPUT`."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--output", default=f"{RESULTS}/{output}", help="writes OUTPUT.json and OUTPUT.md")
    return p


def build_with_same_weights(layers, query_shape, value_shape=None):
    """Builds every layer of `layers` (a dict; a layer may appear under
    several names) for these shapes and gives each the first layer's
    weights; returns `layers`."""
    value_shape = query_shape if value_shape is None else value_shape
    reference, *others = layers.values()
    for layer in layers.values():
        if not layer.built:
            layer.build(tuple(query_shape), tuple(value_shape))
    for layer in others:
        layer.set_weights(reference.get_weights())
    return layers


def blocking(step):
    """`step`, returning only once the backend has computed its result (for
    TensorFlow, copied to NumPy as a user would read it)."""
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return lambda *a: tf.nest.map_structure(lambda t: t.numpy(), step(*a))
    if backend == "jax":
        import jax

        return lambda *a: jax.block_until_ready(step(*a))
    import torch

    def synchronized(*a):
        result = step(*a)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return result

    return synchronized


def time_interleaved(steps, repeats, ratios=None, warmup=2, calls=1):
    """Times `steps` (`{name: blocking function of no arguments}`).

    Each is called `warmup` times (compiling it), then every repeat calls
    each step `calls` times in turn. Returns `{"steps": {name: {"median_s",
    "spread_s"}}, "ratios": {label: {"median", "spread"}}}`: the median
    seconds per call and the range over repeats; for each `label:
    (numerator, denominator)` of `ratios`, the two steps' ratio in each
    repeat, its median and range.
    """
    for step in steps.values():
        for _ in range(warmup):
            step()
    seconds = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(calls):
                step()
            seconds[name].append((time.perf_counter() - start) / calls)
    return {
        "steps": {name: {"median_s": statistics.median(t), "spread_s": max(t) - min(t)}
                  for name, t in seconds.items()},
        "ratios": {label: _ratio(seconds[a], seconds[b]) for label, (a, b) in (ratios or {}).items()},
    }


def _ratio(numerators, denominators):
    ratios = [a / b for a, b in zip(numerators, denominators)]
    return {"median": statistics.median(ratios), "spread": max(ratios) - min(ratios)}


def peak_memory_gib():
    """This process's peak resident memory so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def in_subprocess(function, *arguments, backend=None, environment=None, memory_limit_gib=None):
    """`function(*arguments)` (a module-level function of a benchmark
    module; arguments and result JSON) called in a fresh Python process,
    with `KERAS_BACKEND=backend` and `environment` added, its address space
    limited to `memory_limit_gib`. A failure returns `{"error": message}`.
    """
    env = dict(os.environ, **(environment or {}))
    if backend:
        env["KERAS_BACKEND"] = backend
    command = [sys.executable, "-m", "benchmarks.harness", _module_name(function),
               function.__name__, json.dumps(arguments)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT,
                          preexec_fn=memory_limit_gib and _address_space_limit(memory_limit_gib))
    results = [line for line in done.stdout.splitlines() if line.startswith(_RESULT_PREFIX)]
    if done.returncode or not results:
        return {"error": _error(done)}
    return json.loads(results[-1][len(_RESULT_PREFIX):])


def _module_name(function):
    if function.__module__ == "__main__":
        return sys.modules["__main__"].__spec__.name
    return function.__module__


def _address_space_limit(gib):
    def apply():
        limit = int(gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return apply


def _error(done):
    """The exception's name and message, or how the process ended."""
    for line in reversed(done.stderr.strip().splitlines()):
        kind, _, message = line.partition(": ")
        if kind.endswith(("Error", "Exception")) and " " not in kind:
            return f"{kind.rsplit('.', 1)[-1]}: {message.split(' [Op:')[0]}"[:160]
    if done.returncode < 0:
        return f"killed by signal {-done.returncode}"
    return f"exit code {done.returncode}"


def write_results(args, data, table, argv=None):
    """Writes `args.output`.json (`data`, with the settings `args`) and
    `args.output`.md (the command, then `table`), and prints the table."""
    output = pathlib.Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k != "output"}
    output.with_suffix(".json").write_text(json.dumps({"settings": settings, **data}, indent=1))
    output.with_suffix(".md").write_text(f"Command: `{_command(argv)}`\n\n{table}\n")
    print(table)


def _command(argv):
    main = sys.modules["__main__"]
    script = f"-m {main.__spec__.name}" if main.__spec__ else sys.argv[0]
    return f"python {script} {shlex.join(sys.argv[1:] if argv is None else argv)}".strip()


def markdown_table(title, header, rows):
    """`title`, then a Markdown table: `header` the column names, `rows`
    lists of cells (strings)."""
    lines = [title, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines).lstrip()


def _call_from_command_line():
    module, name, arguments = sys.argv[1:]
    result = getattr(importlib.import_module(module), name)(*json.loads(arguments))
    print(_RESULT_PREFIX + json.dumps(result), flush=True)


if __name__ == "__main__":
    _call_from_command_line()

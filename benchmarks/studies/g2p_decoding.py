"""Greedy decoding time per word of the grapheme-to-phoneme example: through
the DNA cache against rerunning the whole decoder for every phoneme.

The example's model (width 64, 4 heads, 2 blocks, untrained: the time does
not depend on the weights, every word decodes MAX_PHONEMES - 1 steps) and
its SavedModel's `serve` function, on CMU dictionary words, batches of 1024;
both decodings in one process, alternating, median over repeats.

    python benchmarks/g2p_decoding.py --attention double --words 4096 --repeats 5
"""

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--attention", default="double")
    p.add_argument("--words", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)

    import grapheme_to_phoneme as g2p
    import tensorflow as tf

    pairs = g2p.load_pairs(args.words)
    letters = sorted({c for word, _ in pairs for c in word})
    phonemes = sorted({q for _, qs in pairs for q in qs}) + [g2p.START, g2p.END]
    model = g2p.build_model(args.attention, len(letters) + 2, len(phonemes) + 2)
    spellers = {d: g2p.Speller(model, letters, phonemes, d) for d in g2p.DECODINGS}
    words = [word for word, _ in pairs]
    times = {d: [] for d in spellers}
    for speller in spellers.values():
        speller.serve(tf.constant(words[:2]))  # trace
    for _ in range(args.repeats):
        for decoding, speller in spellers.items():
            start = time.perf_counter()
            for first in range(0, len(words), 1024):
                speller.serve(tf.constant(words[first : first + 1024])).numpy()
            times[decoding].append(1e3 * (time.perf_counter() - start) / len(words))
    result = {d: statistics.median(t) for d, t in times.items()}
    result["rerun / cached"] = result["rerun"] / result["cached"]
    print(json.dumps({"args": vars(args), "ms_per_word": result}, indent=1))


if __name__ == "__main__":
    main()

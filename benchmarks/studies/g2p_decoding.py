"""Greedy decoding time per word of the grapheme-to-phoneme example: through
the DNA cache against rerunning the whole decoder for every phoneme.

The example's model (width 64, 4 heads, 2 blocks, untrained: the time does
not depend on the weights, every word decodes MAX_PHONEMES - 1 steps) and
its SavedModel's `serve` function, on CMU dictionary words, batches of 1024;
both decodings in one process, interleaved, median over repeats.

    python -m benchmarks.studies.g2p_decoding --attention double --words 4096 --repeats 5
"""

import os
import sys

from benchmarks import harness

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The examples are scripts, not a package.
sys.path.insert(0, str(harness.ROOT / "examples"))


def main(argv=None):
    p = harness.parser(__doc__.splitlines()[0], "studies/g2p_decoding")
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
    batches = [tf.constant(words[first : first + 1024]) for first in range(0, len(words), 1024)]
    steps = {d: lambda speller=speller: [speller.serve(b).numpy() for b in batches]
             for d, speller in spellers.items()}
    timing = harness.time_interleaved(steps, args.repeats, {"rerun / cached": ("rerun", "cached")},
                                      warmup=1)
    ms_per_word = {d: 1e3 * t["median_s"] / len(words) for d, t in timing["steps"].items()}
    table = harness.markdown_table(
        f"Greedy decoding, {args.attention}, {len(words)} words", ["decoding", "ms per word"],
        [[d, f"{ms:.3f}"] for d, ms in ms_per_word.items()]
        + [["rerun / cached", f"{timing['ratios']['rerun / cached']['median']:.2f}"]])
    harness.write_results(args, {"ms_per_word": ms_per_word, "ratios": timing["ratios"]}, table, argv)


if __name__ == "__main__":
    main()

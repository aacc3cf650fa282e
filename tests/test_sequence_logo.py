"""Sequence logos: per-position frequencies and information content, and the letters' stacked heights."""

import math

import numpy as np
import pytest

from genalign.sequence_logo import information_content, position_frequencies, sequence_logo


def test_frequencies_and_information_content_by_hand():
    frequencies = position_frequencies(["AC", "AG", "AT", "AA"], "ACGT")
    assert frequencies[0] == {"A": 1.0, "C": 0.0, "G": 0.0, "T": 0.0}
    assert frequencies[1] == {"A": 0.25, "C": 0.25, "G": 0.25, "T": 0.25}
    assert information_content(frequencies[0]) == 2.0  # conserved: log2(4) bits
    assert information_content(frequencies[1]) == 0.0  # uniform: nothing
    assert math.isclose(information_content({"A": 0.5, "C": 0.5, "G": 0.0, "T": 0.0}), 1.0)


def test_a_conserved_position_is_drawn_tall_and_a_uniform_one_flat():
    """Ink per column of the rendered logo: the conserved first half must carry far more than the uniform
    second half (a logo that ignored information content, stacking frequencies to full height, would not)."""
    sequences = ["AAAA" + tail for tail in ("ACGT", "CGTA", "GTAC", "TACG")]
    image = np.asarray(sequence_logo(sequences, "ACGT", per_row=8).convert("L"), dtype=float)
    ink = (image < 200).sum(0)
    columns = np.nonzero(ink)[0]
    left, right = columns.min(), columns.max()
    middle = (left + right) // 2
    assert ink[left:middle].sum() > 5 * ink[middle:right].sum()


@pytest.mark.parametrize("sequences, message", [(["AC", "A"], "one length"), (["AX"], "not in the alphabet"),
                                                ([], "at least one")])
def test_bad_input_is_named(sequences, message):
    with pytest.raises(ValueError, match=message):
        position_frequencies(sequences, "ACGT")

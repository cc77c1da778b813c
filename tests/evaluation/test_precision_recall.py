"""Our k-NN precision and recall (Kynkaanniemi et al. 2019) against torch-fidelity and against answers worked out by
hand, with cases whose answer changes when generated and reference are swapped."""

import pytest
import torch
import torch_fidelity
from torch_fidelity.metric_prc import prc_features_to_metric

from ddpm_fashion.evaluation.precision_recall import precision_recall

# Which argument of torch-fidelity's prc_features_to_metric is the generated set, read from its metric_prc.py:
# 0.4.0 says "features_1 is GENERATED (input1), features_2 is REAL (input2)"; 0.3.0 said features_1 is REAL.
FIDELITY_GENERATED_ARGUMENT = {"0.4.0": 0, "0.3.0": 1}


def fidelity_precision_recall(generated, reference, k):
    """Get torch-fidelity's precision and recall, passing the two sets in the installed release's order."""
    version = torch_fidelity.__version__
    assert version in FIDELITY_GENERATED_ARGUMENT, (
        f"torch-fidelity {version}: read which argument torch_fidelity/metric_prc.py:prc_features_to_metric treats "
        f"as generated and add it to FIDELITY_GENERATED_ARGUMENT")
    arguments = (generated, reference) if FIDELITY_GENERATED_ARGUMENT[version] == 0 else (reference, generated)
    result = prc_features_to_metric(*(features.double() for features in arguments), prc_neighborhood=k,
                                    prc_batch_size=10000, save_cpu_ram=False, verbose=False)
    return result["precision"], result["recall"]


def line(*positions, height=5.0):
    """Get points at positions on a line, as 2-D features [N, 2] (the constant second coordinate cancels)."""
    return torch.tensor([[position, height] for position in positions], dtype=torch.float64)


# Two modes of four points: with k = 3 the end points' balls reach 3, the inner points' 2.
TWO_MODES = line(0, 1, 2, 3, 100, 101, 102, 103)
# Generated collapsed onto the first mode. Their radii (3rd neighbour among themselves): 2, 1.5, 1, 2.
ONE_MODE = line(0.5, 1.0, 1.5, 2.5)


def test_mode_collapse_is_precise_but_recalls_half_and_swapping_the_arguments_swaps_the_answer():
    # Every generated point lies within 3 of reference point 0; the generated balls cover reference 0..3 (4 of 8).
    assert precision_recall(ONE_MODE, TWO_MODES) == {"precision": 1.0, "recall": 0.5}
    assert precision_recall(TWO_MODES, ONE_MODE) == {"precision": 0.5, "recall": 1.0}


def test_a_point_exactly_on_a_ball_boundary_is_inside():
    # 106 is exactly 3 from reference point 103, whose ball has radius 3; 106.5 is 3.5 from it (and 4.5 from 102,
    # radius 2), so outside.
    assert precision_recall(line(0.5, 1.0, 1.5, 106.0), TWO_MODES)["precision"] == 1.0
    assert precision_recall(line(0.5, 1.0, 1.5, 106.5), TWO_MODES)["precision"] == 0.75
    # Float32 features give the same answers (these coordinates are exact in both).
    assert precision_recall(line(0.5, 1.0, 1.5, 106.0).float(), TWO_MODES.float())["precision"] == 1.0


def test_duplicates_are_neighbours_and_k_sets_the_ball():
    # Reference 0, 0, 0, 10, 10: with k = 2 each 0's ball has radius 0 (two duplicates), each 10's radius 10.
    reference = line(0, 0, 0, 10, 10)
    assert precision_recall(line(0, 0.5, 20, 21, 30), reference, k=2)["precision"] == 3 / 5
    # With k = 1 the 10s have radius 0 too: only exact hits count.
    assert precision_recall(line(0, 0.5, 10, 21, 30), reference, k=1)["precision"] == 2 / 5


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_equals_torch_fidelity_on_random_features(seed, k):
    generator = torch.Generator().manual_seed(seed)
    # Overlapping clouds of different spread and size, so neither number is 0 or 1.
    reference = torch.randn(300, 16, generator=generator)
    generated = torch.randn(240, 16, generator=generator) * 0.8 + 0.4
    ours = precision_recall(generated, reference, k=k)
    precision, recall = fidelity_precision_recall(generated, reference, k)
    # torch-fidelity averages in float32: compare the counts of points inside, which must be equal.
    assert round(ours["precision"] * len(generated)) == round(precision * len(generated))
    assert round(ours["recall"] * len(reference)) == round(recall * len(reference))
    assert ours["precision"] == pytest.approx(precision, abs=1e-6) and ours["recall"] == pytest.approx(recall, abs=1e-6)
    assert 0 < ours["precision"] < 1 and 0 < ours["recall"] < 1 and ours["precision"] != ours["recall"]


def test_chunk_size_does_not_change_the_answer():
    generator = torch.Generator().manual_seed(3)
    reference = torch.randn(57, 5, generator=generator)
    # Duplicates and shared points make ties, the case where block-wise merging could go wrong.
    generated = torch.cat([reference[:10], reference[:10], torch.randn(23, 5, generator=generator) * 1.5])
    expected = precision_recall(generated, reference, k=3, chunk=10000)
    assert 0 < expected["precision"] < 1 and 0 < expected["recall"] < 1
    for chunk in (1, 2, 3, 4, 7, 43, 56, 57, 58):
        assert precision_recall(generated, reference, k=3, chunk=chunk) == expected, chunk
    assert expected["precision"] == pytest.approx(fidelity_precision_recall(generated, reference, 3)[0], abs=1e-6)


@pytest.mark.parametrize("generated, reference, k, fragment", [
    (line(1, 2, 3), TWO_MODES, 3, "needs at least 4 generated points, got 3"),
    (ONE_MODE, line(1), 1, "needs at least 2 reference points, got 1"),
    (ONE_MODE, torch.zeros(8, 3), 3, "same dimension, got 2 and 3"),
    (ONE_MODE, torch.arange(8.0), 3, "reference features must be a 2-D tensor"),
    (line(0, 1, 2, float("nan")), TWO_MODES, 3, "generated features must be finite"),
    (ONE_MODE, TWO_MODES, 0, "k must be a positive integer, got 0"),
])
def test_bad_input_raises_one_line(generated, reference, k, fragment):
    with pytest.raises(ValueError, match=fragment) as error:
        precision_recall(generated, reference, k=k)
    assert "\n" not in str(error.value)


@pytest.mark.usefixtures("one_thread")
def test_precision_recall_follows_the_k_nearest_neighbour_definition():
    # Reference points on a line at 0..9: with k=3 an inner point's ball has radius 2, an end point's radius 3.
    reference = torch.arange(10.0)[:, None]
    inside = torch.tensor([[2.5], [7.0], [-3.0], [11.0]])
    half_outside = torch.tensor([[2.5], [30.0], [7.0], [-20.0]])
    assert precision_recall(inside, reference)["precision"] == 1.0
    assert precision_recall(half_outside, reference)["precision"] == 0.5
    # Recall: reference points inside balls around the generated points (radius: the 3rd neighbour among them).
    assert precision_recall(torch.arange(0.0, 10.0, 2.0)[:, None], reference)["recall"] == 1.0
    clustered = torch.tensor([[0.0], [0.1], [0.2], [0.3], [0.4]])  # radii 0.2 to 0.3: only point 0 is covered
    assert precision_recall(clustered, reference)["recall"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="at least 4"):
        precision_recall(inside[:3], reference)

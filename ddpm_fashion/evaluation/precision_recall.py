"""k-nearest-neighbour precision and recall of Kynkaanniemi et al. 2019 (arXiv:1904.06991), section 2.

Each feature set stands for a manifold: the union of balls around its points, each ball reaching the point's k-th
nearest neighbour in the same set. A point is inside when its distance to some point of the set is <= that point's
radius (the paper's f(phi, Phi), ties inside). Precision is the fraction of generated points inside the reference
manifold; recall the fraction of reference points inside the generated one.

Owned here rather than taken from torch-fidelity, whose `prc_features_to_metric` changed between releases which of
its two arguments is the real set: swapped arguments swap the two numbers without any error.
"""

import torch

from ddpm_fashion.guards.inputs import check_int

# Rows and columns of the distance matrix held at once: a 2000 x 2000 float64 block is 32 MB, whatever N and M are.
DISTANCE_CHUNK = 2000


def precision_recall(generated: torch.Tensor, reference: torch.Tensor, k: int = 3, chunk: int = DISTANCE_CHUNK) -> dict:
    """Get k-NN precision and recall {"precision", "recall"} of generated features [N, D] against reference [M, D]."""
    check_int("k", k)
    check_int("chunk", chunk)
    generated, reference = _checked_features("generated", generated, k), _checked_features("reference", reference, k)
    if generated.shape[1] != reference.shape[1]:
        raise ValueError(f"generated and reference features must have the same dimension, got "
                         f"{generated.shape[1]} and {reference.shape[1]}")
    precision = _fraction_inside(generated, reference, _kth_neighbour_radii_squared(reference, k, chunk), chunk)
    recall = _fraction_inside(reference, generated, _kth_neighbour_radii_squared(generated, k, chunk), chunk)
    return {"precision": precision, "recall": recall}


def _checked_features(name: str, features: torch.Tensor, k: int) -> torch.Tensor:
    """Get features [N, D] on the CPU, or raise a ValueError unless they are finite and N >= k + 1."""
    if not isinstance(features, torch.Tensor) or features.ndim != 2:
        raise ValueError(f"{name} features must be a 2-D tensor [N, D], got {getattr(features, 'shape', features)!r}")
    if len(features) < k + 1:  # each point's ball reaches its k-th neighbour, itself not counted
        raise ValueError(f"precision/recall with k={k} needs at least {k + 1} {name} points, got {len(features)}")
    features = features.detach().cpu()
    if not torch.isfinite(features).all():
        raise ValueError(f"{name} features must be finite, got nan or inf")
    return features


def _squared_distances(rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """Get the squared Euclidean distances [len(rows), len(columns)] between two chunks, in float64."""
    rows, columns = rows.double(), columns.double()
    # |a - b|^2 = |a|^2 + |b|^2 - 2 a.b: one matrix product; float64 keeps the cancellation harmless, and the
    # clamp keeps a near-duplicate's tiny negative at 0.
    squared = (rows * rows).sum(1)[:, None] + (columns * columns).sum(1)[None, :] - 2 * rows @ columns.T
    return squared.clamp_(min=0)


def _kth_neighbour_radii_squared(features: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Get each point's squared distance to its k-th nearest other point of the same set [N], the ball radii."""
    radii = []
    for start in range(0, len(features), chunk):
        rows = features[start:start + chunk]
        # The k smallest squared distances seen so far per row, merged block by block (values, so ties count twice).
        nearest = torch.full((len(rows), k), float("inf"), dtype=torch.float64)
        for column_start in range(0, len(features), chunk):
            block = _squared_distances(rows, features[column_start:column_start + chunk])
            if column_start == start:
                block.fill_diagonal_(float("inf"))  # a point is not its own neighbour; its duplicates are
            nearest = torch.cat([nearest, block], dim=1).topk(k, dim=1, largest=False).values
        radii.append(nearest[:, k - 1])
    return torch.cat(radii)


def _fraction_inside(points: torch.Tensor, manifold: torch.Tensor, radii_squared: torch.Tensor, chunk: int) -> float:
    """Get the fraction of points within the ball (distance <= radius) of at least one manifold point."""
    inside_count = 0
    for start in range(0, len(points), chunk):
        rows = points[start:start + chunk]
        inside = torch.zeros(len(rows), dtype=torch.bool)
        for column_start in range(0, len(manifold), chunk):
            block = _squared_distances(rows, manifold[column_start:column_start + chunk])
            inside |= (block <= radii_squared[column_start:column_start + chunk]).any(dim=1)
        inside_count += int(inside.sum())
    return inside_count / len(points)

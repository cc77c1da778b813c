"""ddpm_fashion/sampling/own_vs_library.py: each run of the comparison is held to its own tolerance. The `compare`
command end to end: tests/commands/test_compare.py."""

import math

import pytest

from ddpm_fashion.sampling import own_vs_library

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_each_run_is_held_to_its_own_tolerance():
    def run(mode, max_abs_diff):
        tolerance = own_vs_library.LAYOUT_TOLERANCE if mode == "fast" else own_vs_library.MAX_ABS_DIFF_TOLERANCE
        return {"unet": "own", "scheduler": "own", "mode": mode, "max_abs_diff": max_abs_diff, "tolerance": tolerance}

    report = {"runs": [run("reference", 5e-5), run("fast", 5e-5), run("reference", 5e-6), run("fast", 2e-3),
                       run("reference", float("nan"))]}
    failed = own_vs_library.mismatched_runs(report)
    assert [(r["mode"], r["max_abs_diff"]) for r in failed[:2]] == [("reference", 5e-5), ("fast", 2e-3)]
    assert len(failed) == 3 and math.isnan(failed[2]["max_abs_diff"])

"""ddpm_fashion/sampling/reverse_process_gif.py: which steps of the reverse process become GIF frames."""

import pytest

from ddpm_fashion.sampling import reverse_process_gif

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_gif_frame_steps_spread_over_the_run_and_keep_both_ends():
    steps = reverse_process_gif.gif_frame_steps(1000)
    assert len(steps) == reverse_process_gif.MAX_GIF_FRAMES and steps[0] == 0 and steps[-1] == 999
    assert reverse_process_gif.gif_frame_steps(5) == [0, 1, 2, 3, 4]
    assert reverse_process_gif.gif_frame_steps(1) == [0]

"""The training session's clock: img/s so far, the first step apart (torch.compile compiles in it), the time left."""

import time

import torch


class Clock:
    """The session's timing: img/s so far, the first step apart (torch.compile compiles in it), the time left."""

    # Steps timed before the expected duration is printed: the first one (compilation, warm-up) is left out.
    STEPS_TO_TIME = 20

    def __init__(self, progress):
        self.start, self.start_images = time.time(), progress["images_seen"]
        self.earlier_seconds = progress["train_seconds"]  # None: resumed from a checkpoint that did not record it
        self.first_step = None  # (seconds, images seen) at the session's first step
        self.steps = 0
        self.last_checkpoint = 0.0  # session seconds at the last checkpoint (the session's start counts as one)

    def seconds(self):
        """Get the seconds since the session started."""
        return time.time() - self.start

    def tick(self, progress):
        """Count an optimizer step; update the run's training seconds; get the session's img/s."""
        seconds = self.seconds()
        self.steps += 1
        self.first_step = self.first_step or (seconds, progress["images_seen"])
        if self.earlier_seconds is not None:  # the run's training time over every session, kept in checkpoints
            progress["train_seconds"] = self.earlier_seconds + seconds
        return (progress["images_seen"] - self.start_images) / seconds

    def checkpoint_due(self, minutes) -> bool:
        """Whether `minutes` (None: never) passed since the last checkpoint of this session, or its start."""
        return minutes is not None and self.seconds() - self.last_checkpoint >= 60 * minutes

    def checkpoint_saved(self) -> None:
        """Restart the time since the last checkpoint."""
        self.last_checkpoint = self.seconds()

    def just_timed(self) -> bool:
        """Whether this step completed the timing of the session's first steps."""
        return self.steps == self.STEPS_TO_TIME

    def seconds_per_step(self) -> float:
        """Get the mean seconds of the session's steps after its first."""
        return (self.seconds() - self.first_step[0]) / (self.steps - 1)

    def last_step_that_fits(self, minutes, step, progress) -> int:
        """Get the step at which the run's training time reaches `minutes`, at this session's seconds per step (at
        least step + 1). The time so far is every session's where the checkpoints recorded it, else this one's."""
        seconds_left = 60 * minutes - (progress["train_seconds"] or self.seconds())
        return step + max(1, int(seconds_left / self.seconds_per_step()))

    def expected_duration(self, steps_left):
        """Get the line saying when the run ends, once the first steps are timed (else None)."""
        if not self.just_timed() or steps_left == 0:
            return None
        per_step = self.seconds_per_step()
        left = per_step * steps_left
        duration = f"{left / 3600:.1f} h" if left >= 3600 else f"{left / 60:.0f} min"
        return (f"timed {self.steps - 1} steps after the first: {per_step:.2f} s per step, so the {steps_left} steps "
                f"left take about {duration} on this machine as loaded now")

    def done_line(self, step, progress, output_dir):
        """Get the closing line: steps, images, session seconds and img/s with and without the first step."""
        wall = self.seconds()
        first_seconds, first_images = self.first_step or (wall, progress["images_seen"])
        return (f"done: {step} steps, {progress['images_seen']} images seen, {wall:.0f} s this session, "
                f"{(progress['images_seen'] - self.start_images) / max(wall, 1e-9):.1f} img/s "
                f"({(progress['images_seen'] - first_images) / max(wall - first_seconds, 1e-9):.1f} after the first "
                f"step, which took {first_seconds:.1f} s){peak_gpu_memory()}; pipeline in {output_dir}")


def peak_gpu_memory() -> str:
    """Get ", peak GPU memory X GiB" (the most this process's tensors held on its GPU), or "" without CUDA."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return ""
    return f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"

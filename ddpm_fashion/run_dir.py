"""The on-disk layout of a training run, and the rules that keep it safe.

    output_dir/
        train_config.yaml          the resolved config (marks the folder as a ddpm_fashion run)
        model_index.json unet/ scheduler/ README.md samples.png loss.png   the published DDPMPipeline
        checkpoints/checkpoint-<step>/   accelerator.save_state + our trainer state
        logs/                      TensorBoard

Everything is written under a temporary name and renamed into place, so a process killed at any moment leaves
either the old file set or the new one, never half of one; `latest` only ever sees complete checkpoints.
"""

import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

CONFIG_FILE = "train_config.yaml"
CHECKPOINTS = "checkpoints"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
STAGING_PREFIX = ".tmp-"


def check_output_dir(output_dir: str, resuming: bool) -> None:
    """Refuse an output_dir we must not write to, before anything is written (one-line ValueError)."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"output_dir {path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not (path / CONFIG_FILE).is_file():
        raise ValueError(f"output_dir {path} is not empty and holds no {CONFIG_FILE}, so it is not a ddpm_fashion "
                         "run; choose a new or empty directory")
    if path.is_dir() and checkpoint_dirs(path) and not resuming:
        raise ValueError(f"output_dir {path} has checkpoints from an earlier run; pass --resume_from_checkpoint "
                         "latest to continue it, or choose another output_dir")
    existing = path.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"output_dir {path} cannot be created: {existing} is not a directory")
    try:  # os.access says yes to root even on read-only mounts, so ask the file system itself
        tempfile.TemporaryDirectory(dir=existing, prefix=STAGING_PREFIX).cleanup()
    except OSError as error:
        raise ValueError(f"output_dir {path} is not writable: {error.strerror} ({existing})") from None


def checkpoint_dirs(output_dir) -> list:
    """Complete checkpoints of a run, oldest first (staging folders are never listed)."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(output_dir: str, resume_from_checkpoint: Optional[str]) -> Optional[Path]:
    """Map `latest` or a path to a complete checkpoint folder; None means start from scratch."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        found = checkpoint_dirs(output_dir)
        return found[-1] if found else None
    path = Path(resume_from_checkpoint)
    if not path.is_dir() or not CHECKPOINT_PATTERN.match(path.name):
        raise ValueError(f"resume_from_checkpoint {path} is not a checkpoint folder (checkpoint-<step>); "
                         "use 'latest' or a path under output_dir/checkpoints")
    return path


def prune_checkpoints(output_dir: str, keep: Optional[int]) -> None:
    """Delete the oldest checkpoints beyond `keep` (None keeps all)."""
    found = checkpoint_dirs(output_dir)
    if keep is not None:
        for old in found[: max(0, len(found) - keep)]:
            shutil.rmtree(old)


def remove_stale_staging(folder) -> None:
    """Remove temporary folders left by a process that was killed while writing."""
    folder = Path(folder)
    if folder.is_dir():
        for stale in folder.glob(STAGING_PREFIX + "*"):
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()


@contextmanager
def staged_dir(final: Path):
    """Yield a temporary folder beside `final`; rename it to `final` only if the block completes."""
    final = Path(final)
    staging = final.with_name(STAGING_PREFIX + final.name)
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)


def publish(staging: Path, output_dir: Path) -> None:
    """Move every entry of a complete staging folder into output_dir, replacing older versions.

    The previous entries are moved aside first and deleted only once all new ones are in place.
    """
    output_dir, staging = Path(output_dir), Path(staging)
    previous = output_dir / (STAGING_PREFIX + "previous")
    if previous.exists():
        shutil.rmtree(previous)
    previous.mkdir()
    for entry in sorted(staging.iterdir()):
        target = output_dir / entry.name
        if target.exists():
            os.replace(target, previous / entry.name)
        os.replace(entry, target)
    shutil.rmtree(previous)
    staging.rmdir()

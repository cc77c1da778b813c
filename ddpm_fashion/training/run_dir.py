"""The on-disk layout of a training run, and the rules that keep it safe.

    output_dir/
        ddpm_fashion_run.json      marks the folder as a ddpm_fashion run (format and version): only we write it
        .lock                      held (flock) by the one process training into the folder
        train_config.yaml          the resolved config
        model_index.json unet/ scheduler/ README.md samples.png loss.png   the published DDPMPipeline
        checkpoints/checkpoint-<step>/   accelerator.save_state + our trainer state + manifest.json
        logs/                      TensorBoard

The rules: a folder is only written to if it is absent, empty, or marked as ours; a run folder holding an earlier
run's checkpoints or published pipeline is only continued (--resume_from_checkpoint) or, when the user asks with
--overwrite_output_dir, trained over; a second run into a locked folder is refused; nothing in it changes until
every check of the run has passed; checkpoints and the pipeline are written under a temporary name and renamed
into place, so a process killed at any moment leaves the old set or the new one;
every checkpoint carries a manifest (size and SHA-256 of each file), so `latest` only ever resumes from one that is
provably complete; resuming from a checkpoint older than the newest is refused (continuing it would prune the
newer ones); publishing replaces only the files it writes.
"""

import json
import os
import re
import shutil
from pathlib import Path
from typing import List, Optional, Tuple

from ddpm_fashion.guards.files import FolderLock, check_name_fits, probe_writable, read_json_object, sha256_of_file

MARKER_FILE = "ddpm_fashion_run.json"
OVERWRITE_OPTION = "--overwrite_output_dir"
RUN_FORMAT = "ddpm_fashion run"
RUN_FORMAT_VERSION = 1
CONFIG_FILE = "train_config.yaml"
CHECKPOINTS = "checkpoints"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
# What the trainer publishes into output_dir (a standard DDPMPipeline plus its pictures and model card).
PIPELINE_ENTRIES = ("model_index.json", "unet", "scheduler", "README.md", "samples.png", "loss.png")
# What else a run folder holds; readers of a model depend on all of it.
RUN_ENTRIES = (CONFIG_FILE, CHECKPOINTS, "logs", FolderLock.NAME, MARKER_FILE)


def protected_entries(model_dir, only_if_model: bool = False) -> list:
    """Get the files and folders of a pipeline, run or checkpoint folder that no command's output may replace.

    A checkpoint (it holds a manifest, or from before manifests a trainer state) is protected whole. With
    only_if_model (any folder above an output), a folder is a model folder only if it holds one of those, a
    pipeline's model_index.json or our run marker; any other folder gives [].
    """
    folder = Path(model_dir)

    def holds(name: str) -> bool:
        try:
            return (folder / name).is_file()
        except OSError:  # a folder we may not look into is no model of ours to protect
            return False

    if holds(MANIFEST) or holds(TRAINER_STATE):
        return [folder]
    if only_if_model and not (holds(PIPELINE_ENTRIES[0]) or holds(MARKER_FILE)):
        return []
    return [folder / name for name in PIPELINE_ENTRIES + RUN_ENTRIES]


def is_run_folder(path: Path) -> bool:
    """Whether a folder was made by this trainer: it holds our marker."""
    try:
        return read_json_object(Path(path) / MARKER_FILE).get("format") == RUN_FORMAT
    except ValueError:  # missing, unreadable or not ours
        return False


def holds_pipeline(path: Path) -> bool:
    """Whether a folder holds a published pipeline (its model_index.json)."""
    return (Path(path) / PIPELINE_ENTRIES[0]).is_file()


def looks_like_checkpoint(path: Path) -> bool:
    """Whether a folder is a checkpoint (or a copy of one) rather than a run folder."""
    path = Path(path)
    return bool(CHECKPOINT_PATTERN.match(path.name)) or (path / TRAINER_STATE).is_file() or (path / MANIFEST).is_file()


def check_output_dir(output_dir: str, resuming: bool, overwrite: bool = False) -> None:
    """Refuse an output_dir we must not write to, before anything is written (one-line ValueError).

    A run folder holding an earlier run (its checkpoints or its published pipeline) is only continued
    (`resuming`) or, with `overwrite`, trained over from scratch; never silently replaced.
    """
    path = Path(output_dir)
    check_name_fits(path, f"output_dir {path}")
    if path.is_symlink() and not path.exists():
        raise ValueError(f"output_dir {path} is a symbolic link to {os.readlink(path)}, which does not exist; "
                         "create its target or give another output_dir")
    if path.exists() and not path.is_dir():
        raise ValueError(f"output_dir {path} exists and is not a directory")
    if path.is_dir():
        FolderLock.check_free(path, f"output_dir {path}")
    if path.is_dir() and looks_like_checkpoint(path):
        raise ValueError(f"output_dir {path} is a checkpoint, not a run folder; to continue its run pass the run "
                         f"folder as --output_dir and this path as --resume_from_checkpoint")
    if path.is_dir() and any(path.iterdir()) and not is_run_folder(path):
        what = "holds a pipeline that this trainer did not make" if holds_pipeline(path) else "is not empty"
        raise ValueError(f"output_dir {path} {what} and is not a ddpm_fashion run (it has no {MARKER_FILE}); "
                         "choose a new or empty directory")
    if path.is_dir() and not overwrite:
        earlier = "checkpoints" if checkpoint_dirs(path) else "a published pipeline" if holds_pipeline(path) else None
        if earlier == "checkpoints" and not resuming:
            raise ValueError(f"output_dir {path} has checkpoints from an earlier run; pass --resume_from_checkpoint "
                             f"latest to continue it, {OVERWRITE_OPTION} to train a new run over it, or choose another "
                             "output_dir")
        if earlier == "a published pipeline":
            raise ValueError(f"output_dir {path} holds the published pipeline of an earlier run and no checkpoint to "
                             f"continue; pass {OVERWRITE_OPTION} to train a new run over it, or choose another "
                             "output_dir")
    existing = path.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"output_dir {path} cannot be created: {existing} is not a directory")
    probe_writable(existing, f"output_dir {path}")


def remove_if_nothing_saved(output_dir) -> None:
    """Remove a run folder that holds only what a run writes at its start (marker, lock, config, empty log folders):
    a run that failed before its first checkpoint, in a folder it created."""
    path = Path(output_dir)
    started = {MARKER_FILE, FolderLock.NAME, CONFIG_FILE, CHECKPOINTS, "logs"}
    logs_or_checkpoints = [p for name in ("logs", CHECKPOINTS) for p in (path / name).rglob("*") if p.is_file()]
    if path.is_dir() and {p.name for p in path.iterdir()} <= started and not logs_or_checkpoints:
        shutil.rmtree(path)


def replaced_by_overwrite(output_dir) -> List[str]:
    """Get what `--overwrite_output_dir` replaces in a run folder: its checkpoints at the start, its train_config.yaml
    and published pipeline files as the new run writes its own (other files are kept)."""
    path = Path(output_dir)
    replaced = [str(p.relative_to(path)) for p in checkpoint_dirs(path)]
    return replaced + [name for name in PIPELINE_ENTRIES + (CONFIG_FILE,) if (path / name).exists()]


def checkpoint_dirs(output_dir) -> list:
    """Complete checkpoints of a run, oldest first (staging folders are never listed)."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def checkpoint_step(path: Path) -> int:
    """Get the step number in a checkpoint folder's name."""
    return int(CHECKPOINT_PATTERN.match(Path(path).name).group(1))


def write_manifest(folder: Path) -> None:
    """Record the size and SHA-256 of every file in a finished checkpoint folder, as the proof it is complete."""
    folder = Path(folder)
    files = {str(path.relative_to(folder)): {"bytes": path.stat().st_size, "sha256": sha256_of_file(path)}
             for path in sorted(folder.rglob("*")) if path.is_file()}
    (folder / MANIFEST).write_text(json.dumps({"format": RUN_FORMAT, "files": files}, indent=1) + "\n")


def verify_checkpoint(folder: Path) -> None:
    """Raise a one-line ValueError naming the file unless a checkpoint is complete and readable.

    With a manifest every file must have its recorded size and SHA-256; a checkpoint from before manifests must at
    least have a readable trainer state and config.
    """
    folder = Path(folder)
    if (folder / MANIFEST).is_file():
        files = read_json_object(folder / MANIFEST, f"checkpoint {folder}: {MANIFEST}").get("files")
        if not isinstance(files, dict) or not files:
            raise ValueError(f"checkpoint {folder} is damaged: {MANIFEST} lists no files")
        for name, expected in files.items():
            path = folder / name
            if not path.is_file():
                raise ValueError(f"checkpoint {folder} is incomplete: {name} is missing")
            if path.stat().st_size != expected.get("bytes") or sha256_of_file(path) != expected.get("sha256"):
                raise ValueError(f"checkpoint {folder} is damaged: {name} has {path.stat().st_size} bytes and other "
                                 f"contents than the {expected.get('bytes')} bytes written")
        return
    for name in (TRAINER_STATE, CONFIG_FILE, "model.safetensors"):
        if not (folder / name).is_file():
            raise ValueError(f"checkpoint {folder} is incomplete: {name} is missing")
    state = read_trainer_state(folder)
    if not isinstance(state.get("global_step"), int):
        raise ValueError(f"checkpoint {folder} is damaged: {TRAINER_STATE} has no global_step")


def resolve_checkpoint(output_dir: str, resume_from_checkpoint: Optional[str]) -> Tuple[Optional[Path], List[tuple]]:
    """Map `latest` or a path to a complete checkpoint folder (None: start from scratch).

    Also returns the (checkpoint, reason) pairs `latest` skipped because they failed verification: newer ones that
    are provably incomplete. A checkpoint older than the newest in output_dir is refused: training on from it
    would prune or collide with the newer ones.
    """
    if resume_from_checkpoint is None:
        return None, []
    found = checkpoint_dirs(output_dir)
    if resume_from_checkpoint == "latest":
        skipped = []
        for candidate in reversed(found):
            try:
                verify_checkpoint(candidate)
            except ValueError as error:
                skipped.append((candidate, str(error)))
                continue
            return candidate, skipped
        if found:
            raise ValueError(f"no complete checkpoint in {Path(output_dir) / CHECKPOINTS}: "
                             f"{'; '.join(reason for _, reason in skipped)}")
        return None, []
    path = Path(resume_from_checkpoint)
    if not path.is_dir() or not CHECKPOINT_PATTERN.match(path.name):
        raise ValueError(f"resume_from_checkpoint {path} is not a checkpoint folder (checkpoint-<step>); "
                         "use 'latest' or a path under output_dir/checkpoints")
    verify_checkpoint(path)
    newer = [other for other in found if checkpoint_step(other) > checkpoint_step(path)]
    if newer:
        raise ValueError(f"resume_from_checkpoint {path} is older than {newer[-1]} in this output_dir; training on "
                         "from it would replace the newer checkpoints. Resume from latest, or copy the run folder "
                         "and resume the copy from the older checkpoint")
    return path, []


def read_trainer_state(folder: Path) -> dict:
    """Get the trainer state (step, batch order, losses) a checkpoint was saved with."""
    return read_json_object(Path(folder) / TRAINER_STATE, f"checkpoint {folder}: {TRAINER_STATE}")


def read_checkpoint_config(folder: Path) -> dict:
    """Get the resolved config a checkpoint was saved with."""
    from ddpm_fashion.training.config import read_yaml

    return read_yaml(Path(folder) / CONFIG_FILE)


def prune_checkpoints(output_dir: str, keep: Optional[int]) -> None:
    """Delete the oldest checkpoints beyond `keep` (None keeps all)."""
    found = checkpoint_dirs(output_dir)
    if keep is not None:
        for old in found[: max(0, len(found) - keep)]:
            shutil.rmtree(old)


def mark_as_run(output_dir: Path) -> None:
    """Write the marker that makes a folder recognisably ours (before anything else is written into it)."""
    marker = Path(output_dir) / MARKER_FILE
    if not marker.is_file():
        marker.write_text(json.dumps({"format": RUN_FORMAT, "version": RUN_FORMAT_VERSION}) + "\n")


def set_aside_name(checkpoint: Path, why: str) -> Path:
    """Get a free name to keep a checkpoint under that `latest` never picks (e.g. checkpoint-8-damaged)."""
    checkpoint = Path(checkpoint)
    candidate, number = checkpoint.with_name(f"{checkpoint.name}-{why}"), 1
    while candidate.exists():
        number += 1
        candidate = checkpoint.with_name(f"{checkpoint.name}-{why}-{number}")
    return candidate


def describe_checkpoints(output_dir) -> str:
    """Get a sentence saying which complete checkpoint a stopped run can continue from."""
    found = checkpoint_dirs(output_dir)
    if not found:
        return f"no checkpoint was saved in {Path(output_dir) / CHECKPOINTS}"
    return f"the newest checkpoint is {found[-1]}; continue with --resume_from_checkpoint latest"


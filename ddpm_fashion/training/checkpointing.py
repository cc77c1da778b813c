"""A training run's state on disk: opening the run folder, and saving and loading checkpoints across processes.

The trainer (train_accelerate.py) calls these; the rules they follow (marker, lock, manifests, what may be
replaced) are ddpm_fashion/training/run_dir.py's. Every process takes part in a checkpoint (Accelerate saves each
process's RNG state); only the main process renames, prunes and writes the files that are the same on every process.
"""

import json
import os
import shutil
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from accelerate.utils import broadcast_object_list
from safetensors.torch import load_file, save_file

from ddpm_fashion.guards.files import (
    FolderLock,
    folder_size,
    free_bytes,
    is_disk_full,
    match_umask,
    remove_stale_staging,
    scratch_folder,
    staging_path,
)
from ddpm_fashion.guards.inputs import one_line
from ddpm_fashion.training import run_dir
from ddpm_fashion.training.config import config_to_yaml

EMA_WEIGHTS = "ema.safetensors"


class DiskFull(OSError):
    """The file system ran out of space while the run was saving; the message says where and how much."""


def share_outcome(accelerator, error):
    """Raise on every process the error (a message or None) that the main process met."""
    if accelerator.num_processes > 1:
        error = broadcast_object_list([error])[0]
    if error:
        raise ValueError(error)


def open_run_folder(accelerator, config, checkpoints_seen, damaged, overwrite=False):
    """Main process: lock output_dir (creating it), check nothing changed since the checks, mark it as ours.

    Damaged checkpoints that `latest` skipped are renamed aside (never deleted), so new ones can take their step.
    With `overwrite` (--overwrite_output_dir) an earlier run's checkpoints are deleted, saying so: `latest` would
    otherwise pick them over the new run's. Returns the held FolderLock (None on other processes). Until here
    nothing in output_dir was written.
    """
    lock, error, output_dir = None, None, Path(config.output_dir)
    accelerator.wait_for_everyone()  # every process has finished its checks of the folder before it is locked
    if accelerator.is_main_process:
        created = not output_dir.exists()
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
            lock = FolderLock(output_dir, f"output_dir {output_dir}").acquire()
            if run_dir.checkpoint_dirs(output_dir) != checkpoints_seen:
                raise ValueError(f"output_dir {output_dir} changed while this run started (another run wrote "
                                 "checkpoints); start again")
        except ValueError as refused:
            error = one_line(refused)
            if lock is not None:
                lock.release()
            if created:
                shutil.rmtree(output_dir, ignore_errors=True)
    share_outcome(accelerator, error)
    if accelerator.is_main_process:
        if overwrite and run_dir.replaced_by_overwrite(output_dir):
            print(f"{run_dir.OVERWRITE_OPTION}: training a new run over {output_dir}; replacing "
                  f"{', '.join(run_dir.replaced_by_overwrite(output_dir))}", file=sys.stderr)
            for checkpoint in run_dir.checkpoint_dirs(output_dir):  # the pipeline stays until the new one replaces it
                shutil.rmtree(checkpoint)
        run_dir.mark_as_run(output_dir)
        (output_dir / run_dir.CONFIG_FILE).write_text(config_to_yaml(config))
        remove_stale_staging(output_dir)  # a pipeline a killed run was writing
        remove_stale_staging(output_dir / run_dir.CHECKPOINTS)
        for checkpoint, reason in damaged:
            os.replace(checkpoint, run_dir.set_aside_name(checkpoint, "damaged"))
            print(f"skipped {checkpoint} ({reason}); kept as {run_dir.set_aside_name(checkpoint, 'damaged').name}",
                  file=sys.stderr)
    return lock


@contextmanager
def writing(path, space_needed):
    """Turn running out of disk space inside the block into DiskFull naming the path and the space needed.

    A failed write counts as a full disk when its message says so, or when less than `space_needed` is free once
    the block's partial files are gone: torch.save's "file write failed" names no cause.
    """
    try:
        yield
    except Exception as error:  # safetensors' SafetensorError is neither OSError nor RuntimeError
        write_failed = isinstance(error, (OSError, RuntimeError))
        if not (is_disk_full(error) or (write_failed and free_bytes(path) < space_needed)):
            raise
        raise DiskFull(f"no space left on the device while writing {path}: it needs about {space_needed / 1e6:.0f} "
                       f"MB, {free_bytes(path) / 1e6:.0f} MB are free; nothing older was removed") from None


@dataclass
class TrainingState:
    """What the training loop advances and a checkpoint holds: the network and what updates it, and the progress.

    `progress` has the per-step losses, the images seen, the training seconds over all sessions (None when a
    checkpoint from before they were timed was resumed) and the max_train_minutes plan (None before it is made).
    """

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    ema: Optional[object]
    sampler: object
    step: int = 0
    progress: dict = field(default_factory=lambda: {"losses": [], "images_seen": 0, "train_seconds": 0.0,
                                                    "time_plan": None})


def checkpoint_bytes(config, state):
    """Estimate a checkpoint's size: the newest one's, or weights + two Adam moments (+ EMA) before the first."""
    found = run_dir.checkpoint_dirs(config.output_dir)
    if found:
        return folder_size(found[-1])
    weights = sum(p.numel() * p.element_size() for p in state.model.parameters())
    return weights * (3 + (state.ema is not None))


def save_checkpoint(accelerator, config, state):
    """accelerator.save_state plus our trainer state, written under a temporary name and renamed when complete.

    Every process writes its part (its RNG state) into the staging folder; the main process renames it only after
    all have finished, then prunes old checkpoints, then all go on.
    """
    final = Path(config.output_dir) / run_dir.CHECKPOINTS / f"checkpoint-{state.step}"
    staging = staging_path(final)  # named by the main process's pid: every process writes into that one folder
    if accelerator.num_processes > 1:
        staging = Path(broadcast_object_list([str(staging)])[0])
    if not all(torch.isfinite(p).all() for p in state.model.parameters()):
        raise FloatingPointError(f"the weights became non-finite at step {state.step}; not saving them. "
                                 f"{run_dir.describe_checkpoints(config.output_dir)}")
    with writing(staging, checkpoint_bytes(config, state)), \
            scratch_folder(staging) if accelerator.is_main_process else nullcontext():
        accelerator.wait_for_everyone()  # the folder exists before any process writes into it
        accelerator.save_state(str(staging), safe_serialization=True)
        accelerator.wait_for_everyone()  # no rename while another process still writes its part
        if accelerator.is_main_process:
            (staging / run_dir.CONFIG_FILE).write_text(config_to_yaml(config))
            trainer_state = {"global_step": state.step, "sampler": state.sampler.state_dict(),
                             "lr_scheduler": state.lr_scheduler.state_dict(), **state.progress}
            if state.ema is not None:
                save_file({str(i): p.contiguous() for i, p in enumerate(state.ema.shadow_params)},
                          staging / EMA_WEIGHTS)
                trainer_state["ema"] = {k: v for k, v in state.ema.state_dict().items() if k != "shadow_params"}
            (staging / run_dir.TRAINER_STATE).write_text(json.dumps(trainer_state))
            match_umask(staging)
            run_dir.write_manifest(staging)
            os.replace(staging, final)
            run_dir.prune_checkpoints(config.output_dir, config.checkpoints_total_limit)
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator, path, state):
    """Restore model, optimizer and RNG (Accelerate) and our trainer state into `state`."""
    try:
        accelerator.load_state(str(path))
    except Exception as error:  # a readable message beats a library traceback; the manifest passed, so say what
        raise ValueError(f"checkpoint {path} does not load into this run: {one_line(error)[:300]}") from None
    saved = json.loads((Path(path) / run_dir.TRAINER_STATE).read_text())
    state.sampler.load_state_dict(saved["sampler"])
    state.lr_scheduler.load_state_dict(saved["lr_scheduler"])
    if state.ema is not None:
        shadow = load_file(Path(path) / EMA_WEIGHTS)
        state.ema.load_state_dict({**saved["ema"], "shadow_params": [shadow[str(i)] for i in range(len(shadow))]})
        state.ema.to(accelerator.device)
    state.step = saved["global_step"]
    # Runs from before images were counted had only full batches of the configured size.
    images = saved.get("images_seen",
                       state.step * state.sampler.global_batch_size * accelerator.gradient_accumulation_steps)
    state.progress = {"losses": saved["losses"], "images_seen": images, "train_seconds": saved.get("train_seconds"),
                      "time_plan": saved.get("time_plan")}

"""`--logger`: the experiment tracker, through Accelerate's trackers as in diffusers' train_unconditional.py.

Accelerate drops a tracker whose package is missing with only a log warning, so a run asked to log to wandb would
train for hours and log nothing. The trainer checks the package first and refuses in one line naming it.
"""

from pathlib import Path

from accelerate.utils import (
    is_aim_available,
    is_clearml_available,
    is_comet_ml_available,
    is_dvclive_available,
    is_mlflow_available,
    is_swanlab_available,
    is_tensorboard_available,
    is_trackio_available,
    is_wandb_available,
)

from ddpm_fashion.sampling.pictures import grid_tensor

# Accelerate's tracker names (accelerate.utils.LoggerType, without "all") -> (its availability check, the package to
# install). "none" logs nothing.
TRACKERS = {
    "tensorboard": (is_tensorboard_available, "tensorboard"),
    "wandb": (is_wandb_available, "wandb"),
    "comet_ml": (is_comet_ml_available, "comet_ml"),
    "mlflow": (is_mlflow_available, "mlflow"),
    "aim": (is_aim_available, "aim"),
    "clearml": (is_clearml_available, "clearml"),
    "dvclive": (is_dvclive_available, "dvclive"),
    "swanlab": (is_swanlab_available, "swanlab"),
    "trackio": (is_trackio_available, "trackio"),
}


def check_logger(logger: str) -> None:
    """Refuse, in one line naming the package, a tracker whose package is not installed (before anything is
    written)."""
    if logger == "none":
        return
    available, package = TRACKERS[logger]
    if not available():
        raise ValueError(f"--logger {logger} needs the {package} package, which is not installed: pip install "
                         f"{package}, or pass --logger tensorboard or --logger none")


def log_with(logger: str):
    """Accelerator(log_with=...) for a --logger value."""
    return None if logger == "none" else logger


def logging_path(output_dir: str, logging_dir: str) -> str:
    """Where the trackers write, as the example computes it: os.path.join(output_dir, logging_dir), so a relative
    --logging_dir is inside output_dir and an absolute one is used as it is."""
    return str(Path(output_dir) / logging_dir)


def log_samples(accelerator, images, step):
    """Send a sample grid to the trackers that show images (TensorBoard and wandb, as in the example)."""
    grid = grid_tensor(images)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("samples", grid, step)
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"samples": wandb.Image(grid.permute(1, 2, 0).numpy())}, step=step)

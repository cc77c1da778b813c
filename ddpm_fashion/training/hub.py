"""`--push_to_hub`: publish the trained pipeline to the Hugging Face Hub, as diffusers' train_unconditional.py does.

The example creates the repo when training starts (create_repo with --hub_model_id or output_dir's name, exist_ok)
and uploads output_dir each time it saves the pipeline (every --save_model_epochs and at the end; upload_folder
with ignore_patterns ["step_*", "epoch_*"]). So does the trainer, with three differences:

- Everything that can refuse the push does so in one line before training: HF_HUB_OFFLINE, no token, a bad repo
  id, an unreachable Hub, a repo that cannot be created, a --hub_private_repo whose repo exists and is public.
- Only the published files are uploaded (PUBLISHED_FILES: the pipeline, its model card, samples.png, loss.png,
  train_config.yaml): never checkpoints/ (optimizer states), logs/, the run's lock and marker, or files you put in
  output_dir. The example's upload_folder of output_dir would also send its checkpoint-N folders and logs. The
  uploaded model card (huggingface_hub's ModelCard) loads the pipeline from the repo, not from output_dir.
- --hub_private_repo is passed to create_repo (the example parses it but never uses it).

The token (--hub_token, else HF_TOKEN or `hf auth login`'s) is held only in HubTarget, never printed or saved:
it is no TrainConfig key, so train_config.yaml, the model card and the trackers' config never see it.
"""

import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from huggingface_hub import HfApi, ModelCard, constants, get_token
from huggingface_hub.utils import HFValidationError, filter_repo_objects, validate_repo_id

from ddpm_fashion.guards.files import scratch_folder, staging_path
from ddpm_fashion.guards.inputs import one_line

# What the trainer publishes into output_dir (publish_pipeline) plus the run's resolved config: all that is uploaded.
PUBLISHED_FILES = ["model_index.json", "unet/*", "scheduler/*", "README.md", "samples.png", "loss.png",
                   "train_config.yaml"]
EXAMPLE_IGNORE_PATTERNS = ["step_*", "epoch_*"]  # train_unconditional.py's upload_folder(ignore_patterns=...)
# Trackers that may record the command line (wandb does; diffusers' scripts refuse --hub_token with it).
SAFE_WITH_TOKEN_ON_COMMAND_LINE = ("tensorboard", "none")


class PushError(OSError):
    """An upload to the Hub failed after training; the pipeline is safe in output_dir (exit code 1)."""


@dataclass
class HubTarget:
    """Where --push_to_hub publishes: the repo (its full id once created), the token and the visibility."""

    repo_id: str
    token: str = field(repr=False)
    private: Optional[bool] = None  # None: the Hub's default (public, or the organisation's setting)


def resolve_target(output_dir: str, hub_model_id: Optional[str], hub_token: Optional[str], private: bool,
                   logger: str) -> HubTarget:
    """Get the push's repo, token and visibility, or raise a one-line ValueError: before anything is read or
    written, and without the network."""
    if constants.is_offline_mode():
        raise ValueError("--push_to_hub needs the Hub, but HF_HUB_OFFLINE is set; unset it or drop --push_to_hub "
                         "(output_dir holds the pipeline either way)")
    if hub_token is not None and logger not in SAFE_WITH_TOKEN_ON_COMMAND_LINE:
        raise ValueError(f"--hub_token with --logger {logger} could expose the token (the tracker may record the "
                         "command line); log in with `hf auth login` or set HF_TOKEN instead")
    token = hub_token or get_token()
    if not token:
        raise ValueError("--push_to_hub needs a Hugging Face token with write access: run `hf auth login`, set "
                         "HF_TOKEN, or pass --hub_token")
    repo_id = hub_model_id or Path(output_dir).resolve().name  # the example's default: output_dir's name
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"--hub_model_id {repo_id!r} is not a valid Hub repo id ({one_line(error)}); give "
                         "--hub_model_id NAME or USER/NAME") from None
    return HubTarget(repo_id=repo_id, token=token, private=True if private else None)


def create_repo(api: HfApi, target: HubTarget) -> HubTarget:
    """Create the repo, or find it (exist_ok, as the example), before training; get the target with its full id.
    Any failure (no network, a read-only token, someone else's namespace) is a one-line ValueError."""
    try:
        repo_id = api.create_repo(target.repo_id, token=target.token, private=target.private, exist_ok=True).repo_id
        public = target.private and not api.repo_info(repo_id, token=target.token).private
    except Exception as error:  # httpx, HTTP and validation errors alike: the run must not start
        raise ValueError(f"--push_to_hub: cannot create or reach the Hub repo {target.repo_id} "
                         f"({one_line(error)[:300]})") from None
    if public:
        raise ValueError(f"--hub_private_repo: the Hub repo {repo_id} exists and is public; make it private on the "
                         "Hub or choose another --hub_model_id")
    return HubTarget(repo_id=repo_id, token=target.token, private=target.private)


def create_repo_on_main(accelerator, target: Optional[HubTarget]) -> Optional[HubTarget]:
    """create_repo() on the main process only, before output_dir is written; every process raises its refusal."""
    from ddpm_fashion.training.checkpointing import share_outcome

    error = None
    if target is not None and accelerator.is_main_process:
        try:
            target = create_repo(HfApi(), target)
        except ValueError as refused:
            error = one_line(refused)
    share_outcome(accelerator, error)
    return target


def published_files(output_dir) -> list:
    """The files of output_dir that a push uploads (relative paths), chosen by huggingface_hub's own filter with
    upload_folder's patterns."""
    files = sorted(p.relative_to(output_dir).as_posix() for p in Path(output_dir).rglob("*") if p.is_file())
    return list(filter_repo_objects(files, allow_patterns=PUBLISHED_FILES, ignore_patterns=EXAMPLE_IGNORE_PATTERNS))


def hub_model_card(output_dir, repo_id: str) -> ModelCard:
    """The model card as huggingface_hub's ModelCard (bad metadata fails here, not on the Hub), its load snippet
    naming the Hub repo instead of the local folder."""
    card = ModelCard.load(Path(output_dir) / "README.md")
    card.text = card.text.replace(f'from_pretrained("{output_dir}")', f'from_pretrained("{repo_id}")')
    return card


def upload(api: HfApi, target: HubTarget, output_dir, commit_message: str):
    """Upload the published files of output_dir (never checkpoints, logs or your own files) and the Hub's model card
    in one commit, with upload_folder from a staging folder of hard links (removed after). A failure is a PushError
    naming the repo; the pipeline stays in output_dir."""
    folder = staging_path(Path(output_dir) / "hub-upload")
    try:
        with scratch_folder(folder):
            for name in published_files(output_dir):
                if name == "README.md":
                    continue  # written below, as a new file: writing into a hard link would change output_dir's
                (folder / name).parent.mkdir(parents=True, exist_ok=True)
                link_or_copy(Path(output_dir) / name, folder / name)
            hub_model_card(output_dir, target.repo_id).save(folder / "README.md")
            return api.upload_folder(repo_id=target.repo_id, folder_path=str(folder), commit_message=commit_message,
                                     token=target.token, allow_patterns=list(PUBLISHED_FILES),  # a fresh list:
                                     ignore_patterns=list(EXAMPLE_IGNORE_PATTERNS))  # upload_folder extends it
    except Exception as error:
        raise PushError(f"--push_to_hub: uploading to {target.repo_id} failed ({one_line(error)[:300]}); the pipeline "
                        f"is saved in {output_dir}") from None
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def link_or_copy(source: Path, target: Path) -> None:
    """Hard-link a file (no copy of the weights), or copy it where the file system has no hard links."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def upload_or_warn(api: HfApi, target: HubTarget, output_dir, commit_message: str) -> bool:
    """upload() during training (--save_model_epochs): a failure is a warning and training goes on; the final
    upload tries again."""
    try:
        upload(api, target, output_dir, commit_message)
        return True
    except PushError as error:
        print(f"warning: {error}; training goes on", file=sys.stderr)
        return False

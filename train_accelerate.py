"""Train a DDPM on FashionMNIST with Accelerate and publish it as a standard diffusers DDPMPipeline.

    accelerate launch train_accelerate.py [--config configs/NAME.yaml] [--key value ...] [--dry_run]

Also runs under `torchrun --nproc_per_node N` and plain `python`. The config says what to train
(ddpm_fashion/training/config.py); the launcher says how to run it (processes, GPUs, mixed precision backend).
The run folder's rules (marker, lock, manifests, what may be replaced) live in ddpm_fashion/training/run_dir.py.
"""

import math
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator, PartialState
from accelerate.utils import ProjectConfiguration, broadcast
from diffusers import DDPMPipeline, UNet2DModel
from diffusers import DDPMScheduler as LibraryDDPMScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from ddpm_fashion.data import ShardedBatchSampler, pixels_to_model_input
from ddpm_fashion.guards.files import match_umask, move_files_into, scratch_folder, staging_path
from ddpm_fashion.guards.inputs import one_line
from ddpm_fashion.image_datasets import open_training_data
from ddpm_fashion.models.unet import UNet
from ddpm_fashion.sampling.pictures import image_grid
from ddpm_fashion.sampling.saved_pipeline import check_pipeline_dir
from ddpm_fashion.schedulers.ddpm import DDPMScheduler
from ddpm_fashion.training import hub, run_dir, trackers
from ddpm_fashion.training.checkpointing import (
    TrainingState,
    load_checkpoint,
    open_run_folder,
    save_checkpoint,
    writing,
)
from ddpm_fashion.training.clock import Clock
from ddpm_fashion.training.config import (
    CPU_CONFIG,
    config_to_yaml,
    parse_config,
    resume_differences,
    with_float32,
)
from ddpm_fashion.training.launch import (
    check_launcher,
    ignoring_stop_signals,
    is_first_process,
    launched_on_cpus_only,
    resolve_mixed_precision,
    restore_stop_signals,
    stop_signals_as_interrupts,
    wait_for_the_launchers_stop,
    why_this_precision,
)
from ddpm_fashion.training.model_card import plot_loss, write_model_card
from ddpm_fashion.training.objective import loss_weights, sample_timesteps, training_target
from ddpm_fashion.training.resources import (
    check_memory,
    configure_threads,
    has_fast_bf16,
    is_out_of_memory,
    measure_unet_bytes,
)
from ddpm_fashion.training.run_options import check_run_options, speed_and_memory_options

# ------------------------------------------------------------------------------------------------------------
# Models, randomness and samples
# ------------------------------------------------------------------------------------------------------------

def build_models(config):
    """The U-Net and noise scheduler; both U-Net implementations start from the same UNet2DModel weights.

    The U-Net's sample_size and channels were fitted to the data (image_datasets.fit_unet_to_data)."""
    torch.manual_seed(config.seed)
    model = UNet2DModel(**config.unet)
    if config.unet_impl == "own":
        model = UNet.from_diffusers(model)
    scheduler_class = DDPMScheduler if config.scheduler_impl == "own" else LibraryDDPMScheduler
    noise_scheduler = scheduler_class(num_train_timesteps=config.ddpm_num_steps,
                                      beta_schedule=config.ddpm_beta_schedule,
                                      prediction_type=config.prediction_type)
    return model, noise_scheduler


def make_optimizer(config, model, device):
    """AdamW; the fused kernel on CPU and CUDA (the fastest update measured), the per-tensor loop elsewhere."""
    return torch.optim.AdamW(model.parameters(), lr=config.learning_rate,
                             betas=(config.adam_beta1, config.adam_beta2), weight_decay=config.adam_weight_decay,
                             eps=config.adam_epsilon, fused=device.type in ("cpu", "cuda"))


def global_batch_randomness(config, micro_step, global_size, num_timesteps, device):
    """Noise, timesteps and flips for the whole global batch, from a generator keyed by the micro-step.

    Every process draws the same global tensors and keeps its own slice, so N processes see exactly the
    randomness one process would, and a resumed run needs no generator state to continue identically.
    """
    generator = torch.Generator(device=device).manual_seed(config.seed * 1_000_003 + micro_step)
    size, channels = config.unet["sample_size"], config.unet["in_channels"]  # the data's (1, 32, 32): FashionMNIST
    noise = torch.randn((global_size, channels, size, size), generator=generator, device=device)
    timesteps = sample_timesteps(config.timestep_sampling, global_size, num_timesteps, generator, device)
    flips = torch.rand(global_size, generator=generator, device=device) < 0.5
    return noise, timesteps, flips


def bare_model(accelerator, model):
    """The trained network itself: without DDP and without torch.compile (`accelerate launch --dynamo_backend`).

    A compiled wrapper cannot be saved by save_pretrained, and sampling it would recompile for the new batch shape.
    """
    return accelerator.unwrap_model(model, keep_torch_compile=False)


@contextmanager
def ema_weights(model, ema):
    """Swap the EMA weights into the model for the duration of the block (no-op without EMA)."""
    parameters = list(model.parameters())
    if ema is not None:
        ema.store(parameters)
        ema.copy_to(parameters)
    try:
        yield model
    finally:
        if ema is not None:
            ema.restore(parameters)


def sample_images(config, model, noise_scheduler, num_images, seed):
    """Generate images with our scheduler and the model's current weights; [N, 1, 32, 32] in [0, 1]."""
    pipeline = DDPMPipeline(unet=model, scheduler=DDPMScheduler.from_config(noise_scheduler.config))
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator(device=model.device).manual_seed(seed)
    model.eval()
    images = pipeline(batch_size=num_images, num_inference_steps=config.ddpm_num_inference_steps,
                      generator=generator, output_type="np").images
    model.train()
    return torch.from_numpy(images).permute(0, 3, 1, 2).float()  # NHWC -> NCHW


# ------------------------------------------------------------------------------------------------------------
# Start-up checks: they only read, and all pass before output_dir is written
# ------------------------------------------------------------------------------------------------------------

def check_resume(config, resume_path, num_processes):
    """Refuse a checkpoint whose model, batch order or diffusion differ from this run's (before any write).

    The process count may change while the global batch (processes x train_batch_size) stays the same: batch order
    and noise belong to the global batch, so the run continues as it would have (to float rounding).
    """
    saved = run_dir.read_checkpoint_config(resume_path)
    differences = resume_differences(saved, config)
    saved_processes = run_dir.read_trainer_state(resume_path)["sampler"].get("world_size", 1)
    saved_global, global_batch = saved["train_batch_size"] * saved_processes, config.train_batch_size * num_processes
    if saved_global != global_batch:
        advice = (f"; with {num_processes} process(es) pass --train_batch_size {saved_global // num_processes}"
                  if saved_global % num_processes == 0 else "")
        differences.append(f"global batch: {saved_processes} process(es) x train_batch_size {saved['train_batch_size']}"
                           f" = {saved_global} -> {num_processes} process(es) x {config.train_batch_size} = "
                           f"{global_batch}{advice}")
    if differences:
        differing = {difference.partition(":")[0].partition(".")[0] for difference in differences}  # unet, seed, ...
        recipe = set(config.float32 or ())
        recipe |= {"global batch"} if "train_batch_size" in recipe else set()
        hint = ("; the config's float32 recipe applies only where mixed_precision auto picks float32, so resume on a "
                "machine of the same precision" if differing & recipe else "")
        raise ValueError(f"cannot resume from {resume_path}: it was trained with other values of keys a run must keep "
                         f"({'; '.join(differences)}); drop those overrides, or start a new output_dir{hint}")


def check_batch_sizes(config, num_images, world_size):
    """Refuse a global batch larger than the data (it would count images that were never seen)."""
    global_batch = config.train_batch_size * world_size
    if global_batch > num_images:
        raise ValueError(f"train_batch_size {config.train_batch_size} x {world_size} process(es) = {global_batch} is "
                         f"more than the {num_images} training images; use at most {num_images // world_size}")


def preflight(config, overwrite):
    """Every start-up check that reads only; get the checkpoint to resume (or None), what `latest` skipped, the
    checkpoints found (open_run_folder proves none appeared meanwhile) and why the precision is what it is. Nothing is
    written before these pass."""
    state = PartialState(cpu=launched_on_cpus_only())
    check_launcher(state.num_processes)
    requested = config.mixed_precision
    precision_why = why_this_precision(requested, has_fast_bf16(state.device))
    config.mixed_precision = resolve_mixed_precision(requested, has_fast_bf16(state.device))
    if with_float32(config, requested):  # before check_resume: a checkpoint must hold this recipe's U-Net
        precision_why += f", with the config's float32 recipe {config.float32}"
    if config.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ValueError("mixed_precision=fp16 needs a CUDA GPU; on CPU use 'bf16' or 'no'")
    if overwrite and config.resume_from_checkpoint is not None:
        raise ValueError(f"{run_dir.OVERWRITE_OPTION} starts a new run, --resume_from_checkpoint continues one; "
                         "pass one of them")
    run_dir.check_output_dir(config.output_dir, resuming=config.resume_from_checkpoint is not None,
                             overwrite=overwrite)
    checkpoints_seen = run_dir.checkpoint_dirs(config.output_dir)
    resume_path, skipped = run_dir.resolve_checkpoint(config.output_dir, config.resume_from_checkpoint)
    if resume_path is not None:
        check_resume(config, resume_path, state.num_processes)
    return resume_path, skipped, checkpoints_seen, precision_why


# ------------------------------------------------------------------------------------------------------------
# One step, the clock, and what comes between steps
# ------------------------------------------------------------------------------------------------------------

def training_step(config, accelerator, state, noise_scheduler, pixels, batch, micro_step):
    """One micro-step (forward, backward, clipped update under accumulation); returns the global batch's loss sum."""
    device, model = accelerator.device, state.model
    with accelerator.accumulate(model):
        noise, timesteps, flips = global_batch_randomness(config, micro_step, batch.global_size,
                                                          config.ddpm_num_steps, device)
        part = slice(batch.start, batch.start + len(batch.indices))  # this process's share
        noise, timesteps = noise[part], timesteps[part]
        clean = pixels_to_model_input(pixels, flip=flips[part] if config.random_flip else None)
        noisy = noise_scheduler.add_noise(clean, noise, timesteps)  # q(x_t | x_0), eq. (4)
        target = training_target(config.prediction_type, noise_scheduler, clean, noise, timesteps)
        prediction = model(noisy, timesteps).sample
        per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        weights = loss_weights(config.prediction_type, noise_scheduler, timesteps, config.snr_gamma,
                               config.snr_weight_floor)
        # Sum over this process's samples / global batch: averaged across processes this is the mean over the
        # global batch even when the last batch splits unevenly.
        accelerator.backward((weights * per_sample).sum() / batch.global_size * accelerator.num_processes)
        if accelerator.sync_gradients:
            accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)
    return accelerator.reduce(per_sample.detach().sum(), "sum").item()


def main_process_decides(accelerator, value: int) -> int:
    """Get the main process's value on every process: their clocks differ, and what a clock decides (a checkpoint,
    the run's length) needs them all."""
    if accelerator.num_processes == 1:
        return value
    return int(broadcast(torch.tensor([value], dtype=torch.int64, device=accelerator.device), from_process=0).item())


def learning_rate_schedule(config, optimizer, total_steps, step=0):
    """diffusers' schedule (get_scheduler) over total_steps, standing at `step`: a plan changes total_steps midway."""
    return get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps,
                         num_training_steps=total_steps, last_epoch=step - 1)


def saved_time_plan(config, state, max_train_steps):
    """Get the step count a resumed run planned for max_train_minutes (None: no plan yet, or its keys changed)."""
    plan = state.progress.get("time_plan")
    if config.max_train_minutes is None or not plan or (plan["max_train_minutes"], plan["max_train_steps"]) != (
            config.max_train_minutes, max_train_steps):
        return None
    return plan["steps"]


def plan_to_time_budget(config, accelerator, state, clock, max_train_steps):
    """max_train_minutes: get the steps that fit the run's training time (at most max_train_steps) at the speed of
    the session's first steps on the main process; kept in the checkpoints, so a resumed run keeps it."""
    fit = clock.last_step_that_fits(config.max_train_minutes, state.step, state.progress)
    steps = main_process_decides(accelerator, min(max_train_steps, fit))
    state.progress["time_plan"] = {"max_train_minutes": config.max_train_minutes, "max_train_steps": max_train_steps,
                                   "steps": steps}
    return steps


def periodic_work(config, accelerator, state, noise_scheduler, max_train_steps, clock):
    """After an optimizer step: a checkpoint (by steps, or by time with checkpointing_minutes) and a sample grid
    when they are due."""
    due_by_time = config.checkpointing_minutes is not None and bool(main_process_decides(
        accelerator, clock.checkpoint_due(config.checkpointing_minutes)))
    if state.step % config.checkpointing_steps == 0 or state.step == max_train_steps or due_by_time:
        save_checkpoint(accelerator, config, state)
        clock.checkpoint_saved()
    end_of_epoch = state.sampler.position == len(state.sampler)
    sample_now = (state.step % config.save_images_steps == 0) if config.save_images_steps else (
        end_of_epoch and (state.sampler.epoch + 1) % config.save_images_epochs == 0)
    if sample_now and accelerator.is_main_process:
        with ema_weights(bare_model(accelerator, state.model), state.ema) as sampling_model:
            grid = sample_images(config, sampling_model, noise_scheduler, config.eval_batch_size, config.seed)
        trackers.log_samples(accelerator, grid, state.step)


def publish_epoch_model(accelerator, config, state, noise_scheduler, clock, hub_target):
    """--save_model_epochs N: publish the pipeline (and push it) after every Nth epoch, as the example does."""
    epoch = state.sampler.epoch + 1  # the epoch just finished, counted from 1
    if state.sampler.position == len(state.sampler) and epoch % config.save_model_epochs == 0 and \
            accelerator.is_main_process:
        publish_pipeline(accelerator, config, state, noise_scheduler, clock.seconds())
        if hub_target is not None:
            hub.upload_or_warn(hub.HfApi(), hub_target, config.output_dir, f"Epoch {epoch}")


def stop_diverged(accelerator, config, step, loss):
    """Stop on a non-finite loss: set aside the checkpoint whose weights produced it, and say what is left."""
    suspect = Path(config.output_dir) / run_dir.CHECKPOINTS / f"checkpoint-{step - 1}"
    moved = ""
    if accelerator.is_main_process and suspect.is_dir():
        kept = run_dir.set_aside_name(suspect, "diverged")
        os.replace(suspect, kept)
        moved = f"{suspect.name}, whose weights produced it, is kept as {kept.name}; "
    left = run_dir.describe_checkpoints(config.output_dir)
    raise FloatingPointError(f"loss became {loss} at step {step}; {moved}{left} (with a lower --learning_rate)")


def publish_pipeline(accelerator, config, state, noise_scheduler, session_seconds):
    """Write the final DDPMPipeline (EMA weights, UNet2DModel, diffusers scheduler) and move it into output_dir."""
    output_dir, progress = Path(config.output_dir), state.progress
    with ema_weights(bare_model(accelerator, state.model), state.ema) as final_model, \
            writing(output_dir, 2 * sum(p.numel() * p.element_size() for p in final_model.parameters())), \
            scratch_folder(staging_path(output_dir / "pipeline")) as folder:
        unet = final_model.to_diffusers() if isinstance(final_model, UNet) else final_model
        pipeline = DDPMPipeline(unet=unet, scheduler=LibraryDDPMScheduler.from_config(noise_scheduler.config))
        pipeline.save_pretrained(folder, safe_serialization=True)
        check_pipeline_dir(folder)  # diffusers only warns when a component cannot be saved: never publish half
        samples = sample_images(config, final_model, noise_scheduler, config.eval_batch_size, config.seed)
        image_grid(samples).save(folder / "samples.png")
        plot_loss(folder / "loss.png", progress["losses"])
        write_model_card(folder / "README.md", config=config, config_yaml=config_to_yaml(config),
                         steps=len(progress["losses"]), images_seen=progress["images_seen"],
                         losses=progress["losses"], train_seconds=progress["train_seconds"],
                         session_seconds=session_seconds, world_size=accelerator.num_processes)
        match_umask(folder)
        move_files_into(folder, output_dir)  # replaces only the files it publishes


# ------------------------------------------------------------------------------------------------------------
# The run, top to bottom
# ------------------------------------------------------------------------------------------------------------

def train(config, options):
    """Check everything, then run the training loop and publish the pipeline (and push it with --push_to_hub)."""
    hub_target, overwrite = check_run_options(config, options), options.overwrite_output_dir
    data = open_training_data(config)  # finds the data and fits the U-Net to it: resume compares the result
    resume_path, skipped, checkpoints_seen, precision_why = preflight(config, overwrite)
    threads, why = configure_threads()
    how_it_runs = (f"{threads} torch threads per process ({why}), mixed precision {config.mixed_precision} "
                   f"({precision_why})")
    model, noise_scheduler = build_models(config)
    speed_and_memory_options(model, config, options)  # before the memory check: gradient checkpointing needs less
    accelerator = Accelerator(
        cpu=launched_on_cpus_only(), mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with=trackers.log_with(config.logger), project_config=ProjectConfiguration(
            project_dir=config.output_dir, logging_dir=trackers.logging_path(config.output_dir, config.logging_dir)))
    check_batch_sizes(config, data.num_images, accelerator.num_processes)
    how = data.load(config, accelerator.device, accelerator.num_processes)  # decodes every image: a bad one stops here
    if not data.is_fashion_mnist:
        accelerator.print(f"data: {data.description}, {how}")
    if config.mixed_precision == "bf16" and not has_fast_bf16(accelerator.device):
        accelerator.print(f"note: this {accelerator.device.type} has no native bf16, so mixed_precision=bf16 may train "
                          "slower than --mixed_precision no")
    check_memory(measure_unet_bytes(model, config.train_batch_size, training=True), accelerator.device,
                 f"a training step of train_batch_size {config.train_batch_size}", "--train_batch_size")
    check_memory(measure_unet_bytes(model, config.eval_batch_size), accelerator.device,
                 f"a sample grid of eval_batch_size {config.eval_batch_size}", "--eval_batch_size")
    hub_target = hub.create_repo_on_main(accelerator, hub_target)  # the last check, and the only one on the network
    created = not Path(config.output_dir).exists()
    lock = open_run_folder(accelerator, config, checkpoints_seen, skipped, overwrite)
    try:
        run_training(config, accelerator, model, noise_scheduler, data, resume_path, how_it_runs, hub_target)
    except BaseException:
        if lock is not None and created:
            run_dir.remove_if_nothing_saved(config.output_dir)  # a failed first run leaves no empty run folder
        raise
    finally:
        if lock is not None:
            lock.release()


def run_training(config, accelerator, model, noise_scheduler, data, resume_path, how_it_runs, hub_target):
    """The training loop proper, in a run folder that is checked, locked and ours."""
    device = accelerator.device
    sampler = ShardedBatchSampler(data.num_images, config.train_batch_size, seed=config.seed,
                                  rank=accelerator.process_index, world_size=accelerator.num_processes)
    max_train_steps = config.max_train_steps or math.ceil(
        config.num_epochs * len(sampler) / config.gradient_accumulation_steps)
    optimizer = make_optimizer(config, model, device)
    lr_scheduler = learning_rate_schedule(config, optimizer, max_train_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = None
    if config.use_ema:  # only parameters are averaged, never buffers
        ema = EMAModel(model.parameters(), decay=config.ema_max_decay, use_ema_warmup=True,
                       inv_gamma=config.ema_inv_gamma, power=config.ema_power, foreach=True)
        ema.to(device)
    state = TrainingState(model, optimizer, lr_scheduler, ema, sampler)
    if accelerator.is_main_process:
        tracker_config = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(config).items()}
        accelerator.init_trackers("ddpm_fashion", config=tracker_config)
    if resume_path is not None:
        load_checkpoint(accelerator, resume_path, state)
        accelerator.print(f"resumed from {resume_path} at step {state.step}")
    elif config.resume_from_checkpoint == "latest":
        accelerator.print("no checkpoint found in output_dir; starting a new run")
    planned = saved_time_plan(config, state, max_train_steps)  # a resumed run keeps its max_train_minutes plan
    if planned is not None:
        max_train_steps = planned
        lr_scheduler = state.lr_scheduler = learning_rate_schedule(config, optimizer, planned, state.step)
    accelerator.print(f"training to step {max_train_steps} with {accelerator.num_processes} process(es) on "
                      f"{device.type}, {how_it_runs}; output_dir {config.output_dir}")

    # The bar closes before any error propagates, so an error or Ctrl-C message is the last line printed.
    with tqdm(total=max_train_steps, initial=state.step, disable=not accelerator.is_main_process,
              desc="train", unit="step", dynamic_ncols=True) as bar:
        clock, step_loss, step_images = Clock(state.progress), 0.0, 0
        micro_step = state.step * config.gradient_accumulation_steps
        model.train()
        while state.step < max_train_steps:
            for batch, pixels in data.batches(sampler, device):
                step_loss += training_step(config, accelerator, state, noise_scheduler, pixels, batch,
                                           micro_step) / batch.global_size
                micro_step, step_images = micro_step + 1, step_images + batch.global_size
                if not accelerator.sync_gradients:
                    continue
                state.step += 1
                step_loss /= config.gradient_accumulation_steps
                if not math.isfinite(step_loss):
                    stop_diverged(accelerator, config, state.step, step_loss)
                lr_scheduler.step()
                if ema is not None:
                    ema.step(model.parameters())
                state.progress["losses"].append(step_loss)
                state.progress["images_seen"] += step_images
                images_per_s = clock.tick(state.progress)
                logs = {"loss": step_loss, "lr": lr_scheduler.get_last_lr()[0], "img_per_s": images_per_s}
                if ema is not None:
                    logs["ema_decay"] = ema.cur_decay_value
                accelerator.log(logs, step=state.step)
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{logs['lr']:.2e}", img_s=f"{images_per_s:.0f}")
                if clock.just_timed() and config.max_train_minutes is not None and planned is None:
                    planned = plan_to_time_budget(config, accelerator, state, clock, max_train_steps)
                    if accelerator.is_main_process:
                        bar.write(f"max_train_minutes {config.max_train_minutes:g}: training to step {planned} of "
                                  f"max_train_steps {max_train_steps}, the learning-rate schedule fitted to it")
                    max_train_steps = bar.total = planned
                    lr_scheduler = state.lr_scheduler = learning_rate_schedule(config, optimizer, planned, state.step)
                expected = clock.expected_duration(max_train_steps - state.step)
                if expected and accelerator.is_main_process:
                    bar.write(f"{expected} ({how_it_runs})")
                step_loss, step_images = 0.0, 0
                periodic_work(config, accelerator, state, noise_scheduler, max_train_steps, clock)
                if config.save_model_epochs and state.step < max_train_steps:
                    publish_epoch_model(accelerator, config, state, noise_scheduler, clock, hub_target)
                if state.step >= max_train_steps:
                    break

    if clock.earlier_seconds is not None:
        state.progress["train_seconds"] = clock.earlier_seconds + clock.seconds()
    if accelerator.is_main_process:
        publish_pipeline(accelerator, config, state, noise_scheduler, clock.seconds())
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if hub_target is not None and accelerator.is_main_process:
        hub.upload(hub.HfApi(), hub_target, config.output_dir, f"End of training, step {state.step}")
    accelerator.print(clock.done_line(state.step, state.progress, config.output_dir))


def resolve_config(argv):
    """Parse the config; with no --config and no GPU, train the CPU config instead of the GPU one, saying so."""
    config, options, config_given = parse_config(argv)
    if not config_given and not torch.cuda.is_available():
        config, options, _ = parse_config(argv, default_config=CPU_CONFIG)
        print(f"train_accelerate.py: no GPU found and no --config given: training configs/{CPU_CONFIG.name} (the "
              "CPU model; how long it takes here is printed once its first steps are timed) instead of the 100-epoch "
              "GPU run; pass --config configs/fashion_mnist.yaml to train that anyway", file=sys.stderr)
    return config, options


def main(argv=None):
    """Parse the config and train; bad input is one line on stderr and exit code 2."""
    prog, config, threads = "train_accelerate.py", None, torch.get_num_threads()
    try:
        config, options = resolve_config(argv)
        if options.dry_run:
            print(config_to_yaml(config), end="")
            return 0
        with stop_signals_as_interrupts():  # `accelerate launch` answers Ctrl-C with SIGTERM
            train(config, options)
    except (ValueError, FileNotFoundError, PermissionError, NotADirectoryError) as error:
        print(f"{prog}: error: {one_line(error)}", file=sys.stderr)
        return 2
    except (FloatingPointError, OSError) as error:  # DiskFull included; an OSError's message names its file
        print(f"{prog}: error: {one_line(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as interrupt:  # Ctrl-C or the launcher's SIGTERM: one line; checkpoints are complete
        wait_for_the_launchers_stop(interrupt)
        with ignoring_stop_signals():
            where = run_dir.describe_checkpoints(config.output_dir) if config is not None else "nothing was written"
            if is_first_process():
                print(f"\n{prog}: interrupted; {where}", file=sys.stderr, flush=True)
        restore_stop_signals()  # ignored since the interrupt (stop_signals_as_interrupts): the report is out
        return 130  # the shell's code for a SIGINT
    except (RuntimeError, MemoryError) as error:
        if isinstance(error, RuntimeError) and not is_out_of_memory(error):
            raise
        print(f"{prog}: error: out of memory ({one_line(error)[:160]}); lower --train_batch_size or "
              "--eval_batch_size", file=sys.stderr)
        return 1
    finally:
        torch.set_num_threads(threads)  # an in-process caller (the tests) keeps its own setting
    return 0


if __name__ == "__main__":
    sys.exit(main())

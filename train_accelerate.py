"""Train a DDPM on FashionMNIST with Accelerate and publish it as a standard diffusers DDPMPipeline.

    accelerate launch train_accelerate.py [--config configs/NAME.yaml] [--key value ...] [--dry_run]

Also runs under `torchrun --nproc_per_node N` and plain `python`. The config says what to train
(ddpm_fashion/config.py); the launcher says how to run it (processes, GPUs, mixed precision backend).
"""

import json
import math
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from diffusers import DDPMPipeline, UNet2DModel
from diffusers import DDPMScheduler as LibraryDDPMScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file
from torchvision.utils import make_grid, save_image
from tqdm.auto import tqdm

from ddpm_fashion import run_dir
from ddpm_fashion.config import config_to_yaml, parse_config
from ddpm_fashion.data import ShardedBatchSampler, load_fashion_mnist, to_model_input
from ddpm_fashion.model_card import plot_loss, write_model_card
from ddpm_fashion.scheduler import DDPMScheduler
from ddpm_fashion.unet import UNet

TRAINER_STATE = "trainer_state.json"
EMA_WEIGHTS = "ema.safetensors"


def build_models(config):
    """The U-Net and noise scheduler; both U-Net implementations start from the same UNet2DModel weights."""
    UNet(**config.unet)  # validates the config with one-line errors before any weights are made
    shape = {k: config.unet.get(k) for k in ("sample_size", "in_channels", "out_channels")}
    if shape != {"sample_size": 32, "in_channels": 1, "out_channels": 1}:
        raise ValueError(f"unet {shape} does not fit the data: FashionMNIST is padded to 32x32 with 1 channel, "
                         "so set sample_size: 32, in_channels: 1, out_channels: 1")
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
    """AdamW, fused where this torch supports it for the device (it was the fastest update measured)."""
    return torch.optim.AdamW(model.parameters(), lr=config.learning_rate,
                             betas=(config.adam_beta1, config.adam_beta2), weight_decay=config.adam_weight_decay,
                             eps=config.adam_epsilon, fused=device.type in ("cpu", "cuda"))


def training_target(config, noise_scheduler, clean, noise, timesteps):
    """What the network learns to predict: eps (Ho et al. eq. 14), x_0, or v (Salimans & Ho 2022)."""
    if config.prediction_type == "epsilon":
        return noise
    if config.prediction_type == "sample":
        return clean
    return noise_scheduler.get_velocity(clean, noise, timesteps)


def global_batch_randomness(config, micro_step, global_size, num_timesteps, device):
    """Noise, timesteps and flips for the whole global batch, from a generator keyed by the micro-step.

    Every process draws the same global tensors and keeps its own slice, so N processes see exactly the
    randomness one process would, and a resumed run needs no generator state to continue identically.
    """
    generator = torch.Generator(device=device).manual_seed(config.seed * 1_000_003 + micro_step)
    noise = torch.randn((global_size, 1, 32, 32), generator=generator, device=device)
    timesteps = torch.randint(0, num_timesteps, (global_size,), generator=generator, device=device)
    flips = torch.rand(global_size, generator=generator, device=device) < 0.5
    return noise, timesteps, flips


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


def log_samples(accelerator, images, step):
    """Send a sample grid to the trackers that show images."""
    grid = make_grid(images, nrow=int(math.sqrt(len(images))) or 1, padding=1)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("samples", grid, step)
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"samples": wandb.Image(grid.permute(1, 2, 0).numpy())}, step=step)


def save_checkpoint(accelerator, config, step, ema, sampler, lr_scheduler, losses):
    """accelerator.save_state plus our trainer state, written under a temporary name and renamed when complete."""
    final = Path(config.output_dir) / run_dir.CHECKPOINTS / f"checkpoint-{step}"
    staging = final.with_name(run_dir.STAGING_PREFIX + final.name)
    accelerator.save_state(str(staging), safe_serialization=True)
    if accelerator.is_main_process:
        (staging / run_dir.CONFIG_FILE).write_text(config_to_yaml(config))
        state = {"global_step": step, "sampler": sampler.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
                 "losses": losses}
        if ema is not None:
            save_file({str(i): p.contiguous() for i, p in enumerate(ema.shadow_params)}, staging / EMA_WEIGHTS)
            state["ema"] = {k: v for k, v in ema.state_dict().items() if k != "shadow_params"}
        (staging / TRAINER_STATE).write_text(json.dumps(state))
        staging.rename(final)
        run_dir.prune_checkpoints(config.output_dir, config.checkpoints_total_limit)
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator, path, ema, sampler, lr_scheduler):
    """Restore model, optimizer and RNG (Accelerate) and our trainer state; returns (step, losses)."""
    accelerator.load_state(str(path))
    state = json.loads((Path(path) / TRAINER_STATE).read_text())
    sampler.load_state_dict(state["sampler"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    if ema is not None:
        shadow = load_file(Path(path) / EMA_WEIGHTS)
        ema.load_state_dict({**state["ema"], "shadow_params": [shadow[str(i)] for i in range(len(shadow))]})
        ema.to(accelerator.device)
    return state["global_step"], state["losses"]


def publish_pipeline(accelerator, config, model, noise_scheduler, ema, losses, images_seen, wall_time):
    """Write the final DDPMPipeline (EMA weights, UNet2DModel, diffusers scheduler) and swap it into output_dir."""
    output_dir = Path(config.output_dir)
    with ema_weights(accelerator.unwrap_model(model), ema) as final_model, \
            run_dir.staged_dir(output_dir / "pipeline") as staging:
        unet = final_model.to_diffusers() if isinstance(final_model, UNet) else final_model
        pipeline = DDPMPipeline(unet=unet, scheduler=LibraryDDPMScheduler.from_config(noise_scheduler.config))
        pipeline.save_pretrained(staging, safe_serialization=True)
        samples = sample_images(config, final_model, noise_scheduler, config.eval_batch_size, config.seed)
        save_image(samples, staging / "samples.png", nrow=int(math.sqrt(len(samples))) or 1, padding=1)
        plot_loss(staging / "loss.png", losses)
        write_model_card(staging / "README.md", config=config, config_yaml=config_to_yaml(config),
                         steps=len(losses), images_seen=images_seen, losses=losses, wall_time=wall_time,
                         world_size=accelerator.num_processes)
    run_dir.publish(output_dir / "pipeline", output_dir)


def train(config):
    """Validate everything, then run the training loop and publish the pipeline."""
    if config.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ValueError("mixed_precision=fp16 needs a CUDA GPU; on CPU use 'bf16' or 'no'")
    run_dir.check_output_dir(config.output_dir, resuming=config.resume_from_checkpoint is not None)
    resume_path = run_dir.resolve_checkpoint(config.output_dir, config.resume_from_checkpoint)
    model, noise_scheduler = build_models(config)
    images, _ = load_fashion_mnist("train", config.data_dir)

    accelerator = Accelerator(
        mixed_precision=config.mixed_precision, gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with=None if config.logger == "none" else config.logger,
        project_config=ProjectConfiguration(project_dir=config.output_dir, logging_dir=f"{config.output_dir}/logs"))
    device = accelerator.device
    images = images.to(device)  # the whole split lives on the device: a batch is one indexing op
    sampler = ShardedBatchSampler(len(images), config.train_batch_size, seed=config.seed,
                                  rank=accelerator.process_index, world_size=accelerator.num_processes)
    max_train_steps = config.max_train_steps or math.ceil(
        config.num_epochs * len(sampler) / config.gradient_accumulation_steps)

    optimizer = make_optimizer(config, model, device)
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps,
                                 num_training_steps=max_train_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    noise_scheduler.alphas_cumprod = noise_scheduler.alphas_cumprod.to(device)
    ema = None
    if config.use_ema:  # only parameters are averaged, never buffers
        ema = EMAModel(model.parameters(), decay=config.ema_max_decay, use_ema_warmup=True,
                       inv_gamma=config.ema_inv_gamma, power=config.ema_power, foreach=True)
        ema.to(device)

    if accelerator.is_main_process:
        Path(config.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(config.output_dir) / run_dir.CONFIG_FILE).write_text(config_to_yaml(config))
        run_dir.remove_stale_staging(Path(config.output_dir) / run_dir.CHECKPOINTS)
        tracker_config = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
                          for k, v in vars(config).items()}
        accelerator.init_trackers("ddpm_fashion", config=tracker_config)
    accelerator.wait_for_everyone()

    global_step, losses = 0, []
    if resume_path is not None:
        global_step, losses = load_checkpoint(accelerator, resume_path, ema, sampler, lr_scheduler)
        accelerator.print(f"resumed from {resume_path} at step {global_step}")
    elif config.resume_from_checkpoint == "latest":
        accelerator.print("no checkpoint found in output_dir; starting a new run")

    progress = tqdm(total=max_train_steps, initial=global_step, disable=not accelerator.is_main_process,
                    desc="train", unit="step", dynamic_ncols=True)
    start_time, start_step, step_loss = time.time(), global_step, 0.0
    micro_step = global_step * config.gradient_accumulation_steps
    model.train()
    while global_step < max_train_steps:
        for batch in sampler:
            with accelerator.accumulate(model):
                noise, timesteps, flips = global_batch_randomness(
                    config, micro_step, batch.global_size, config.ddpm_num_steps, device)
                part = slice(batch.start, batch.start + len(batch.indices))  # this process's share
                noise, timesteps = noise[part], timesteps[part]
                clean = to_model_input(images[batch.indices], flip=flips[part] if config.random_flip else None)
                noisy = noise_scheduler.add_noise(clean, noise, timesteps)  # q(x_t | x_0), eq. (4)
                target = training_target(config, noise_scheduler, clean, noise, timesteps)
                prediction = model(noisy, timesteps).sample
                # Sum over this process's samples / global batch: averaged across processes this is the
                # mean over the global batch even when the last batch splits unevenly.
                per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
                loss = per_sample.sum() / batch.global_size * accelerator.num_processes
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            micro_step += 1
            step_loss += accelerator.reduce(per_sample.detach().sum(), "sum").item() / batch.global_size
            if not accelerator.sync_gradients:
                continue

            global_step += 1
            step_loss /= config.gradient_accumulation_steps
            if not math.isfinite(step_loss):
                raise FloatingPointError(f"loss became {step_loss} at step {global_step}; the last good "
                                         f"checkpoint is kept in {Path(config.output_dir) / run_dir.CHECKPOINTS}")
            lr_scheduler.step()
            if ema is not None:
                ema.step(model.parameters())
            losses.append(step_loss)
            images_per_s = (global_step - start_step) * config.train_batch_size * accelerator.num_processes \
                * config.gradient_accumulation_steps / (time.time() - start_time)
            logs = {"loss": step_loss, "lr": lr_scheduler.get_last_lr()[0], "img_per_s": images_per_s}
            if ema is not None:
                logs["ema_decay"] = ema.cur_decay_value
            accelerator.log(logs, step=global_step)
            progress.update(1)
            progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{logs['lr']:.2e}", img_s=f"{images_per_s:.0f}")
            step_loss = 0.0

            if global_step % config.checkpointing_steps == 0 or global_step == max_train_steps:
                save_checkpoint(accelerator, config, global_step, ema, sampler, lr_scheduler, losses)
            end_of_epoch = sampler.position == len(sampler)
            sample_now = (global_step % config.save_images_steps == 0) if config.save_images_steps else (
                end_of_epoch and (sampler.epoch + 1) % config.save_images_epochs == 0)
            if sample_now and accelerator.is_main_process:
                with ema_weights(accelerator.unwrap_model(model), ema) as sampling_model:
                    grid = sample_images(config, sampling_model, noise_scheduler, config.eval_batch_size, config.seed)
                log_samples(accelerator, grid, global_step)
            if global_step >= max_train_steps:
                break
    progress.close()

    wall_time = time.time() - start_time
    images_seen = global_step * config.train_batch_size * accelerator.num_processes * \
        config.gradient_accumulation_steps
    if accelerator.is_main_process:
        publish_pipeline(accelerator, config, model, noise_scheduler, ema, losses, images_seen, wall_time)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    session_images = (global_step - start_step) * config.train_batch_size * accelerator.num_processes * \
        config.gradient_accumulation_steps
    accelerator.print(f"done: {global_step} steps, {images_seen} images seen, {wall_time:.0f} s this session, "
                      f"{session_images / max(wall_time, 1e-9):.1f} img/s; pipeline in {config.output_dir}")


def main(argv=None):
    """Parse the config and train; bad input is one line on stderr and exit code 2."""
    try:
        config, dry_run = parse_config(argv)
        if dry_run:
            print(config_to_yaml(config), end="")
            return 0
        train(config)
    except (ValueError, FileNotFoundError, PermissionError, NotADirectoryError) as error:
        print(f"train_accelerate.py: error: {error}", file=sys.stderr)
        return 2
    except FloatingPointError as error:
        print(f"train_accelerate.py: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

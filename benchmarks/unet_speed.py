"""U-Net throughput: our UNet against diffusers' UNet2DModel holding the same weights, in one process.

    python benchmarks/unet_speed.py [--config configs/cpu.yaml] [--rounds 9] [--batch_size 64] [--threads 2]
                                    [--device cpu|cuda] [--precision fp32|bf16] [--compile]

Always measures the speed-reference U-Net ((32, 64, 128), one resnet per level, attention at 16x16, GroupNorm 8
groups, 32x32x1); --config adds the `unet:` mapping of a training YAML. For each: a training step (forward,
MSE, backward, AdamW step) with each AdamW implementation (torch's default, on CPU a per-tensor loop; foreach;
fused: the optimizer is the trainer's choice), and an inference forward under torch.inference_mode. Rounds
alternate the two networks, and which goes first, so load from other processes hits both alike; medians over
rounds are reported. On a machine shared with other work, wall-clock time also counts the waits for a core, so
img/s per CPU-second of the process (the work done; OpenMP spin-waiting counts too) is printed as well.

Before timing, the outputs and gradients of the two networks are compared and printed: a speed-up only counts at
identical results. Peak memory on CPU is the growth of the peak RSS (VmHWM, reset through /proc/self/clear_refs)
over three steps of one network in a fresh child process; on CUDA it is torch.cuda.max_memory_allocated.
--compile wraps both networks in torch.compile (opt-in), reports compile time separately and then compares
compiled against compiled.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from diffusers import UNet2DModel

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from ddpm_fashion.models.unet import UNet  # noqa: E402

SPEED_REFERENCE_UNET = {"sample_size": 32, "in_channels": 1, "out_channels": 1, "block_out_channels": [32, 64, 128],
              "layers_per_block": 1, "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
              "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"], "norm_num_groups": 8}
# torch's default AdamW on CPU tensors is the per-tensor loop; foreach and fused are the faster implementations.
OPTIMIZERS = {"AdamW default": {}, "AdamW foreach": {"foreach": True}, "AdamW fused": {"fused": True}}
MEMORY_STEPS = 3


def build_pair(config, device, seed=0):
    """Get a UNet2DModel with random weights and our UNet holding the same weights."""
    torch.manual_seed(seed)
    reference = UNet2DModel(**config).to(device)
    return UNet.from_diffusers(reference), reference


def make_batch(config, batch_size, device, seed=1):
    """Get (noisy sample, per-sample timesteps, target noise) like one training batch."""
    generator = torch.Generator().manual_seed(seed)
    size = config["sample_size"]
    height, width = (size, size) if isinstance(size, int) else size
    sample = torch.randn(batch_size, config["in_channels"], height, width, generator=generator)
    timesteps = torch.randint(0, 1000, (batch_size,), generator=generator)
    noise = torch.randn(batch_size, config["out_channels"], height, width, generator=generator)
    return sample.to(device), timesteps.to(device), noise.to(device)


def autocast(device, precision):
    """Get the autocast context for the precision (a disabled one for fp32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def train_step(model, optimizer, batch, device, precision):
    """Run one training step: forward, MSE against the noise, backward, optimizer step."""
    sample, timesteps, noise = batch
    with autocast(device, precision):
        prediction = model(sample, timesteps).sample
    loss = F.mse_loss(prediction.float(), noise)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def inference_step(model, batch, device, precision):
    """Run one forward pass without autograd."""
    sample, timesteps, _ = batch
    with torch.inference_mode(), autocast(device, precision):
        return model(sample, timesteps).sample


def synchronize(device):
    """Wait for queued device work, so wall time covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def seconds(function, device):
    """Get the (wall, process CPU) seconds of one call."""
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    function()
    synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def relative_error(actual, expected):
    """Get max |actual - expected| relative to max |expected|."""
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def check_identical(ours, reference, batch):
    """Get the relative differences of the outputs and of all gradients for one fp32 training forward."""
    sample, timesteps, noise = batch
    losses = []
    for model in (ours, reference):
        model.zero_grad(set_to_none=True)
        prediction = model(sample, timesteps).sample
        F.mse_loss(prediction, noise).backward()
        losses.append(prediction.detach())
    grads_ours = torch.cat([p.grad.flatten() for _, p in sorted(ours.named_parameters())])
    grads_reference = torch.cat([p.grad.flatten() for _, p in sorted(reference.named_parameters())])
    ours.zero_grad(set_to_none=True)
    reference.zero_grad(set_to_none=True)
    return relative_error(losses[0], losses[1]), relative_error(grads_ours, grads_reference)


def compiled(model):
    """Get torch.compile(model); the first call (timed separately) pays the compile."""
    return torch.compile(model)


def measure_speed(config, args, device):
    """Get median images/s for each network and task, alternating the networks every round."""
    ours, reference = build_pair(config, device)
    batch = make_batch(config, args.batch_size, device)
    output_diff, grad_diff = check_identical(ours, reference, batch)
    print(f"  identical results: output rel. diff {output_diff:.1e}, gradient rel. diff {grad_diff:.1e}")
    networks = {"ours": ours, "UNet2DModel": reference}
    if args.compile:
        networks = {name: compiled(model) for name, model in networks.items()}
    optimizers = {(name, kind): torch.optim.AdamW(model.parameters(), lr=1e-4, **options)
                  for name, model in networks.items() for kind, options in OPTIMIZERS.items()}
    tasks = {f"train, {kind}": (lambda name, kind=kind: train_step(
        networks[name], optimizers[name, kind], batch, device, args.precision)) for kind in OPTIMIZERS}
    tasks["inference"] = lambda name: inference_step(networks[name], batch, device, args.precision)

    for task, run in tasks.items():  # warm-up; with --compile this is where compilation happens
        for name in networks:
            elapsed, _ = seconds(lambda: run(name), device)  # noqa: B023 (called at once, inside the loop)
            if args.compile:
                print(f"  first call (compiles), {task}, {name}: {elapsed:.1f} s")
    samples = {(task, name, clock): [] for task in tasks for name in networks for clock in ("wall", "cpu")}
    for round_index in range(args.rounds):
        order = list(networks) if round_index % 2 == 0 else list(reversed(networks))
        for task, run in tasks.items():
            for name in order:
                wall, cpu = seconds(lambda: run(name), device)  # noqa: B023 (called at once, inside the loop)
                samples[task, name, "wall"].append(args.batch_size / wall)
                samples[task, name, "cpu"].append(args.batch_size / cpu)
    return {key: statistics.median(values) for key, values in samples.items()}, list(tasks)


def peak_memory_mib(config, args, device, network, task):
    """Get the peak memory growth (MiB) of `task` for one network, measured apart from the other network."""
    if device.type == "cuda":
        model = build_pair(config, device)[0 if network == "ours" else 1]  # the other one is freed at once
        return run_for_memory(model, config, args, device, task)
    command = [sys.executable, __file__, "--memory-child", json.dumps(
        {"config": config, "network": network, "task": task, "batch_size": args.batch_size,
         "threads": args.threads, "precision": args.precision})]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def run_for_memory(model, config, args, device, task):
    """Run MEMORY_STEPS steps of task and get the peak memory growth in MiB (RSS on CPU, allocator on CUDA)."""
    batch = make_batch(config, args.batch_size, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        reset_peak_rss()
        baseline = rss_bytes("VmRSS")
    for _ in range(MEMORY_STEPS):
        if task == "train":
            train_step(model, optimizer, batch, device, args.precision)
        else:
            inference_step(model, batch, device, args.precision)
    if device.type == "cuda":
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - baseline) / 2**20
    return (rss_bytes("VmHWM") - baseline) / 2**20


def reset_peak_rss():
    """Make the kernel's peak-RSS mark (VmHWM) restart from the current RSS (Linux)."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def rss_bytes(field):
    """Get VmRSS (resident now) or VmHWM (peak resident) of this process from /proc (Linux)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def memory_child(spec):
    """Entry point of the child process that measures one network's peak memory on the CPU."""
    torch.set_num_threads(spec["threads"])
    model = build_pair(spec["config"], torch.device("cpu"))[0 if spec["network"] == "ours" else 1]
    args = argparse.Namespace(batch_size=spec["batch_size"], precision=spec["precision"])
    print(run_for_memory(model, spec["config"], args, torch.device("cpu"), spec["task"]))


def report(label, config, args, device):
    """Measure one configuration and print its table."""
    print(f"\n{label}: {json.dumps(config)}")
    print(f"  batch {args.batch_size}, {args.precision}, {device.type}, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds{', torch.compile' if args.compile else ''}")
    speeds, tasks = measure_speed(config, args, device)
    for clock, title in (("wall", "img/s, wall clock"), ("cpu", "img/s per CPU-second")):
        if clock == "cpu" and device.type != "cpu":
            continue
        print(f"  {title + ' (median)':38s} {'ours':>9s} {'UNet2DModel':>12s} {'ratio':>7s}")
        for task in tasks:
            ours, reference = speeds[task, "ours", clock], speeds[task, "UNet2DModel", clock]
            print(f"  {task:38s} {ours:9.1f} {reference:12.1f} {ours / reference:6.2f}x")
    if args.skip_memory:
        return
    kind = "allocator peak" if device.type == "cuda" else "peak RSS growth"
    for task in ("train", "inference"):
        ours = peak_memory_mib(config, args, device, "ours", task)
        reference = peak_memory_mib(config, args, device, "UNet2DModel", task)
        print(f"  {task + ' memory, ' + kind + ' (MiB)':38s} {ours:9.0f} {reference:12.0f} {ours / reference:6.2f}x")


def unet_config_from_yaml(path):
    """Get the `unet:` mapping of a training YAML (its keys are UNet2DModel config keys)."""
    with open(path) as file:
        document = yaml.safe_load(file)
    if not isinstance(document, dict) or not isinstance(document.get("unet"), dict):
        raise ValueError(f"{path} has no top-level `unet:` mapping")
    return document["unet"]


def main(argv=None):
    """Parse the command line and print a table per configuration."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", action="append", default=[], help="training YAML whose `unet:` to add")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--batch_size", "--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--compile", action="store_true", help="compare torch.compile'd networks")
    parser.add_argument("--skip_memory", "--skip-memory", action="store_true")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        return memory_child(json.loads(args.memory_child))
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}")
    report("speed-reference U-Net", SPEED_REFERENCE_UNET, args, device)
    for path in args.config:
        report(path, unet_config_from_yaml(path), args, device)


if __name__ == "__main__":
    main()

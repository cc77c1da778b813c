"""ddpm_fashion/sampling/saved_pipeline.py: a saved pipeline loaded with the scheduler and U-Net asked for; devices."""

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UNet2DModel
from diffusers import DDPMScheduler as LibraryDDPMScheduler

from ddpm_fashion.models.unet import UNet
from ddpm_fashion.sampling import saved_pipeline
from ddpm_fashion.schedulers.ddpm import DDPMScheduler

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_load_pipeline_builds_the_requested_scheduler_and_unet(model_dir):
    own = saved_pipeline.load_pipeline(model_dir, scheduler="own", unet="own", device="cpu")
    assert isinstance(own.scheduler, DDPMScheduler) and isinstance(own.unet, UNet)
    ddim = saved_pipeline.load_pipeline(model_dir, scheduler="ddim", device="cpu")
    assert isinstance(ddim.scheduler, DDIMScheduler) and isinstance(ddim.unet, UNet2DModel)
    assert own.scheduler.config.clip_sample and not ddim.scheduler.config.clip_sample  # DDIM does not clip x_0
    inherited = saved_pipeline.load_pipeline(model_dir, scheduler="ddim-from-config", device="cpu").scheduler
    assert isinstance(inherited, DDIMScheduler) and inherited.config.clip_sample  # the user's choice: as from_config
    assert dict(inherited.config) == dict(DDIMScheduler.from_config(own.scheduler.config).config)
    dpm = saved_pipeline.load_pipeline(model_dir, scheduler="dpm", device="cpu")
    assert isinstance(dpm.scheduler, DPMSolverMultistepScheduler)
    assert dpm.scheduler.config.algorithm_type == "dpmsolver++"
    # Every scheduler keeps the trained noise schedule.
    for pipe in (own, ddim, dpm):
        assert torch.equal(pipe.scheduler.alphas_cumprod, LibraryDDPMScheduler().alphas_cumprod)
    torch.testing.assert_close(own.unet.state_dict(), ddim.unet.state_dict(), rtol=0, atol=0)


def test_resolve_device():
    assert saved_pipeline.resolve_device("cpu") == torch.device("cpu")
    assert saved_pipeline.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="device 'tpu' is not supported; choose one of: auto, cpu, cuda"):
        saved_pipeline.resolve_device("tpu")

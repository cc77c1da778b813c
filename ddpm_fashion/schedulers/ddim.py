"""DDIM that stops above the lowest noise levels: diffusers' DDIMScheduler, its walk ended early with x_0_hat.

DDIM (Song et al. 2021) walks its timesteps down to t = 0 and returns the x_0_hat of the last one. At the lowest
noise levels (t = 20 is noise of std 0.08 in [-1, 1] units, t = 40 std 0.11) the project's min-SNR-weighted models
are least accurate against the noise they have to remove (at t = 0 they remove an eighth of it;
benchmarks/dark_pixels.py), so a sampler that walks those timesteps finely follows the U-Net's error, leaves the
black background grey, and scored worse the more steps it took.
Ending the walk at the first timestep >= `final_timestep` and returning that step's x_0_hat skips them, whatever
the step count: on the reference model DDIM's FID then falls with the steps (50 / 100 / 250) instead of rising
(`python benchmarks/ddim_steps.py --settings clip_sample=false,final_x0_from=40`; docs/results.md). This is
the "denoise at the last step" of Song et al. 2021 (score SDE) and the sigma_min of Karras et al. 2022.
"""

from diffusers import DDIMScheduler
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput

# The default end, the best of t = 0 / 20 / 40 / 60 measured (docs/results.md). The leading spacing of 50, 100 and
# 250 steps all land on t = 40, so they end at the same level.
FINAL_TIMESTEP = 40


class EndingDDIMScheduler(DDIMScheduler):
    """diffusers' DDIMScheduler whose walk stops at the first timestep >= `final_timestep`, returning its x_0_hat.

    Built like DDIMScheduler (`EndingDDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)`);
    `final_timestep` is an attribute (default FINAL_TIMESTEP), not a config key, so the config stays diffusers'.
    With final_timestep = 0 it is DDIMScheduler, step for step.
    """

    final_timestep = FINAL_TIMESTEP

    def set_timesteps(self, num_inference_steps: int, device=None):
        """Set DDIM's timesteps, then drop those below final_timestep (the walk keeps at least its first one)."""
        super().set_timesteps(num_inference_steps, device)
        kept = self.timesteps[self.timesteps >= self.final_timestep]
        self.timesteps = kept if len(kept) else self.timesteps[:1]

    def step(self, model_output, timestep, sample, eta: float = 0.0, use_clipped_model_output: bool = False,
             generator=None, variance_noise=None, return_dict: bool = True):
        """DDIM's step (eq. (12)); the walk's last step goes to alpha_bar = 1, where x_{t-1} is x_0_hat itself."""
        output = super().step(model_output, timestep, sample, eta=eta,
                              use_clipped_model_output=use_clipped_model_output, generator=generator,
                              variance_noise=variance_noise, return_dict=True)
        if self.final_timestep > 0 and int(timestep) == int(self.timesteps[-1]):
            # eq. (12) with alpha_{t-1} = 1: the direction and noise terms carry sqrt(1 - alpha_{t-1}) = 0.
            output = DDIMSchedulerOutput(prev_sample=output.pred_original_sample,
                                         pred_original_sample=output.pred_original_sample)
        return output if return_dict else (output.prev_sample, output.pred_original_sample)

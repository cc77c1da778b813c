"""The DDPM sampler of Ho et al. 2020 (arXiv:2006.11239), written to read beside the paper.

It is a drop-in for `diffusers.DDPMScheduler`: same config, same methods and attributes (its private names
`_get_variance` and `_threshold_sample` included, as aliases), the same return types, and the same numbers for the
same inputs and generator (the test suite checks this bit for bit). Where diffusers is wrong it raises or fixes
instead: `fixed_large_log` gives finite samples; impossible step counts and schedules, unknown option names,
non-finite options and trained_betas of the wrong length raise ValueError when the scheduler is built.

Notation, used for the locals below (the paper's eq. 4 and the text around eq. 6-7):
    beta_t               variance of the noise added by forward step t (`betas`)
    alpha_t = 1 - beta_t                                                   (`alphas`)
    alpha_prod_t         alpha-bar_t, the product alpha_1 ... alpha_t      (`alphas_cumprod`)
    beta_prod_t          1 - alpha-bar_t, the total noise variance of x_t given x_0
    *_prev               the same at the timestep the reverse step lands on ("t-1"; with strided or custom
                         timesteps this is the next timestep of the schedule, -1 meaning the clean image).
"""

import operator
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ddpm_fashion.guards.inputs import check_finite, require_choice
from ddpm_fashion.schedulers.noise_schedules import BETA_SCHEDULES, rescale_zero_terminal_snr, trained_betas_tensor

VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")
LEARNED_VARIANCE_TYPES = ("learned", "learned_range")
# The form in which `reverse_variance` (diffusers' `_get_variance`) returns sigma_t^2 for each variance_type.
VARIANCE_FORMS = {
    "fixed_small": "variance",
    "fixed_small_log": "std",
    "fixed_large": "variance",
    "fixed_large_log": "log_variance",
    "learned": "variance",
    "learned_range": "log_variance",
}
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")

# The posterior variance is 0 at the last step and its log is taken, so it is floored here first.
MIN_POSTERIOR_VARIANCE = 1e-20


@dataclass
class DDPMSchedulerOutput(BaseOutput):
    """What `DDPMScheduler.step` returns: x_{t-1} and the model's current estimate of x_0."""

    prev_sample: torch.Tensor
    pred_original_sample: Optional[torch.Tensor] = None


def _as_count(name: str, value) -> int:
    """Get value as a Python int, or raise a ValueError when it is not an integer."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


class DDPMScheduler(SchedulerMixin, ConfigMixin):
    """The DDPM reverse process p(x_{t-1} | x_t) and forward process q(x_t | x_0), equal to diffusers'.

    Arguments, defaults and attributes are those of `diffusers.DDPMScheduler`, so either class loads the other's
    config (`from_config`, `from_pretrained`) and any diffusers pipeline accepts this one.
    """

    _compatibles = [scheduler.name for scheduler in KarrasDiffusionSchedulers]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Optional[Union[np.ndarray, Sequence[float]]] = None,
        variance_type: str = "fixed_small",
        clip_sample: bool = True,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        num_train_timesteps = _as_count("num_train_timesteps", num_train_timesteps)
        if num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be at least 1, got {num_train_timesteps}")
        require_choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
        require_choice("variance_type", variance_type, VARIANCE_TYPES)
        require_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        require_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        if _as_count("steps_offset", steps_offset) < 0:
            raise ValueError(f"steps_offset must be 0 or more, got {steps_offset}")
        # Every comparison with NaN is False, so it slips past range checks (diffusers builds NaN betas from it).
        finite_options = dict(beta_start=beta_start, beta_end=beta_end, clip_sample_range=clip_sample_range,
                              dynamic_thresholding_ratio=dynamic_thresholding_ratio, sample_max_value=sample_max_value)
        for name, value in finite_options.items():
            check_finite(name, value)
        if beta_start < 0 or beta_end < 0:
            raise ValueError(f"beta_start and beta_end are variances and must be >= 0, got {beta_start}, {beta_end}")
        if not 0 < dynamic_thresholding_ratio <= 1:
            raise ValueError(f"dynamic_thresholding_ratio is a quantile in (0, 1], got {dynamic_thresholding_ratio}")

        if trained_betas is not None:
            self.betas = trained_betas_tensor(trained_betas, num_train_timesteps)
        else:
            self.betas = BETA_SCHEDULES[beta_schedule](num_train_timesteps, beta_start, beta_end)
        if rescale_betas_zero_snr:
            self.betas = rescale_zero_terminal_snr(self.betas)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        # alpha-bar before the first forward step is 1 (x_0 is clean); the final reverse step lands there.
        self.final_alpha_cumprod = torch.tensor(1.0)
        # The initial noise x_T ~ N(0, I) (Algorithm 2, line 1) needs no scaling.
        self.init_noise_sigma = 1.0

        self.num_inference_steps = None
        self.custom_timesteps = False
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1, dtype=torch.int64)
        # Timestep -> the timestep the reverse step lands on; None while stepping through every training timestep.
        self._previous_timestep_of = None
        # add_noise/get_velocity run once per training batch: keep alpha-bar on the batch's device and dtype.
        self._alphas_cumprod_like = {}

    def scale_model_input(self, sample: torch.Tensor, timestep: Optional[int] = None) -> torch.Tensor:
        """Get the model input for this step: DDPM feeds x_t unscaled (kept for interchangeable schedulers)."""
        return sample

    def set_timesteps(
        self,
        num_inference_steps: Optional[int] = None,
        device: Union[str, torch.device, None] = None,
        timesteps: Optional[Sequence[int]] = None,
    ) -> None:
        """Choose the descending training timesteps to sample with: a count spaced by timestep_spacing, or a list."""
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError(
                "pass exactly one of num_inference_steps (a count) or timesteps (a descending list); "
                f"got num_inference_steps={num_inference_steps!r}, timesteps={timesteps!r}"
            )
        if timesteps is not None:
            schedule = self._checked_custom_timesteps(timesteps)
            self.custom_timesteps = True
        else:
            schedule = self._spaced_timesteps(self._checked_step_count(num_inference_steps))
            self.custom_timesteps = False
        self.num_inference_steps = len(schedule)
        self.timesteps = torch.from_numpy(schedule).to(device)
        # Each step lands on the next timestep of the schedule, the last one on -1 (the clean image).
        self._previous_timestep_of = dict(zip(schedule.tolist(), schedule[1:].tolist() + [-1]))

    def _checked_step_count(self, num_inference_steps) -> int:
        """Get num_inference_steps as an int, or raise a ValueError when it is not in 1..num_train_timesteps."""
        count = _as_count("num_inference_steps", num_inference_steps)
        num_train_timesteps = self.config.num_train_timesteps
        if not 1 <= count <= num_train_timesteps:
            raise ValueError(
                f"num_inference_steps must be between 1 and num_train_timesteps={num_train_timesteps}, got {count}"
            )
        return count

    def _checked_custom_timesteps(self, timesteps) -> np.ndarray:
        """Get custom timesteps as int64, or raise a ValueError unless they are distinct, descending and in range."""
        if isinstance(timesteps, torch.Tensor):
            timesteps = timesteps.detach().cpu().numpy()
        values = np.asarray(timesteps)
        num_train_timesteps = self.config.num_train_timesteps
        if values.ndim != 1 or values.size == 0:
            raise ValueError(f"timesteps must be a non-empty flat list of integers, got {timesteps!r}")
        is_number = np.issubdtype(values.dtype, np.number)
        if not (is_number and np.all(np.isfinite(values)) and np.array_equal(values, np.round(values))):
            raise ValueError(f"timesteps must be integers, got {timesteps!r}")
        values = values.astype(np.int64)
        if np.any(np.diff(values) >= 0):
            raise ValueError(f"timesteps must be strictly descending, got {values.tolist()}")
        if values[0] >= num_train_timesteps or values[-1] < 0:
            raise ValueError(
                f"timesteps must lie in 0..{num_train_timesteps - 1} (num_train_timesteps - 1), got {values.tolist()}"
            )
        return values

    def _spaced_timesteps(self, num_inference_steps: int) -> np.ndarray:
        """Get num_inference_steps descending timesteps spaced as in Table 2 of Lin et al. 2023 (arXiv:2305.08891)."""
        num_train_timesteps = self.config.num_train_timesteps
        spacing = self.config.timestep_spacing
        if spacing == "linspace":
            # Evenly over [0, T-1], both ends included, rounded to the nearest integer.
            schedule = np.linspace(0, num_train_timesteps - 1, num_inference_steps).round()[::-1]
        elif spacing == "leading":
            # Multiples of the integer stride T // n counted up from 0, then shifted by steps_offset.
            stride = num_train_timesteps // num_inference_steps
            schedule = np.arange(num_inference_steps - 1, -1, -1) * stride + self.config.steps_offset
        else:
            # Multiples of the real stride T / n counted down from T, minus one so the first step is T-1.
            # A float arange can run one element past n (ending near 0, i.e. timestep -1): keep exactly n.
            stride = num_train_timesteps / num_inference_steps
            schedule = np.round(np.arange(num_train_timesteps, 0, -stride))[:num_inference_steps] - 1
        schedule = np.ascontiguousarray(schedule, dtype=np.int64)
        if schedule[0] >= num_train_timesteps:
            raise ValueError(
                f"timestep_spacing='leading' with steps_offset={self.config.steps_offset} puts the first of "
                f"{num_inference_steps} steps at timestep {schedule[0]}, past the last training timestep "
                f"{num_train_timesteps - 1}; use fewer inference steps or a smaller steps_offset"
            )
        return schedule

    def previous_timestep(self, timestep: Union[int, torch.Tensor]) -> Union[int, torch.Tensor]:
        """Get the timestep that the reverse step from `timestep` lands on (-1 after the last step), typed as diffusers.

        While stepping through every training timestep this is `timestep - 1` (an int for an int, a tensor for a
        tensor); once set_timesteps has chosen a schedule it is a 0-d int64 tensor, on the device of .timesteps
        except the final -1 (on the CPU), exactly as diffusers returns it. step() uses the plain int instead.
        """
        prev_t = self._previous_t(self._checked_timestep(timestep))
        if self._previous_timestep_of is None:
            return timestep - 1
        return torch.tensor(prev_t, device=self.timesteps.device if prev_t >= 0 else None)

    def _previous_t(self, t: int) -> int:
        """Get the timestep that the reverse step from timestep t lands on, as an int (-1 after the last step)."""
        if self._previous_timestep_of is None:
            return t - 1
        if t not in self._previous_timestep_of:
            raise ValueError(
                f"timestep {t} is not in the schedule set by set_timesteps: step with one of its "
                f"{len(self.timesteps)} timesteps, {self.timesteps[0]} down to {self.timesteps[-1]} (see .timesteps)"
            )
        return self._previous_timestep_of[t]

    def _checked_timestep(self, timestep) -> int:
        """Get a timestep (int, float or one-element tensor) as an int, or raise a ValueError when out of range."""
        if isinstance(timestep, torch.Tensor):
            if timestep.numel() != 1:
                raise ValueError(f"timestep must be a single integer, got a tensor of shape {tuple(timestep.shape)}")
            timestep = timestep.item()
        if isinstance(timestep, float) and timestep.is_integer():
            timestep = int(timestep)
        t = _as_count("timestep", timestep)
        if not 0 <= t < self.config.num_train_timesteps:
            raise ValueError(f"timestep must lie in 0..{self.config.num_train_timesteps - 1}, got {t}")
        return t

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Union[int, torch.Tensor],
        sample: torch.Tensor,
        generator: Optional[torch.Generator] = None,
        return_dict: bool = True,
    ) -> Union[DDPMSchedulerOutput, Tuple[torch.Tensor, torch.Tensor]]:
        """Sample x_{t-1} ~ p(x_{t-1} | x_t) from the model's output at x_t (Algorithm 2, lines 3-4)."""
        t = self._checked_timestep(timestep)
        model_output, predicted_variance = self._split_predicted_variance(model_output, sample)

        # 1. compute alphas, betas; "current" ones span the whole (possibly strided) step t -> prev_t
        alpha_prod_t, alpha_prod_t_prev = self._alpha_prods(t)
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        current_alpha_t = alpha_prod_t / alpha_prod_t_prev
        current_beta_t = 1 - current_alpha_t

        # 2. compute predicted original sample x_0, eq. (15) (from v instead: Salimans & Ho 2022, section 4)
        prediction_type = self.config.prediction_type
        if prediction_type == "epsilon":
            pred_original_sample = (sample - beta_prod_t.sqrt() * model_output) / alpha_prod_t.sqrt()
        elif prediction_type == "sample":
            pred_original_sample = model_output
        else:  # v_prediction
            pred_original_sample = alpha_prod_t.sqrt() * sample - beta_prod_t.sqrt() * model_output

        # 3. clip or threshold predicted x_0 to the data range (section 3.3: data scaled to [-1, 1])
        if self.config.thresholding:
            pred_original_sample = self._dynamic_threshold(pred_original_sample)
        elif self.config.clip_sample:
            clip_range = self.config.clip_sample_range
            pred_original_sample = pred_original_sample.clamp(-clip_range, clip_range)

        # 4. compute coefficients of x_0 and x_t in the posterior mean mu~_t(x_t, x_0), eq. (7)
        pred_original_sample_coeff = (alpha_prod_t_prev.sqrt() * current_beta_t) / beta_prod_t
        current_sample_coeff = current_alpha_t.sqrt() * beta_prod_t_prev / beta_prod_t

        # 5. compute the posterior mean mu~_t, eq. (7)
        pred_prev_sample = pred_original_sample_coeff * pred_original_sample + current_sample_coeff * sample

        # 6. add noise sigma_t * z, z ~ N(0, I) (Algorithm 2, line 4); z = 0 only at t = 0, as in diffusers
        if t > 0:
            noise = randn_tensor(
                model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype
            )
            pred_prev_sample = pred_prev_sample + self._noise_scale(t, predicted_variance) * noise

        if not return_dict:
            return pred_prev_sample, pred_original_sample
        return DDPMSchedulerOutput(prev_sample=pred_prev_sample, pred_original_sample=pred_original_sample)

    def _split_predicted_variance(self, model_output: torch.Tensor, sample: torch.Tensor):
        """Get (prediction, predicted variance or None): learned-variance models output 2 x C channels."""
        variance_type = self.config.variance_type
        if variance_type in LEARNED_VARIANCE_TYPES:
            channels = sample.shape[1]
            if model_output.ndim != sample.ndim or model_output.shape[1] != 2 * channels:
                raise ValueError(
                    f"variance_type={variance_type!r} needs model_output with 2 x {channels} channels (prediction "
                    f"then variance) for a sample of shape {tuple(sample.shape)}, got {tuple(model_output.shape)}"
                )
            model_output, predicted_variance = torch.split(model_output, channels, dim=1)
        else:
            predicted_variance = None
        if model_output.shape != sample.shape:
            raise ValueError(
                f"model_output of shape {tuple(model_output.shape)} must match sample of shape {tuple(sample.shape)}"
                f" (2 x C channels need variance_type 'learned' or 'learned_range')"
            )
        return model_output, predicted_variance

    def _alpha_prods(self, t: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Get alpha-bar at timestep t and at the timestep its reverse step lands on (1 there after the last step)."""
        prev_t = self._previous_t(t)
        alpha_prod_t_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        return self.alphas_cumprod[t], alpha_prod_t_prev

    def reverse_variance(
        self,
        t: Union[int, torch.Tensor],
        predicted_variance: Optional[torch.Tensor] = None,
        variance_type: Optional[str] = None,
    ) -> torch.Tensor:
        """Get sigma_t^2, the variance of p(x_{t-1} | x_t), in the form VARIANCE_FORMS names for the variance_type.

        sigma_t^2 = beta~_t ("small") or beta_t ("large") are the two choices of section 3.2; "learned" models
        predict sigma_t^2 and "learned_range" ones interpolate log sigma_t^2 between the two (Nichol & Dhariwal
        2021, eq. 15). variance_type defaults to the config's; the values equal diffusers' `_get_variance`.
        """
        variance_type = self.config.variance_type if variance_type is None else variance_type
        require_choice("variance_type", variance_type, VARIANCE_TYPES)
        if variance_type in LEARNED_VARIANCE_TYPES and predicted_variance is None:
            raise ValueError(f"variance_type {variance_type!r} needs the model's predicted_variance")
        alpha_prod_t, alpha_prod_t_prev = self._alpha_prods(self._checked_timestep(t))
        current_beta_t = 1 - alpha_prod_t / alpha_prod_t_prev
        # posterior variance beta~_t, eq. (7); floored because its log is taken
        posterior_variance = (1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * current_beta_t
        posterior_variance = torch.clamp(posterior_variance, min=MIN_POSTERIOR_VARIANCE)
        if variance_type == "fixed_small":
            return posterior_variance
        if variance_type == "fixed_small_log":
            return torch.exp(0.5 * torch.log(posterior_variance))
        if variance_type == "fixed_large":
            return current_beta_t
        if variance_type == "fixed_large_log":
            return torch.log(current_beta_t)
        if variance_type == "learned":
            return predicted_variance
        fraction = (predicted_variance + 1) / 2  # learned_range: the model's output in [-1, 1], mapped to [0, 1]
        return fraction * torch.log(current_beta_t) + (1 - fraction) * torch.log(posterior_variance)

    # diffusers' name: its pipelines (ValueGuidedRLPipeline) and code written for its scheduler call it.
    _get_variance = reverse_variance

    def _noise_scale(self, t: int, predicted_variance: Optional[torch.Tensor]) -> torch.Tensor:
        """Get sigma_t, the standard deviation of the noise the reverse step from t adds (Algorithm 2, line 4)."""
        variance = self.reverse_variance(t, predicted_variance)
        form = VARIANCE_FORMS[self.config.variance_type]
        if form == "variance":
            return variance.sqrt()
        if form == "log_variance":
            # diffusers takes the square root of fixed_large_log's log-variance here, giving NaN (diffusers#14569).
            return torch.exp(0.5 * variance)
        return variance  # already sigma_t

    def _dynamic_threshold(self, pred_original_sample: torch.Tensor) -> torch.Tensor:
        """Get x_0 clamped to [-s, s] and divided by s, s a per-image quantile of |x_0| (Imagen, Saharia et al.)."""
        dtype = pred_original_sample.dtype
        batch_size = pred_original_sample.shape[0]
        flat = pred_original_sample
        if dtype not in (torch.float32, torch.float64):
            flat = flat.float()  # quantile needs float32/64, and CPU clamp has no half kernel
        flat = flat.reshape(batch_size, -1)  # (B, C*H*W): one threshold per image
        s = torch.quantile(flat.abs(), self.config.dynamic_thresholding_ratio, dim=1)
        # s >= 1 makes this plain clipping to [-1, 1] for images already in range
        s = torch.clamp(s, min=1, max=self.config.sample_max_value).unsqueeze(1)  # (B, 1)
        flat = torch.clamp(flat, -s, s) / s
        return flat.reshape(pred_original_sample.shape).to(dtype)

    def _threshold_sample(self, sample: torch.Tensor) -> torch.Tensor:
        """Get `_dynamic_threshold(sample)` under diffusers' name and argument name, which its schedulers copy."""
        return self._dynamic_threshold(sample)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Get x_t ~ q(x_t | x_0) = N(sqrt(alpha-bar_t) x_0, (1 - alpha-bar_t) I), eq. (4), from given noise."""
        sqrt_alpha_prod, sqrt_one_minus_alpha_prod = self._forward_coefficients(timesteps, original_samples)
        return sqrt_alpha_prod * original_samples + sqrt_one_minus_alpha_prod * noise

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Get the v-prediction target v = sqrt(alpha-bar_t) eps - sqrt(1 - alpha-bar_t) x_0 (Salimans & Ho 2022)."""
        sqrt_alpha_prod, sqrt_one_minus_alpha_prod = self._forward_coefficients(timesteps, sample)
        return sqrt_alpha_prod * noise - sqrt_one_minus_alpha_prod * sample

    def _forward_coefficients(self, timesteps: torch.Tensor, like: torch.Tensor):
        """Get sqrt(alpha-bar_t) and sqrt(1 - alpha-bar_t) per timestep, shaped to broadcast over `like`."""
        key = (like.device, like.dtype)
        if key not in self._alphas_cumprod_like:
            self._alphas_cumprod_like = {key: self.alphas_cumprod.to(device=like.device, dtype=like.dtype)}
        alpha_prod = self._alphas_cumprod_like[key][torch.as_tensor(timesteps, device=like.device)]
        broadcast_shape = (-1,) + (1,) * (like.ndim - 1)  # (B,) -> (B, 1, ..., 1)
        sqrt_alpha_prod = (alpha_prod**0.5).flatten().reshape(broadcast_shape)
        sqrt_one_minus_alpha_prod = ((1 - alpha_prod) ** 0.5).flatten().reshape(broadcast_shape)
        return sqrt_alpha_prod, sqrt_one_minus_alpha_prod

    def __len__(self) -> int:
        """Get the number of training timesteps T."""
        return self.config.num_train_timesteps

    # diffusers' attribute names, for code written against its DDPMScheduler.

    @property
    def one(self) -> torch.Tensor:
        """Get alpha-bar where the last reverse step lands, 1 (diffusers' name for final_alpha_cumprod)."""
        return self.final_alpha_cumprod

    @property
    def variance_type(self) -> str:
        """Get config.variance_type; read-only, because step() reads the config (diffusers keeps a writable copy)."""
        return self.config.variance_type

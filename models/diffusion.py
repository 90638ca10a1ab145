"""Gaussian-diffusion math of MAR's diffusion head (ADM / improved-DDPM conventions).

Pure functions. A `Schedule` holds float64 numpy tables per step; functions read them at the
step(s) t and compute in the input's dtype, at least float32 (float64 stays float64). t is a
LongTensor [N] of per-row steps (training) or a Python int (sampling, where the table entries
become Python floats: kernel arguments, so the sampler stays capturable in a CUDA graph).
Noise prediction eps, learned-range variance; x_0 predictions are never clipped.
"""
import math

import numpy as np
import torch

LN2 = math.log(2.0)


def cosine_alpha_bar(s):
    """Improved DDPM's cosine schedule: fraction of signal variance left at time s in [0, 1]."""
    return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2


def cosine_betas(num_steps, max_beta=0.999):
    """beta_i = min(1 - alpha_bar((i+1)/T) / alpha_bar(i/T), max_beta), float64 [T]."""
    return np.array([min(1 - cosine_alpha_bar((i + 1) / num_steps) / cosine_alpha_bar(i / num_steps), max_beta)
                     for i in range(num_steps)], dtype=np.float64)


def space_timesteps(num_steps, num_kept):
    """The original timesteps ADM's space_timesteps keeps for one section: `num_kept` evenly
    spaced steps from 0 to num_steps - 1, each the rounded running sum of the stride."""
    if not 1 <= num_kept <= num_steps:
        raise ValueError(f"cannot keep {num_kept} of {num_steps} diffusion steps")
    stride = (num_steps - 1) / (num_kept - 1) if num_kept > 1 else 1
    kept, position = [], 0.0
    for _ in range(num_kept):
        kept.append(round(position))
        position += stride
    return kept


class Schedule:
    """Per-step float64 tables of a diffusion; `timesteps[i]` is the training timestep that step i
    stands for (the network is always called with it)."""

    def __init__(self, betas, timesteps=None):
        betas = np.asarray(betas, dtype=np.float64)
        if len(betas) < 2:
            raise ValueError("a diffusion schedule needs at least 2 steps")
        self.timesteps = np.arange(len(betas)) if timesteps is None else np.asarray(timesteps, dtype=np.int64)
        alpha_bar = np.cumprod(1.0 - betas)
        alpha_bar_prev = np.append(1.0, alpha_bar[:-1])
        self.log_betas = np.log(betas)
        self.sqrt_alpha_bar = np.sqrt(alpha_bar)
        self.sqrt_one_minus_alpha_bar = np.sqrt(1.0 - alpha_bar)
        self.sqrt_recip_alpha_bar = np.sqrt(1.0 / alpha_bar)
        self.sqrt_recipm1_alpha_bar = np.sqrt(1.0 / alpha_bar - 1.0)
        posterior_variance = betas * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)
        # the t = 0 posterior variance is 0; borrowing t = 1's keeps its log finite
        self.posterior_log_variance = np.log(np.append(posterior_variance[1], posterior_variance[1:]))
        self.posterior_coef_x0 = betas * np.sqrt(alpha_bar_prev) / (1.0 - alpha_bar)
        self.posterior_coef_xt = (1.0 - alpha_bar_prev) * np.sqrt(1.0 - betas) / (1.0 - alpha_bar)
        self._tensors = {}  # (table name, device) -> the table there (tensor)

    def tensor(self, name, device):
        """Table `name` as a float64 tensor on `device`, made once per device: a copy from host memory at
        every training step would wait for the GPU's queued work each time."""
        key = (name, torch.device(device))
        if key not in self._tensors:
            self._tensors[key] = torch.as_tensor(getattr(self, name), device=device)
        return self._tensors[key]

    @classmethod
    def respaced(cls, betas, kept):
        """The schedule on the kept original steps, its betas recomputed from alpha_bar there."""
        alpha_bar = np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))[kept]
        return cls(1.0 - alpha_bar / np.append(1.0, alpha_bar[:-1]), kept)

    def __len__(self):
        return len(self.timesteps)


def compute_dtype(x):
    """The dtype diffusion math runs in for input x: at least float32, never narrower than x."""
    return torch.promote_types(x.dtype, torch.float32)


def table_at(schedule, name, t, like):
    """The schedule's table `name` at t, ready to broadcast against like [N, C]: a Python float for an
    int step, else [N, 1]."""
    if isinstance(t, int):
        return float(getattr(schedule, name)[t])
    return schedule.tensor(name, like.device)[t].to(like.dtype).unsqueeze(-1)


def q_sample(schedule, x0, t, noise):
    """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise."""
    return (table_at(schedule, "sqrt_alpha_bar", t, x0) * x0
            + table_at(schedule, "sqrt_one_minus_alpha_bar", t, x0) * noise)


def q_posterior(schedule, x0, x_t, t):
    """Mean and (t=0-borrowed) log variance of q(x_{t-1} | x_t, x_0)."""
    mean = (table_at(schedule, "posterior_coef_x0", t, x_t) * x0
            + table_at(schedule, "posterior_coef_xt", t, x_t) * x_t)
    return mean, table_at(schedule, "posterior_log_variance", t, x_t)


def p_mean_variance(schedule, eps, v, x_t, t):
    """Model mean and log variance from an eps prediction and learned-range variance values v.

    log var = frac * log beta_t + (1 - frac) * log posterior variance, frac = (v + 1) / 2.
    """
    frac = (v + 1) / 2
    log_var = (frac * table_at(schedule, "log_betas", t, x_t)
               + (1 - frac) * table_at(schedule, "posterior_log_variance", t, x_t))
    x0 = (table_at(schedule, "sqrt_recip_alpha_bar", t, x_t) * x_t
          - table_at(schedule, "sqrt_recipm1_alpha_bar", t, x_t) * eps)
    mean, _ = q_posterior(schedule, x0, x_t, t)
    return mean, log_var


def p_sample_step(schedule, eps, v, x_t, i, noise, temperature=1.0):
    """One reverse step from int step i: the model mean, plus (except at i = 0) its std times
    noise times temperature (temperature scales the injected noise only)."""
    mean, log_var = p_mean_variance(schedule, eps, v, x_t, i)
    return mean if i == 0 else mean + torch.exp(0.5 * log_var) * noise * temperature


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats, elementwise."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x):
    """ADM's tanh approximation of the standard normal CDF (part of the loss the weights saw)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, mean, log_scale):
    """log of N(mean, e^(2 log_scale))'s mass on x's bin: width 2/255 on [-1, 1], the edge bins open."""
    inv_std = torch.exp(-log_scale)
    cdf_plus = approx_standard_normal_cdf(inv_std * (x - mean + 1.0 / 255))
    cdf_min = approx_standard_normal_cdf(inv_std * (x - mean - 1.0 / 255))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def training_loss(schedule, x0, x_t, t, noise, net_out):
    """MAR's per-row loss [N]: channel-mean (noise - eps)^2 plus the variational-bound term (bits)
    for the learned variance, with eps detached there: the channel-mean KL of the true posterior
    from the model's Gaussian, or at t = 0 the discretized decoder NLL. net_out [N, 2C] = [eps | v].
    """
    dtype = compute_dtype(x0)
    x0, x_t, noise = x0.to(dtype), x_t.to(dtype), noise.to(dtype)
    eps, v = net_out.to(dtype).split(x0.shape[-1], dim=-1)
    mse = ((noise - eps) ** 2).mean(-1)
    mean, log_var = p_mean_variance(schedule, eps.detach(), v, x_t, t)
    true_mean, true_log_var = q_posterior(schedule, x0, x_t, t)
    kl = normal_kl(true_mean, true_log_var, mean, log_var).mean(-1) / LN2
    decoder_nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var).mean(-1) / LN2
    return mse + torch.where(t == 0, decoder_nll, kl)

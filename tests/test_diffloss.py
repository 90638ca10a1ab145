"""MAR's diffusion head (models/heads/diffloss.py): layout, network, loss, and the sampler's law."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from scipy import stats

from models.heads.diffloss import DiffLoss, timestep_embedding
from tests.conftest import host_sync_calls, load_manifest, randomize_

C = 16
pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: extra threads only add overhead


def numpy_alpha_bar(steps=1000):
    """alpha_bar after each step of the clamped cosine schedule, computed here in numpy float64."""
    s = np.arange(steps + 1, dtype=np.float64) / steps
    f = np.cos((s + 0.008) / 1.008 * np.pi / 2) ** 2
    return np.cumprod(1 - np.minimum(1 - f[1:] / f[:-1], 0.999))


# ---------------------------------------------------------------- layout and network

def test_state_dict_matches_mar_b_manifest():
    manifest = load_manifest("mar_b_official.json")
    expected = [(e["key"], e["shape"]) for e in manifest["state_dict"] if e["key"].startswith("diffloss.")]
    with torch.device("meta"):
        head = DiffLoss(token_dim=16, cond_dim=768, width=1024, depth=6)
    got = [("diffloss." + k, list(v.shape)) for k, v in head.state_dict().items()]
    assert got == expected
    assert sum(p.numel() for p in head.parameters()) == manifest["inner_head_params"]
    assert head.train_repeats == 4 and head.token_dim == 16


def test_init_outputs_zero_and_release_zeros():
    head = DiffLoss(4, 8, 32, 2)
    out = head.net(torch.randn(5, 4), torch.arange(5), torch.randn(5, 8))
    assert out.shape == (5, 8) and torch.equal(out, torch.zeros_like(out))
    for block in head.net.res_blocks:
        assert not block.adaLN_modulation[1].weight.any() and block.in_ln.weight.eq(1).all()
        assert block.mlp[0].bias.eq(0).all() and block.mlp[0].weight.std() > 0.05  # Xavier, not 0.02
    assert head.net.time_embed.mlp[0].weight.std().item() == pytest.approx(0.02, rel=0.1)


def test_timestep_embedding_cos_first():
    emb = timestep_embedding(torch.tensor([0, 7]), dtype=torch.float64)
    assert emb[0].tolist() == [1.0] * 128 + [0.0] * 128
    freqs = np.exp(-np.log(10000) * np.arange(128) / 128)
    np.testing.assert_allclose(emb[1].numpy(), np.concatenate([np.cos(7 * freqs), np.sin(7 * freqs)]), rtol=1e-12)


def test_a_bf16_net_embeds_timesteps_in_float32_then_casts():
    """Bug: the float32 sinusoids handed uncast to a net whose weights are bf16 (a model cast as a whole), a
    dtype clash in the time MLP's first Linear. The table is the float32 one rounded once to bf16."""
    head = DiffLoss(4, 3, 8, 1).to(torch.bfloat16)
    t = torch.tensor([0, 7, 999])
    emb = head.net.time_embed(t)
    assert emb.dtype == torch.bfloat16
    assert torch.equal(emb, head.net.time_embed.mlp(timestep_embedding(t).bfloat16()))
    assert head.net(torch.randn(3, 4).bfloat16(), t, torch.randn(3, 3).bfloat16()).dtype == torch.bfloat16


def numpy_net(sd, x, t, c):
    """MAR's SimpleMLPAdaLN written out in numpy float64 from a state_dict."""
    p = {k: v.numpy() for k, v in sd.items()}
    lin = lambda h, name: h @ p[name + ".weight"].T + p[name + ".bias"]  # noqa: E731
    silu = lambda h: h / (1 + np.exp(-h))  # noqa: E731

    def ln(h):
        return (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-6)

    freqs = np.exp(-np.log(10000) * np.arange(128) / 128)
    t_freq = np.concatenate([np.cos(t[:, None] * freqs), np.sin(t[:, None] * freqs)], -1)
    y = lin(silu(lin(t_freq, "time_embed.mlp.0")), "time_embed.mlp.2") + lin(c, "cond_embed")
    h = lin(x, "input_proj")
    i = 0
    while f"res_blocks.{i}.in_ln.weight" in p:
        b = f"res_blocks.{i}."
        shift, scale, gate = np.split(lin(silu(y), b + "adaLN_modulation.1"), 3, -1)
        hn = ln(h) * p[b + "in_ln.weight"] + p[b + "in_ln.bias"]
        h = h + gate * lin(silu(lin(hn * (1 + scale) + shift, b + "mlp.0")), b + "mlp.2")
        i += 1
    shift, scale = np.split(lin(silu(y), "final_layer.adaLN_modulation.1"), 2, -1)
    return lin(ln(h) * (1 + scale) + shift, "final_layer.linear")


def small_random_head(seed=0):
    head = DiffLoss(C, 8, 32, 2).double()
    randomize_(head, std=0.3, seed=seed)
    return head


def test_net_matches_numpy_forward():
    head = small_random_head()
    gen = torch.Generator().manual_seed(3)
    x, c = torch.randn(6, C, generator=gen, dtype=torch.float64), torch.randn(6, 8, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 1, 17, 256, 640, 999])
    expected = numpy_net(head.net.state_dict(), x.numpy(), t.numpy().astype(np.float64), c.numpy())
    np.testing.assert_allclose(head.net(x, t, c).detach().numpy(), expected, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- loss

def numpy_x_t(x0, t, noise):
    a = numpy_alpha_bar()[t][:, None]
    return np.sqrt(a) * x0 + np.sqrt(1 - a) * noise


def numpy_loss(x0, t, noise, out):
    """MAR's per-row loss given the net output at x_t, re-derived in numpy float64."""
    ab = numpy_alpha_bar()
    ab_prev = np.append(1.0, ab[:-1])
    a, ap = ab[t][:, None], ab_prev[t][:, None]
    beta = 1 - a / ap
    x_t = numpy_x_t(x0, t, noise)
    eps, v = out[:, :C], out[:, C:]
    x0_pred = (x_t - np.sqrt(1 - a) * eps) / np.sqrt(a)
    # posterior by Bayes: N(sqrt(ap) x0, 1 - ap) prior on x_{t-1}, N(sqrt(1 - beta) x_{t-1}, beta) likelihood;
    # at t = 0 (ap = 1) it is a point mass at x0
    ap_safe = np.where(t[:, None] == 0, 0.5, ap)
    precision = 1 / (1 - ap_safe) + (1 - beta) / beta

    def post_mean(x0_):
        return np.where(t[:, None] == 0, x0_,
                        (np.sqrt(ap_safe) * x0_ / (1 - ap_safe) + np.sqrt(1 - beta) * x_t / beta) / precision)

    ab1, ab0 = ab[1], ab[0]
    var1 = (1 - ab1 / ab0) * (1 - ab0) / (1 - ab1)  # step 1's posterior variance stands in at t = 0
    post_var = np.where(t[:, None] == 0, var1, 1 / precision)
    frac = (v + 1) / 2
    log_var = frac * np.log(beta) + (1 - frac) * np.log(post_var)
    mean, true_mean = post_mean(x0_pred), post_mean(x0)
    kl = 0.5 * (-1 + log_var - np.log(post_var)
                + (post_var + (true_mean - mean) ** 2) / np.exp(log_var))
    cdf = lambda u: 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u ** 3)))  # noqa: E731  ADM's approximation
    std = np.exp(0.5 * log_var)
    cdf_plus, cdf_min = cdf((x0 - mean + 1 / 255) / std), cdf((x0 - mean - 1 / 255) / std)
    # ADM's edge bins are open: below -0.999 the mass is cdf_plus, above 0.999 it is 1 - cdf_min (MAR's
    # latents leave [-1, 1], so both occur)
    mass = np.where(x0 < -0.999, cdf_plus, np.where(x0 > 0.999, 1 - cdf_min, cdf_plus - cdf_min))
    decoder_nll = -np.log(np.maximum(mass, 1e-12))
    vb = np.where(t == 0, decoder_nll.mean(-1), kl.mean(-1)) / np.log(2)
    return ((noise - eps) ** 2).mean(-1) + vb


def test_loss_matches_numpy_float64():
    head = small_random_head(seed=1)
    gen = torch.Generator().manual_seed(4)
    n = 40
    x0 = (torch.rand(n, C, generator=gen, dtype=torch.float64) * 1.6 - 0.8)
    z = torch.randn(n, 8, generator=gen, dtype=torch.float64)
    noise = torch.randn(n, C, generator=gen, dtype=torch.float64)
    t = torch.cat([torch.tensor([0, 0, 0, 1, 2, 999]), torch.randint(0, 1000, (n - 6,), generator=gen)])
    got = head.loss(x0, z, t=t, noise=noise)
    assert got.shape == (n,) and got.dtype == torch.float64
    x_t = torch.from_numpy(numpy_x_t(x0.numpy(), t.numpy(), noise.numpy()))
    expected = numpy_loss(x0.numpy(), t.numpy(), noise.numpy(), head.net(x_t, t, z).detach().numpy())
    np.testing.assert_allclose(got.detach().numpy(), expected, rtol=1e-10)
    # deterministic given t and noise; fresh noise changes it
    assert torch.equal(head.loss(x0, z, t=t, noise=noise), got)
    assert not torch.allclose(head.loss(x0, z, t=t, noise=-noise), got)


def test_loss_at_t0_is_decoder_nll_in_bits():
    head = DiffLoss(C, 8, 32, 1).double()
    x0 = torch.full((2, C), 0.25, dtype=torch.float64)
    noise = torch.zeros(2, C, dtype=torch.float64)
    # output eps = 0 and v = -1 + 2 * frac: the model's t = 0 Gaussian is N(x_0, exp(log_var))
    with torch.no_grad():
        head.net.final_layer.linear.bias[C:] = -1.0
    loss = head.loss(x0, torch.zeros(2, 8, dtype=torch.float64), t=torch.tensor([0, 5]), noise=noise)
    ab = numpy_alpha_bar()
    var1 = (1 - ab[1] / ab[0]) * (1 - ab[0]) / (1 - ab[1])
    std = math.sqrt(var1)
    mass = stats.norm.cdf(1 / 255, 0, std) - stats.norm.cdf(-1 / 255, 0, std)
    assert loss[0].item() == pytest.approx(-math.log(mass) / math.log(2), rel=1e-3)
    # at t = 5 the model is exact (eps = noise = 0, posterior variance): the KL is 0
    assert loss[1].item() == pytest.approx(0.0, abs=1e-12)


def test_loss_float32_and_gradients():
    head = DiffLoss(C, 8, 32, 2)
    randomize_(head, std=0.1)
    loss = head.loss(torch.rand(8, C) * 2 - 1, torch.randn(8, 8))
    assert loss.dtype == torch.float32 and loss.shape == (8,) and torch.isfinite(loss).all()
    loss.mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in head.parameters())


def test_bad_sampling_steps_one_line_error():
    with pytest.raises(ValueError, match="--num_sampling_steps") as err:
        DiffLoss(C, 8, 32, 1, num_sampling_steps=1)
    assert "\n" not in str(err.value)


def test_sampling_steps_default_to_the_release_and_run_up_to_every_training_step():
    """Bugs: a default other than MAR's 100 diffusion steps (the config's or the constructor's) or 4 noise
    draws per token; 1000 steps (every training step, no respacing) refused by an off-by-one upper bound, or
    1 let through the config's range check (then refused only when the head is built)."""
    from dataclasses import fields
    from models.config import check_ranges
    from models.heads.diffloss import DiffLossConfig
    defaults = {f.name: f.default for f in fields(DiffLossConfig)}
    assert defaults == {"width": 1024, "depth": 3, "num_sampling_steps": 100, "diffusion_batch_mul": 4}
    assert len(DiffLoss(4, 3, 8, 1).sample_schedule) == 100
    full = DiffLoss(4, 3, 8, 1, num_sampling_steps=1000).sample_schedule
    ab = numpy_alpha_bar()
    assert full.timesteps.tolist() == list(range(1000))
    np.testing.assert_allclose(np.exp(full.log_betas), 1 - ab / np.append(1.0, ab[:-1]), rtol=1e-9)
    with pytest.raises(ValueError, match="--num_sampling_steps must be between 2 and 1000, got 1001"):
        DiffLoss(4, 3, 8, 1, num_sampling_steps=1001)
    for good in (2, 1000):
        check_ranges(DiffLossConfig(num_sampling_steps=good))
    for bad in (1, 1001):
        with pytest.raises(ValueError, match=rf"^--num_sampling_steps must be in \[2, 1000\]; got {bad}$"):
            check_ranges(DiffLossConfig(num_sampling_steps=bad))


# ---------------------------------------------------------------- the sampler where the answer is known

class GaussianOracle(nn.Module):
    """The optimal eps predictor for data N(m, s^2), with (m, s, v) read per row from the condition:
    eps*(x_t, t) = sqrt(1 - ab_t) (x_t - sqrt(ab_t) m) / (ab_t s^2 + 1 - ab_t), ab_t at the ORIGINAL t."""

    def __init__(self):
        super().__init__()
        self.alpha_bar = torch.from_numpy(numpy_alpha_bar())
        self.timesteps = []

    def forward(self, x, t, c):
        self.timesteps.append(t.clone())
        ab = self.alpha_bar[t].to(x.dtype)[:, None]
        m, s, v = c[:, :1], c[:, 1:2], c[:, 2:3]
        eps = (1 - ab).sqrt() * (x - ab.sqrt() * m) / (ab * s ** 2 + 1 - ab)
        return torch.cat([eps, v.expand_as(x)], dim=-1)


def numpy_respaced(steps):
    """The 1000-step schedule respaced to `steps` (numpy float64): the kept original timesteps, alpha_bar and
    its previous value, beta, and the posterior variance (step 0's borrowed from step 1, as ADM clips it)."""
    kept = np.round(np.linspace(0, 999, steps)).astype(int)
    ab = numpy_alpha_bar()[kept]
    ab_prev = np.append(1.0, ab[:-1])
    beta = 1 - ab / ab_prev
    post_var = beta * (1 - ab_prev) / (1 - ab)
    post_var[0] = post_var[1]
    return kept, ab, ab_prev, beta, post_var


def sampler_law(cond, uncond=None, w=1.0, temperature=1.0, steps=100):
    """Exact mean and variance of the sampler's output with the oracle: every step is linear-Gaussian,
    so the law propagates in closed form (numpy float64, 1000 -> `steps` respacing done here)."""
    kept, ab, ab_prev, beta, post_var = numpy_respaced(steps)
    mean, var = 0.0, 1.0
    for i in reversed(range(steps)):
        a = ab[i]

        def eps_coefs(m, s):  # eps(x) = e1 x + e0
            e1 = math.sqrt(1 - a) / (a * s ** 2 + 1 - a)
            return e1, -e1 * math.sqrt(a) * m

        e1, e0 = eps_coefs(*cond[:2])
        if uncond is not None:
            u1, u0 = eps_coefs(*uncond[:2])
            e1, e0 = u1 + w * (e1 - u1), u0 + w * (e0 - u0)
        # x0_pred = (x - sqrt(1 - a) eps(x)) / sqrt(a)
        p1, p0 = (1 - math.sqrt(1 - a) * e1) / math.sqrt(a), -math.sqrt(1 - a) * e0 / math.sqrt(a)
        if i == 0:
            mean, var = p1 * mean + p0, p1 ** 2 * var
            break
        precision = 1 / (1 - ab_prev[i]) + (1 - beta[i]) / beta[i]
        k0 = math.sqrt(ab_prev[i]) / (1 - ab_prev[i]) / precision
        kt = math.sqrt(1 - beta[i]) / beta[i] / precision
        frac = (cond[2] + 1) / 2  # the conditional half's variance values
        step_var = math.exp(frac * math.log(beta[i]) + (1 - frac) * math.log(post_var[i]))
        a1, a0 = k0 * p1 + kt, k0 * p0
        mean, var = a1 * mean + a0, a1 ** 2 * var + temperature ** 2 * step_var
    return mean, var


def oracle_head():
    head = DiffLoss(4, 3, 8, 1, num_sampling_steps=100)
    head.net = GaussianOracle()
    return head


def rows(n, m, s, v):
    return torch.tensor([[m, s, v]], dtype=torch.float64).expand(n, 3)


def ks_pvalue(x, mean, var):
    return stats.kstest(x.flatten().numpy(), stats.norm(mean, math.sqrt(var)).cdf).pvalue


def test_sampler_draws_the_data_law_with_the_optimal_predictor():
    torch.manual_seed(0)
    head = oracle_head()
    m, s = 0.7, 0.3
    x = head.sample(rows(5000, m, s, -1.0))
    assert x.shape == (5000, 4) and x.dtype == torch.float64  # float64 conditions are never narrowed
    mean, var = sampler_law((m, s, -1.0))
    # the optimal predictor with posterior variances (which leave out Var(x_0 | x_t)) gives the data
    # mean and a slightly smaller spread...
    assert mean == pytest.approx(m, abs=1e-6) and math.sqrt(var) == pytest.approx(s, rel=0.1)
    assert ks_pvalue(x, mean, var) > 0.01
    # ...with the network called on the 100 kept ORIGINAL timesteps, last to first
    called = [t[0].item() for t in head.net.timesteps]
    assert called == np.round(np.linspace(0, 999, 100)).astype(int)[::-1].tolist()
    assert all((t == t[0]).all() for t in head.net.timesteps)


@pytest.mark.parametrize("temperature", [0.5, 0.0])
def test_temperature_scales_injected_noise_only(temperature):
    torch.manual_seed(1)
    head = oracle_head()
    m, s = -0.4, 0.8
    x = head.sample(rows(5000, m, s, -1.0), temperature=temperature)
    mean, var = sampler_law((m, s, -1.0), temperature=temperature)
    assert ks_pvalue(x, mean, var) > 0.01
    # the law differs clearly from temperature 1's, so the check has power
    assert math.sqrt(var) < 0.9 * math.sqrt(sampler_law((m, s, -1.0))[1])


def test_cfg_law_between_two_gaussians():
    torch.manual_seed(2)
    head = oracle_head()
    cond, uncond, w = (1.0, 0.5, -1.0), (0.0, 1.0, 1.0), 3.0
    n = 5000
    z = torch.cat([rows(n, *cond), rows(n, *uncond)])
    x = head.sample(z, cfg=w)
    assert x.shape == (n, 4)
    mean, var = sampler_law(cond, uncond, w)
    assert ks_pvalue(x, mean, var) > 0.01
    # the guided law is far from the conditional one, and taking the unconditional half's variance
    # values (log beta) would be detected
    assert abs(mean - cond[0]) > 0.2
    assert ks_pvalue(x, *sampler_law(cond[:2] + (1.0,), uncond, w)) < 1e-6
    # a 0-d tensor cfg (as CUDA-graph capture passes) and a per-row one give the same draws
    torch.manual_seed(3)
    ref = head.sample(z, cfg=w)
    for cfg in (torch.tensor(w), torch.full((n,), w)):
        torch.manual_seed(3)
        assert torch.equal(head.sample(z, cfg=cfg), ref)


def test_sample_has_no_host_sync(no_host_sync):
    head = DiffLoss(C, 8, 32, 2, num_sampling_steps=5)
    randomize_(head, std=0.1)
    z = torch.randn(6, 8)
    assert head.sample(z, temperature=0.9, cfg=torch.tensor(2.5)).shape == (3, C)
    assert head.sample(z, cfg=torch.tensor(1.0)).shape == (3, C)  # a tensor cfg always means guided


def test_sample_source_has_no_sync_calls():
    """A supplement to the run above: the code paths it did not take are clean too."""
    from models import diffusion
    from models.heads import diffloss
    assert host_sync_calls(diffloss.DiffLoss.sample, diffloss.DenoiserMLP, diffloss.timestep_embedding,
                           diffusion.p_sample_step, diffusion.p_mean_variance, diffusion.q_posterior,
                           diffusion.table_at) == set()


def test_exact_cfg_sampler_refused():
    head = DiffLoss(C, 8, 32, 1, num_sampling_steps=5)
    with pytest.raises(ValueError, match="--cfg_sampler") as err:
        head.sample(torch.randn(4, 8), cfg=2.0, cfg_sampler="exact")
    assert "\n" not in str(err.value)


def test_the_backend_offers_the_diffusion_head_sir_alone():
    """Bug: the head's cfg_samplers listing "exact", so --cfg_sampler exact passes the up-front check and fails
    only at the first head call, mid-sampling. The backend refuses it in one line naming sir alone."""
    from types import SimpleNamespace
    from sampling import make_backend
    model = SimpleNamespace(parameters=lambda: iter([torch.zeros(1)]), head=DiffLoss(4, 3, 8, 1))
    with pytest.raises(ValueError, match=r"^--cfg_sampler exact is not available for this head; choose one of sir$"):
        make_backend(model, cfg_sampler="exact")
    assert make_backend(model).cfg_sampler == "sir"


# ---------------------------------------------------------------- mutation guards (issue: diffusion-head mutants)

def numpy_sampler(state, z, x, noises, temperature, steps, w=None):
    """The respaced reverse process with injected noise, numpy float64 from the DDPM / improved-DDPM formulas:
    the network at the ORIGINAL kept timesteps, eps (guided: eps_u + w (eps_c - eps_u), the conditional
    half's variance values), log var = frac log beta + (1 - frac) log posterior var (step 0's borrowed from
    step 1), x_{t-1} = posterior mean of the x_0 prediction + T * std * noise, and no noise at the last step."""
    kept, ab, ab_prev, beta, post_var = numpy_respaced(steps)
    n = len(x)
    for step, i in enumerate(reversed(range(steps))):
        if w is None:
            out = numpy_net(state, x, np.full(n, float(kept[i])), z)
            eps = out[:, :C]
        else:
            out = numpy_net(state, np.concatenate([x, x]), np.full(2 * n, float(kept[i])), z)
            eps = out[n:, :C] + w * (out[:n, :C] - out[n:, :C])
        frac = (out[:n, C:] + 1) / 2
        log_var = frac * np.log(beta[i]) + (1 - frac) * np.log(post_var[i])
        x0 = (x - np.sqrt(1 - ab[i]) * eps) / np.sqrt(ab[i])
        x = (beta[i] * np.sqrt(ab_prev[i]) * x0 + (1 - ab_prev[i]) * np.sqrt(1 - beta[i]) * x) / (1 - ab[i])
        if i > 0:
            x = x + temperature * np.exp(0.5 * log_var) * noises[step]
    return x


@pytest.mark.parametrize("guided", [False, True])
def test_sampler_with_noise_matches_numpy_step_by_step(guided):
    """Bugs: noise injected at the last step too; one noise draw reused at every step; temperature on the
    variance or the log variance rather than the std. The sampler's own random draws are replayed (the
    start, then one draw per step, last step included) into a float64 numpy sampler written from the formulas."""
    head = DiffLoss(C, 8, 32, 2, num_sampling_steps=6).double()
    randomize_(head, std=0.1, seed=7)
    n, steps, temperature = 5, 6, 0.7
    z = torch.randn((2 if guided else 1) * n, 8, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    torch.manual_seed(9)
    x_start = torch.randn(n, C, dtype=torch.float64)
    noises = [torch.randn(n, C, dtype=torch.float64).numpy() for _ in range(steps)]
    torch.manual_seed(9)
    got = head.sample(z, temperature=temperature, cfg=2.5 if guided else 1.0)
    state = {k: v.detach() for k, v in head.net.state_dict().items()}
    expected = numpy_sampler(state, z.numpy(), x_start.numpy(), noises, temperature, steps, 2.5 if guided else None)
    # the first step (t = 999, alpha_bar ~ 1e-9) amplifies float64 rounding to ~1e-10
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-8, atol=1e-10)
    # the last step's noise would move the draw by ~T * sqrt(posterior variance at step 1) ~ 0.3: the check has power
    assert np.abs(noises[-1]).max() > 0.5


def test_training_timesteps_are_uniform_over_all_1000_steps():
    """Bugs: t drawn from [1, 1000) (the t = 0 decoder-NLL term never trained) or [0, 999) (the noisiest
    step never trained). 20000 rows, 20 expected per step; bins of 100 steps by chi-square."""
    head = DiffLoss(4, 3, 8, 1)
    seen = []
    head.net.register_forward_hook(lambda module, args, out: seen.append(args[1]))
    torch.manual_seed(10)
    head.loss(torch.rand(20000, 4) * 2 - 1, torch.randn(20000, 3))
    t = seen[0]
    assert t.dtype == torch.int64 and t.min().item() == 0 and t.max().item() == 999
    assert (t == 0).sum().item() >= 5 and (t == 999).sum().item() >= 5  # P(< 5 | mean 20) ~ 2e-5
    counts = np.bincount(t.numpy() // 100, minlength=10)
    assert stats.chisquare(counts).pvalue > 1e-3


def bf16_rounding_net(net, keep_bf16):
    """The net's output rounded to bf16 (what the MLP gives under bf16 autocast), returned as bf16 or as the
    same values in float32."""
    class Rounded(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = net

        def forward(self, x, t, c):
            out = self.inner(x, t, c).to(torch.bfloat16)
            return out if keep_bf16 else out.float()
    return Rounded()


def test_sampler_does_its_math_in_float32_on_a_bf16_net_output():
    """Bug: the net's output not cast to the sampler's float32 before the diffusion math, so under autocast
    the CFG combination, x_0 = x / sqrt(ab) - sqrt(1/ab - 1) eps (eps x ~3e4 at t = 999) and the log
    variance run in bf16. A bf16 output and the same values in float32 must give bit-identical samples."""
    head = randomize_(DiffLoss(C, 8, 32, 1, num_sampling_steps=5), std=0.1, seed=11)
    net = head.net
    z = torch.randn(6, 8, generator=torch.Generator().manual_seed(12))
    draws = []
    for keep_bf16 in (True, False):
        head.net = bf16_rounding_net(net, keep_bf16)
        torch.manual_seed(13)
        draws.append(head.sample(z, temperature=0.9, cfg=3.0))
    assert draws[0].dtype == torch.float32 and torch.equal(draws[0], draws[1])


def test_bf16_inputs_under_autocast_run_the_diffusion_math_in_float32():
    """Bug: the diffusion dtype taken from the input (bf16 z or targets under autocast) instead of at least
    float32: x_t, the noise and the sampler's chain in bf16. bf16 inputs and the same values in float32 must
    give bit-identical losses and samples (autocast rounds what the net sees to bf16 either way)."""
    head = randomize_(DiffLoss(C, 8, 32, 1, num_sampling_steps=5), std=0.1, seed=14)
    gen = torch.Generator().manual_seed(15)
    z = torch.randn(6, 8, generator=gen).bfloat16()
    target = (torch.rand(6, C, generator=gen) * 2 - 1).bfloat16()
    t = torch.tensor([0, 1, 10, 500, 998, 999])
    results = []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for cast in (lambda v: v, lambda v: v.float()):
            torch.manual_seed(16)
            loss = head.loss(cast(target), cast(z), t=t)
            torch.manual_seed(17)
            results.append((loss, head.sample(cast(z), temperature=0.9, cfg=2.0)))
    (loss_bf16, x_bf16), (loss_fp32, x_fp32) = results
    assert loss_bf16.dtype == x_bf16.dtype == torch.float32
    assert torch.equal(loss_bf16, loss_fp32) and torch.equal(x_bf16, x_fp32)


def test_init_zeroes_every_adaln_modulation_and_time_mlp_std():
    """Bugs: the final layer's AdaLN modulation left at Xavier (MAR zeroes it, as in every block); the time
    embedder's second Linear left at Xavier (MAR: normal std 0.02, both Linears)."""
    head = DiffLoss(C, 8, 256, 2)
    for module in (*head.net.res_blocks, head.net.final_layer):
        assert not module.adaLN_modulation[1].weight.any() and not module.adaLN_modulation[1].bias.any()
    for i in (0, 2):
        assert head.net.time_embed.mlp[i].weight.std().item() == pytest.approx(0.02, rel=0.1)


def test_compile_regions_are_every_residual_block():
    """Bug: a compiling backend handed only some of the denoiser's residual blocks (the samples are the same,
    the speed-up is not): every block, in order, and nothing else."""
    head = DiffLoss(4, 3, 8, 3)
    regions = head.compile_regions
    assert isinstance(regions, tuple) and len(regions) == 3
    assert all(r is b for r, b in zip(regions, head.net.res_blocks))

"""The sampling engine (sampling/): the backend decision, the outer loop against the release's own
loop, partial canvases, the CFG samplers against their target density, the mixture numerics
(float64 kept, fp32 under bf16 autocast), and the benchmarks' plumbing (no timing asserts)."""
import json
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from bench import bench_sampling, bench_train
from bench.baseline import release_inner_sample, release_sample_tokens, release_style_loss
from bench.config import build_model, median
from engine_mar import sampling_backend
from main_mar import get_args_parser, resolve_args
from models.heads import arinar as inner_module
from models.gmm import CFG_SAMPLERS, sample_gmm_cfg, sample_gmm_cfg_exact, sir_pick
from models.heads.arinar import InnerAR
from models.families.common import cosine_schedule
from sampling import EagerBackend, make_backend, precision_autocast
from sampling.cuda_graphs import bucket_rows, compiles_well, pad_rows
from tests.conftest import SpyBackend, randomize_, tiny_mar
from tests.reference import assert_all_fit, random_mixtures, reference_mixtures, target_cdf
from tests.test_inner import naive_forward
from util import flops

D, C = 16, 24


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: extra OpenMP threads only add overhead on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_inner(seed=0, width=32, dtype=torch.float32):
    torch.manual_seed(seed)
    m = InnerAR(token_dim=D, cond_dim=C, width=width, depth=1, num_heads=4).to(dtype)
    return randomize_(m, std=0.15, seed=seed)


def tiny(seed=0):
    return randomize_(tiny_mar(), std=0.1, seed=seed).eval()


# ----------------------------------------------------------------------------- CFG samplers
def test_cfg_sampler_names():
    assert CFG_SAMPLERS == {"sir": sample_gmm_cfg, "exact": sample_gmm_cfg_exact}


@pytest.mark.parametrize("cfg, temperature", [(1.0, 1.0), (1.5, 2.0), (4.5, 1.0), (3.9, 1.1), (8.0, 0.7)])
def test_exact_cfg_matches_target_density(cfg, temperature):
    torch.manual_seed(3)
    samples = sample_gmm_cfg_exact(*reference_mixtures(10000), cfg, temperature).numpy()
    assert stats.kstest(samples, target_cdf(cfg, temperature)).pvalue > 0.01


def test_exact_cfg_has_power_and_uses_per_row_scales():
    torch.manual_seed(4)
    samples = sample_gmm_cfg_exact(*reference_mixtures(10000), 4.5, 1.0).numpy()
    assert stats.kstest(samples, target_cdf(1.0, 1.0)).pvalue < 1e-6  # guidance visibly changes the law
    n = 16000
    torch.manual_seed(5)
    mixed = sample_gmm_cfg_exact(*reference_mixtures(n), torch.tensor([1.0, 4.5]).repeat(n // 2), 1.0)
    assert_all_fit([stats.kstest(mixed[1::2].numpy(), target_cdf(4.5, 1.0)).pvalue,
                    stats.kstest(mixed[0::2].numpy(), target_cdf(1.0, 1.0)).pvalue])


@pytest.mark.parametrize("cfg, temperature", [(1.5, 1.0), (4.5, 1.0), (3.9, 1.1), (8.0, 0.7)])
def test_sir_draws_the_guided_target(cfg, temperature):
    """The release's resampling: samples match the integrated target density, and guidance is
    visible (power check against the unguided law)."""
    torch.manual_seed(21)
    samples = sample_gmm_cfg(*reference_mixtures(20000), cfg, temperature).numpy()
    assert stats.kstest(samples, target_cdf(cfg, temperature)).pvalue > 0.01
    assert stats.kstest(samples, target_cdf(1.0, temperature)).pvalue < 1e-6


def test_sir_pick_is_a_draw_from_the_softmax_weights():
    """With the proposals fixed (u, eps fixed), the exponential race picks proposal j with probability
    softmax((w-1) * log-ratio)_j: chi-square over many pick uniforms."""
    cond, uncond = random_mixtures(1, seed=0), random_mixtures(1, seed=1)
    m, trials, w = 6, 30000, 2.5
    gen = torch.Generator().manual_seed(7)
    u, eps = torch.rand(1, m, generator=gen), torch.randn(1, m, generator=gen)
    expand = lambda mix: tuple(t.expand(trials, -1) for t in mix)  # noqa: E731
    picks = sir_pick(expand(cond), expand(uncond), w, 1.0, u.expand(trials, -1), eps.expand(trials, -1),
                     torch.rand(trials, m, generator=gen))
    # the proposals, and their weights, computed independently with scipy
    mu, logvar, logits = (t[0].double().numpy() for t in cond)
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    k = np.searchsorted(np.cumsum(probs), u[0].double().numpy())
    proposals = mu[k] + np.exp(0.5 * logvar[k]) * eps[0].double().numpy()

    def pdf(x, mix):
        mu, logvar, logits = (t[0].double().numpy() for t in mix)
        p = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        return sum(p[j] * stats.norm.pdf(x, mu[j], np.exp(0.5 * logvar[j])) for j in range(4))

    logit = (w - 1) * (np.log(pdf(proposals, cond)) - np.log(pdf(proposals, uncond)))
    expected = np.exp(logit - logit.max()) / np.exp(logit - logit.max()).sum()
    index = np.abs(picks.double().numpy()[:, None] - proposals[None]).argmin(1)
    counts = np.bincount(index, minlength=m)
    assert stats.chisquare(counts, expected * trials).pvalue > 0.001
    assert stats.chisquare(counts, np.full(m, trials / m)).pvalue < 1e-6  # power: not uniform


# ----------------------------------------------------------------------------- numerics
def test_float64_model_keeps_float64_mixture_math():
    """A float64 model: head output and loss match a float64 re-implementation to 1e-10 relative."""
    m = small_inner(dtype=torch.float64)
    x, z = torch.randn(6, D, dtype=torch.float64), torch.randn(6, C, dtype=torch.float64)
    out = m(x, z)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, naive_forward(m, x, z), rtol=1e-10, atol=1e-12)
    mu, logvar, logits = out.split(4, dim=-1)
    weights = torch.softmax(logits, -1)  # float64 throughout: the release's loss, constant omitted
    dens = (weights * torch.exp(-0.5 * (x[..., None] - mu) ** 2 / torch.exp(logvar) - 0.5 * logvar)).sum(-1)
    expected = -torch.log(dens).sum(-1)
    loss = m.loss(x, z)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=0)
    features = m.sample(z, 1.0, 2.0)  # sampling keeps float64 too
    assert features.dtype == torch.float64


def test_mixture_parameters_are_fp32_matmuls_under_bf16_autocast():
    m = small_inner()
    x, z = torch.randn(5, D), torch.randn(5, C)
    seen = {}
    m.head_nm.register_forward_hook(lambda mod, args, out: seen.update(h=out))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x, z)
        lowp = F.linear(seen["h"], m.head.weight, m.head.bias)  # what plain autocast would have given
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, F.linear(seen["h"].float(), m.head.weight, m.head.bias), rtol=0, atol=0)
    assert lowp.dtype == torch.bfloat16 and not torch.equal(lowp.float(), out)  # power: bf16 differs


def test_sampled_features_are_fed_back_in_fp32_under_bf16_autocast(monkeypatch):
    m = small_inner()
    fed = []
    embed = m.embed_features
    monkeypatch.setattr(m, "embed_features", lambda x: fed.append(x) or embed(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = m.sample(torch.randn(8, C), 1.0, 1.0)
    assert features.dtype == torch.float32 and len(fed) == D - 1
    assert all(f.dtype == torch.float32 for f in fed)
    torch.testing.assert_close(torch.cat(fed, 1).squeeze(-1), features[:, :-1], rtol=0, atol=0)
    assert (features.bfloat16().float() != features).any()  # they carry more than bf16's 8 bits


# ----------------------------------------------------------------------------- the inner sampler
def test_kv_cache_sampling_equals_teacher_forcing(monkeypatch):
    """With a draw-free 'sampler' (the mixture mean), the cached feature-by-feature loop must give
    what teacher forcing on its own output gives at every position."""
    m = small_inner()
    mean = lambda mu, logvar, logits, temperature=1.0: (torch.softmax(logits, -1) * mu).sum(-1)  # noqa: E731
    monkeypatch.setattr(inner_module, "sample_gmm", mean)
    z = torch.randn(7, C)
    features = m.sample(z, 1.0, 1.0)
    mu, logvar, logits = m(features, z).split(4, dim=-1)
    torch.testing.assert_close(features, mean(mu, logvar, logits), rtol=1e-5, atol=1e-5)


def per_feature_ks(a, b):
    return [stats.ks_2samp(a[:, i].numpy(), b[:, i].numpy()).pvalue for i in range(a.shape[1])]


@pytest.mark.parametrize("cfg, temperature", [(1.0, 1.0), (3.0, 1.2)])
def test_release_inner_sampler_matches_ours_statistically(cfg, temperature):
    """The release's way (concatenated cache, modulations per feature, torch.distributions) and our
    cached loop, on one condition repeated: the same law per feature."""
    inner = small_inner(width=16)
    n = 1000
    z = torch.randn(2, C)
    z = torch.cat([z[:1].expand(n, -1), z[1:].expand(n, -1)]) if cfg != 1 else z[:1].expand(n, -1)
    torch.manual_seed(0)
    ours = inner.sample(z, temperature, cfg)
    torch.manual_seed(1)
    release = release_inner_sample(inner, z, temperature, cfg)
    assert min(per_feature_ks(ours, release)) > 0.01 / D  # 16 features: Bonferroni
    torch.manual_seed(2)
    other = release_inner_sample(inner, z, 0.5 * temperature, cfg)
    assert min(per_feature_ks(ours, other)) < 1e-6  # power: another temperature is told apart


def test_release_cfg_draw_weighs_a_thousand_candidates_per_row(monkeypatch):
    """The release's CFG resampling draws 1000 candidates per row and picks one by Categorical over them: the
    baseline must pay for all 1000 (fewer would make our speed-up look larger)."""
    import bench.baseline as baseline
    picks = []

    class Recorded(baseline.Categorical):
        def __init__(self, probs=None, logits=None, **kwargs):
            picks.append(tuple(logits.shape))
            super().__init__(probs=probs, logits=logits, **kwargs)
    monkeypatch.setattr(baseline, "Categorical", Recorded)
    inner = small_inner(width=16)
    torch.manual_seed(0)
    release_inner_sample(inner, torch.randn(6, C), cfg=3.0)  # 3 rows, [cond; uncond]
    assert (3, 1000) in picks and all(shape[-1] in (1000, inner.num_gaussians) for shape in picks)


# ----------------------------------------------------------------------------- the outer loop
def recorder(calls, fn):
    def recorded(z, temperature, scale, **kwargs):
        calls.append((z.shape[0], round(float(scale), 6)))
        return fn(z, temperature, scale, **kwargs)
    return recorded


@pytest.mark.parametrize("cfg, schedule, num_iter", [(1.0, "linear", 4), (3.0, "linear", 5), (2.5, "constant", 3)])
def test_engine_loop_equals_the_release_loop(cfg, schedule, num_iter):
    """The release's outer loop (full decoder, boolean masks), driving our head sampler, asks for the
    same tokens at the same CFG scales and gives the same latents."""
    m = tiny()
    labels = torch.tensor([3, 7])
    head_sample, ours, release = m.arhead.sample, [], []
    m.arhead.sample = recorder(ours, head_sample)
    torch.manual_seed(8)
    engine = m.sample_tokens(2, num_iter=num_iter, cfg=cfg, cfg_schedule=schedule, labels=labels, temperature=1.1)
    torch.manual_seed(8)
    ref = release_sample_tokens(m, 2, num_iter, cfg=cfg, labels=labels, temperature=1.1, cfg_schedule=schedule,
                                inner_sample=recorder(release, head_sample))
    assert ours == release and len(ours) == num_iter
    # our loop runs the last decoder block at the predicted positions only: float rounding apart
    torch.testing.assert_close(engine, ref, rtol=1e-4, atol=1e-4)


def test_each_image_gets_its_own_random_order():
    """Every token is predicted exactly once, in an order that differs between images."""
    m, spy = tiny(), SpyBackend()
    torch.manual_seed(0)
    m.sample_tokens(4, num_iter=16, cfg=1.0, backend=spy)
    order = torch.cat([args[3] for _, args in spy.runs], dim=1)  # [4, 16]: the tokens in the order they were generated
    assert all(sorted(row.tolist()) == list(range(16)) for row in order)
    assert len({tuple(row.tolist()) for row in order}) == 4


def test_partial_canvas_keeps_tokens_and_schedules_the_rest():
    """Kept tokens come back bit for bit; rows keeping different numbers of tokens each follow the
    cosine schedule over their own unknown tokens (counted here from the loop's calls)."""
    m = tiny()
    keep = torch.zeros(3, 16, dtype=torch.bool)
    keep[0, :4] = True
    keep[1, 5:15] = True  # 6 unknown
    keep[2, :4] = True
    known = torch.randn(3, 16, 4, 4)
    spy = SpyBackend()
    torch.manual_seed(1)
    out = m.sample_tokens(3, num_iter=4, cfg=2.0, labels=torch.tensor([1, 2, 3]), known=known, keep=keep,
                          backend=spy)
    predicted = [(predict.shape[0], visible.shape[1], predict.shape[1]) for _, (_, visible, _, predict) in spy.runs]
    tokens, given = m.patchify(out), m.patchify(known)
    assert torch.equal(tokens[keep], given[keep]) and (tokens[~keep] != 0).all()
    # group of 6 unknown tokens (row 1), then 12 (rows 0 and 2): [rows x2 for CFG, visible, predicted]
    for unknown, rows in ((6, 1), (12, 2)):
        steps = [p for p in predicted if p[0] == 2 * rows]
        masked, expected = unknown, []
        for s in range(4):  # the spec's count, clamped, over the unknown tokens only
            left = 0 if s == 3 else max(1, min(masked - 1, int(np.floor(unknown * np.cos(np.pi / 2 * (s + 1) / 4)))))
            expected.append((2 * rows, 16 - masked, masked - left))
            masked = left
        assert steps == expected


def test_an_edit_ramps_cfg_over_the_whole_canvas_at_each_step():
    """A canvas keeping 10 of 16 tokens, cfg 2, 4 steps: the 6 open tokens follow the cosine schedule, and each
    step's scale counts the visible share of all 16 tokens, kept ones included (MAR's ramp over seq_len):
    floor(6 cos(pi/8)) = 5, floor(6 cos(pi/4)) = 4, floor(6 cos(3 pi/8)) = 2 and the clamp's 1 left after the
    steps give 1 + 11/16, 1 + 12/16, 1 + 14/16 and 1 + 15/16. Bugs caught: the ramp over the open tokens alone
    (1 + 1/6 first) and a skipped step ending the loop, which the statistical editing tests see only faintly."""
    class ScaleSpy(SpyBackend):
        def sample_head(self, head, z, temperature, cfg_scale):
            scales.append(cfg_scale)
            return super().sample_head(head, z, temperature, cfg_scale)

    m, scales = tiny(), []
    keep = torch.zeros(1, 16, dtype=torch.bool)
    keep[0, 3:13] = True
    torch.manual_seed(0)
    m.sample_tokens(1, num_iter=4, cfg=2.0, labels=torch.tensor([1]), known=torch.randn(1, 16, 4, 4), keep=keep,
                    backend=ScaleSpy())
    assert scales == pytest.approx([1 + 11 / 16, 1 + 12 / 16, 1 + 14 / 16, 1 + 15 / 16])

    # 2 open tokens in 4 steps: one token in the first step; steps 2 and 3 would leave the clamp's 1 open
    # and are skipped; the last draws it (a `break` at the first skip would leave it undrawn)
    keep[0, 2:] = True
    scales.clear()
    out = m.sample_tokens(1, num_iter=4, cfg=2.0, labels=torch.tensor([1]), known=torch.zeros(1, 16, 4, 4),
                          keep=keep, backend=ScaleSpy())
    assert scales == pytest.approx([1 + 15 / 16, 1 + 15 / 16])
    assert (m.patchify(out)[0, :2] != 0).all()


def test_keep_everything_or_bad_keep():
    m = tiny()
    known = torch.randn(2, 16, 4, 4)
    out = m.sample_tokens(2, num_iter=4, known=known, keep=torch.ones(2, 16, dtype=torch.bool))
    assert torch.equal(out, known)
    with pytest.raises(ValueError, match="keep must be a bool"):
        m.sample_tokens(2, num_iter=4, known=known, keep=torch.ones(2, 15, dtype=torch.bool))
    with pytest.raises(ValueError, match="known=LATENTS"):
        m.sample_tokens(2, num_iter=4, keep=torch.ones(2, 16, dtype=torch.bool))


def test_cfg_ramp_counts_the_visible_share_of_the_canvas():
    """Literal numbers from the spec: the last step of w = 4.5 over 256 tokens uses 4.4863."""
    assert cosine_schedule(256, 64, 4.5)[-1][1] == pytest.approx(1 + 3.5 * 255 / 256)
    assert round(cosine_schedule(256, 64, 4.5)[-1][1], 4) == 4.4863
    # 64 of 256 tokens to generate: after the first step 192 + (64 - left) of 256 are visible
    first = cosine_schedule(64, 8, 3.0, seq_len=256)[0]
    left = int(np.floor(64 * np.cos(np.pi / 16)))
    assert first == (left, pytest.approx(1 + 2.0 * (256 - left) / 256))


# ----------------------------------------------------------------------------- backends
def test_backend_choice_follows_the_flags(caplog):
    m = tiny()
    with caplog.at_level(logging.INFO, logger="sampling"):
        backend = sampling_backend(m, resolve_args(get_args_parser().parse_args(["--dataset", "digits"])))
    assert type(backend) is EagerBackend and backend.cfg_sampler == "sir"
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("sampling backend:")]
    assert lines == ["sampling backend: eager, compile off, cfg sampler sir, precision fp32 (mixture math fp32), "
                     "device cpu"]
    assert make_backend(m, cfg_sampler="exact").cfg_sampler == "exact"
    for flags, match in ((["--cuda_graphs"], "--cuda_graphs needs a CUDA device"),
                         (["--compile"], "--compile needs a CUDA device .* drop --compile"),
                         (["--compile", "--no-cuda_graphs"], "--compile needs a CUDA device")):
        with pytest.raises(ValueError, match=match):
            sampling_backend(m, get_args_parser().parse_args(flags))


def test_a_cuda_model_replays_cuda_graphs_by_default_and_compile_needs_them(monkeypatch):
    """The backend choice on a CUDA model, with a stand-in whose parameters say cuda and a recording CUDA-graph
    backend (no GPU needed): CUDA graphs unless --no-cuda_graphs, and --compile --no-cuda_graphs is one line.
    Bugs caught: CUDA graphs off by default on CUDA; the compile-without-graphs check dropped (CPU runs never reach
    it: --compile alone is refused there first)."""
    from types import SimpleNamespace

    import sampling
    made = []
    monkeypatch.setattr(sampling, "CudaGraphsBackend", lambda model, cfg_sampler, precision, compile: made.append(
        compile) or SimpleNamespace(describe=lambda: "cuda graphs"))
    on_cuda = SimpleNamespace(parameters=lambda: iter([SimpleNamespace(device=torch.device("cuda", 0))]),
                              head=SimpleNamespace())
    make_backend(on_cuda)
    make_backend(on_cuda, compile=True)
    assert made == [False, True]
    assert type(make_backend(on_cuda, cuda_graphs=False)) is EagerBackend and made == [False, True]
    with pytest.raises(ValueError, match=r"^--compile compiles inside the CUDA-graph backend: drop --no-cuda_graphs"):
        make_backend(on_cuda, cuda_graphs=False, compile=True)


def test_a_head_that_names_no_cfg_samplers_offers_sir_alone():
    """A head without `cfg_samplers` (a new or toy head) has the release's SIR sampler only: --cfg_sampler exact is
    one line naming the choices. Bug caught: the default list widened (exact handed to a head that lacks it)."""
    from types import SimpleNamespace
    plain = SimpleNamespace(parameters=lambda: iter([torch.zeros(1)]), head=SimpleNamespace())
    with pytest.raises(ValueError, match=r"^--cfg_sampler exact is not available for this head; choose one of sir$"):
        make_backend(plain, cfg_sampler="exact")
    assert make_backend(plain).cfg_sampler == "sir"


def test_an_unknown_precision_is_one_line_naming_the_choices():
    """make_backend refuses a --precision it has no dtype for up front (bug: accepted, then a bare KeyError from
    the first autocast, deep in sampling)."""
    with pytest.raises(ValueError, match=r"^--precision must be one of bf16, fp16, fp32; got fp8$"):
        make_backend(tiny(), precision="fp8")


def test_backend_precision_and_sampler_reach_the_head(monkeypatch):
    m = tiny()
    seen = []
    sample = m.arhead.sample
    monkeypatch.setattr(m.arhead, "sample", lambda z, t, w, cfg_sampler: seen.append(
        (cfg_sampler, torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None))
        or sample(z, t, w, cfg_sampler=cfg_sampler))
    m.sample_tokens(2, num_iter=2, cfg=2.0, labels=torch.tensor([0, 1]),
                    backend=make_backend(m, cfg_sampler="exact", precision="bf16"))
    assert seen == [("exact", torch.bfloat16)] * 2


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", None)])
def test_each_precision_autocasts_to_its_own_dtype(precision, dtype):
    """Bug: autocast opened without the precision's dtype, i.e. the device's default (CPU: bf16, CUDA: fp16), so
    --precision fp16 runs bf16 here and --precision bf16 runs fp16 (with its overflows) on a GPU."""
    backend = EagerBackend(torch.nn.Linear(3, 3), precision=precision)
    x = torch.randn(2, 3)
    for context in (precision_autocast("cpu", precision), backend.autocast()):
        with context:
            assert torch.is_autocast_enabled("cpu") == (dtype is not None)
            assert (x @ x.T).dtype == (dtype or torch.float32)


def test_compile_skips_the_size_0_and_1_specialisations():
    """torch.compile (dynamic shapes) builds one graph per size-0/1 specialisation: the first MAR steps
    (nothing visible, one token predicted) run uncompiled so every other step shares one graph."""
    t = lambda *shape: torch.zeros(shape)
    assert compiles_well((t(4, 16, 8), t(4, 3), t(4, 32), t(4, 2), t()))  # a 0-d tensor has no size to specialise
    assert not compiles_well((t(4, 16, 8), t(4, 32), 7))  # a Python value: one graph per value (a scale index)
    assert not compiles_well((t(4, 16, 8), t(4, 0), t(4, 32), t(4, 2)))   # nothing visible yet
    assert not compiles_well((t(4, 16, 8), t(4, 3), t(4, 32), t(4, 1)))   # one token predicted
    m, spy = tiny(), SpyBackend()
    m.sample_tokens(2, num_iter=8, cfg=2.0, labels=torch.tensor([1, 2]), backend=spy)
    # tiny's 16 tokens in 8 steps: the first three steps see 0, 1, 2 tokens and predict 1 each
    assert [compiles_well(args) for _, args in spy.runs] == [False] * 3 + [True] * 5


def test_cuda_graph_padding_layout():
    assert [bucket_rows(n) for n in (1, 8, 9, 16, 17, 100)] == [8, 8, 16, 16, 32, 128]
    z = torch.arange(10.0)[:, None].expand(-1, 3)  # rows [cond 0..4; uncond 5..9]
    padded = pad_rows(z, 5, 8, guided=True)
    assert padded.shape == (16, 3)
    assert padded[:5, 0].tolist() == [0, 1, 2, 3, 4] and padded[8:13, 0].tolist() == [5, 6, 7, 8, 9]
    assert (padded[5:8] == 0).all() and (padded[13:] == 0).all()
    assert torch.equal(pad_rows(z[:5], 5, 8, guided=False)[:5], z[:5])


# ----------------------------------------------------------------------------- training
def test_masked_only_loss_equals_release_all_tokens_loss():
    """Without dropout (ours runs the last decoder block at the masked positions only, so dropout there
    draws other numbers) the losses and gradients are the release's."""
    m = randomize_(tiny_mar(attn_dropout=0, proj_dropout=0), std=0.1).train()
    latents, labels = torch.randn(3, 16, 4, 4), torch.tensor([1, 2, 3])
    losses, grads = [], []
    for loss_fn in (lambda: m(latents, labels), lambda: release_style_loss(m, latents, labels)):
        torch.manual_seed(4)  # same mask, label drops and dropout
        loss = loss_fn()
        m.zero_grad()
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- benchmark plumbing
TINY = ["--width", "32", "--num_heads", "4", "--enc_dec_depth", "1", "--inner_ar_width", "32", "--img_size", "64",
        "--class_num", "10", "--device", "cpu", "--warmup", "0", "--repeats", "1", "--batch_size", "2",
        "--attn_dropout", "0", "--proj_dropout", "0"]  # no dropout: both training paths draw the same numbers


def test_bench_sampling_reports_both_sides_and_their_ratio(tmp_path):
    out = tmp_path / "s.json"
    res = bench_sampling.main(TINY + ["--num_iter", "2", "--cfg", "2.0", "--cfg_sampler", "exact",
                                      "--baseline_repeats", "1", "--json", str(out)])
    assert len(res["ours_s"]) == 1 and len(res["baseline_s"]) == 1
    assert res["speedup"] == pytest.approx(median(res["baseline_s"]) / median(res["ours_s"]))
    assert res["backend"].startswith("eager") and "cfg sampler exact" in res["backend"]
    assert json.loads(out.read_text())["args"]["num_iter"] == 2


def test_bench_sampling_breakdown_splits_outer_and_head(caplog):
    """--breakdown times every Step the family runs (outer) and every head call (head) in each timed run."""
    caplog.set_level(logging.INFO, logger="bench.sampling")
    res = bench_sampling.main(TINY + ["--num_iter", "2", "--cfg", "2.0", "--baseline_repeats", "0", "--breakdown",
                                      "--flops_batch", "0", "--repeats", "3"])
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("run 1: eager")]
    assert ", outer " in line and ", head " in line
    # recorded too: each piece's median over the 3 timed runs; both pieces are at least their medians in one
    # run (2 of 3 runs each), inside that run's time, so the medians add up to at most the slowest run
    side = res["sides"]["eager"]
    assert set(side["breakdown_s"]) == {"outer", "head"} and min(side["breakdown_s"].values()) > 0
    assert sum(side["breakdown_s"].values()) <= max(side["seconds"])
    assert "breakdown_s" not in bench_sampling.main(TINY + ["--num_iter", "2", "--baseline_repeats", "0",
                                                           "--flops_batch", "0"])["sides"]["eager"]


def test_bench_sampling_record_takes_medians_and_the_baseline_over_ours():
    """record(): 2 images per batch; ours ran 0.5, 0.25 and 2 s (median 0.5: 4 images/s, not the fastest run's
    8), the baseline 4, 1 and 6 s (median 4: 0.5 images/s); speed-up 4 / 0.5 = 8x; each side's fraction of a
    1e12 peak from its own FLOPs: 3e9 x 4 / 1e12 = 0.012 and 1e10 x 0.5 / 1e12 = 0.005."""
    from types import SimpleNamespace
    ours = SimpleNamespace(name="eager", times=[0.5, 0.25, 2.0], pieces=[], peak_mib=None)
    base = SimpleNamespace(name="baseline", times=[4.0, 1.0, 6.0], pieces=[], peak_mib=None)
    results = {"peak_flops": 1e12, "flops_per_image": {"ours": 3e9, "baseline": 1e10}}
    bench_sampling.record(results, [ours], base, SimpleNamespace(batch_size=2))
    got = {name: (row["images_per_s"], row.get("speedup"), row["flops_per_image"], row["fraction_of_peak"])
           for name, row in results["sides"].items()}
    assert got == {"eager": (4.0, 8.0, 3e9, pytest.approx(0.012)), "baseline": (0.5, None, 1e10, pytest.approx(0.005))}
    assert results["speedup"] == 8.0


def test_bench_sampling_baseline_does_the_release_s_work(monkeypatch):
    """The baseline samples what ours samples: the same batch, steps, cfg and temperature, under the
    --precision autocast; warmed up as ours is, then --baseline_repeats timed runs even when --repeats is
    smaller. FLOPs per image: the
    count (a stand-in here: 1e9 per image the release samples, 1e8 per image ours does) over the counted
    batch of 2, for each side its own."""
    calls = []

    def release(model, bsz, num_iter, cfg=1.0, labels=None, temperature=1.0, **kwargs):
        calls.append(("release", bsz, num_iter, cfg, temperature, torch.is_autocast_enabled("cpu")
                      and torch.get_autocast_dtype("cpu")))
        return release_sample_tokens(model, bsz, num_iter, cfg=cfg, labels=labels, temperature=temperature, **kwargs)

    def build(args):
        model = build_model(args)
        sample = model.sample_tokens

        def ours(bsz, num_iter, cfg=1.0, temperature=1.0, **kwargs):
            calls.append(("ours", bsz, num_iter, cfg, temperature, kwargs["backend"].precision))
            return sample(bsz, num_iter, cfg=cfg, temperature=temperature, **kwargs)
        model.sample_tokens = ours
        return model

    def count(fn):
        before = len(calls)
        fn()
        return sum(c[1] * (1e9 if c[0] == "release" else 1e8) for c in calls[before:]), None
    monkeypatch.setattr(bench_sampling, "release_sample_tokens", release)
    monkeypatch.setattr(bench_sampling, "build_model", build)
    monkeypatch.setattr(flops, "count_flops", count)
    res = bench_sampling.main(TINY + ["--img_size", "32", "--baseline_repeats", "2", "--num_iter", "3", "--cfg", "3.0",
                                      "--temperature", "0.9", "--precision", "bf16", "--flops_batch", "2",
                                      "--batch_size", "3", "--warmup", "1"])
    ours, release = ("ours", 3, 3.0, 0.9, "bf16"), ("release", 3, 3.0, 0.9, torch.bfloat16)
    # the counts on 2 images, each side's warm-up (2 steps), then the timed runs (3 steps)
    assert [c[:2] + c[3:] for c in calls] == [ours[:1] + (2,) + ours[2:], release[:1] + (2,) + release[2:],
                                             ours, release, ours, release, release]
    assert [c[2] for c in calls] == [3, 3, 2, 2, 3, 3, 3]
    assert res["flops_per_image"] == {"ours": 1e8, "baseline": 1e9}
    assert len(res["sides"]["baseline"]["seconds"]) == 2 and len(res["sides"]["eager"]["seconds"]) == 1


def test_piece_timer_sums_each_piece_and_median_pieces_counts_a_missing_piece_as_zero(monkeypatch):
    """PieceTimer: two wrapped calls from 0 to 1 s and 5 to 7.5 s sum to 3.5 s (not the longest, 2.5); CUDA
    events report milliseconds: 0 -> 1500 ms is 1.5 s. median_pieces: a run without a head piece counts
    0 s for it, so head's median of 3, 0, 5 is 3 (4 if the run were left out)."""
    from bench.config import PieceTimer, median_pieces, time_runs

    class Owner:
        def run(self, x):
            return x + 1
    owner, timer = Owner(), PieceTimer(torch.device("cpu"))
    timer.wrap(owner, "run", "outer")
    timer._mark = iter([0.0, 1.0, 5.0, 7.5]).__next__
    assert (owner.run(1), owner.run(2)) == (2, 3) and timer.seconds() == {"outer": 3.5}

    class Event:
        def __init__(self, ms):
            self.ms = ms

        def elapsed_time(self, end):
            return end.ms - self.ms
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    other, cuda = Owner(), PieceTimer(torch.device("cuda"))
    cuda.wrap(other, "run", "head")
    cuda._mark = iter([Event(0.0), Event(1500.0)]).__next__
    other.run(0)
    assert cuda.seconds() == {"head": 1.5}
    assert median_pieces([{"outer": 1.0, "head": 3.0}, {"outer": 2.0}, {"outer": 3.0, "head": 5.0}]) == {
        "outer": 2.0, "head": 3.0}
    calls = []
    assert len(time_runs(lambda: calls.append(1), torch.device("cpu"), 2, 3)) == 3 and len(calls) == 5


def test_bench_train_runs():
    res = bench_train.main(TINY + ["--steps", "1", "--no_memory"])
    losses = res["losses"]
    assert losses["masked_only"] == pytest.approx(losses["all_tokens"], rel=1e-5)
    assert res["speedup"] == pytest.approx(median(res["all_tokens"]["s_per_step"]) /
                                           median(res["masked_only"]["s_per_step"]))


@pytest.mark.parametrize("precision, scaled", [("fp16", True), ("bf16", False), ("fp32", False)])
def test_bench_train_scales_the_fp16_loss_as_training_does(monkeypatch, precision, scaled):
    """Under fp16 a step without loss scaling is not the training loop's step (small gradients flush to
    zero): the benchmark's step goes through a GradScaler, enabled for fp16 only, as main_mar.py's does."""
    seen = []

    class Recording(torch.amp.GradScaler):
        def scale(self, outputs):
            seen.append(("scale", self.is_enabled()))
            return super().scale(outputs)

        def step(self, optimizer, *args, **kwargs):
            seen.append(("step", self.is_enabled()))
            return super().step(optimizer, *args, **kwargs)

    monkeypatch.setattr(torch.amp, "GradScaler", Recording)
    args = bench_train.parse_args(TINY + ["--precision", precision])
    _, step, params = bench_train.make_step(args, torch.device("cpu"))
    before = [p.detach().clone() for p in params]
    step("masked_only")
    assert seen == [("scale", scaled), ("step", scaled)]
    assert any(not torch.equal(a, p) for a, p in zip(before, params))  # the update was taken


def test_bench_rejects_bad_heads():
    with pytest.raises(ValueError, match="--width 100 must be a multiple of --num_heads 12"):
        bench_sampling.main(["--width", "100", "--device", "cpu"])

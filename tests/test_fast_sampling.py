"""Fast paths against the references: identical where the algorithm is the same, statistically
indistinguishable where the random draws differ; the exact CFG sampler against its target density;
the CUDA-graph loop's padded fixed-shape form on CPU; the benchmarks' plumbing (no timing asserts)."""
import contextlib
import functools
import json

import pytest
import torch
from scipy import stats

from bench import bench_sampling, bench_train
from bench.reference import (random_mixtures, reference_inner_sample, reference_mixtures, reference_sample_tokens,
                             release_style_loss, target_cdf)
from engine_mar import sampling_graphs
from main_mar import get_args_parser
from models.compiled_sampling import CompiledSampling, cxx_compiler, few_row_linear
from models.cpu_linear import cpu_supports_kernel
from models.cuda_graphs import SamplingGraphs, bucket_rows, sample_gmm_cfg_race
from models.gmm import (CFG_SAMPLERS, sample_gmm_cfg, sample_gmm_cfg_exact, sample_gmm_cfg_fused,
                        sir_candidates)
from models.inner import InnerAR
from tests.conftest import randomize_, tiny_mar

D, C = 16, 24


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: extra OpenMP threads only add overhead on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_inner(seed=0, width=32):
    torch.manual_seed(seed)
    return randomize_(InnerAR(token_dim=D, cond_dim=C, width=width, depth=1, num_heads=4), std=0.15, seed=seed)


# ----------------------------------------------------------------------------- exact CFG sampler
def draw_exact(n, cfg, temperature, seed):
    torch.manual_seed(seed)
    return sample_gmm_cfg_exact(*reference_mixtures(n), cfg, temperature).numpy()


@pytest.mark.parametrize("cfg, temperature", [(1.0, 1.0), (1.5, 2.0), (4.5, 1.0), (3.9, 1.1), (8.0, 0.7)])
def test_exact_cfg_matches_target_density(cfg, temperature):
    samples = draw_exact(10000, cfg, temperature, seed=3)
    assert stats.kstest(samples, target_cdf(cfg, temperature)).pvalue > 0.01


def test_exact_cfg_has_power_and_uses_per_row_scales():
    samples = draw_exact(10000, 4.5, 1.0, seed=4)
    assert stats.kstest(samples, target_cdf(1.0, 1.0)).pvalue < 1e-6  # guidance visibly changes the law
    # a per-row scale tensor: rows with w = 4.5 follow the w = 4.5 target
    n = 16000
    cfg = torch.tensor([1.0, 4.5]).repeat(n // 2)
    torch.manual_seed(5)
    mixed = sample_gmm_cfg_exact(*reference_mixtures(n), cfg, 1.0)
    assert stats.kstest(mixed[1::2].numpy(), target_cdf(4.5, 1.0)).pvalue > 0.01
    assert stats.kstest(mixed[0::2].numpy(), target_cdf(1.0, 1.0)).pvalue > 0.01


def test_cfg_sampler_names():
    assert CFG_SAMPLERS == {"sir": sample_gmm_cfg_fused, "exact": sample_gmm_cfg_exact}


@pytest.mark.parametrize("cfg, temperature", [(1.5, 1.0), (4.5, 1.0), (3.9, 1.1), (8.0, 0.7)])
def test_fused_sir_picks_among_release_proposals(cfg, temperature):
    """Same seed: the fused SIR's 1000 proposals are the release's own, and it returns one of them."""
    cond, uncond = random_mixtures(300, seed=2), random_mixtures(300, seed=3)
    torch.manual_seed(12)
    proposals, _ = sir_candidates(cond, uncond, cfg, temperature, 1000)
    torch.manual_seed(12)
    fused = sample_gmm_cfg_fused(cond, uncond, cfg, temperature)
    assert torch.isfinite(fused).all() and (proposals == fused[:, None]).any(dim=1).all()
    # leading dims and a per-row scale tensor
    cond3, uncond3 = [t.view(3, 100, 4) for t in cond], [t.view(3, 100, 4) for t in uncond]
    scales = torch.linspace(1.0, cfg, 300).view(3, 100)
    torch.manual_seed(13)
    proposals, _ = sir_candidates(cond3, uncond3, scales, temperature, 1000)
    torch.manual_seed(13)
    fused = sample_gmm_cfg_fused(cond3, uncond3, scales, temperature)
    assert fused.shape == (3, 100) and (proposals.view(300, -1) == fused.view(300, 1)).any(dim=1).all()


@pytest.mark.parametrize("cfg, temperature", [(1.5, 1.0), (4.5, 1.0), (8.0, 0.7)])
def test_fused_sir_draws_the_guided_target(cfg, temperature):
    """The pick follows the resampling weights: samples match the integrated target density,
    and guidance is visible (power check against the unguided law)."""
    n = 20000
    torch.manual_seed(21)
    samples = sample_gmm_cfg_fused(*reference_mixtures(n), cfg, temperature).numpy()
    assert stats.kstest(samples, target_cdf(cfg, temperature)).pvalue > 0.01
    assert stats.kstest(samples, target_cdf(1.0, temperature)).pvalue < 1e-6


# ----------------------------------------------------------------------------- inner model
def test_race_resampling_is_multinomial_resampling():
    """The capturable SIR draws the same random numbers as torch.multinomial: identical picks."""
    cond, uncond = random_mixtures(64, seed=0), random_mixtures(64, seed=1)
    torch.manual_seed(11)
    eager = sample_gmm_cfg(cond, uncond, 3.0, 1.1)
    torch.manual_seed(11)
    race = sample_gmm_cfg_race(cond, uncond, 3.0, 1.1)
    assert torch.equal(eager, race)


def test_bucket_rows():
    assert [bucket_rows(n) for n in (1, 8, 9, 16, 17, 100)] == [8, 8, 16, 16, 32, 128]


def graph_model(seed=0):
    """A tiny MAR whose inner model has D features and C-wide conditions, as small_inner."""
    return randomize_(tiny_mar(decoder_embed_dim=C, encoder_embed_dim=C, encoder_num_heads=4,
                               decoder_num_heads=4), std=0.15, seed=seed).eval()


@pytest.mark.parametrize("cfg, sampler", [(1.0, sample_gmm_cfg), (3.0, sample_gmm_cfg),
                                          (3.0, CFG_SAMPLERS["sir"]), (3.0, CFG_SAMPLERS["exact"])])
def test_fixed_shape_loop_equals_eager_loop(cfg, sampler):
    """Unpadded, the loop the CUDA graph captures is the eager loop: same draws, same samples
    (the release SIR's multinomial is swapped for its capturable twin, which draws the same)."""
    m = graph_model()
    n = 8
    z = torch.randn(2 * n if cfg != 1 else n, C)
    torch.manual_seed(5)
    eager = m.arhead.sample(z, 1.2, cfg, cfg_sampler=sampler)
    torch.manual_seed(5)
    fixed = SamplingGraphs(m, min_rows=n, capture=False).inner(z, 1.2, cfg, sampler)
    assert fixed.shape == (n, D) and torch.equal(eager, fixed)


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_padding_rows_do_not_touch_real_rows(cfg):
    m = graph_model()
    guided = cfg != 1
    z = torch.randn(10 if guided else 5, C)  # 5 real rows, padded to a bucket of 8
    filler = torch.randn(16 if guided else 8, C) * 3
    fresh, dirty = SamplingGraphs(m, capture=False), SamplingGraphs(m, capture=False)
    dirty.inner(filler, 1.0, cfg)  # leaves other rows' conditions in the padding
    torch.manual_seed(6)
    a = fresh.inner(z, 1.0, cfg)
    torch.manual_seed(6)
    b = dirty.inner(z, 1.0, cfg)
    assert a.shape == (5, D) and torch.equal(a, b)


def deterministic_sampler(cond, uncond, cfg, temperature):
    """A 'CFG sampler' with no random draws, so padded and unpadded inner batches must agree."""
    return cond[0][..., 0] - cfg * torch.tanh(uncond[0][..., 1]) + 0.1 * cond[2][..., 2]


def test_padded_loop_pairs_each_row_with_its_own_halves():
    """With a deterministic 'sampler' of (cond, uncond, cfg), padding must give exactly the eager
    result: each real row sees its own conditional and unconditional outputs and the live cfg."""
    m = graph_model()
    z = torch.randn(10, C)  # 5 real rows -> bucket 8
    graphs = SamplingGraphs(m, capture=False)
    for cfg in (3.0, 1.7):  # the second call reuses the buffers with a new scale
        eager = m.arhead.sample(z, 1.0, cfg, cfg_sampler=deterministic_sampler)
        padded = graphs.inner(z, 1.0, cfg, deterministic_sampler)
        torch.testing.assert_close(padded, eager, rtol=1e-5, atol=1e-5)
    assert list(graphs.replays) and all(key[1] == 8 for key in graphs.replays)


def test_graphs_are_ignored_off_cuda():
    m = randomize_(tiny_mar(), std=0.1).eval()
    labels = torch.tensor([1, 2])
    torch.manual_seed(0)
    plain = m.sample_tokens(2, num_iter=3, cfg=2.0, labels=labels)
    torch.manual_seed(0)
    graphs = SamplingGraphs(m)
    with_graphs = m.sample_tokens(2, num_iter=3, cfg=2.0, labels=labels, graphs=graphs)
    assert torch.equal(plain, with_graphs) and graphs.replays == {}


@pytest.mark.parametrize("precision, tol", [(None, 1e-5), (torch.bfloat16, 1e-2)])
def test_static_replays_give_the_eager_samples(precision, tol):
    """sample_tokens through SamplingGraphs' static buffers (one replay per outer step, padded inner
    loop, Linear weights cast once) gives the eager samples, under bf16 autocast too."""
    m = randomize_(tiny_mar(), std=0.1).eval()
    labels = torch.tensor([1, 2, 7])
    graphs = SamplingGraphs(m, capture=False)
    cast = torch.autocast("cpu", dtype=precision) if precision else contextlib.nullcontext()

    def sample(g):
        torch.manual_seed(3)
        with cast:
            return m.sample_tokens(3, num_iter=5, cfg=2.5, labels=labels, cfg_sampler=deterministic_sampler, graphs=g)

    eager = sample(None)
    for _ in range(2):  # the second pass reuses the replays
        torch.testing.assert_close(sample(graphs), eager, rtol=tol, atol=tol)
    assert sum(key[0] == "outer" for key in graphs.replays) == 5
    if precision:  # the replays read the cast weights, and each call casts them afresh
        for w in graphs.lowp[precision].values():
            w.mul_(1.5)
        graphs.refresh_weights = lambda device: None
        assert (sample(graphs) - eager).abs().max() > 10 * tol
        del graphs.refresh_weights
        torch.testing.assert_close(sample(graphs), eager, rtol=tol, atol=tol)


def test_sample_tokens_through_static_replays_draws_the_eager_law():
    """With random draws, padding changes which numbers each row gets, so the check is statistical."""
    m = randomize_(tiny_mar(), std=0.1).eval()
    labels = torch.full((400,), 3)
    torch.manual_seed(0)
    eager = m.sample_tokens(400, num_iter=4, cfg=2.0, labels=labels).flatten(1)
    torch.manual_seed(1)
    replayed = m.sample_tokens(400, num_iter=4, cfg=2.0, labels=labels,
                               graphs=SamplingGraphs(m, capture=False)).flatten(1)
    pvalues = [stats.ks_2samp(eager[:, i].numpy(), replayed[:, i].numpy()).pvalue for i in range(0, 256, 16)]
    assert min(pvalues) > 0.01 / 16


# ----------------------------------------------------------------------------- --compile off CUDA
needs_cxx = pytest.mark.skipif(cxx_compiler() is None, reason="torch.compile on CPU needs a C++ compiler")


def test_compiled_sampling_names_the_missing_compiler(monkeypatch):
    monkeypatch.setattr("models.compiled_sampling.shutil.which", lambda name: None)
    with pytest.raises(RuntimeError, match="needs a C\\+\\+ compiler"):
        CompiledSampling(tiny_mar())


def test_a_failed_kernel_build_leaves_f_linear(monkeypatch, caplog):
    def fail():
        raise RuntimeError("Error building extension 'arinar_cpu_linear'")
    monkeypatch.setattr("models.compiled_sampling.cpu_supports_kernel", lambda: True)
    monkeypatch.setattr("models.compiled_sampling.load_small_linear", fail)
    assert few_row_linear() is None
    assert "did not build" in caplog.text and "keeps F.linear" in caplog.text


@needs_cxx
def test_compiled_sampling_gives_the_eager_samples():
    """CompiledSampling: same math and draws as eager, so one seed gives the eager samples up to
    rounding. A deterministic 'sampler' isolates the compiled blocks + head; with the release SIR a
    near-tie among the 1000 proposals may flip a pick (and that row's later features), so nearly all agree."""
    m = graph_model()
    assert isinstance(sampling_graphs(m, get_args_parser().parse_args(["--compile"])), CompiledSampling)  # CPU model
    compiled = CompiledSampling(m)
    # fp32 on an AVX2 CPU: the blocks' matmuls go to the few-row kernel (models/cpu_linear.py)
    assert (compiled.run_fp32 is not compiled.run) == cpu_supports_kernel()
    calls, run = [], compiled.run_fp32
    compiled.run_fp32 = lambda *args, **kwargs: calls.append(1) or run(*args, **kwargs)
    labels = torch.tensor([1, 2, 7])

    def sample(g):
        torch.manual_seed(3)
        return m.sample_tokens(3, num_iter=5, cfg=2.5, labels=labels, cfg_sampler=deterministic_sampler, graphs=g)

    torch.testing.assert_close(sample(compiled), sample(None), rtol=1e-4, atol=1e-4)
    assert len(calls) == 5 * D  # every feature step of every outer step ran compiled
    z = torch.randn(2 * 64, C)
    torch.manual_seed(4)
    eager = m.arhead.sample(z, 1.2, 3.0)
    torch.manual_seed(4)
    fast = compiled.inner(z, 1.2, 3.0)
    assert torch.isclose(fast, eager, rtol=1e-4, atol=1e-4).float().mean() > 0.95
    assert not torch.isclose(fast[:, 1:], eager[:, :-1], rtol=1e-4, atol=1e-4).all()  # power: shifted differs


def per_feature_ks(a, b):
    return [stats.ks_2samp(a[:, i].numpy(), b[:, i].numpy()).pvalue for i in range(a.shape[1])]


@pytest.mark.parametrize("cfg, temperature", [(1.0, 1.0), (3.0, 1.2)])
def test_reference_inner_sampler_matches_fast_statistically(cfg, temperature):
    """torch.distributions + recomputation vs the cached fused loop, on one condition repeated."""
    inner = small_inner(width=16)
    n = 1000
    z = torch.randn(2, C)
    z = torch.cat([z[:1].expand(n, -1), z[1:].expand(n, -1)]) if cfg != 1 else z[:1].expand(n, -1)
    sir = functools.partial(sample_gmm_cfg, num_candidates=100)
    torch.manual_seed(0)
    fast = inner.sample(z, temperature, cfg, cfg_sampler=sir)
    torch.manual_seed(1)
    ref = reference_inner_sample(inner, z, temperature, cfg, num_candidates=100)
    # 16 features: Bonferroni-style threshold
    assert min(per_feature_ks(fast, ref)) > 0.01 / D
    # power: a different temperature is told apart
    torch.manual_seed(2)
    other = reference_inner_sample(inner, z, 0.5 * temperature, cfg, num_candidates=100)
    assert min(per_feature_ks(fast, other)) < 1e-6


# ----------------------------------------------------------------------------- outer loop
@pytest.mark.parametrize("cfg, schedule, num_iter", [(1.0, "linear", 4), (3.0, "linear", 5), (2.5, "constant", 3)])
def test_reference_outer_loop_matches_sample_tokens(cfg, schedule, num_iter):
    """The independent outer loop, driving the model's own inner sampler, asks for the same tokens
    at the same CFG scales and gives the same latents."""
    m = randomize_(tiny_mar(), std=0.1).eval()
    labels = torch.tensor([3, 7])
    inner_sample, calls = m.arhead.sample, {"fast": [], "reference": []}

    def recorded(name):
        def sample(z, temperature, scale, **kwargs):
            calls[name].append((z.shape[0], float(scale)))
            return inner_sample(z, temperature, scale, **kwargs)
        return sample

    m.arhead.sample = recorded("fast")
    torch.manual_seed(8)
    fast = m.sample_tokens(2, num_iter=num_iter, cfg=cfg, cfg_schedule=schedule, labels=labels, temperature=1.1)
    torch.manual_seed(8)
    ref = reference_sample_tokens(m, 2, num_iter, cfg=cfg, labels=labels, temperature=1.1, cfg_schedule=schedule,
                                  inner_sample=recorded("reference"))
    assert calls["fast"] == calls["reference"] and len(calls["fast"]) == num_iter
    # the fast loop runs the last decoder block at the predicted positions only: float rounding apart
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4)


def test_sample_tokens_cache_vs_recompute_identical():
    m = randomize_(tiny_mar(), std=0.1).eval()
    labels = torch.tensor([0, 5])
    outs = []
    for use_cache in (True, False):
        torch.manual_seed(9)
        outs.append(m.sample_tokens(2, num_iter=4, cfg=3.0, labels=labels, use_cache=use_cache,
                                    cfg_sampler=sample_gmm_cfg_exact))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)


def test_reference_sample_tokens_runs_with_distributions():
    m = randomize_(tiny_mar(), std=0.1).eval()
    torch.manual_seed(0)
    out = reference_sample_tokens(m, 2, 3, cfg=2.0, labels=torch.tensor([1, 2]), num_candidates=50)
    assert out.shape == (2, 16, 4, 4) and torch.isfinite(out).all() and (out != 0).all()


# ----------------------------------------------------------------------------- training
def test_masked_only_loss_equals_release_all_tokens_loss():
    m = randomize_(tiny_mar(), std=0.1).train()
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
TINY = ["--width", "32", "--heads", "4", "--depth", "1", "--inner_width", "32", "--img_size", "64",
        "--class_num", "10", "--device", "cpu", "--warmup", "0", "--repeats", "1", "--batch_size", "2"]


def test_bench_sampling_runs(tmp_path):
    out = tmp_path / "s.json"
    res = bench_sampling.main(TINY + ["--num_iter", "2", "--cfg", "2.0", "--cfg_sampler", "exact", "--json", str(out)])
    assert res["speedup"] > 0 and len(res["fast_s"]) == 1 and json.loads(out.read_text())["args"]["num_iter"] == 2


def test_bench_train_runs():
    res = bench_train.main(TINY + ["--steps", "1", "--no_memory"])
    assert res["speedup"] > 0
    losses = res["losses"]
    assert losses["masked_only"] == pytest.approx(losses["all_tokens"], rel=1e-5)
    # the release path also keeps the unmasked tokens' inner activations
    assert 0 < res["masked_only"]["saved_activations_mib"] <= res["all_tokens"]["saved_activations_mib"]


def test_bench_rejects_bad_heads():
    with pytest.raises(ValueError, match="--heads"):
        bench_sampling.main(["--width", "100", "--device", "cpu"])


def test_sampling_graphs_follow_the_flags():
    m = tiny_mar().eval()
    args = get_args_parser().parse_args([])
    assert args.cuda_graphs and not args.compile  # graphs by default, compile on request
    graphs = sampling_graphs(m, args)
    assert graphs.applies_to(torch.device("cuda")) and not graphs.applies_to(torch.device("cpu"))  # inert off CUDA
    assert graphs.sir_pick is None
    assert sampling_graphs(m, get_args_parser().parse_args(["--no-cuda_graphs"])) is None

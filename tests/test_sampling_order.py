"""Per-image generation order, watched from outside the sampling loop.

Through the public MAR.sample_tokens, with the outer model's condition_at(tokens, keep, class_vec,
predict) and the inner model's sample(z, temperature, cfg) wrapped: each image's tokens are
predicted in its own random order (a permutation, uniform over positions), step s predicts exactly
the literal schedule's count, and what the inner model samples is what ends up in the image and is
fed back to later steps.
"""
import numpy as np
import pytest
import torch
from scipy import stats

from tests.conftest import SpyBackend, randomize_, tiny_mar
from tests.reference import assert_all_fit

pytestmark = pytest.mark.usefixtures("one_thread")

# 16 tokens in 5 steps: floor(16 cos(pi/2 s/5)) = 15, 12, 9, 4 still masked, then the last 4
PER_STEP = [1, 3, 3, 5, 4]


def watched_sampling(bsz, seed, monkeypatch):
    torch.manual_seed(0)
    m = randomize_(tiny_mar(attn_dropout=0.0, proj_dropout=0.0), std=0.1).eval()
    sampled, spy = [], SpyBackend()
    sample = m.arhead.sample

    def spy_sample(z, *args, **kwargs):
        sampled.append(sample(z, *args, **kwargs))
        return sampled[-1]

    monkeypatch.setattr(m.arhead, "sample", spy_sample)
    torch.manual_seed(seed)
    out = m.sample_tokens(bsz, num_iter=5, cfg=1.0, labels=torch.arange(bsz) % 10, temperature=1.0, backend=spy)
    steps = [(tokens, keep, predict) for _, (tokens, keep, _, predict) in spy.runs]
    return m.patchify(out), steps, sampled


def test_each_image_follows_its_own_random_permutation(monkeypatch):
    bsz = 240
    tokens, steps, sampled = watched_sampling(bsz, seed=1, monkeypatch=monkeypatch)
    assert [predict.shape[1] for _, _, predict in steps] == PER_STEP
    assert [s.shape[0] for s in sampled] == [bsz * n for n in PER_STEP]

    order = torch.cat([predict for _, _, predict in steps], dim=1)  # [bsz, 16]: positions in prediction order
    assert torch.equal(order.sort(dim=1).values, torch.arange(16).expand(bsz, -1))  # every token exactly once
    done = torch.zeros(bsz, 16, dtype=torch.bool)
    for (fed, keep, predict), features in zip(steps, sampled):
        # the encoder sees exactly the tokens generated at earlier steps, with their generated values
        assert torch.equal(keep.sort(dim=1).values, done.nonzero()[:, 1].view(bsz, int(done[0].sum())))
        rows = torch.arange(bsz)[:, None]
        assert torch.equal(fed[rows, keep], tokens[rows, keep])
        # what the inner model drew for step s is what the image holds at the positions predicted at s
        assert torch.equal(tokens[rows, predict], features.view(bsz, predict.shape[1], -1))
        done[rows, predict] = True

    # the order is random per image: the first position is uniform, and images do not share orders
    first = np.bincount(order[:, 0].numpy(), minlength=16)
    last_step = np.bincount(steps[-1][2].flatten().numpy(), minlength=16)  # 4 per image
    assert_all_fit([stats.chisquare(first).pvalue, stats.chisquare(last_step).pvalue], alpha=1e-3)
    assert len({tuple(row) for row in order.tolist()}) == bsz


def test_orders_follow_the_seed(monkeypatch):
    orders = []
    for seed in (3, 3, 4):
        _, steps, _ = watched_sampling(8, seed, monkeypatch)
        orders.append(torch.cat([predict for _, _, predict in steps], dim=1))
    assert torch.equal(orders[0], orders[1]) and not torch.equal(orders[0], orders[2])

"""The three per-token heads on one outer model: each trains (its loss falls on the digits), resumes
bit-exactly through main_mar.py, samples through the same engine, and is recognised in checkpoints;
MAR-B's full layout (diffusion head included) loads strictly; feature groups of the inner AR."""
import argparse

import numpy as np
import pytest
import torch

import sample
from models.gmm import LOG_2PI
from models.heads.arinar import InnerAR
from models import HEADS, PRESETS, create_model
from tests.conftest import load_manifest, randomize_
from tests.pipeline_fixtures import load, make_image_folder, run_main, run_main_killed_after_saves, tiny_flags
from tests.test_checkpoint import assert_same_optimizer, assert_same_tensors
from util.train.state import LAST
from util.data.digits import DigitsDataset
from util.io.checkpoints import load_model_weights

pytestmark = pytest.mark.usefixtures("one_thread")
NO_INNER = {"inner_ar_width": None, "inner_ar_heads": None}  # the other heads have no inner model to size
HEAD_FLAGS = {"arinar": {}, "diffloss": {"diffloss_d": 1, "diffloss_w": 32, "num_sampling_steps": 8, **NO_INNER},
              "gmm": {"diffloss_d": 1, "diffloss_w": 32, **NO_INNER}}


def digits_mar(head, seed=0, **kw):
    """Grey 8x8 digits in 2x2 pixel patches: 16 tokens of 4 features, 10 classes."""
    torch.manual_seed(seed)
    flags = dict(tokenizer="pixel", img_size=8, vae_stride=1, patch_size=2, vae_embed_dim=1, img_channels=1,
                 class_num=10, buffer_size=4, width=32, enc_dec_depth=1, num_heads=4, inner_ar_width=32,
                 attn_dropout=0, proj_dropout=0, head=head)
    return create_model("mar_base", **{**flags, **HEAD_FLAGS[head], **kw})


@pytest.mark.parametrize("head, extra", [("arinar", {}), ("arinar", {"feature_group": 2}), ("diffloss", {}),
                                         ("gmm", {})])
def test_each_head_learns_the_digits(head, extra):
    """60 AdamW steps on real digits: the held-out loss (fixed masks and noise) falls clearly."""
    model = digits_mar(head, **extra)
    train, test = DigitsDataset("train", 8), DigitsDataset("test", 8)
    x_test, y_test = test.images[:128] * 0.5, torch.as_tensor(test.labels[:128])
    masks = torch.rand(128, 16, generator=torch.Generator().manual_seed(1)).argsort(1) < 12

    def held_out_loss():
        model.eval()
        torch.manual_seed(5)  # the same diffusion timesteps and noise each time
        with torch.no_grad():
            return float(model(x_test, y_test, masks))

    before = held_out_loss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(2)
    for _ in range(60):
        model.train()
        index = torch.randint(len(train), (64,), generator=gen)
        loss = model(train.images[index] * 0.5, torch.as_tensor(train.labels)[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = held_out_loss()
    assert np.isfinite(after) and after < before - 0.1 * abs(before), (before, after)
    model.eval()
    out = model.sample_tokens(4, num_iter=4, cfg=2.0, labels=torch.arange(4))  # the same engine for every head
    assert out.shape == (4, 1, 8, 8) and torch.isfinite(out).all()


@pytest.mark.parametrize("head", ["diffloss", "gmm"])
def test_other_heads_resume_bit_exactly_and_are_stored(tmp_path, monkeypatch, head):
    data = make_image_folder(tmp_path / "data", per_class=3)  # 6 images / batch 2 = 3 steps per epoch
    flags = dict(data_path=data, epochs=2, save_every_steps=1, head=head, **HEAD_FLAGS[head])
    run_main(tiny_flags(output_dir=tmp_path / "whole", **flags))
    run_main_killed_after_saves(monkeypatch, 2, tiny_flags(output_dir=tmp_path / "broken", **flags))
    run_main(tiny_flags(output_dir=tmp_path / "broken", resume=tmp_path / "broken", **flags))
    whole, resumed = load(tmp_path / "whole" / LAST), load(tmp_path / "broken" / LAST)
    assert whole["config"]["head"] == head and any(k.startswith(HEADS[head].attr + ".") for k in whole["model"])
    assert_same_tensors(whole["model"], resumed["model"], "model")
    assert_same_tensors(whole["model_ema"], resumed["model_ema"], "model_ema")
    assert_same_optimizer(whole["optimizer"], resumed["optimizer"])


def test_a_checkpoint_of_one_head_loaded_as_another_names_the_flag():
    diffusion = digits_mar("diffloss").state_dict()
    with pytest.raises(ValueError, match="Likely fix: --head diffloss"):
        load_model_weights(digits_mar("arinar"), diffusion, source="mar.pth")
    with pytest.raises(ValueError, match="--head arinar"):
        load_model_weights(digits_mar("gmm"), digits_mar("arinar").state_dict(), source="arinar.pth")
    with pytest.raises(ValueError, match="--feature_group 3 must divide"):
        digits_mar("arinar", feature_group=3)
    with pytest.raises(ValueError, match="unknown --head 'flow'; choose one of arinar, diffloss, gmm"):
        create_model("mar_base", head="flow")


def test_mar_b_with_its_diffusion_head_matches_the_release_layout():
    manifest = load_manifest("mar_b_official.json")
    with torch.device("meta"):
        model = create_model("mar_base", enc_dec_depth=12, head="diffloss", diffloss_d=6, diffloss_w=1024)
    ours = model.state_dict()
    assert [e["key"] for e in manifest["state_dict"]] == list(ours)
    assert all(list(ours[e["key"]].shape) == e["shape"] for e in manifest["state_dict"])
    assert sum(p.numel() for p in model.parameters()) == manifest["total_params"] == 207_924_768


def test_sample_py_reads_a_mar_release_checkpoint(tmp_path, monkeypatch):
    """A MAR-style file: args pickled as a Namespace with no --head (and num_sampling_steps a string),
    diffloss.* weights: sample.py takes the head and depth from the weights and samples."""
    monkeypatch.setitem(PRESETS, "tiny_mar_release", ("mar", {"width": 32, "num_heads": 4, "enc_dec_depth": 2}))
    args = argparse.Namespace(model="tiny_mar_release", img_size=8, vae_stride=1, patch_size=2, vae_embed_dim=1,
                              class_num=10, buffer_size=4, diffloss_d=1, diffloss_w=32, num_sampling_steps="8",
                              diffusion_batch_mul=4, tokenizer="pixel", img_channels=1)
    weights = randomize_(create_model("tiny_mar_release", enc_dec_depth=3, img_size=8, vae_stride=1, patch_size=2,
                                      vae_embed_dim=1, class_num=10, buffer_size=4, head="diffloss", diffloss_d=1,
                                      diffloss_w=32, num_sampling_steps=8), std=0.1).state_dict()
    torch.save({"model": weights, "model_ema": weights, "args": args}, tmp_path / "checkpoint-last.pth")
    out = sample.main(["--ckpt", str(tmp_path), "--classes", "1", "2", "--num_per_class", "2", "--num_iter", "4",
                       "--cfg", "2.9", "--out", str(tmp_path / "grid.png")])
    assert out.is_file()


def test_feature_group_mixture_nll_is_the_diagonal_formula():
    """g = 2: each step's two features share the component weights; the NLL is computed here by hand."""
    torch.manual_seed(0)
    m = randomize_(InnerAR(token_dim=8, cond_dim=12, width=16, depth=1, num_heads=2, feature_group=2), std=0.2)
    x, z = torch.randn(5, 8, dtype=torch.float64), torch.randn(5, 12, dtype=torch.float64)
    m = m.double()
    out = m(x, z)  # [5, 4 steps, K(2g+1) = 20]
    assert out.shape == (5, 4, 20)
    expected = torch.zeros(5, dtype=torch.float64)
    for s in range(4):
        mu, logvar, logits = out[:, s, :8].view(5, 4, 2), out[:, s, 8:16].view(5, 4, 2), out[:, s, 16:]
        xs = x[:, 2 * s:2 * s + 2, None].transpose(1, 2)  # [5, 1, 2]
        log_comp = torch.log_softmax(logits, -1) + (-0.5 * ((xs - mu) ** 2 / logvar.exp() + logvar)).sum(-1)
        expected -= torch.logsumexp(log_comp, -1)
    torch.testing.assert_close(m.nll(x, z), expected, rtol=1e-10, atol=0)
    assert LOG_2PI > 0 and m.cfg_samplers == ("sir",)
    samples = m.sample(torch.randn(6, 12, dtype=torch.float64), 1.0, 3.0)
    assert samples.shape == (3, 8) and torch.isfinite(samples).all()


def test_the_config_refuses_a_feature_group_that_does_not_divide_the_token():
    """Bug: InnerARConfig.validate checking only g <= token_dim: --feature_group 3 for 16 features then passes the
    config (stored, printed) and only the model's constructor refuses it, with its own message."""
    from models.config import config_from_flags
    with pytest.raises(ValueError, match=r"--feature_group 3 must divide the token's 16 features "
                                         r"\(vae_embed_dim x patch_size\^2\)$"):
        config_from_flags({"model": "mar_base", "feature_group": 3})
    assert config_from_flags({"model": "mar_base", "feature_group": 4}).head_config.feature_group == 4


def test_heads_that_share_a_flag_agree_on_its_default():
    """Bug: one head's default for a flag it shares with another changed (the whole-token mixture's depth 3 -> 2):
    the command line has one --diffloss_d whose help shows one default, and a run that does not give the flag
    would build that head at another size. Both MLP heads take MAR's MLP defaults (depth 3, width 1024)."""
    from dataclasses import fields
    from models.config import flag_name
    defaults = {}
    for name, head in HEADS.items():
        for f in fields(head.config):
            defaults.setdefault(flag_name(f), {})[name] = f.default
    assert {k: v for k, v in defaults.items() if len(set(v.values())) > 1} == {}
    assert defaults["diffloss_d"] == {"diffloss": 3, "gmm": 3}
    assert defaults["diffloss_w"] == {"diffloss": 1024, "gmm": 1024}
    assert defaults["num_gaussians"] == {"arinar": 4, "gmm": 4}

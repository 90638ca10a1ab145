"""A head and an outer family defined here join with one registration line each and then train and sample
through the unchanged engine: main_mar.py (their flags derived from their config dataclasses), the
checkpoint's config, and sample.py. Unknown names are one-line errors listing the choices."""
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import sample
from models import FAMILIES, HEADS, PRESETS, build, config_from_flags, create_model
from models.config import flag
from models.families.common import EagerSteps, OuterModel, Step, canvas, canvas_dtype, check_sampling_settings
from models.gmm import is_guided
from models.registry import build_head, register_family, register_head
from models.token_grid import patchify, unpatchify
from tests.pipeline_fixtures import load, make_image_folder, run_main, tiny_flags
from util.train.state import LAST

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- a toy head
@dataclass
class GaussHeadConfig:
    gauss_std: float = field(default=1.0, metadata=flag("gauss head: the std of its Gaussian",
                                                        valid=("> 0", lambda v: v > 0)))


class GaussHead(nn.Module):
    """N(Linear(z), gauss_std^2 I): the simplest law the head contract allows; CFG extrapolates the mean."""

    train_repeats = 1
    cfg_samplers = ("sir",)

    def __init__(self, token_dim, cond_dim, gauss_std):
        super().__init__()
        self.mean = nn.Linear(cond_dim, token_dim)
        self.std = gauss_std

    def loss(self, target, z):
        return ((target - self.mean(z).to(target.dtype)) ** 2).sum(-1) / (2 * self.std ** 2)

    @torch.no_grad()
    def sample(self, z, temperature=1.0, cfg=1.0, cfg_sampler="sir"):
        mean = self.mean(z).float()
        if is_guided(cfg):
            n = z.shape[0] // 2
            mean = mean[n:] + cfg * (mean[:n] - mean[n:])
        return mean + temperature * self.std * torch.randn_like(mean)


# ----------------------------------------------------------------------------- a toy outer family
@dataclass
class BagConfig:
    """An outer model that ignores the tokens: z = class vector + position vector (a bag of tokens)."""
    width: int = field(default=16, metadata=flag("outer width"))
    label_drop_prob: float = field(default=0.1, metadata=flag("label drop", tunable=True))


class Bag(OuterModel):
    def __init__(self, config):
        super().__init__(config)
        width = config.family_config.width
        self.class_emb = nn.Embedding(config.class_num + 1, width)  # the last row: the null class
        self.pos = nn.Parameter(torch.randn(self.tokens.seq_len, width) * 0.02)
        build_head(self, config, cond_dim=width)

    def condition(self, labels):
        return self.class_emb(labels)[:, None] + self.pos  # [B, L, width]

    def forward(self, latents, labels):
        tokens = patchify(latents, self.config.tokens)
        if self.training:
            drop = torch.rand(labels.shape, device=labels.device) < self.config.family_config.label_drop_prob
            labels = torch.where(drop, self.config.class_num, labels)
        z = self.condition(labels)
        return self.head.loss(tokens.flatten(0, 1), z.flatten(0, 1)).mean()

    @torch.no_grad()
    def sample_tokens(self, bsz, num_iter=64, cfg=1.0, cfg_schedule="linear", labels=None, temperature=1.0,
                      known=None, keep=None, backend=None, progress=False):
        check_sampling_settings(num_iter, cfg, temperature, cfg_schedule)
        backend = backend or EagerSteps()
        device = self.pos.device
        null = torch.full((bsz,), self.config.class_num, device=device)
        labels = null if labels is None else labels.to(device)
        with backend.autocast():
            tokens, keep = canvas(self.config.tokens, bsz, known, keep, canvas_dtype(self), device)
            both = torch.cat([labels, null]) if cfg != 1 else labels
            z = backend.run(Step("bag.condition", self, Bag.condition), both)
            drawn = backend.sample_head(self.head, z.flatten(0, 1), temperature, cfg)
            tokens = torch.where(keep[..., None], tokens, drawn.view_as(tokens).to(tokens.dtype))
        return unpatchify(tokens, self.config.tokens)


@pytest.fixture
def registries():
    """The registries as they are, put back after the test (a registration here must not leak)."""
    saved = [(registry, dict(registry)) for registry in (FAMILIES, HEADS, PRESETS)]
    yield
    for registry, entries in saved:
        registry.clear()
        registry.update(entries)


@pytest.fixture
def gauss_head(registries):
    register_head("gauss", config=GaussHeadConfig, attr="gausshead")(GaussHead)  # the one line a head needs


@pytest.fixture
def bag_family(registries):
    register_family("bag", config=BagConfig, presets={"bag_tiny": {"width": 16}}, default="bag_tiny")(Bag)


# ----------------------------------------------------------------------------- tests
def constant_images(root, values=(60, 200), per_class=4):
    """root/train/classK/*.png: every pixel of class K has the grey value values[K]."""
    for k, value in enumerate(values):
        folder = root / "train" / f"class{k}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(folder / f"{i}.png")
    return root


def train_then_sample_greys(tmp_path, **flags):
    """main_mar.py on two classes of constant grey images (60 and 200) with the gauss head, then sample.py
    on the run at a low temperature: (the checkpoint, the mean grey of each sampled image, class-major)."""
    data, run = constant_images(tmp_path / "data"), tmp_path / "run"
    run_main(tiny_flags(data_path=data, output_dir=run, epochs=40, head="gauss", gauss_std=0.05,
                        inner_ar_width=None, inner_ar_heads=None, warmup_epochs=2, ema_rate=0.5, **flags))
    out = sample.main(["--ckpt", str(run), "--classes", "0", "1", "--num_per_class", "2", "--num_iter", "2",
                       "--cfg", "1", "--temperature", "0.02", "--out", str(tmp_path / "grid.png"),
                       "--save_dir", str(tmp_path / "each")])
    assert out.is_file()
    return load(run / LAST), [np.asarray(Image.open(p)).astype(float).mean()
                              for p in sorted((tmp_path / "each").glob("*.png"))]


def test_a_toy_head_trains_and_samples_through_the_engine(tmp_path, gauss_head):
    """--head gauss and its flag --gauss_std exist once registered; main_mar trains it, the checkpoint's
    config rebuilds it, sample.py draws from it, and it learned the data: two classes of constant grey
    images are sampled back at their own grey values."""
    ckpt, grey = train_then_sample_greys(tmp_path, blr=0.1)
    assert ckpt["config"]["head"] == "gauss" and ckpt["config"]["head_config"] == {"gauss_std": 0.05}
    assert any(k.startswith("gausshead.") for k in ckpt["model"])
    assert grey == pytest.approx([60, 60, 200, 200], abs=12), grey


def test_a_toy_family_trains_and_samples_through_the_engine(tmp_path, bag_family, gauss_head):
    """--family bag (its preset and flags derived from BagConfig): trained by main_mar.py, rebuilt from the
    checkpoint by sample.py; guidance pairs each image with the null class; kept tokens come back bit for bit."""
    ckpt, grey = train_then_sample_greys(tmp_path, family="bag", model=None, buffer_size=None, blr=0.5)
    assert (ckpt["config"]["family"], ckpt["config"]["model"], ckpt["config"]["family_config"]["width"]) == \
        ("bag", "bag_tiny", 16)
    assert grey == pytest.approx([60, 60, 200, 200], abs=12), grey

    model = build(ckpt["config"])
    model.load_state_dict(ckpt["model_ema"])
    labels = torch.tensor([1, 0])
    guided = model.sample_tokens(2, cfg=2.5, labels=labels, temperature=1e-6)
    cond, null = (model.head.mean(model.condition(y)) for y in (labels, torch.full((2,), 2)))
    torch.testing.assert_close(patchify(guided, model.config.tokens), null + 2.5 * (cond - null), atol=1e-4, rtol=0)
    known = torch.randn(2, 3, 8, 8)
    keep = torch.rand(2, 16, generator=torch.Generator().manual_seed(0)) < 0.5
    tokens = patchify(model.sample_tokens(2, cfg=1.0, known=known, keep=keep), model.config.tokens)
    assert torch.equal(tokens[keep], patchify(known, model.config.tokens)[keep])


def test_config_round_trip_rebuilds_the_same_model(bag_family, gauss_head):
    config = config_from_flags({"family": "bag", "head": "gauss", "gauss_std": 0.3, "class_num": 5,
                                "img_size": 32, "width": 24})
    again = build(config.to_dict()).config
    assert again == config and again.to_dict() == config.to_dict()
    assert isinstance(again.family_config, BagConfig) and isinstance(again.head_config, GaussHeadConfig)
    assert again.family_config.width == 24 and again.head_config.gauss_std == 0.3 and again.model == "bag_tiny"


@pytest.mark.parametrize("weights, kept_in", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                             (torch.float32, torch.float32), (torch.float64, torch.float64)])
def test_sampled_tokens_are_kept_in_at_least_float32(weights, kept_in):
    """A family keeps its canvas of sampled tokens in canvas_dtype: float32 for a half-precision model (bf16 would
    round every drawn value to 8 bits of mantissa), float64 for a float64 one. Bug caught: the weights' dtype."""
    assert canvas_dtype(nn.Linear(2, 2).to(weights)) == kept_in


def test_class_ids_may_be_int64_or_int32_and_nothing_else():
    """Labels from numpy or another loader often come as int32, which the class embedding indexes as well; floats,
    bools and int16 are refused in one line. Bug caught: int64 alone accepted."""
    from models.families.common import check_labels
    check_labels(torch.tensor([0, 9], dtype=torch.int32), 2, 10)
    check_labels(torch.tensor([0, 9], dtype=torch.int64), 2, 10)
    for dtype in (torch.int16, torch.float32, torch.bool):
        with pytest.raises(ValueError, match=r"^labels must be a 1-D integer tensor of 2 class ids"):
            check_labels(torch.tensor([0, 1], dtype=dtype), 2, 10)


def test_unknown_names_list_the_choices():
    with pytest.raises(ValueError, match=r"^unknown --head 'flow'; choose one of arinar, diffloss, gmm$"):
        create_model("mar_base", head="flow")
    with pytest.raises(ValueError, match=r"^unknown --family 'rnn'; choose one of .*mar"):
        config_from_flags({"family": "rnn"})
    with pytest.raises(ValueError, match=r"^unknown --model 'mar_tiniest'; choose one of .*mar_base"):
        create_model("mar_tiniest")
    with pytest.raises(ValueError, match=r"^--model mar_base is a mar model, not --family bag"):
        config = config_from_flags({})
        config.family = "bag"
        config.validate()


def test_a_flag_of_another_head_is_refused(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=2)
    with pytest.raises(ValueError, match=r"^--inner_ar_width is not a setting of --family mar with --head gmm$"):
        run_main(tiny_flags(data_path=data, output_dir=tmp_path / "run", head="gmm"))
    assert not (tmp_path / "run").exists()

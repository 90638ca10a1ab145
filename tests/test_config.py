"""The typed model config: what checkpoints store, how files without one (ours before it, the ARINAR and
MAR releases) convert to one, how command-line flags meet a stored config, and the flags themselves."""
import argparse
import re

import pytest
import torch

import main_cache
import main_mar
import sample
from models import ModelConfig, create_model
from tests.pipeline_fixtures import load, make_image_folder, run_main, tiny_flags
from util.io.checkpoints import config_from_checkpoint
from util.train.state import LAST

# what the ARINAR release pickles (its main_mar.py's argparse names; model_ema = the EMA weights)
ARINAR_ARGS = argparse.Namespace(model="mar_base", img_size=256, vae_path="pretrained_models/vae/kl16.ckpt",
                                 vae_embed_dim=16, vae_stride=16, patch_size=1, num_gaussians=4, mask_ratio_min=0.7,
                                 label_drop_prob=0.1, class_num=1000, attn_dropout=0.1, proj_dropout=0.1,
                                 buffer_size=64, grad_checkpointing=False, cfg=4.5, num_iter=64, seed=1)
# MAR's: no --head, the diffusion head's sizes, num_sampling_steps stored as a string
MAR_ARGS = argparse.Namespace(model="mar_base", img_size=256, vae_embed_dim=16, vae_stride=16, patch_size=1,
                              mask_ratio_min=0.7, label_drop_prob=0.1, class_num=1000, attn_dropout=0.1,
                              proj_dropout=0.1, buffer_size=64, diffloss_d=6, diffloss_w=1024,
                              num_sampling_steps="100", diffusion_batch_mul=4, grad_checkpointing=False)


def test_a_mar_release_setting_stored_as_a_string_is_compared_as_its_number():
    """MAR pickles --num_sampling_steps as "100". Bug: compared as stored, the same 100 given on the command line
    was reported as a change ("100" -> 100), and a real change showed the old value as a string."""
    state = meta_state("mar_base", enc_dec_depth=12, head="diffloss", diffloss_d=6, diffloss_w=1024)
    ckpt = {"args": MAR_ARGS, "model": state}
    assert config_from_checkpoint(ckpt, state, {"num_sampling_steps": 100})[1] == {}
    assert config_from_checkpoint(ckpt, state, {"num_sampling_steps": 25})[1] == {"num_sampling_steps": (100, 25)}
    bad = {"args": argparse.Namespace(**{**vars(MAR_ARGS), "num_sampling_steps": "many"}), "model": state}
    with pytest.raises(ValueError, match=r"^mar.pth: args: num_sampling_steps must be int; got 'many'$"):
        config_from_checkpoint(bad, state, source="mar.pth")


def meta_state(name, **flags):
    """A state dict with the keys and shapes of create_model(name, **flags), without memory."""
    with torch.device("meta"):
        return create_model(name, **flags).state_dict()


def test_the_arinar_release_converts_to_arinar_b():
    state = meta_state("mar_base", num_gaussians=4)
    config, changed = config_from_checkpoint({"args": ARINAR_ARGS, "model_ema": state}, state)
    assert config == create_model("mar_base", num_gaussians=4).config and changed == {}
    assert (config.family, config.head, config.family_config.depth, config.head_config.width) == \
        ("mar", "arinar", 14, 768)


def test_the_mar_release_converts_to_mar_b_with_its_diffusion_head():
    state = meta_state("mar_base", enc_dec_depth=12, head="diffloss", diffloss_d=6, diffloss_w=1024)
    config, _ = config_from_checkpoint({"args": MAR_ARGS, "model": state}, state)
    # the head and the 12 blocks come from the weights; num_sampling_steps "100" becomes an int
    assert (config.head, config.family_config.depth) == ("diffloss", 12)
    assert (config.head_config.depth, config.head_config.width, config.head_config.num_sampling_steps) == (6, 1024, 100)
    assert sum(p.numel() for p in create_model("mar_base", **{k: v for k, v in config.flat().items()
                                                               if k != "model"}).parameters()) == 207_924_768


def test_a_bare_state_dict_takes_what_its_weights_say():
    """No args at all: width, depth, head sizes and classes from the shapes; the rest the release's."""
    state = meta_state("mar_large", class_num=10, inner_ar_width=256, inner_ar_depth=2, num_heads=16)
    config, _ = config_from_checkpoint(state, state, {"model": "mar_large"})
    assert (config.family_config.width, config.family_config.depth, config.class_num) == (1024, 16, 10)
    assert (config.head_config.width, config.head_config.depth) == (256, 2)


def test_a_bare_state_dict_takes_its_diffusion_head_s_size_from_its_weights():
    """The diffusion head's width and depth (res blocks) from the shapes, as the ARINAR head's are. Bug: the
    res-block count not read, so a bare file of a 2-block head met a 3-block model's strict load."""
    state = meta_state("mar_large", head="diffloss", class_num=10, diffloss_d=2, diffloss_w=256)
    config, _ = config_from_checkpoint(state, state, {"model": "mar_large"})
    assert (config.head, config.head_config.width, config.head_config.depth) == ("diffloss", 256, 2)


def test_flags_given_as_none_are_not_given():
    """A flag left at None (argparse's "not passed") neither contradicts a file without a config nor overrides
    what it says. Bug: the None values kept ("--num_gaussians None contradicts ...")."""
    state = meta_state("mar_base", num_gaussians=4)
    ckpt = {"args": ARINAR_ARGS, "model_ema": state}
    config, changed = config_from_checkpoint(ckpt, state, {"num_gaussians": None, "class_num": None, "cfg": None})
    assert config == create_model("mar_base", num_gaussians=4).config and changed == {}


def test_our_checkpoints_before_the_config_convert_from_their_args():
    """The args dict main_mar.py stored (every flag, None = the preset's) is read as flags."""
    args = {"model": "mar_tiny", "head": "gmm", "num_gaussians": 8, "diffloss_d": 2, "diffloss_w": 64,
            "inner_ar_width": None, "enc_dec_depth": None, "tokenizer": "pixel", "img_size": 8, "patch_size": 2,
            "vae_stride": 1, "vae_embed_dim": 1, "img_channels": 1, "class_num": 10, "lr": 1e-3, "cfg": 3.0}
    expected = create_model("mar_tiny", **{k: v for k, v in args.items() if k not in ("lr", "cfg", "inner_ar_width",
                                                                                       "enc_dec_depth")})
    config, _ = config_from_checkpoint({"args": args}, expected.state_dict())
    assert config == expected.config


def test_a_stored_config_is_authoritative():
    config = create_model("mar_tiny", head="diffloss", class_num=10).config
    ckpt = {"config": config.to_dict()}
    with pytest.raises(ValueError, match=r"^--diffloss_w 512 contradicts RUN's config \(diffloss_w 1024\): drop "
                                         r"the flag \(a stored run rebuilds itself\) or start a new run$"):
        config_from_checkpoint(ckpt, {}, {"diffloss_w": 512}, source="RUN")
    with pytest.raises(ValueError, match=r"^--num_gaussians is not a setting of --family mar with --head diffloss$"):
        config_from_checkpoint(ckpt, {}, {"num_gaussians": 4}, source="RUN")
    # settings that do not change the weights' meaning may change, and are reported
    changed_config, changed = config_from_checkpoint(ckpt, {}, {"num_sampling_steps": 25, "attn_dropout": 0.3,
                                                                "diffloss_d": 3}, source="RUN")
    assert changed == {"num_sampling_steps": (100, 25), "attn_dropout": (0.0, 0.3)}  # mar_tiny: the demo's 0
    assert changed_config.head_config.num_sampling_steps == 25 and changed_config.family_config.attn_dropout == 0.3
    assert changed_config.family_config.depth == config.family_config.depth


def test_the_weights_overrule_stale_stored_args():
    """A file without a config: what its weights show wins over its stored args (here a class_num and depth the
    run's model was not built with). Bug: the args applied after the weights' facts."""
    args = {"model": "mar_tiny", "head": "gmm", "num_gaussians": 8, "tokenizer": "pixel", "img_size": 8,
            "patch_size": 2, "vae_stride": 1, "vae_embed_dim": 1, "img_channels": 1, "class_num": 1000,
            "enc_dec_depth": 2}
    model = create_model("mar_tiny", **dict(args, class_num=10, enc_dec_depth=1))
    config, _ = config_from_checkpoint({"args": args}, model.state_dict())
    assert (config.class_num, config.family_config.depth) == (10, 1) and config == model.config


def test_a_release_takes_new_tunable_settings_and_refuses_contradicting_ones():
    """Files without a config too: a tunable setting (dropout) may differ from the stored args and is reported;
    a setting that changes the weights' meaning may not. Bug: the tunable exemption dropped (every differing
    flag refused)."""
    state = meta_state("mar_base", num_gaussians=4)
    ckpt = {"args": ARINAR_ARGS, "model_ema": state}
    config, changed = config_from_checkpoint(ckpt, state, {"attn_dropout": 0.0}, source="RELEASE")
    assert changed == {"attn_dropout": (0.1, 0.0)} and config.family_config.attn_dropout == 0.0
    with pytest.raises(ValueError, match=r"^--class_num 10 contradicts RELEASE \(class_num 1000\): drop the flag$"):
        config_from_checkpoint(ckpt, state, {"class_num": 10}, source="RELEASE")


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(colour="red"), "RUN: config: unknown model config entries colour"),
    (lambda d: d["family_config"].update(depthh=3), "RUN: config: family_config: unknown entries depthh for MARConfig"),
    (lambda d: d["head_config"].update(width="wide"), "RUN: config: head_config: width must be int; got 'wide'"),
    (lambda d: d["tokens"].update(patch_size=1.5), "RUN: config: tokens: patch_size must be an integer; got 1.5"),
    (lambda d: d.update(head="flow"), "unknown --head 'flow'; choose one of arinar, diffloss, gmm"),
    (lambda d: d["tokens"].update(img_size=100), "--img_size 100 must be a multiple of --vae_stride x --patch_size"),
    (lambda d: d["family_config"].update(label_drop_prob=2.0), "--label_drop_prob must be in [0, 1]; got 2.0"),
])
def test_a_bad_stored_config_is_one_line_naming_what_is_wrong(edit, message):
    d = create_model("mar_tiny").config.to_dict()
    edit(d)
    with pytest.raises(ValueError) as err:
        ModelConfig.from_dict(d, source="RUN: config")
    assert str(err.value).startswith(message) and "\n" not in str(err.value), str(err.value)


def test_a_stored_switch_must_be_a_boolean():
    """coerce on a bool field (a family or head may add one): a stored "yes" or 1 is refused in one line, true
    passes as it is. Bug caught: the bool branch dropped (anything taken as the switch's value)."""
    import dataclasses

    from models.config import coerce

    @dataclasses.dataclass
    class WithSwitch:
        fused: bool = False

    switch = dataclasses.fields(WithSwitch)[0]
    assert coerce(switch, True, "RUN") is True and coerce(switch, False, "RUN") is False
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match=r"^RUN: fused must be true or false; got "):
            coerce(switch, bad, "RUN")


def test_the_pixel_tokenizer_fills_only_the_token_settings_not_given():
    """--tokenizer pixel implies --vae_stride 1 and --vae_embed_dim = the image channels only where those flags are
    not given: a given --vae_stride 2 is kept (and then refused by name), never overwritten. Bug caught: the implied
    values written over the given ones (a contradicting flag silently ignored)."""
    from models.config import config_from_flags, with_token_defaults
    assert with_token_defaults({"tokenizer": "pixel", "img_channels": 1}) == \
        {"tokenizer": "pixel", "img_channels": 1, "vae_stride": 1, "vae_embed_dim": 1}
    assert with_token_defaults({"tokenizer": "pixel", "vae_stride": 2, "vae_embed_dim": 5}) == \
        {"tokenizer": "pixel", "vae_stride": 2, "vae_embed_dim": 5}
    assert with_token_defaults({"tokenizer": "kl16"}) == {"tokenizer": "kl16"}
    with pytest.raises(ValueError, match=r"^--tokenizer pixel means --vae_stride 1 and --vae_embed_dim 1 .*got 2 and"):
        config_from_flags({"model": "mar_tiny", "tokenizer": "pixel", "img_size": 8, "img_channels": 1,
                           "vae_stride": 2})


def test_a_given_family_is_kept_and_checked_against_the_given_preset():
    """--family with a --model of another family is one line naming both; --family alone takes its own default
    preset. Bug caught: the preset's family written over the given --family (a causal run silently built as MAR)."""
    from models.config import config_from_flags
    with pytest.raises(ValueError, match=r"^--model mar_tiny is a mar model, not --family causal$"):
        config_from_flags({"model": "mar_tiny", "family": "causal"})
    config = config_from_flags({"family": "causal"})
    assert (config.family, config.model) == ("causal", "causal_base")


def test_sampling_settings_take_the_overrides_over_the_run_arguments():
    """One sweep point's cfg and temperature replace the run's; other entries are left out. Bug caught: the run's
    arguments applied after the overrides (every sweep point drawn at the run's first cfg)."""
    from models.families.common import SamplingSettings
    from util import flags
    run = {"num_iter": 8, "cfg": 1.0, "cfg_schedule": "constant", "temperature": 1.0, "seed": 3}
    assert flags.sampling_settings(run, cfg=3.0, temperature=0.5) == SamplingSettings(8, 3.0, "constant", 0.5)
    assert flags.sampling_settings(argparse.Namespace(**run)) == SamplingSettings(8, 1.0, "constant", 1.0)


def test_a_run_written_before_the_config_resumes_and_is_stored_with_one(tmp_path):
    """Strip `config` from a run's checkpoint (what earlier versions wrote): resuming converts it once, from its
    args and weights, and the next save stores the config."""
    data = make_image_folder(tmp_path / "data", per_class=2)
    flags = dict(data_path=data, output_dir=tmp_path / "run", num_gaussians=2)
    run_main(tiny_flags(epochs=1, **flags))
    ckpt = load(tmp_path / "run" / LAST)
    stored = ckpt.pop("config")
    torch.save(ckpt, tmp_path / "run" / LAST)
    run_main(tiny_flags(epochs=2, resume=tmp_path / "run", **flags))
    assert load(tmp_path / "run" / LAST)["config"] == stored


@pytest.mark.parametrize("parser", [main_mar.get_args_parser, sample.get_parser, main_cache.get_args_parser])
def test_every_flag_has_help_and_the_help_shows_defaults(parser):
    p = parser()
    missing = [a.option_strings[0] for a in p._actions if a.option_strings and not a.help]
    assert missing == []
    text = p.format_help()
    assert re.search(r"--num_gaussians NUM_GAUSSIANS\s+mixture components.*\(default: 4", text.replace("\n", " ")) \
        or parser is main_cache.get_args_parser
    assert "(default: None)" not in text


def _helps(parser):
    """{option: its help as --help prints it, on one line}."""
    formatter = parser.formatter_class(prog="x")
    return {a.option_strings[0]: " ".join(formatter._expand_help(a).split()) for a in parser._actions
            if a.option_strings}


@pytest.mark.parametrize("parser", [main_mar.get_args_parser, main_cache.get_args_parser])
def test_the_pin_memory_switches_show_their_default_once_and_truly(parser):
    helps = _helps(parser())
    assert helps["--pin_mem"].count("default") == 1 and helps["--pin_mem"].endswith("(default: True)")
    assert "default" not in helps["--no_pin_mem"]  # its dest's True read as "--no_pin_mem is on"


def test_a_flag_whose_default_is_empty_shows_no_default():
    """--cached_path and --resume default to "" (not given): their help says what applies then, with no empty
    "(default: )". Bug caught: only None treated as "not given" by the help formatter."""
    helps = _helps(main_mar.get_args_parser())
    assert helps["--cached_path"].startswith("cached latents") and "(default" not in helps["--cached_path"]
    assert helps["--resume"].startswith("run folder") and "(default" not in helps["--resume"]


def test_a_flag_the_families_share_says_what_it_means_in_each():
    """--depth is the causal family's self- plus cross-attention blocks and the scale-wise family's AdaLN blocks:
    the help holds each family's own text, not the first family's alone."""
    from models.config import all_flag_fields
    helps = _helps(main_mar.get_args_parser())
    for name, owners in all_flag_fields().items():
        for f, owner in owners:
            assert f.metadata["help"] in helps[f"--{name}"], (name, owner)
    assert "--family scalewise: outer AdaLN blocks" in helps["--depth"]


def test_main_cache_help_names_no_flag_it_lacks():
    """main_cache.py has no --dataset: --img_channels shows the default it takes (3), not the data set's."""
    p = main_cache.get_args_parser()
    helps = _helps(p)
    assert helps["--img_channels"].endswith("(default: 3)")
    assert p.parse_args([]).img_channels is None  # None = TokenConfig's 3 (flags.token_config)
    from util import flags
    assert flags.token_config(p.parse_args([])).img_channels == 3
    writer = flags.parser("x")
    flags.add_data_args(writer, writes_cache=True)  # main_cache.py's --cached_path is its output
    assert "write" in _helps(writer)["--cached_path"] and "--use_cached" not in _helps(writer)["--cached_path"]


@pytest.mark.parametrize("parser", [main_mar.get_args_parser, sample.get_parser])
def test_compile_help_names_the_head_sampler_too(parser):
    assert "compile_regions" in _helps(parser())["--compile"]


def test_sample_py_offers_no_training_only_model_flags():
    """Dropouts, label drop, mask ratio, ... shape training only: sample.py leaves them out of its flags;
    main_mar.py keeps them, and sample.py keeps the sampling settings a checkpoint may change."""
    import main_mar
    import sample

    def options(parser):
        return {o for a in parser._actions for o in a.option_strings}
    training_only = {"--label_drop_prob", "--mask_ratio_min", "--attn_dropout", "--proj_dropout", "--drop_path",
                     "--target_subsample", "--diffusion_batch_mul"}
    assert not training_only & options(sample.get_parser())
    assert training_only <= options(main_mar.get_args_parser())
    assert {"--num_sampling_steps", "--step_schedule", "--num_gaussians", "--width"} <= options(sample.get_parser())


def test_a_stored_boolean_is_no_number():
    """JSON true for an int or float setting is refused in one line, as run_facts refuses a boolean epoch. Bug: true
    passed through unchanged (a bool is an int in Python), so class_num true built a one-class model."""
    d = create_model("mar_tiny").config.to_dict()
    d["class_num"] = True
    with pytest.raises(ValueError, match=r"^RUN: class_num must be int; got True$"):
        ModelConfig.from_dict(d, source="RUN")
    d = create_model("mar_tiny").config.to_dict()
    d["family_config"]["label_drop_prob"] = False
    with pytest.raises(ValueError, match=r"^RUN: family_config: label_drop_prob must be float; got False$"):
        ModelConfig.from_dict(d, source="RUN")


def test_a_shared_flag_s_help_names_its_owners_and_defaults_only_where_they_tell_apart():
    """Two owners are named after the help, three or more (every family) are not; one default shared by every
    owner is shown once, differing ones per owner. Bugs: the default listed per owner though all agree (--mlp_ratio
    "4.0 with --family causal, 4.0 with ..."), every family named after a help they all share."""
    helps = _helps(main_mar.get_args_parser())
    assert helps["--mlp_ratio"] == "outer MLP width / width (default: 4.0)"
    assert helps["--width"] == ("outer model width (default: 768 with --family causal, 768 with --family mar, "
                                "1024 with --family scalewise)")
    assert helps["--attn_dropout"] == ("attention dropout [--family causal, --family mar]; a resumed run may change "
                                       "it (default: 0.1)")
    assert helps["--num_gaussians"].endswith("[--head arinar, --head gmm] (default: 4)")


def test_every_tunable_flag_and_only_those_say_a_resumed_run_may_change_them():
    """--step_schedule and --num_sampling_steps are sampling settings (not training-only) a stored run may change.
    Bug: the note keyed to the training-only mark (it left these two out)."""
    from models.config import all_flag_fields
    helps = _helps(main_mar.get_args_parser())
    assert "a resumed run may change it" in helps["--step_schedule"]
    assert "a resumed run may change it" in helps["--num_sampling_steps"]
    for name, owners in all_flag_fields().items():
        tunable = owners[0][0].metadata.get("tunable")
        assert ("a resumed run may change it" in helps[f"--{name}"]) == bool(tunable), name


def test_main_cache_s_tokenizer_flags_are_checked_as_a_model_s():
    """main_cache.py has no model to validate its tokenizer flags: token_config does, in one line each. Bug: the
    TokenConfig returned unchecked (--img_size 100 with a 16-pixel stride went on to the tokenizer)."""
    p = main_cache.get_args_parser()
    from util import flags
    with pytest.raises(ValueError, match=r"^--img_size 100 must be a multiple of --vae_stride x --patch_size = 16$"):
        flags.token_config(p.parse_args(["--img_size", "100"]))
    with pytest.raises(ValueError, match=r"^--tokenizer must be one of kl16, pixel; got 'vq'$"):
        flags.token_config(p.parse_args([]).__class__(**{**vars(p.parse_args([])), "tokenizer": "vq"}))
    assert flags.token_config(p.parse_args(["--img_size", "64"])).seq_h == 4


def test_the_pixel_tokenizer_has_one_feature_per_image_channel():
    """Bug: only the stride checked (3 features a pixel of a 1-channel image passed the check)."""
    from models.config import TokenConfig
    with pytest.raises(ValueError, match=r"^--tokenizer pixel means --vae_stride 1 and --vae_embed_dim 1 \(the image "
                                         r"channels\); got 1 and 3$"):
        TokenConfig(tokenizer="pixel", img_size=8, img_channels=1, vae_stride=1, vae_embed_dim=3).validate()
    TokenConfig(tokenizer="pixel", img_size=8, img_channels=1, vae_stride=1, vae_embed_dim=1).validate()

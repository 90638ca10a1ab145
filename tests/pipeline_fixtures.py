"""Shared helpers for the pipeline tests: tiny data, a tiny registered model, subprocess launchers."""
import math
import os
import subprocess
import sys
import textwrap
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from models import PRESETS
from tests.conftest import REPO

TINY = "test_tiny"


# width 32, one encoder and one decoder block: trains in milliseconds per step on a CPU
TINY_PRESET = ("mar", {"width": 32, "num_heads": 2, "enc_dec_depth": 1})
# the causal family at the same width: one self-attention and one cross-attention block
TINY_CAUSAL = "test_tiny_causal"
TINY_SCALEWISE = "test_tiny_scalewise"
TINY_PRESETS = {TINY: TINY_PRESET, TINY_CAUSAL: ("causal", {"width": 32, "num_heads": 2, "depth": 2}),
                TINY_SCALEWISE: ("scalewise", {"width": 32, "num_heads": 2, "depth": 2, "ssm_state": 4})}


def tiny_flags(**overrides):
    """CLI flags for a tiny pixel-space run: 8x8 RGB images, 2x2 patches = 16 tokens of 12 features."""
    flags = {"model": TINY, "tokenizer": "pixel", "img_size": 8, "patch_size": 2, "class_num": 2,
             "inner_ar_width": 32, "inner_ar_heads": 2, "buffer_size": 4, "batch_size": 2, "num_workers": 0,
             "warmup_epochs": 1, "blr": 1e-2, "log_freq": 1, "seed": 3}
    flags.update(overrides)
    out = []
    for key, value in flags.items():
        if value is True:
            out.append(f"--{key}")
        elif value is not False and value is not None:
            out += [f"--{key}", str(value)]
    return out


def load(path):
    """A checkpoint as training wrote it, read the safe way."""
    return torch.load(path, map_location="cpu", weights_only=True)


def make_image_folder(root, classes=2, per_class=6, seed=0, broken=()):
    """root/train/classK/imgI.png with random RGB images of varied sizes; `broken` = (class, name) pairs
    written as non-image bytes."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = os.path.join(root, "train", f"class{c}")
        os.makedirs(folder, exist_ok=True)
        for i in range(per_class):
            h, w = 10 + int(rng.integers(0, 8)), 10 + int(rng.integers(0, 8))
            image = (rng.random((h, w, 3)) * 255).astype(np.uint8)
            Image.fromarray(image).save(os.path.join(folder, f"img{i}.png"))
    for c, name in broken:
        with open(os.path.join(root, "train", f"class{c}", name), "wb") as f:
            f.write(b"this is not an image")
    return root


LAUNCHER = textwrap.dedent(f"""
    import sys
    sys.path.insert(0, {str(REPO)!r})
    from tests.pipeline_fixtures import TINY_PRESETS
    from models import PRESETS
    PRESETS.update(TINY_PRESETS)
    import {{module}}
    {{module}}.cli(sys.argv[1:])
""")


def write_launcher(folder, module="main_mar"):
    """A script that registers the tiny models, then runs `module`.cli (torchrun needs a file)."""
    path = os.path.join(folder, f"launch_{module}.py")
    with open(path, "w") as f:
        f.write(LAUNCHER.format(module=module))
    return path


def subprocess_env():
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="")
    return env


def run(cmd, timeout=240, **kwargs):
    return subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=timeout,
                          **kwargs)


def python():
    return sys.executable


def torchrun():
    return [sys.executable, "-m", "torch.distributed.run"]


def parse(flags):
    import main_mar
    with mock.patch.dict(PRESETS, TINY_PRESETS):
        return main_mar.get_args_parser().parse_args(flags)


def run_main(flags):
    """main_mar.main in this process with the tiny models registered."""
    import main_mar
    with mock.patch.dict(PRESETS, TINY_PRESETS):
        args = main_mar.get_args_parser().parse_args(flags)
        main_mar.main(args)
    return args


def run_main_killed_after_saves(monkeypatch, saves, flags):
    """run_main(flags), killed (KeyboardInterrupt) right after its `saves`-th checkpoint write."""
    from util.train import state as checkpoint
    real_save, done = checkpoint.atomic_torch_save, []

    def save_then_maybe_die(obj, path):
        real_save(obj, path)
        done.append(path)
        if len(done) == saves:
            raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(checkpoint, "atomic_torch_save", save_then_maybe_die)
    with pytest.raises(KeyboardInterrupt):
        run_main(flags)
    monkeypatch.setattr(checkpoint, "atomic_torch_save", real_save)


def random_inception_weights(path, seed=0):
    """A state dict in torch-fidelity's own InceptionV3 layout with random, variance-preserving weights."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe
    with mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None):
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    gen = torch.Generator().manual_seed(seed)
    state = net.state_dict()
    with torch.no_grad():
        for key, value in state.items():
            if not value.dtype.is_floating_point:
                continue
            if key.endswith("running_var"):
                value.fill_(1.0)
            elif key.endswith("running_mean"):
                value.zero_()
            elif value.ndim == 4:  # conv: He init keeps activations from vanishing through 90 layers
                value.copy_(torch.randn(value.shape, generator=gen) * math.sqrt(2.0 / value[0].numel()))
            elif key == "fc.weight":
                value.copy_(torch.randn(value.shape, generator=gen) / math.sqrt(value.shape[1]))
    torch.save(state, path)
    return path


def eval_setup(tmp_path, **overrides):
    """(args, model, tokenizer, ema) for calling engine_mar.evaluate/generate directly."""
    from main_mar import model_config, resolve_args
    from models import build
    from util.io.tokenizers import build_tokenizer
    from util.train.ema import EMA

    flags = dict(output_dir=tmp_path / "run", num_images=4, eval_bsz=2, num_iter=4, fid_stats="none")
    flags.update(overrides)
    args = resolve_args(parse(tiny_flags(**flags)))
    with mock.patch.dict(PRESETS, TINY_PRESETS):
        torch.manual_seed(0)
        model = build(model_config(args, None)[0])
    tokenizer = build_tokenizer(model.config.tokens)
    return args, model, tokenizer, EMA(model, args.ema_rate)

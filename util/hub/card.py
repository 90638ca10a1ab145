"""The model card (README.md) of a published model: YAML front matter the Hub reads (library, license,
tags, pipeline), then the facts: family, head, parameter count, weights, training run, evaluations of
these exact weights, and the commands that sample and evaluate them."""
import json
import shlex

from util.data.datasets import DATASETS
from util.hub.evaluations import best

PAPER = "arXiv:2503.02883"
SCORE_NAMES = {"fid": "FID", "inception_score": "IS", "precision": "precision", "recall": "recall",
               "accuracy": "digit accuracy", "real_accuracy": "accuracy on real digits"}
# the run arguments the training table reports, in order
TRAINING = (("dataset", "data set"), ("data_path", "data path"), ("cached_path", "cached latents"),
            ("epochs", "epochs (--epochs)"),
            ("batch_size", "batch size per process"), ("world_size", "processes"), ("blr", "base lr per 256 images"),
            ("lr", "lr"), ("lr_schedule", "lr schedule"), ("warmup_epochs", "warm-up epochs"),
            ("weight_decay", "weight decay"), ("grad_clip", "gradient clip"), ("ema_rate", "EMA rate"),
            ("precision", "precision"), ("seed", "seed"))


def data_source(args):
    """The argument that names the data the run read: --cached_path with --use_cached, none for the digits demo
    (shipped with scikit-learn), else --data_path; the others are unused defaults."""
    if args.get("use_cached"):
        return "cached_path"
    return None if args.get("dataset") == "digits" else "data_path"


def front_matter(config, args, license):
    tags = ["arinar", "image-generation", "autoregressive", "class-conditional", f"family-{config.family}",
            f"head-{config.head}", PAPER.lower()]
    meta = {"library_name": "arinar", "license": license, "pipeline_tag": "unconditional-image-generation",
            "tags": tags}
    spec = DATASETS.get(args.get("dataset"))
    if spec is not None and spec.hub_id:
        meta["datasets"] = [spec.hub_id]
    lines = ["---"]
    for key, value in meta.items():  # JSON strings are YAML strings: no quoting rules to get wrong
        if isinstance(value, list):
            lines += [f"{key}:"] + [f"- {json.dumps(v)}" for v in value]
        else:
            lines.append(f"{key}: {json.dumps(value)}")
    return "\n".join(lines + ["---", ""])


def _table(rows):
    return "\n".join(["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]) + "\n"


def _short(count):
    return f"{count / 1e6:.1f}M" if count >= 1e6 else f"{count / 1e3:.1f}K"


def _number(value):
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def sampling_point(evaluations, args):
    """{cfg, temperature, num_iter, cfg_schedule, cfg_sampler} to quote: the best evaluation's, else the run's args."""
    chosen = best(evaluations) or args
    point = {}
    for key in ("cfg", "temperature", "num_iter", "cfg_schedule", "cfg_sampler"):
        value = chosen.get(key)
        if isinstance(value, list):  # main_mar stores --cfg / --temperature sweeps as lists too
            value = value[0] if value else None
        if value is not None:
            point[key] = value
    return point


def sample_command(name, config, point):
    classes = [207, 360, 387, 974] if config.class_num >= 1000 else list(range(min(4, config.class_num)))
    argv = ["python", "sample.py", "--ckpt", str(name), "--classes", *map(str, classes), "--num_per_class", "4"]
    for key in ("cfg", "temperature", "num_iter", "cfg_schedule", "cfg_sampler"):
        if key in point:
            argv += [f"--{key}", _number(point[key])]
    return shlex.join(argv + ["--seed", "0", "--out", "samples.png"])


def evaluate_command(name, args, evaluation, point):
    argv = ["python", "main_mar.py", "--evaluate", "--resume", str(name)]
    if args.get("dataset"):
        argv += ["--dataset", str(args["dataset"])]
    source = evaluation or {"num_images": 50000}
    for key in ("num_images", "eval_bsz", "seed", "precision"):
        if key in source:
            argv += [f"--{key}", _number(source[key])]
    for key in ("cfg", "temperature", "num_iter", "cfg_schedule", "cfg_sampler"):
        if key in point:
            argv += [f"--{key}", _number(point[key])]
    return shlex.join(argv + ["--output_dir", "eval_output"])


def model_card(name, config, num_params, facts, license):
    """README.md text. name: what --ckpt takes (the repo id or the folder); facts: weights, args, epoch, evaluations."""
    args, evaluations = facts.get("args") or {}, facts.get("evaluations") or []
    tokens = config.tokens
    ema = facts.get("weights", "ema") == "ema"
    rate = f" (rate {args['ema_rate']})" if args.get("ema_rate") is not None else ""
    weights = (f"EMA: the exponential moving average of the training weights{rate}" if ema else
               "the live training weights (the checkpoint held no EMA weights)")
    patch = f"{tokens.patch_size}x{tokens.patch_size}"
    tokenizer = ("MAR's KL-16 VAE" if tokens.tokenizer == "kl16" else "pixels") + \
        f" (stride {tokens.vae_stride}, {tokens.vae_embed_dim} features per position, {patch} patches)"
    text = [front_matter(config, args, license),
            f"# {name}\n",
            f"A class-conditional bi-level autoregressive image generator (ARINAR, {PAPER}): the `{config.family}` "
            f"outer model gives a condition per token and the `{config.head}` head writes the token. It loads with the "
            "`arinar` code (commands below).\n",
            _table([("family", f"{config.family} (preset {config.model})"), ("per-token head", config.head),
                    ("parameters", f"{num_params:,} ({_short(num_params)})"),
                    ("model.safetensors", f"{weights}"),
                    ("images", f"{tokens.img_size}x{tokens.img_size}, {tokens.img_channels} channel(s), "
                               f"{config.class_num} classes"),
                    ("tokenizer", tokenizer), ("license", license)]),
            "## Training\n"]
    unused = {"data_path", "cached_path"} - {data_source(args)}
    rows = [(label, _number(args[key])) for key, label in TRAINING
            if args.get(key) not in (None, "") and key not in unused]
    if facts.get("epoch") is not None:
        rows.append(("epochs completed", str(int(facts["epoch"]) + 1)))
    text.append(_table(rows) if rows else "The checkpoint recorded no training arguments.\n")
    text.append("## Evaluation\n")
    text.append(_evaluation_table(evaluations) if evaluations else
                "No evaluation of these exact weights was found in the run folder.\n")
    point = sampling_point(evaluations, args)
    setup = ["python -m util.io.download kl16  # the KL-16 tokenizer"] if tokens.tokenizer == "kl16" else []
    text += ["## Sampling\n",
             "A grid of 4 images per class (EMA weights, CUDA when present; the same seed gives the same images "
             "on the same device):\n",
             "```bash", *setup, sample_command(name, config, point), "```\n",
             "Evaluate (FID/IS need `--fid_stats`, precision/recall `--ref_batch`; images do not depend on the "
             "number of processes):\n",
             "```bash", evaluate_command(name, args, best(evaluations), point), "```\n",
             "In Python:\n",
             "```python", "from util.hub import from_pretrained",
             f"model = from_pretrained({json.dumps(str(name))})  # EMA weights, eval mode", "```\n",
             "## Files\n",
             "`config.json`: the model config (`models.config.ModelConfig`, read by `models.build`); "
             "`model.safetensors`: the weights (the run's arguments, epoch and evaluations are in its metadata); "
             "written by `python -m util.hub push`.\n"]
    return "\n".join(text)


def _evaluation_table(evaluations):
    scores = [k for k in SCORE_NAMES if any(k in e for e in evaluations)]
    settings = ("cfg", "temperature", "num_iter", "cfg_schedule", "cfg_sampler", "num_images", "seed", "weights")
    header = [SCORE_NAMES[k] for k in scores] + list(settings)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for e in evaluations:
        lines.append("| " + " | ".join(_number(e[k]) if k in e else "" for k in scores + list(settings)) + " |")
    return ("Scores of these exact weights (the evaluation recorded their sha256), one row per setting:\n\n"
            + "\n".join(lines) + "\n")

"""Every command in the READMEs' shell blocks parses with today's flags: main_mar.py, sample.py, main_cache.py
and the benchmarks (a renamed or dropped flag, a family or head flag on the wrong model, a choice that is
gone, all fail here before a user copies the line). A new main_mar.py run also builds its model's config."""
import importlib
import re
import shlex

import pytest

from tests.conftest import REPO

READMES = ("README.md", "bench/README.md")
PLACEHOLDER = re.compile(r"\$\{?\w+\}?|<[^>]*>")  # ${OUTPUT_DIR}, <time>: values, not flags
OPTIONAL = re.compile(r"(?<!\S)\[|\](?!\S)")  # [--save_dir DIR]: an optional part, parsed as given


def shell_lines(text):
    """The lines of the ```bash blocks, continuations joined (commands() drops the comments)."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        lines += [line for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    return lines


def commands():
    """pytest params (script, argv), named by README and line, of each command that runs an entry point."""
    found = []
    for readme in READMES:
        for line in shell_lines((REPO / readme).read_text()):
            words = shlex.split(OPTIONAL.sub("", PLACEHOLDER.sub("VALUE", line)), comments=True)
            for i, word in enumerate(words):
                script = (word if word in ("main_mar.py", "sample.py", "main_cache.py")
                          else words[i + 1] if word == "-m" and words[i + 1].startswith("bench.") else None)
                if script:
                    argv = [w for w in words[i + (2 if word == "-m" else 1):] if w not in ("...", "&")]
                    found.append(pytest.param(script, argv, id=f"{readme}: {line.strip()[:80]}"))
                    break
    return found


def parser_of(script):
    """What parses the script's flags: its argparse parser, or a benchmark module (its parse_args(argv))."""
    if script == "main_mar.py":
        return importlib.import_module("main_mar").get_args_parser()
    if script == "sample.py":
        return importlib.import_module("sample").get_parser()
    if script == "main_cache.py":
        return importlib.import_module("main_cache").get_args_parser()
    return importlib.import_module(script)


def test_the_readmes_have_commands_of_every_entry_point():
    scripts = {p.values[0] for p in commands()}
    assert {"main_mar.py", "sample.py", "main_cache.py", "bench.bench_sampling", "bench.bench_families",
            "bench.bench_train", "bench.bench_heads"} <= scripts


@pytest.mark.parametrize("script, argv", commands())
def test_readme_command_parses(script, argv, capsys):
    parser = parser_of(script)
    try:
        args = parser.parse_args(argv)
    except SystemExit:
        pytest.fail(f"{script} {' '.join(argv)}: {capsys.readouterr().err.strip().splitlines()[-1]}")
    if script == "main_mar.py" and not args.resume:
        from main_mar import model_config, resolve_args
        model_config(resolve_args(args), None)  # the preset exists and every model flag applies to it


def test_the_demo_editing_commands_edit_a_file_the_demo_writes():
    """The repo ships no digit to edit: each README command that edits a `make demo` run's model takes one of that
    run's own samples, a glob that matches exactly one of the files the run's evaluations write."""
    import fnmatch
    import os

    from main_mar import get_args_parser
    from tests.test_demo import demo_flags
    from util.evaluation.eval_folder import folder_name, png_path
    found = 0
    for line in shell_lines((REPO / "README.md").read_text()):
        words = shlex.split(line.replace("<time>", "20261205-061344"), comments=True)
        if "sample.py" not in words or "--edit" not in words:
            continue
        run = words[words.index("--ckpt") + 1]
        match = re.fullmatch(r"output_dir/demo(?:-(causal|scalewise))?-20261205-061344", run)
        if not match:
            continue
        args = get_args_parser().parse_args(demo_flags(match.group(1) or "mar"))
        written = [png_path(os.path.join(run, folder_name(epoch, dict(
                       num_iter=args.num_iter, cfg=cfg, cfg_schedule=args.cfg_schedule, num_images=args.num_images,
                       temperature=args.temperature_list[0], eval_weights=args.eval_weights)), "images"), i)
                   for epoch in (0, args.epochs - 1) for cfg in (1.0, args.cfg_list[0]) for i in (0, 1)]
        edit = words[words.index("--edit") + 1]
        assert len(fnmatch.filter(written, edit)) == 1, (edit, written)
        found += 1
    assert found == 3  # the mar, causal and scale-wise demos


def test_the_readme_make_backend_call_runs_on_a_cpu_model():
    """The README's `make_backend(...)` line, said to fall back to eager off CUDA, runs as written on a CPU model
    (compile=True would raise there: --compile needs CUDA)."""
    from models import create_model
    from sampling import EagerBackend, make_backend
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    calls = [line.split("=", 1)[1].split("#")[0].strip() for block in blocks for line in block.splitlines()
             if re.match(r"backend = make_backend\(", line)]
    assert calls
    model = create_model("mar_tiny")
    for call in calls:
        assert isinstance(eval(call, {"make_backend": make_backend, "model": model}), EagerBackend), call

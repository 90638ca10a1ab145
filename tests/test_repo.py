"""Repository hygiene: pinned dependencies agree, CI calls the README's test command, `make demo` resumes."""
import re
import shlex
import subprocess

from tests.conftest import REPO


def pins(text):
    return dict(re.findall(r"^[\s-]*([A-Za-z0-9_.\-]+)==([^\s#]+)", text, flags=re.M))


def test_requirements_and_environment_agree():
    req = pins((REPO / "requirements.txt").read_text())
    env = pins((REPO / "environment.yaml").read_text())
    assert req and req == env
    assert req["torch"] == "2.14.1" and req["torchvision"] == "0.29.1"
    for name in ("numpy", "scipy", "pillow", "torch-fidelity", "tqdm", "tensorboard", "safetensors", "huggingface_hub",
                 "pytest"):
        assert name in req, name


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test" in readme and re.search(r"^make test$", ci, flags=re.M)


def test_no_bare_cuda_calls():
    bare = ".cuda" + "()"  # split so this file does not match itself
    offenders = [str(p.relative_to(REPO)) for p in REPO.rglob("*.py")
                 if ".venv" not in p.parts and bare in p.read_text()]
    assert offenders == []


def demo_recipe(*variables):
    """What `make demo` would run (a dry run; setup not redone), as lines of words with $run in place."""
    out = subprocess.run(["make", "-n", "--no-print-directory", "-o", ".venv/.installed-requirements", "demo",
                          *variables], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [shlex.split(line.rstrip(" &\\")) for line in out.stdout.splitlines() if line.strip()]


def test_make_demo_run_resumes_that_run_then_checks_editing():
    """`make demo RUN=<folder>` continues an interrupted demo in its own folder, with the family its name
    gives; `make demo` alone starts a new timestamped run."""
    setup, train, edit, last = demo_recipe("RUN=output_dir/demo-causal-20261205-064417/")
    assert setup == ["run=output_dir/demo-causal-20261205-064417"]
    assert train[train.index("--output_dir") + 1] == "$run" and train[train.index("--resume") + 1] == "$run"
    assert train[train.index("--family") + 1] == "causal" and train[train.index("--model") + 1] == "causal_tiny"
    assert edit[-3:] == ["demo_edit.py", "--ckpt", "$run/checkpoint-last.pth"]
    assert last == ["echo", "demo run folder: $run"]  # the console's last line names the run
    _, train, _, _ = demo_recipe("RUN=output_dir/demo-20261205-064417")
    assert train[train.index("--family") + 1] == "mar" and "--resume" in train
    setup, train, _, _ = demo_recipe()
    assert setup[0].startswith("run=output_dir/demo-$(date") and "--resume" not in train
    # its checkpoint file names the run too; a name without a family is MAR's (not "--family run")
    setup, train, _, _ = demo_recipe("RUN=output_dir/demo-scalewise-20261205-064417/checkpoint-last.pth")
    assert setup == ["run=output_dir/demo-scalewise-20261205-064417"]
    assert train[train.index("--family") + 1] == "scalewise"
    _, train, _, _ = demo_recipe("RUN=runs/my-run")
    assert train[train.index("--family") + 1] == "mar"

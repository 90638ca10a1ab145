"""Repository hygiene: pinned dependencies agree, CI calls the README's test command."""
import re

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

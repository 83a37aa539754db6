"""Models named by Hugging Face id: `org/name` (an HF folder: config, safetensors, tokenizer),
`org/name/file.gguf` (one file of the repo), either with `@revision` (branch, tag or commit).

Files come through `huggingface_hub` into its cache ($HF_HOME / $HF_HUB_CACHE, default
~/.cache/huggingface/hub) and are reused from there; a private or gated repo takes the token
from $HF_TOKEN (or `huggingface-cli login`). Offline ($HF_HUB_OFFLINE=1, or the Hub unreachable)
an id resolves from what the cache already holds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# What the loaders read from an HF folder; nothing else of the repo is downloaded.
FOLDER_FILES = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
]

_ID = re.compile(
    r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:/(?P<file>[^@]+))?(?:@(?P<revision>[^@]+))?"
)


@dataclass(frozen=True)
class HubModel:
    repo_id: str
    filename: str | None = None  # one file (a GGUF); None: the HF folder
    revision: str | None = None  # None: the default branch

    def __str__(self) -> str:
        name = f"{self.repo_id}/{self.filename}" if self.filename else self.repo_id
        return f"{name}@{self.revision}" if self.revision else name


def parse_hub_id(name: str) -> HubModel | None:
    """The Hub model `name` denotes, or None when it cannot be one (e.g. an absolute path)."""
    m = _ID.fullmatch(name)
    if m is None or name.startswith((".", "~")):
        return None
    return HubModel(m["repo"], m["file"], m["revision"])


def fetch(model: HubModel) -> Path:
    """The local path of `model` (downloaded on first use, then from the cache). Raises
    FileNotFoundError saying what was tried when neither the Hub nor the cache has it."""
    try:
        import huggingface_hub
        from huggingface_hub import errors
    except ImportError:
        raise FileNotFoundError(
            f"{model} looks like a Hugging Face id, but huggingface_hub is not installed "
            "(pip install huggingface_hub), and no such local path exists"
        ) from None

    def get(local_only: bool) -> Path:
        if model.filename:
            return Path(huggingface_hub.hf_hub_download(
                model.repo_id, model.filename, revision=model.revision,
                local_files_only=local_only))  # fmt: skip
        return Path(huggingface_hub.snapshot_download(
            model.repo_id, revision=model.revision, allow_patterns=FOLDER_FILES,
            local_files_only=local_only))  # fmt: skip

    # The Hub answered: no such repo, revision or file (not "not in the cache, offline").
    not_there = (errors.RepositoryNotFoundError, errors.RevisionNotFoundError,
                 errors.EntryNotFoundError, errors.GatedRepoError)  # fmt: skip
    try:
        path = get(local_only=False)
    except Exception as online:
        if isinstance(online, not_there) and not isinstance(online, errors.LocalEntryNotFoundError):
            raise FileNotFoundError(f"{model}: {_first_line(online)}") from None
        try:  # offline, or the Hub unreachable: what the cache holds
            path = get(local_only=True)
        except Exception:
            raise FileNotFoundError(
                f"model {model} is neither a local path nor in the Hugging Face cache, and the "
                f"Hub could not be asked ({_first_line(online)}); download it once with "
                "network access, or set HF_TOKEN for a private or gated repo"
            ) from None
    if not model.filename and not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{model} has no config.json (not an HF model folder); for a GGUF repo name the "
            f"file: {model.repo_id}/FILE.gguf"
        )
    return path


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]

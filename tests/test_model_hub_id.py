"""Models named by Hugging Face id (`--model org/name`), offline, from a Hugging Face cache the
test lays out itself: the id resolves to the cached snapshot (default branch, another branch, a
commit, one GGUF file of a repo), an unknown id fails saying what was tried, and both services
and `kuiper generate --local` serve the model by id exactly as by its path."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from servers import kuiper_command, server_env
from serving_stack import run_stack, tiny_model  # noqa: F401  (fixture)

SHA_MAIN, SHA_V2, SHA_GGUF = "a" * 40, "b" * 40, "c" * 40


def _snapshot(cache: Path, repo: str, sha: str, files: list[Path], refs: tuple[str, ...]) -> Path:
    """The layout huggingface_hub writes: models--ORG--NAME/{refs/REF, snapshots/SHA/FILES}."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / sha
    snap.mkdir(parents=True)
    for f in files:
        shutil.copy(f, snap / f.name)
    (root / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (root / "refs" / ref).write_text(sha)
    return snap


@pytest.fixture(scope="module")
def hub_cache(tiny_model, tmp_path_factory) -> dict:  # noqa: F811
    cache = tmp_path_factory.mktemp("hf") / "hub"
    files = sorted(p for p in tiny_model.iterdir() if p.is_file())
    main = _snapshot(cache, "kuiper-test/tiny", SHA_MAIN, files, ("main",))
    v2 = _snapshot(cache, "kuiper-test/tiny", SHA_V2, files, ("v2",))
    gguf_src = tmp_path_factory.mktemp("gguf") / "model.gguf"
    gguf_src.write_bytes(b"GGUF")  # resolution only: nothing loads it
    gguf = _snapshot(cache, "kuiper-test/tiny-gguf", SHA_GGUF, [gguf_src], ("main",))
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    return {"cache": cache, "main": main, "v2": v2, "gguf": gguf / "model.gguf", "env": env}


RESOLVE = """
import json, sys
from kuiper_serve.common.model_source import resolve_model
out = {}
for name in sys.argv[1:]:
    try:
        out[name] = str(resolve_model(name))
    except FileNotFoundError as exc:
        out[name] = "error: " + str(exc)
print(json.dumps(out))
"""


def test_ids_resolve_to_the_cached_snapshots(hub_cache) -> None:
    names = ["kuiper-test/tiny", "kuiper-test/tiny@v2", f"kuiper-test/tiny@{SHA_MAIN}",
             "kuiper-test/tiny-gguf/model.gguf", "kuiper-test/missing", "kuiper-test/tiny@nope"]  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", RESOLVE, *names], capture_output=True,
                          text=True, env=server_env(hub_cache["env"]), timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["kuiper-test/tiny"] == str(hub_cache["main"])
    assert got["kuiper-test/tiny@v2"] == str(hub_cache["v2"])
    assert got[f"kuiper-test/tiny@{SHA_MAIN}"] == str(hub_cache["main"])
    assert got["kuiper-test/tiny-gguf/model.gguf"] == str(hub_cache["gguf"])
    for missing in ("kuiper-test/missing", "kuiper-test/tiny@nope"):
        assert got[missing].startswith(f"error: model {missing} is neither a local path nor in "
                                       "the Hugging Face cache"), got[missing]  # fmt: skip


def test_a_local_path_wins_over_an_id(tmp_path: Path) -> None:
    from kuiper_serve.common.hf_hub import parse_hub_id
    from kuiper_serve.common.model_source import resolve_model

    folder = tmp_path / "org" / "name"
    folder.mkdir(parents=True)
    assert parse_hub_id("org/name") is not None
    assert parse_hub_id("/abs/path") is None and parse_hub_id("./org/name") is None
    assert str(parse_hub_id("org/name/sub/f.gguf@v1")) == "org/name/sub/f.gguf@v1"
    assert resolve_model(folder) == folder


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_both_services_and_local_generate_serve_a_model_by_id(
    hub_cache,
    tiny_model,  # noqa: F811
    monkeypatch,
) -> None:
    from kuiper_client import KuiperClient

    args = ["generate", "--local", "--temperature", "0", "--max-new-tokens", "8",
            "--ignore-eos", "--json", "hello world"]  # fmt: skip
    env = server_env(hub_cache["env"])

    def local(model: str) -> dict:
        proc = subprocess.run(kuiper_command(*args, "--model", model), capture_output=True,
                              text=True, env=env, timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    by_path, by_id = local(str(tiny_model)), local("kuiper-test/tiny")
    assert by_id["token_ids"] == by_path["token_ids"] and len(by_id["token_ids"]) == 8

    for key, value in hub_cache["env"].items():
        monkeypatch.setenv(key, value)  # run_stack's servers inherit this environment
    with run_stack(Path("kuiper-test/tiny")) as stack, KuiperClient(stack.address, timeout=60,
              tokenizer_address=stack.tokenizer.address) as client:  # fmt: skip
        assert client.model_info().model == str(hub_cache["main"])
        assert client.tokenizer_info().source.startswith(str(hub_cache["main"]))
        done = client.complete("hello world", max_new_tokens=8, temperature=0.0, ignore_eos=True)
    assert done.token_ids == by_path["token_ids"]

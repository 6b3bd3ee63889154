"""charts/emgate: strict lint, schema and rendered manifests, offline (Helm v4 through helm-python-sdk,
Kubernetes 1.30 schemas through kubernetes-validate)."""

from __future__ import annotations

import configparser
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

helm = pytest.importorskip("helm_python")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

KUBE_VERSION = "1.30.0"
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "Job"}
# an Ed25519 public key (the pattern the schema asks for; the chart only copies it into a ConfigMap)
APPROVER_PEM = """-----BEGIN PUBLIC KEY-----
MCowBQYDK2VwAyEATYjjXBAQMqg/LNWp2dwDG+wK+4BYDvw4WpXpmV0teg4=
-----END PUBLIC KEY-----
"""

# everything switched on: in-chart PostgreSQL, S3 artifacts, basic auth, the judge, an inline recipe, extra hosts,
# the alias guard with approvers' override keys and its two Secrets apart
FULL: dict[str, Any] = {
    "imagePullSecrets": ["regcred"],
    "mlflow": {
        "backend": "postgresql",
        "replicas": 2,
        "artifactRoot": "s3://emgate-artifacts/mlflow",
        "s3": {"endpointUrl": "http://minio.minio.svc.cluster.local:9000", "region": "us-east-1"},
        "allowedHosts": ["mlflow.example.com"],
        "auth": {"enabled": True},
    },
    "postgresql": {"generatePassword": True},
    "schedule": {
        "enabled": True,
        "recipeYaml": "name: team-gate\nseeds: [0, 1]\n",
        "mode": "gate-newest",
        "cron": "0 30 2 * * 1-5",
        "kfpProfileNamespace": "team-ml",
    },
    "judge": {
        "enabled": True,
        "nodeSelector": {"nvidia.com/gpu.present": "true"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "hfTokenSecret": {"name": "hf-token", "key": "token"},
        "apiKeySecret": {"name": "judge-api-key", "key": "api-key"},
    },
    "aliasGuard": {
        "port": 9090,
        "replicas": 2,
        "webhookSecret": {"name": "guard-hmac", "key": "hmac"},
        "encryptionKeySecret": {"name": "mlflow-webhook-key", "key": "fernet"},
        "overridePublicKeys": [APPROVER_PEM],
    },
    "networkPolicy": {
        "mlflowExtraFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}]
    },
}
VALUE_SETS = {"default": {}, "full": FULL}


def chart_dir(repo: Path) -> Path:
    return repo / "charts" / "emgate"


def render(repo: Path, values: dict, name: str = "emgate", namespace: str = "emgate") -> dict[str, list[dict]]:
    from helm_python.chart import Chart

    out = Chart.load(str(chart_dir(repo))).render(values, name=name, namespace=namespace, is_install=True)
    return {Path(k).name: [d for d in yaml.safe_load_all(v) if d] for k, v in out.items() if k.endswith(".yaml")}


def render_notes(repo: Path, values: dict) -> str:
    from helm_python.chart import Chart

    out = Chart.load(str(chart_dir(repo))).render(values, name="emgate", namespace="emgate", is_install=True)
    return next(v for k, v in out.items() if k.endswith("NOTES.txt"))


def all_docs(docs: dict[str, list[dict]]) -> list[dict]:
    return [d for ds in docs.values() for d in ds]


def find(docs: dict[str, list[dict]], kind: str, name: str) -> dict:
    matches = [d for d in all_docs(docs) if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} rendered"
    return matches[0]


def kinds(docs: dict[str, list[dict]]) -> set[tuple[str, str]]:
    return {(d["kind"], d["metadata"]["name"]) for d in all_docs(docs)}


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def schema_error(repo: Path, values: dict) -> str:
    with pytest.raises(helm.HelmError) as err:
        render(repo, values)
    return str(err.value)


# --- the existing contract: lint, the service name recipes use, the external DSN, refused values -------------


def test_chart_lints_strict(repo: Path) -> None:
    result = helm.lint(str(chart_dir(repo)), strict=True)
    assert result["errors"] == []
    assert [m for m in result["messages"] if m["severity"] > 1] == []


@pytest.mark.parametrize("values_name", sorted(VALUE_SETS))
def test_chart_lints_strict_against_kubernetes_1_30(repo: Path, values_name: str) -> None:
    result = helm.lint(str(chart_dir(repo)), VALUE_SETS[values_name], strict=True, kube_version=f"v{KUBE_VERSION}")
    assert result["total_charts_linted"] == 1
    assert result["errors"] == []
    assert [m for m in result["messages"] if m["severity"] > 1] == []


def test_lint_reports_a_bad_value(repo: Path) -> None:
    result = helm.lint(str(chart_dir(repo)), {"schedule": {"cron": "0 3 * * *"}}, strict=True, kube_version=f"v{KUBE_VERSION}")
    assert any("/schedule/cron" in e for e in result["errors"])


def test_mlflow_server_renders_with_service_name_that_recipes_use(repo: Path) -> None:
    docs = render(repo, {})
    deployment = docs["mlflow-deployment.yaml"][0]
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--backend-store-uri=sqlite:////mlflow/mlflow.db" in args
    allowed = next(a for a in args if a.startswith("--allowed-hosts="))
    assert "emgate-mlflow.emgate.svc.cluster.local" in allowed
    assert docs["mlflow-service.yaml"][0]["metadata"]["name"] == "emgate-mlflow"
    paper = yaml.safe_load((repo / "pipelines" / "recipes" / "paper.yaml").read_text())
    assert paper["mlflow"]["tracking_uri"].startswith("http://emgate-mlflow.emgate.svc.cluster.local:")


def test_external_backend_reads_the_dsn_from_a_secret(repo: Path) -> None:
    docs = render(repo, {"mlflow": {"backend": "external", "replicas": 2}})
    container = docs["mlflow-deployment.yaml"][0]["spec"]["template"]["spec"]["containers"][0]
    assert "--backend-store-uri=$(MLFLOW_BACKEND_DSN)" in container["args"]
    assert container["env"][0]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-db", "key": "dsn"}
    assert not any(d["kind"] == "StatefulSet" for d in all_docs(docs))  # no in-chart database


def test_bad_values_are_refused(repo: Path) -> None:
    with pytest.raises(helm.HelmError):
        render(repo, {"mlflow": {"replicas": 2}})  # SQLite cannot be shared between pods
    with pytest.raises(helm.HelmError):
        render(repo, {"mlflow": {"backend": "postgres"}})  # not in the schema


# --- every rendered manifest is valid Kubernetes 1.30, and every pod is locked down ---------------------------


@pytest.mark.parametrize("values_name", sorted(VALUE_SETS))
def test_every_manifest_validates_strict_against_kubernetes_1_30(repo: Path, values_name: str) -> None:
    docs = all_docs(render(repo, VALUE_SETS[values_name]))
    assert len(docs) >= 8
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:  # pragma: no cover - the message is the point
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {e.message}")


def test_kubernetes_validate_is_strict(repo: Path) -> None:
    """The validation above would catch a misspelt field (strict mode rejects unknown properties)."""
    doc = find(render(repo, {}), "Deployment", "emgate-mlflow")
    pod_spec(doc)["containers"][0]["securityContex"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


@pytest.mark.parametrize("values_name", sorted(VALUE_SETS))
def test_every_container_is_hardened_and_has_resources(repo: Path, values_name: str) -> None:
    workloads = [d for d in all_docs(render(repo, VALUE_SETS[values_name])) if d["kind"] in WORKLOAD_KINDS]
    expected = 4 if values_name == "default" else 6  # mlflow + schedule + alias guard + its Job (+ postgres + judge)
    assert len(workloads) == expected
    checked = 0
    for workload in workloads:
        spec = pod_spec(workload)
        where = f"{workload['kind']}/{workload['metadata']['name']}"
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert spec["automountServiceAccountToken"] is False, where
        assert spec["serviceAccountName"].startswith("emgate-"), where
        mounts_tmp = False
        for container in spec.get("initContainers", []) + spec["containers"]:
            name = f"{where}:{container['name']}"
            resources = container["resources"]
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources[part]), f"{name} {part}"
            sc = container["securityContext"]
            assert sc["runAsNonRoot"] is True, name
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["capabilities"]["drop"] == ["ALL"], name
            assert "add" not in sc["capabilities"], name
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, name
            mounts_tmp |= any(m["mountPath"] == "/tmp" for m in container.get("volumeMounts", []))
            checked += 1
        # a read-only root needs a writable /tmp for the apps that write there
        assert mounts_tmp, f"{where}: no writable /tmp"
        volumes = {v["name"]: v for v in spec["volumes"]}
        tmp_volume = next(m["name"] for c in spec["containers"] for m in c["volumeMounts"] if m["mountPath"] == "/tmp")
        assert "emptyDir" in volumes[tmp_volume], where
    assert checked >= expected


def test_service_accounts_mount_no_api_token_and_no_cluster_wide_rbac(repo: Path) -> None:
    docs = render(repo, FULL)
    accounts = [d for d in all_docs(docs) if d["kind"] == "ServiceAccount"]
    assert {a["metadata"]["name"] for a in accounts} == {
        "emgate-mlflow",
        "emgate-postgres",
        "emgate-judge",
        "emgate-schedule",
        "emgate-alias-guard",
        "emgate-alias-guard-register",
    }
    # every workload runs as one of them (hook Jobs too: the accounts are plain resources, there before the hooks)
    assert not any("helm.sh/hook" in a["metadata"].get("annotations", {}) for a in accounts)
    for workload in (d for d in all_docs(docs) if d["kind"] in WORKLOAD_KINDS):
        assert pod_spec(workload)["serviceAccountName"] in {a["metadata"]["name"] for a in accounts}
    assert all(a["automountServiceAccountToken"] is False for a in accounts)
    rbac = [d for d in all_docs(docs) if d["apiVersion"].startswith("rbac.authorization.k8s.io/")]
    assert {d["kind"] for d in rbac} == {"Role", "RoleBinding"}  # nothing cluster-wide
    role = find(docs, "Role", "emgate-schedule")
    assert role["metadata"]["namespace"] == "team-ml"
    assert {g for rule in role["rules"] for g in rule["apiGroups"]} == {"pipelines.kubeflow.org"}
    assert not any("*" in rule["verbs"] or "*" in rule["resources"] for rule in role["rules"])
    binding = find(docs, "RoleBinding", "emgate-schedule")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "emgate-schedule", "namespace": "emgate"}]
    # single-user KFP (the default): the hook Job gets no Role at all
    assert not any(d["apiVersion"].startswith("rbac.") for d in all_docs(render(repo, {})))


# --- the hook Job that registers the pipeline and its recurring run -------------------------------------------


def test_hook_job_runs_emgate_schedule_with_a_six_field_cron(repo: Path) -> None:
    docs = render(repo, {})
    job = find(docs, "Job", "emgate-schedule")
    annotations = job["metadata"]["annotations"]
    assert set(annotations["helm.sh/hook"].split(",")) == {"post-install", "post-upgrade"}
    assert annotations["helm.sh/hook-delete-policy"] == "before-hook-creation"
    spec = pod_spec(job)
    container = spec["containers"][0]
    assert container["image"] == "ghcr.io/emgate/emgate-gate:0.1.0"  # registry default + chart appVersion
    command = container["command"]
    assert command[:3] == ["emgate", "schedule", "/opt/emgate/pipelines/recipes/paper.yaml"]
    flags = dict(zip(command[3::2], command[4::2], strict=True))
    assert flags["--host"] == "http://ml-pipeline.kubeflow.svc.cluster.local:8888"
    assert flags["--experiment"] == "emgate"
    assert flags["--mode"] == "retrain"
    assert flags["--cron"] == "0 0 3 * * *"
    assert "--namespace" not in flags  # single-user KFP
    assert len(flags["--cron"].split()) == 6

    # KFP auth: a projected token with the pipelines audience, where kfp.Client looks for it
    env = env_of(container)
    token_path = env["KF_PIPELINES_SA_TOKEN_PATH"]["value"]
    assert token_path == "/var/run/secrets/kubeflow/pipelines/token"
    mount = next(m for m in container["volumeMounts"] if token_path.startswith(m["mountPath"] + "/"))
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    source = volume["projected"]["sources"][0]["serviceAccountToken"]
    assert source["audience"] == "pipelines.kubeflow.org"
    assert f"{mount['mountPath']}/{source['path']}" == token_path
    assert env["MLFLOW_TRACKING_URI"]["value"] == "http://emgate-mlflow.emgate.svc.cluster.local:5000"
    assert spec["restartPolicy"] == "Never"


def test_hook_job_uses_an_inline_recipe_from_a_configmap(repo: Path) -> None:
    docs = render(repo, FULL)
    job = find(docs, "Job", "emgate-schedule")
    container = pod_spec(job)["containers"][0]
    assert container["command"][2] == "/etc/emgate/recipe.yaml"
    assert container["command"][container["command"].index("--mode") + 1] == "gate-newest"
    assert container["command"][container["command"].index("--cron") + 1] == "0 30 2 * * 1-5"
    assert container["command"][container["command"].index("--namespace") + 1] == "team-ml"  # the profile namespace
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/etc/emgate")
    volume = next(v for v in pod_spec(job)["volumes"] if v["name"] == mount["name"])
    configmap = find(docs, "ConfigMap", volume["configMap"]["name"])
    assert "helm.sh/hook" not in configmap["metadata"].get("annotations", {})  # exists before the hook runs
    assert yaml.safe_load(configmap["data"]["recipe.yaml"]) == {"name": "team-gate", "seeds": [0, 1]}


def test_schedule_can_be_disabled(repo: Path) -> None:
    rendered = kinds(render(repo, {"schedule": {"enabled": False}}))
    assert not any(kind == "Role" or name.endswith("-schedule") for kind, name in rendered)
    assert {name for kind, name in rendered if kind == "Job"} == {"emgate-alias-guard-register"}
    assert ("Deployment", "emgate-mlflow") in rendered


# --- the schema refuses bad values and names the field ---------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"schedule": {"cron": "0 3 * * *"}}, "/schedule/cron"),  # 5 fields: crontab, not KFP's format
        ({"schedule": {"cron": "0 0 3 * * * *"}}, "/schedule/cron"),
        ({"schedule": {"crontab": "0 0 3 * * *"}}, "crontab"),  # unknown key
        ({"judge": {"gpu": 1}}, "'gpu'"),
        ({"shedule": {}}, "shedule"),
        ({"schedule": {"mode": "nightly"}}, "/schedule/mode"),  # bad enum
        ({"mlflow": {"auth": {"defaultPermission": "EDIT"}}}, "/mlflow/auth/defaultPermission"),
        ({"modelCache": {"accessMode": "ReadWriteSometimes"}}, "/modelCache/accessMode"),
        ({"judge": {"revision": "main"}}, "/judge/revision"),
        ({"mlflow": {"artifactRoot": "gs://bucket"}}, "/mlflow/artifactRoot"),
        ({"aliasGuard": {"prot": 8080}}, "'prot'"),  # unknown key
        ({"aliasGuard": {"webhookSecret": {"name": "emgate-webhook", "value": "s3cret"}}}, "'value'"),  # no literal secret
        ({"aliasGuard": {"registration": {"retries": 3}}}, "'retries'"),
        ({"aliasGuard": {"port": 80}}, "/aliasGuard/port"),  # non-root without capabilities
        ({"aliasGuard": {"overridePublicKeys": ["ssh-ed25519 AAAA"]}}, "/aliasGuard/overridePublicKeys/0"),
    ],
)
def test_schema_refuses_bad_values_naming_the_field(repo: Path, values: dict, field: str) -> None:
    message = schema_error(repo, values)
    assert field in message, message


def test_schema_forbids_additional_properties_everywhere(repo: Path) -> None:
    import json

    schema = json.loads((chart_dir(repo) / "values.schema.json").read_text())
    open_objects: list[str] = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node and node.get("additionalProperties") is not False:
                open_objects.append(path)
            for key, child in node.items():
                walk(child, f"{path}/{key}")
        elif isinstance(node, list):
            for i, child in enumerate(node):
                walk(child, f"{path}/{i}")

    walk(schema, "")
    assert open_objects == []
    assert schema["additionalProperties"] is False
    # and the defaults themselves satisfy it (lint covers the rest)
    from helm_python.chart import Chart

    Chart.load(str(chart_dir(repo))).validate_schema({})


def test_every_values_key_is_documented(repo: Path) -> None:
    lines = (chart_dir(repo) / "values.yaml").read_text().splitlines()
    undocumented = []
    key_line = re.compile(r"^(\s*)([A-Za-z][A-Za-z0-9]*):")  # chart keys are camelCase; label keys have dots or slashes
    for i, line in enumerate(lines):
        if key_line.match(line):
            above = lines[i - 1].strip() if i else ""
            if not above.startswith("#"):
                undocumented.append(line.strip())
    assert undocumented == []


# --- secrets are referenced, never rendered from defaults --------------------------------------------------------

CREDENTIAL = re.compile(r"USERNAME|PASSWORD|SECRET|ACCESS_KEY|TOKEN$|API_KEY|DSN")


@pytest.mark.parametrize("values_name", sorted(VALUE_SETS))
def test_credentials_come_from_secret_key_refs(repo: Path, values_name: str) -> None:
    docs = render(repo, VALUE_SETS[values_name])
    credential_vars = 0
    for workload in (d for d in all_docs(docs) if d["kind"] in WORKLOAD_KINDS):
        spec = pod_spec(workload)
        for container in spec.get("initContainers", []) + spec["containers"]:
            for name, var in env_of(container).items():
                if not CREDENTIAL.search(name):
                    continue
                credential_vars += 1
                if "value" in var:
                    # only composed from other secretKeyRef variables, e.g. the in-chart database's DSN
                    refs = re.findall(r"\$\((\w+)\)", var["value"])
                    assert refs, f"{name} has a literal value"
                    assert all("secretKeyRef" in env_of(container)[r]["valueFrom"] for r in refs), name
                else:
                    assert set(var["valueFrom"]) == {"secretKeyRef"}, name
    # default: MLflow's admin and Flask key, its webhook encryption key, and the guard's and its Job's admin and HMAC
    assert credential_vars == (10 if values_name == "default" else 19), credential_vars


def test_default_values_render_no_secret_and_no_secret_values(repo: Path) -> None:
    docs = all_docs(render(repo, {}))
    assert [d for d in docs if d["kind"] == "Secret"] == []
    values_text = (chart_dir(repo) / "values.yaml").read_text()
    assert not re.search(r"(?im)^\s*(password|secretAccessKey|token|dsn):\s*\S", values_text)


def test_generated_postgres_password_is_opt_in_and_kept(repo: Path) -> None:
    with_user_secret = render(repo, {"mlflow": {"backend": "postgresql"}})
    assert not any(d["kind"] == "Secret" for d in all_docs(with_user_secret))
    generated = [d for d in all_docs(render(repo, FULL)) if d["kind"] == "Secret"]
    assert len(generated) == 1
    secret = generated[0]
    assert secret["metadata"]["name"] == "emgate-postgres"
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    import base64

    password = base64.b64decode(secret["data"]["password"]).decode()
    assert re.fullmatch(r"[A-Za-z0-9]{32}", password)  # URL-safe: it goes into the DSN


# --- MLflow: PostgreSQL, S3, basic auth --------------------------------------------------------------------------


def test_mlflow_with_postgres_s3_and_basic_auth(repo: Path) -> None:
    docs = render(repo, FULL)
    deployment = find(docs, "Deployment", "emgate-mlflow")
    assert deployment["spec"]["replicas"] == 2
    container = pod_spec(deployment)["containers"][0]
    args = container["args"]
    assert "--backend-store-uri=$(MLFLOW_BACKEND_DSN)" in args
    assert "--artifacts-destination=s3://emgate-artifacts/mlflow" in args
    assert "--serve-artifacts" in args
    assert "--app-name=basic-auth" in args
    allowed = next(a for a in args if a.startswith("--allowed-hosts=")).split("=", 1)[1].split(",")
    # MLflow compares the whole Host header, port included
    assert {"mlflow.example.com", "emgate-mlflow.emgate.svc.cluster.local:*", "localhost:*"} <= set(allowed)
    env = env_of(container)
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {"name": "emgate-s3", "key": "access-key-id"}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "emgate-s3", "key": "secret-access-key"}
    assert env["MLFLOW_S3_ENDPOINT_URL"]["value"] == "http://minio.minio.svc.cluster.local:9000"
    for var, key in [("MLFLOW_AUTH_ADMIN_USERNAME", "username"), ("MLFLOW_AUTH_ADMIN_PASSWORD", "password")]:
        assert env[var]["valueFrom"]["secretKeyRef"] == {"name": "emgate-mlflow-auth", "key": key}
    assert "secretKeyRef" in env["MLFLOW_FLASK_SERVER_SECRET_KEY"]["valueFrom"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}

    # the DSN points at the in-chart PostgreSQL Service, and only S3 holds artifacts: no MLflow volume
    postgres_service = find(docs, "Service", "emgate-postgres")
    assert f"@{postgres_service['metadata']['name']}.emgate.svc.cluster.local:5432/mlflow" in env["MLFLOW_BACKEND_DSN"]["value"]
    assert not any(d["kind"] == "PersistentVolumeClaim" and d["metadata"]["name"] == "emgate-mlflow" for d in all_docs(docs))
    statefulset = find(docs, "StatefulSet", "emgate-postgres")
    pg = pod_spec(statefulset)["containers"][0]
    assert re.fullmatch(r"postgres:16\.\d+-alpine", pg["image"])
    assert env_of(pg)["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "emgate-postgres", "key": "password"}
    assert statefulset["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "20Gi"


def test_mlflow_auth_ini_from_configmap_gives_only_the_admin_write_access(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run the init container's script on the rendered ConfigMap and read the result with MLflow's own parser."""
    docs = render(repo, FULL)
    configmap = find(docs, "ConfigMap", "emgate-mlflow-auth")
    template = configmap["data"]["basic_auth.ini"]
    assert "admin_password" not in template and "admin_username" not in template
    deployment = find(docs, "Deployment", "emgate-mlflow")
    spec = pod_spec(deployment)
    init = next(c for c in spec["initContainers"] if c["name"] == "auth-config")
    mlflow = spec["containers"][0]
    config_path = env_of(mlflow)["MLFLOW_AUTH_CONFIG_PATH"]["value"]
    # the rendered ini lives in an in-memory emptyDir written by the init container and read by the server
    rendered_mount = next(m for m in mlflow["volumeMounts"] if config_path.startswith(m["mountPath"] + "/"))
    volume = next(v for v in spec["volumes"] if v["name"] == rendered_mount["name"])
    assert volume["emptyDir"]["medium"] == "Memory"
    assert any(m["name"] == volume["name"] and not m.get("readOnly") for m in init["volumeMounts"])
    template_mount = next(m for m in init["volumeMounts"] if m["mountPath"] == "/etc/mlflow-auth")
    assert next(v for v in spec["volumes"] if v["name"] == template_mount["name"])["configMap"]["name"] == "emgate-mlflow-auth"
    assert env_of(init)["MLFLOW_AUTH_DATABASE_URI"]["value"] == "$(MLFLOW_BACKEND_DSN)"

    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "in" / "basic_auth.ini").write_text(template)
    script = (
        init["command"][2].replace("/etc/mlflow-auth", str(tmp_path / "in")).replace("/run/mlflow-auth", str(tmp_path / "out"))
    )
    dsn = "postgresql://mlflow:p%40ss@emgate-postgres.emgate.svc.cluster.local:5432/mlflow"
    monkeypatch.setenv("MLFLOW_AUTH_DATABASE_URI", dsn)
    exec(compile(script, "auth-config", "exec"), {})  # noqa: S102 - the chart's own script
    out = tmp_path / "out" / "basic_auth.ini"
    assert out.stat().st_mode & 0o077 == 0  # readable by the server's user only

    # MLflow's own reader (mlflow/server/auth/config.py), loaded without the auth app, which needs Flask-WTF
    import importlib.util

    mlflow = pytest.importorskip("mlflow")
    spec = importlib.util.spec_from_file_location("mlflow_auth_config", Path(mlflow.__file__).parent / "server/auth/config.py")
    assert spec is not None and spec.loader is not None
    auth_config = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(auth_config)
    read_auth_config = auth_config.read_auth_config

    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(out))
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_USERNAME", "emgate-gate")
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", "from-the-secret")
    config = read_auth_config()
    assert config.default_permission == "READ"
    assert config.database_uri == dsn  # the % survives MLflow's interpolating parser
    assert (config.admin_username, config.admin_password) == ("emgate-gate", "from-the-secret")
    assert config.authorization_function == "mlflow.server.auth:authenticate_request_basic_auth"
    assert config.auth_cache_ttl_seconds == 60  # a login is not re-hashed on each of a run's ~1,100 requests


def test_mlflow_auth_on_sqlite_keeps_its_users_on_the_volume(repo: Path) -> None:
    docs = render(repo, {})
    spec = pod_spec(find(docs, "Deployment", "emgate-mlflow"))
    init = spec["initContainers"][0]
    assert env_of(init)["MLFLOW_AUTH_DATABASE_URI"]["value"] == "sqlite:////mlflow/basic_auth.db"
    data = next(m for m in spec["containers"][0]["volumeMounts"] if m["mountPath"] == "/mlflow")
    assert next(v for v in spec["volumes"] if v["name"] == data["name"])["persistentVolumeClaim"]["claimName"] == "emgate-mlflow"
    parsed = configparser.ConfigParser()
    parsed.read_string(find(docs, "ConfigMap", "emgate-mlflow-auth")["data"]["basic_auth.ini"])
    assert parsed["mlflow"]["default_permission"] == "READ"
    # auth off: no basic-auth app, no init container, no credentials needed
    off = pod_spec(find(render(repo, {"mlflow": {"auth": {"enabled": False}}}), "Deployment", "emgate-mlflow"))
    assert "initContainers" not in off
    assert not any(a.startswith("--app-name") for a in off["containers"][0]["args"])
    refs = [e["name"] for e in off["containers"][0].get("env", []) if "secretKeyRef" in e.get("valueFrom", {})]
    assert refs == ["MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY"]  # the alias guard's, not basic auth's


# --- the judge, the model cache, the network policies, NOTES -----------------------------------------------------


def test_judge_renders_only_when_enabled_and_requests_a_gpu(repo: Path) -> None:
    assert not any(name == "emgate-judge" for _, name in kinds(render(repo, {})))
    docs = render(repo, FULL)
    deployment = find(docs, "Deployment", "emgate-judge")
    spec = pod_spec(deployment)
    container = spec["containers"][0]
    assert container["image"] == "vllm/vllm-openai:v0.11.0"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["command"] == ["vllm", "serve"]
    assert container["args"][0] == "/mnt/models/Qwen/Qwen2.5-32B-Instruct"
    assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert container["ports"] == [{"name": "http", "containerPort": 8000}]
    shm = next(m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm")
    assert next(v for v in spec["volumes"] if v["name"] == shm["name"])["emptyDir"]["medium"] == "Memory"
    models = next(m for m in container["volumeMounts"] if m["mountPath"] == "/mnt/models")
    assert models["readOnly"] is True
    assert (
        next(v for v in spec["volumes"] if v["name"] == models["name"])["persistentVolumeClaim"]["claimName"]
        == "emgate-model-cache"
    )
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert spec["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert env_of(container)["VLLM_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "judge-api-key", "key": "api-key"}
    service = find(docs, "Service", "emgate-judge")
    assert service["spec"]["ports"][0]["port"] == 8000
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


def test_judge_from_the_hub_must_pin_a_revision(repo: Path) -> None:
    hub = {"judge": {"enabled": True, "model": "Qwen/Qwen2.5-7B-Instruct"}}
    assert "judge.revision" in schema_error(repo, hub)
    hub["judge"]["revision"] = "a" * 40
    container = pod_spec(find(render(repo, hub), "Deployment", "emgate-judge"))["containers"][0]
    assert container["args"][:2] == ["Qwen/Qwen2.5-7B-Instruct", "--revision=" + "a" * 40]
    assert "HF_HUB_OFFLINE" not in env_of(container)


def test_model_cache_pvc(repo: Path) -> None:
    claim = find(render(repo, {}), "PersistentVolumeClaim", "emgate-model-cache")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "500Gi"
    assert "storageClassName" not in claim["spec"]
    custom = render(repo, {"modelCache": {"size": "2Ti", "storageClassName": "cephfs"}})
    claim = find(custom, "PersistentVolumeClaim", "emgate-model-cache")
    assert (claim["spec"]["resources"]["requests"]["storage"], claim["spec"]["storageClassName"]) == ("2Ti", "cephfs")
    assert ("PersistentVolumeClaim", "emgate-model-cache") not in kinds(render(repo, {"modelCache": {"enabled": False}}))


def _selects(selector: dict, labels: dict) -> bool:
    return selector["matchLabels"].items() <= labels.items()


def test_network_policies_guard_mlflow_postgres_and_judge(repo: Path) -> None:
    docs = render(repo, FULL)
    policies = {d["metadata"]["name"]: d for d in all_docs(docs) if d["kind"] == "NetworkPolicy"}
    assert set(policies) == {"emgate-mlflow", "emgate-postgres", "emgate-judge", "emgate-alias-guard"}
    pods = {
        name: d["spec"]["template"]["metadata"]["labels"]
        for d in all_docs(docs)
        if d["kind"] in WORKLOAD_KINDS
        for name in [d["metadata"]["name"]]
    }
    for name, policy in policies.items():
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        # each policy selects exactly its own workload's pods
        assert [p for p, labels in pods.items() if _selects(policy["spec"]["podSelector"], labels)] == [name], name

    postgres_from = policies["emgate-postgres"]["spec"]["ingress"][0]["from"]
    assert len(postgres_from) == 1 and _selects(postgres_from[0]["podSelector"], pods["emgate-mlflow"])
    assert not _selects(postgres_from[0]["podSelector"], pods["emgate-judge"])

    pipeline_peer = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kubeflow"}},
        "podSelector": {"matchLabels": {"pipelines.kubeflow.org/v2_component": "true"}},
    }
    assert policies["emgate-judge"]["spec"]["ingress"][0]["from"] == [pipeline_peer]
    assert policies["emgate-judge"]["spec"]["ingress"][0]["ports"] == [{"port": "http", "protocol": "TCP"}]
    mlflow_from = policies["emgate-mlflow"]["spec"]["ingress"][0]["from"]
    assert {"podSelector": {}} in mlflow_from  # the release namespace
    assert pipeline_peer in mlflow_from
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}} in mlflow_from
    assert len(mlflow_from) == 3

    assert {n for k, n in kinds(render(repo, {})) if k == "NetworkPolicy"} == {"emgate-mlflow", "emgate-alias-guard"}
    assert not any(k == "NetworkPolicy" for k, _ in kinds(render(repo, {"networkPolicy": {"enabled": False}})))


def test_notes_tell_how_to_open_mlflow_create_the_secrets_and_see_the_schedule(repo: Path) -> None:
    notes = render_notes(repo, FULL)
    assert "kubectl -n emgate port-forward svc/emgate-mlflow 5000:5000" in notes
    assert "kubectl -n emgate create secret generic emgate-mlflow-auth" in notes
    assert "kubectl -n emgate create secret generic emgate-s3" in notes
    assert "--from-literal=access-key-id=" in notes
    assert "kubectl -n emgate logs job/emgate-schedule" in notes
    assert "http://emgate-judge.emgate.svc.cluster.local:8000/v1" in notes
    default_notes = render_notes(repo, {})
    assert "emgate-s3" not in default_notes and "emgate-judge" not in default_notes


def test_the_policy_configmap_carries_the_package_floor(repo: Path, tmp_path: Path) -> None:
    """The chart's default floor is the package's paper floor; the name matches kubernetes.policy_configmap."""
    from emgate.floor import PACKAGE_FLOOR, load_floor, packaged
    from emgate.recipe import KubernetesSpec

    [configmap] = render(repo, {})["policy-configmap.yaml"]
    assert configmap["metadata"]["name"] == KubernetesSpec().policy_configmap
    mounted = tmp_path / "policy.yaml"
    mounted.write_text(configmap["data"]["policy.yaml"])
    assert load_floor(mounted).sha256() == load_floor(packaged(PACKAGE_FLOOR)).sha256()


# --- the alias guard: MLflow webhook receiver, its registration Job, MLflow's webhook settings -------------------

GUARD_OBJECTS = {
    ("Deployment", "emgate-alias-guard"),
    ("Service", "emgate-alias-guard"),
    ("Job", "emgate-alias-guard-register"),
    ("ServiceAccount", "emgate-alias-guard"),
    ("ServiceAccount", "emgate-alias-guard-register"),
    ("NetworkPolicy", "emgate-alias-guard"),
}
WEBHOOK_ENV = {"MLFLOW_WEBHOOK_ALLOWED_SCHEMES", "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS", "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY"}


def test_alias_guard_renders_by_default_and_validates(repo: Path) -> None:
    docs = render(repo, {})
    assert kinds(docs) >= GUARD_OBJECTS
    for kind, name in GUARD_OBJECTS:
        kubernetes_validate.validate(find(docs, kind, name), KUBE_VERSION, strict=True)
    deployment = find(docs, "Deployment", "emgate-alias-guard")
    spec = pod_spec(deployment)
    [container] = spec["containers"]
    assert container["image"] == "ghcr.io/emgate/emgate-gate:0.1.0"
    assert container["command"] == ["emgate", "gate", "guard", "--host", "0.0.0.0", "--port", "8080"]
    assert container["ports"] == [{"name": "http", "containerPort": 8080}]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["resources"] == {
        "requests": {"cpu": "100m", "memory": "256Mi"},
        "limits": {"cpu": "500m", "memory": "512Mi"},
    }

    env = env_of(container)
    assert env["MLFLOW_TRACKING_URI"]["value"] == "http://emgate-mlflow.emgate.svc.cluster.local:5000"
    # the MLflow admin (it moves the alias back), the same account MLflow creates from the auth Secret
    mlflow_env = env_of(pod_spec(find(docs, "Deployment", "emgate-mlflow"))["containers"][0])
    assert env["MLFLOW_TRACKING_USERNAME"]["valueFrom"] == mlflow_env["MLFLOW_AUTH_ADMIN_USERNAME"]["valueFrom"]
    assert env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"] == mlflow_env["MLFLOW_AUTH_ADMIN_PASSWORD"]["valueFrom"]
    assert env["EMGATE_WEBHOOK_SECRET"]["valueFrom"] == {"secretKeyRef": {"name": "emgate-webhook", "key": "secret"}}
    assert env["HOME"]["value"] == "/tmp"
    assert "EMGATE_OVERRIDE_PUBLIC_KEY" not in env  # no approvers' keys by default
    # the gate's public keys: the chart's ConfigMap, mounted read-only at the folder the env names
    keys = env["EMGATE_GATE_PUBLIC_KEY"]["value"]
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == keys)
    assert mount["readOnly"] is True
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    assert find(docs, "ConfigMap", volume["configMap"]["name"])["metadata"]["name"] == "emgate-gate-public-key"

    service = find(docs, "Service", "emgate-alias-guard")
    assert service["spec"]["ports"] == [{"name": "http", "port": 8080, "targetPort": "http"}]
    pods = [d for d in all_docs(docs) if d["kind"] in WORKLOAD_KINDS]
    selected = [
        d["metadata"]["name"]
        for d in pods
        if service["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()
    ]
    assert selected == ["emgate-alias-guard"]  # not the registration Job's pod


def test_alias_guard_mounts_the_approvers_override_keys(repo: Path) -> None:
    docs = render(repo, FULL)
    spec = pod_spec(find(docs, "Deployment", "emgate-alias-guard"))
    container = spec["containers"][0]
    assert container["command"][-2:] == ["--port", "9090"]
    assert find(docs, "Deployment", "emgate-alias-guard")["spec"]["replicas"] == 2
    env = env_of(container)
    assert env["EMGATE_WEBHOOK_SECRET"]["valueFrom"] == {"secretKeyRef": {"name": "guard-hmac", "key": "hmac"}}
    folder = env["EMGATE_OVERRIDE_PUBLIC_KEY"]["value"]
    assert folder != env["EMGATE_GATE_PUBLIC_KEY"]["value"]  # approvers' keys never count as the gate's
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == folder)
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    configmap = find(docs, "ConfigMap", volume["configMap"]["name"])
    assert list(configmap["data"].values()) == [APPROVER_PEM]
    assert not any(v == APPROVER_PEM for v in (find(docs, "ConfigMap", "emgate-gate-public-key").get("data") or {}).values())
    # a key rotation restarts the guard
    annotations = find(docs, "Deployment", "emgate-alias-guard")["spec"]["template"]["metadata"]["annotations"]
    rotated = render(repo, {**FULL, "aliasGuard": {**FULL["aliasGuard"], "overridePublicKeys": []}})
    rotated_annotations = find(rotated, "Deployment", "emgate-alias-guard")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["checksum/public-keys"] != rotated_annotations["checksum/public-keys"]
    assert "EMGATE_OVERRIDE_PUBLIC_KEY" not in env_of(
        pod_spec(find(rotated, "Deployment", "emgate-alias-guard"))["containers"][0]
    )
    assert not any(name == "emgate-override-public-key" for _, name in kinds(rotated))


@pytest.mark.parametrize("values_name", sorted(VALUE_SETS))
def test_mlflow_accepts_the_guard_webhook_url_and_keeps_its_secret_key(
    repo: Path, values_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MLflow's own webhook URL check accepts the registration Job's URL under the server's rendered env, and
    refuses it without that env; the encryption key comes from a Secret, never a literal."""
    from mlflow import environment_variables as mlflow_env
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_webhook_url

    values = VALUE_SETS[values_name]
    docs = render(repo, values)
    env = env_of(pod_spec(find(docs, "Deployment", "emgate-mlflow"))["containers"][0])
    assert set(env) >= WEBHOOK_ENV
    assert mlflow_env.MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY.name == "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY"
    key = env["MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY"]
    assert "value" not in key
    expected = values.get("aliasGuard", {}).get("encryptionKeySecret", {"name": "emgate-webhook", "key": "encryption-key"})
    assert key["valueFrom"] == {"secretKeyRef": expected}

    job = find(docs, "Job", "emgate-alias-guard-register")
    url = pod_spec(job)["containers"][0]["command"][-1]
    for name in WEBHOOK_ENV:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(MlflowException):  # MLflow's defaults: https only, public addresses only
        _validate_webhook_url(url)
    monkeypatch.setenv("MLFLOW_WEBHOOK_ALLOWED_SCHEMES", "http")
    with pytest.raises(MlflowException):  # http alone is not enough: the Service's address is private
        _validate_webhook_url(url)
    for name in WEBHOOK_ENV - {"MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY"}:
        monkeypatch.setenv(name, env[name]["value"])
    _validate_webhook_url(url)
    assert "https" in mlflow_env._MLFLOW_WEBHOOK_ALLOWED_SCHEMES.get()  # https receivers still work


def test_registration_job_points_at_the_guard_service(repo: Path) -> None:
    docs = render(repo, {"aliasGuard": {"port": 9443}}, name="prod", namespace="ml-gate")
    job = find(docs, "Job", "prod-emgate-alias-guard-register")
    annotations = job["metadata"]["annotations"]
    assert set(annotations["helm.sh/hook"].split(",")) == {"post-install", "post-upgrade"}
    assert set(annotations["helm.sh/hook-delete-policy"].split(",")) == {"before-hook-creation", "hook-succeeded"}
    assert int(annotations["helm.sh/hook-weight"]) >= 0
    assert (job["spec"]["activeDeadlineSeconds"], job["spec"]["backoffLimit"]) == (300, 3)
    spec = pod_spec(job)
    assert spec["restartPolicy"] == "Never"
    [container] = spec["containers"]
    assert container["image"] == "ghcr.io/emgate/emgate-gate:0.1.0"
    command = container["command"]
    assert command[:4] == ["emgate", "gate", "guard-register", "--url"] and len(command) == 5
    from urllib.parse import urlsplit

    url = urlsplit(command[4])
    service = find(docs, "Service", "prod-emgate-alias-guard")
    [port] = service["spec"]["ports"]
    assert (url.scheme, url.hostname, url.port, url.path) == (
        "http",
        f"{service['metadata']['name']}.ml-gate.svc.cluster.local",
        port["port"],
        "/webhook",
    )
    # the Service's target port is the port the guard listens on
    guard = pod_spec(find(docs, "Deployment", "prod-emgate-alias-guard"))["containers"][0]
    target = next(p["containerPort"] for p in guard["ports"] if p["name"] == port["targetPort"])
    assert target == int(guard["command"][guard["command"].index("--port") + 1]) == 9443
    # it registers the same HMAC secret the guard checks, as the MLflow admin, against the same server
    env, guard_env = env_of(container), env_of(guard)
    for name in ("EMGATE_WEBHOOK_SECRET", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        assert "secretKeyRef" in env[name]["valueFrom"] and env[name] == guard_env[name], name
    assert env["MLFLOW_TRACKING_URI"] == guard_env["MLFLOW_TRACKING_URI"]
    assert env["MLFLOW_TRACKING_URI"]["value"] == "http://prod-emgate-mlflow.ml-gate.svc.cluster.local:5000"


def test_network_policy_admits_only_mlflow_to_the_alias_guard(repo: Path) -> None:
    docs = render(repo, FULL)
    policy = find(docs, "NetworkPolicy", "emgate-alias-guard")
    pods = {
        d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"] for d in all_docs(docs) if d["kind"] in WORKLOAD_KINDS
    }
    assert [p for p, labels in pods.items() if _selects(policy["spec"]["podSelector"], labels)] == ["emgate-alias-guard"]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    [rule] = policy["spec"]["ingress"]
    [peer] = rule["from"]
    assert set(peer) == {"podSelector"}  # this namespace only: no namespaceSelector, no ipBlock
    assert [p for p, labels in pods.items() if _selects(peer["podSelector"], labels)] == ["emgate-mlflow"]
    assert rule["ports"] == [{"port": "http", "protocol": "TCP"}]
    guard = pod_spec(find(docs, "Deployment", "emgate-alias-guard"))["containers"][0]
    assert [p["name"] for p in guard["ports"]] == ["http"]


def test_alias_guard_can_be_disabled(repo: Path) -> None:
    off = {"aliasGuard": {"enabled": False, "overridePublicKeys": [APPROVER_PEM]}}
    docs = render(repo, off)
    assert not [(k, n) for k, n in kinds(docs) if "alias-guard" in n or "override-public-key" in n]
    env = env_of(pod_spec(find(docs, "Deployment", "emgate-mlflow"))["containers"][0])
    assert not [name for name in env if name.startswith("MLFLOW_WEBHOOK_")]
    assert not any("emgate-webhook" in str(d) for d in all_docs(docs))
    for doc in all_docs(docs):
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    notes = render_notes(repo, off)
    assert "emgate-webhook" not in notes and "alias-guard" not in notes
    # with the guard on, MLflow basic auth off: the guard needs no admin credentials (MLflow checks none)
    no_auth = render(repo, {"mlflow": {"auth": {"enabled": False}}})
    guard_env = env_of(pod_spec(find(no_auth, "Deployment", "emgate-alias-guard"))["containers"][0])
    assert "MLFLOW_TRACKING_PASSWORD" not in guard_env and "EMGATE_WEBHOOK_SECRET" in guard_env


@pytest.mark.parametrize("values_name", sorted(VALUE_SETS))
def test_every_referenced_secret_is_rendered_or_explained_in_notes(repo: Path, values_name: str) -> None:
    """Each (Secret, key) a pod reads is either rendered by the chart or has a `kubectl create secret` line in NOTES."""
    values = VALUE_SETS[values_name]
    docs = render(repo, values)
    rendered = {d["metadata"]["name"] for d in all_docs(docs) if d["kind"] == "Secret"}
    notes = render_notes(repo, values)
    commands = re.findall(r"create secret generic ([-a-z0-9]+)((?:[^\n]*\\\n)*[^\n]*)", notes)
    documented = {(name, key) for name, rest in commands for key in re.findall(r"--from-literal=([-._a-zA-Z0-9]+)=", rest)}
    referenced = set()
    for workload in (d for d in all_docs(docs) if d["kind"] in WORKLOAD_KINDS):
        spec = pod_spec(workload)
        for container in spec.get("initContainers", []) + spec["containers"]:
            for var in container.get("env", []):
                if "secretKeyRef" in var.get("valueFrom", {}):
                    ref = var["valueFrom"]["secretKeyRef"]
                    referenced.add((ref["name"], ref["key"]))
    assert ("emgate-webhook" if values_name == "default" else "guard-hmac") in {name for name, _ in referenced}
    missing = {(name, key) for name, key in referenced if name not in rendered and (name, key) not in documented}
    assert missing == set()


def test_notes_explain_the_alias_guard(repo: Path) -> None:
    notes = render_notes(repo, {})
    assert 'kubectl -n emgate create secret generic emgate-webhook --from-literal=secret="$(openssl rand -hex 32)"' in notes
    assert "--from-literal=encryption-key=" in notes and "Fernet.generate_key()" in notes
    assert "emgate gate verify" in notes
    full = render_notes(repo, FULL)
    assert "create secret generic guard-hmac --from-literal=hmac=" in full
    assert "create secret generic mlflow-webhook-key" in full and "--from-literal=fernet=" in full

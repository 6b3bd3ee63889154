"""charts/emgate: strict lint and rendered manifests, offline (Helm v4 through helm-python-sdk)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

helm = pytest.importorskip("helm_python")


def render(repo: Path, values: dict, name: str = "emgate", namespace: str = "emgate") -> dict[str, list[dict]]:
    from helm_python.chart import Chart

    out = Chart.load(str(repo / "charts" / "emgate")).render(values, name=name, namespace=namespace, is_install=True)
    return {Path(k).name: [d for d in yaml.safe_load_all(v) if d] for k, v in out.items() if k.endswith(".yaml")}


def test_chart_lints_strict(repo: Path) -> None:
    result = helm.lint(str(repo / "charts" / "emgate"), strict=True)
    assert result["errors"] == []
    assert [m for m in result["messages"] if m["severity"] > 1] == []


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


def test_bad_values_are_refused(repo: Path) -> None:
    with pytest.raises(helm.HelmError):
        render(repo, {"mlflow": {"replicas": 2}})  # SQLite cannot be shared between pods
    with pytest.raises(helm.HelmError):
        render(repo, {"mlflow": {"backend": "postgres"}})  # not in the schema

"""Credentials never travel in a recipe (issue 17): URLs with credentials in them and credential-like plain
environment settings are refused when the recipe loads, before any request leaves, without echoing the secret."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from emgate.cli import app
from emgate.recipe import RecipeError, load_recipe, url_credentials

PAPER = Path(__file__).resolve().parents[1] / "pipelines" / "recipes" / "paper.yaml"
SECRET = "pw-never-shown-7f3a"


@pytest.mark.parametrize("field", ["judge.base_url", "mlflow.tracking_uri"])
@pytest.mark.parametrize("form", ["http://admin:{s}@127.0.0.1:{p}/v1", "http://{s}@127.0.0.1:{p}/v1",
                                  "http://127.0.0.1:{p}/v1?api_key={s}"])
def test_a_url_with_credentials_is_refused_before_anything_is_sent(field: str, form: str, listener) -> None:
    port, got = listener
    url = form.format(s=SECRET, p=port)
    res = CliRunner().invoke(app, ["check", str(PAPER), "--set", f"{field}={url}"])
    assert res.exit_code != 0
    assert field in res.output and "carries credentials" in res.output
    assert SECRET not in res.output and "Traceback" not in res.output
    assert got == []  # nothing reached the listener


def test_endpoint_model_and_adapter_urls_are_checked_too() -> None:
    for field, value in (("serving.endpoint.base_url", f"https://u:{SECRET}@models.example.com/v1"),
                         ("variants.0.adapter", f"s3://{SECRET}@bucket/adapters/x")):
        with pytest.raises(RecipeError) as exc:
            load_recipe(PAPER, [f"{field}={value}"])
        assert "carries credentials" in str(exc.value) and SECRET not in str(exc.value)


@pytest.mark.parametrize("setting", ["MLFLOW_TRACKING_AUTH=x", "DB_PASS=x", "MY_PASSWD=x", "OPENAI_APIKEY=x",
                                     "HF_AUTH=x", "PGDSN=x"])
def test_credential_like_env_names_are_refused(setting: str) -> None:
    with pytest.raises(RecipeError, match="looks like a credential; put it in a Kubernetes Secret"):
        load_recipe(PAPER, [f"kubernetes.env.{setting}"])


@pytest.mark.parametrize("value", ["sk-" + "a" * 40, "hf_" + "b" * 30, "AKIA" + "C" * 16, "Bearer abcdefghijkl",
                                   "http://user:" + SECRET + "@proxy.internal:3128"])
def test_credential_like_env_values_are_refused_without_echoing_them(value: str) -> None:
    with pytest.raises(RecipeError) as exc:
        load_recipe(PAPER, [f"kubernetes.env.SOME_SETTING={value}"])
    assert "the value of SOME_SETTING looks like a credential" in str(exc.value)
    assert value not in str(exc.value)


def test_plain_settings_and_bare_urls_still_load() -> None:
    recipe = load_recipe(PAPER, ["kubernetes.env.MLFLOW_S3_ENDPOINT_URL=http://minio.emgate.svc:9000",
                                 "kubernetes.env.SSL_CERT_FILE=/etc/ssl/certs/ca.pem",
                                 "judge.base_url=http://judge.emgate.svc.cluster.local:8000/v1"])
    assert recipe.kubernetes.env["MLFLOW_S3_ENDPOINT_URL"].startswith("http://minio")
    assert not url_credentials("sqlite:///emgate-runs/mlflow.db")
    assert not url_credentials("hf://owner/repo@" + "a" * 40) and not url_credentials("models:/name@champion")
    assert url_credentials("postgresql://mlflow:p%40ss@db:5432/mlflow")

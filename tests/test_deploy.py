"""The deployable artefacts in deploy/ agree with the code and with configs/deploy.yaml.

Fast and offline: the compose file is checked structurally (no `docker compose` here), the
Kubernetes overlays are rendered with `kubectl kustomize` and validated with
kubernetes-validate's bundled schemas; the paths the probes and health checks use are looked
up in the app's own routes, and the config the images get is loaded with the project's loader.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from cli.security import METRICS_TOKEN_ENV, exposure_problems
from core.config import Settings, load_settings, parse_settings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
CONFIG = ROOT / "configs" / "deploy.yaml"
CONFIG_IN_IMAGE = "/etc/distillgate/config.yaml"
K8S_VERSION = "1.32.0"  # the kubectl here; kubernetes-validate ships this schema


# -- what the artefacts are checked against ------------------------------------------------------
@pytest.fixture(scope="module")
def settings() -> Settings:
    return load_settings(CONFIG)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return (DEPLOY / "docker" / "Dockerfile").read_text()


def needed_env(settings: Settings) -> set[str]:
    """Every secret environment variable configs/deploy.yaml reads (the PostgreSQL DSN among
    them), plus the metrics token that serving beyond loopback requires."""
    names = {settings.auth.client_keys_env, settings.auth.admin_token_env, METRICS_TOKEN_ENV}
    if settings.store.dsn_env:
        names.add(settings.store.dsn_env)
    names |= {key.key_env for key in settings.auth.keys}
    for route in settings.routes:
        names |= {name for name in (route.teacher.api_key_env, route.teacher.fallback_api_key_env) if name}
    return names


@pytest.fixture(scope="module")
def app_serves(settings: Settings) -> Callable[[str], bool]:
    """Whether the gateway app answers GET ``path`` (matched as Starlette routes a request)."""
    from starlette.routing import Match

    from gateway.app import create_app

    with pytest.MonkeyPatch.context() as env:  # the app reads the Redis URL when built (not connecting)
        if settings.rate_limit.storage_env:
            env.setenv(settings.rate_limit.storage_env, "redis://127.0.0.1:6379/0")
        app = create_app(settings)

    def serves(path: str) -> bool:
        scope = {"type": "http", "method": "GET", "path": path, "root_path": "", "headers": [], "query_string": b""}
        return any(route.matches(scope)[0] is Match.FULL for route in app.routes)

    assert not serves("/no-such-path")
    return serves


def is_distillgate_image(image: str) -> bool:
    return image.rsplit(":", 1)[0].rsplit("/", 1)[-1] == "distillgate"


def workdir(dockerfile: str) -> PurePosixPath:
    return PurePosixPath(re.findall(r"^WORKDIR\s+(\S+)", dockerfile, re.MULTILINE)[-1])


def url_in_healthcheck(command: str) -> str:
    match = re.search(r"https?://[^'\" ]+", command)
    assert match, f"no URL in the health check {command!r}"
    return match.group(0)


def option_map(args: list[str]) -> dict[str, str | None]:
    """--flag value pairs (a flag followed by another flag maps to None)."""
    options: dict[str, str | None] = {}
    for index, arg in enumerate(args):
        if arg.startswith("--"):
            following = args[index + 1] if index + 1 < len(args) else None
            options[arg] = None if following is None or following.startswith("--") else following
    return options


def check_vllm_command(settings: Settings, args: list[str], env: dict[str, str]) -> None:
    """vLLM's flags in a manifest are those `serve` would give a vLLM it launches."""
    options = option_map(args)
    vllm = settings.vllm
    assert options["--model"] == str(vllm.model_dir)
    assert options["--served-model-name"] == vllm.served_model_name
    assert "--enable-lora" in options
    assert options["--max-lora-rank"] == str(vllm.max_lora_rank)
    assert options["--max-loras"] == str(vllm.max_loras)
    assert options["--max-model-len"] == str(vllm.max_model_len)
    assert options["--port"] == str(urlsplit(vllm.url).port)
    assert options["--host"] == "0.0.0.0"
    extra = option_map(vllm.extra_args)
    assert {flag: options.get(flag) for flag in extra} == extra
    assert env.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING") == "True"  # the hot swap loads adapters at run time


def adapters_dir(dockerfile: str, settings: Settings) -> PurePosixPath:
    """Where `distillgate train` writes adapters: the config's store.adapters_dir, relative to
    the working directory (the in-gateway schedule passes no --adapters-root)."""
    return workdir(dockerfile) / PurePosixPath(str(settings.store.adapters_dir))


# -- configs/deploy.yaml ----------------------------------------------------------------------------
def test_deploy_config_is_for_containers(settings: Settings) -> None:
    assert settings.server.host == "0.0.0.0"
    assert settings.vllm.launch is False
    assert settings.replay_teacher is None or not settings.replay_teacher.launch
    assert urlsplit(settings.vllm.url).hostname == "vllm"
    for route in settings.routes:
        assert route.teacher.api_key_env, f"route {route.name}: a real teacher's key comes from the environment"


def test_deploy_config_shares_the_store_and_rate_limits(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """Replicas share one PostgreSQL (its DSN from the environment only) and one Redis."""
    assert settings.store.kind == "postgres" and settings.store.dsn_env
    assert settings.rate_limit.storage is None and settings.rate_limit.storage_env
    text = CONFIG.read_text()
    assert not re.search(r"postgres(ql)?://", text), "a DSN in the config: it belongs in the environment"
    assert not re.search(r"rediss?://", text), "the Redis URL comes from rate_limit.storage_env"
    monkeypatch.setenv(settings.store.dsn_env, "postgresql://u:p@db:5432/d")
    monkeypatch.setenv(settings.rate_limit.storage_env, "redis://redis:6379/0")
    assert settings.store.dsn() == "postgresql://u:p@db:5432/d"
    assert settings.rate_limit.storage_url() == "redis://redis:6379/0"


def test_k8s_config_is_a_copy_of_configs_deploy() -> None:
    assert (DEPLOY / "k8s" / "base" / "config.yaml").read_text() == CONFIG.read_text(), \
        "copy configs/deploy.yaml to deploy/k8s/base/config.yaml"


# -- deploy/docker/Dockerfile -----------------------------------------------------------------------
def test_dockerfile(dockerfile: str, settings: Settings) -> None:
    for source in re.findall(r"^COPY\s+(?!--from)(?:--\S+\s+)*(.+)\s+\S+$", dockerfile, re.MULTILINE):
        for path in source.split():
            assert (ROOT / path).exists(), f"Dockerfile copies {path}, which is not in the repository"
    pyproject = (ROOT / "pyproject.toml").read_text()
    torch_pin = re.search(r'"torch==([^"]+)"', pyproject).group(1)
    assert f"ARG TORCH_VERSION={torch_pin}" in dockerfile
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in dockerfile
    assert "FROM ${PYTHON_IMAGE}" in dockerfile and "ARG PYTHON_IMAGE=python:3.11-slim" in dockerfile
    user = re.findall(r"^USER\s+(\S+)", dockerfile, re.MULTILINE)
    assert user and user[-1] not in {"root", "0"}
    assert re.search(r'^ENTRYPOINT \["distillgate"\]$', dockerfile, re.MULTILINE)
    assert f'CMD ["serve", "--config", "{CONFIG_IN_IMAGE}"]' in dockerfile
    assert f"COPY configs/deploy.yaml {CONFIG_IN_IMAGE}" in dockerfile
    # Every path of the config lies in the image's tree (data, router, the var/ volumes).
    assert PurePosixPath(str(settings.routes[0].labels_dataset)).is_relative_to(workdir(dockerfile))
    assert PurePosixPath(str(settings.store.path)).is_relative_to(workdir(dockerfile) / "var")
    # store.kind postgres needs psycopg in the image.
    extras = re.search(r'^RUN pip install "\.\[([\w,]+)\]"$', dockerfile, re.MULTILINE).group(1).split(",")
    assert settings.store.kind != "postgres" or "postgres" in extras


def test_dockerfile_healthcheck_is_the_apps(dockerfile: str, settings: Settings,
                                            app_serves: Callable[[str], bool]) -> None:
    healthcheck = re.search(r"^HEALTHCHECK .*?CMD (.+)$", dockerfile, re.MULTILINE | re.DOTALL).group(1)
    url = urlsplit(url_in_healthcheck(healthcheck))
    assert url.port == settings.server.port
    assert url.path == "/healthz" and app_serves(url.path)


# -- deploy/compose.yaml ----------------------------------------------------------------------------
def test_compose_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"init", "gateway", "vllm", "prometheus", "grafana", "postgres", "redis"} <= set(services)
    for name in services:
        assert "profiles" not in services[name], f"{name} would not start by default"
    for name in ("init", "gateway"):
        assert services[name]["build"]["dockerfile"] == "deploy/docker/Dockerfile"
        assert (DEPLOY / services[name]["build"]["context"] / "deploy" / "docker" / "Dockerfile").is_file()
    assert services["vllm"]["depends_on"]["init"]["condition"] == "service_completed_successfully"


def test_compose_mounts_the_config_serve_reads(compose: dict[str, Any], settings: Settings) -> None:
    for name in ("init", "gateway"):
        service = compose["services"][name]
        assert service["command"][service["command"].index("--config") + 1] == CONFIG_IN_IMAGE
        mounts = dict(volume.split(":")[:2] for volume in service["volumes"])
        assert {target: source for source, target in mounts.items()}[CONFIG_IN_IMAGE] == "../configs/deploy.yaml"
    route = compose["services"]["init"]["command"][compose["services"]["init"]["command"].index("--route") + 1]
    assert settings.route(route) is not None


def test_compose_provides_every_secret_the_config_needs(compose: dict[str, Any], settings: Settings,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    environment = compose["services"]["gateway"]["environment"]
    assert needed_env(settings) <= set(environment)
    for name in needed_env(settings):
        # From deploy/.env, required (compose stops with the message when it is unset).
        assert re.fullmatch(rf"\$\{{{name}:\?.+\}}", environment[name]), environment[name]
    example = (DEPLOY / "env.example").read_text()
    referenced = set(re.findall(r"\$\{(\w+)", (DEPLOY / "compose.yaml").read_text()))
    referenced |= set(re.findall(r"\$\{(\w+)", (DEPLOY / "compose.gpu.yaml").read_text()))
    listed = dict(re.findall(r"^#?\s*(\w+)=(.*)$", example, re.MULTILINE))
    assert referenced <= set(listed), f"not in deploy/env.example: {sorted(referenced - set(listed))}"
    assert all(not listed[name] for name in needed_env(settings)), "env.example must hold no secret values"
    # With those variables set, `serve` listens beyond loopback without --insecure.
    for name in needed_env(settings):
        monkeypatch.setenv(name, f"test-{name.lower()}")
    if settings.rate_limit.storage_env:
        monkeypatch.setenv(settings.rate_limit.storage_env, "redis://redis:6379/0")
    from gateway.app import create_app

    app = create_app(settings)
    assert exposure_problems(settings.server.host, app.state.auth_required,
                             app.state.metrics.scrape_token is not None) == []


def test_compose_gateway_on_postgres_and_redis(compose: dict[str, Any], settings: Settings) -> None:
    services = compose["services"]
    gateway = services["gateway"]
    for name in ("postgres", "redis"):
        assert gateway["depends_on"][name]["condition"] == "service_healthy"
        assert services[name]["healthcheck"]["test"][0] == "CMD"
    # The DSN is required from deploy/.env (test_compose_provides_every_secret_the_config_needs);
    # the database it names is the postgres service, whose password comes from deploy/.env too.
    postgres = services["postgres"]
    assert re.fullmatch(r"\$\{POSTGRES_PASSWORD:\?.+\}", postgres["environment"]["POSTGRES_PASSWORD"])
    assert "pg_isready" in postgres["healthcheck"]["test"]
    data = {volume.split(":")[1]: volume.split(":")[0] for volume in postgres["volumes"]}
    assert data["/var/lib/postgresql/data"] in compose["volumes"]
    example = (DEPLOY / "env.example").read_text()
    assert f"postgresql://{postgres['environment']['POSTGRES_USER']}:<POSTGRES_PASSWORD>@postgres:5432/" \
           f"{postgres['environment']['POSTGRES_DB']}" in example
    # The Redis URL defaults to the redis service.
    redis_url = re.fullmatch(r"\$\{(\w+):-(.+)\}", gateway["environment"][settings.rate_limit.storage_env])
    assert redis_url and redis_url.group(1) == settings.rate_limit.storage_env
    assert urlsplit(redis_url.group(2)).hostname == "redis" and urlsplit(redis_url.group(2)).port == 6379
    assert "redis-cli" in services["redis"]["healthcheck"]["test"]


def test_compose_gateway_healthcheck_is_the_apps(compose: dict[str, Any], settings: Settings,
                                                 app_serves: Callable[[str], bool]) -> None:
    gateway = compose["services"]["gateway"]
    url = urlsplit(url_in_healthcheck(" ".join(gateway["healthcheck"]["test"])))
    assert url.port == settings.server.port
    assert app_serves(url.path)
    assert any(port.endswith(f":{settings.server.port}") for port in gateway["ports"])


def test_compose_vllm_matches_the_config(compose: dict[str, Any], settings: Settings) -> None:
    vllm = compose["services"]["vllm"]
    assert vllm["entrypoint"] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
    check_vllm_command(settings, [str(arg) for arg in vllm["command"]], vllm["environment"])
    assert urlsplit(settings.vllm.url).hostname in compose["services"]


def test_compose_shares_models_and_adapters_at_the_same_paths(compose: dict[str, Any], settings: Settings,
                                                             dockerfile: str) -> None:
    def mounts(service: str) -> dict[str, str]:
        """volume name -> mount path (named volumes only)."""
        return {volume.split(":")[0]: volume.split(":")[1] for volume in compose["services"][service]["volumes"]
                if not volume.startswith((".", "/"))}

    gateway, vllm, init = mounts("gateway"), mounts("vllm"), mounts("init")
    assert set(vllm) <= set(gateway)
    for volume, path in vllm.items():
        assert gateway[volume] == path, f"volume {volume}: {gateway[volume]} in the gateway, {path} in vLLM"
    assert init["models"] == gateway["models"]
    for needed in (PurePosixPath(str(settings.vllm.model_dir)), adapters_dir(dockerfile, settings)):
        assert any(needed.is_relative_to(path) for path in vllm.values()), f"vLLM cannot see {needed}"
    store = PurePosixPath(str(settings.store.path))
    assert store.parent == PurePosixPath(gateway["store"])
    assert set(compose["volumes"]) >= set(gateway) | set(vllm)


def test_prometheus_scrapes_the_gateway_with_the_metrics_token(compose: dict[str, Any], settings: Settings,
                                                               app_serves: Callable[[str], bool]) -> None:
    prometheus = compose["services"]["prometheus"]
    config_mount = next(volume for volume in prometheus["volumes"] if volume.endswith("prometheus.yml:ro"))
    scrape = yaml.safe_load((DEPLOY / config_mount.split(":")[0]).read_text())["scrape_configs"][0]
    assert scrape["static_configs"][0]["targets"] == [f"gateway:{settings.server.port}"]
    assert app_serves(scrape["metrics_path"])
    secret = prometheus["secrets"][0]
    assert scrape["authorization"]["credentials_file"] == f"/run/secrets/{secret['target']}"
    assert compose["secrets"][secret["source"]] == {"environment": METRICS_TOKEN_ENV}


def test_grafana_provisions_the_dashboard(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    mounts = dict(volume.split(":")[:2] for volume in grafana["volumes"])
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    provisioning = DEPLOY / "grafana" / "provisioning"
    provider = yaml.safe_load((provisioning / "dashboards" / "distillgate.yaml").read_text())["providers"][0]
    dashboard_target = PurePosixPath(mounts["./grafana/distillgate.json"])
    assert dashboard_target.parent == PurePosixPath(provider["options"]["path"])
    assert json.loads((DEPLOY / "grafana" / "distillgate.json").read_text())["uid"] == "distillgate"
    datasource = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())["datasources"][0]
    assert datasource["type"] == "prometheus" and datasource["isDefault"] is True
    assert urlsplit(datasource["url"]).hostname == "prometheus"
    assert urlsplit(datasource["url"]).port == 9090


def test_compose_gpu_override() -> None:
    override = yaml.safe_load((DEPLOY / "compose.gpu.yaml").read_text())
    devices = override["services"]["vllm"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert "vllm/vllm-openai" in override["services"]["vllm"]["image"]


# -- deploy/k8s (kustomize) -------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["cpu", "gpu"])
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed")
    overlay = DEPLOY / "k8s" / "overlays" / request.param
    result = subprocess.run([kubectl, "kustomize", str(overlay)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return request.param, [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [obj for obj in objects if obj["kind"] == kind and obj["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} rendered"
    return matches[0]


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return obj["spec"]["template"]["spec"]


def container(obj: dict[str, Any], name: str) -> dict[str, Any]:
    spec = pod_spec(obj)
    return next(c for c in [*spec.get("initContainers", []), *spec["containers"]] if c["name"] == name)


def port_number(container_spec: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in container_spec["ports"] if p["name"] == port)


def test_k8s_objects_validate(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    import kubernetes_validate

    _overlay, objects = rendered
    kinds = {(obj["kind"], obj["metadata"]["name"]) for obj in objects}
    assert {("Deployment", "distillgate"), ("Service", "distillgate"), ("Deployment", "vllm"), ("Service", "vllm"),
            ("CronJob", "distillgate-train"), ("PersistentVolumeClaim", "distillgate-shared"),
            ("Deployment", "redis"), ("Service", "redis"), ("PodDisruptionBudget", "distillgate")} <= kinds
    # The store is an external PostgreSQL (by DSN): no database and no store volume shipped.
    assert not any(obj["kind"] == "StatefulSet" for obj in objects)
    assert ("PersistentVolumeClaim", "distillgate-store") not in kinds
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_k8s_configmap_is_the_deploy_config(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _overlay, objects = rendered
    configmaps = [obj for obj in objects if obj["kind"] == "ConfigMap"]
    assert len(configmaps) == 1
    text = configmaps[0]["data"]["config.yaml"]
    assert text == CONFIG.read_text()
    parse_settings(yaml.safe_load(text), Path("ConfigMap config.yaml"))
    # Every pod that reads the config mounts that ConfigMap where `--config` points.
    for obj in objects:
        if obj["kind"] not in {"Deployment", "CronJob"}:
            continue
        volumes = {volume["name"]: volume for volume in pod_spec(obj)["volumes"]}
        for spec in [*pod_spec(obj).get("initContainers", []), *pod_spec(obj)["containers"]]:
            if not is_distillgate_image(spec["image"]):
                continue
            mount = next(m for m in spec["volumeMounts"] if volumes[m["name"]].get("configMap"))
            assert volumes[mount["name"]]["configMap"]["name"] == configmaps[0]["metadata"]["name"]
            assert f"{mount['mountPath']}/config.yaml" == CONFIG_IN_IMAGE


def test_k8s_gateway(rendered: tuple[str, list[dict[str, Any]]], settings: Settings,
                     app_serves: Callable[[str], bool]) -> None:
    _overlay, objects = rendered
    deployment = find(objects, "Deployment", "distillgate")
    # Replicas share the PostgreSQL store (followed every sync_interval_s) and Redis.
    assert settings.store.kind == "postgres"
    assert deployment["spec"]["replicas"] >= 2
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    budget = find(objects, "PodDisruptionBudget", "distillgate")
    assert budget["spec"]["minAvailable"] >= 1
    assert budget["spec"]["selector"]["matchLabels"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    gateway = container(deployment, "gateway")
    assert gateway["args"] == ["serve", "--config", CONFIG_IN_IMAGE]
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        get = gateway[probe]["httpGet"]
        assert app_serves(get["path"])
        assert port_number(gateway, get["port"]) == settings.server.port
    env = {item["name"]: item for item in gateway["env"]}
    assert needed_env(settings) <= set(env)
    assert all("secretKeyRef" in env[name]["valueFrom"] for name in needed_env(settings))
    assert settings.store.dsn_env in needed_env(settings)
    # Redis: the redis Service shipped beside the gateway.
    redis_url = urlsplit(env[settings.rate_limit.storage_env]["value"])
    redis_service = find(objects, "Service", redis_url.hostname)
    assert redis_service["spec"]["ports"][0]["port"] == redis_url.port
    redis = find(objects, "Deployment", redis_url.hostname)
    assert redis_service["spec"]["selector"].items() <= redis["spec"]["template"]["metadata"]["labels"].items()
    assert port_number(container(redis, "redis"), redis_service["spec"]["ports"][0]["targetPort"]) == redis_url.port
    service = find(objects, "Service", "distillgate")
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert port_number(gateway, service["spec"]["ports"][0]["targetPort"]) == settings.server.port
    security = pod_spec(deployment)["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] != 0


def test_k8s_vllm(rendered: tuple[str, list[dict[str, Any]]], settings: Settings) -> None:
    overlay, objects = rendered
    deployment = find(objects, "Deployment", "vllm")
    vllm = container(deployment, "vllm")
    env = {item["name"]: item.get("value") for item in vllm["env"]}
    check_vllm_command(settings, vllm["args"], env)
    url = urlsplit(settings.vllm.url)
    service = find(objects, "Service", url.hostname)
    assert service["spec"]["ports"][0]["port"] == url.port
    assert port_number(vllm, service["spec"]["ports"][0]["targetPort"]) == url.port
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    init = container(deployment, "init-student")
    assert init["args"][:1] == ["init-student"]
    assert settings.route(init["args"][init["args"].index("--route") + 1]) is not None
    gpus = vllm.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
    if overlay == "gpu":
        assert gpus == 1 and vllm["image"].startswith("vllm/vllm-openai:")
        assert pod_spec(deployment)["tolerations"]
    else:
        assert gpus is None and "VLLM_CPU_KVCACHE_SPACE" in env


def test_k8s_training_cronjob(rendered: tuple[str, list[dict[str, Any]]], settings: Settings) -> None:
    overlay, objects = rendered
    cronjob = find(objects, "CronJob", "distillgate-train")
    assert cronjob["spec"]["suspend"] is True  # the in-gateway schedule trains by default
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    train = container(cronjob, "train")
    script = train["args"][0]
    assert 'distillgate train --config "$CONFIG"' in script and "distillgate promote" in script
    env = {item["name"]: item for item in train["env"]}
    assert env["CONFIG"]["value"] == CONFIG_IN_IMAGE
    assert settings.route(env["ROUTE"]["value"]) is not None
    gateway_url = urlsplit(env["GATEWAY_URL"]["value"])
    find(objects, "Service", gateway_url.hostname)
    assert gateway_url.port == settings.server.port
    assert "secretKeyRef" in env[settings.auth.admin_token_env]["valueFrom"]
    # The same PostgreSQL as the gateways, from the same Secret key: the job runs on any node.
    gateway_env = {item["name"]: item for item in container(find(objects, "Deployment", "distillgate"), "gateway")["env"]}
    dsn = env[settings.store.dsn_env]["valueFrom"]["secretKeyRef"]
    assert dsn == gateway_env[settings.store.dsn_env]["valueFrom"]["secretKeyRef"]
    assert "affinity" not in pod_spec(cronjob)
    if overlay == "gpu":
        assert train["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert pod_spec(cronjob)["nodeSelector"] and pod_spec(cronjob)["tolerations"]
        # ... and the gateways, which request no GPU, stay off the GPU pool.
        assert "nodeSelector" not in pod_spec(find(objects, "Deployment", "distillgate"))


def test_k8s_volumes_are_shared_at_the_same_paths(rendered: tuple[str, list[dict[str, Any]]],
                                                 settings: Settings, dockerfile: str) -> None:
    _overlay, objects = rendered
    claims = {obj["metadata"]["name"]: obj for obj in objects if obj["kind"] == "PersistentVolumeClaim"}
    seen: dict[tuple[str, str], set[str]] = {}  # (claim, subPath) -> mount paths
    for obj in objects:
        if obj["kind"] not in {"Deployment", "CronJob"}:
            continue
        volumes = {volume["name"]: volume for volume in pod_spec(obj)["volumes"]}
        for spec in [*pod_spec(obj).get("initContainers", []), *pod_spec(obj)["containers"]]:
            for mount in spec.get("volumeMounts", []):
                claim = volumes[mount["name"]].get("persistentVolumeClaim", {}).get("claimName")
                if claim is not None:
                    assert claim in claims
                    seen.setdefault((claim, mount.get("subPath", "")), set()).add(mount["mountPath"])
    for key, paths in seen.items():
        assert len(paths) == 1, f"{key} is mounted at different paths: {sorted(paths)}"
    mounted = {key: PurePosixPath(next(iter(paths))) for key, paths in seen.items()}
    assert mounted[("distillgate-shared", "models")] == PurePosixPath(str(settings.vllm.model_dir)).parent
    assert mounted[("distillgate-shared", "adapters")] == adapters_dir(dockerfile, settings)
    assert claims["distillgate-shared"]["spec"]["accessModes"] == ["ReadWriteMany"]  # replicas on several nodes
    # store.path's directory (each replica's spool) is the pod's own, never a shared claim.
    gateway = find(objects, "Deployment", "distillgate")
    volumes = {volume["name"]: volume for volume in pod_spec(gateway)["volumes"]}
    spool = next(mount for mount in container(gateway, "gateway")["volumeMounts"]
                 if PurePosixPath(mount["mountPath"]) == PurePosixPath(str(settings.store.path)).parent)
    assert "emptyDir" in volumes[spool["name"]]

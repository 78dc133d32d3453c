"""The deployment files (infra/), checked without a cluster: the manifests parse and name the right kinds and
fields, every entrypoint and Serve import_path they name exists and imports, and every job argument they pass
is accepted by that entrypoint's own ``build_parser()``."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest
import ray
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
K8S = INFRA / "k8s"
RAY_KINDS = {"RayCluster", "RayJob", "RayService", "RayCronJob"}


def manifests() -> dict[str, list[dict]]:
    return {path.name: [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
            for path in sorted(K8S.glob("*.yaml"))}


def docs_of(kind: str) -> list[tuple[str, dict]]:
    return [(name, doc) for name, docs in manifests().items() for doc in docs if doc["kind"] == kind]


def rayjob_specs() -> list[tuple[str, dict]]:
    """Every RayJob spec that can run: RayJob manifests, the RayCronJob's template, the CronJob's ConfigMap."""
    specs = [(name, doc["spec"]) for name, doc in docs_of("RayJob")]
    specs += [(f"{name} jobTemplate", doc["spec"]["jobTemplate"]) for name, doc in docs_of("RayCronJob")]
    return specs + configmap_rayjobs()


def configmap_rayjobs() -> list[tuple[str, dict]]:
    """RayJob specs stored in ConfigMaps (what the Kubernetes CronJob creates)."""
    found = []
    for name, doc in docs_of("ConfigMap"):
        for key, text in doc.get("data", {}).items():
            embedded = yaml.safe_load(text)
            if isinstance(embedded, dict) and embedded.get("kind") == "RayJob":
                found.append((f"{name} {doc['metadata']['name']}/{key}", embedded["spec"]))
    return found


def ray_cluster_specs() -> list[tuple[str, dict]]:
    return [(name, doc["spec"]) for name, doc in docs_of("RayCluster")] + \
           [(name, doc["spec"]["rayClusterConfig"]) for name, doc in docs_of("RayService")]


def commands(entrypoint: str) -> list[list[str]]:
    """A shell entrypoint split into its commands at '&&' (KubeRay runs it with a shell)."""
    parts, current = [], []
    for token in shlex.split(entrypoint):
        if token == "&&":
            parts.append(current)
            current = []
        else:
            current.append(token)
    return parts + [current]


def job_commands() -> list[tuple[str, str, list[str]]]:
    """(where, module, args) of every job command in every RayJob spec."""
    found = []
    for where, spec in rayjob_specs():
        for argv in commands(spec["entrypoint"]):
            assert argv[0] in ("python", "python3"), f"{where}: entrypoint must run python, got {argv}"
            if argv[1] == "-m":
                module, args = argv[2], argv[3:]
            else:  # python jobs/x.py, relative to the repository root (the image's working directory)
                module, args = argv[1].removesuffix(".py").replace("/", "."), argv[2:]
            found.append((where, module, args))
    return found


def option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def containers(cluster: dict) -> list[dict]:
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [c for group in groups for c in group["template"]["spec"]["containers"]]


def module_file(module: str) -> Path:
    """The file of a module or package (``pipelines.serve`` is a package: its ``__init__.py``)."""
    path = REPO / module.replace(".", "/")
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


# -- shape ----------------------------------------------------------------------------------------------------
def test_manifests_parse_and_name_the_kinds():
    found = manifests()
    kinds = {doc["kind"] for docs in found.values() for doc in docs}
    assert {"RayCluster", "RayJob", "RayService", "RayCronJob", "CronJob", "Secret"} <= kinds
    for name, docs in found.items():
        for doc in docs:
            assert doc.get("apiVersion") and doc.get("metadata"), name
            assert doc["metadata"].get("name") or doc["metadata"].get("generateName"), name
            if doc["kind"] in RAY_KINDS:
                assert doc["apiVersion"] == "ray.io/v1", name
    assert len(rayjob_specs()) == 3  # the caching RayJob, the RayCronJob's template, the CronJob's RayJob


def test_ray_clusters_autoscale_gpu_workers_on_the_image_ray():
    for name, cluster in ray_cluster_specs():
        assert cluster["rayVersion"] == ray.__version__, f"{name}: the image's Ray is {ray.__version__}"
        assert cluster["enableInTreeAutoscaling"] is True, name
        assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", f"{name}: keep work off the head"
        gpu_groups = [g for g in cluster["workerGroupSpecs"]
                      if any("nvidia.com/gpu" in c["resources"]["limits"] for c in g["template"]["spec"]["containers"])]
        assert gpu_groups, f"{name}: no GPU worker group"
        for group in gpu_groups:
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], name
            assert group["maxReplicas"] > group["minReplicas"], f"{name}: a GPU group that cannot scale"


def secret(name: str) -> dict:
    (found,) = [doc for _, doc in docs_of("Secret") if doc["metadata"]["name"] == name]
    return found


def test_every_ray_pod_gets_the_image_and_s3_credentials_from_the_secret():
    secret_ = secret("s3-credentials")
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(secret_["stringData"])
    assert {secret_["stringData"][k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")} == {"REPLACE_ME"}, \
        "the example must hold no real keys"
    images = set()
    for name, cluster in ray_cluster_specs():
        for container in containers(cluster):
            refs = [e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e]
            assert refs == [secret_["metadata"]["name"]], f"{name}/{container['name']}"
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            assert env.get("HF_HUB_OFFLINE") == "1", f"{name}/{container['name']}: nothing may download weights"
            images.add(container["image"])
    assert len(images) == 1, f"one image for every Ray pod, found {images}"


def test_dockerfile_builds_on_the_ray_gpu_image_with_the_project():
    text = (INFRA / "Dockerfile").read_text()
    assert re.search(rf"^ARG RAY_VERSION={re.escape(ray.__version__)}$", text, re.M)
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-\S*gpu\s*$", text, re.M)
    for folder in ("dreamcache", "pipelines", "jobs"):
        assert re.search(rf"^COPY .*\b{folder} ", text, re.M), folder
    assert "pip install --no-cache-dir ." in text
    assert "HF_HUB_OFFLINE=1" in text


def test_readme_explains_every_manifest():
    readme = (INFRA / "README.md").read_text()
    for name in manifests():
        assert name in readme, name
    assert "infra/Dockerfile" in readme


# -- what the manifests run -----------------------------------------------------------------------------------
@pytest.mark.parametrize("where,module,args", [pytest.param(*c, id=f"{c[0]}:{c[1]}") for c in job_commands()])
def test_job_entrypoint_exists_and_accepts_its_arguments(where, module, args, capsys):
    assert module_file(module).is_file(), f"{where}: {module_file(module).relative_to(REPO)} does not exist"
    job = importlib.import_module(module)
    assert callable(getattr(job, "main", None)), f"{module} has no main()"
    parser = job.build_parser()
    try:
        parser.parse_args(args)
    except SystemExit:
        pytest.fail(f"{where}: {module} refuses its arguments {args}: {capsys.readouterr().err.strip()}")


def test_nightly_schedules_run_the_same_job_every_night():
    (_, cron), = docs_of("RayCronJob")
    (_, kube_cron), = docs_of("CronJob")
    embedded = [spec for _, spec in configmap_rayjobs()]
    assert embedded == [cron["spec"]["jobTemplate"]], "the CronJob fallback must create the RayCronJob's RayJob"
    assert cron["spec"]["schedule"] == kube_cron["spec"]["schedule"]
    assert len(cron["spec"]["schedule"].split()) == 5
    pod = kube_cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (_, config_map), = docs_of("ConfigMap")
    assert {v["configMap"]["name"] for v in pod["volumes"]} == {config_map["metadata"]["name"]}
    (_, role), = docs_of("Role")
    assert any("rayjobs" in r["resources"] and "create" in r["verbs"] for r in role["rules"])
    assert pod["serviceAccountName"] in [s["name"] for _, b in docs_of("RoleBinding") for s in b["subjects"]]


def test_nightly_job_caches_then_renders_what_the_caching_step_wrote():
    (_, cron), = docs_of("RayCronJob")
    (cache_cmd, generate_cmd) = commands(cron["spec"]["jobTemplate"]["entrypoint"])
    assert "jobs.cache_catalog" in cache_cmd and "jobs.generate_batch" in generate_cmd
    caching_out = option(cache_cmd, "--out").rstrip("/")
    # The caching job's output prefix: the generation job reads the caching manifest published there.
    assert option(generate_cmd, "--caches").rstrip("/") == caching_out
    assert option(generate_cmd, "--model") == option(cache_cmd, "--model"), "caches are tied to their base model"
    assert float(option(generate_cmd, "--gpus-per-actor")) > 0, "a cluster scaled to zero shows no GPU to detect"


def test_serve_applications_import_and_match_the_caches():
    (name, service), = docs_of("RayService")
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    (cache_job,) = [args for where, module, args in job_commands()
                    if module == "jobs.cache_catalog" and where == "rayjob-cache-catalog.yaml"]
    for app in config["applications"]:
        module_name, _, attribute = app["import_path"].partition(":")
        assert module_file(module_name).is_file(), f"{name}: {module_file(module_name).relative_to(REPO)} does not exist"
        module = importlib.import_module(module_name)
        assert callable(getattr(module, attribute, None)), f"{app['import_path']} is not callable"
        args = app["args"]
        assert {"model", "adapter", "caches"} <= set(args), app["import_path"]
        settings = getattr(module, "ServeSettings", None)  # the app's own validation of its args, when it has one
        if settings is not None:
            settings.model_validate(dict(args))
        assert float(args.get("gpus_per_replica", 0)) > 0, "GPU pods may not be up yet when the app is built"
        assert args["caches"].rstrip("/") == option(cache_job, "--out").rstrip("/")
        assert args["model"] == option(cache_job, "--model"), "the service must load the model the caches were made with"


def test_prometheus_scrapes_the_serve_pods_and_the_dashboard_charts_every_app_metric():
    import json

    from pipelines.serve import metrics

    (_, service), = docs_of("RayService")
    cluster = service["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:  # every node exports on the port the monitors scrape, by name
        port = group["rayStartParams"]["metrics-export-port"]
        named = {p["name"]: str(p["containerPort"]) for c in group["template"]["spec"]["containers"]
                 for p in c.get("ports", [])}
        assert named.get("metrics") == port, group.get("groupName", "head")
    (_, monitor), = docs_of("PodMonitor")
    assert monitor["spec"]["selector"]["matchLabels"]["ray.io/cluster"] == service["metadata"]["name"]
    assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["metrics"]
    scrape = yaml.safe_load((INFRA / "monitoring/prometheus.yml").read_text())
    assert any(service["metadata"]["name"] in str(job) for job in scrape["scrape_configs"])

    dashboard = json.loads((INFRA / "monitoring/grafana-dashboard.json").read_text())
    queries = " ".join(t["expr"] for panel in dashboard["panels"] for t in panel["targets"])
    for name in metrics.ALL:
        assert f"ray_{name}" in queries, f"no panel charts {name}"


# -- one set of locations; auth on; what an operator needs to know --------------------------------------------------
def serve_config_apps() -> list[tuple[str, dict]]:
    """Every Serve application's args: the RayService's serveConfigV2 and infra/serve/serve-config.yaml."""
    (name, service), = docs_of("RayService")
    apps = [(name, app) for app in yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]]
    config = yaml.safe_load((INFRA / "serve" / "serve-config.yaml").read_text())
    return apps + [("serve/serve-config.yaml", app) for app in config["applications"]]


def test_every_file_names_the_same_model_adapter_and_caches():
    """Issue 11 (defect 14): the Serve configs, the caching RayJob and both nightly schedules agree, so a cache
    store is always read with the model it was made with."""
    seen: dict[str, set[tuple[str, str]]] = {"model": set(), "adapter": set(), "caches": set()}
    for where, app in serve_config_apps():
        for key in seen:
            seen[key].add((app["args"][key].rstrip("/"), where))
    for where, module, args in job_commands():
        if module == "jobs.cache_catalog":
            seen["model"].add((option(args, "--model"), where))
            seen["caches"].add((option(args, "--out").rstrip("/"), where))
        elif module == "jobs.generate_batch":
            for key in seen:
                seen[key].add((option(args, f"--{key}").rstrip("/"), where))
    for key, values in seen.items():
        assert len({value for value, _ in values}) == 1, f"{key} differs: {sorted(values)}"
    assert len({where for values in seen.values() for _, where in values}) == 5  # 2 Serve configs, 3 RayJob specs


def test_serve_auth_is_on_and_its_token_secret_is_mounted_where_the_app_reads_it():
    token = secret("dreamcache-api-token")
    assert token["stringData"] == {"api-token": "REPLACE_ME"}, "the example must hold no real token"
    for where, app in serve_config_apps():
        path = Path(app["args"].get("api_token_file") or "")
        assert path.name == "api-token", f"{where}: auth must be on by default (api_token_file)"
    (name, service), = docs_of("RayService")
    path = Path(yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"]["api_token_file"])
    cluster = service["spec"]["rayClusterConfig"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        pod = group["template"]["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for container in pod["containers"]:
            mounts = [m for m in container.get("volumeMounts", []) if m["mountPath"] == str(path.parent)]
            assert mounts, f"{name}/{container['name']}: nothing mounted at {path.parent}"
            assert volumes[mounts[0]["name"]]["secret"]["secretName"] == token["metadata"]["name"]


def test_the_scheduler_uses_a_maintained_kubectl_image():
    (_, kube_cron), = docs_of("CronJob")
    (container,) = kube_cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    assert not container["image"].startswith("bitnami/"), "bitnami/kubectl is no longer maintained"
    assert container["image"].split("/")[0] in ("alpine", "registry.k8s.io"), container["image"]


def test_readme_names_the_prerequisites_the_endpoint_and_a_smoke_test():
    readme = (INFRA / "README.md").read_text()
    assert "NVIDIA GPU operator" in readme and "nvidia.com/gpu" in readme
    assert "serve-svc" in readme and "/healthz" in readme and "Authorization: Bearer" in readme
    assert "serve/serve-config.yaml" in readme

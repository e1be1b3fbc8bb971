"""Static checks of infra/: manifests parse, versions agree, security defaults hold.

Nothing is built or deployed: the Dockerfile, the KubeRay manifests, the cluster-launcher config
and the runtime environment are read as text/YAML and checked against pyproject.toml, the
Makefile, the installed Ray and the command line they call.
"""

from __future__ import annotations

import ast
import re
import shlex
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
KUBERAY = INFRA / "kuberay"
LAUNCHER = INFRA / "cluster-launcher" / "aws.yaml"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSW|API_?KEY|ACCESS_KEY|CREDENTIAL", re.IGNORECASE)
SECRET_VALUE = re.compile(
    r"AKIA[0-9A-Z]{16}|-----BEGIN [A-Z ]*PRIVATE KEY-----|ghp_[0-9A-Za-z]{36}|xox[bp]-"
)


def dockerfile_args() -> dict[str, str]:
    text = (INFRA / "Dockerfile").read_text()
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.MULTILINE))


def requirement(name: str) -> SpecifierSet:
    for line in PYPROJECT["project"]["dependencies"]:
        req = Requirement(line)
        if req.name == name:
            return req.specifier
    raise AssertionError(f"{name} is not a dependency in pyproject.toml")


def yaml_files() -> list[Path]:
    return sorted([*INFRA.rglob("*.yaml"), *INFRA.rglob("*.yml")])


def manifests() -> dict[str, dict[str, Any]]:
    return {p.name: yaml.safe_load(p.read_text()) for p in sorted(KUBERAY.glob("ray*.yaml"))}


def cluster_specs() -> Iterator[tuple[str, dict[str, Any]]]:
    """Every RayCluster spec: the RayCluster's own and each RayJob's rayClusterSpec."""
    for name, doc in manifests().items():
        if doc["kind"] == "RayCluster":
            yield name, doc["spec"]
        elif doc["kind"] == "RayJob":
            yield name, doc["spec"]["rayClusterSpec"]


def pod_templates(spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield spec["headGroupSpec"]["template"]["spec"]
    for group in spec["workerGroupSpecs"]:
        yield group["template"]["spec"]


def walk(node: Any) -> Iterator[Any]:
    yield node
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else []
    for child in children:
        yield from walk(child)


# --- parsing --------------------------------------------------------------------------------


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(INFRA)))
def test_yaml_parses(path: Path) -> None:
    documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert documents and all(isinstance(d, dict) for d in documents)


def test_kuberay_manifests_are_ray_io_v1() -> None:
    kinds = {name: (doc["apiVersion"], doc["kind"]) for name, doc in manifests().items()}
    assert kinds == {
        "raycluster.yaml": ("ray.io/v1", "RayCluster"),
        "rayjob-segment.yaml": ("ray.io/v1", "RayJob"),
        "rayjob-train.yaml": ("ray.io/v1", "RayJob"),
    }


def test_cluster_launcher_config_is_valid_for_this_ray() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load(LAUNCHER.read_text()))
    validate_config(config)  # Ray's own JSON schema
    types = config["available_node_types"]
    assert types["gpu"]["resources"].get("GPU", 0) >= 1
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    for name, node_type in types.items():
        if name != config["head_node_type"]:
            assert 0 <= node_type["min_workers"] <= node_type["max_workers"], name


def test_runtime_env_ships_source_only() -> None:
    env = yaml.safe_load((INFRA / "runtime_env.yaml").read_text())
    assert set(env) <= {"excludes", "env_vars", "working_dir"}  # the image has the dependencies
    assert {".venv/", ".git/", ".mypy_cache/"} <= set(env["excludes"])


# --- versions -------------------------------------------------------------------------------


def test_image_versions_satisfy_pyproject() -> None:
    args = dockerfile_args()
    assert SpecifierSet(PYPROJECT["project"]["requires-python"]).contains(args["PYTHON_VERSION"])
    assert requirement("ray").contains(args["RAY_VERSION"])
    assert requirement("torch").contains(args["TORCH_VERSION"])


def test_image_runs_the_ray_and_torch_the_tests_run() -> None:
    args = dockerfile_args()
    # Jobs are submitted from a client of this Ray: the cluster must run the same minor release.
    assert args["RAY_VERSION"].split(".")[:2] == ray.__version__.split(".")[:2]
    makefile_torch = re.search(r"torch==([\w.]+)", (REPO / "Makefile").read_text())
    assert makefile_torch and makefile_torch.group(1) == args["TORCH_VERSION"]


def test_manifests_name_the_image_ray_version_and_package_version() -> None:
    ray_version = dockerfile_args()["RAY_VERSION"]
    images = set()
    for name, spec in cluster_specs():
        assert spec["rayVersion"] == ray_version, name
        for pod in pod_templates(spec):
            images |= {c["image"] for c in pod["containers"]}
    images.add(yaml.safe_load(LAUNCHER.read_text())["docker"]["image"])
    assert len(images) == 1, images
    assert images.pop().rsplit(":", 1)[1] == PYPROJECT["project"]["version"]


# --- security defaults ----------------------------------------------------------------------


def test_dockerfile_runs_as_non_root_and_copies_only_the_project() -> None:
    text = (INFRA / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    sources = {
        src
        for line in re.findall(r"^COPY\s+(.+)$", text, re.MULTILINE)
        for src in shlex.split(line)[:-1]
        if not src.startswith("--")
    }
    project = {"pyproject.toml", "README.md", "wsi_pipeline", "jobs", "configs"}
    assert sources == project | {"infra/constraints.txt"}
    ignore = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ignore[0] == "*"  # an allow-list build context
    assert {f"!{source}" for source in sources} <= set(ignore)


def test_no_secrets_in_image_or_manifests() -> None:
    dockerfile = (INFRA / "Dockerfile").read_text()
    for name in re.findall(r"^(?:ENV|ARG)\s+(\w+)", dockerfile, re.MULTILINE):
        assert not SECRET_NAME.search(name), name
    for path in [INFRA / "Dockerfile", REPO / ".dockerignore", *yaml_files()]:
        assert not SECRET_VALUE.search(path.read_text()), path
    for path in yaml_files():
        for doc in yaml.safe_load_all(path.read_text()):
            for node in walk(doc):
                if isinstance(node, dict) and "name" in node and "value" in node:
                    assert not SECRET_NAME.search(str(node["name"])), (path, node["name"])
    env_vars = yaml.safe_load((INFRA / "runtime_env.yaml").read_text()).get("env_vars", {})
    assert not any(SECRET_NAME.search(k) for k in env_vars)


def test_dashboard_is_private_and_token_auth_is_on() -> None:
    for name, spec in cluster_specs():
        head = spec["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP", name
        assert not head.get("enableIngress", False), name
        assert spec["authOptions"]["mode"] == "token", name
        assert "dashboard-host" not in head["rayStartParams"], name  # KubeRay's in-pod default
    for path in yaml_files():
        for doc in yaml.safe_load_all(path.read_text()):
            for node in walk(doc):
                if isinstance(node, dict) and node.get("kind") == "Service":
                    assert node["spec"].get("type", "ClusterIP") == "ClusterIP", path
                if isinstance(node, dict) and node.get("name") == "RAY_AUTH_MODE":
                    assert node.get("value") == "token", path
    launcher = yaml.safe_load(LAUNCHER.read_text())
    head_start = " ".join(launcher["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start
    assert "--env RAY_AUTH_MODE=token" in launcher["docker"]["run_options"]
    assert "security_group" not in launcher["provider"]  # Ray's default: SSH + intra-cluster


def test_pods_run_as_non_root_without_privilege_escalation() -> None:
    for name, spec in cluster_specs():
        for pod in pod_templates(spec):
            assert pod["securityContext"]["runAsNonRoot"] is True, name
            assert pod["securityContext"]["runAsUser"] != 0, name
            for container in pod["containers"]:
                assert container["securityContext"]["allowPrivilegeEscalation"] is False, name


def test_checkpoints_load_with_weights_only() -> None:
    """Every torch.load in the package passes weights_only=True (no arbitrary unpickling)."""
    calls = 0
    for path in sorted((REPO / "wsi_pipeline").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "load"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "torch"
            ):
                calls += 1
                weights_only = [k for k in node.keywords if k.arg == "weights_only"]
                assert weights_only, f"{path.name}:{node.lineno} torch.load without weights_only"
                value = weights_only[0].value
                assert isinstance(value, ast.Constant) and value.value is True, path.name
    checkpoint = (REPO / "wsi_pipeline" / "checkpoint.py").read_text()
    assert calls >= 1 and "weights_only=True" in checkpoint


# --- the cluster shape and the job commands -------------------------------------------------


def test_worker_groups_have_autoscaling_bounds_and_a_gpu_group() -> None:
    for name, spec in cluster_specs():
        groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
        assert {"cpu", "gpu"} <= set(groups), name
        for group in groups.values():
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], name
        (gpu_container,) = groups["gpu"]["template"]["spec"]["containers"]
        assert gpu_container["resources"]["limits"]["nvidia.com/gpu"] >= 1, name
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", name
    assert manifests()["raycluster.yaml"]["spec"]["enableInTreeAutoscaling"] is True


@pytest.mark.parametrize("manifest", ["rayjob-segment.yaml", "rayjob-train.yaml"])
def test_rayjob_entrypoints_parse_with_the_cli(manifest: str) -> None:
    from wsi_pipeline.cli.main import build_parser

    words = shlex.split(manifests()[manifest]["spec"]["entrypoint"])
    assert words[0] == "python" and words[1].startswith("/app/jobs/")
    script = REPO / words[1].removeprefix("/app/")
    assert script.exists(), script
    command = {"segment_slides.py": "segment", "train.py": "train"}[script.name]
    args = build_parser().parse_args([command, *words[2:]])  # exits on an unknown flag
    assert (REPO / args.config.removeprefix("/app/")).exists()


def test_network_policy_lets_only_submitters_reach_the_head() -> None:
    policy = yaml.safe_load((KUBERAY / "networkpolicy.yaml").read_text())
    assert policy["kind"] == "NetworkPolicy" and policy["spec"]["policyTypes"] == ["Ingress"]
    assert policy["spec"]["podSelector"]["matchLabels"] == {"ray.io/node-type": "head"}
    own, submitters = policy["spec"]["ingress"]
    # The cluster's own pods: those every manifest labels as wsi-pipeline.
    label = own["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/name"]
    for name, spec in cluster_specs():
        groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
        for group in groups:
            labels = group["template"].get("metadata", {}).get("labels", {})
            assert labels.get("app.kubernetes.io/name") == label, name
    # Anyone else only on the Jobs API port, and only as a submitter of our RayJobs.
    assert submitters["ports"] == [{"protocol": "TCP", "port": 8265}]
    jobs = {m["metadata"]["name"] for m in manifests().values() if m["kind"] == "RayJob"}
    selector = submitters["from"][0]["podSelector"]["matchExpressions"][0]
    assert set(selector["values"]) == jobs


def test_image_is_reproducible_base_by_digest_and_dependencies_pinned() -> None:
    text = (INFRA / "Dockerfile").read_text()
    args = dockerfile_args()
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", args["BASE_DIGEST"])
    assert re.search(r"^FROM \S+@\$\{BASE_DIGEST\}", text, re.MULTILINE)
    assert text.count("-c /tmp/constraints.txt") == 2  # ray and the package
    pins = dict(
        line.split("==")
        for line in (INFRA / "constraints.txt").read_text().splitlines()
        if line and not line.startswith("#")
    )
    for spec in PYPROJECT["project"]["dependencies"]:
        req = Requirement(spec.split("#")[0])
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"{name} is not pinned in infra/constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), (name, pins[name])
    assert pins["torch"] == args["TORCH_VERSION"] and pins["ray"] == args["RAY_VERSION"]

"""deploy/: the KubeRay manifests against KubeRay's CRD schemas (vendored in deploy/crds/, read as the API server
reads them), every `cman` command in the manifests and the Dockerfile against the real CLI parser, and the
RayService's serveConfigV2 against serve_app/config.yaml and the serve app. No cluster, no Docker, no network.

How Kubernetes' OpenAPI extensions are handled (`kube_validator`):
- unknown fields are errors (`kubectl apply`'s default strict field validation), except under
  `x-kubernetes-preserve-unknown-fields` (none in these schemas); the root `metadata` (a bare object in the CRD) is
  checked as ObjectMeta, its name as KubeRay's controller checks it;
- `x-kubernetes-int-or-string`: an integer or a string (the schemas' `anyOf` says the same; added where missing);
- `x-kubernetes-list-type`: `set` items unique, `map` items unique by `x-kubernetes-list-map-keys` (a key's schema
  default counts when it is absent, as after the API server's defaulting), `atomic` no check;
- `x-kubernetes-map-type` only affects merging: no check;
- `x-kubernetes-validations` (CEL) cannot be evaluated here: a manifest that sets a field carrying CEL rules fails,
  so no rule is ever skipped silently;
- `nullable`, formats int32/int64; any other `x-kubernetes-*` keyword fails the test (a new KubeRay release that
  brings one needs a look first).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import importlib.util
import io
import json
import re
import shlex
import sys
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import tomllib
import yaml
from tiny import REPO

DEPLOY = REPO / "deploy"
CRDS = DEPLOY / "crds"
KUBERAY_RELEASE = "v1.7.0"
MANIFESTS = {
    "rayjob": ("rayjob.yaml", "rayjob.v1.schema.json"),
    "rayservice": ("rayservice.yaml", "rayservice.v1.schema.json"),
}
KNOWN_EXTENSIONS = {
    "x-kubernetes-int-or-string",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-map-type",
    "x-kubernetes-validations",
    "x-kubernetes-preserve-unknown-fields",
}
# The root metadata: ObjectMeta (the fields a manifest sets), its name as KubeRay v1.7.0's controller requires for a
# RayJob or RayService (ValidateRayJobMetadata / ValidateRayServiceMetadata: a DNS-1035 label of at most 53 - 6).
OBJECT_META = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "maxLength": 47, "pattern": r"^[a-z]([-a-z0-9]*[a-z0-9])?$"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


# ---- Kubernetes structural schemas as JSON Schema ----------------------------------------------------------------
def kube_schema(node: dict, path: str = "") -> dict:
    """A copy of a CRD's structural schema with Kubernetes' semantics spelled out in JSON Schema (module docstring)."""
    out = dict(node)
    unknown = {k for k in node if k.startswith("x-kubernetes-")} - KNOWN_EXTENSIONS
    assert not unknown, f"{path or '/'}: unhandled Kubernetes extension(s) {sorted(unknown)}"
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in node:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and "type" in node:
        out["type"] = [node["type"], "null"]
    if "properties" in node:
        out["properties"] = {k: kube_schema(v, f"{path}/{k}") for k, v in node["properties"].items()}
    if isinstance(node.get("items"), dict):
        out["items"] = kube_schema(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = kube_schema(node["additionalProperties"], f"{path}/*")
    for key in ("anyOf", "allOf", "oneOf"):
        if key in node:
            out[key] = [kube_schema(s, path) for s in node[key]]
    is_object = node.get("type") == "object" or "properties" in node
    if is_object and "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False  # strict field validation: unknown fields are refused
    return out


def _list_type(validator, list_type: str, instance: Any, schema: dict):
    if not validator.is_type(instance, "array") or list_type == "atomic":
        return
    if list_type == "set":
        dumped = [json.dumps(item, sort_keys=True) for item in instance]
        if len(dumped) != len(set(dumped)):
            yield jsonschema.ValidationError(f"x-kubernetes-list-type set: duplicate items in {instance!r}")
    elif list_type == "map":
        keys = schema.get("x-kubernetes-list-map-keys", [])
        defaults = {k: schema.get("items", {}).get("properties", {}).get(k, {}).get("default") for k in keys}
        seen: set[tuple] = set()
        for item in instance:
            key = tuple(json.dumps(item.get(k, defaults[k])) for k in keys)
            if key in seen:
                yield jsonschema.ValidationError(
                    f"x-kubernetes-list-type map: two items with {dict(zip(keys, key, strict=True))}"
                )
            seen.add(key)


def _cel_rules(validator, rules: list, instance: Any, schema: dict):
    listed = "; ".join(rule["rule"] for rule in rules)
    yield jsonschema.ValidationError(f"field guarded by CEL rules this test cannot evaluate ({listed}): check by hand")


FORMATS = jsonschema.FormatChecker()


@FORMATS.checks("int32")
def _int32(value: object) -> bool:
    return not isinstance(value, int) or -(2**31) <= value < 2**31


@FORMATS.checks("int64")
def _int64(value: object) -> bool:
    return not isinstance(value, int) or -(2**63) <= value < 2**63


# OpenAPI 3.0's schema object is JSON Schema draft 4 (boolean exclusiveMinimum, no `const`) plus extensions.
KubeValidator = jsonschema.validators.extend(
    jsonschema.Draft4Validator,
    {"x-kubernetes-list-type": _list_type, "x-kubernetes-validations": _cel_rules},
)


@cache
def vendored(name: str) -> dict:
    return json.loads((CRDS / name).read_text())


@cache
def kube_validator(schema_file: str) -> jsonschema.protocols.Validator:
    schema = copy.deepcopy(vendored(schema_file)["openAPIV3Schema"])
    schema["properties"]["metadata"] = OBJECT_META
    schema = kube_schema(schema)
    KubeValidator.check_schema(schema)
    return KubeValidator(schema, format_checker=FORMATS)


def schema_errors(manifest: dict, schema_file: str) -> list[str]:
    errors = kube_validator(schema_file).iter_errors(manifest)
    return sorted(f"{'/'.join(map(str, e.absolute_path)) or '/'}: {e.message}" for e in errors)


def manifest(name: str) -> dict:
    return yaml.safe_load((DEPLOY / MANIFESTS[name][0]).read_text())


# ---- (a) the manifests against KubeRay's CRD schemas -------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_manifest_valid_for_kuberay_crd(name: str):
    doc = manifest(name)
    record = vendored(MANIFESTS[name][1])
    assert doc["apiVersion"] == f"{record['group']}/{record['version']}" and doc["kind"] == record["kind"]
    assert schema_errors(doc, MANIFESTS[name][1]) == []


def _set(doc: dict, path: str, value: Any) -> dict:
    doc = copy.deepcopy(doc)
    *parents, last = path.split(".")
    node: Any = doc
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    node[last] = value
    return doc


SPEC_RJ = "spec.rayClusterSpec"
SPEC_RS = "spec.rayClusterConfig"
HEAD_RS = f"{SPEC_RS}.headGroupSpec.template.spec.containers.0"
BROKEN = [  # (manifest, field path, bad value, what the error must name)
    ("rayjob", "spec.shutdownAfterJobFinish", True, "Additional properties are not allowed"),  # typo'd field
    ("rayjob", f"{SPEC_RJ}.headGroupSpec.rayStartParams.num-cpus", 0, "is not of type 'string'"),  # wrong type
    ("rayjob", f"{SPEC_RJ}.authOptions.mode", "tokens", "is not one of"),  # enum
    ("rayjob", "spec.ttlSecondsAfterFinished", 2**40, "is not a 'int32'"),  # format
    ("rayjob", "spec.managedBy", "ray.io/kuberay-operator", "CEL rules"),  # a field only CEL checks: refused here
    ("rayservice", f"{HEAD_RS}.resources.limits.memory", "2 GiB", "does not match"),  # int-or-string quantity
    ("rayservice", f"{HEAD_RS}.resources.limits.cpu", 1.5, "is not valid under any of the given schemas"),
    ("rayservice", f"{HEAD_RS}.env.1.name", "CMAN_API_KEY", "two items with"),  # list-map: duplicate env name
    ("rayservice", "metadata.name", "2cman", "does not match"),  # KubeRay: a DNS-1035 label
    ("rayservice", "spec.serveConfigV2", {"applications": []}, "is not of type 'string'"),
]


@pytest.mark.parametrize(("name", "path", "value", "expected"), BROKEN, ids=[f"{b[0]}:{b[1]}" for b in BROKEN])
def test_broken_manifest_fails(name: str, path: str, value: Any, expected: str):
    errors = schema_errors(_set(manifest(name), path, value), MANIFESTS[name][1])
    assert any(expected in e for e in errors), errors


def test_vendored_schemas_name_their_release():
    notice = (CRDS / "README.md").read_text()
    for _, schema_file in MANIFESTS.values():
        source = vendored(schema_file)["source"]
        assert source["release"] == KUBERAY_RELEASE and re.fullmatch(r"[0-9a-f]{40}", source["commit"])
        assert source["license"] == "Apache-2.0" and source["commit"] in notice and source["sha256"] in notice
    assert KUBERAY_RELEASE in notice


# ---- (b) every cman command and flag exists -----------------------------------------------------------------------
def shell_commands(script: str) -> list[list[str]]:
    """The simple commands of a POSIX shell line (split at &&, ||, ;, |, &, newlines), as argv lists."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=";&|\n")
    lexer.whitespace = " \t\r"  # a newline ends a command
    lexer.whitespace_split = True
    commands, current = [], []
    for token in lexer:
        if token and set(token) <= set(";&|\n"):
            commands.append(current)
            current = []
        else:
            current.append(token)
    return [c for c in commands + [current] if c]


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n(\s*#[^\n]*\n)*", " ", text)
    out = []
    for line in joined.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def cman_commands() -> list[tuple[str, list[str]]]:
    """(where, argv) for every `cman` command the RayJob entrypoint and the Dockerfile run."""
    found = [("rayjob.yaml entrypoint", argv) for argv in shell_commands(manifest("rayjob")["spec"]["entrypoint"])]
    for word, rest in dockerfile_instructions((DEPLOY / "Dockerfile").read_text()):
        if word == "RUN":
            found += [(f"Dockerfile RUN {rest[:40]}", argv) for argv in shell_commands(rest)]
        elif word in ("CMD", "ENTRYPOINT"):
            found.append((f"Dockerfile {word}", json.loads(rest) if rest.startswith("[") else shlex.split(rest)))
    return [(where, argv) for where, argv in found if argv[0] == "cman"]


def _parse(argv: list[str]) -> tuple[argparse.Namespace | None, str]:
    """cman's real parser on `argv`: (namespace, "") or (None, argparse's message); `--help` gives (None, help)."""
    from cman.cli import build_parser

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            return build_parser().parse_args(argv), ""
        except SystemExit as stop:
            return None, (out.getvalue() if stop.code == 0 else err.getvalue().strip().splitlines()[-1])


def _options_in_help(help_text: str) -> set[str]:
    """The option strings an argparse help lists (`  -v, --verbose  ...`, `  --output-dir OUTPUT_DIR`)."""
    options = set()
    for line in help_text.splitlines():
        if line.startswith("  -"):
            head = re.split(r"\s{2,}", line.strip())[0]
            options |= {part.split()[0] for part in head.split(", ")}
    return options


def cli_problems(argv: list[str]) -> list[str]:
    """Why `argv` (starting with `cman`) is not a valid cman command line: argparse's own error, or a flag that is
    not spelt exactly as the subcommand's --help lists it (argparse would accept an abbreviation such as `--addr`,
    and a hidden underscore alias is no spelling for new files)."""
    args = argv[1:]
    namespace, message = _parse(args)
    if namespace is None:
        return [message]
    command_path = args[: next((i for i, a in enumerate(args) if a.startswith("-")), len(args))]
    _, help_text = _parse([*command_path, "--help"])
    listed = _options_in_help(help_text)
    flags = [a.split("=", 1)[0] for a in args if a.startswith("-") and a != "--"]
    return [f"{flag}: not an option of `cman {' '.join(command_path)}`" for flag in flags if flag not in listed]


def test_every_cman_command_in_deploy_exists():
    commands = cman_commands()
    # what the manifests and the Dockerfile run (so that a parsing slip cannot make this test vacuous)
    assert {argv[1] for _, argv in commands} == {"tune", "index", "demo-data", "quickstart"}, commands
    problems = [f"{where}: {' '.join(argv)}: {p}" for where, argv in commands for p in cli_problems(argv)]
    assert problems == []


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ("cman tune --config demo --local-dirr /x", "unrecognized arguments: --local-dirr"),  # misspelt
        ("cman tune --config demo --addr http://h:8265", "--addr: not an option"),  # argparse allows abbreviations
        ("cman tune --config demo --output_dir s3://b/p", "--output_dir: not an option"),  # hidden legacy alias
        ("cman tunes --config demo", "invalid choice: 'tunes'"),  # no such command
        ("cman index --out /x", "the following arguments are required: --checkpoint"),
        ("cman tune --config demo --num-samples eight", "invalid int value: 'eight'"),
    ],
)
def test_misspelt_cman_command_fails(argv: str, expected: str):
    assert any(expected in p for p in cli_problems(shlex.split(argv))), cli_problems(shlex.split(argv))


def test_misspelt_flag_in_the_rayjob_fails():
    entrypoint = manifest("rayjob")["spec"]["entrypoint"].replace("--local-dir", "--local-dirr")
    problems = [p for argv in shell_commands(entrypoint) if argv[0] == "cman" for p in cli_problems(argv)]
    assert any("--local-dirr" in p for p in problems), problems


def test_shell_parsing_finds_every_command():
    script = "cman tune --config 'a b' && cman index --out x; echo hi | cman demo-data d\n cman eval --config c"
    assert [argv[:2] for argv in shell_commands(script)] == [
        ["cman", "tune"],
        ["cman", "index"],
        ["echo", "hi"],
        ["cman", "demo-data"],
        ["cman", "eval"],
    ]
    assert shell_commands(script)[0][3] == "a b"


def test_set_overrides_are_config_keys():
    """Every `--set` of the RayJob names a real config key with a valid value: `cman tune`'s on its --config,
    `cman index`'s (no --config: the checkpoint's own config) on the config the sweep trained with."""
    from cman.api import bundled_config
    from cman.config import load_config, parse_override

    commands = [_parse(argv[1:])[0] for where, argv in cman_commands() if where.startswith("rayjob")]
    sweep_config = next(ns.config for ns in commands if ns.command == "tune")
    for ns in commands:
        names = getattr(ns, "config", None) or sweep_config  # `--config` is repeatable: a list
        for name in [names] if isinstance(names, str) else names:
            path = Path(name) if Path(name).is_file() else bundled_config(name)
            load_config(path, dict(parse_override(item) for item in getattr(ns, "overrides", [])))


# ---- (c) serveConfigV2 is serve_app/config.yaml ------------------------------------------------------------------
@cache
def render_module():
    spec = importlib.util.spec_from_file_location("deploy_render", DEPLOY / "render.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def serve_config_v2() -> dict:
    return yaml.safe_load(manifest("rayservice")["spec"]["serveConfigV2"])


def test_serve_config_v2_is_rendered_from_serve_app_config():
    render = render_module()
    text = (DEPLOY / "rayservice.yaml").read_text()
    assert render.render(text) == text, "deploy/rayservice.yaml is out of date: run python deploy/render.py"
    base = yaml.safe_load((REPO / "serve_app" / "config.yaml").read_text())
    assert serve_config_v2() == render.apply_overrides(base)


def test_overrides_follow_serve_app_config():
    """A replacing override whose key serve_app/config.yaml no longer has is an error, not a new key."""
    render = render_module()
    stale = render.Override(("applications", "cman", "args", "index"), "/x", "renamed key")
    with pytest.raises(KeyError, match="override applications.cman.args.index"):
        render.apply_overrides(yaml.safe_load((REPO / "serve_app" / "config.yaml").read_text()), (stale,))


def _serve_deployment_names() -> set[str]:
    """Deployment names serve_app defines: `name=` of serve.deployment(...) calls and DEPLOYMENT_NAMES' values."""
    names = set()
    for path in (REPO / "serve_app").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "serve.deployment":
                names |= {k.value.value for k in node.keywords if k.arg == "name" and isinstance(k.value, ast.Constant)}
            if isinstance(node, ast.Assign) and any(ast.unparse(t) == "DEPLOYMENT_NAMES" for t in node.targets):
                names |= {v.value for v in node.value.values if isinstance(v, ast.Constant)}
    return names


def test_serve_config_v2_fits_serve_and_the_app():
    from ray.serve.schema import ServeDeploySchema

    from cman.config import ServeConfig
    from serve_app.app import ServeArgs

    config = serve_config_v2()
    ServeDeploySchema.model_validate(config)  # what KubeRay hands to Serve's REST API
    known = _serve_deployment_names()
    assert {"Ingress", "Retriever"} <= known, known
    for app in config["applications"]:
        module, _, attr = app["import_path"].partition(":")
        source = REPO / Path(*module.split(".")).with_suffix(".py")
        assert source.is_file(), f"import_path {app['import_path']}: no {source}"
        defined = {n.name for n in ast.parse(source.read_text()).body if isinstance(n, ast.FunctionDef)}
        assert attr in defined, f"import_path {app['import_path']}: {source} defines no {attr}"
        args = ServeArgs.model_validate(app["args"])  # build_app's own argument model (extra keys refused)
        ServeConfig.model_validate(args.serve)  # the `serve:` keys (extra keys refused)
        assert args.host == config["http_options"]["host"]
        for deployment in app.get("deployments", []):
            assert deployment["name"] in known, f"no deployment {deployment['name']!r} in serve_app ({known})"


# ---- the files agree with each other -----------------------------------------------------------------------------
def _containers(doc: dict) -> list[tuple[dict, dict]]:
    cluster = doc["spec"].get("rayClusterSpec") or doc["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [(g["template"]["spec"], c) for g in groups for c in g["template"]["spec"]["containers"]]


def test_manifests_agree_with_each_other_and_pyproject():
    constraints = (REPO / "constraints.txt").read_text().splitlines()
    ray_pin = next(line for line in constraints if line.startswith("ray=="))  # the Ray version CI tests
    job, service = manifest("rayjob"), manifest("rayservice")
    claim = yaml.safe_load((DEPLOY / "storage.yaml").read_text())["metadata"]["name"]
    images = set()
    for doc in (job, service):
        cluster = doc["spec"].get("rayClusterSpec") or doc["spec"]["rayClusterConfig"]
        assert ray_pin.endswith(f"=={cluster['rayVersion']}"), (ray_pin, cluster["rayVersion"])
        for pod, container in _containers(doc):
            images.add(container["image"])
            volumes = {v["name"]: v for v in pod.get("volumes", [])}
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{container['name']}: no volume {mount['name']}"
            claims = {v["persistentVolumeClaim"]["claimName"] for v in volumes.values() if "persistentVolumeClaim" in v}
            assert claims <= {claim}, claims
    assert len(images) == 1, images
    # the service loads what the job leaves: best/ under the sweep's --local-dir, the index, the same gallery
    runs = {ns.command: ns for ns in (_parse(argv[1:])[0] for where, argv in cman_commands() if "rayjob" in where)}
    args = serve_config_v2()["applications"][0]["args"]
    assert args["checkpoint"] == f"{runs['tune'].local_dir}/best" == runs["index"].checkpoint
    assert args["index_dir"] == runs["index"].out
    job_store = dict(item.split("=", 1) for item in runs["index"].overrides)["serve.gallery_store"]
    assert args["serve"]["gallery_store"] == job_store


def test_dockerfile_installs_the_package_on_a_cpu_torch():
    text = (DEPLOY / "Dockerfile").read_text()
    instructions = dockerfile_instructions(text)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    constraints = (REPO / "constraints.txt").read_text().splitlines()
    torch_pin = next(line for line in constraints if line.startswith("torch=="))
    assert f"ARG TORCH_VERSION={torch_pin.split('==')[1]}" in text, torch_pin
    assert "download.pytorch.org/whl/cpu" in text
    runs = " ".join(rest for word, rest in instructions if word == "RUN")
    assert not re.search(r"torchvision|torchaudio", runs)
    assert '[all]"' in runs and "-c /wheels/constraints.txt" in runs  # every extra, at the versions CI tests
    # every top-level folder the package is built from is copied in and passed by the ignore file
    setuptools = project["tool"]["setuptools"]
    package_dirs = setuptools.get("package-dir", {})
    tops = {package_dirs.get(p, p.replace(".", "/")).split("/")[0] for p in setuptools["packages"]}
    copies = [rest.split()[:-1] for word, rest in instructions if word == "COPY" and not rest.startswith("--")]
    copied = {source for sources in copies for source in sources}
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    for top in tops | {"pyproject.toml", "README.md", "LICENSE", "constraints.txt"}:
        assert top in copied, f"the Dockerfile does not copy {top}"
        assert f"!{top}" in ignore, f"Dockerfile.dockerignore keeps {top} out of the build context"
    python = re.search(r"ARG PYTHON_IMAGE=python:(\d+)\.(\d+)", text)
    low = re.search(r">=(\d+)\.(\d+)", project["project"]["requires-python"])
    assert python and tuple(map(int, python.groups())) >= tuple(map(int, low.groups()))

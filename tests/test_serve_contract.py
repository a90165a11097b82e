"""The HTTP contract: /openapi.json is fully typed, and schemathesis (seeded, bounded) finds no deviation from it."""

from __future__ import annotations

import httpx
import pytest

pytestmark = pytest.mark.ray

EXAMPLES = {"positive": 12, "negative": 8}  # per operation; 8 operations


@pytest.fixture(scope="module")
def openapi(served_app: dict) -> dict:
    return httpx.get(served_app["url"] + "/openapi.json", timeout=60).json()


def _operations(openapi: dict):
    for path, methods in openapi["paths"].items():
        for method, op in methods.items():
            yield f"{method.upper()} {path}", op


def test_every_response_is_typed(openapi: dict) -> None:
    schemas = openapi["components"]["schemas"]
    assert "HTTPValidationError" not in schemas and schemas["ErrorResponse"]["required"] == ["error"]
    problems = []
    for name, op in _operations(openapi):
        ok = op["responses"]["200"]["content"]
        for media, body in ok.items():
            schema = body.get("schema", {})
            if not (schema.get("$ref") or schema.get("format") == "binary"):
                problems.append(f"{name}: free-form 200 ({media}: {schema})")
        for status, response in op["responses"].items():
            if status.startswith("4") or status.startswith("5"):
                ref = response["content"]["application/json"]["schema"].get("$ref", "")
                if not ref.endswith("/ErrorResponse"):
                    problems.append(f"{name}: {status} is {ref or 'untyped'}")
        if not {"401", "503", "504"} <= set(op["responses"]):
            problems.append(f"{name}: 401/503/504 undocumented")
    assert not problems, "\n".join(problems)
    search = openapi["paths"]["/search"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    fields = schemas[search["$ref"].rsplit("/", 1)[1]]["properties"]
    assert (fields["k"]["minimum"], fields["k"]["maximum"]) == (1, 100)
    assert schemas[fields["target"]["$ref"].rsplit("/", 1)[1]]["enum"] == ["text", "audio", "image"]
    assert set(openapi["paths"]["/items"]["post"]["responses"]) >= {"400", "403", "413", "415", "422"}


def test_schemathesis_finds_no_contract_violation(served_app: dict) -> None:
    import schemathesis
    from hypothesis import HealthCheck, given, seed, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    schema = schemathesis.openapi.from_url(served_app["url"] + "/openapi.json")
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    failures, calls = [], 0
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode, examples in EXAMPLES.items():

            @seed(1234)
            @settings(
                max_examples=examples,
                deadline=None,
                database=None,
                derandomize=True,
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(generation_mode=schemathesis.GenerationMode(mode)))
            def run(case) -> None:
                nonlocal calls
                calls += 1
                case.call_and_validate(checks=checks, timeout=60)

            try:
                run()
            except Unsatisfiable:
                assert mode == "negative" and not operation.body and not operation.path_parameters, operation.label
            except Exception as err:  # noqa: BLE001 - collect every operation's failure, then fail once
                failures.append(f"{operation.label} ({mode}): {str(err)[:600]}")
    assert calls >= 8 * 10, calls
    assert not failures, "\n\n".join(failures)

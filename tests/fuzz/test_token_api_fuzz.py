"""The token API fuzzed from its own OpenAPI document (schemathesis): valid and invalid inputs alike
get a documented status with a documented JSON body, invalid ones are refused, admin routes refuse
a missing bearer, and nothing answers 5xx or shows a traceback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from tests.support import ADMIN_KEY, GatewayProcess, gateway_env, start_gateway

SCHEMA = schemathesis.openapi.from_path(str(Path(__file__).resolve().parents[2] / "service" / "openapi.json"))


@SCHEMA.auth()
class AdminBearer:
    """The admin key, on the operations that declare the admin bearer (schemathesis also tries
    them without it, expecting a refusal)."""

    def get(self, case: schemathesis.Case, context: Any) -> str:
        return ADMIN_KEY

    def set(self, case: schemathesis.Case, data: str, context: Any) -> None:
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}


@pytest.fixture(scope="module")
def fuzzed_gateway(upstream: object, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    tmp = tmp_path_factory.mktemp("fuzz")
    process = start_gateway(gateway_env(None, tmp), tmp)
    yield process
    process.stop()


@SCHEMA.parametrize()
# derandomized: the same examples every run, so CI never fails on a new draw (raise max_examples, or
# drop derandomize, to explore further by hand)
@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_token_api_answers_every_input_as_documented(case: schemathesis.Case, fuzzed_gateway: GatewayProcess) -> None:
    # positive_data_acceptance is left out: opaque values (keys, key ids, cursors) can match the
    # schema and still name nothing (404, 400), and team names must be printable, which JSON Schema
    # cannot state
    response = case.call_and_validate(
        base_url=fuzzed_gateway.url, excluded_checks=[schemathesis.checks.positive_data_acceptance]
    )
    assert response.status_code < 500 or response.status_code == 503
    assert "Traceback" not in response.text


def test_the_fuzzed_gateway_logged_no_traceback(fuzzed_gateway: GatewayProcess) -> None:
    log = fuzzed_gateway.log_text()
    assert "Traceback" not in log and '"level":"error"' not in log.replace(" ", "")

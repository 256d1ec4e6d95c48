"""Schemathesis against the running service's /openapi.json: whatever the generated requests, no 5xx.

Every operation of the spec gets `MAX_EXAMPLES` generated requests (valid and invalid by schema). The
operations are driven by hand with hypothesis rather than `schemathesis.pytest.from_fixture`, whose lazy
loader reads `request.node._nodeid`, which pytest 9 no longer has.
"""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402 - after the importorskip
from test_service import service_config, teacher_entry, tiny_teacher  # noqa: E402

from clients.client import run_local_service  # noqa: E402

MAX_EXAMPLES = 12


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory):
    root = tmp_path_factory.mktemp("schema")
    cfg = service_config(root, [teacher_entry("tiny", tiny_teacher())], max_upload_bytes=50_000, max_topk_samples=2)
    with run_local_service(cfg, log_path=root / "serve.log") as url:
        yield schemathesis.openapi.from_url(f"{url}/openapi.json")


def test_no_server_errors(api_schema):
    failures: list[str] = []
    tried = 0
    for result in api_schema.get_all_operations():
        operation = result.ok()

        @settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
                  phases=[Phase.explicit, Phase.generate], database=None)
        @given(case=operation.as_strategy())
        def run(case):
            nonlocal tried
            tried += 1
            response = case.call(timeout=60)
            if response.status_code >= 500 or (response.status_code >= 400 and "error" not in response.json()):
                failures.append(f"{case.method.upper()} {case.formatted_path} -> {response.status_code}: "
                                f"{response.text[:200]}")

        run()
    assert tried >= 5 * MAX_EXAMPLES
    assert not failures, "\n".join(failures[:10])

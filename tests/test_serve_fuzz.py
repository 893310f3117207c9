"""Property fuzzing of the ``qcloop serve`` API from its own OpenAPI schema (schemathesis).

Every operation gets generated requests (valid and invalid per the schema) with the API key;
no response may be a 5xx, and every response must conform to the schema (documented status,
content type, headers and body).
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from qcloop.deploy.serve.app import create_app
from qcloop.deploy.serve.model_source import RunSource
from qcloop.monitor.method.run_folder import load_run_config
from tests.test_serve import LiveServer

KEY = "fuzz-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def served_app(tiny_run: Path) -> Any:
    """The app on the tiny run (torch), models loaded up front; no lifespan needed."""
    cfg = load_run_config(tiny_run)
    cfg = cfg.model_copy(
        update={
            "serving": cfg.serving.model_copy(
                update={"runtime": "torch", "max_upload_mb": 1.0, "queue_size": 64}
            )
        }
    )
    source = RunSource(tiny_run)
    app = create_app(source, cfg, api_key=KEY, initial=source.load("torch"))
    yield app
    app.state.service.close()


@pytest.fixture(scope="module")
def api_schema(served_app: Any) -> Any:
    return schemathesis.openapi.from_asgi("/openapi.json", served_app)


OPERATIONS = [
    ("POST", "/v1/segment"),
    ("GET", "/v1/masks/{token}"),
    ("GET", "/v1/models"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
]
#: generated requests per operation and generation mode (kept small: the suite runs on 2 cores).
EXAMPLES = {"POST": 25, "GET": 10}


def test_schema_lists_every_operation(api_schema: Any) -> None:
    found = {(r.ok().method.upper(), r.ok().path) for r in api_schema.get_all_operations()}
    assert found == set(OPERATIONS)


#: every operation with valid requests; those with a parameter or body also with invalid ones.
FUZZ_CASES = [
    (method, path, mode)
    for method, path in OPERATIONS
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    if mode is GenerationMode.POSITIVE or method == "POST" or "{" in path
]


@pytest.mark.parametrize(("method", "path", "mode"), FUZZ_CASES)
def test_no_5xx_and_responses_match_the_schema(
    api_schema: Any, method: str, path: str, mode: GenerationMode
) -> None:
    operation = api_schema[path][method]
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
    ]

    @given(case=operation.as_strategy(mode))
    @settings(
        max_examples=EXAMPLES[method],
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Any) -> None:
        response = case.call_and_validate(headers=AUTH, checks=checks)
        assert response.status_code < 500

    run()


@given(
    cut=st.one_of(st.none(), st.integers(min_value=0, max_value=4000)),
    flips=st.lists(
        st.tuples(st.integers(min_value=0, max_value=351), st.integers(min_value=0, max_value=255)),
        max_size=6,
    ),
    gzipped=st.booleans(),
)
@settings(
    max_examples=40,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
def _mutated_uploads(client: Any, original: bytes, cut: Any, flips: Any, gzipped: bool) -> None:
    data = bytearray(original)
    for offset, value in flips:
        data[offset] = value
    if cut is not None:
        data = data[:cut]
    payload = gzip.compress(bytes(data)) if gzipped else bytes(data)
    name = "case_LA_ED.nii.gz" if gzipped else "case_LA_ED.nii"
    response = client.post("/v1/segment", headers=AUTH, files={"file": (name, payload)})
    assert response.status_code in (200, 413, 415, 422), response.text
    assert response.json()["detail" if response.status_code != 200 else "record"]


def test_mutated_nifti_headers_and_truncations_never_crash(
    served_app: Any, tiny_cohort: Path
) -> None:
    """Byte flips in a real NIfTI header and truncations anywhere: a 4xx with a reason (or a
    segmentation when the damage is harmless), never a 5xx."""
    path = next(tiny_cohort.glob("*/*_LA_ED.nii.gz"))
    original = gzip.decompress(path.read_bytes())
    server = LiveServer(served_app)
    try:
        with server.client() as client:
            _mutated_uploads(client, original)
            assert client.get("/healthz").status_code == 200
    finally:
        server.stop()

"""The committed OpenAPI document is the one the code serves."""

from __future__ import annotations

import json
from pathlib import Path

from api_shim.app import openapi_document

SPEC = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"


def test_docs_openapi_json_matches_the_code() -> None:
    # Given the document committed in docs/, when the app builds its own, then they are equal
    committed = json.loads(SPEC.read_text())
    assert committed == json.loads(json.dumps(openapi_document())), (
        "docs/openapi.json is stale: run `integration-hub openapi > docs/openapi.json`"
    )


def test_every_v1_operation_documents_its_problems() -> None:
    # Given the served document, then every /v1 operation declares problem responses for 401 and 422
    spec = openapi_document()
    for path, operations in spec["paths"].items():
        if not path.startswith("/v1/"):
            continue
        for method, operation in operations.items():
            assert {"401", "422"} <= set(operation["responses"]), f"{method.upper()} {path}"

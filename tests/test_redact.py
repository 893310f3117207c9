"""Credentials never reach a run folder, a registered version or a tracker's parameters."""

from __future__ import annotations

import pytest

from qcloop.monitor.core.config import QcloopConfig, dump_config
from qcloop.monitor.core.redact import REDACTED, redact, redact_uri


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("https://bob:s3cret@mlflow.example:5000/x", f"https://{REDACTED}@mlflow.example:5000/x"),
        ("https://tok@host/api", f"https://{REDACTED}@host/api"),
        ("https://host/api?token=abc&run=7", f"https://host/api?token={REDACTED}&run=7"),
        (
            "postgresql://u:p@db/mlflow?sslmode=require",
            f"postgresql://{REDACTED}@db/mlflow?sslmode=require",
        ),
        ("sqlite:///mlflow.db", "sqlite:///mlflow.db"),
        ("file:///tmp/mlruns", "file:///tmp/mlruns"),
        ("not a uri: a@b", "not a uri: a@b"),
    ],
)
def test_uris_lose_their_credentials_only(uri: str, expected: str) -> None:
    assert redact_uri(uri) == expected


def test_a_written_configuration_holds_no_credential() -> None:
    cfg = QcloopConfig.model_validate(
        {
            "registry": {"uri": "https://bob:s3cret@mlflow.example/?access_token=abc"},
            "tracking": {
                "tracker": {"name": "mlflow", "params": {"uri": "https://x:pw@host", "n": 3}}
            },
        }
    )
    text = dump_config(cfg)
    assert "s3cret" not in text and "abc" not in text and ":pw@" not in text
    assert text.count(REDACTED) == 3 and "mlflow.example" in text
    assert redact({"a": ["https://u:p@h"], "b": 1}) == {"a": [f"https://{REDACTED}@h"], "b": 1}

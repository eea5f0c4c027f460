"""The recipe's storage fields (`run.storage`, `run.storage_options`), checked up front: a storage URL or its options
never carry credentials, because the recipe is recorded with the run (params, recipe.yaml, every checkpoint).
Credentials come from the environment / profile chain of the filesystem (AWS_ACCESS_KEY_ID, AWS_PROFILE, ...)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

STORAGE_ENV = "LMLAB_STORAGE"  # the storage URL when neither the recipe nor --storage names one

# option names that hold a secret in s3fs / botocore, gcsfs and adlfs (compared case-insensitively)
CREDENTIAL_KEYS = frozenset({
    "key", "secret", "token", "password", "session_token", "access_key", "secret_key",
    "aws_access_key_id", "aws_secret_access_key", "aws_session_token",
    "account_key", "sas_token", "connection_string", "client_secret", "credential", "credentials",
})
_USERINFO = re.compile(r"^[A-Za-z][\w+.-]*://[^/@]*@")  # scheme://user[:password]@host


def url_problem(url: str) -> str | None:
    """Why a storage URL cannot be used, or None."""
    if not url.strip():
        return "is empty; give an fsspec URL such as s3://bucket/prefix"
    if _USERINFO.match(url):
        return ("holds credentials (user:password@); the URL is recorded with the run: drop them and use the "
                "environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE)")
    return None


def credential_paths(options: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted paths of options that would hold a secret (nested mappings such as client_kwargs included)."""
    found = []
    for k, v in options.items():
        path = f"{prefix}{k}"
        if str(k).lower() in CREDENTIAL_KEYS:
            found.append(path)
        elif isinstance(v, Mapping):
            found += credential_paths(v, path + ".")
    return found

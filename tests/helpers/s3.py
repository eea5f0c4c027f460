"""A real S3 API server for the storage tests: moto's standalone server (ThreadedMotoServer, the way s3fs's own test
suite runs one) on 127.0.0.1, with a bucket, and the AWS environment pointing at it."""

from __future__ import annotations

import logging
import socket
from contextlib import contextmanager

import pytest

# what the AWS environment chain gives lmlab in these tests (moto takes any key); the tests look for both strings
# everywhere a run writes and prints, to show credentials never end up there
ACCESS_KEY = "AKIALMLABTESTKEY7Q3Z"
SECRET_KEY = "lmlab-test-secret-Zq93kT0pXw"


class S3Server:
    def __init__(self, bucket: str):
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        self.bucket = bucket
        self._client = None
        self.client().create_bucket(Bucket=bucket)

    def client(self):
        if self._client is None:
            import boto3

            self._client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                                        aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)
        return self._client

    def url(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix}"

    def objects(self, prefix: str = "") -> dict[str, int]:
        """{key: size} of every object under `prefix`, as a listing shows them now."""
        out, token = {}, None
        c = self.client()
        while True:
            kw = {"Bucket": self.bucket, "Prefix": prefix, **({"ContinuationToken": token} if token else {})}
            page = c.list_objects_v2(**kw)
            out.update({o["Key"]: o["Size"] for o in page.get("Contents", [])})
            if not page.get("IsTruncated"):
                return out
            token = page["NextContinuationToken"]

    def read(self, key: str) -> bytes:
        return self.client().get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def write(self, key: str, data: bytes) -> None:
        self.client().put_object(Bucket=self.bucket, Key=key, Body=data)

    def stop(self) -> None:
        """Stop answering: the listening socket is closed too, so connections are refused (not left hanging)."""
        self.server.stop()
        self.server._server.server_close()


def aws_env(endpoint: str) -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint}


@contextmanager
def s3_server(monkeypatch: pytest.MonkeyPatch, bucket: str = "lmlab-test"):
    """A moto S3 server with `bucket`, the AWS environment set for this process and its children (through
    `monkeypatch`, which undoes it); stopped after."""
    server = S3Server(bucket)
    for k, v in aws_env(server.endpoint).items():
        monkeypatch.setenv(k, v)
    try:
        yield server
    finally:
        try:
            server.stop()
        except Exception:
            pass


def closed_port() -> int:
    """A loopback port nothing listens on (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


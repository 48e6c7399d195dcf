"""A real S3 server for tests: moto's standalone server, as its own process.

No MinIO server installs here; ``moto_server`` speaks the S3 HTTP API, and
textcls reaches it only through the client and settings it would use against
MinIO or AWS (``TEXTCLS_ARTIFACT_URL``, ``TEXTCLS_S3_ENDPOINT_URL`` and the
standard ``AWS_*`` credential variables). Its request log (one line per HTTP
request, werkzeug's format) is how tests count what reached the server.
"""

from __future__ import annotations

import re
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launch.procs import Proc, ProcessGroup, free_port, port_open, wait_for

# Credentials moto accepts (any); set as the standard variables for every process.
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "textcls-test",
    "AWS_SECRET_ACCESS_KEY": "textcls-test-key",
    "AWS_DEFAULT_REGION": "us-east-1",
}
_REQUEST = re.compile(r'"(GET|PUT|POST|HEAD|DELETE) (\S+) HTTP/[\d.]+"\s+(\d{3})')
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def moto_command(host: str, port: int) -> list[str]:
    return [str(Path(sys.executable).parent / "moto_server"), "-H", host, "-p", str(port)]


@dataclass
class MotoServer:
    proc: Proc
    host: str
    port: int

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=AWS_ENV["AWS_DEFAULT_REGION"],
            aws_access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"],
        )

    def new_bucket(self) -> str:
        name = f"t-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=name)
        return name

    def requests(self) -> list[tuple[str, str, int]]:
        """(method, path, status) of every request the server logged so far."""
        text = _ANSI.sub("", self.proc.log_path.read_text()) if self.proc.log_path else ""
        return [(m[1], m[2], int(m[3])) for m in _REQUEST.finditer(text)]


def start_moto(group: ProcessGroup, host: str = "127.0.0.1", port: int | None = None) -> MotoServer:
    port = port or free_port()
    proc = group.start(f"moto-{port}", moto_command(host, port))
    wait_for(lambda: port_open(host, port), 30, "moto_server")
    return MotoServer(proc, host, port)

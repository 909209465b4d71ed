"""A real OCI registry for tests: Debian's ``docker-registry`` (CNCF distribution 2.8) on
loopback, a free port, a filesystem root in a temporary folder, deletes enabled.

    with running_oci_server(tmp_dir) as oci:
        Registry.open(oci.url("lorabay"))

``htpasswd={"user": "password"}`` starts one that wants basic auth (distribution's
htpasswd file, bcrypt). ``stop`` ends the process. ``SERVERS`` maps host:port to the
running servers, so a test helper can reach the blobs behind the registry's back
(``blob_path``), as the file:// tests damage files on disk.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from lorabay.hub.ports import free_port

SERVERS: dict[str, OciServer] = {}

INSTALL_HINT = (
    "the OCI registry tests need Debian's docker-registry (`apt-get install docker-registry`; "
    "`make setup` installs it), or deselect them with -m 'not oci'"
)


def registry_binary() -> str:
    found = shutil.which("docker-registry")
    if found is None:
        raise RuntimeError(INSTALL_HINT)
    return found


@dataclass
class OciServer:
    host: str  # 127.0.0.1:PORT
    root: Path
    process: subprocess.Popen
    log_path: Path

    def url(self, repository: str) -> str:
        return f"oci://{self.host}/{repository}"

    def blob_path(self, repository: str, sha256: str) -> Path:
        """Where distribution's filesystem driver keeps a blob's bytes (shared by every
        repository that links it)."""
        return self.root / "docker/registry/v2/blobs/sha256" / sha256[:2] / sha256 / "data"

    def stop(self) -> None:
        SERVERS.pop(self.host, None)
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        shutil.rmtree(self.root, ignore_errors=True)


def bcrypt_hash(password: str) -> str:
    """distribution's htpasswd takes bcrypt only; glibc's crypt(3) makes it (Python 3.11's
    ``crypt``, removed in 3.13, where the ``bcrypt`` package is the way)."""
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import crypt

        return crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=32))
    except ImportError:
        import bcrypt

        return bcrypt.hashpw(password.encode(), bcrypt.gensalt(5)).decode()


def write_htpasswd(path: Path, users: dict[str, str]) -> None:
    path.write_text("".join(f"{user}:{bcrypt_hash(pw)}\n" for user, pw in users.items()))


def start_oci_server(
    data_dir: Path,
    timeout: float = 30.0,
    htpasswd: dict[str, str] | None = None,
    storage: Path | None = None,
) -> OciServer:
    """Start it; ``storage``: where its blobs go (default: a tmpfs when there is one, the
    benchmark gives a folder on the disk the other stores use)."""
    binary = registry_binary()
    data_dir.mkdir(parents=True, exist_ok=True)
    # The storage in memory where there is a tmpfs: distribution syncs every write, and on
    # this disk that makes a manifest PUT 26 ms instead of 3.5 ms.
    shm = Path("/dev/shm")
    if storage is None and shm.is_dir():
        storage = Path(tempfile.mkdtemp(prefix="lorabay-oci-", dir=shm))
    root = storage or data_dir / "storage"
    port = free_port()
    auth = ""
    if htpasswd:
        write_htpasswd(data_dir / "htpasswd", htpasswd)
        auth = f"auth:\n  htpasswd:\n    realm: lorabay-test\n    path: {data_dir / 'htpasswd'}\n"
    # No blob descriptor cache: a test that changes a blob on disk must be served what is
    # there. No upload purging: no background walk of the storage while tests run.
    config = (
        "version: 0.1\n"
        "log:\n  level: warn\n  accesslog:\n    disabled: true\n"
        "storage:\n"
        f"  filesystem:\n    rootdirectory: {root}\n"
        "  delete:\n    enabled: true\n"
        "  maintenance:\n    uploadpurging:\n      enabled: false\n"
        f"http:\n  addr: 127.0.0.1:{port}\n  secret: lorabay-test-{port}\n" + auth
    )
    (data_dir / "config.yml").write_text(config)
    log_path = data_dir / "registry.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [binary, "serve", str(data_dir / "config.yml")],
            cwd=data_dir,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() ends it whatever it started
        )
    server = OciServer(f"127.0.0.1:{port}", root, process, log_path)
    try:
        wait_until_ready(server, timeout)
    except BaseException:
        server.stop()
        raise
    SERVERS[server.host] = server
    return server


def wait_until_ready(server: OciServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"docker-registry exited with {server.process.returncode}: "
                + server.log_path.read_text(errors="replace")[-2000:]
            )
        try:
            with urllib.request.urlopen(f"http://{server.host}/v2/", timeout=2):
                return
        except urllib.error.HTTPError as error:
            if error.code == 401:  # up, and asking for credentials
                return
            last_error = error
        except OSError as error:  # connection refused while it starts
            last_error = error
        time.sleep(0.1)
    raise RuntimeError(f"OCI registry not ready after {timeout:.0f}s: {last_error}")


@contextlib.contextmanager
def running_oci_server(data_dir: Path, **kwargs):
    server = start_oci_server(data_dir, **kwargs)
    try:
        yield server
    finally:
        server.stop()

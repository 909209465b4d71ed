"""S3 errors lorabay did not handle become one line each, naming the request and the fix.

SeaweedFS cannot be made to answer 500, SlowDown or a KMS denial, so a small proxy in
front of it (tests/s3server.py FaultProxy) answers chosen requests with those errors,
exactly as AWS writes them; boto3's own retries and parsing meet them.
"""

import pytest
from click.testing import CliRunner
from s3server import FaultProxy

from lorabay.cli.main import cli
from lorabay.hub import Registry
from lorabay.hub.errors import StoreAccessDenied, StoreFailed, StoreThrottled

pytestmark = pytest.mark.s3


@pytest.fixture
def proxy(s3_server, s3_registry_url, monkeypatch):
    with FaultProxy(s3_server.endpoint) as faults:
        monkeypatch.setenv("LORABAY_S3_ENDPOINT", faults.endpoint)
        yield faults


def one_line(result) -> str:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


def test_a_500_is_one_line(proxy, s3_registry_url, lora):
    reg = Registry.open(s3_registry_url)
    reg.push(lora(seed=1), "a")
    proxy.fail("GET", "/events/", 500, "InternalError", "We encountered an internal error.")
    with pytest.raises(StoreFailed) as caught:
        reg.events("a")
    error = caught.value
    assert (error.status, error.error_code, error.operation) == (500, "InternalError", "GetObject")
    assert error.key.startswith("events/_/a/") and error.http_status == 502
    line = one_line(CliRunner().invoke(cli, ["hub", "log", "a", "--registry", s3_registry_url]))
    assert "GetObject events/_/a/" in line and "500 InternalError" in line and "retry" in line


def test_a_500_on_a_head_has_no_body_and_is_still_one_line(proxy, s3_registry_url, lora):
    reg = Registry.open(s3_registry_url)
    reg.push(lora(seed=1), "a")
    proxy.fail("HEAD", "/adapters/", 500, "InternalError")
    with pytest.raises(StoreFailed, match="HeadObject adapters/_/a/1.json answered 500"):
        reg.resolve("a:1")


def test_slowdown_after_the_retries(proxy, s3_registry_url, lora):
    reg = Registry.open(s3_registry_url)
    reg.push(lora(seed=1), "a")
    proxy.fail("PUT", "/blobs/", 503, "SlowDown", "Please reduce your request rate.")
    with pytest.raises(StoreThrottled) as caught:
        reg.push(lora(seed=2), "a")
    message = str(caught.value)
    assert "503 SlowDown: Please reduce your request rate." in message
    # boto3 retried (standard mode: 3 retries after the first try) before giving up.
    assert len(proxy.failed) == 4 and "after 3 retries" in message and "\n" not in message
    proxy.clear()
    assert reg.push(lora(seed=2), "a").manifest.version == 2  # nothing half written


def test_a_kms_denial_names_the_key_policy(proxy, s3_registry_url, lora, lorabay_home):
    reg = Registry.open(s3_registry_url)
    reg.push(lora(seed=1), "a")
    proxy.fail(
        "GET",
        "/blobs/",
        403,
        "AccessDenied",
        "User: arn:aws:iam::123456789012:user/ci is not authorized to perform: kms:Decrypt "
        "on resource: arn:aws:kms:us-east-1:123456789012:key/1234abcd",
    )
    with pytest.raises(StoreAccessDenied) as caught:
        reg.pull("a")
    assert "kms:Decrypt" in str(caught.value) and "key policy" in caught.value.hint
    line = one_line(CliRunner().invoke(cli, ["hub", "pull", "a", "--registry", s3_registry_url]))
    assert "GetObject blobs/sha256/" in line and "KMS key" in line
    proxy.clear()
    proxy.fail("GET", "/blobs/", 400, "KMS.DisabledException", "arn:aws:kms:... is disabled.")
    with pytest.raises(StoreAccessDenied, match="KMS.DisabledException"):
        reg.pull("a")


def test_other_denials_and_codes(proxy, s3_registry_url, lora):
    reg = Registry.open(s3_registry_url)
    reg.push(lora(seed=1), "a")
    proxy.fail("GET", "/aliases/", 403, "AccessDenied", "Access Denied", times=1)
    with pytest.raises(StoreAccessDenied, match="bucket policy"):
        reg.resolve("a:prod")
    proxy.fail("GET", "/aliases/", 400, "InvalidObjectState", "archived", times=1)
    with pytest.raises(StoreAccessDenied):
        reg.resolve("a:prod")
    proxy.fail("GET", "/aliases/", 409, "OperationAborted", "A conflicting operation", times=1)
    with pytest.raises(StoreFailed, match="409 OperationAborted"):
        reg.resolve("a:prod")

"""The S3 client parses timestamps with the standard library (hub/stores/s3.py), as botocore would."""

import pytest
from botocore.utils import parse_timestamp

from lorabay.hub.stores.s3 import fast_timestamp


@pytest.mark.parametrize(
    "value",
    [
        "2026-11-27T22:00:00.123Z",  # ListObjectsV2 LastModified
        "2026-11-27T22:00:00Z",
        "2026-11-27T22:00:00+02:00",
        "Fri, 27 Nov 2026 22:00:00 GMT",  # the Last-Modified header of a GET
        1795816800,
    ],
)
def test_same_instant_as_botocore(value):
    assert fast_timestamp(value).timestamp() == parse_timestamp(value).timestamp()


def test_garbage_is_refused_as_botocore_refuses_it():
    with pytest.raises(ValueError):
        fast_timestamp("not a time")

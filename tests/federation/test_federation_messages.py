"""The federation's wire format: round trips, and hostile bytes fail only with MalformedMessageError."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from securefed.errors import MalformedMessageError
from securefed.federation.messages import (
    Acknowledgement,
    ModelRelease,
    PlainUpdate,
    ProtocolRelay,
    RoundStart,
    SiteRefusal,
    decode_federation_message,
    message_kind,
)
from securefed.serialization import Writer

VECTOR = np.linspace(-1, 1, 17, dtype=np.float32)
MESSAGES = [
    RoundStart(3, 3002, "secagg", VECTOR, b"setup-bytes"),
    RoundStart(1, 1000, "plain", VECTOR, b""),
    ProtocolRelay(3002, b"\x01\x02payload"),
    PlainUpdate(2, 0.5, VECTOR),
    SiteRefusal(4, "privacy budget exhausted"),
    ModelRelease(5, VECTOR),
    Acknowledgement(5),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(message):
    decoded = decode_federation_message(message.encode())
    assert type(decoded) is type(message)
    for name, value in vars(message).items():
        got = getattr(decoded, name)
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(got, value)
        else:
            assert got == value
    assert message_kind(message.encode()).startswith(type(message).__name__)


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_truncation_and_extension_is_refused(message):
    data = message.encode()
    for cut in range(len(data)):
        with pytest.raises(MalformedMessageError):
            decode_federation_message(data[:cut])
    with pytest.raises(MalformedMessageError):
        decode_federation_message(data + b"\x00")


def test_wrong_dtype_version_and_kind_are_named():
    start = RoundStart(1, 1, "secagg", VECTOR, b"").encode()
    with pytest.raises(MalformedMessageError, match="version"):
        decode_federation_message(start[:4] + b"\x09" + start[5:])
    with pytest.raises(MalformedMessageError, match="kind"):
        decode_federation_message(start[:5] + b"\x63" + start[6:])
    with pytest.raises(MalformedMessageError, match="aggregation"):
        decode_federation_message(start[:18] + b"\x07" + start[19:])
    float64_model = Writer().fixed(b"SFFD", 4).u8(1).u8(ModelRelease.KIND).u32(1).array(VECTOR.astype(np.float64))
    with pytest.raises(MalformedMessageError, match="float32"):
        decode_federation_message(float64_model.getvalue())


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_crash_the_decoder(data):
    try:
        decode_federation_message(data)
    except MalformedMessageError:
        pass
    assert isinstance(message_kind(data), str)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 60), st.binary(min_size=1, max_size=4))
def test_corrupted_valid_messages_never_crash_the_decoder(offset, junk):
    data = bytearray(MESSAGES[0].encode())
    data[offset:offset + len(junk)] = junk
    try:
        decode_federation_message(bytes(data))
    except MalformedMessageError:
        pass


def test_a_relayed_masked_input_is_read_in_place_aligned_and_read_only():
    from securefed.secagg.messages import MaskedInput, decode_message

    values = np.arange(1001, dtype=np.uint32)
    inner = MaskedInput(round_id=7, config_digest=bytes(32), sender=3, values=values)
    outer = ProtocolRelay(7, inner.encode()).encode()
    relay = decode_federation_message(outer)
    decoded = decode_message(relay.payload)
    np.testing.assert_array_equal(decoded.values, values)
    assert np.shares_memory(decoded.values, np.frombuffer(outer, dtype=np.uint8))  # no copy on the way
    assert decoded.values.flags.aligned and not decoded.values.flags.writeable
    with pytest.raises(MalformedMessageError, match="padding"):
        decode_federation_message(outer[:15] + b"\x01" + outer[16:])

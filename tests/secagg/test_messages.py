"""The wire format: exact round trips, and hostile bytes never get past the decoder or the client."""

from __future__ import annotations

import dataclasses
import random
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from secagg_helpers import CLIENT_TYPES, SERVER_TYPES, ManualRound
from securefed.errors import MalformedMessageError, ProtocolAbort, ProtocolError, UnexpectedMessageError
from securefed.secagg import ClientState, RoundConfig, SecAggConfig, Stage
from securefed.secagg.messages import (
    KeyDirectory,
    MaskedInput,
    RoundSetup,
    ShareDelivery,
    SurvivorList,
    UnmaskRequest,
    UnmaskShares,
    decode_message,
)

HEADER = 4 + 1 + 1 + 8 + 32  # magic, version, kind, round id, config digest
FUZZ_SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _build_rounds() -> tuple[ManualRound, ManualRound]:
    honest = ManualRound(n=4, seed="wire")
    honest.run()
    # A round where site 3 vanishes after sharing keys, so unmask carries key shares too.
    dropped = ManualRound(n=5, seed="wire-drop")
    dropped.begin()
    dropped.step()
    dropped.step()
    for site, message in dropped.collect().items():
        if site != 3:
            dropped.server.receive(message)
    dropped.close()
    dropped.run()
    return honest, dropped


HONEST, DROPPED = _build_rounds()


def _all_messages():
    out = []
    for rnd in (HONEST, DROPPED):
        for by_site in (*rnd.to_clients.values(), *rnd.from_clients.values()):
            out.extend(by_site.values())
    return out


MESSAGES = _all_messages()
CORPUS = [m.encode() for m in MESSAGES] + [HONEST.round_config.encode(), DROPPED.round_config.encode()]


def _decode_or_malformed(data) -> object | None:
    """Decode, or return None on MalformedMessageError; any other exception fails the test."""
    try:
        message = decode_message(data)
    except MalformedMessageError as exc:
        assert str(exc), "a decoding error must say what was wrong"
        return None
    assert type(message) in (*SERVER_TYPES, *CLIENT_TYPES)
    return message


def _config_or_malformed(data) -> RoundConfig | None:
    try:
        return RoundConfig.decode(data)
    except MalformedMessageError:
        return None


def _same(a, b) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, MaskedInput):
        return (a.round_id, a.config_digest, a.sender) == (b.round_id, b.config_digest, b.sender) and (
            a.values.dtype == b.values.dtype and np.array_equal(a.values, b.values)
        )
    return a == b


# ------------------------------------------------------------------------------- round trips
def test_corpus_covers_every_message_kind() -> None:
    kinds = {type(m) for m in MESSAGES}
    assert kinds == {*SERVER_TYPES, *CLIENT_TYPES}
    unmask = [m for m in MESSAGES if isinstance(m, UnmaskShares) and m.key_shares]
    assert unmask, "the dropout round should reveal key shares"
    assert any(isinstance(m, UnmaskRequest) and m.key_ids for m in MESSAGES)


@pytest.mark.parametrize("cls", [*SERVER_TYPES, *CLIENT_TYPES], ids=lambda c: c.__name__)
def test_round_trip_every_message_type(cls) -> None:
    found = [m for m in MESSAGES if type(m) is cls]
    assert found
    for message in found:
        data = message.encode()
        decoded = decode_message(data)
        assert _same(decoded, message)
        assert decoded.encode() == data
        assert data[:4] == b"SFSA" and data[4] == 1 and data[5] == cls.KIND
        assert struct.unpack_from("<Q", data, 6)[0] == message.round_id
        assert data[14:46] == message.config_digest
        # bytes-like inputs decode the same way
        assert _same(decode_message(bytearray(data)), message)
        assert _same(decode_message(memoryview(data)), message)


def test_masked_input_round_trip_preserves_dtype_64() -> None:
    values = np.array([0, 1, 2**64 - 1, 2**63], dtype=np.uint64)
    message = MaskedInput(round_id=3, config_digest=bytes(range(32)), sender=9, values=values)
    decoded = decode_message(message.encode())
    assert decoded.values.dtype == np.uint64
    np.testing.assert_array_equal(decoded.values, values)


def test_round_config_round_trip() -> None:
    for config in (HONEST.round_config, DROPPED.round_config):
        data = config.encode()
        again = RoundConfig.decode(data)
        assert again == config and again.digest == config.digest and again.encode() == data
    sparse = ManualRound(n=9, seed="sparse-config", config=SecAggConfig(neighbors=4))
    again = RoundConfig.decode(sparse.round_config.encode())
    assert again.neighbors == 4 and again == sparse.round_config


def test_masked_input_of_a_float_array_is_refused() -> None:
    message = MaskedInput(round_id=1, config_digest=bytes(32), sender=0, values=np.zeros(3))
    with pytest.raises(MalformedMessageError):
        decode_message(message.encode())


# ------------------------------------------------------------------------------- strict refusals
TRUNCATION_TARGETS = [RoundSetup, KeyDirectory, ShareDelivery, UnmaskRequest, UnmaskShares, MaskedInput]


@pytest.mark.parametrize("cls", TRUNCATION_TARGETS, ids=lambda c: c.__name__)
def test_every_truncation_is_malformed(cls) -> None:
    data = next(m for m in MESSAGES if type(m) is cls).encode()
    for cut in range(len(data)):
        with pytest.raises(MalformedMessageError):
            decode_message(data[:cut])


def test_every_truncation_of_a_round_config_is_malformed() -> None:
    data = HONEST.round_config.encode()
    for cut in range(len(data)):
        with pytest.raises(MalformedMessageError):
            RoundConfig.decode(data[:cut])


@pytest.mark.parametrize("extra", [b"\x00", b"\xff" * 3, bytes(64)])
def test_trailing_bytes_are_malformed(extra: bytes) -> None:
    for data in CORPUS[:-2]:
        with pytest.raises(MalformedMessageError, match="trailing"):
            decode_message(data + extra)
    for data in CORPUS[-2:]:
        with pytest.raises(MalformedMessageError, match="trailing"):
            RoundConfig.decode(data + extra)


@pytest.mark.parametrize("version", [0, 2, 255])
def test_wrong_version_is_malformed(version: int) -> None:
    for data in CORPUS[:-2]:
        bad = data[:4] + bytes([version]) + data[5:]
        with pytest.raises(MalformedMessageError, match="version"):
            decode_message(bad)
    config = CORPUS[-1]
    with pytest.raises(MalformedMessageError, match="version"):
        RoundConfig.decode(config[:4] + bytes([version]) + config[5:])


@pytest.mark.parametrize("magic", [b"SFSB", b"\x00\x00\x00\x00", b"sfsa", b"SFRC"])
def test_wrong_magic_is_malformed(magic: bytes) -> None:
    for data in CORPUS[:-2]:
        with pytest.raises(MalformedMessageError, match="magic"):
            decode_message(magic + data[4:])
    with pytest.raises(MalformedMessageError, match="magic"):
        RoundConfig.decode(b"SFSA" + CORPUS[-1][4:])


@pytest.mark.parametrize("kind", [0, 11, 12, 255])
def test_unknown_kind_is_malformed(kind: int) -> None:
    data = CORPUS[0]
    with pytest.raises(MalformedMessageError, match="kind"):
        decode_message(data[:5] + bytes([kind]) + data[6:])


@pytest.mark.parametrize("value", [None, "SFSA", 12345, [1, 2, 3]])
def test_non_bytes_are_malformed(value) -> None:
    with pytest.raises(MalformedMessageError):
        decode_message(value)
    with pytest.raises(MalformedMessageError):
        RoundConfig.decode(value)


def test_message_size_limit() -> None:
    data = next(m for m in MESSAGES if isinstance(m, ShareDelivery)).encode()
    assert _same(decode_message(data, max_bytes=len(data)), decode_message(data))
    with pytest.raises(MalformedMessageError, match="limit"):
        decode_message(data, max_bytes=len(data) - 1)


def _with(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    buf = bytearray(data)
    struct.pack_into(fmt, buf, offset, value)
    return bytes(buf)


@pytest.mark.parametrize("value", [2**32 - 1, 2**31, 2**20, 70000])
def test_huge_u32_length_prefixes_are_malformed(value: int) -> None:
    by_type = {type(m): m.encode() for m in MESSAGES}
    cases = [
        (by_type[RoundSetup], HEADER),  # config blob length
        (by_type[KeyDirectory], HEADER),  # advertisement count
        (by_type[ShareDelivery], HEADER),  # share count
        (by_type[ShareDelivery], HEADER + 4 + 8),  # first ciphertext length
        (by_type[UnmaskRequest], HEADER),  # signature count
        (by_type[UnmaskShares], HEADER + 4),  # self-mask share count
        (by_type[UnmaskShares], HEADER + 4 + 4 + 4),  # first share length
        (by_type[SurvivorList], HEADER),  # survivor count
    ]
    for data, offset in cases:
        with pytest.raises(MalformedMessageError):
            decode_message(_with(data, offset, "<I", value))


@pytest.mark.parametrize("value", [2**64 - 1, 2**63, 2**61, 2**31 + 1, 10**6])
def test_huge_array_length_is_malformed(value: int) -> None:
    data = next(m for m in MESSAGES if isinstance(m, MaskedInput)).encode()
    with pytest.raises(MalformedMessageError):
        decode_message(_with(data, HEADER + 4 + 1, "<Q", value))


def test_every_u32_and_u64_field_overwritten_with_huge_values() -> None:
    for data in CORPUS[:-2]:
        for offset in range(HEADER, len(data) - 3):
            _decode_or_malformed(_with(data, offset, "<I", 2**32 - 1))
        for offset in range(HEADER, len(data) - 7):
            _decode_or_malformed(_with(data, offset, "<Q", 2**64 - 1))
    config = CORPUS[-1]
    for offset in range(5, len(config) - 3):
        _config_or_malformed(_with(config, offset, "<I", 2**32 - 1))


# ------------------------------------------------------------------------------- fuzzing
def _mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    kind = rng.randrange(8)
    if kind == 0 and buf:  # bit flips
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
    elif kind == 1 and buf:  # byte overwrite
        for _ in range(rng.randint(1, 4)):
            buf[rng.randrange(len(buf))] = rng.randrange(256)
    elif kind == 2:  # insertion
        i = rng.randrange(len(buf) + 1)
        buf[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    elif kind == 3 and buf:  # deletion
        i = rng.randrange(len(buf))
        del buf[i : i + rng.randint(1, 8)]
    elif kind == 4:  # splice with another message
        other = rng.choice(CORPUS)
        i, j = rng.randrange(len(buf) + 1), rng.randrange(len(other) + 1)
        buf = buf[:i] + other[j:]
    elif kind == 5:  # truncate or extend
        buf = buf[: rng.randrange(len(buf) + 1)] if rng.random() < 0.5 else buf + rng.randbytes(rng.randint(1, 40))
    elif kind == 6:  # entirely random bytes, sometimes behind a valid header
        body = rng.randbytes(rng.randrange(300))
        buf = bytearray(bytes(buf[:HEADER]) + body if rng.random() < 0.7 else body)
    else:  # a length-ish field set to an extreme value
        if len(buf) >= HEADER + 4:
            i = rng.randrange(HEADER, len(buf) - 3)
            struct.pack_into("<I", buf, i, rng.choice([0, 1, 2**31, 2**32 - 1, rng.getrandbits(32)]))
    return bytes(buf)


def test_seeded_mutation_loop() -> None:
    rng = random.Random(20240601)
    decoded_ok = 0
    for _ in range(4000):
        data = _mutate(rng, rng.choice(CORPUS))
        message = _decode_or_malformed(data)
        if message is not None:
            decoded_ok += 1
            assert message.encode() == data, "a decodable message must have one encoding"
        config = _config_or_malformed(data)
        if config is not None:
            assert config.encode() == data
    assert decoded_ok > 0  # some mutations (e.g. in signatures) still decode: they exercise the success path


@FUZZ_SETTINGS
@given(st.binary(max_size=600))
def test_fuzz_random_bytes(data: bytes) -> None:
    _decode_or_malformed(data)
    _config_or_malformed(data)


@FUZZ_SETTINGS
@given(
    kind=st.integers(0, 12),
    version=st.sampled_from([1, 1, 1, 0, 2]),
    round_id=st.integers(0, 2**64 - 1),
    digest=st.binary(min_size=32, max_size=32),
    body=st.binary(max_size=400),
)
def test_fuzz_valid_header_random_body(kind: int, version: int, round_id: int, digest: bytes, body: bytes) -> None:
    data = b"SFSA" + bytes([version, kind]) + struct.pack("<Q", round_id) + digest + body
    message = _decode_or_malformed(data)
    if message is not None:
        assert message.encode() == data


@FUZZ_SETTINGS
@given(
    base=st.sampled_from(CORPUS),
    edits=st.lists(st.tuples(st.integers(0, 10**4), st.integers(0, 255)), min_size=1, max_size=6),
    cut=st.one_of(st.none(), st.integers(0, 10**4)),
    tail=st.binary(max_size=16),
)
def test_fuzz_mutated_messages(base: bytes, edits, cut, tail: bytes) -> None:
    buf = bytearray(base)
    for position, value in edits:
        buf[position % len(buf)] = value
    if cut is not None:
        buf = buf[: cut % (len(buf) + 1)]
    data = bytes(buf) + tail
    message = _decode_or_malformed(data)
    if message is not None:
        assert message.encode() == data
    _config_or_malformed(data)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    round_id=st.integers(0, 2**64 - 1),
    participants=st.lists(st.integers(0, 2**32 - 1), max_size=20),
    threshold=st.integers(0, 2**32 - 1),
    neighbors=st.integers(0, 2**32 - 1),
    length=st.integers(0, 2**64 - 1),
    bit_width=st.integers(0, 255),
    floats=st.tuples(*[st.floats(allow_nan=True, allow_infinity=True)] * 3),
)
def test_fuzz_round_config_fields(round_id, participants, threshold, neighbors, length, bit_width, floats) -> None:
    """Any field values decode; problems() then lists what is unusable without raising."""
    data = (
        b"SFRC" + bytes([1]) + struct.pack("<Q", round_id) + bytes(32)
        + struct.pack("<I", len(participants)) + struct.pack(f"<{len(participants)}I", *participants)
        + struct.pack("<II", threshold, neighbors) + bytes(32) + struct.pack("<QB", length, bit_width)
        + struct.pack("<ddd", *floats)
    )
    config = RoundConfig.decode(data)
    problems = config.problems()
    assert isinstance(problems, list) and all(isinstance(p, str) for p in problems)
    assert config.encode() == data
    setup = RoundSetup.for_config(config)
    encoded = setup.encode()
    again = decode_message(encoded)  # (NaN fields make == useless; compare the bytes)
    assert isinstance(again, RoundSetup) and again.encode() == encoded
    assert again.config.digest == config.digest == again.config_digest


# ------------------------------------------------------------------------------- tampering
def _flip(data: bytes, offset: int, bit: int) -> bytes:
    buf = bytearray(data)
    buf[offset] ^= 1 << bit
    return bytes(buf)


def _deliver_tampered(state: ClientState, site: int, data: bytes) -> str:
    """Deliver possibly tampered bytes to a client waiting in ``state``; say how it was refused."""
    message = _decode_or_malformed(data)
    if message is None:
        return "malformed"
    client = HONEST.client_in_state(site, state)
    try:
        reply = client.handle(message)
    except ProtocolAbort:
        assert client.state is ClientState.ABORTED
        return "abort"
    except UnexpectedMessageError:
        assert client.state is ClientState.ABORTED
        return "unexpected"
    raise AssertionError(f"the client accepted a tampered message and replied {type(reply).__name__}")


@pytest.mark.parametrize("cls, state", [(KeyDirectory, ClientState.ADVERTISED), (ShareDelivery, ClientState.SHARED)],
                         ids=["KeyDirectory", "ShareDelivery"])
def test_any_single_bit_flip_is_refused(cls, state: ClientState) -> None:
    """Flip one bit at every byte after the kind byte: each copy fails to decode or the
    client aborts; none is accepted."""
    original = HONEST.to_clients[cls.STAGE][1]
    data = original.encode()
    HONEST.client_in_state(1, state).handle(decode_message(data))  # control: the original is accepted
    outcomes = {"malformed": 0, "abort": 0, "unexpected": 0}
    for offset in range(6, len(data)):
        outcome = _deliver_tampered(state, 1, _flip(data, offset, offset % 8))
        outcomes[outcome] += 1
    assert outcomes["unexpected"] == 0
    assert outcomes["abort"] > outcomes["malformed"]  # most flips decode and are caught by the client


def test_flipped_kind_byte_is_refused() -> None:
    data = HONEST.to_clients[Stage.SHARE_KEYS][1].encode()
    for bit in range(8):
        assert _deliver_tampered(ClientState.ADVERTISED, 1, _flip(data, 5, bit)) in {"malformed", "unexpected"}


def test_key_directory_signature_bit_flip_is_refused() -> None:
    directory = HONEST.to_clients[Stage.SHARE_KEYS][0]
    data = directory.encode()
    signature = directory.entries[1].signature
    offset = data.index(signature)
    for bit in (0, 3, 7):
        tampered = decode_message(_flip(data, offset + 10, bit))
        assert tampered.entries[1].signature != signature
        client = HONEST.client_in_state(0, ClientState.ADVERTISED)
        with pytest.raises(ProtocolAbort) as info:
            client.handle(tampered)
        assert "not signed" in str(info.value)
        assert info.value.stage == "share_keys"
    # Control: the untampered directory is accepted by the same kind of client.
    assert HONEST.client_in_state(0, ClientState.ADVERTISED).handle(directory).sender == 0


def test_share_delivery_ciphertext_bit_flip_is_refused() -> None:
    delivery = HONEST.to_clients[Stage.MASKED_INPUT][2]
    data = delivery.encode()
    ciphertext = delivery.items[0].ciphertext
    start = data.index(ciphertext)
    for position in (0, len(ciphertext) // 2, len(ciphertext) - 1):  # nonce, body, tag
        tampered = decode_message(_flip(data, start + position, 1))
        assert tampered.items[0].ciphertext != ciphertext
        client = HONEST.client_in_state(2, ClientState.SHARED)
        with pytest.raises(ProtocolAbort) as info:
            client.handle(tampered)
        assert "does not authenticate" in str(info.value)
        assert client.state is ClientState.ABORTED
    assert HONEST.client_in_state(2, ClientState.SHARED).handle(delivery).sender == 2


def test_ciphertext_redirected_to_another_recipient_is_refused() -> None:
    """A share re-labelled for a different sender is bound by its associated data and fails."""
    delivery = HONEST.to_clients[Stage.MASKED_INPUT][2]
    a, b = delivery.items[0], delivery.items[1]
    swapped = dataclasses.replace(delivery, items=(dataclasses.replace(a, ciphertext=b.ciphertext),
                                                   dataclasses.replace(b, ciphertext=a.ciphertext), *delivery.items[2:]))
    client = HONEST.client_in_state(2, ClientState.SHARED)
    with pytest.raises(ProtocolAbort):
        client.handle(decode_message(swapped.encode()))


def test_tampered_unmask_request_signature_is_refused() -> None:
    request = HONEST.to_clients[Stage.UNMASK][0]
    # Neighbours confirm with MAC tags, others with signatures: flip a bit in whichever is relayed.
    field = "signatures" if request.signatures else "confirmations"
    entries = getattr(request, field)
    signer, proof = entries[0]
    bad = bytearray(proof)
    bad[0] ^= 0x80
    tampered = dataclasses.replace(request, **{field: ((signer, bytes(bad)), *entries[1:])})
    client = HONEST.client_in_state(0, ClientState.CONFIRMED)
    with pytest.raises(ProtocolAbort, match="different survivor list"):
        client.handle(decode_message(tampered.encode()))


def test_protocol_errors_share_one_base() -> None:
    for cls in (MalformedMessageError, ProtocolAbort, UnexpectedMessageError):
        assert issubclass(cls, ProtocolError)

"""Random and mutated ValidateApiKey payloads, as raw bytes on the wire.

A generic unary call with identity serializers sends bytes no well-behaved client would:
invalid UTF-8, truncated varints, wrong wire types, lengths past the end or near 2**64,
duplicated and unknown fields, near-misses of real keys, plain random bytes. The oracle is
protobuf's own parser: a payload may be answered `true` only if it parses as a
ValidateApiKeyRequest whose key is in the database (protobuf keeps the last of two
`api_key` fields, so some mutated payloads rightly carry a real key). No wrong key may get
`true`, the server must keep serving, and its RSS (sampled from /proc) must level off.

The key material kept for the output scan stays bounded on purpose: every long key sent is
one of a few hundred near-misses, invalid-UTF-8 variants and random payloads, reused.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from typing import TYPE_CHECKING

import grpc
from google.protobuf.message import DecodeError

from junjo_backend._wire.ingestion import auth_pb2
from junjo_backend.auth.server import VALIDATE_METHOD

from .net_helpers import running_backend

if TYPE_CHECKING:
    from tests.serve_process import ServeProcess

    from .conftest import FaultKit

PAYLOADS = 20_000
IN_FLIGHT = 32
RSS_SAMPLES = 10
# RSS growth allowed over the second half of the run: a leak of even 1 KiB per call would
# add about 10 MB there; allocator noise stays well under this.
RSS_SECOND_HALF_GUARD_KIB = 15_000
_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_INVALID_UTF8 = (b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xe2\x82", b"\xf8\x88\x80\x80\x80")


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field1(data: bytes) -> bytes:
    return b"\x0a" + _varint(len(data)) + data


def _near_miss(rng: random.Random, key: str) -> str:
    at = rng.randrange(len(key))
    match rng.randrange(6):
        case 0:
            return key[:at] + rng.choice(_ALPHABET.replace(key[at], "")) + key[at + 1 :]
        case 1:
            return key[:at] + key[at + 1 :]
        case 2:
            return key[:at] + rng.choice(_ALPHABET) + key[at:]
        case 3:
            return key[:at] + key[at].swapcase() + key[at + 1 :] if key[at].isalpha() else key[1:]
        case 4:
            return key + rng.choice((" ", "\n", "\x00", "\t"))
        case _:
            return rng.choice((" ", "\x00", "\ufeff")) + key


class PayloadMaker:
    """Deterministic random payloads over a bounded pool of key material."""

    def __init__(self, keys: list[str], seed: int = 20_000) -> None:
        self.rng = random.Random(seed)  # noqa: S311 (reproducible test data, not secrets)
        rng = self.rng
        self.keys = keys
        self.near_misses = sorted({_near_miss(rng, rng.choice(keys)) for _ in range(360)})
        self.bad_utf8 = [self._invalid_utf8() for _ in range(200)]
        self.random_long = [rng.randbytes(rng.randrange(12, 80)) for _ in range(200)]

    def material(self) -> list[str | bytes]:
        """Every long key material the payloads can carry (for the output scan)."""
        return [*self.keys, *self.near_misses, *self.bad_utf8, *self.random_long]

    def _invalid_utf8(self) -> bytes:
        key = self.rng.choice(self.keys).encode()
        at = self.rng.randrange(len(key))
        return key[:at] + self.rng.choice(_INVALID_UTF8) + key[at:]

    def _some_key(self) -> bytes:
        pool = (self.keys, self.near_misses)
        return self.rng.choice(self.rng.choice(pool)).encode()

    def make(self) -> tuple[str, bytes]:
        """One payload and the name of its kind."""
        rng = self.rng
        kind = rng.choice(
            (
                "valid",
                "near-miss",
                "invalid-utf8",
                "wrong-wire-type",
                "truncated-varint",
                "huge-length",
                "duplicate-or-unknown-field",
                "random-bytes",
                "random-bytes",
            )
        )
        key = self._some_key()
        match kind:
            case "valid":
                payload = _field1(rng.choice(self.keys).encode())
            case "near-miss":
                payload = _field1(rng.choice(self.near_misses).encode())
            case "invalid-utf8":
                payload = _field1(rng.choice(self.bad_utf8))
            case "wrong-wire-type":
                tag = rng.choice((b"\x08", b"\x09", b"\x0b", b"\x0c", b"\x0d", b"\x0e", b"\x0f"))
                payload = tag + _varint(len(key)) + key
            case "truncated-varint":
                payload = (
                    rng.choice((b"\x0a\x80", b"\x0a\xff\xff\xff", b"\x8a", b"\x0a", b"\x0a\x05ab"))
                    + key[: rng.randrange(len(key))]
                )
            case "huge-length":
                size = rng.choice((2**31 - 1, 2**32, 2**63, 2**64 - 1, len(key) + 1))
                payload = b"\x0a" + _varint(size) + key
            case "duplicate-or-unknown-field":
                other = self._some_key()
                payload = rng.choice(
                    (
                        _field1(key) + _field1(other),
                        _field1(key) + b"\x10\x01",
                        b"\x12" + _varint(len(other)) + other + _field1(key),
                        _field1(key) + b"\xfa\xff\xff\xff\x0f\x00",
                    )
                )
            case _:
                payload = (
                    rng.randbytes(rng.randrange(0, 12))
                    if rng.random() < 0.7
                    else rng.choice(self.random_long)
                )
        return kind, payload


def expected_key(payload: bytes) -> str | None:
    """The key protobuf reads from `payload`, or None when it does not parse."""
    try:
        return auth_pb2.ValidateApiKeyRequest.FromString(payload).api_key
    except DecodeError:
        return None


async def _send_all(
    backend: ServeProcess, maker: PayloadMaker, real: frozenset[str]
) -> tuple[Counter[str], Counter[str], list[str], list[int]]:
    outcomes: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    wrong: list[str] = []
    rss: list[int] = [backend.rss_kib()]
    async with grpc.aio.insecure_channel(backend.auth_address) as channel:
        # No serializers: raw bytes both ways.
        call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(VALIDATE_METHOD)
        sample_every = PAYLOADS // RSS_SAMPLES
        for start in range(0, PAYLOADS, IN_FLIGHT):
            batch = [maker.make() for _ in range(min(IN_FLIGHT, PAYLOADS - start))]
            answers = await asyncio.gather(
                *(call(payload, timeout=10) for _, payload in batch), return_exceptions=True
            )
            for (kind, payload), answer in zip(batch, answers, strict=True):
                kinds[kind] += 1
                if isinstance(answer, grpc.aio.AioRpcError):
                    outcomes[answer.code().name] += 1
                    continue
                assert isinstance(answer, bytes), answer
                is_valid = auth_pb2.ValidateApiKeyResponse.FromString(answer).is_valid
                outcomes["true" if is_valid else "false"] += 1
                if is_valid and expected_key(payload) not in real:
                    wrong.append(kind)
                if kind == "valid" and not is_valid:
                    wrong.append("a real key refused")
            if (start // IN_FLIGHT + 1) % (sample_every // IN_FLIGHT) == 0:
                rss.append(backend.rss_kib())
    rss.append(backend.rss_kib())
    return outcomes, kinds, wrong, rss


def test_random_and_mutated_payloads(
    kit: FaultKit,
) -> None:
    """No `true` for a wrong key, no crash, RSS levels off over 20,000 payloads."""
    keys = asyncio.run(kit.store_keys(kit.sqlite_url(), 5))
    maker = PayloadMaker(keys)
    for material in maker.material():
        kit.keys.add(material)
    with running_backend(kit, "serve-fuzz") as backend:
        outcomes, kinds, wrong, rss = asyncio.run(_send_all(backend, maker, frozenset(keys)))
        assert backend.alive(), "the server died under the payloads"

    assert not wrong, f"wrong answers: {Counter(wrong)}"
    assert sum(kinds.values()) == PAYLOADS
    half = rss[len(rss) // 2]
    assert rss[-1] - half < RSS_SECOND_HALF_GUARD_KIB, f"RSS kept growing (KiB): {rss}"
    kit.table.add(
        "random and mutated ValidateApiKey payloads (raw bytes)",
        f"{PAYLOADS:,} ({len(maker.material())} distinct long keys)",
        f"0 wrong answers; answers {dict(sorted(outcomes.items()))}; server alive; RSS"
        f" {rss[0] / 1024:.0f} MB before, {half / 1024:.0f} MB halfway,"
        f" {rss[-1] / 1024:.0f} MB at the end (max {max(rss) / 1024:.0f})",
    )

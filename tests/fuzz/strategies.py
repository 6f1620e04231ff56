"""Hypothesis strategies for malformed and adversarial runcap.v1 requests.

Two ways in. `Builder.message` builds any message from its descriptor (with
per-field overrides): every field set or missing, oneofs unset or set, hostile
values of each field's type. `Builder.mutated` starts from a valid request and
breaks one or two fields (or clears them), so the request gets past the first
checks and reaches the deeper ones: the ledger, the saga, the idempotency
records.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar, cast

from google.protobuf import duration_pb2, message_factory, timestamp_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

from runcap_server.ledger.types import MAX_MICROS
from runcap_server.validation import ID_PATTERN, METER_PATTERN

M = TypeVar("M", bound=Message)
# A field of a message, or of a message nested in it: (outer, ..., inner).
FieldPath = tuple[FieldDescriptor, ...]
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# The server's grpc.max_receive_message_length (app.py): anything bigger is
# refused by the transport with RESOURCE_EXHAUSTED before runcap sees it.
MESSAGE_LIMIT = 1 << 20

# Strings that have broken key layouts, parsers and log lines elsewhere: hash-tag
# braces, the key separators of the Redis layout (":", "/", "@"), path tricks,
# whitespace, NUL, invisible and right-to-left marks, combining characters,
# characters whose case mapping changes their length, and the odd Unicode
# planes (surrogates cannot travel in a proto string).
SPECIAL_TEXT = (
    "",
    " ",
    "\t",
    "\n",
    "\r\n",
    "\x00",
    "a\x00b",
    "\x7f",
    "{",
    "}",
    "{}",
    "}{",
    "{a}",
    "a{b}",
    "a}{b",
    "{{a}}",
    ":",
    "a:",
    "a::b",
    "/",
    "a/b",
    "a/",
    "@",
    "@a",
    "a@b",
    "@runs",
    "@prices",
    ".",
    "..",
    "../a",
    "a..b",
    "-",
    "_a",
    "*",
    "?",
    "[a]",
    "\\",
    "%",
    "%s%n",
    "'",
    '"',
    "a b",
    " a",
    "a ",
    "\u00a0",
    "\u200b",
    "\u200e",
    "\u200f",
    "\u202e",
    "\u2066",
    "\ufeff",
    "\u3000",
    "e\u0301",
    "\u0301",
    "a\u0300\u0301\u0302\u0303",
    "\u0130",
    "\u00df",
    "\u01c5",
    "\uff52\uff55\uff4e",
    "\U0001f600",
    "\U0001d400",
    "\U000e0001",
    "\U000f0000",
    "\U0010ffff",
    "\ufffd",
    "\uffff",
    "x" * 128,
    "x" * 129,
    "a" * 256,
    "a" * 257,
    "a/approval:spend",
    "a/approval:meter:",
    "/approval:spend",
    "a/approval:meter:x/y",
    "a/approval:other",
    "approval:spend",
    "a/b/c",
    "rc:{default/a}:a",
    "default/a",
    "{default/a}",
    "openai/",
    "/gpt-4o",
    "http://",
    "http:///a",
    "http://127.0.0.1:99999/",
    "http://[::1",
    "https://127.0.0.1:9/a b",
    "ftp://127.0.0.1/a",
    "javascript:alert(1)",
)
# Big enough to pass every length check many times over; the last is past the
# transport's message limit.
HUGE_SIZES = (4_096, 65_536, 400_000, MESSAGE_LIMIT + 1)
HUGE_UNITS = ("x", "{", "a/", "\u00e9", "\U0001f600", "\u200f")

INT64_EDGES = (
    0,
    1,
    -1,
    2,
    100,
    101,
    1_000_000,
    INT32_MAX,
    INT32_MAX + 1,
    2**32,
    10**9,
    10**9 + 1,
    10**12,
    10**12 + 1,
    MAX_MICROS,
    MAX_MICROS + 1,
    MAX_MICROS + 2,
    2**62,
    INT64_MAX,
    INT64_MAX - 1,
    INT32_MIN,
    -MAX_MICROS,
    -(2**53),
    INT64_MIN,
    INT64_MIN + 1,
)
INT32_EDGES = (
    0,
    1,
    -1,
    2,
    5,
    14,
    15,
    16,
    31,
    32,
    33,
    99,
    100,
    101,
    1000,
    1001,
    INT32_MAX,
    INT32_MIN,
)
DURATION_SECONDS = (0, 1, -1, 59, 60, 86_399, 86_400, 86_401, 315_576_000_000, 315_576_000_001)
TIMESTAMP_SECONDS = (
    0,
    1,
    -1,
    1_700_000_000,
    4_102_444_800,
    -62_135_596_800,
    -62_135_596_801,
    253_402_300_799,
    253_402_300_800,
)
NANOS = (
    0,
    1,
    -1,
    999_999,
    1_000_000,
    500_000_000,
    999_999_999,
    1_000_000_000,
    INT32_MAX,
    INT32_MIN,
)
DURATION = "google.protobuf.Duration"
TIMESTAMP = "google.protobuf.Timestamp"


def _edges(values: Sequence[int], low: int, high: int) -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from(values), st.integers(low, high))


def int64s() -> st.SearchStrategy[int]:
    return _edges(INT64_EDGES, INT64_MIN, INT64_MAX)


def int32s() -> st.SearchStrategy[int]:
    return _edges(INT32_EDGES, INT32_MIN, INT32_MAX)


def valid_ids() -> st.SearchStrategy[str]:
    """Ids the edge accepts, dense in the separators it allows (. _ - :)."""
    dense = st.text(alphabet="aZ09._:-", min_size=1, max_size=12).filter(ID_PATTERN.fullmatch)
    return st.one_of(st.from_regex(ID_PATTERN, fullmatch=True), dense)


def valid_meters() -> st.SearchStrategy[str]:
    dense = st.text(alphabet="a0._:-/", min_size=1, max_size=12).filter(METER_PATTERN.fullmatch)
    return st.one_of(st.from_regex(METER_PATTERN, fullmatch=True), dense)


def huge_texts() -> st.SearchStrategy[str]:
    return st.builds(
        lambda unit, size: unit * (size // len(unit.encode())),
        st.sampled_from(HUGE_UNITS),
        st.sampled_from(HUGE_SIZES),
    )


def texts(known: Sequence[str] = (), *, huge: bool = True) -> st.SearchStrategy[str]:
    """Hostile strings, valid-looking ids, near misses, and the `known` ids
    (fixtures' runs, reservations, models) so requests also cross-reference.
    Huge ones only when `huge` (not for list elements: a thousand of them
    would make a message of gigabytes)."""
    near = st.builds(
        lambda base, special, before: special + base if before else base + special,
        valid_ids(),
        st.sampled_from(SPECIAL_TEXT),
        st.booleans(),
    )
    options = [
        st.sampled_from(SPECIAL_TEXT),
        st.text(st.characters(codec="utf-8"), max_size=40),
        valid_ids(),
        valid_meters(),
        near,
    ]
    if huge:
        options.append(huge_texts())
    if known:
        options.append(st.sampled_from(known))
    return st.one_of(options)


def page_tokens(queries: Sequence[str]) -> st.SearchStrategy[str]:
    """Page tokens: garbage, and well-formed tokens (base64 JSON of [cursor,
    query], as the servers write them) for one of `queries`, whose cursor is
    hostile."""
    parts = st.one_of(int64s(), st.integers(), st.floats(), texts(), st.none(), st.booleans())
    payload = st.one_of(
        st.lists(parts, max_size=4),
        st.tuples(st.integers(), texts(), st.sampled_from(queries)).map(list),
        st.tuples(parts, parts, st.sampled_from(queries)).map(list),
    )
    encoded = payload.map(
        lambda p: base64.urlsafe_b64encode(json.dumps(p).encode()).decode().rstrip("=")
    )
    return st.one_of(encoded, texts())


# Byte strings no UTF-8 decoder may accept: a stray continuation byte, a cut
# sequence, an overlong encoding, an encoded surrogate, a code point past U+10FFFF.
BAD_UTF8 = (
    b"\xff",
    b"\x80",
    b"\xc3\x28",
    b"\xe2\x82",
    b"\xc0\xaf",
    b"\xed\xa0\x80",
    b"\xf4\x90\x80\x80",
)


def undecodable_bodies() -> st.SearchStrategy[bytes]:
    """Request bodies a parser must refuse, or that mean something else: bad
    UTF-8 in a length-delimited field (a string in most requests), cut and
    overlong varints, lengths past the end, unbalanced groups, and noise."""
    field = st.integers(1, 20)
    bad_string = st.builds(
        lambda n, bad, pad: bytes([n << 3 | 2, len(pad + bad)]) + pad + bad,
        field,
        st.sampled_from(BAD_UTF8),
        st.sampled_from((b"", b"run", b"a" * 10)),
    )
    fixed = st.sampled_from(
        (
            b"\x08" + b"\xff" * 11,  # a varint longer than 10 bytes
            b"\x08\x80",  # a varint cut short
            b"\x0a\xff\xff\xff\xff\x0f",  # a length far past the end
            b"\x0a\x05ab",  # a length past the end
            b"\x0b",  # a group that never ends
            b"\x0c",  # a group end with no start
            b"\x0f",  # wire type 7
            b"\x00",  # field number 0
        )
    )
    return st.one_of(bad_string, fixed, st.binary(max_size=64))


def _enum_values(field: FieldDescriptor) -> st.SearchStrategy[int]:
    assert field.enum_type is not None
    known = [v.number for v in field.enum_type.values]
    # Proto3 enums are open: a client may send any int32.
    unknown = (-1, max(known) + 1, 99, INT32_MAX, INT32_MIN)
    return st.one_of(st.sampled_from(known), st.sampled_from(unknown))


def _time(kind: str) -> st.SearchStrategy[Message]:
    """Durations and timestamps: their range's edges, past them, not normalized."""
    seconds = DURATION_SECONDS if kind == DURATION else TIMESTAMP_SECONDS
    cls: Callable[..., Message] = (
        duration_pb2.Duration if kind == DURATION else timestamp_pb2.Timestamp
    )
    return st.builds(
        lambda s, n: cls(seconds=s, nanos=n),
        st.one_of(_edges(seconds, INT64_MIN, INT64_MAX), st.sampled_from((INT64_MAX, INT64_MIN))),
        _edges(NANOS, INT32_MIN, INT32_MAX),
    )


Overrides = Mapping[str, st.SearchStrategy[Any]]


class Builder:
    """Values for any field of any message: hostile, of the right wire type."""

    def __init__(self, known: Sequence[str] = (), overrides: Overrides | None = None) -> None:
        self.text = texts(known)
        self.short_text = texts(known, huge=False)
        # By full field name, e.g. "runcap.v1.ListRunsRequest.page_token".
        self.overrides = dict(overrides or {})

    def scalar(
        self, field: FieldDescriptor, depth: int, *, huge: bool = True
    ) -> st.SearchStrategy[Any]:
        """One value of the field's type (an element, for a repeated field)."""
        if field.full_name in self.overrides:
            return self.overrides[field.full_name]
        t = field.type
        if t == FieldDescriptor.TYPE_STRING:
            return self.text if huge else self.short_text
        if t == FieldDescriptor.TYPE_BYTES:
            return st.binary(max_size=64)
        if t == FieldDescriptor.TYPE_BOOL:
            return st.booleans()
        if t == FieldDescriptor.TYPE_ENUM:
            return _enum_values(field)
        if t in (
            FieldDescriptor.TYPE_INT64,
            FieldDescriptor.TYPE_SINT64,
            FieldDescriptor.TYPE_SFIXED64,
        ):
            return int64s()
        if t in (
            FieldDescriptor.TYPE_INT32,
            FieldDescriptor.TYPE_SINT32,
            FieldDescriptor.TYPE_SFIXED32,
        ):
            return int32s()
        if t in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
            return _edges((0, 1, INT64_MAX, 2**64 - 1), 0, 2**64 - 1)
        if t in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
            return _edges((0, 1, INT32_MAX, 2**32 - 1), 0, 2**32 - 1)
        if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
            return st.floats(width=32 if t == FieldDescriptor.TYPE_FLOAT else 64)
        if t == FieldDescriptor.TYPE_MESSAGE:
            nested = _nested(field)
            name = nested.full_name
            if name in (DURATION, TIMESTAMP):
                return _time(name)
            return self.message(nested, depth + 1)
        raise AssertionError(f"no strategy for {field.full_name} (type {t})")

    def value(self, field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
        """A whole field's value: a scalar, a list or a dict."""
        if _is_map(field):
            key_field, value_field = _nested(field).fields
            entries = st.dictionaries(
                self.scalar(key_field, depth, huge=False),
                self.scalar(value_field, depth, huge=False),
                max_size=4,
            )
            if key_field.type != FieldDescriptor.TYPE_STRING:
                return entries
            # Past the documented counts (64 labels, 32 meters).
            crowd = st.builds(
                lambda n, v: {f"k{i}": v for i in range(n)},
                st.sampled_from((33, 65, 300)),
                self.scalar(value_field, depth, huge=False),
            )
            return st.one_of(entries, crowd)
        if field.is_repeated:
            element = self.scalar(field, depth, huge=False)
            # Past the documented counts (32 meters, 256 models), one value repeated.
            many: st.SearchStrategy[list[Any]] = st.builds(
                lambda n, v: [v] * n, st.sampled_from((33, 257, 1000)), element
            )
            return st.one_of(st.lists(element, max_size=4), many)
        return self.scalar(field, depth)

    def _member(
        self, field: FieldDescriptor, depth: int
    ) -> st.SearchStrategy[tuple[FieldDescriptor, Any]]:
        """A oneof member with its value."""
        return self.value(field, depth).map(lambda value: (field, value))

    def message(self, descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
        """Any message of `descriptor`: each field missing or hostile; each
        oneof unset or one member set. Nested messages thin out with depth."""
        cls = _message_class(descriptor)
        if depth > 3:
            return st.just(cls())
        plain, oneofs = _fields(descriptor)
        draws: dict[str, st.SearchStrategy[Any]] = {
            f.name: st.one_of(st.none(), self.value(f, depth)) for f in plain
        }
        for name, members in oneofs.items():
            draws[name] = st.one_of(st.none(), *(self._member(f, depth) for f in members))

        def build(values: dict[str, Any]) -> Message:
            message = cls()
            for f in plain:
                if values[f.name] is not None:
                    set_field(message, f, values[f.name])
            for name in oneofs:
                if values[name] is not None:
                    set_field(message, *values[name])
            return message

        return st.fixed_dictionaries(draws).map(build)

    def mutated(self, valid: Sequence[M]) -> st.SearchStrategy[M]:
        """A valid request with one or two fields replaced by hostile values or
        cleared (also fields of nested messages the template leaves unset)."""
        paths = field_paths(descriptor_of(valid[0]))
        if not paths:  # a request with no fields: nothing to break
            return st.sampled_from(valid)

        def change(path: FieldPath) -> st.SearchStrategy[Any]:
            return st.one_of(st.just(_CLEAR), self.value(path[-1], len(path)))

        def edits_of(path: FieldPath) -> st.SearchStrategy[tuple[FieldPath, Any]]:
            return change(path).map(lambda value: (path, value))

        edit = st.sampled_from(paths).flatmap(edits_of)

        def apply(template: M, edits: list[tuple[FieldPath, Any]]) -> M:
            message = type(template)()
            message.CopyFrom(template)
            for path, value in edits:
                apply_edit(message, path, value)
            return message

        return st.builds(apply, st.sampled_from(valid), st.lists(edit, min_size=1, max_size=2))


_CLEAR = object()


def descriptor_of(message: Message) -> Descriptor:
    return cast(Descriptor, message.DESCRIPTOR)


def _nested(field: FieldDescriptor) -> Descriptor:
    """The message type of a message field."""
    assert field.message_type is not None, field.full_name
    return field.message_type


def _is_map(field: FieldDescriptor) -> bool:
    return field.type == FieldDescriptor.TYPE_MESSAGE and bool(
        _nested(field).GetOptions().map_entry
    )


def _synthetic(oneof: Any) -> bool:
    """A proto3 `optional` field's hidden oneof."""
    return len(oneof.fields) == 1 and oneof.name == "_" + oneof.fields[0].name


def _fields(
    descriptor: Descriptor,
) -> tuple[list[FieldDescriptor], dict[str, list[FieldDescriptor]]]:
    """The fields outside real oneofs, and each real oneof's members."""
    oneofs = {o.name: list(o.fields) for o in descriptor.oneofs if not _synthetic(o)}
    in_oneof = {f.name for members in oneofs.values() for f in members}
    return [f for f in descriptor.fields if f.name not in in_oneof], oneofs


def _message_class(descriptor: Descriptor) -> Callable[[], Message]:
    return message_factory.GetMessageClass(descriptor)


def set_field(message: Message, field: FieldDescriptor, value: Any) -> None:
    """Sets a field from a drawn value (a scalar, message, list or dict)."""
    target = getattr(message, field.name)
    if _is_map(field):
        value_field = _nested(field).fields_by_name["value"]
        for k, v in value.items():
            if value_field.type == FieldDescriptor.TYPE_MESSAGE:
                target[k].CopyFrom(v)
            else:
                target[k] = v
    elif field.is_repeated:
        del target[:]
        target.extend(value)
    elif field.type == FieldDescriptor.TYPE_MESSAGE:
        target.CopyFrom(value)
    else:
        setattr(message, field.name, value)


def field_paths(descriptor: Descriptor, depth: int = 0) -> list[FieldPath]:
    """Every field of a message and of its nested messages (3 levels), as paths.
    Durations and timestamps are leaves: they are replaced whole."""
    paths: list[FieldPath] = []
    for field in descriptor.fields:
        paths.append((field,))
        nested = field.message_type
        if (
            depth < 2
            and nested is not None
            and not field.is_repeated
            and nested.full_name not in (DURATION, TIMESTAMP)
        ):
            paths.extend((field, *rest) for rest in field_paths(nested, depth + 1))
    return paths


def apply_edit(message: Message, path: FieldPath, value: Any) -> None:
    for field in path[:-1]:
        message = getattr(message, field.name)
    last = path[-1]
    if value is _CLEAR:
        message.ClearField(last.name)
    else:
        set_field(message, last, value)


def describe(message: Message, limit: int = 600) -> str:
    """A request, short enough for an assertion message."""
    text = f"{type(message).__name__}({message})".replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + f"... ({message.ByteSize()} bytes)"


def is_oversized(request: Message | bytes) -> bool:
    """Whether the transport refuses the request before runcap sees it."""
    size = len(request) if isinstance(request, bytes) else request.ByteSize()
    return size > MESSAGE_LIMIT

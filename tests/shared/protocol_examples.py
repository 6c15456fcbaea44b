"""Generate the annotated hex dumps and tables in docs/PROTOCOL.md from the code.

The bytes come from ``GuestConnection.send`` / ``HostConnection.send`` — never typed by
hand — and the tables from ``SEND_RULES``/``RECEIVE_RULES`` and ``CODES``. Each generated
part sits between ``<!-- generated:NAME -->`` markers in the doc;
tests/shared/test_protocol_doc.py fails when one is stale, and ``--update`` rewrites them.

    .venv/bin/python tests/shared/protocol_examples.py             # print the blocks
    .venv/bin/python tests/shared/protocol_examples.py --update    # rewrite docs/PROTOCOL.md
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from msgpack import packb  # noqa: E402

from shared.errors import RemoteProtocolError  # noqa: E402
from shared.messages import Ack, Inflate, Report, Welcome  # noqa: E402
from shared.protocol import DEFAULT_MAX_MESSAGE_BYTES, GuestConnection, HostConnection  # noqa: E402
from shared.ranges import encode_pfn32, encode_ranges  # noqa: E402

HEX_WIDTH = 8  # bytes per line in a dump


def _token(data: bytes, pos: int) -> tuple[int, str, int | None, str]:
    """One msgpack token at ``pos``: (length of header+scalar, kind, count/len, text)."""
    b = data[pos]
    if b <= 0x7F:
        return 1, "int", None, str(b)
    if 0x80 <= b <= 0x8F:
        return 1, "map", b & 0x0F, f"map, {b & 0x0F} entries"
    if 0x90 <= b <= 0x9F:
        return 1, "array", b & 0x0F, f"array, {b & 0x0F} elements"
    if 0xA0 <= b <= 0xBF:
        n = b & 0x1F
        return 1 + n, "str", n, f'str "{data[pos + 1 : pos + 1 + n].decode()}"'
    if b in (0xCC, 0xCD, 0xCE, 0xCF):
        width = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}[b]
        value = int.from_bytes(data[pos + 1 : pos + 1 + width], "big")
        return 1 + width, "int", None, f"uint{8 * width} {value}"
    if b in (0xD9, 0xDA, 0xDB):
        width = {0xD9: 1, 0xDA: 2, 0xDB: 4}[b]
        n = int.from_bytes(data[pos + 1 : pos + 1 + width], "big")
        return 1 + width + n, "str", n, f'str{8 * width} "{data[pos + 1 + width : pos + 1 + width + n].decode()}"'
    if b in (0xC4, 0xC5, 0xC6):
        width = {0xC4: 1, 0xC5: 2, 0xC6: 4}[b]
        n = int.from_bytes(data[pos + 1 : pos + 1 + width], "big")
        return 1 + width, "bin", n, f"bin{8 * width}, {n} bytes follow"
    raise ValueError(f"no annotation for msgpack byte {b:#04x}")


def _hex(chunk: bytes) -> list[str]:
    return [" ".join(f"{x:02x}" for x in chunk[i : i + HEX_WIDTH]) for i in range(0, len(chunk), HEX_WIDTH)]


def _lines(chunk: bytes, note: str) -> list[tuple[str, str]]:
    rows = _hex(chunk)
    return [(rows[0], note)] + [(row, "") for row in rows[1:]]


def _range_words(payload: bytes, encoding: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    if encoding == "pfn32":
        for i in range(0, len(payload), 4):
            pfn = int.from_bytes(payload[i : i + 4], "little")
            out += _lines(payload[i : i + 4], f"  u32 LE: pfn {pfn:#x}, one 4 KiB page")
        return out
    words = np.frombuffer(payload, dtype="<u8").tolist()
    after_escape = False
    for i, word in enumerate(words):
        chunk = payload[8 * i : 8 * i + 8]
        if after_escape:
            note = f"  u64 LE count word: {word} pages"
            after_escape = False
        elif word & 0xFFF:
            note = f"  u64 LE range word: pfn {word >> 12:#x}, count {word & 0xFFF} (inline)"
        else:
            note = f"  u64 LE range word: pfn {word >> 12:#x}, count field 0 = escape"
            after_escape = True
        out += _lines(chunk, note)
    return out


def annotate(data: bytes, labels: dict[int, str], encoding: str = "ranges52") -> str:
    """A dump of ``data``: one msgpack token (or one range word) per line, with a note.

    ``labels`` names the top-level array elements by index (0 is the type).
    """
    rows: list[tuple[str, str]] = []
    pos = 0
    # Walk tokens; remember which top-level element each token starts.
    stack: list[int] = []  # remaining elements per open container
    element = -1
    while pos < len(data):
        size, kind, count, text = _token(data, pos)
        top_level = len(stack) == 1
        if top_level:
            element += 1
        note = text
        if top_level and element in labels:
            label = labels[element]
            note = label if label.startswith("type ") else f"{label}: {text}"
        if kind == "bin":
            rows += _lines(data[pos : pos + size], note)
            body = data[pos + size : pos + size + count]
            rows += _range_words(body, encoding)
            size += count
        else:
            rows += _lines(data[pos : pos + size], note)
        pos += size
        # container bookkeeping
        if stack:
            stack[-1] -= 1
        if kind == "array":
            stack.append(count)
        elif kind == "map":
            stack.append(2 * count)
        while stack and stack[-1] == 0:
            stack.pop()
    width = max(len(hexes) for hexes, _ in rows)
    return "\n".join(f"{hexes:<{width}}  {note}".rstrip() for hexes, note in rows)


def examples() -> list[tuple[str, str]]:
    """(title, annotated dump) for each example, in the order the doc shows them."""
    guest = GuestConnection("vm-1", 262144, features=("ranges52", "stats", "future-thing"))
    host = HostConnection()
    hello = guest.hello()
    host.receive_data(hello)
    host.next_event()
    # What balloon-host sends (host_daemon/session.py): it also says its maximum message
    # size and the guest's size as the host counts it.
    welcome = host.send(Welcome(window=8, max_ranges=4096, features=("ranges52", "stats"),
                                max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES, pages=262144))
    guest.receive_data(welcome)
    guest.next_event()
    # Both ranges lie inside the guest's 262,144 pages (PFN 0x30000 + 5000 < 0x40000).
    report = guest.send(Report(payload=encode_ranges([0x12345, 0x30000], [512, 5000])))
    host.receive_data(report)
    host.next_event()
    ack = host.send(Ack(seq=0, rejected_pages=0))

    # The ERROR is the one the host sends when a guest overruns its window of 8.
    overrun = HostConnection()
    overrun.receive_data(GuestConnection("vm-1", 262144).hello())
    overrun.next_event()
    overrun.send(Welcome(window=8, max_ranges=4096, features=()))
    overrun.receive_data(b"".join(packb([3, seq, b""]) for seq in range(9)))
    try:
        list(overrun.events())
    except RemoteProtocolError as error:
        error_bytes = overrun.send_error(error)

    legacy = GuestConnection("vm-3", 1024, features=("pfn32",))
    legacy_host = HostConnection()
    legacy_host.receive_data(legacy.hello())
    legacy_host.next_event()
    legacy.receive_data(legacy_host.send(Welcome(window=1, max_ranges=256, features=("pfn32",))))
    legacy.next_event()
    inflate = legacy.send(Inflate(payload=encode_pfn32(np.array([0x1000, 0x1001, 0x2F00]))))

    return [
        ("HELLO", annotate(hello, {0: "type 1 = HELLO", 1: "body"})),
        ("WELCOME", annotate(welcome, {0: "type 2 = WELCOME", 1: "body"})),
        ("REPORT", annotate(report, {0: "type 3 = REPORT", 1: "seq", 2: "payload"})),
        ("ACK", annotate(ack, {0: "type 4 = ACK", 1: "seq", 2: "rejected_pages"})),
        ("ERROR", annotate(error_bytes, {0: "type 15 = ERROR", 1: "code", 2: "detail"})),
        ("INFLATE (pfn32)", annotate(inflate, {0: "type 6 = INFLATE", 1: "seq", 2: "payload"}, "pfn32")),
    ]


def state_table() -> str:
    """The send/receive rule tables of shared/protocol.py as a markdown table."""
    from shared.messages import MessageType
    from shared.protocol import RECEIVE_RULES, SEND_RULES, Role, State

    def moves(table, role, state):
        grouped: dict[State, list[str]] = {}
        for kind, move in sorted(table[(role, state)].items()):
            name = MessageType(kind).name
            grouped.setdefault(move.after, []).append(f"{name} ({move.feature})" if move.feature else name)
        if not grouped:
            return "—"
        return "; ".join(f"{', '.join(names)} → {after.name}" for after, names in grouped.items())

    lines = ["| role | state | may send (→ next state) | may receive (→ next state) |", "|---|---|---|---|"]
    for role in Role:
        for state in State:
            lines.append(f"| {role.value} | {state.name} | {moves(SEND_RULES, role, state)} | "
                         f"{moves(RECEIVE_RULES, role, state)} |")
    return "\n".join(lines)



def error_table() -> str:
    """Every code of shared/errors.py CODES with its meaning, as a markdown table."""
    from shared.errors import CODES

    lines = ["| code | meaning |", "|---|---|"]
    lines += [f"| `{code}` | {meaning} |" for code, meaning in CODES.items()]
    return "\n".join(lines)


def generated_blocks() -> dict[str, str]:
    """Every generated part of docs/PROTOCOL.md, by the name of its markers."""
    blocks = {"state-table": state_table(), "error-table": error_table()}
    for title, dump in examples():
        blocks[f"example:{title}"] = f"```text\n{dump}\n```"
    return blocks


def update_doc(text: str) -> str:
    """``text`` with the part between each ``<!-- generated:NAME -->`` and
    ``<!-- /generated:NAME -->`` replaced by what the code generates now."""
    for name, block in generated_blocks().items():
        start, end = f"<!-- generated:{name} -->\n", f"\n<!-- /generated:{name} -->"
        if start not in text or end not in text:
            raise ValueError(f"docs/PROTOCOL.md has no markers for {name!r}")
        before, rest = text.split(start, 1)
        _, after = rest.split(end, 1)
        text = before + start + block + end + after
    return text


def main() -> None:
    doc = Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md"
    if sys.argv[1:] == ["--update"]:
        current = doc.read_text(encoding="utf-8")
        updated = update_doc(current)
        if updated != current:
            doc.write_text(updated, encoding="utf-8")
        print(f"{doc}: {'updated' if updated != current else 'already up to date'}")
        return
    for name, block in generated_blocks().items():
        print(f"<!-- generated:{name} -->\n{block}\n<!-- /generated:{name} -->\n")


if __name__ == "__main__":
    main()

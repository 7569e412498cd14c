"""The metric name carbon-c-relay 3.7.3 really routes and sends, for any input bytes.

The relay does not hash what a client sends. Before any rule sees a line,
dispatcher.c (dispatch_received_metrics) rewrites it byte by byte:

- a line ends at '\\n' or '\\r'; a line without a space, with nothing left
  after the rewrite, longer than -M - 1 bytes or with a name longer than -m
  is discarded (counted in metricsDiscarded);
- ' ', '\\t' and '.' at the start are skipped; '\\t' becomes ' ';
- the name ends at the first space; a '.' just before it is dropped;
- a '.' or ' ' equal to the byte written before it is dropped (runs of dots
  in the name become one dot), and so is one right after the end of the name;
- in the name every byte that is not [A-Za-z0-9], not in the allowed
  characters (-c, default "-_:#") or is NUL becomes '_' (so every byte
  >= 0x80: 'ä' is two underscores);
- unless ';' is an allowed character, a ';' in the name starts the tags: the
  name (what is hashed and matched) ends before it, and the tags, value and
  timestamp are copied as they are (only the dot and space rules apply).

The consistent hash then runs over the name up to its end, so two names that
differ only in rewritten bytes are one metric in one place. `carbon-c-relay -t`
skips this step, which is why a comparison against -t alone never shows it.

`relay_line` is a literal port of that loop (the specification, used by the
tests against the live relay); `relay_key` and `rewrite_block` compute only
the routed name, fast, for `carbonscale ring`.
"""

from __future__ import annotations

import re
from functools import lru_cache

import numpy as np

# relay.c: `if (allowed_chars == NULL) allowed_chars = "-_:#";`
DEFAULT_ALLOWED_CHARS = b"-_:#"
# relay.h METRIC_BUFSIZ: the default and largest -M.
METRIC_BUFSIZ = 32768

_SPACE, _TAB, _DOT, _SEMI, _UNDERSCORE = b" \t.;_"
_ALNUM = bytes(range(48, 58)) + bytes(range(65, 91)) + bytes(range(97, 123))


def _allowed(allowed_chars: bytes | str) -> bytes:
    return allowed_chars.encode() if isinstance(allowed_chars, str) else bytes(allowed_chars)


def tags_supported(allowed_chars: bytes | str = DEFAULT_ALLOWED_CHARS) -> bool:
    """dispatcher.c: tags are recognised when ';' is not an allowed character."""
    return b";" not in _allowed(allowed_chars)


def relay_line(
    line: bytes,
    allowed_chars: bytes | str = DEFAULT_ALLOWED_CHARS,
    max_line: int = METRIC_BUFSIZ,
    max_name: int | None = None,
) -> tuple[bytes, int] | None:
    """(the line as the relay sends it, without '\\n'; length of the routed name),
    or None when the relay discards the line.

    `line` holds no '\\n' or '\\r' (they end lines: split with `split_lines`).
    A port of dispatch_received_metrics, statement for statement.
    """
    keep = frozenset(_ALNUM + _allowed(allowed_chars))
    search_tags = tags_supported(allowed_chars)
    out = bytearray()
    firstspace = -1
    for byte in line:
        if byte in (_SPACE, _TAB, _DOT):
            if not out:
                continue  # never start with a separator
            if byte == _TAB:
                byte = _SPACE
            if byte == _SPACE and firstspace < 0:
                if out[-1] == _DOT:
                    out.pop()  # strip trailing separator
                firstspace = len(out)
                out.append(_SPACE)
            elif out[-1] != byte and len(out) - 1 != firstspace:
                out.append(byte)
        elif search_tags and byte == _SEMI:
            search_tags = False
            firstspace = len(out)
            out.append(byte)
        elif byte != 0 and (firstspace >= 0 or byte in keep):
            out.append(byte)
        else:
            out.append(_UNDERSCORE)
    if (
        not out
        or firstspace < 0
        or len(out) > max_line - 1
        or firstspace > (max_line if max_name is None else max_name)
    ):
        return None
    return bytes(out), firstspace


def split_lines(data: bytes) -> list[bytes]:
    """Lines as the relay cuts them: at every '\\n' and every '\\r'."""
    return re.split(rb"[\r\n]", data)


_WORD, _DOT_CLASS, _SEPARATOR, _OTHER = range(4)


@lru_cache(maxsize=8)
def _tables(allowed_chars: bytes) -> tuple[bytes, bytes]:
    """(translation of name bytes, class of each byte for the unchanged-block
    test) for one allowed-characters setting."""
    keep = set(_ALNUM + allowed_chars) - {0}
    tags = b";" not in allowed_chars
    # Name bytes (other bytes become '_'); blanks and line ends stay, and with
    # tags a ';' becomes a blank: it ends the name as the first space does.
    table = bytes(
        _SPACE if b == _SEMI and tags else b if b in keep or b in b". \t\n" else _UNDERSCORE
        for b in range(256)
    )
    classes = np.full(256, _OTHER, np.uint8)
    classes[list(keep - ({_SEMI} if tags else set()))] = _WORD
    classes[_DOT] = _DOT_CLASS
    classes[list(b" \t\n")] = _SEPARATOR
    return table, classes.tobytes()  # a translate table: faster than indexing an array


def _passes(block: bytes, classes: bytes) -> tuple[bool, bool, bool] | None:
    """None when no line of block needs a rewrite, else which dot passes it
    needs: (a line starts with a separator, a run of dots, a dot before a
    blank or at the end). Values are tested too: a false alarm costs time only."""
    if not block:
        return None
    codes = np.frombuffer(block, np.uint8)
    kind = np.frombuffer(block.translate(classes), np.uint8)
    dot = kind == _DOT_CLASS
    blank = kind == _SEPARATOR
    starts = np.empty(len(codes), bool)
    starts[0] = True
    starts[1:] = codes[:-1] == 10
    lead = bool(((dot | (blank & (codes != 10))) & starts).any())
    runs = bool((dot[1:] & dot[:-1]).any())
    trailing = bool(dot[-1] or (dot[:-1] & blank[1:]).any())
    if not (lead or runs or trailing or (kind == _OTHER).any()):
        return None
    if b"\r" in block:  # '\r' ends lines too: new line starts the test did not see
        return True, True, True
    return lead, runs, trailing


def rewrite_block(block: bytes, allowed_chars: bytes | str = DEFAULT_ALLOWED_CHARS) -> bytes:
    """A block of lines whose first fields are the names the relay routes them by.

    A block the rewrite leaves unchanged (the common case: a few byte scans)
    is returned as it is. Otherwise each line starts with its rewritten name
    (what follows is mangled), and lines without one (blank, only separators,
    a name-less ';tags' line, a line with a ';' after its first space, which
    the relay routes by "name value...") become blank, which locate skips. A
    bare name is taken as if a value followed.
    The same rules as relay_line, done on the whole block at once.
    """
    allowed = _allowed(allowed_chars)
    table, classes = _tables(allowed)
    passes = _passes(block, classes)
    if passes is None:
        return block
    lead, runs, trailing = passes
    names = block.replace(b"\r", b"\n")
    if lead:
        names = re.sub(rb"(?m)^[ \t.]+", b"", names)  # leading separators
    if b";" not in allowed and b";" in names:
        # Tags without a name, and a ';' after the first space, which still
        # ends the routed name there (the relay's tag check runs on the whole
        # line): "name value" is no name.
        names = re.sub(rb"(?m)^(?:;|[^ \t;\n]*[ \t][^;\n]*;)[^\n]*", b"", names)
    if runs:
        names = re.sub(rb"\.\.+", b".", names)
    if trailing or runs:
        # The dot before the space that ends a name goes (before a ';' it
        # stays); so does the one ending a bare name.
        names = names.replace(b". ", b" ").replace(b".\t", b"\t").replace(b".\n", b"\n")
        if names.endswith(b"."):
            names = names[:-1]
    # Other bytes become '_' and a tag ';' a blank: the name is the first field.
    names = names.translate(table)
    return names if names.endswith(b"\n") or not names else names + b"\n"


def relay_key(line: bytes, allowed_chars: bytes | str = DEFAULT_ALLOWED_CHARS) -> bytes:
    """The name the relay routes a line (or a bare name) by: what the
    consistent hash and the match rules see. Empty when there is none.

    '\n' and '\r' must not occur (see `split_lines`). Equal to relay_line's
    name for every line the relay accepts (tests/test_relay_names.py).
    """
    fields = rewrite_block(line, allowed_chars).split(None, 1)  # an unchanged line keeps its value
    return fields[0] if fields else b""

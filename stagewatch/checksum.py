"""Reading the staged checksum file: which SHA-256 digest it gives for the artifact.

Three forms are accepted, and nothing else:

    3f2a...c9                              a bare digest, alone in the file
    3f2a...c9  dealspace                   sha256sum output (" *dealspace" in binary mode too);
                                           several lines allowed, the artifact's line counts
    SHA256 (dealspace) = 3f2a...c9         BSD style, as `sha256sum --tag` writes it

Forms may be mixed in one file, as sha256sum(1) --check allows. Hex digits may be upper or
lower case; the digest returned is lower case. Lines may end in CRLF, and blank lines and
spaces or tabs around a line are ignored.

Choices the contract leaves open:

- A name counts as the artifact when it is the artifact's name or `./` followed by it (what
  `sha256sum ./dealspace` writes). Any other path, `build/dealspace` or `/tmp/dealspace`
  included, names some other file: its line must be well formed and is otherwise ignored.
- sha256sum escapes a name holding a backslash or a line break by starting the line with a
  backslash (`\\`, `\\n`, `\\r` inside the name); such lines are unescaped as sha256sum
  --check does.
- A UTF-8 byte order mark is refused: sha256sum never writes one, so it means the file went
  through an editor, and the operator is told to save it without one.
- Every non-blank line must be well formed, even one for another file, so that a damaged
  file is noticed instead of being half read.

Every refusal is a ChecksumError naming the file and, where one is at fault, the line.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

from stagewatch.errors import ChecksumError

MAX_CHECKSUM_FILE_BYTES = 64 * 1024
SHA256_HEX_DIGITS = 64

_UTF8_BYTE_ORDER_MARK = b"\xef\xbb\xbf"
_UTF16_BYTE_ORDER_MARKS = (b"\xff\xfe", b"\xfe\xff")

# The digest lengths of other common algorithms, to say what a wrong-length digest looks like.
_OTHER_ALGORITHMS = {32: "MD5", 40: "SHA-1", 56: "SHA-224", 96: "SHA-384", 128: "SHA-512"}

# `TAG (name) = digest`. The name runs to the last ") = ", so names may hold parentheses.
# A tag is short and starts with a letter, so a sha256sum line never looks like one.
_BSD_LINE = re.compile(
    r"(?P<tag>[A-Za-z][A-Za-z0-9-]{0,15}) \((?P<name>.*)\) =(?: (?P<digest>.*))?"
)

# `openssl dgst` writes `SHA256(name)= digest` (`SHA2-256(...)` since OpenSSL 3).
_OPENSSL_LINE = re.compile(r"[A-Za-z][A-Za-z0-9-]{0,15} ?\(.*\) ?= ?\S*")

# In a sha256sum line the digest runs to the first space or tab.
_DIGEST_END = re.compile(r"[ \t]")

_ESCAPES = {"\\": "\\", "n": "\n", "r": "\r"}


@dataclass(frozen=True)
class _Entry:
    """One digest line: `name` is None for a bare digest."""

    line_number: int
    name: str | None
    digest: str


def parse_checksum_file(content: bytes, artifact: str, *, source: str | None = None) -> str:
    """Return the lower-case 64-hex SHA-256 digest that `content` gives for `artifact`.

    `source` names the file in messages (default `<artifact>.sha256`). Raise ChecksumError,
    naming the file, the line and what is wrong, when `content` is not one of the accepted
    forms, gives no digest for `artifact`, or gives it two different ones.
    """
    label = source if source is not None else f"{artifact}.sha256"
    text = _decode(content, label)
    entries = _parse_lines(text, label)

    return _digest_for(artifact, entries, label)


def _decode(content: bytes, label: str) -> str:
    if len(content) > MAX_CHECKSUM_FILE_BYTES:
        raise ChecksumError(
            f"{label}: is {len(content)} bytes; a checksum file may be at most "
            f"{MAX_CHECKSUM_FILE_BYTES} bytes"
        )
    if not content:
        raise ChecksumError(f"{label}: is empty")
    if content.startswith(_UTF8_BYTE_ORDER_MARK):
        raise ChecksumError(
            f"{label}: starts with a UTF-8 byte order mark (sha256sum never writes one); "
            f"save the file without it"
        )
    if content.startswith(_UTF16_BYTE_ORDER_MARKS):
        raise ChecksumError(f"{label}: is UTF-16 text; write it as sha256sum does, in UTF-8")

    try:
        return content.decode("utf-8")
    except UnicodeDecodeError as error:
        line_number = content.count(b"\n", 0, error.start) + 1
        raise ChecksumError(
            f"{label}: line {line_number}: is not UTF-8 text (byte 0x{content[error.start]:02x} "
            f"at offset {error.start}); is this a checksum file?"
        ) from None


def _parse_lines(text: str, label: str) -> list[_Entry]:
    entries: list[_Entry] = []
    for line_number, raw_line in enumerate(text.split("\n"), start=1):
        line = raw_line.removesuffix("\r")
        _refuse_control_characters(line, line_number, label)

        stripped = line.strip(" \t")
        if stripped:
            entries.append(_parse_line(stripped, line_number, label))

    if not entries:
        raise ChecksumError(f"{label}: holds no digest, only blank lines")

    bare = [entry for entry in entries if entry.name is None]
    if bare and len(entries) > 1:
        raise _line_error(
            label, bare[0].line_number, "a bare digest must be the only line of the file"
        )

    return entries


def _refuse_control_characters(line: str, line_number: int, label: str) -> None:
    for character in line:
        if (ord(character) < 0x20 and character != "\t") or ord(character) == 0x7F:
            raise _line_error(
                label,
                line_number,
                f"holds the control character 0x{ord(character):02x}; is this a checksum file?",
            )


def _parse_line(line: str, line_number: int, label: str) -> _Entry:
    escaped = line.startswith("\\")
    body = line[1:] if escaped else line

    bsd = _BSD_LINE.fullmatch(body)
    if bsd is not None:
        return _parse_bsd_line(bsd, escaped, line_number, label)

    if _OPENSSL_LINE.fullmatch(body):
        raise _line_error(
            label,
            line_number,
            "is written as `openssl dgst` writes it; use the output of `sha256sum` or "
            "`sha256sum --tag` instead",
        )

    end = _DIGEST_END.search(body)
    cut = end.start() if end is not None else len(body)
    digest = _digest(body[:cut], line_number, label)
    rest = body[cut:]

    if not rest:
        if escaped:
            raise _line_error(label, line_number, "starts with a backslash but names no file")
        return _Entry(line_number, None, digest)

    if not rest.startswith(("  ", " *")):
        raise _line_error(
            label,
            line_number,
            "expected two spaces, or a space and '*', between the digest and the file name "
            "(the format of sha256sum)",
        )

    name = _name(rest[2:], escaped, line_number, label)
    return _Entry(line_number, name, digest)


def _parse_bsd_line(match: re.Match[str], escaped: bool, line_number: int, label: str) -> _Entry:
    tag = match["tag"]
    if tag != "SHA256":
        if tag.upper().replace("-", "") in ("SHA256", "SHA2256"):
            reason = f"the tag is {tag!r}; sha256sum --tag writes 'SHA256'"
        else:
            reason = f"gives a {tag} digest; only SHA256 is checked (make it with sha256sum)"
        raise _line_error(label, line_number, reason)

    digest = _digest(match["digest"] or "", line_number, label)
    name = _name(match["name"], escaped, line_number, label)

    return _Entry(line_number, name, digest)


def _digest(text: str, line_number: int, label: str) -> str:
    if not text:
        raise _line_error(label, line_number, "has no digest")

    not_hex = next((character for character in text if character not in string.hexdigits), None)
    if not_hex is not None:
        raise _line_error(
            label,
            line_number,
            f"{_quote(text)} is not a hex digest ({not_hex!r} is not a hex digit)",
        )

    if len(text) != SHA256_HEX_DIGITS:
        algorithm = _OTHER_ALGORITHMS.get(len(text))
        looks_like = f", the length of {algorithm}" if algorithm else ""
        raise _line_error(
            label,
            line_number,
            f"the digest has {len(text)} hex digits{looks_like}; "
            f"a SHA-256 digest has {SHA256_HEX_DIGITS}",
        )

    return text.lower()


def _name(text: str, escaped: bool, line_number: int, label: str) -> str:
    if not text:
        raise _line_error(label, line_number, "has no file name after the digest")
    if not escaped:
        return text

    characters: list[str] = []
    position = 0
    while position < len(text):
        character = text[position]
        if character != "\\":
            characters.append(character)
            position += 1
            continue

        code = text[position + 1 : position + 2]
        if code not in _ESCAPES:
            raise _line_error(
                label, line_number, f"the escape {_quote(text[position : position + 2])} is unknown"
            )
        characters.append(_ESCAPES[code])
        position += 2

    return "".join(characters)


def _digest_for(artifact: str, entries: list[_Entry], label: str) -> str:
    if entries[0].name is None:
        return entries[0].digest

    matching = [entry for entry in entries if entry.name in (artifact, f"./{artifact}")]
    if not matching:
        # A path is named as such: its last part may well be the artifact's name.
        paths = "the path " if all("/" in (entry.name or "") for entry in entries) else ""
        raise ChecksumError(
            f"{label}: names {paths}{_list_names(entries)}, expected the file name {artifact!r} "
            "alone"
        )

    first = matching[0]
    for entry in matching[1:]:
        if entry.digest != first.digest:
            raise ChecksumError(
                f"{label}: lines {first.line_number} and {entry.line_number} give different "
                f"digests for {artifact!r}"
            )

    return first.digest


def _list_names(entries: list[_Entry]) -> str:
    names = list(dict.fromkeys(entry.name for entry in entries if entry.name is not None))
    shown = ", ".join(repr(name) for name in names[:3])
    more = len(names) - 3

    return f"{shown} and {more} more" if more > 0 else shown


def _quote(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "…")


def _line_error(label: str, line_number: int, reason: str) -> ChecksumError:
    return ChecksumError(f"{label}: line {line_number}: {reason}")

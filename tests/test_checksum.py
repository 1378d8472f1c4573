"""The checksum file: every accepted form gives the digest, everything else names its fault."""

from __future__ import annotations

import hashlib
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stagewatch.checksum import MAX_CHECKSUM_FILE_BYTES, parse_checksum_file
from stagewatch.errors import ChecksumError, RejectedError

ARTIFACT = "dealspace"
DIGEST = hashlib.sha256(b"dealspace 1.4.2").hexdigest()
OTHER = hashlib.sha256(b"something else").hexdigest()


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(DIGEST, id="bare"),
        pytest.param(f"{DIGEST}\n", id="bare-with-newline"),
        pytest.param(f"  \t{DIGEST}  \n", id="bare-with-surrounding-whitespace"),
        pytest.param(f"{DIGEST.upper()}\n", id="bare-uppercase"),
        pytest.param(f"{DIGEST}\r\n", id="bare-crlf"),
        pytest.param(f"\n\n{DIGEST}\n\n", id="bare-between-blank-lines"),
        pytest.param(f"{DIGEST}  dealspace\n", id="sha256sum-text-mode"),
        pytest.param(f"{DIGEST} *dealspace\n", id="sha256sum-binary-mode"),
        pytest.param(f"{DIGEST}  ./dealspace\n", id="sha256sum-dot-slash"),
        pytest.param(f"{DIGEST.upper()}  dealspace", id="sha256sum-uppercase-no-newline"),
        pytest.param(f"{DIGEST}  dealspace\r\n", id="sha256sum-crlf"),
        pytest.param(
            f"{OTHER}  dealspace.tar.gz\n{DIGEST}  dealspace\n{OTHER} *README\n",
            id="sha256sum-several-files",
        ),
        pytest.param(
            f"{OTHER}  build/dealspace\n{DIGEST}  dealspace\n", id="another-file-in-a-subfolder"
        ),
        pytest.param(f"{DIGEST}  dealspace\n{DIGEST} *./dealspace\n", id="same-digest-twice"),
        pytest.param(f"{DIGEST}  dealspace\n\n\n", id="sha256sum-trailing-blank-lines"),
        pytest.param(f"SHA256 (dealspace) = {DIGEST}\n", id="bsd"),
        pytest.param(f"SHA256 (./dealspace) = {DIGEST.upper()}\r\n", id="bsd-dot-slash-crlf"),
        pytest.param(
            f"SHA256 (notes (draft).txt) = {OTHER}\nSHA256 (dealspace) = {DIGEST}\n",
            id="bsd-several-files",
        ),
        pytest.param(
            f"SHA256 (dealspace) = {DIGEST}\n{OTHER}  dealspace.sig\n", id="bsd-and-sha256sum"
        ),
    ],
)
def test_accepted_forms_give_the_lowercase_digest(content: str) -> None:
    assert parse_checksum_file(content.encode(), ARTIFACT) == DIGEST


def test_escaped_name_is_unescaped_as_sha256sum_check_does() -> None:
    # sha256sum writes a name holding a backslash or newline escaped, the line led by "\".
    content = f"\\{DIGEST}  deal\\\\space\\nv2\n".encode()

    assert parse_checksum_file(content, "deal\\space\nv2") == DIGEST


def test_escaped_bsd_name_is_unescaped() -> None:
    content = f"\\SHA256 (deal\\\\space) = {DIGEST}\n".encode()

    assert parse_checksum_file(content, "deal\\space") == DIGEST


def test_backslash_in_an_unescaped_line_is_taken_literally() -> None:
    content = f"{DIGEST}  deal\\space\n".encode()

    assert parse_checksum_file(content, "deal\\space") == DIGEST


def test_a_file_of_exactly_the_size_limit_is_read() -> None:
    line = f"{DIGEST}  dealspace\n"
    filler = f"{OTHER}  other-file\n"
    lines = [line]
    while sum(map(len, lines)) + len(filler) <= MAX_CHECKSUM_FILE_BYTES:
        lines.append(filler)
    content = "".join(lines).encode()
    content += b" " * (MAX_CHECKSUM_FILE_BYTES - len(content))

    assert len(content) == MAX_CHECKSUM_FILE_BYTES
    assert parse_checksum_file(content, ARTIFACT) == DIGEST


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        pytest.param(b"", "dealspace.sha256: is empty", id="empty"),
        pytest.param(b"\n  \n\t\r\n", "holds no digest, only blank lines", id="only-whitespace"),
        pytest.param(DIGEST[:63].encode(), "line 1: the digest has 63 hex digits", id="63-digits"),
        pytest.param(
            (DIGEST + "a").encode(), "line 1: the digest has 65 hex digits", id="65-digits"
        ),
        pytest.param(("g" + DIGEST[1:]).encode(), "line 1: 'g", id="non-hex-bare"),
        pytest.param(
            f"{DIGEST[:-1]}z  dealspace".encode(), "('z' is not a hex digit)", id="non-hex-named"
        ),
        pytest.param(
            f"{hashlib.md5(b'x').hexdigest()}  dealspace\n".encode(),  # noqa: S324
            "line 1: the digest has 32 hex digits, the length of MD5",
            id="md5sum-line",
        ),
        pytest.param(
            f"{hashlib.sha1(b'x').hexdigest()}  dealspace\n".encode(),  # noqa: S324
            "the length of SHA-1",
            id="sha1sum-line",
        ),
        pytest.param(
            f"{hashlib.sha512(b'x').hexdigest()}  dealspace\n".encode(),
            "the length of SHA-512",
            id="sha512sum-line",
        ),
        pytest.param(
            f"SHA512 (dealspace) = {hashlib.sha512(b'x').hexdigest()}\n".encode(),
            "line 1: gives a SHA512 digest; only SHA256 is checked",
            id="bsd-sha512",
        ),
        pytest.param(
            f"MD5 (dealspace) = {hashlib.md5(b'x').hexdigest()}\n".encode(),  # noqa: S324
            "gives a MD5 digest",
            id="bsd-md5",
        ),
        pytest.param(
            f"sha256 (dealspace) = {DIGEST}".encode(), "the tag is 'sha256'", id="bsd-lowercase"
        ),
        pytest.param(
            f"SHA2-256(dealspace)= {DIGEST}\n".encode(), "`openssl dgst`", id="openssl-style"
        ),
        pytest.param(b"SHA256 (dealspace) =\n", "line 1: has no digest", id="bsd-no-digest"),
        pytest.param(
            f"SHA256 (dealspace) = {DIGEST} extra".encode(), "is not a hex digest", id="bsd-extra"
        ),
        pytest.param(
            f"{DIGEST}  other\n".encode(),
            "names 'other', expected the file name 'dealspace' alone",
            id="other-name",
        ),
        pytest.param(
            f"{DIGEST}  build/dealspace\n".encode(),
            "names the path 'build/dealspace', expected the file name 'dealspace' alone",
            id="path-to-another-file",
        ),
        pytest.param(
            f"{DIGEST}  /tmp/dealspace\n".encode(),
            "names the path '/tmp/dealspace'",
            id="absolute-path",
        ),
        pytest.param(
            f"SHA256 (dealspace.old) = {DIGEST}\n".encode(),
            "names 'dealspace.old'",
            id="bsd-other-name",
        ),
        pytest.param(
            f"{DIGEST}  dealspace\n{OTHER}  dealspace\n".encode(),
            "lines 1 and 2 give different digests for 'dealspace'",
            id="two-digests",
        ),
        pytest.param(
            f"{DIGEST}  dealspace\n\n{OTHER} *./dealspace\n".encode(),
            "lines 1 and 3 give different digests",
            id="two-digests-dot-slash",
        ),
        pytest.param(
            f"{DIGEST} dealspace\n".encode(), "line 1: expected two spaces", id="one-space"
        ),
        pytest.param(f"{DIGEST}\tdealspace\n".encode(), "expected two spaces", id="tab"),
        pytest.param(f"{DIGEST} *\n".encode(), "has no file name", id="no-name"),
        pytest.param(
            f"{DIGEST}\n{DIGEST}  dealspace\n".encode(),
            "line 1: a bare digest must be the only line",
            id="bare-among-others",
        ),
        pytest.param(
            f"{DIGEST}  dealspace\nnot a checksum line\n".encode(),
            "line 2: 'not' is not a hex digest",
            id="junk-second-line",
        ),
        pytest.param(
            f"\\{DIGEST}  deal\\qspace\n".encode(), "the escape '\\\\q' is unknown", id="bad-escape"
        ),
        pytest.param(f"\\{DIGEST}\n".encode(), "names no file", id="escaped-bare"),
        pytest.param(b"\x7fELF\x02\x01\x01\x00\x00\x00", "control character 0x7f", id="elf-binary"),
        pytest.param(b"\x00" * 64, "control character 0x00", id="nul-bytes"),
        pytest.param(
            f"{DIGEST}\r  dealspace\n".encode(),
            "control character 0x0d",
            id="stray-carriage-return",
        ),
        pytest.param(b"\xff\xd8\xff\xe0 JFIF", "line 1: is not UTF-8 text (byte 0xff", id="jpeg"),
        pytest.param(
            f"{DIGEST}  dealspace\n".encode() + b"\xc3\x28  x\n",
            "line 2: is not UTF-8 text",
            id="invalid-utf8-second-line",
        ),
        pytest.param(
            b"\xef\xbb\xbf" + DIGEST.encode(), "starts with a UTF-8 byte order mark", id="bom"
        ),
        pytest.param(DIGEST.encode("utf-16"), "is UTF-16 text", id="utf-16"),
        pytest.param(
            (DIGEST + "\n" + " " * MAX_CHECKSUM_FILE_BYTES).encode(),
            f"a checksum file may be at most {MAX_CHECKSUM_FILE_BYTES} bytes",
            id="over-64-kib",
        ),
    ],
)
def test_malformed_files_are_rejected_naming_the_fault(content: bytes, reason: str) -> None:
    with pytest.raises(ChecksumError) as raised:
        parse_checksum_file(content, ARTIFACT)

    assert reason in str(raised.value)
    assert str(raised.value).startswith("dealspace.sha256: ")


def test_a_checksum_error_is_a_rejection() -> None:
    with pytest.raises(RejectedError):
        parse_checksum_file(b"", ARTIFACT)


def test_source_names_the_file_in_messages() -> None:
    with pytest.raises(ChecksumError, match=r"^staging/dealspace\.sha256: is empty$"):
        parse_checksum_file(b"", ARTIFACT, source="staging/dealspace.sha256")


def test_many_other_names_are_summarised() -> None:
    content = "".join(f"{OTHER}  file-{number}\n" for number in range(5)).encode()

    with pytest.raises(ChecksumError, match="'file-0', 'file-1', 'file-2' and 2 more"):
        parse_checksum_file(content, ARTIFACT)


# Properties over generated files.

hex_digests = st.text(alphabet="0123456789abcdefABCDEF", min_size=64, max_size=64)

# Names as the configuration allows them (a plain name, no "/", no NUL), printable, and not
# starting or ending with the spaces and tabs that are stripped from lines.
file_names = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/"),
    min_size=1,
    max_size=40,
).filter(lambda name: name not in (".", "..") and name == name.strip(" \t"))

line_endings = st.sampled_from(["\n", "\r\n"])


def escape(name: str) -> tuple[str, str]:
    """The line prefix and the name as sha256sum writes them."""
    if "\\" in name or "\n" in name:
        return "\\", name.replace("\\", "\\\\").replace("\n", "\\n")
    return "", name


def sha256sum_line(digest: str, name: str, binary: bool) -> str:
    prefix, written = escape(name)
    return f"{prefix}{digest} {'*' if binary else ' '}{written}"


def bsd_line(digest: str, name: str) -> str:
    prefix, written = escape(name)
    return f"{prefix}SHA256 ({written}) = {digest}"


@settings(max_examples=300)
@given(digest=hex_digests, name=file_names, binary=st.booleans(), ending=line_endings)
def test_sha256sum_lines_round_trip(digest: str, name: str, binary: bool, ending: str) -> None:
    content = (sha256sum_line(digest, name, binary) + ending).encode()

    assert parse_checksum_file(content, name) == digest.lower()


@settings(max_examples=300)
@given(digest=hex_digests, name=file_names, ending=line_endings)
def test_bsd_lines_round_trip(digest: str, name: str, ending: str) -> None:
    content = (bsd_line(digest, name) + ending).encode()

    assert parse_checksum_file(content, name) == digest.lower()


@settings(max_examples=200)
@given(
    digest=hex_digests,
    name=file_names,
    others=st.lists(st.tuples(hex_digests, file_names, st.booleans()), max_size=5),
    position=st.integers(min_value=0),
    ending=line_endings,
)
def test_the_artifacts_line_counts_among_other_files(
    digest: str,
    name: str,
    others: list[tuple[str, str, bool]],
    position: int,
    ending: str,
) -> None:
    lines = [
        bsd_line(other_digest, other) if tag else sha256sum_line(other_digest, other, False)
        for other_digest, other, tag in others
        if other not in (name, f"./{name}")
    ]
    lines.insert(position % (len(lines) + 1), sha256sum_line(digest, name, False))
    content = ending.join(lines).encode()

    assert parse_checksum_file(content, name) == digest.lower()


def has_valid_line_for(content: bytes, artifact: str, digest: str) -> bool:
    """An oracle written apart from the parser: does a line give `digest` for `artifact`?"""
    lines = [line.strip(" \t\r") for line in content.decode("utf-8").split("\n")]
    hex_digest = f"(?i:{digest})"
    name = rf"(?:\./)?{re.escape(artifact)}"
    named = re.compile(rf"\\?(?:{hex_digest} [ *]{name}|SHA256 \({name}\) = {hex_digest})")

    if any(named.fullmatch(line) for line in lines):
        return True
    return [line.lower() for line in lines if line] == [digest]


junk_lines = st.one_of(
    st.text(max_size=80),
    st.text(alphabet="0123456789abcdefABCDEF *()=.\\/ \tSHA256dealspc", max_size=90),
    st.binary(max_size=40).map(lambda data: data.decode("latin-1")),
    hex_digests,
    st.builds(sha256sum_line, hex_digests, st.sampled_from(["dealspace", "other"]), st.booleans()),
    st.builds(bsd_line, hex_digests, st.sampled_from(["dealspace", "./dealspace", "x"])),
)


@settings(max_examples=500)
@given(
    content=st.one_of(
        st.binary(max_size=300),
        st.lists(junk_lines, max_size=6).map(lambda lines: "\n".join(lines).encode()),
    )
)
def test_junk_never_parses_unless_it_holds_a_valid_line_for_the_artifact(content: bytes) -> None:
    try:
        digest = parse_checksum_file(content, ARTIFACT)
    except ChecksumError:
        return

    assert len(digest) == 64
    assert digest == digest.lower()
    assert has_valid_line_for(content, ARTIFACT, digest)

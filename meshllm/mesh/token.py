"""Invite tokens: the mesh's secret plus the addresses to dial, in one pasteable string.

Format: `meshllm1.` + base64url(msgpack(InviteToken)). Anything else is
rejected with a message that says what is wrong with it.
"""

from __future__ import annotations

import base64
import binascii
import errno
import os
import re
import secrets
import stat

import msgspec

PREFIX = "meshllm1."
SECRET_BYTES = 32


class InvalidToken(ValueError):
    """The string is not a meshllm invite token."""


class InviteToken(msgspec.Struct, frozen=True):
    secret: bytes
    """Shared secret: holding it is what admits a peer to the mesh."""
    addresses: tuple[str, ...]
    """`host:port` of the inviting node's gossip endpoint."""
    mesh_id: str = ""
    owner: bytes = b""
    """The mesh owner's public key (DER P-256), which signs `meshllm ctl --node ID ...`;
    empty in tokens of meshes made before owner keys (they still decode)."""


def new_secret() -> bytes:
    return secrets.token_bytes(SECRET_BYTES)


def mesh_id_of(secret: bytes) -> str:
    import hashlib

    return hashlib.sha256(b"meshllm mesh id" + secret).hexdigest()[:12]


def encode_token(token: InviteToken) -> str:
    raw = msgspec.msgpack.encode(token)
    return PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")


MAX_TOKEN_CHARS = 64 * 1024
"""Longer text is no token: a real one is about 200 characters plus 30 per address."""


def decode_token(text: str) -> InviteToken:
    """The token in `text` (surrounding whitespace ignored); `InvalidToken` otherwise.

    Error messages never quote the text: everything after the prefix encodes the
    secret, so even a few characters of a token pasted without its prefix would
    put bits of the secret into a terminal or a log."""
    text = text.strip()
    if len(text) > MAX_TOKEN_CHARS:
        raise InvalidToken(f"an invite token is at most {MAX_TOKEN_CHARS} characters")
    if not text.startswith(PREFIX):
        raise InvalidToken(
            f"an invite token starts with {PREFIX!r}; this text ({len(text)} characters) does not"
        )
    body = text[len(PREFIX) :]
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        token = msgspec.msgpack.decode(raw, type=InviteToken)
    except (binascii.Error, ValueError, msgspec.DecodeError) as exc:
        raise InvalidToken(f"the invite token is damaged (copied incompletely?): {exc}") from None
    except RecursionError:
        # msgspec gives up on values nested thousands deep (in fields it would ignore).
        raise InvalidToken("the invite token is damaged (nested too deep)") from None
    if len(token.secret) != SECRET_BYTES:
        raise InvalidToken("the invite token's secret has the wrong length")
    if not token.addresses:
        raise InvalidToken("the invite token names no address to dial")
    for address in token.addresses:
        split_address(address)
    if token.owner:
        from meshllm.mesh.identity import BadKey, load_public

        try:
            load_public(token.owner)
        except BadKey:
            raise InvalidToken("the invite token's owner key is damaged") from None
    return token


_PORT = re.compile(r"[0-9]{1,5}")
"""ASCII digits only: `str.isdigit` also takes digits that `int` refuses (`²`)."""


def split_address(address: str, allow_zero: bool = False) -> tuple[str, int]:
    """`host:port` or `[v6]:port` -> (host, port), with a clear error."""
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    lowest = 0 if allow_zero else 1
    if not sep or not host or not _PORT.fullmatch(port) or not lowest <= int(port) < 65536:
        shown = repr(address)
        if len(shown) > 80:  # cut after quoting: escapes can make it several times longer
            shown = shown[:80] + "…"
        raise InvalidToken(f"bad address {shown} (want host:port)")
    return host, int(port)


ENV_VAR = "MESHLLM_TOKEN"
"""Environment variable `meshllm up` takes the invite token from when no --join is given."""


def token_text(value: str) -> str:
    """A `--join` value as token text: `@FILE` is the stripped content of FILE (`~` is
    expanded), anything else is the token itself. Keeps the secret off the command line."""
    if not value.startswith("@"):
        return value
    path = os.path.expanduser(value[1:])
    if not path:
        raise InvalidToken("--join @FILE names no file (want e.g. @~/.meshllm-token)")
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read(64 * 1024).strip()
    except FileNotFoundError:
        raise InvalidToken(f"the token file {path} does not exist") from None
    except (OSError, ValueError) as exc:
        # ValueError: bytes that are not UTF-8, or a NUL in the path (no file has one).
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise InvalidToken(f"cannot read the token file {path}: {reason}") from None
    if not text:
        raise InvalidToken(f"the token file {path} is empty")
    return text


def write_token_file(path: str, token: str) -> None:
    """Write `token` to `path`, readable by this user only (mode 0600). An existing file
    is replaced only if it is a regular file of this user that no one else can read."""
    path = os.path.expanduser(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        # Checked on the opened file itself, and emptied only after the checks: a
        # path swapped in between (a link to another file) is never truncated.
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as exc:
            # ELOOP: a symbolic link, which O_NOFOLLOW refuses to open.
            why = (
                "is not a regular file"
                if exc.errno == errno.ELOOP
                else f"cannot be opened ({exc.strerror})"
            )
            raise InvalidToken(f"{path} exists and {why}; not replaced") from None
        st = os.fstat(fd)
        why = ""
        if not stat.S_ISREG(st.st_mode):
            why = "exists and is not a regular file"
        elif st.st_uid != os.getuid():
            why = "belongs to another user"
        elif st.st_mode & 0o077:
            why = f"is readable by others (mode {stat.S_IMODE(st.st_mode):o})"
        elif st.st_nlink != 1:
            why = "has other hard links"
        if why:
            os.close(fd)
            raise InvalidToken(f"{path} {why}; not replaced") from None
        os.ftruncate(fd, 0)
    with os.fdopen(fd, "w", encoding="utf-8") as file:
        os.fchmod(file.fileno(), 0o600)
        file.write(token + "\n")

"""API keys (meshllm.http.auth): parsing, matching and per-key limits, without I/O."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

import pytest

from meshllm.http import auth
from meshllm.http.auth import (
    Allowed,
    ApiKey,
    KeyRing,
    KeySpecError,
    Limited,
    TokenBucket,
    Unauthorized,
    UsageScanner,
    load_keys,
    parse_key,
    presented_key,
)

KEY = "sk-alice-0123456789"
OTHER = "sk-bob-9876543210"


def bearer(key: str) -> list[tuple[bytes, bytes]]:
    return [(b"authorization", f"Bearer {key}".encode())]


# -- parsing --------------------------------------------------------------------------


def test_a_key_alone_is_named_by_its_digest_and_kept_only_as_one() -> None:
    key = parse_key(KEY, "here")
    digest = hashlib.sha256(KEY.encode()).digest()
    assert key == ApiKey(f"key-{digest.hex()[:8]}", digest, 0)
    assert KEY not in repr(key)


def test_name_key_and_limits() -> None:
    assert parse_key("alice:" + KEY, "here") == ApiKey("alice", auth.digest_of(KEY))
    assert parse_key(f"alice:{KEY}:rpm=60", "here").rpm == 60
    assert parse_key(f"alice:{KEY}", "here", rpm=5).rpm == 5  # --key-rpm
    assert parse_key(f"alice:{KEY}:rpm=0", "here", rpm=5).rpm == 0  # its own wins
    both = parse_key(f"alice:{KEY}:rpm=6,tpm=1000", "here", tpm=7)
    assert (both.rpm, both.tpm) == (6, 1000)
    assert parse_key(f"alice:{KEY}:rpm=6:tpm=9", "here").tpm == 9
    assert parse_key(f"alice:{KEY}", "here", tpm=7).tpm == 7  # --key-tpm


@pytest.mark.parametrize(
    "text",
    [
        "short",  # guessable
        "sk with space",
        "sk-\x01control",
        "al ice:" + KEY,  # a name with a space
        f"alice:{KEY}:xpm=5",
        f"alice:{KEY}:rpm=-1",
        f"alice:{KEY}:secret-part",  # a key with ':' is read as NAME:KEY:...
        "x" * 600,
    ],
)
def test_a_bad_key_is_refused_without_showing_it(text: str) -> None:
    with pytest.raises(KeySpecError) as info:
        parse_key(text, "--api-key #1")
    message = str(info.value)
    assert message.startswith("--api-key #1: ")
    for secret in (KEY, "secret-part", "short", "sk with space"):
        assert secret not in message


def test_keys_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"# team keys\nalice:{KEY}:rpm=60\n\n  {OTHER}  \n")
    keys = load_keys([f"@{path}", "carol:sk-carol-00000000"], rpm=10)
    assert [(k.name, k.rpm) for k in keys] == [
        ("alice", 60),
        (f"key-{auth.digest_of(OTHER).hex()[:8]}", 10),
        ("carol", 10),
    ]


def test_file_errors_name_the_line_not_the_key(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"alice:{KEY}\nbob:tiny\n")
    with pytest.raises(KeySpecError, match=f"{path} line 2: ") as info:
        load_keys([f"@{path}"])
    assert "tiny" not in str(info.value)
    with pytest.raises(KeySpecError, match="cannot read it"):
        load_keys([f"@{tmp_path / 'missing'}"])
    (tmp_path / "empty").write_text("# nothing\n")
    with pytest.raises(KeySpecError, match="holds no key"):
        load_keys([f"@{tmp_path / 'empty'}"])


def test_a_name_or_a_key_given_twice_is_refused() -> None:
    with pytest.raises(KeySpecError, match="two keys are named 'a'"):
        load_keys([f"a:{KEY}", f"a:{OTHER}"])
    with pytest.raises(KeySpecError, match="given twice") as info:
        load_keys([f"a:{KEY}", f"b:{KEY}"])
    assert KEY not in str(info.value)


# -- matching -------------------------------------------------------------------------


def test_the_key_a_request_presents() -> None:
    assert presented_key(bearer(KEY)) == KEY.encode()
    assert presented_key([(b"authorization", b"bearer  " + KEY.encode() + b" ")]) == KEY.encode()
    assert presented_key([(b"x-api-key", KEY.encode())]) == KEY.encode()
    # Bearer first; another scheme is no key, but x-api-key still is.
    both = [(b"x-api-key", OTHER.encode()), *bearer(KEY)]
    assert presented_key(both) == KEY.encode()
    basic = [(b"authorization", b"Basic YTpi"), (b"x-api-key", OTHER.encode())]
    assert presented_key(basic) == OTHER.encode()
    assert presented_key([(b"authorization", b"Bearer ")]) is None
    assert presented_key([]) is None


def test_check_allows_known_keys_and_refuses_the_rest() -> None:
    ring = KeyRing(load_keys([f"alice:{KEY}", f"bob:{OTHER}"]))
    assert ring.check(bearer(KEY), 0.0) == Allowed("alice")
    assert ring.check([(b"x-api-key", OTHER.encode())], 0.0) == Allowed("bob")
    missing = ring.check([], 0.0)
    assert isinstance(missing, Unauthorized) and missing.code == "missing_api_key"
    wrong = ring.check(bearer(KEY[:-1] + "X"), 0.0)
    assert isinstance(wrong, Unauthorized) and wrong.code == "invalid_api_key"
    assert KEY[:-1] not in wrong.message
    assert not KeyRing(())


def test_every_digest_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """The match goes through hmac.compare_digest for every key, the right one first or
    not: how long it takes says nothing about which key, or how much of one, was right."""
    compared: list[bytes] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append(a)
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    keys = load_keys([f"a:{KEY}", f"b:{OTHER}", "c:sk-carol-00000000"])
    ring = KeyRing(keys)
    for presented in (KEY, OTHER, "sk-nobody-000000"):
        compared.clear()
        ring.find(presented.encode())
        assert compared == [k.digest for k in keys]


# -- limits ---------------------------------------------------------------------------


def test_token_bucket() -> None:
    bucket = TokenBucket(2, 60.0, now=0.0)  # 2 at once, one more each 30 s
    assert bucket.take(0.0) == 0 and bucket.take(0.0) == 0
    assert bucket.take(0.0) == pytest.approx(30.0)
    assert bucket.take(15.0) == pytest.approx(15.0)  # half a token back: nothing taken
    assert bucket.take(30.0) == 0
    assert bucket.take(1000.0) == 0 and bucket.take(1000.0) == 0  # never over capacity
    assert bucket.take(1000.0) > 0


def test_a_key_over_its_rpm_is_limited_with_a_retry_time_and_others_are_not() -> None:
    ring = KeyRing(load_keys([f"alice:{KEY}:rpm=2", f"bob:{OTHER}"]))
    assert ring.check(bearer(KEY), 0.0) == Allowed("alice")
    assert ring.check(bearer(KEY), 0.1) == Allowed("alice")
    limited = ring.check(bearer(KEY), 0.2)
    assert isinstance(limited, Limited) and limited.name == "alice"
    assert limited.retry_after_s == 30 and "2 requests per minute" in limited.message
    for _ in range(100):
        assert ring.check(bearer(OTHER), 0.2) == Allowed("bob")  # no limit of its own
    assert ring.check(bearer(KEY), 30.2) == Allowed("alice")
    # A wrong key spends no budget: it is refused before any bucket.
    assert isinstance(ring.check(bearer("sk-wrong-0000000"), 30.3), Unauthorized)


# -- tokens per minute ------------------------------------------------------------------

STREAM_END = (
    b'data: {"choices":[{"finish_reason":"length","index":0,"delta":{}}],"object":'
    b'"chat.completion.chunk","timings":{"cache_n":17,"prompt_n":1,"prompt_ms":0.4,'
    b'"predicted_n":3,"predicted_ms":0.4}}\n\ndata: [DONE]\n\n'
)
ANSWER = (
    b'{"choices":[{"message":{"content":"say \\"total_tokens\\":999"}}],"usage":'
    b'{"completion_tokens":3,"prompt_tokens":18,"total_tokens":21},"timings":{"cache_n":0,'
    b'"prompt_n":18,"predicted_n":3}}'
)


@pytest.mark.parametrize("split_at", [None, 5, 40, 100])
def test_usage_of_an_answer_and_of_a_stream(split_at: int | None) -> None:
    for body, tokens in ((ANSWER, 21), (STREAM_END, 17 + 1 + 3)):
        scanner = UsageScanner()
        parts = [body] if split_at is None else [body[:split_at], body[split_at:]]
        for part in [b"data: " + b"x" * 10_000 + b"\n\n", *parts]:
            scanner.feed(part)
        assert scanner.tokens() == tokens
    assert UsageScanner().tokens() == 0
    generated = UsageScanner()
    generated.feed(b'{"content": "\\"total_tokens\\": 7"}')  # text cannot pose as usage
    assert generated.tokens() == 0


def test_a_key_over_its_tokens_per_minute_waits_until_the_bucket_refills() -> None:
    ring = KeyRing(load_keys([f"alice:{KEY}:tpm=600", f"bob:{OTHER}"]))
    assert ring.counts_tokens("alice") is False  # its bucket is made on first use
    assert ring.check(bearer(KEY), 0.0) == Allowed("alice")
    assert ring.counts_tokens("alice") and not ring.counts_tokens("bob")
    ring.spent("alice", 300, 0.0)
    assert ring.check(bearer(KEY), 0.0) == Allowed("alice")  # 300 left
    ring.spent("alice", 900, 0.0)  # an answer may take it below zero: 600 in debt
    limited = ring.check(bearer(KEY), 0.0)
    assert isinstance(limited, Limited) and "600 tokens per minute" in limited.message
    assert limited.retry_after_s == 61  # 601 tokens at 10 a second
    assert isinstance(ring.check(bearer(KEY), 60.0), Limited)
    assert ring.check(bearer(KEY), 60.1) == Allowed("alice")
    ring.spent("bob", 10**9, 0.0)  # no limit: nothing counted
    assert ring.check(bearer(OTHER), 0.0) == Allowed("bob")


def test_token_bucket_spend_and_wait() -> None:
    bucket = TokenBucket(60, 60.0, now=0.0)
    bucket.spend(0.0, 100)
    assert bucket.wait_s(0.0) == pytest.approx(41.0)
    assert bucket.wait_s(41.0) == 0

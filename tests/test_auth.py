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


def test_errors_name_where_the_keys_came_from(tmp_path: Path) -> None:
    with pytest.raises(KeySpecError, match=r"^MESHLLM_API_KEYS #2: "):
        load_keys([KEY, "short"], source="MESHLLM_API_KEYS")
    with pytest.raises(KeySpecError, match=f"^MESHLLM_API_KEYS @{tmp_path / 'no'}: cannot"):
        load_keys([f"@{tmp_path / 'no'}"], source="MESHLLM_API_KEYS")
    with pytest.raises(KeySpecError, match=r"^--api-key #1: "):
        load_keys(["short"])


def test_a_key_file_others_may_read_is_loaded_with_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"alice:{KEY}\n")
    warnings: list[str] = []
    for mode, warned in ((0o600, False), (0o400, False), (0o640, True), (0o606, True)):
        path.chmod(mode)
        warnings.clear()
        keys = load_keys([f"@{path}"], warn=warnings.append)
        assert [k.name for k in keys] == ["alice"]
        assert bool(warnings) is warned, (oct(mode), warnings)
    (warning,) = warnings
    assert f"--api-key @{path}" in warning and "0606" in warning and "chmod 600" in warning
    assert KEY not in warning


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        ((), "short", "MESHLLM_API_KEYS #1: "),
        (("--api-key", "short"), None, "--api-key #1: "),
        (("--api-key", KEY), "short", None),  # a flag wins: the environment is not read
    ],
)
def test_meshllm_up_names_where_a_bad_key_came_from(
    args: tuple[str, ...], env: str | None, named: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    import meshllm.up
    from meshllm.cli import main

    def fake_run(opts: meshllm.up.UpOptions) -> int:
        meshllm.up.api_keys(opts)
        return 0

    monkeypatch.setattr(meshllm.up, "run", fake_run)
    monkeypatch.delenv("MESHLLM_API_KEYS", raising=False)
    environ = {} if env is None else {"MESHLLM_API_KEYS": env}
    result = CliRunner().invoke(main, ["up", *args], env=environ, catch_exceptions=False)
    if named is None:
        assert result.exit_code == 0, result.output
    else:
        assert result.exit_code != 0 and f"Error: {named}" in result.output, result.output


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
    first = ring.check(bearer(KEY), 0.0)
    assert isinstance(first, Allowed) and first.charge is not None
    assert first.charge.reserved == auth.DEFAULT_ANSWER_TOKENS
    first.charge.feed(ANSWER)
    first.charge.settle(0.0, ended=True)  # 21 used: the rest of the reservation back
    assert ring.token_buckets["alice"].tokens == 600 - 21
    second = ring.check(bearer(KEY), 0.0)
    assert isinstance(second, Allowed) and second.charge is not None
    second.charge.feed(b'{"usage":{"total_tokens":1179}}')
    second.charge.settle(0.0, ended=True)  # an answer may take it below zero: 600 in debt
    limited = ring.check(bearer(KEY), 0.0)
    assert isinstance(limited, Limited) and "600 tokens per minute" in limited.message
    assert limited.retry_after_s == 61  # 601 tokens at 10 a second
    assert isinstance(ring.check(bearer(KEY), 60.0), Limited)
    assert isinstance(ring.check(bearer(KEY), 60.1), Allowed)
    assert ring.check(bearer(OTHER), 0.0) == Allowed("bob")  # no limit: no charge


def test_concurrent_requests_of_a_key_wait_for_each_others_reservations() -> None:
    """What each request may cost is taken from the bucket when it is let on, so a full
    bucket lets on only as many as it can pay for, not every request that comes at once."""
    ring = KeyRing(load_keys([f"alice:{KEY}:tpm=1000"]))
    charges = []
    for _ in range(5):
        verdict = ring.check(bearer(KEY), 0.0)
        if isinstance(verdict, Allowed):
            assert verdict.charge is not None
            charges.append(verdict.charge)
    assert len(charges) == 2  # 512 each: the second takes it below one
    charges[0].reserve(100, 0.0)  # its body said max_tokens (refund the rest)
    assert ring.token_buckets["alice"].tokens == 1000 - 100 - 512
    assert isinstance(ring.check(bearer(KEY), 0.0), Allowed)  # 388 left: one more


def test_a_reservation_is_at_most_a_minutes_worth_and_settled_once() -> None:
    bucket = TokenBucket(30, 60.0, now=0.0)
    charge = auth.TokenCharge(bucket, 10**9, 0.0)
    assert charge.reserved == 30 and bucket.tokens == 0
    charge.reserve(-5, 0.0)
    assert charge.reserved == 0 and bucket.tokens == 30
    charge.reserve(20, 0.0)
    charge.feed(b'data: {"usage":{"total_tokens":7}}\n\n')
    charge.settle(0.0, ended=True)
    charge.settle(0.0, ended=False)  # only the first counts
    charge.reserve(30, 0.0)  # nor is a settled charge re-reserved
    assert bucket.tokens == 30 - 7


@pytest.mark.parametrize(("reserved", "events", "cost"), [(20, 3, 20), (20, 45, 45), (0, 0, 0)])
def test_an_answer_that_does_not_end_costs_its_reservation_or_what_it_streamed(
    reserved: int, events: int, cost: int
) -> None:
    bucket = TokenBucket(60, 60.0, now=0.0)
    charge = auth.TokenCharge(bucket, reserved, 0.0)
    charge.feed(b'data: {"choices":[]}\n\n' * events)
    charge.settle(0.0, ended=False)
    assert bucket.tokens == 60 - cost


def test_a_stream_without_usage_that_ends_costs_its_events() -> None:
    bucket = TokenBucket(60, 60.0, now=0.0)
    charge = auth.TokenCharge(bucket, 50, 0.0)
    charge.feed(b'data: {"choices":[]}\n\n' * 4 + b"data: [DONE]\n\n")
    charge.settle(0.0, ended=True)
    assert bucket.tokens == 60 - 5
    models = auth.TokenCharge(bucket, 50, 0.0)
    models.feed(b'{"object":"list","data":[]}')  # neither usage nor events: free
    models.settle(0.0, ended=True)
    assert bucket.tokens == 60 - 5


@pytest.mark.parametrize(
    ("body", "answer"),
    [
        (b'{"max_tokens": 40}', 40),
        (b'{"max_tokens": 40, "max_completion_tokens": 9}', 9),
        (b'{"max_tokens": -1}', auth.DEFAULT_ANSWER_TOKENS),
        (b'{"max_tokens": "lots"}', auth.DEFAULT_ANSWER_TOKENS),
        (b'{"messages": [{"content": "hi"}]}', auth.DEFAULT_ANSWER_TOKENS),
        (b"not json", auth.DEFAULT_ANSWER_TOKENS),
        (b"[" * 100_000, auth.DEFAULT_ANSWER_TOKENS),
        (b"", auth.DEFAULT_ANSWER_TOKENS),
    ],
)
def test_a_requests_estimate_is_its_answer_limit_and_its_prompt(body: bytes, answer: int) -> None:
    assert auth.estimate_tokens(body) == answer + len(body) // 4


# -- wrong keys -------------------------------------------------------------------------


def test_an_address_sending_wrong_keys_is_refused_for_a_while_whatever_it_sends() -> None:
    ring = KeyRing(load_keys([f"alice:{KEY}"]), auth.FailureLimit(burst=3, per_minute=6))
    for _ in range(3):
        wrong = ring.check(bearer("sk-guess-00000000"), 0.0, "192.0.2.1")
        assert isinstance(wrong, Unauthorized) and wrong.code == "invalid_api_key"
    for key in ("sk-guess-00000000", KEY):  # the right key too: else it tells a good guess
        limited = ring.check(bearer(key), 0.0, "192.0.2.1")
        assert isinstance(limited, Limited) and limited.retry_after_s == 10
        assert limited.name == "" and "wrong API keys" in limited.message
    assert isinstance(ring.check([], 0.0, "192.0.2.1"), Unauthorized)  # no key, no guess
    assert ring.check(bearer(KEY), 0.0, "192.0.2.2") == Allowed("alice")  # others are not
    assert ring.check(bearer(KEY), 0.0) == Allowed("alice")  # nor an unknown address
    assert ring.check(bearer(KEY), 10.0, "192.0.2.1") == Allowed("alice")  # refilled


def test_the_wrong_key_limit_remembers_a_bounded_number_of_addresses() -> None:
    limit = auth.FailureLimit(burst=1, per_minute=1, max_clients=3)
    for n in range(10):
        limit.failed(f"198.51.100.{n}", 0.0)
    assert list(limit.buckets) == ["198.51.100.7", "198.51.100.8", "198.51.100.9"]
    limit.failed("198.51.100.7", 0.0)  # heard from again: the newest
    limit.failed("198.51.100.10", 0.0)
    assert list(limit.buckets) == ["198.51.100.9", "198.51.100.7", "198.51.100.10"]
    assert limit.wait_s("198.51.100.7", 0.0) > 0 and limit.wait_s("198.51.100.0", 0.0) == 0


def test_token_bucket_spend_and_wait() -> None:
    bucket = TokenBucket(60, 60.0, now=0.0)
    bucket.spend(0.0, 100)
    assert bucket.wait_s(0.0) == pytest.approx(41.0)
    assert bucket.wait_s(41.0) == 0

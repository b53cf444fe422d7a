"""The built-in model catalog: friendly names that `--model` and `meshllm models download` accept.

Each entry is one single-file GGUF on Hugging Face. The friendly name is the file's stem, which
is also the name clients put in the `model` field once a node serves it (a model is always
named after its GGUF file), so a catalog model keeps one name from download to chat.

Sizes and SHA-256 digests are exact values of the files as published (the Hugging Face LFS
metadata of each file, cross-checked in more than one independent public record); a download
that does not end with exactly these bytes is refused. Where a digest was not known for sure it
is `None` and only the size is checked. If a publisher ever replaces a file, the check fails
loudly instead of serving a different model under the same name: update the entry then.

The catalog is trusted; what peers announce is not. `proposed_source` is the one gate a
download source from gossip passes through: it never names a catalog model (the catalog's own
source always wins), it carries an http(s) URL, an exact size and a SHA-256 (so the download
can be checked), and its file name in the models directory is derived from the validated
model name, never from the URL (a URL path could name another model's file).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

HF_HOST = "https://huggingface.co"

# An owner or repository name on Hugging Face: letters, digits, "-", "_", "."; no "..".
_HF_NAME = re.compile(r"^(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


def hf_url(repo: str, file: str, revision: str = "main") -> str:
    """The download URL of `file` (a path inside the repository) in the repository `repo`."""
    return f"{HF_HOST}/{repo}/resolve/{quote(revision, safe='')}/{quote(file)}"


def is_hf_name(part: str) -> bool:
    """True for a valid Hugging Face owner or repository name."""
    return bool(_HF_NAME.match(part))


@dataclass(frozen=True)
class CatalogEntry:
    """A model the catalog knows how to download."""

    name: str
    """Friendly name: the GGUF file's stem, and the name clients use in the `model` field."""
    repo: str
    """Hugging Face repository, `owner/name`."""
    file: str
    """File name inside the repository (and in the models directory once downloaded)."""
    size: int | None
    """Exact size in bytes, checked after download; None when not known."""
    sha256: str | None
    """SHA-256 of the file (lowercase hex), checked after download; None when not known."""
    description: str = ""

    @property
    def url(self) -> str:
        return hf_url(self.repo, self.file)


CATALOG: tuple[CatalogEntry, ...] = (
    CatalogEntry(
        name="Qwen2.5-0.5B-Instruct-Q4_K_M",
        repo="bartowski/Qwen2.5-0.5B-Instruct-GGUF",
        file="Qwen2.5-0.5B-Instruct-Q4_K_M.gguf",
        size=397_808_192,
        sha256="6eb923e7d26e9cea28811e1a8e852009b21242fb157b26149d3b188f3a8c8653",
        description="Qwen2.5 0.5B Instruct, tiny and fast",
    ),
    CatalogEntry(
        name="Qwen2.5-1.5B-Instruct-Q4_K_M",
        repo="bartowski/Qwen2.5-1.5B-Instruct-GGUF",
        file="Qwen2.5-1.5B-Instruct-Q4_K_M.gguf",
        size=986_048_768,
        sha256="1adf0b11065d8ad2e8123ea110d1ec956dab4ab038eab665614adba04b6c3370",
        description="Qwen2.5 1.5B Instruct",
    ),
    CatalogEntry(
        name="Qwen2.5-3B-Instruct-Q4_K_M",
        repo="bartowski/Qwen2.5-3B-Instruct-GGUF",
        file="Qwen2.5-3B-Instruct-Q4_K_M.gguf",
        size=1_929_903_264,
        sha256="9c9f56a391a3abbd5b89d0245bf6106081bcc3173119d4229235dd9d23253f94",
        description="Qwen2.5 3B Instruct",
    ),
    CatalogEntry(
        name="Qwen2.5-7B-Instruct-Q4_K_M",
        repo="bartowski/Qwen2.5-7B-Instruct-GGUF",
        file="Qwen2.5-7B-Instruct-Q4_K_M.gguf",
        size=4_683_074_240,
        sha256="65b8fcd92af6b4fefa935c625d1ac27ea29dcb6ee14589c55a8f115ceaaa1423",
        description="Qwen2.5 7B Instruct",
    ),
    CatalogEntry(
        name="Qwen2.5-14B-Instruct-Q4_K_M",
        repo="bartowski/Qwen2.5-14B-Instruct-GGUF",
        file="Qwen2.5-14B-Instruct-Q4_K_M.gguf",
        size=8_988_110_976,
        sha256="e47ad95dad6ff848b431053b375adb5d39321290ea2c638682577dafca87c008",
        description="Qwen2.5 14B Instruct",
    ),
    CatalogEntry(
        name="Qwen2.5-32B-Instruct-Q4_K_M",
        repo="bartowski/Qwen2.5-32B-Instruct-GGUF",
        file="Qwen2.5-32B-Instruct-Q4_K_M.gguf",
        size=19_851_336_576,
        sha256="2e5f6daea180dbc59f65a40641e94d3973b5dbaa32b3c0acf54647fa874e519e",
        description="Qwen2.5 32B Instruct (a model to split across nodes)",
    ),
    CatalogEntry(
        name="Llama-3.2-1B-Instruct-Q4_K_M",
        repo="bartowski/Llama-3.2-1B-Instruct-GGUF",
        file="Llama-3.2-1B-Instruct-Q4_K_M.gguf",
        size=807_694_464,
        sha256="6f85a640a97cf2bf5b8e764087b1e83da0fdb51d7c9fab7d0fece9385611df83",
        description="Llama 3.2 1B Instruct",
    ),
    CatalogEntry(
        name="Llama-3.2-3B-Instruct-Q4_K_M",
        repo="bartowski/Llama-3.2-3B-Instruct-GGUF",
        file="Llama-3.2-3B-Instruct-Q4_K_M.gguf",
        size=2_019_377_696,
        sha256="6c1a2b41161032677be168d354123594c0e6e67d2b9227c84f296ad037c728ff",
        description="Llama 3.2 3B Instruct",
    ),
    CatalogEntry(
        name="Meta-Llama-3.1-8B-Instruct-Q4_K_M",
        repo="bartowski/Meta-Llama-3.1-8B-Instruct-GGUF",
        file="Meta-Llama-3.1-8B-Instruct-Q4_K_M.gguf",
        size=4_920_739_232,
        sha256="7b064f5842bf9532c91456deda288a1b672397a54fa729aa665952863033557c",
        description="Llama 3.1 8B Instruct",
    ),
    CatalogEntry(
        name="Mistral-7B-Instruct-v0.3-Q4_K_M",
        repo="bartowski/Mistral-7B-Instruct-v0.3-GGUF",
        file="Mistral-7B-Instruct-v0.3-Q4_K_M.gguf",
        size=4_372_812_000,
        sha256="1270d22c0fbb3d092fb725d4d96c457b7b687a5f5a715abe1e818da303e562b6",
        description="Mistral 7B Instruct v0.3",
    ),
    CatalogEntry(
        name="Phi-3.5-mini-instruct-Q4_K_M",
        repo="bartowski/Phi-3.5-mini-instruct-GGUF",
        file="Phi-3.5-mini-instruct-Q4_K_M.gguf",
        size=2_393_232_672,
        sha256="e4165e3a71af97f1b4820da61079826d8752a2088e313af0c7d346796c38eff5",
        description="Phi-3.5 mini Instruct (3.8B)",
    ),
    CatalogEntry(
        name="SmolLM2-1.7B-Instruct-Q4_K_M",
        repo="bartowski/SmolLM2-1.7B-Instruct-GGUF",
        file="SmolLM2-1.7B-Instruct-Q4_K_M.gguf",
        size=1_055_609_824,
        sha256=None,
        description="SmolLM2 1.7B Instruct",
    ),
)


def find_entry(name: str, catalog: tuple[CatalogEntry, ...] = CATALOG) -> CatalogEntry | None:
    """The entry named `name` (case-insensitive; the file name with `.gguf` works too)."""
    wanted = name.strip().lower().removesuffix(".gguf")
    for entry in catalog:
        if wanted in (entry.name.lower(), entry.file.lower().removesuffix(".gguf")):
            return entry
    return None


# --- download sources peers propose ------------------------------------------------------------

MAX_PROPOSED_BYTES = 1 << 40
"""The largest model a peer may propose (1 TiB): bigger sizes are nonsense, not models."""
MAX_URL_CHARS = 2048

_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
"""A proposed model's name, which is also its file's stem: no separators, no leading dot."""
_SHA256_HEX = re.compile(r"^[0-9a-fA-F]{64}$")


class SourceRefused(ValueError):
    """A peer's proposed download source that this node will not use; the message says why."""


@dataclass(frozen=True)
class ProposedSource:
    """A download source from gossip that passed every check of `proposed_source`."""

    name: str
    url: str
    size: int
    sha256: str
    """Lowercase hex."""

    @property
    def file(self) -> str:
        """The file name in the models directory: the model's name, never the URL's."""
        return f"{self.name}.gguf"


def is_model_name(name: str) -> bool:
    """True for a name that is safe as a file stem in the models directory."""
    return bool(_MODEL_NAME.match(name)) and not name.lower().endswith((".gguf", ".part"))


def proposed_source(name: str, url: str, size: int | None, sha256: str | None) -> ProposedSource:
    """Check a download source a peer announced for the model `name`.

    Raises `SourceRefused` with a reason when the name is not a safe file stem, names a
    catalog model (gossip never overrides the catalog), the URL is not http(s), or the size or
    SHA-256 is missing or malformed: without them the download could not be checked.
    """
    if not is_model_name(name):
        raise SourceRefused(
            "not a valid model name (letters, digits and . _ + - only, at most 128 characters, "
            "starting with a letter or digit)"
        )
    if find_entry(name) is not None:
        raise SourceRefused("a catalog model: only the catalog's own source is used")
    if not url or len(url) > MAX_URL_CHARS or not url.isprintable() or " " in url:
        raise SourceRefused(f"the URL is empty, too long or has odd characters: {url[:80]!r}")
    try:
        split = urlsplit(url)
        split.port  # noqa: B018 (raises ValueError on a port out of range)
    except ValueError:
        raise SourceRefused(f"malformed URL {url[:80]!r}") from None
    if split.scheme.lower() not in ("http", "https") or not split.hostname:
        raise SourceRefused(f"not an http(s) URL: {url[:80]!r}")
    if size is None or isinstance(size, bool) or size <= 0:
        raise SourceRefused("no size announced, so the download could not be checked")
    if size > MAX_PROPOSED_BYTES:
        raise SourceRefused(f"announced size {size} is over the limit of {MAX_PROPOSED_BYTES}")
    if not sha256:
        raise SourceRefused("no sha256 announced, so the download could not be checked")
    if not _SHA256_HEX.match(sha256):
        raise SourceRefused(f"the announced sha256 is not 64 hex digits: {sha256[:80]!r}")
    return ProposedSource(name=name, url=url, size=size, sha256=sha256.lower())

"""Model files: what is on disk, what a `--model` value means, and `meshllm models`.

- `scan_models` lists the GGUF files of the models directory over a size threshold (the
  announced `available_models`: GGUFs on disk over 500 MB in ~/.models/), with
  what their headers say (architecture, layer count, context length, name).
- `resolve_model` turns a `--model` value into a file: a path, a file name in the models
  directory, a catalog name, or a Hugging Face `owner/repo/file.gguf` reference (the last two
  may need a download first).
- `list_models_table` and `download_model` are `meshllm models list` and
  `meshllm models download NAME`.

Headers are parsed here rather than with `gguf.GGUFReader`, using the `gguf` package's
constants: the reader memory-maps the file but builds a numpy view for every string of the
tokenizer's arrays, about 10 s for one header with a Qwen2.5-sized vocabulary (152k tokens and
151k merges), so a directory of models would take minutes to scan. This parser reads the scalar
and string fields and skips arrays by their lengths, from a memory map, in about 20 ms for the
same header; no tensor data is touched. Tests check that both read the same values.
"""

from __future__ import annotations

import difflib
import logging
import mmap
import os
import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit, urlunsplit

import gguf

from meshllm.models.catalog import CATALOG, CatalogEntry, find_entry, hf_url, is_hf_name
from meshllm.models.download import ProgressCallback, download_file, format_bytes
from meshllm.runtime.paths import cache_dir
from meshllm.runtime.paths import models_dir as default_models_dir

log = logging.getLogger("meshllm.models.files")

DEFAULT_MIN_MODEL_BYTES = 500_000_000
"""The seed counts GGUF files over 500 MB as available models."""
MIN_BYTES_ENV = "MESHLLM_MIN_MODEL_BYTES"

MetadataValue = str | int | float | bool


# --- GGUF headers ----------------------------------------------------------------------------


class GgufHeaderError(ValueError):
    """A file whose GGUF header cannot be read."""


@dataclass(frozen=True)
class GgufHeader:
    """The metadata of a GGUF file (its scalar and string key/values; arrays are skipped)."""

    version: int
    tensor_count: int
    metadata: Mapping[str, MetadataValue]

    @property
    def architecture(self) -> str | None:
        value = self.metadata.get(gguf.Keys.General.ARCHITECTURE)
        return value if isinstance(value, str) else None

    @property
    def name(self) -> str | None:
        """`general.name`."""
        value = self.metadata.get(gguf.Keys.General.NAME)
        return value if isinstance(value, str) else None

    def arch_int(self, key_template: str) -> int | None:
        """An integer `{arch}.…` field, e.g. `arch_int(gguf.Keys.LLM.BLOCK_COUNT)`."""
        if self.architecture is None:
            return None
        value = self.metadata.get(key_template.format(arch=self.architecture))
        if isinstance(value, bool) or not isinstance(value, int):
            return None
        return value

    @property
    def block_count(self) -> int | None:
        """Number of layers (`{arch}.block_count`)."""
        return self.arch_int(gguf.Keys.LLM.BLOCK_COUNT)

    @property
    def context_length(self) -> int | None:
        """Training context length (`{arch}.context_length`)."""
        return self.arch_int(gguf.Keys.LLM.CONTEXT_LENGTH)


_T = gguf.GGUFValueType
_SCALAR_FORMATS: dict[int, str] = {
    _T.UINT8: "B",
    _T.INT8: "b",
    _T.UINT16: "H",
    _T.INT16: "h",
    _T.UINT32: "I",
    _T.INT32: "i",
    _T.FLOAT32: "f",
    _T.BOOL: "?",
    _T.UINT64: "Q",
    _T.INT64: "q",
    _T.FLOAT64: "d",
}
_MAX_KV_COUNT = 1 << 20
_MAX_KEY_LEN = 1 << 16
_MAX_STRING_BYTES = 1 << 20
"""Longer string values are skipped, not read: a chat template is a few kB, and a
file whose metadata holds a string as large as itself must not cost its size twice."""


class _HeaderParser:
    """Walks the key/value section of a GGUF file held in a buffer (a memory map)."""

    def __init__(self, buf: mmap.mmap, size: int) -> None:
        self.buf = buf
        self.size = size
        self.off = 0
        self.order = "<"

    def _take(self, n: int) -> int:
        start = self.off
        if n < 0 or start + n > self.size:
            raise GgufHeaderError(f"truncated header (needs {n} bytes at offset {start})")
        self.off = start + n
        return start

    def _unpack(self, fmt: str) -> int:
        s = struct.Struct(self.order + fmt)
        value: int = s.unpack_from(self.buf, self._take(s.size))[0]
        return value

    def _string(self) -> str | None:
        """The next string value, or None (skipped) when over `_MAX_STRING_BYTES`."""
        n = self._unpack("Q")
        start = self._take(n)
        if n > _MAX_STRING_BYTES:
            return None
        return self.buf[start : start + n].decode("utf-8", errors="replace")

    def _skip_array(self, depth: int = 0) -> None:
        if depth > 4:
            raise GgufHeaderError("arrays nested too deep")
        item_type = self._unpack("I")
        count = self._unpack("Q")
        fmt = _SCALAR_FORMATS.get(item_type)
        if fmt is not None:
            self._take(count * struct.calcsize(fmt))
        elif item_type == _T.STRING:
            if count * 8 > self.size - self.off:
                raise GgufHeaderError("string array longer than the file")
            length = struct.Struct(self.order + "Q")
            unpack, buf, size, off = length.unpack_from, self.buf, self.size, self.off
            for _ in range(count):
                if off + 8 > size:
                    raise GgufHeaderError("truncated string array")
                off += 8 + unpack(buf, off)[0]
            if off > size:
                raise GgufHeaderError("truncated string array")
            self.off = off
        elif item_type == _T.ARRAY:
            if count > self.size - self.off:
                raise GgufHeaderError("nested array longer than the file")
            for _ in range(count):
                self._skip_array(depth + 1)
        else:
            raise GgufHeaderError(f"unknown array item type {item_type}")

    def parse(self) -> GgufHeader:
        magic = struct.unpack_from("<I", self.buf, self._take(4))[0]
        if magic != gguf.GGUF_MAGIC:
            raise GgufHeaderError("not a GGUF file (bad magic)")
        version = struct.unpack_from("<I", self.buf, self._take(4))[0]
        if version & 0xFFFF == 0:  # written on a machine of the other byte order
            self.order = ">"
            version = struct.unpack_from(">I", self.buf, 4)[0]
        if version < 2 or version > gguf.GGUF_VERSION:
            raise GgufHeaderError(f"unsupported GGUF version {version}")
        tensor_count = self._unpack("Q")
        kv_count = self._unpack("Q")
        if kv_count > _MAX_KV_COUNT:
            raise GgufHeaderError(f"implausible key/value count {kv_count}")
        metadata: dict[str, MetadataValue] = {}
        for _ in range(kv_count):
            key_len = self._unpack("Q")
            if key_len > _MAX_KEY_LEN:
                raise GgufHeaderError(f"implausible key length {key_len}")
            start = self._take(key_len)
            key = self.buf[start : start + key_len].decode("utf-8", errors="replace")
            value_type = self._unpack("I")
            fmt = _SCALAR_FORMATS.get(value_type)
            if fmt is not None:
                s = struct.Struct(self.order + fmt)
                metadata[key] = s.unpack_from(self.buf, self._take(s.size))[0]
            elif value_type == _T.STRING:
                if (text := self._string()) is not None:
                    metadata[key] = text
            elif value_type == _T.ARRAY:
                self._skip_array()
            else:
                raise GgufHeaderError(f"unknown value type {value_type} for key {key!r}")
        return GgufHeader(version=version, tensor_count=tensor_count, metadata=metadata)


def read_gguf_header(path: str | os.PathLike[str]) -> GgufHeader:
    """Read the metadata of a GGUF file without touching its tensor data."""
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size < 24:
                raise GgufHeaderError(f"too short for a GGUF file ({size} bytes)")
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _HeaderParser(buf, size).parse()
    except OSError as exc:
        raise GgufHeaderError(f"cannot read: {exc.strerror or exc}") from exc


# Headers by (path, size, mtime): a rescan of an unchanged directory reads nothing again.
_header_cache: dict[tuple[str, int, int], GgufHeader | GgufHeaderError] = {}
_HEADER_CACHE_MAX = 512


def _cached_header(path: Path, stat: os.stat_result) -> GgufHeader:
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    cached = _header_cache.get(key)
    if cached is None:
        try:
            cached = read_gguf_header(path)
        except GgufHeaderError as exc:
            cached = exc
            log.warning("skipping %s: unreadable GGUF header: %s", path, exc)
        if len(_header_cache) >= _HEADER_CACHE_MAX:
            _header_cache.clear()
        _header_cache[key] = cached
    if isinstance(cached, GgufHeaderError):
        raise cached
    return cached


# --- scanning the models directory -----------------------------------------------------------


@dataclass(frozen=True)
class LocalModel:
    """A GGUF model on this machine."""

    name: str
    """The file's stem (for a split model, without `-00001-of-0000N`): the model's name."""
    path: Path
    """The file to give llama-server (the first shard of a split model)."""
    size: int
    """Bytes on disk (all shards together)."""
    architecture: str | None
    layers: int | None
    """`{arch}.block_count`."""
    context_length: int | None
    general_name: str | None
    """`general.name` from the header."""
    shards: int = 1


def default_min_bytes() -> int:
    """The size threshold: `MESHLLM_MIN_MODEL_BYTES`, else 500 MB."""
    raw = os.environ.get(MIN_BYTES_ENV, "").strip()
    if raw:
        try:
            value = int(raw)
            if value >= 0:
                return value
        except ValueError:
            pass
        log.warning("ignoring %s=%r: not a byte count", MIN_BYTES_ENV, raw)
    return DEFAULT_MIN_MODEL_BYTES


_SHARD = re.compile(r"^(?P<base>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)


def scan_models(
    models_dir: str | os.PathLike[str] | None = None, min_bytes: int | None = None
) -> list[LocalModel]:
    """The GGUF models in `models_dir` (default: the models directory) of at least `min_bytes`
    (default: `default_min_bytes()`), sorted by name. Files whose header cannot be read are
    skipped with a warning; a missing directory is an empty one.
    """
    directory = Path(models_dir).expanduser() if models_dir is not None else default_models_dir()
    threshold = default_min_bytes() if min_bytes is None else min_bytes
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except FileNotFoundError:
        return []
    except OSError as exc:
        log.warning("cannot scan the models directory %s: %s", directory, exc.strerror or exc)
        return []

    singles: list[tuple[Path, os.stat_result]] = []
    shards: dict[str, dict[int, tuple[Path, os.stat_result]]] = {}
    shard_counts: dict[str, int] = {}
    for entry in entries:
        if entry.name.startswith(".") or not entry.name.lower().endswith(".gguf"):
            continue
        try:
            if not entry.is_file():  # follows symlinks: a linked model counts
                continue
            stat = entry.stat()
        except OSError:
            continue
        path = Path(entry.path)
        if m := _SHARD.match(entry.name):
            base = m.group("base")
            shards.setdefault(base, {})[int(m.group("index"))] = (path, stat)
            shard_counts[base] = int(m.group("count"))
        else:
            singles.append((path, stat))

    found: list[LocalModel] = []
    for path, stat in singles:
        if stat.st_size >= threshold and (model := _local_model(path.stem, path, stat)):
            found.append(model)
    for base, parts in shards.items():
        count = shard_counts[base]
        if sorted(parts) != list(range(1, count + 1)):
            log.warning("skipping split model %s: has shards %s of %d", base, sorted(parts), count)
            continue
        total = sum(stat.st_size for _, stat in parts.values())
        first, first_stat = parts[1]
        if total >= threshold and (
            model := _local_model(base, first, first_stat, size=total, shards=count)
        ):
            found.append(model)
    found.sort(key=lambda m: m.name)
    return found


def _local_model(
    name: str, path: Path, stat: os.stat_result, *, size: int | None = None, shards: int = 1
) -> LocalModel | None:
    try:
        header = _cached_header(path, stat)
    except GgufHeaderError:
        return None
    return LocalModel(
        name=name,
        path=path,
        size=stat.st_size if size is None else size,
        architecture=header.architecture,
        layers=header.block_count,
        context_length=header.context_length,
        general_name=header.name,
        shards=shards,
    )


def available_model_names(
    models_dir: str | os.PathLike[str] | None = None, min_bytes: int | None = None
) -> list[str]:
    """Names of the models on disk: what a node announces as `available_models`."""
    return [m.name for m in scan_models(models_dir, min_bytes)]


# --- resolving a --model value ---------------------------------------------------------------


class ModelNotFound(ValueError):
    """A `--model` value that names no file, catalog entry or Hugging Face file."""


@dataclass(frozen=True)
class ResolvedModel:
    """What a `--model` value refers to, and where its file is or will be."""

    name: str
    """The name clients use in the `model` field: the GGUF file's stem."""
    path: Path
    """The GGUF file: where it is, or where a download will put it."""
    source: str
    """How it was found: "path", "models_dir", "catalog", "huggingface" or "url"."""
    url: str | None = None
    """Where to download it from (catalog, Hugging Face and URL references)."""
    size: int | None = None
    """Expected size in bytes, when known."""
    sha256: str | None = None
    entry: CatalogEntry | None = field(default=None, compare=False)
    """The catalog entry of this file, if any."""

    @property
    def needs_download(self) -> bool:
        """True while the file is not on disk (checked on each access)."""
        return not self.path.is_file()


_LOCAL_SOURCES = ("path", "models_dir")


def model_name(file_name: str) -> str:
    """The name clients use for a GGUF file: its name without `.gguf`."""
    return file_name[: -len(".gguf")] if file_name.lower().endswith(".gguf") else file_name


def resolve_model(
    ref: str,
    models_dir: str | os.PathLike[str] | None = None,
    *,
    extra_dirs: Sequence[str | os.PathLike[str]] | None = None,
) -> ResolvedModel:
    """What `--model ref` means, tried in this order:

    1. an `http(s)://…/file.gguf` URL (a Hugging Face `/blob/` page URL works too);
    2. a path to an existing file;
    3. a file name in `models_dir` (default: the models directory), with or without `.gguf`,
       then in `extra_dirs` (default: the cache's `models/`, where the demo models live);
    4. a catalog name (`Qwen2.5-3B-Instruct-Q4_K_M`): the file goes to `models_dir`;
    5. a Hugging Face reference `owner/repo/path/in/repo/file.gguf`: the file goes to
       `models_dir` under its own name.

    Raises `ModelNotFound` naming everything that was tried.
    """
    ref = ref.strip()
    directory = Path(models_dir).expanduser() if models_dir is not None else default_models_dir()
    extra = [cache_dir() / "models"] if extra_dirs is None else [Path(d) for d in extra_dirs]
    if not ref:
        raise ModelNotFound("empty model name")

    if ref.lower().startswith(("http://", "https://")):
        return _from_url(ref, directory)

    tried: list[str] = []
    as_path = Path(ref).expanduser()
    if as_path.is_file():
        resolved = as_path.resolve()
        return ResolvedModel(
            name=model_name(resolved.name),
            path=resolved,
            source="path",
            entry=find_entry(resolved.name),
        )
    tried.append(f"a file at {as_path}")

    # An absolute path names one file: the directories would only repeat it.
    for base in () if as_path.is_absolute() else (directory, *extra):
        candidates = [base / ref]
        if not ref.lower().endswith(".gguf"):
            candidates.append(base / f"{ref}.gguf")
        for candidate in candidates:
            if candidate.is_file():
                return ResolvedModel(
                    name=model_name(candidate.name),
                    path=candidate,
                    source="models_dir",
                    entry=find_entry(candidate.name),
                )
        tried.append(" or ".join(str(c) for c in candidates))

    if entry := find_entry(ref):
        return ResolvedModel(
            name=entry.name,
            path=directory / entry.file,
            source="catalog",
            url=entry.url,
            size=entry.size,
            sha256=entry.sha256,
            entry=entry,
        )
    tried.append("a catalog name (see `meshllm models list`)")

    if hf := _from_hf_ref(ref, directory):
        return hf
    tried.append("a Hugging Face reference owner/repo/file.gguf")

    message = f"model {ref!r} not found; tried " + "; ".join(tried)
    names = [e.name for e in CATALOG] + available_model_names(directory, min_bytes=0)
    if close := difflib.get_close_matches(ref, names, n=3, cutoff=0.6):
        message += ". Did you mean " + " or ".join(repr(c) for c in close) + "?"
    raise ModelNotFound(message)


def is_safe_file_name(name: str) -> bool:
    """True for a file name that stays inside the directory it is joined to: a URL's last
    segment, unquoted, may hold `/` (from %2F), `..` or a NUL."""
    return (
        bool(name)
        and not name.startswith(".")
        and not any(c in name for c in "/\\\0")
        and name.isprintable()
    )


def _hf_model(repo: str, file: str, directory: Path, *, source: str, url: str) -> ResolvedModel:
    file_name = PurePosixPath(file).name
    if not is_safe_file_name(file_name):
        raise ModelNotFound(f"{file!r} is not a file name that is safe in the models directory")
    entry = next((e for e in CATALOG if e.repo == repo and e.file == file), None)
    return ResolvedModel(
        name=model_name(file_name),
        path=directory / file_name,
        source=source,
        url=url,
        size=entry.size if entry else None,
        sha256=entry.sha256 if entry else None,
        entry=entry,
    )


def _from_hf_ref(ref: str, directory: Path) -> ResolvedModel | None:
    parts = ref.split("/")
    if len(parts) < 3 or not parts[-1].lower().endswith(".gguf"):
        return None
    owner, repo, *in_repo = parts
    if not (is_hf_name(owner) and is_hf_name(repo)):
        return None
    if any(p in ("", ".", "..") for p in in_repo):
        return None
    file = "/".join(in_repo)
    return _hf_model(
        f"{owner}/{repo}",
        file,
        directory,
        source="huggingface",
        url=hf_url(f"{owner}/{repo}", file),
    )


def _from_url(ref: str, directory: Path) -> ResolvedModel:
    split = urlsplit(ref)
    segments = [unquote(s) for s in split.path.split("/") if s]
    file_name = segments[-1] if segments else ""
    if not file_name.lower().endswith(".gguf") or not is_safe_file_name(file_name):
        raise ModelNotFound(
            f"model URL {ref!r} does not end in a .gguf file name that is safe to create in "
            "the models directory (no path separators, no leading dot)"
        )
    host = (split.hostname or "").lower()
    # https://huggingface.co/{owner}/{repo}/{resolve|blob}/{revision}/{path...}
    if host == "huggingface.co" and len(segments) >= 5 and segments[2] in ("resolve", "blob"):
        owner, repo, _, revision, *in_repo = segments
        repo_id, file = f"{owner}/{repo}", "/".join(in_repo)
        return _hf_model(
            repo_id, file, directory, source="huggingface", url=hf_url(repo_id, file, revision)
        )
    return ResolvedModel(
        name=model_name(file_name),
        path=directory / file_name,
        source="url",
        url=urlunsplit(split._replace(fragment="")),
        sha256=_fragment_sha256(ref, split.fragment),
    )


def _fragment_sha256(ref: str, fragment: str) -> str | None:
    """The digest a `--model URL#sha256=HEX` carries: the download is checked against it and
    the node announces it, so that peers can fetch the model too (they need size and digest).
    """
    if not fragment:
        return None
    key, _, value = fragment.partition("=")
    if key.lower() != "sha256" or not re.fullmatch(r"[0-9a-fA-F]{64}", value):
        raise ModelNotFound(
            f"model URL {ref!r}: the only fragment understood is #sha256= and 64 hex digits"
        )
    return value.lower()


# --- meshllm models list / download ----------------------------------------------------------


@dataclass(frozen=True)
class ModelRow:
    """One line of `meshllm models list`."""

    name: str
    size: int | None
    on_disk: bool
    in_catalog: bool
    mesh: str
    """"" when the mesh does not know it, else "yes", "cold" or "N node(s)"."""
    architecture: str | None = None
    layers: int | None = None


def model_rows(
    models_dir: str | os.PathLike[str] | None = None,
    mesh_models: Mapping[str, int] | Iterable[str] = (),
    *,
    min_bytes: int | None = None,
) -> list[ModelRow]:
    """The union of the models on disk, in the catalog and in the mesh, sorted by name.

    `mesh_models` is either the mesh catalog's names, or a mapping from name to the number of
    nodes serving it (0: known to the mesh but cold).
    """
    local = {m.name: m for m in scan_models(models_dir, min_bytes)}
    catalog = {e.name: e for e in CATALOG}
    if isinstance(mesh_models, Mapping):
        mesh = {name: _serving(count) for name, count in mesh_models.items()}
    else:
        mesh = {name: "yes" for name in mesh_models}
    rows = []
    for name in sorted(local.keys() | catalog.keys() | mesh.keys(), key=str.lower):
        model = local.get(name)
        entry = catalog.get(name)
        size = model.size if model else entry.size if entry else None
        rows.append(
            ModelRow(
                name=name,
                size=size,
                on_disk=model is not None,
                in_catalog=entry is not None,
                mesh=mesh.get(name, ""),
                architecture=model.architecture if model else None,
                layers=model.layers if model else None,
            )
        )
    return rows


def _serving(count: int) -> str:
    if count <= 0:
        return "cold"
    return f"{count} node" if count == 1 else f"{count} nodes"


def format_model_rows(rows: Sequence[ModelRow]) -> str:
    """A plain-text table of `rows` (no trailing newline)."""
    header = ("NAME", "SIZE", "ON DISK", "CATALOG", "MESH", "ARCH", "LAYERS")
    table = [header] + [
        (
            row.name,
            format_bytes(row.size) if row.size is not None else "-",
            "yes" if row.on_disk else "-",
            "yes" if row.in_catalog else "-",
            row.mesh or "-",
            row.architecture or "-",
            str(row.layers) if row.layers is not None else "-",
        )
        for row in rows
    ]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in table
    )


def list_models_table(
    models_dir: str | os.PathLike[str] | None = None,
    mesh_models: Mapping[str, int] | Iterable[str] = (),
    *,
    min_bytes: int | None = None,
) -> str:
    """`meshllm models list`: the models on disk, in the catalog and in the mesh."""
    return format_model_rows(model_rows(models_dir, mesh_models, min_bytes=min_bytes))


def download_model(
    ref: str,
    models_dir: str | os.PathLike[str] | None = None,
    *,
    progress: ProgressCallback | None = None,
    timeout: float = 30.0,
    retries: int = 5,
) -> Path:
    """`meshllm models download NAME`: fetch a catalog model, Hugging Face file or URL into the
    models directory (resuming a partial download) and return its path; a model already on
    disk is returned as is. Raises `ModelNotFound` or `DownloadError`.
    """
    resolved = resolve_model(ref, models_dir)
    if resolved.source in _LOCAL_SOURCES or not resolved.needs_download:
        return resolved.path
    assert resolved.url is not None  # every non-local source has one
    return download_file(
        resolved.url,
        resolved.path,
        expected_size=resolved.size,
        sha256=resolved.sha256,
        progress=progress,
        timeout=timeout,
        retries=retries,
    ).path

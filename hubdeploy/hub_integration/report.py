"""`ModelReport`: what a Hub model is, read from metadata only (never the weights).

Built from a repo id + revision through `huggingface_hub` (model_info with file sizes,
config/tokenizer/adapter JSON, safetensors headers by ranged reads) or from a local
directory in Hub layout. `config.json` is parsed by `serving.config.ModelConfig`, the one
parser the engine also uses. Typed and JSON-serialisable (`to_dict` / `from_dict`).

Required lookups (model_info, config.json, safetensors headers) raise typed
`errors.InspectError`s. Optional ones degrade: the Hub's model search (adapters of the
model, AWQ variants) and file sizes are missing on plain mirrors such as Olah; the report
is then complete without them and lists each in `lookups_unavailable` (what, why, effect).
"""
from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import yaml

from hubdeploy.hub_integration import errors
from hubdeploy.serving.compressed_tensors import parse_w4a16
from hubdeploy.serving.config import ConfigError, ModelConfig, QuantConfig

QUANT_META_FILES = ("quant_config.json", "quantize_config.json")
# Tensor name suffixes that are quantization metadata (bytes, not parameters).
_OVERHEAD_SUFFIXES = (".qzeros", ".scales", ".g_idx", ".weight_scale", ".weight_zero_point",
                      ".weight_shape", ".weight_g_idx", ".input_scale")
_PACKED_SUFFIXES = (".qweight", ".weight_packed")
_EXPERT_RE = re.compile(r"\.experts\.\d+\.")
_ROUTER_RE = re.compile(r"(^|\.)(gate|shared_expert_gate|router)\.weight$")
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


# -- report dataclasses ------------------------------------------------------------------
@dataclass
class CardInfo:
    license: str | None = None
    base_model: list[str] = field(default_factory=list)
    base_model_relation: str | None = None  # adapter | quantized | finetune | merge
    tags: list[str] = field(default_factory=list)
    pipeline_tag: str | None = None
    library_name: str | None = None


@dataclass
class ArchInfo:
    architecture: str
    model_type: str
    family: str  # serving family; "" when unsupported
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    context_length: int
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    sliding_window: int | None
    tie_word_embeddings: bool
    torch_dtype: str
    remote_code_only: bool


@dataclass
class MoEInfo:
    num_experts: int
    experts_per_token: int
    expert_intermediate_size: int
    shared_expert_intermediate_size: int
    num_moe_layers: int


@dataclass
class QuantInfo:
    method: str  # "awq", "gptq", "compressed-tensors", "bitsandbytes", ... ; "none" if unquantized
    bits: int | None = None
    group_size: int | None = None
    zero_point: bool | None = None
    version: str | None = None  # AWQ gemm / gemv
    source: str | None = None  # config.json / quant_config.json / quantize_config.json
    modules_to_not_convert: list[str] = field(default_factory=list)
    format: str | None = None  # compressed-tensors: pack-quantized, ...
    # compressed-tensors: why the engine refuses this scheme (the field it names), None if served
    not_served: str | None = None


@dataclass
class WeightsInfo:
    """Sizes from safetensors headers; `file_bytes` from the Hub's file listing."""

    has_safetensors: bool
    files: dict[str, int | None] = field(default_factory=dict)  # safetensors file -> size on Hub
    num_tensors: int = 0
    total_bytes: int = 0  # tensor data bytes (all dtypes)
    param_count: int = 0  # real parameters (packed int4 counted per weight)
    quant_overhead_bytes: int = 0  # zeros / scales / g_idx
    # bytes the engine adds at load beyond the checkpoint's: the zero-point words of a symmetric
    # compressed-tensors checkpoint (it stores none; our kernels read one 4-bit zero per group)
    load_extra_bytes: int = 0
    bytes_by_dtype: dict[str, int] = field(default_factory=dict)
    expert_bytes: int = 0  # routed experts (all of them)
    embed_bytes: int = 0
    lm_head_bytes: int = 0  # = embed_bytes when tied
    other_bytes: int = 0  # attention, norms, router, dense MLP
    expert_params: int = 0
    file_bytes: int | None = None  # sum of file sizes on the Hub
    sizes_consistent: bool | None = None  # headers agree with file sizes
    other_weight_files: list[str] = field(default_factory=list)  # .bin / .gguf / .pt

    active_expert_bytes: int = 0  # experts_per_token / num_experts of expert_bytes
    # the 16-bit linear weights AWQ-on-deploy would quantize (`awq_quantizable`): all but router
    # gates, lm_head, embeddings and norms; `awq_on_deploy_bytes` sizes the result from them
    quantizable_params: int = 0
    quantizable_bytes: int = 0
    quantizable_expert_bytes: int = 0

    @property
    def active_bytes_per_token(self) -> int:
        """Bytes a batch-1 decode step reads (no embedding table: one row is read)."""
        return self.other_bytes + self.lm_head_bytes + self.active_expert_bytes


@dataclass
class AdapterInfo:
    repo_id: str
    rank: int | None = None
    alpha: float | None = None
    target_modules: list[str] = field(default_factory=list)
    use_rslora: bool = False
    use_dora: bool = False
    base_model: str | None = None
    error: str | None = None


@dataclass
class CompatItem:
    capability: str
    status: str  # "ok" | "warn" | "error"
    reason: str
    action: str | None = None


# `LookupUnavailable.what` of the optional lookups
ADAPTER_SEARCH = "adapter search"
AWQ_VARIANT_SEARCH = "AWQ variant search"
FILE_SIZES = "file sizes"


@dataclass
class LookupUnavailable:
    """An optional Hub lookup that could not be made; the report is complete without it."""

    what: str  # ADAPTER_SEARCH | AWQ_VARIANT_SEARCH | FILE_SIZES
    why: str  # what the Hub answered
    effect: str  # what the report lacks because of it, and what to do instead


@dataclass
class ModelReport:
    repo_id: str
    revision: str | None
    sha: str | None
    source: str  # "hub" | "local"
    card: CardInfo
    gated: bool | str
    private: bool
    arch: ArchInfo
    moe: MoEInfo | None
    quant: QuantInfo
    weights: WeightsInfo
    has_tokenizer: bool
    has_chat_template: bool
    adapters: list[AdapterInfo] = field(default_factory=list)
    awq_variants: list[str] = field(default_factory=list)  # AWQ 4-bit repos of the same base
    compat: list[CompatItem] = field(default_factory=list)
    endpoint: str | None = None
    lookups_unavailable: list[LookupUnavailable] = field(default_factory=list)

    def unavailable(self, what: str) -> LookupUnavailable | None:
        """The note for lookup `what` (e.g. `ADAPTER_SEARCH`) when it could not be made."""
        return next((n for n in self.lookups_unavailable if n.what == what), None)

    @property
    def servable(self) -> bool:
        return all(c.status != "error" for c in self.compat)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["weights"]["active_bytes_per_token"] = self.weights.active_bytes_per_token
        d["servable"] = self.servable
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelReport":
        w = {k: v for k, v in d["weights"].items() if k in {f.name for f in fields(WeightsInfo)}}
        return cls(
            repo_id=d["repo_id"], revision=d.get("revision"), sha=d.get("sha"), source=d["source"],
            card=CardInfo(**d["card"]), gated=d["gated"], private=d["private"], arch=ArchInfo(**d["arch"]),
            moe=MoEInfo(**d["moe"]) if d.get("moe") else None, quant=QuantInfo(**d["quant"]),
            weights=WeightsInfo(**w), has_tokenizer=d["has_tokenizer"],
            has_chat_template=d["has_chat_template"],
            adapters=[AdapterInfo(**a) for a in d.get("adapters", [])],
            awq_variants=list(d.get("awq_variants", [])),
            compat=[CompatItem(**c) for c in d.get("compat", [])], endpoint=d.get("endpoint"),
            lookups_unavailable=[LookupUnavailable(**n) for n in d.get("lookups_unavailable", [])],
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


# -- sources: where metadata comes from ---------------------------------------------------
Header = dict[str, tuple[str, list[int], tuple[int, int]]]  # tensor -> (dtype, shape, offsets)


class Source(Protocol):
    repo_id: str
    sha: str | None
    lookups_unavailable: list[LookupUnavailable]  # optional lookups that failed, filled as they run

    def files(self) -> dict[str, int | None]: ...
    def read_text(self, name: str) -> str | None: ...
    def safetensors_headers(self) -> dict[str, Header]: ...
    def card_data(self) -> dict[str, Any]: ...
    def adapters(self) -> list[AdapterInfo]: ...


def parse_card(readme: str) -> dict[str, Any]:
    m = re.match(r"\s*---\n(.*?)\n---", readme, flags=re.S)
    if not m:
        return {}
    try:
        data = yaml.safe_load(m.group(1)) or {}
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def read_safetensors_header(path: Path) -> Header:
    """Parse one file's header (reads only its first bytes)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise errors.CorruptCheckpointError(f"{path.name}: shorter than a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, 100_000_000):
            raise errors.CorruptCheckpointError(
                f"{path.name}: header length {n} is larger than the file ({size} bytes); the file is "
                "corrupt or truncated: re-upload it")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise errors.CorruptCheckpointError(f"{path.name}: header is not valid JSON ({e})") from e
    return {k: (v["dtype"], list(v["shape"]), tuple(v["data_offsets"]))
            for k, v in header.items() if k != "__metadata__"}


# PEFT `target_parameters` on transformers 5's fused expert tensors -> the per-expert module names
# the memory plan sizes (gate_up_proj carries both halves)
_FUSED_EXPERT_TARGETS = {"gate_up_proj": ["gate_proj", "up_proj"], "down_proj": ["down_proj"]}


def adapter_info_from_config(repo_id: str, text: str | None) -> AdapterInfo:
    """`AdapterInfo` from an adapter_config.json's text (None: the file is missing).

    Raises nothing: a config that is not JSON or has the wrong types becomes `error`.
    `target_parameters` on fused experts count as the expert projections they adapt.
    """
    if text is None:
        return AdapterInfo(repo_id=repo_id, error="adapter_config.json is missing")
    try:
        c = json.loads(text)
        if not isinstance(c, dict):
            raise ValueError("not a JSON object")
        tm = c.get("target_modules") or []
        targets = [tm] if isinstance(tm, str) else [str(t) for t in tm]
        for param in c.get("target_parameters") or []:
            targets += _FUSED_EXPERT_TARGETS.get(str(param).rsplit(".", 1)[-1], [])
        r = c.get("r")
        return AdapterInfo(repo_id=repo_id, rank=r if isinstance(r, int) else None, alpha=c.get("lora_alpha"),
                           target_modules=sorted(set(targets)), use_rslora=bool(c.get("use_rslora")),
                           use_dora=bool(c.get("use_dora")), base_model=c.get("base_model_name_or_path"))
    except (ValueError, TypeError, AttributeError) as e:
        return AdapterInfo(repo_id=repo_id, error=f"adapter_config.json is not a valid PEFT config: {e}")


class LocalSource:
    """A directory in Hub layout; LoRA adapters are sibling dirs `<dir>-lora-*`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.repo_id = str(self.path)
        self.sha = None
        self.lookups_unavailable: list[LookupUnavailable] = []

    def files(self) -> dict[str, int | None]:
        return {p.relative_to(self.path).as_posix(): p.stat().st_size
                for p in sorted(self.path.rglob("*")) if p.is_file() and ".git" not in p.parts}

    def read_text(self, name: str) -> str | None:
        p = self.path / name
        return p.read_text() if p.is_file() else None

    def safetensors_headers(self) -> dict[str, Header]:
        return {n: read_safetensors_header(self.path / n) for n in self.files() if n.endswith(".safetensors")}

    def card_data(self) -> dict[str, Any]:
        return parse_card(self.read_text("README.md") or "")

    def adapters(self) -> list[AdapterInfo]:
        out = []
        for d in sorted(self.path.parent.glob(self.path.name + "-lora-*")):
            p = d / "adapter_config.json"
            out.append(adapter_info_from_config(str(d), p.read_text() if p.is_file() else None))
        return out


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Network failures of the HTTP clients huggingface_hub may use (httpx, or httpx2 in 2.x)."""
    out: list[type[BaseException]] = []
    for mod in ("httpx", "httpx2", "requests"):
        try:
            m = __import__(mod)
        except ImportError:
            continue
        exc = getattr(m, "TransportError", None) or getattr(getattr(m, "exceptions", None), "ConnectionError", None)
        if exc is not None:
            out.append(exc)
    return tuple(out)


def _hub_errors(e: Exception, repo_id: str, revision: str | None, endpoint: str) -> errors.InspectError:
    """Map huggingface_hub / network exceptions to our typed errors."""
    from huggingface_hub import errors as hf

    kw = {"repo_id": repo_id, "revision": revision}
    if isinstance(e, hf.GatedRepoError):
        status = getattr(getattr(e, "response", None), "status_code", 403) or 403
        what = "no token was given" if status == 401 else "the token has no access"
        return errors.GatedRepoError(
            f"{repo_id} is gated and {what}: accept its conditions on the model page, then pass a token "
            "with access (--token or HF_TOKEN)", status=status, **kw)
    if isinstance(e, hf.RevisionNotFoundError):
        return errors.RevisionNotFoundError(
            f"{repo_id} has no revision {revision!r}: use a branch, tag or commit sha that exists", **kw)
    if isinstance(e, hf.RepositoryNotFoundError):
        return errors.RepoNotFoundError(
            f"{repo_id} was not found on {endpoint}: check the id, or pass a token (--token / HF_TOKEN) "
            "if it is private", **kw)
    if isinstance(e, hf.EntryNotFoundError):
        return errors.InvalidRepoError(f"{repo_id}: {e}", **kw)
    if isinstance(e, (*_transport_errors(), hf.OfflineModeIsEnabled, ConnectionError, TimeoutError)):
        return errors.HubUnreachableError(
            f"cannot reach the Hub at {endpoint} ({type(e).__name__}: {e}); check the network or "
            "--hub-endpoint / HF_ENDPOINT", **kw)
    if isinstance(e, hf.SafetensorsParsingError):
        return errors.CorruptCheckpointError(f"{repo_id}: a safetensors header does not parse ({e}); "
                                             "the file is corrupt: re-upload it", **kw)
    if isinstance(e, hf.HfHubHTTPError):
        return errors.HubUnreachableError(f"the Hub at {endpoint} answered an error for {repo_id}: {e}", **kw)
    raise e


class SearchUnavailable(Exception):
    """The Hub's model search could not answer (a mirror without it, an HTTP error, no network)."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


def _lookup_failures() -> tuple[type[BaseException], ...]:
    """What an optional Hub call may raise that is the Hub's doing, not a bug of ours.

    HTTP errors (`HfHubHTTPError` and its subclasses: 404, 401/403, 429, 5xx), a file the repo
    lacks, transport failures of the HTTP client, offline mode, and OS errors (timeouts, reset
    connections, a cache file that cannot be written).
    """
    from huggingface_hub import errors as hf

    return (hf.HfHubHTTPError, hf.EntryNotFoundError, *_transport_errors(), OSError)


def _failure_text(e: BaseException) -> str:
    """One readable line for a failed Hub call: the HTTP status when there is one."""
    status = getattr(getattr(e, "response", None), "status_code", None)
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}{f', HTTP {status}' if status else ''}: {first}" if first else type(e).__name__


class HubSource:
    """A repo on a Hub (real or local) through `huggingface_hub`; metadata files only."""

    def __init__(self, repo_id: str, revision: str | None = None, token: str | None = None,
                 endpoint: str | None = None) -> None:
        from huggingface_hub import HfApi, constants

        self.endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
        self.api = HfApi(endpoint=self.endpoint, token=token)
        self.token = token
        self.repo_id = repo_id
        self.revision = revision or "main"
        self.lookups_unavailable: list[LookupUnavailable] = []
        try:
            self.info = self.api.model_info(repo_id, revision=self.revision, files_metadata=True)
        except Exception as e:
            raise _hub_errors(e, repo_id, self.revision, self.endpoint) from e
        self.sha = self.info.sha

    def files(self) -> dict[str, int | None]:
        return {s.rfilename: (s.lfs.size if s.lfs else s.size) for s in (self.info.siblings or [])}

    def read_text(self, name: str) -> str | None:
        if name not in self.files():
            return None
        try:
            path = self.api.hf_hub_download(self.repo_id, name, revision=self.sha)
        except Exception as e:
            raise _hub_errors(e, self.repo_id, self.revision, self.endpoint) from e
        return Path(path).read_text()

    def safetensors_headers(self) -> dict[str, Header]:
        try:
            meta = self.api.get_safetensors_metadata(self.repo_id, revision=self.sha)
        except Exception as e:
            from huggingface_hub import errors as hf

            if isinstance(e, hf.NotASafetensorsRepoError):
                return {}
            raise _hub_errors(e, self.repo_id, self.revision, self.endpoint) from e
        return {f: {k: (t.dtype, list(t.shape), tuple(t.data_offsets)) for k, t in m.tensors.items()}
                for f, m in meta.files_metadata.items()}

    def card_data(self) -> dict[str, Any]:
        cd = self.info.card_data
        return cd.to_dict() if cd is not None else {}

    def note_unavailable(self, what: str, why: str, effect: str) -> None:
        """Record that optional lookup `what` could not be made (once per lookup)."""
        if all(n.what != what for n in self.lookups_unavailable):
            self.lookups_unavailable.append(LookupUnavailable(what=what, why=why, effect=effect))

    def search(self, tag: str) -> list[str]:
        """Repo ids the Hub's model search lists under `tag`; raises `SearchUnavailable`.

        Plain mirrors (Olah) have no search: they answer `/api/models` with an empty 200 body.
        """
        try:
            return [m.id for m in self.api.list_models(filter=tag, limit=50)]
        except json.JSONDecodeError as e:  # requests' / httpx's JSONDecodeError subclass this one
            body = "an empty body" if not (e.doc or "").strip() else "a body that is not JSON"
            raise SearchUnavailable(f"the Hub at {self.endpoint} answered its model search (GET /api/models) "
                                    f"with {body}: this Hub mirror has no search") from e
        except _lookup_failures() as e:
            raise SearchUnavailable(f"the Hub's model search at {self.endpoint} failed "
                                    f"({_failure_text(e)})") from e

    def adapters(self) -> list[AdapterInfo]:
        try:
            ids = self.search(f"base_model:adapter:{self.repo_id}")
        except SearchUnavailable as e:
            self.note_unavailable(ADAPTER_SEARCH, e.why,
                                  f"LoRA adapters of {self.repo_id} on the Hub are not listed; name the "
                                  "adapters to serve yourself (name=org/repo)")
            return []
        out = []
        for rid in ids:
            try:
                p = self.api.hf_hub_download(rid, "adapter_config.json")
                text = Path(p).read_text()
            except (*_lookup_failures(), ValueError) as e:  # one unreadable adapter must not hide the model
                out.append(AdapterInfo(repo_id=rid, error=_failure_text(e)))
                continue
            out.append(adapter_info_from_config(rid, text))
        return out

    def awq_variants(self, base_ids: list[str]) -> list[str]:
        """Repos listed as quantized from `base_ids` whose config says AWQ 4-bit."""
        found: list[str] = []
        for base in base_ids:
            try:
                ids = self.search(f"base_model:quantized:{base}")
            except SearchUnavailable as e:  # the same search for every base: stop at the first failure
                self.note_unavailable(AWQ_VARIANT_SEARCH, e.why,
                                      f"AWQ 4-bit variants of {', '.join(base_ids)} are not suggested; look for "
                                      "one on the base model's page on the Hub (its quantizations)")
                return found
            for rid in ids:
                if rid == self.repo_id or rid in found:
                    continue
                try:
                    cfg = json.loads(Path(self.api.hf_hub_download(rid, "config.json")).read_text())
                    q = QuantConfig.from_dict(cfg.get("quantization_config") or {}) if isinstance(cfg, dict) else None
                except (*_lookup_failures(), ValueError, TypeError):  # gated / broken candidates are not suggestions
                    continue
                if q is not None and q.is_awq and q.bits == 4 and (q.version or "gemm") in ("gemm", "gemv"):
                    found.append(rid)
        return found


# -- building -----------------------------------------------------------------------------
def awq_quantizable(name: str, dtype: str, shape: list[int]) -> bool:
    """Whether quantize-on-deploy turns this tensor to AWQ 4-bit: a 2-D 16/32-bit `.weight` of a
    decoder linear layer; router gates, `lm_head`, embeddings and norms stay 16-bit (as AutoAWQ)."""
    return (name.endswith(".weight") and len(shape) == 2 and dtype in ("F16", "BF16", "F32")
            and ".layers." in name and not _ROUTER_RE.search(name) and "embed" not in name
            and not name.startswith("lm_head"))


def _weights(headers: dict[str, Header], files: dict[str, int | None], cfg: ModelConfig,
             bits: int | None, synthesized_zeros: bool = False) -> WeightsInfo:
    w = WeightsInfo(has_safetensors=bool(headers))
    w.files = {f: files.get(f) for f in sorted(headers)}
    w.other_weight_files = sorted(f for f in files if f.endswith((".bin", ".gguf", ".pt", ".pth")))
    per_weight = 32 // (bits or 4)
    consistent = True
    for fname, header in headers.items():
        data_end = 0
        for name, (dtype, shape, (start, end)) in header.items():
            n = end - start
            numel = 1
            for s in shape:
                numel *= s
            data_end = max(data_end, end)
            w.num_tensors += 1
            w.total_bytes += n
            w.bytes_by_dtype[dtype] = w.bytes_by_dtype.get(dtype, 0) + n
            if name.endswith(_OVERHEAD_SUFFIXES):
                w.quant_overhead_bytes += n
                if synthesized_zeros and name.endswith(".weight_scale") and len(shape) == 2:
                    w.load_extra_bytes += -(-shape[0] // 8) * shape[1] * 4  # int32 [in/g, out/8]
                params = 0
            elif name.endswith(_PACKED_SUFFIXES) and dtype == "I32":
                params = numel * per_weight
            else:
                params = numel
            w.param_count += params
            if awq_quantizable(name, dtype, shape):
                w.quantizable_params += numel
                w.quantizable_bytes += n
                if _EXPERT_RE.search(name):
                    w.quantizable_expert_bytes += n
            if _EXPERT_RE.search(name):
                w.expert_bytes += n
                w.expert_params += params
            elif "embed_tokens" in name:
                w.embed_bytes += n
            elif name.startswith("lm_head"):
                w.lm_head_bytes += n
            else:
                w.other_bytes += n
        size = files.get(fname)
        if size is not None and not (0 <= size - data_end <= 128 * 2**20):
            consistent = False
    if headers and all(files.get(f) is not None for f in headers):
        w.file_bytes = sum(files[f] or 0 for f in headers)
        w.sizes_consistent = consistent
    if not w.lm_head_bytes and cfg.tie_word_embeddings:
        w.lm_head_bytes = w.embed_bytes
    if cfg.num_experts:
        w.active_expert_bytes = w.expert_bytes * cfg.num_experts_per_tok // cfg.num_experts
    return w


def _quant(cfg: ModelConfig) -> QuantInfo:
    q = cfg.quant
    if q is None:
        return QuantInfo(method="none", source=None)
    fmt = q.raw.get("format") if q.method == "compressed-tensors" else None
    not_served = None
    if q.method == "compressed-tensors":
        groups = q.raw.get("config_groups") or {}
        for g in groups.values() if isinstance(groups, dict) else ():
            wts = (g or {}).get("weights") or {} if isinstance(g, dict) else {}
            q.bits = q.bits or wts.get("num_bits")
            q.group_size = q.group_size or wts.get("group_size")
            q.zero_point = not wts.get("symmetric", True)  # the library's default: symmetric
        try:
            parse_w4a16(q.raw)
        except ConfigError as e:
            not_served = str(e)
    if q.method == "bitsandbytes":
        bits = 4 if q.raw.get("load_in_4bit") else 8 if q.raw.get("load_in_8bit") else q.bits
        q.bits = bits
    return QuantInfo(method=q.method, bits=q.bits, group_size=q.group_size,
                     zero_point=q.zero_point if q.method in ("awq", "compressed-tensors") else None,
                     version=q.version if q.method != "compressed-tensors" else None,
                     source=q.source, modules_to_not_convert=list(q.modules_to_not_convert), format=fmt,
                     not_served=not_served)


def build_report(src: Source, revision: str | None = None, *, with_adapters: bool = True) -> ModelReport:
    """Assemble a report from any source; raises typed `errors.InspectError`s."""
    from hubdeploy.hub_integration.compat import check_compat

    files = src.files()
    raw_cfg = src.read_text("config.json")
    if raw_cfg is None:
        raise errors.InvalidRepoError(
            f"{src.repo_id} has no config.json at {revision or 'this revision'}: it is not a transformers "
            "model repo (pick the repo that holds config.json + safetensors)", repo_id=src.repo_id,
            revision=revision)
    try:
        cfg_dict = json.loads(raw_cfg)
        quant = None
        if not cfg_dict.get("quantization_config"):
            for name in QUANT_META_FILES:
                if name in files:
                    quant = QuantConfig.from_dict(json.loads(src.read_text(name) or "{}"), source=name)
                    break
        cfg = ModelConfig.from_dict(cfg_dict, quant)
    except (json.JSONDecodeError, ConfigError, TypeError, ValueError) as e:
        raise errors.InvalidRepoError(f"{src.repo_id}: config.json cannot be read ({e})",
                                      repo_id=src.repo_id, revision=revision) from e
    qinfo = _quant(cfg)
    headers = src.safetensors_headers()
    weights = _weights(headers, files, cfg,
                       qinfo.bits if qinfo.method in ("awq", "gptq", "compressed-tensors") else None,
                       synthesized_zeros=qinfo.method == "compressed-tensors" and qinfo.zero_point is False)

    card = src.card_data()
    base = card.get("base_model")
    base_list = [str(b) for b in (base if isinstance(base, list) else [base] if base else [])]
    tags = list(getattr(getattr(src, "info", None), "tags", None) or card.get("tags") or [])
    relation = card.get("base_model_relation")
    if relation is None and base_list:
        for t in tags:
            m = re.match(r"base_model:(adapter|quantized|finetune|merge):", t)
            if m:
                relation = m.group(1)
    tok_cfg = src.read_text("tokenizer_config.json")
    chat = False
    if tok_cfg:
        try:
            chat = bool(json.loads(tok_cfg).get("chat_template"))
        except json.JSONDecodeError:
            chat = False
    chat = chat or "chat_template.jinja" in files or "chat_template.json" in files
    info = getattr(src, "info", None)
    moe = None
    if cfg.is_moe:
        moe = MoEInfo(num_experts=cfg.num_experts, experts_per_token=cfg.num_experts_per_tok,
                      expert_intermediate_size=cfg.moe_intermediate_size,
                      shared_expert_intermediate_size=cfg.shared_expert_intermediate_size,
                      num_moe_layers=sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers)))
    report = ModelReport(
        repo_id=src.repo_id, revision=revision, sha=src.sha,
        source="hub" if isinstance(src, HubSource) else "local",
        card=CardInfo(license=card.get("license"), base_model=base_list, base_model_relation=relation,
                      tags=tags, pipeline_tag=card.get("pipeline_tag") or getattr(info, "pipeline_tag", None),
                      library_name=card.get("library_name") or getattr(info, "library_name", None)),
        gated=getattr(info, "gated", False) or False, private=bool(getattr(info, "private", False)),
        arch=ArchInfo(architecture=cfg.architecture, model_type=cfg.model_type, family=cfg.family,
                      num_layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size,
                      intermediate_size=cfg.intermediate_size, num_attention_heads=cfg.num_attention_heads,
                      num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
                      vocab_size=cfg.vocab_size, context_length=cfg.max_position_embeddings,
                      rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling,
                      sliding_window=cfg.sliding_window, tie_word_embeddings=cfg.tie_word_embeddings,
                      torch_dtype=cfg.torch_dtype, remote_code_only=cfg.trust_remote_code_only),
        moe=moe, quant=qinfo, weights=weights,
        has_tokenizer=any(f in files for f in ("tokenizer.json", "tokenizer.model")),
        has_chat_template=chat,
        endpoint=getattr(src, "endpoint", None),
    )
    if with_adapters:
        report.adapters = src.adapters()
    if isinstance(src, HubSource) and not (qinfo.method == "awq" and qinfo.bits == 4):
        bases = ([src.repo_id] + base_list) if relation != "quantized" else base_list
        report.awq_variants = src.awq_variants(bases)
    report.lookups_unavailable = list(getattr(src, "lookups_unavailable", []))
    unsized = [f for f in sorted(headers) if files.get(f) is None]
    if unsized:
        report.lookups_unavailable.append(LookupUnavailable(
            what=FILE_SIZES,
            why=f"the Hub's file listing (model_info with files_metadata) gave no size for {', '.join(unsized)}",
            effect="weight sizes come from the safetensors headers alone; they were not checked against the "
                   "uploaded files, so a truncated upload is not caught before deploying"))
    report.compat = check_compat(report, token_given=bool(getattr(src, "token", None)))
    return report


def inspect_model(model: str, revision: str | None = None, *, token: str | None = None,
                  endpoint: str | None = None, with_adapters: bool = True) -> ModelReport:
    """Report for a Hub repo id or a local directory (a path that exists)."""
    if os.path.isdir(model):
        return build_report(LocalSource(model), revision, with_adapters=with_adapters)
    if model.count("/") != 1 or not all(model.split("/")):
        raise errors.RepoNotFoundError(
            f"{model!r} is neither a local directory nor a Hub repo id of the form 'org/name'", repo_id=model)
    token = token or os.environ.get("HF_TOKEN") or None
    src = HubSource(model, revision, token=token, endpoint=endpoint)
    return build_report(src, revision or "main", with_adapters=with_adapters)

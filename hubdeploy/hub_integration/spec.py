"""`DeploymentSpec`: the one typed description of an endpoint.

It flows form → REST API → store → provisioner → `hubdeploy serve` arguments
(`serve_args`). Shape checks (name, repo id, paths, ranges) are pydantic validators, so
FastAPI answers 422 naming the field; checks that need the world (unique name, model and
adapters exist, options within the memory plan) are `check_spec` below, which raises
`SpecError` with the same `loc` shape.
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, create_model, field_validator
from pydantic.json_schema import SkipJsonSchema

from hubdeploy.serving.config import engine_argv, knobs
from hubdeploy.serving.server.adapter_policy import ADAPTER_NAME_PATTERN

NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]{0,30}[a-z0-9])?$"
REPO_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}$")
TAG_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:\-]{0,63}$"
REVISION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-/]{0,127}$"
_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:")  # http:, https:, file:, hf:, s3: ...


def classify_source(value: str) -> Literal["repo", "path"]:
    """Whether a model/adapter reference is a Hub repo id or a local directory; ValueError if neither.

    Local directories are absolute paths (or `./rel`, `~/rel`); anything with a URL scheme,
    a `..` component or control characters is refused before it reaches the filesystem.
    """
    if not value or any(ord(c) < 32 or c == "\x7f" for c in value):
        raise ValueError("must be a Hub repo id (org/name) or a local directory, without control characters")
    if "\\" in value:
        raise ValueError("backslashes are not allowed; use a Hub repo id (org/name) or a POSIX path")
    if _URL_RE.match(value) or "://" in value:
        raise ValueError("URLs are not accepted; give a Hub repo id (org/name) or a local directory "
                         "under an allowed model root")
    if ".." in Path(value).parts or ".." in value.split("/"):
        raise ValueError("'..' is not allowed in paths; give a directory under an allowed model root")
    if value.startswith(("/", "./", "~/")):
        return "path"
    if REPO_ID_RE.match(value) and ".." not in value and "--" not in value:
        return "repo"
    raise ValueError(f"{value!r} is neither a Hub repo id (org/name) nor an absolute local directory")


def _engine_options() -> type[BaseModel]:
    """The `EngineArgs` knobs with `deploy` bounds, each optional: None takes the memory plan's
    default (or the engine's), so the spec's options are the engine's fields by construction."""
    opts: dict[str, Any] = {}
    for name, (kind, f) in knobs("deploy").items():
        kind = Literal[f.metadata["choices"]] if "choices" in f.metadata else kind
        opts[name] = (kind | None, Field(None, description=f.metadata["help"], **f.metadata["deploy"]))
    return create_model("EngineOptions", __config__=ConfigDict(extra="forbid"), **opts,
                        __doc__="Engine knobs (serving.config.EngineArgs); None takes the memory plan's default.")


EngineOptions = _engine_options()


class DeploymentSpec(BaseModel):
    """What to deploy and how. Never holds a secret (the HF token travels beside it)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., pattern=NAME_PATTERN, description="DNS-safe endpoint name, unique")
    model: str = Field(..., min_length=1, max_length=512,
                       description="Hub repo id `org/name` or an absolute directory under an allowed model root")
    revision: str | None = Field(None, pattern=REVISION_PATTERN, description="branch, tag or commit")
    adapters: dict[str, str] = Field(default_factory=dict, max_length=32,
                                     description="LoRA adapters: served name -> Hub repo id or local directory")
    gpu: str = Field("cpu", min_length=1, max_length=64, description="a GPU catalog name, or `cpu`")
    engine: EngineOptions = Field(default_factory=EngineOptions)
    access: Literal["private", "protected", "public"] = Field(
        "private", description="at the gateway: `private` the endpoint's own key, `protected` any credential "
                               "of the service (its admin token), `public` no key")
    tags: list[str] = Field(default_factory=list, max_length=16)
    restart_on_failure: bool = False
    scale_to_zero_after_s: int = Field(0, ge=0, le=30 * 86400,
                                       description="stop after this many seconds without a request (device "
                                                   "freed, status scaled_to_zero; a request wakes it); 0 = never")
    quantize: Literal["awq"] | None = Field(
        None, description="quantize the 16-bit model to AWQ 4-bit (GEMM, zero point) before serving; the result "
                          "is cached by repo, revision commit and settings, and reused by later deploys")
    quantize_group_size: Literal[32, 64, 128] = Field(128, description="AWQ group size when quantizing")
    quantize_calib: str | None = Field(
        None, min_length=1, max_length=512,
        description="calibration text file for quantizing (absolute path under an allowed model root); "
                    "default: the calibration text shipped with hubdeploy")
    engine_from_plan: list[str] = Field(
        default_factory=list, max_length=len(EngineOptions.model_fields),
        description="engine options filled in from the memory plan (not set by the user); set by the "
                    "service, re-planned when a PATCH changes the GPU, adapters or revision")

    @field_validator("model")
    @classmethod
    def _model_ref(cls, v: str) -> str:
        classify_source(v)
        return v

    @field_validator("revision")
    @classmethod
    def _revision(cls, v: str | None) -> str | None:
        if v is not None and ".." in v:
            raise ValueError("'..' is not allowed in a revision")
        return v

    @field_validator("adapters")
    @classmethod
    def _adapters(cls, v: dict[str, str]) -> dict[str, str]:
        for name, src in v.items():
            if not re.match(ADAPTER_NAME_PATTERN, name):
                raise ValueError(f"adapter name {name!r} must match {ADAPTER_NAME_PATTERN}")
            try:
                classify_source(src)
            except ValueError as e:
                raise ValueError(f"adapter {name!r}: {e}") from None
        return v

    @field_validator("quantize_calib")
    @classmethod
    def _quantize_calib(cls, v: str | None) -> str | None:
        if v is not None and classify_source(v) != "path":
            raise ValueError("must be an absolute path to a text file under an allowed model root")
        return v

    @field_validator("engine_from_plan")
    @classmethod
    def _engine_from_plan(cls, v: list[str]) -> list[str]:
        unknown = sorted(set(v) - set(EngineOptions.model_fields))
        if unknown:
            raise ValueError(f"not engine options: {unknown}")
        return sorted(set(v))

    @field_validator("tags")
    @classmethod
    def _tags(cls, v: list[str]) -> list[str]:
        for t in v:
            if not re.match(TAG_PATTERN, t):
                raise ValueError(f"tag {t!r} must match {TAG_PATTERN}")
        return v

    @property
    def model_kind(self) -> Literal["repo", "path"]:
        return classify_source(self.model)

    @property
    def served_model_name(self) -> str:
        """The `model` clients send: the repo id, or a local directory's name."""
        return self.model if self.model_kind == "repo" else Path(self.model).name

    def serve_args(self, *, host: str = "127.0.0.1", port: int, device: str = "auto",
                   model_dir: str | Path | None = None) -> list[str]:
        """Arguments of `hubdeploy serve` for this spec (no secrets: those go by environment).

        `model_dir`: serve this directory instead of `model` (the quantized checkpoint), under
        the same served name; it has no revision.
        """
        loras = [x for name, src in self.adapters.items() for x in ("--lora", f"{name}={src}")]
        revision = None if model_dir is not None else self.revision
        return [str(model_dir) if model_dir is not None else self.model, *loras, "--host", host, "--port", str(port),
                "--served-model-name", self.served_model_name,
                *engine_argv({"revision": revision, "device": device, **self.engine.model_dump()})]


class CreateEndpointRequest(DeploymentSpec):
    """Body of `POST /api/endpoints`: the spec plus an optional HF token that is never stored."""

    hf_token: SecretStr | None = Field(None, description="HF token for gated/private repos; used, never stored")
    engine_from_plan: SkipJsonSchema[list[str]] = Field(default_factory=list, exclude=True)  # the service sets it

    def spec(self) -> DeploymentSpec:
        return DeploymentSpec.model_validate(self.model_dump(exclude={"hf_token", "engine_from_plan"}))


class PatchEndpointRequest(BaseModel):
    """Body of `PATCH /api/endpoints/{name}`: fields to change (name and model stay)."""

    model_config = ConfigDict(extra="forbid")

    revision: str | None = Field(None, pattern=REVISION_PATTERN)
    adapters: dict[str, str] | None = Field(None, max_length=32)
    gpu: str | None = Field(None, min_length=1, max_length=64)
    engine: EngineOptions | None = None
    access: Literal["private", "protected", "public"] | None = None
    tags: list[str] | None = Field(None, max_length=16)
    restart_on_failure: bool | None = None
    scale_to_zero_after_s: int | None = Field(None, ge=0, le=30 * 86400)
    quantize: Literal["awq"] | None = None
    quantize_group_size: Literal[32, 64, 128] | None = None
    quantize_calib: str | None = Field(None, min_length=1, max_length=512)
    hf_token: SecretStr | None = None

    def apply(self, spec: DeploymentSpec) -> DeploymentSpec:
        """The spec with these changes; validated again as a whole.

        Options the memory plan filled in (`spec.engine_from_plan`) are cleared, so that
        `check_spec` plans them again for the new GPU/adapters: the old GPU's defaults would
        not fit a smaller one. Options the user set (before or in this patch) are kept.
        """
        changes: dict[str, Any] = self.model_dump(exclude_unset=True, exclude={"hf_token", "engine"})
        changes = {k: v for k, v in changes.items() if v is not None or k in ("revision", "quantize", "quantize_calib")}
        engine = spec.engine.model_dump()
        for key in spec.engine_from_plan:
            engine[key] = None
        if self.engine is not None:
            engine.update(self.engine.model_dump(exclude_unset=True))
        return DeploymentSpec.model_validate({**spec.model_dump(), **changes, "engine": engine,
                                              "engine_from_plan": []})


class SpecError(ValueError):
    """A spec that is well-formed but not deployable here; `loc` names the field (FastAPI style)."""

    def __init__(self, loc: tuple[str | int, ...], msg: str, type_: str = "value_error") -> None:
        super().__init__(msg)
        self.loc = loc
        self.msg = msg
        self.type = type_

    def detail(self) -> list[dict[str, Any]]:
        return [{"loc": ["body", *self.loc], "msg": self.msg, "type": self.type}]


class HubUnavailable(RuntimeError):
    """The Hub could not be asked (network, server error): not the spec's fault (HTTP 503)."""


@dataclass
class SpecContext:
    """What checking a spec against the world needs."""

    allowed_roots: list[Path]
    hub_endpoint: str | None = None
    hf_token: str | None = None
    name_taken: Callable[[str], bool] | None = None
    check_plan: bool = True


def resolve_local_dir(value: str, roots: list[Path], marker: str, loc: tuple[str | int, ...]) -> Path:
    """The real directory behind `value` (symlinks resolved), which must sit under an allowed root."""
    raw = Path(value).expanduser()
    if value.startswith("./"):
        if not roots:
            raise SpecError(loc, "relative paths need an allowed model root; none is configured")
        raw = roots[0] / value[2:]
    try:  # not strict: whether a path outside the roots exists is none of the caller's business
        real = Path(os.path.realpath(raw))
    except (OSError, RuntimeError, ValueError):
        real = None
    real_roots = [r.resolve() for r in roots]
    if real is None or not any(real == r or real.is_relative_to(r) for r in real_roots):
        raise SpecError(loc, f"{value!r} is outside the allowed model roots "
                             f"({', '.join(map(str, real_roots)) or 'none'}); start `hubdeploy up` "
                             "with --allowed-model-root to allow another folder")
    if not real.exists():
        raise SpecError(loc, f"directory {value!r} does not exist")
    if not real.is_dir() or not (real / marker).is_file():
        raise SpecError(loc, f"{value!r} is not a model directory in Hub layout (no {marker})")
    return real


def recheck_local_paths(spec: DeploymentSpec, roots: list[Path]) -> None:
    """`SpecError` unless the spec's local model and adapter directories still resolve under `roots`.

    `check_spec` checked them at create/PATCH time; a symlink may have been re-pointed since, so
    every (re)start (resume, service restart, automatic restart) checks again.
    """
    if spec.model_kind == "path":
        resolve_local_dir(spec.model, roots, "config.json", ("model",))
    for name, src in spec.adapters.items():
        if classify_source(src) == "path":
            resolve_local_dir(src, roots, "adapter_config.json", ("adapters", name))
    if spec.quantize_calib is not None:
        resolve_local_file(spec.quantize_calib, roots, ("quantize_calib",))


def _hub_api(ctx: SpecContext) -> Any:
    from huggingface_hub import HfApi

    return HfApi(endpoint=ctx.hub_endpoint, token=ctx.hf_token or False)


def check_hub_repo(repo: str, revision: str | None, ctx: SpecContext, loc: tuple[str | int, ...],
                   rev_loc: tuple[str | int, ...] = ("revision",)) -> Any:
    """`model_info` of a Hub repo, or a SpecError saying why it cannot be used."""
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    try:
        return _hub_api(ctx).model_info(repo, revision=revision or "main")
    except GatedRepoError:
        raise SpecError(("hf_token",), f"{repo} is gated or private: give an hf_token that has access") from None
    except RevisionNotFoundError:
        raise SpecError(rev_loc, f"revision {revision!r} not found in {repo}") from None
    except RepositoryNotFoundError:
        raise SpecError(loc, f"{repo} not found on the Hub ({ctx.hub_endpoint or 'huggingface.co'}), "
                             "or it is private and no hf_token with access was given") from None
    except HfHubHTTPError as e:
        status = getattr(e.response, "status_code", None)
        if status is not None and 400 <= status < 500:
            raise SpecError(loc, f"the Hub refused {repo}: {status}") from None
        raise HubUnavailable(f"the Hub at {ctx.hub_endpoint or 'huggingface.co'} failed: {e}") from None
    except (OSError, ValueError) as e:
        raise HubUnavailable(f"the Hub at {ctx.hub_endpoint or 'huggingface.co'} is unreachable: {e}") from None


def _adapter_info(src: str, ctx: SpecContext, loc: tuple[str | int, ...]) -> Any:
    """The adapter's `AdapterInfo` (rank, targets) from its adapter_config.json, after checking it exists."""
    from hubdeploy.hub_integration.report import adapter_info_from_config

    if classify_source(src) == "path":
        cfg_path = resolve_local_dir(src, ctx.allowed_roots, "adapter_config.json", loc) / "adapter_config.json"
    else:
        check_hub_repo(src, None, ctx, loc, rev_loc=loc)
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            cfg_path = Path(hf_hub_download(src, "adapter_config.json", endpoint=ctx.hub_endpoint,
                                            token=ctx.hf_token or False))
        except EntryNotFoundError:
            raise SpecError(loc, f"{src} has no adapter_config.json: not a PEFT LoRA adapter") from None
        except Exception as e:  # noqa: BLE001
            raise HubUnavailable(f"could not read {src}/adapter_config.json: {e}") from None
    try:
        info = adapter_info_from_config(src, cfg_path.read_text())
    except OSError as e:
        raise SpecError(loc, f"{src}: adapter_config.json cannot be read: {e}") from None
    if info.error:
        raise SpecError(loc, f"{src}: {info.error}")
    return info


def check_spec(spec: DeploymentSpec, ctx: SpecContext) -> DeploymentSpec:
    """Check `spec` against this host and the Hub; return it with engine defaults filled.

    Raises `SpecError` (422, naming the field) or `HubUnavailable` (503).
    """
    if ctx.name_taken is not None and ctx.name_taken(spec.name):
        raise SpecError(("name",), f"an endpoint named {spec.name!r} already exists; pick another name")
    if spec.model_kind == "path":
        model_src: str | Path = resolve_local_dir(spec.model, ctx.allowed_roots, "config.json", ("model",))
        if spec.revision not in (None, "main"):
            raise SpecError(("revision",), "a local directory has no revisions; leave revision empty")
    else:
        check_hub_repo(spec.model, spec.revision, ctx, ("model",))
        model_src = spec.model
    adapters = {name: _adapter_info(src, ctx, ("adapters", name)) for name, src in spec.adapters.items()}
    max_rank = spec.engine.max_lora_rank
    for name, ad in adapters.items():
        if ad.use_dora:
            raise SpecError(("adapters", name), f"adapter {name!r} is DoRA, which the engine does not serve")
        if max_rank is not None and ad.rank is not None and ad.rank > max_rank:
            raise SpecError(("adapters", name), f"adapter {name!r} has rank {ad.rank}, above "
                                                f"max_lora_rank={max_rank}; raise max_lora_rank")
    if spec.quantize_calib is not None:
        resolve_local_file(spec.quantize_calib, ctx.allowed_roots, ("quantize_calib",))
    if ctx.check_plan or spec.quantize:
        report = model_report(spec, model_src, ctx)
        if spec.quantize:
            from hubdeploy.hub_integration.quantize_offer import group_size_refusal, quantize_refusal

            refusal = quantize_refusal(report)
            if refusal is not None:
                raise SpecError(("quantize",), f"cannot quantize: {refusal}")
            refusal = group_size_refusal(report, spec.quantize_group_size)
            if refusal is not None:
                raise SpecError(("quantize_group_size",), f"cannot quantize: {refusal}")
        if ctx.check_plan:
            spec = apply_plan(spec, report, adapters)
    return spec


MAX_CALIB_BYTES = 64 * 2**20  # calibration text: a few hundred KB is plenty


def resolve_local_file(value: str, roots: list[Path], loc: tuple[str | int, ...]) -> Path:
    """The real file behind `value` (symlinks resolved): a regular file under an allowed root."""
    raw = roots[0] / value[2:] if value.startswith("./") and roots else Path(value).expanduser()
    real = Path(os.path.realpath(raw))
    real_roots = [r.resolve() for r in roots]
    if not any(real.is_relative_to(r) for r in real_roots):
        raise SpecError(loc, f"{value!r} is outside the allowed model roots "
                             f"({', '.join(map(str, real_roots)) or 'none'})")
    if not real.is_file():
        raise SpecError(loc, f"{value!r} is not a file")
    if real.stat().st_size > MAX_CALIB_BYTES:
        raise SpecError(loc, f"{value!r} is larger than {MAX_CALIB_BYTES // 2**20} MiB")
    return real


def model_report(spec: DeploymentSpec, model_src: str | Path, ctx: SpecContext) -> Any:
    """The model's `ModelReport` (metadata only), its failures mapped onto spec fields."""
    from hubdeploy.hub_integration import errors
    from hubdeploy.hub_integration.report import inspect_model

    try:
        report = inspect_model(str(model_src), spec.revision if spec.model_kind == "repo" else None,
                               token=ctx.hf_token, endpoint=ctx.hub_endpoint, with_adapters=False)
    except errors.HubUnreachableError as e:
        raise HubUnavailable(e.message) from None
    except errors.GatedRepoError as e:
        raise SpecError(("hf_token",), e.message) from None
    except errors.RevisionNotFoundError as e:
        raise SpecError(("revision",), e.message) from None
    except errors.InspectError as e:
        raise SpecError(("model",), e.message) from None
    return report


def apply_plan(spec: DeploymentSpec, report: Any, adapters: dict[str, Any]) -> DeploymentSpec:
    """Fill engine defaults from the memory plan and refuse options beyond its limits.

    The report (`report.inspect_model`) and the plan (`memory_plan.plan`) are the one source
    of truth; this only maps their verdicts onto spec fields. On `cpu` there is no plan:
    only the model's context length bounds `max_model_len`, the engine sizes the rest.
    A spec with `quantize` is planned for the AWQ checkpoint quantizing makes.
    """
    from hubdeploy.hub_integration import errors

    blocking = [c for c in report.compat if c.status == "error"]
    if blocking:
        c = blocking[0]
        raise SpecError(("model",), f"{c.capability}: {c.reason}" + (f" ({c.action})" if c.action else ""))
    engine = spec.engine.model_dump()
    ctx_len = report.arch.context_length
    if engine["max_model_len"] is not None and ctx_len and engine["max_model_len"] > ctx_len:
        raise SpecError(("engine", "max_model_len"), f"max_model_len={engine['max_model_len']} is beyond the "
                                                     f"model's context length {ctx_len}; lower it")
    if spec.gpu == "cpu":
        return spec.model_copy(update={"engine_from_plan": []})
    from hubdeploy.hub_integration.gpus import get_gpu
    from hubdeploy.hub_integration.memory_plan import PLANNED, plan

    try:
        gpu = get_gpu(spec.gpu).name
    except errors.UnknownGPUError as e:
        raise SpecError(("gpu",), e.message) from None
    ads = list(adapters.values())
    asked = {k: engine[k] for k in PLANNED if engine[k] is not None}
    quant = {"quantize": spec.quantize, "quantize_group_size": spec.quantize_group_size} if spec.quantize else {}
    mp = plan(report, gpu, ads, **asked, **quant)
    if not mp.fits:
        base = plan(report, gpu, ads, **quant)
        if not base.fits:
            raise SpecError(("gpu",), f"the model does not fit on {gpu}: {base.reason}; pick a larger GPU")
        for key, value in asked.items():
            alone = plan(report, gpu, ads, **{key: value}, **quant)
            if not alone.fits:
                raise SpecError(("engine", key), f"{key}={value} is beyond what fits on {gpu}: "
                                                 f"{alone.reason}; lower it or pick a larger GPU")
        raise SpecError(("engine",), f"these engine options do not fit on {gpu} together: {mp.reason}")
    if engine["kv_cache_tokens"] is not None and engine["kv_cache_tokens"] > mp.kv_tokens:
        raise SpecError(("engine", "kv_cache_tokens"),
                        f"kv_cache_tokens={engine['kv_cache_tokens']} is beyond the {mp.kv_tokens} tokens "
                        f"of KV cache that fit on {gpu}; lower it or pick a larger GPU")
    planned = []
    for key, value in mp.engine_defaults().items():
        if key in engine and engine[key] is None:
            engine[key] = value
            planned.append(key)
    return spec.model_copy(update={"engine": EngineOptions.model_validate(engine), "gpu": gpu,
                                   "engine_from_plan": sorted(planned)})

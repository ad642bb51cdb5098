"""Install checks (issue 13, part 1): hubdeploy installs next to the latest transformers.

transformers (5.2x) depends on Hugging Face's `kernels` distribution, import name `kernels`,
and imports it. Our packages used to be top-level (`kernels/`, `serving/`, ...), so our
`kernels` shadowed theirs from the repo root / the editable install, and a wheel would have
written a `kernels/` next to theirs. Now everything of ours lives under `hubdeploy.`.

In ONE fresh venv (`--system-site-packages`, so the torch / transformers / HF `kernels` that
setup installed -- the latest -- are reused and nothing is downloaded: pip runs `--no-index
--no-deps --no-build-isolation`), for a real wheel (`pip install .`) and then for `pip
install -e .`, a child Python run from the repo root AND from an unrelated directory must see:

- HF's `kernels`: its module file is the one its own distribution installed (not ours, not
  inside the repo), with its API (`get_kernel`, `kernelize`, ...), and transformers sees it;
- transformers and HF `kernels` at the versions of the system (the venv adds nothing over them);
- our engine: `from hubdeploy import LLM, SamplingParams`, from the venv's own install;
- a model written by the venv's `hubdeploy make-tiny` loads in transformers and runs a forward,
  and our engine's greedy tokens on it equal transformers' (a real cross-check).

The wheel's file list is checked too: every file is under `hubdeploy/`, the dist-info or the
console script (no top-level `kernels`, `serving`, ...), and every data file of the source
package (templates, the page's CSS, gpus.json, ...) is in it.

The system site-packages also holds the editable install made by setup (a `.pth` that appends
setuptools' editable finder to `sys.meta_path`). The venv's site-packages comes before the
system's on `sys.path`, and that finder runs after the path-based one, so the venv's own
install wins; the test asserts it (the wheel's `hubdeploy.__file__` is in the venv, the
metadata found is the venv's) instead of assuming it. pip refuses to uninstall the system
copy from inside the venv ("outside environment"), and the test checks that the system
install is left exactly as it was.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[1]
# Our old top-level packages; `kernels` is Hugging Face's import name (transformers imports it).
OLD_TOP_LEVEL = ("kernels", "serving", "hub_integration", "space", "templates")
# Public API of HF `kernels` (0.19) that transformers' hub_kernels integration calls.
HF_KERNELS_API = ("get_kernel", "has_kernel", "kernelize", "use_kernel_forward_from_hub",
                  "LayerRepository", "Mode", "CUDAProperties")
PROMPT = "Hello world, the"
NEW_TOKENS = 4


def _env(venv: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONSAFEPATH")}
    env["VIRTUAL_ENV"] = str(venv)
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    # A stray copy under ~/.local would sit between the venv's and the system's site-packages.
    env["PYTHONNOUSERSITE"] = "1"
    env["HF_HUB_OFFLINE"] = "1"  # local files only; never the real Hub
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["OMP_NUM_THREADS"] = "1"  # tiny shapes on a shared 2-core box
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


def _run(cmd: list[str], venv: Path, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(venv), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} (cwd {cwd}) failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def _py(venv: Path) -> str:
    return str(venv / "bin" / "python")


def _site_packages(venv: Path) -> Path:
    out = subprocess.run([_py(venv), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         env=_env(venv), capture_output=True, text=True, check=True)
    return Path(out.stdout.strip()).resolve()


def _inside(path: str | Path, root: Path) -> bool:
    return Path(path).resolve().is_relative_to(root.resolve())


def _system_install_state() -> tuple[str, ...]:
    """Our system-wide install (the editable one made by setup), to prove the test leaves it alone."""
    purelib = Path(sysconfig.get_paths()["purelib"])
    return tuple(sorted(p.name for p in purelib.iterdir() if "hubdeploy" in p.name.lower()))


def _source_tree(dst: Path) -> Path:
    """A copy of the working tree as a fresh clone has it (tracked + untracked, not ignored).

    `pip install .` builds in the source directory (setuptools' `build/`); building from a copy
    keeps the repo untouched and, like a fresh clone, has no stale `build/lib` to leak into the
    wheel.
    """
    ls = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                        cwd=REPO, capture_output=True, text=True) if shutil.which("git") else None
    if ls is not None and ls.returncode == 0:
        for rel in filter(None, ls.stdout.split("\0")):
            src = REPO / rel
            if src.is_file():  # tracked but deleted in the working tree: skip
                (dst / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst / rel)
    else:  # not a git checkout (e.g. an unpacked sdist)
        shutil.copytree(REPO, dst, dirs_exist_ok=True, ignore=shutil.ignore_patterns(
            "__pycache__", "*.pyc", "*.egg-info", "build", "dist", ".git", ".venv*", ".hubdeploy"))
    return dst


# The child: what a user's `python -c ...` sees in the venv from its cwd. Prints one JSON line.
CHILD = r"""
import importlib.metadata as md, json, os, sys, traceback
model_dir, api = sys.argv[1], sys.argv[2].split(",")
out = {"cwd": os.getcwd(), "sys_path0": sys.path[0]}
try:
    exec(compile(BODY, "<install-check>", "exec"))
except BaseException:
    out["error"] = traceback.format_exc()
print("RESULT " + json.dumps(out))
"""

# Run step by step; on an error the facts gathered so far still come back (so a shadowed
# `kernels` is reported as such, before whatever it breaks next).
CHILD_BODY = r"""
import kernels  # Hugging Face's, which transformers imports
out["kernels_file"] = kernels.__file__
kd = md.distribution("kernels")
out["kernels_dist_version"] = kd.version
out["kernels_dist_file"] = str(kd.locate_file("kernels/__init__.py"))
out["kernels_api_missing"] = [n for n in api if not callable(getattr(kernels, n, None))]

import transformers
from transformers.utils import is_kernels_available
out["transformers_version"] = transformers.__version__
out["transformers_dist_version"] = md.version("transformers")
out["transformers_sees_kernels"] = bool(is_kernels_available())

import hubdeploy
from hubdeploy import LLM, SamplingParams
out["hubdeploy_file"] = hubdeploy.__file__
out["LLM_module"] = LLM.__module__
out["SamplingParams_module"] = SamplingParams.__module__
hd = md.distribution("hubdeploy")
out["hubdeploy_dist"] = str(hd.locate_file(""))
out["hubdeploy_direct_url"] = json.loads(hd.read_text("direct_url.json") or "{}")
out["editable_finders"] = sorted(m.__file__ for n, m in sys.modules.items()
                                 if n.startswith("__editable__") and "hubdeploy" in n and getattr(m, "__file__", None))

# package data, found the way the code finds it
from importlib import resources
from hubdeploy.hub_integration.gpus import catalog
out["n_gpus"] = len(catalog())
out["data_ok"] = {p: resources.files(pkg).joinpath(p).is_file() for pkg, p in
                  [("hubdeploy.templates", "model_card.md.j2"), ("hubdeploy.templates", "snippets/openai.py.j2"),
                   ("hubdeploy.space", "style.css"), ("hubdeploy.hub_integration", "gpus.json"),
                   ("hubdeploy.quantize", "calib/hubdeploy-calib-v1.txt")]}

import torch
from transformers import AutoModelForCausalLM
llm = LLM(model_dir, device="cpu", dtype="float32", max_model_len=64, kv_cache_tokens=256,
          max_num_batched_tokens=64)
o = llm.generate([%r], SamplingParams(max_tokens=%d, temperature=0.0, ignore_eos=True))[0]
ids = list(o.prompt_token_ids)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
out["hf_model_class"] = type(model).__name__
with torch.no_grad():
    logits = model(torch.tensor([ids])).logits[0, -1]
    ref = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=len(o.token_ids), do_sample=False, min_new_tokens=len(o.token_ids))
out["hf_logits_finite"] = bool(torch.isfinite(logits).all())
out["hf_argmax"] = int(logits.argmax())
out["hf_greedy"] = ref[0, len(ids):].tolist()
out["ours_greedy"] = list(o.token_ids)
""" % (PROMPT, NEW_TOKENS)


def _children(venv: Path, model_dir: Path, cwds: list[Path]) -> list[dict]:
    """The child check from each cwd, run side by side."""
    code = f"BODY = {CHILD_BODY!r}\n{CHILD}"
    procs = [subprocess.Popen([_py(venv), "-c", code, str(model_dir), ",".join(HF_KERNELS_API)], cwd=cwd,
                              env=_env(venv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for cwd in cwds]
    results = []
    for cwd, proc in zip(cwds, procs):
        stdout, stderr = proc.communicate(timeout=400)
        line = next((ln for ln in stdout.splitlines() if ln.startswith("RESULT ")), None)
        assert proc.returncode == 0 and line, f"the install check died from {cwd}:\n{stdout[-2000:]}\n{stderr[-6000:]}"
        results.append(json.loads(line[len("RESULT "):]))
    return results


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One fresh venv over the system site-packages (torch, transformers, HF kernels reused)."""
    import transformers

    root = tmp_path_factory.mktemp("install_venv")
    venv = root / "venv"
    # --without-pip: pip itself comes from the system site-packages and installs into the venv
    # (sys.prefix); saves ensurepip's install.
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
                   check=True, timeout=120)
    probe = _run([_py(venv), "-c", "import importlib.metadata as md, json, sys; print(json.dumps("
                  "{'prefix': sys.prefix, 'transformers': md.version('transformers'), 'kernels': md.version('kernels')}))"],
                 venv, root)
    got = json.loads(probe.stdout)
    assert Path(got["prefix"]).resolve() == venv.resolve()
    # The venv reuses exactly the system's (setup's, i.e. the latest) transformers and HF kernels.
    import importlib.metadata as md

    assert got["transformers"] == transformers.__version__ == md.version("transformers")
    assert got["kernels"] == md.version("kernels"), "HF `kernels` is not installed next to transformers"
    return venv


def _install(venv: Path, *args: str) -> None:
    before = _system_install_state()
    _run([_py(venv), "-m", "pip", "install", "--no-index", "--no-deps", "--no-build-isolation", "-q", *args],
         venv, venv.parent, timeout=600)
    assert _system_install_state() == before, "installing into the venv changed the system's hubdeploy install"


def _check_children(results: list[dict], mode: str, venv: Path, cwds: list[Path]) -> None:
    import importlib.metadata as md

    site = _site_packages(venv)
    for cwd, r in zip(cwds, results):
        where = f"[{mode}, cwd={cwd}]"
        if "kernels_file" not in r:  # `import kernels` itself failed
            pytest.fail(f"{where} Hugging Face's `kernels` does not import:\n{r.get('error')}")
        # HF's `kernels`, not ours: the module file is the one the `kernels` distribution installed.
        assert not _inside(r["kernels_file"], REPO), (
            f"{where} `import kernels` found {r['kernels_file']} inside the repo: our package shadows "
            "Hugging Face's `kernels` (which transformers imports)")
        assert Path(r["kernels_file"]).resolve() == Path(r["kernels_dist_file"]).resolve(), (
            f"{where} `import kernels` gave {r['kernels_file']}, but HF's `kernels` distribution installed "
            f"{r['kernels_dist_file']}: something of ours shadows Hugging Face's `kernels`")
        assert not _inside(r["kernels_file"], site), f"{where} a `kernels` package in the venv: {r['kernels_file']}"
        assert r["kernels_api_missing"] == [], f"{where} HF `kernels` lacks its API: {r['kernels_api_missing']}"
        assert r["kernels_dist_version"] == md.version("kernels")
        assert r["transformers_version"] == r["transformers_dist_version"] == md.version("transformers")
        assert r["transformers_sees_kernels"], f"{where} transformers does not see HF `kernels`"

        assert "error" not in r, f"{where} the install check failed:\n{r['error']}"

        # Our engine, from the venv's own install.
        assert r["LLM_module"].startswith("hubdeploy.serving") and r["SamplingParams_module"].startswith(
            "hubdeploy.serving"), r
        if cwd == REPO:
            # `python -c` puts the cwd first on sys.path, so from the root the source tree is imported
            # (the same code; metadata from the root's hubdeploy.egg-info when there is one). What
            # matters there is that it shadows nothing of anyone else's (HF `kernels`, above).
            assert _inside(r["hubdeploy_file"], REPO / "hubdeploy"), (where, r["hubdeploy_file"])
        else:
            assert Path(r["hubdeploy_dist"]).resolve() == site, (
                f"{where} hubdeploy's metadata comes from {r['hubdeploy_dist']}, not the venv's {site}")
            editable = r["hubdeploy_direct_url"].get("dir_info", {}).get("editable", False)
            assert editable == (mode == "editable"), (where, r["hubdeploy_direct_url"])
            if mode == "wheel":
                assert _inside(r["hubdeploy_file"], site / "hubdeploy"), (
                    f"{where} hubdeploy imported from {r['hubdeploy_file']}, not the venv's wheel install in "
                    f"{site} (the system's editable finder won?)")
            else:
                assert _inside(r["hubdeploy_file"], REPO / "hubdeploy"), (where, r["hubdeploy_file"])
                url = r["hubdeploy_direct_url"]["url"]
                assert Path(url.removeprefix("file://")).resolve() == REPO.resolve(), (where, url)
                assert any(_inside(f, site) for f in r["editable_finders"]), (
                    f"{where} the venv's editable finder is not loaded: {r['editable_finders']}")

        # Package data reachable from the install.
        assert r["n_gpus"] > 0 and all(r["data_ok"].values()), (where, r["data_ok"])

        # transformers loads the make-tiny model and runs it; our engine agrees with it.
        assert r["hf_model_class"] == "MixtralForCausalLM" and r["hf_logits_finite"], (where, r["hf_model_class"])
        assert len(r["ours_greedy"]) == NEW_TOKENS
        assert r["ours_greedy"][0] == r["hf_argmax"], (
            f"{where} engine's first greedy token {r['ours_greedy'][0]} != transformers' argmax {r['hf_argmax']}")
        assert r["ours_greedy"] == r["hf_greedy"], (where, r["ours_greedy"], r["hf_greedy"])


def _make_tiny(venv: Path, out: Path) -> Path:
    # The venv's own console script (its shebang is the venv's python).
    exe = venv / "bin" / "hubdeploy"
    assert exe.is_file(), f"no console script {exe}"
    _run([str(exe), "make-tiny", str(out), "--arch", "mixtral", "--quant", "none"], venv, out.parent)
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    return out


def test_wheel_install(venv: Path, tmp_path: Path) -> None:
    src = _source_tree(tmp_path / "src")
    _install(venv, "--force-reinstall", str(src))  # a real wheel, built by setuptools from the copy

    site = _site_packages(venv)
    # What pip installed, from the venv's own metadata (`pip show -f hubdeploy`).
    proc = _run([_py(venv), "-c", "import importlib.metadata as md, json; d = md.distribution('hubdeploy'); "
                 "print(json.dumps({'at': str(d.locate_file('')), 'files': [str(f) for f in d.files], "
                 "'top': (d.read_text('top_level.txt') or '').split()}))"], venv, tmp_path)
    info = json.loads(proc.stdout)
    assert Path(info["at"]).resolve() == site
    files = info["files"]
    script = (venv / "bin" / "hubdeploy").resolve()
    stray = [f for f in files if not (f.startswith("hubdeploy/") or re.match(r"hubdeploy-[^/]+\.dist-info/", f)
                                      or (site / f).resolve() == script)]
    stray_top = sorted({f.split("/")[0] for f in stray})
    assert stray == [], (f"the wheel installs {len(stray)} files outside hubdeploy/, top-level {stray_top}"
                         + (": `kernels` is Hugging Face's import name (transformers imports it)"
                            if "kernels" in stray_top else ""))
    assert not any(f.startswith(("__editable__", "hubdeploy.pth")) for f in files), "not a real wheel install"
    assert info["top"] in ([], ["hubdeploy"]), f"top-level names: {info['top']}"
    for name in OLD_TOP_LEVEL:
        assert not (site / name).exists(), (
            f"top-level `{name}` in the venv's site-packages: ours would shadow/overwrite another distribution's "
            "(`kernels` is Hugging Face's, imported by transformers)")
        assert not any(f.split("/")[0] == name for f in files), f"the wheel ships a top-level `{name}`"
    others = sorted(p.name for p in site.iterdir() if p.name not in ("hubdeploy", "__pycache__")
                    and not re.fullmatch(r"hubdeploy-[^/]+\.dist-info", p.name))
    assert others == [], f"the venv's site-packages holds more than hubdeploy: {others}"

    # Every file of the source package is in the wheel: modules and data (templates, CSS, gpus.json, ...).
    wanted = sorted(str(p.relative_to(src)) for p in (src / "hubdeploy").rglob("*")
                    if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc")
    missing = sorted(set(wanted) - set(files))
    assert missing == [], f"files of the source package missing from the wheel (package-data?): {missing}"
    for must in ("hubdeploy/templates/model_card.md.j2", "hubdeploy/templates/snippets/openai.py.j2",
                 "hubdeploy/space/style.css", "hubdeploy/hub_integration/gpus.json"):
        assert must in files and (site / must).is_file(), must
    assert any(f.startswith("hubdeploy/templates/") and f.endswith(".j2") for f in files)

    model = _make_tiny(venv, tmp_path / "tiny")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cwds = [REPO, elsewhere]
    _check_children(_children(venv, model, cwds), "wheel", venv, cwds)


def test_editable_install(venv: Path, tmp_path: Path) -> None:
    # Replaces the wheel install in the same venv (pip uninstalls the venv's copy itself).
    _install(venv, "-e", str(REPO))
    site = _site_packages(venv)
    assert not (site / "hubdeploy").exists(), "the wheel's copy is still in the venv after `pip install -e`"
    for name in OLD_TOP_LEVEL:
        assert not (site / name).exists(), f"top-level `{name}` in the venv's site-packages"

    model = _make_tiny(venv, tmp_path / "tiny")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cwds = [REPO, elsewhere]
    _check_children(_children(venv, model, cwds), "editable", venv, cwds)

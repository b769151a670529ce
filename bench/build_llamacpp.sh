#!/usr/bin/env bash
# Build llama-cpp-python from source into a bench-only folder, for the llama.cpp
# peer row of bench/decode.py. lmlab never imports it and never depends on it:
# nothing here touches lmlab's environment or pyproject.
#
#   bench/build_llamacpp.sh            # builds into bench/.llamacpp (minutes, once)
#   LLAMACPP_DIR=/elsewhere bench/build_llamacpp.sh
#   PYTHON=/path/to/venv/bin/python bench/build_llamacpp.sh
#   FORCE=1 bench/build_llamacpp.sh    # rebuild even if it is there
#
# The result is a plain `pip install --target` folder: bench/decode.py puts it at
# the end of sys.path (so lmlab's own numpy etc. win) and imports llama_cpp from it.
# Built with -DGGML_NATIVE=ON (this machine's CPU flags: AVX2/AVX-512/VNNI where
# present), CPU only: no CUDA, no BLAS. Run it on the machine that will run the
# bench: a native build may not start on another CPU.
set -euo pipefail

main() {
  VERSION="0.3.36"   # llama-cpp-python; pinned so every run compares against the same llama.cpp
  HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
  DEST="${LLAMACPP_DIR:-$HERE/.llamacpp}"
  PYTHON="${PYTHON:-python3}"
  STAMP="$DEST/.built-$VERSION"

  if [[ -f "$STAMP" && -z "${FORCE:-}" ]]; then
    echo "llama-cpp-python $VERSION already built in $DEST (FORCE=1 to rebuild)"
    return 0
  fi

  start=$(date +%s)
  if [[ -d "$DEST/llama_cpp_python-$VERSION.dist-info" && -z "${FORCE:-}" ]]; then
    # the compile finished before an interrupted run: only the last steps are missing
    echo "llama-cpp-python $VERSION is compiled in $DEST; finishing the install"
  else
    rm -rf "$DEST"
    mkdir -p "$DEST/src"
    echo "downloading llama-cpp-python==$VERSION (source) into $DEST/src"
    # --no-binary for this package only: its build tools (scikit-build-core) come as wheels
    "$PYTHON" -m pip download --quiet --no-deps --no-binary llama-cpp-python \
      --dest "$DEST/src" "llama-cpp-python==$VERSION"
    sdist="$(ls "$DEST"/src/llama_cpp_python-"$VERSION".tar.gz)"

    echo "building $sdist (C++ compile: several minutes; 40 min on 2 busy cores)"
    # GGML_NATIVE: -march=native. No GPU backends, no BLAS, no server/examples.
    export CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF \
-DGGML_BLAS=OFF -DGGML_OPENMP=ON -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF \
-DLLAMA_BUILD_SERVER=OFF -DCMAKE_BUILD_TYPE=Release"
    export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
    "$PYTHON" -m pip install --no-deps --no-cache-dir --no-binary llama-cpp-python --target "$DEST" "$sdist"
  fi

  # What llama_cpp imports at run time. Installed into the same folder; decode.py
  # appends the folder to sys.path, so versions already in lmlab's env take precedence.
  "$PYTHON" -m pip install --quiet --target "$DEST" --no-deps \
    "numpy>=1.20" "typing-extensions>=4.5" "diskcache>=5.6.1" "jinja2>=2.11.3" "MarkupSafe>=2.0"

  PYTHONPATH="$DEST" "$PYTHON" -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__, 'imports from', llama_cpp.__file__)"
  rm -rf "$DEST/src"
  touch "$STAMP"
  echo "llama-cpp-python $VERSION ready in $DEST ($(( $(date +%s) - start )) s)"
}

# the whole script is parsed before anything runs, so editing it during a build cannot derail that build
main "$@"

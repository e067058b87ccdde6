"""What a one-chat ``kvik generate`` of the bundled model must not hold: the costly imports and maps kept out of it.

transformers' model-loading stack (``transformers.modeling_utils``: torch.distributed.tensor, dynamo and the
rest) costs ~200 MiB of resident memory and ~1.7 s on the 2-core dev machine, more than the model itself; a
memory map of the GGUF kept every page loading read resident (docs/benchmarks.md, issue 20). Checked by
module name and by the resident pages of the file's own maps, in a fresh process.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from kvik.models import default

SCRIPT = """
import json, sys
from kvik.entrypoints import cli
from kvik.models import default
from kvik_gguf.format import GGUFFormat
code = cli.main(["generate", "--device", "cpu", "--chat", "Hi", "--max-tokens", "2"])
resident, in_gguf = 0, False
with open("/proc/self/smaps") as smaps:
    for line in smaps:
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
            in_gguf = fields[-1].endswith(".gguf")
        elif in_gguf and fields[0] == "Rss:":
            resident += int(fields[1]) * 1024
header = min(t.data_offset for t in GGUFFormat(default.default_model()).tensors.values())
print(json.dumps({"code": code, "modules": sorted(sys.modules), "gguf_resident": resident, "header": header}))
"""

# Module prefixes a one-chat run does not need (compile_decode is off by default).
HEAVY = ("transformers.modeling_utils", "transformers.models.llama.modeling_llama", "torch._dynamo", "torch._inductor")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the process's memory maps the Linux way")
def test_a_one_chat_generate_keeps_out_heavy_imports_and_the_gguf_map() -> None:
    try:
        default.default_model()
    except Exception as exc:  # the bundled model's package is not installed here
        pytest.skip(f"the bundled SmolLM2 GGUF is not installed: {exc}")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["code"] == 0
    loaded = [m for m in result["modules"] if m.startswith(HEAVY)]
    assert not loaded, f"kvik generate imported {loaded[:5]}"
    assert "kvik_gguf.format" in result["modules"]  # it did run the bundled GGUF
    # A first start parses the metadata with gguf's reader (a map of the file, kept for its large fields); the
    # tensors' pages (117 MB here, past the header) must never be resident through a map.
    assert result["gguf_resident"] <= result["header"] + (1 << 20), result

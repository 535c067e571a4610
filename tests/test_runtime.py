"""rex.runtime.keep_freed_memory: large blocks are reused from the heap, not faulted in fresh each time."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Allocate and free a 64 MB tensor 20 times (glibc mmaps anything above 32 MB, and unmaps it on free), touching
# every page, and count the minor page faults: ~16k per round with mmap, ~0 once the heap keeps it.
PROBE = """
import json, resource, sys, torch
if sys.argv[1] == "keep":
    from rex.runtime import keep_freed_memory
    assert keep_freed_memory()
for _ in range(10):  # warm-up: the first rounds fault either way (7 here) while the heap settles
    x = torch.ones(16 * 2**20); del x
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    x = torch.ones(16 * 2**20)  # 64 MB, every page written
    del x
print(json.dumps({"faults_per_round": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) / 20}))
"""


def _probe(mode: str, **env) -> float:
    e = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    r = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=300, env=e)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])["faults_per_round"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_large_blocks_are_reused_instead_of_faulted_in_again():
    pages = 64 * 2**20 / os.sysconf("SC_PAGE_SIZE")
    default = _probe("default")
    kept = _probe("keep")
    assert default > 0.5 * pages, f"glibc's default should fault in every page of a fresh mmap ({default:.0f})"
    assert kept < 0.01 * pages, f"freed memory should be reused from the heap ({kept:.0f} faults per round)"


def test_rex_malloc_system_turns_it_off():
    code = "from rex.runtime import keep_freed_memory; print(keep_freed_memory())"
    e = {**os.environ, "PYTHONPATH": str(ROOT), "REX_MALLOC": "system"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=e)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr[-2000:]


def test_results_are_bit_identical_with_and_without_it(tmp_path):
    """Only time moves: a quantized CNN's outputs are the same bits under either allocator setting."""
    code = """
import sys, torch, torchvision, rex
if sys.argv[1] == "keep":
    from rex.runtime import keep_freed_memory
    assert keep_freed_memory()
torch.manual_seed(0); torch.set_num_threads(1)
m = torchvision.models.mobilenet_v2(width_mult=0.5).eval()
q = rex.quantize(m, wbits=4, abits=8, order=2)
x = torch.randn(48, 3, 160, 160)
with torch.no_grad():
    torch.save(q(x), sys.argv[2])
"""
    outs = []
    for mode in ("default", "keep"):
        f = tmp_path / f"{mode}.pt"
        r = subprocess.run([sys.executable, "-c", code, mode, str(f)], capture_output=True, text=True, timeout=600,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert r.returncode == 0, r.stderr[-2000:]
        import torch

        outs.append(torch.load(f, weights_only=True))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_the_record_reads_the_setting_without_changing_it():
    code = ("from rex.runtime import freed_memory_kept as kept, keep_freed_memory as keep; "
            "print(kept(), kept(), keep(), kept())")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0 and r.stdout.split() == ["False", "False", "True", "True"], r.stderr[-2000:]

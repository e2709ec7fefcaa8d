"""The process settings the commands start with (mtl_med.runtime): added only where the user set none, and the
allocator setting does what it is for, keeping freed memory so a repeated large allocation stops page-faulting."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from mtl_med import runtime
from mtl_med.runtime import ALLOCATOR_TUNABLES, tuned_environ

GLIBC = runtime._glibc()

# re-executes itself through reexec_tuned, then allocates and frees 64 MB: where glibc put the block (mallinfo2:
# hblkhd = bytes in mmap regions, fordblks = free bytes kept in the heap) and the page faults of twenty more
PROBE = textwrap.dedent("""
    import ctypes, json, os, resource, sys
    from mtl_med.runtime import reexec_tuned
    reexec_tuned([sys.argv[0]])
    import torch

    class Info(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = Info
    x = torch.ones(16 << 20)
    mapped = libc.mallinfo2().hblkhd
    del x
    kept = libc.mallinfo2().fordblks
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        torch.ones(16 << 20).sum()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    print(json.dumps({"mapped": mapped, "kept": kept, "faults": faults, "tunables": os.environ.get("GLIBC_TUNABLES"),
                      "omp": os.environ.get("OMP_WAIT_POLICY")}))
""")


def test_settings_are_added_only_where_the_user_set_none(monkeypatch):
    env = tuned_environ({"PATH": "/bin"})
    assert env["OMP_WAIT_POLICY"] == "PASSIVE" and env["PATH"] == "/bin"
    assert env.get("GLIBC_TUNABLES") == (ALLOCATOR_TUNABLES if GLIBC else None)
    mine = {"OMP_WAIT_POLICY": "ACTIVE", "GLIBC_TUNABLES": ""}
    assert tuned_environ(mine) == mine  # kept, and the empty value opts out
    monkeypatch.setattr(runtime, "_glibc", lambda: False)
    assert "GLIBC_TUNABLES" not in tuned_environ({})


@pytest.mark.skipif(not GLIBC, reason="the allocator setting is glibc's")
def test_a_command_restarts_once_with_the_allocator_setting_and_stops_page_faulting(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "OMP_WAIT_POLICY", "MTL_MED_TUNED")}
    tuned = json.loads(subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, check=True).stdout)
    plain = json.loads(subprocess.run([sys.executable, str(script)], env={**env, "GLIBC_TUNABLES": ""}, capture_output=True,
                                      text=True, check=True).stdout)
    assert tuned["tunables"] == ALLOCATOR_TUNABLES and tuned["omp"] == "PASSIVE"
    assert plain["tunables"] == "" and plain["omp"] == "PASSIVE"  # opted out of the allocator, not of the wait policy
    # glibc alone maps the 64 MB block and unmaps it when freed, so each one is zero-filled afresh page by page;
    # with the setting it comes from the heap and stays there for the next one
    mb = 1 << 20
    assert plain["mapped"] >= 64 * mb and plain["kept"] < 64 * mb, plain
    assert tuned["mapped"] < mb and tuned["kept"] >= 64 * mb, tuned
    assert plain["faults"] > 20 * 10_000 and tuned["faults"] < plain["faults"] / 2, (tuned, plain)


@pytest.mark.skipif(not GLIBC, reason="the allocator setting is glibc's")
def test_the_activate_lines_set_both_and_keep_the_users_values():
    lines = runtime.activate_lines()

    def shell(env):
        out = subprocess.run(["bash", "-c", lines + 'echo "$OMP_WAIT_POLICY|${GLIBC_TUNABLES-unset}"'], env=env, capture_output=True,
                             text=True, check=True).stdout.strip()
        return out.split("|")

    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    assert shell(base) == ["PASSIVE", ALLOCATOR_TUNABLES]
    assert shell({**base, "OMP_WAIT_POLICY": "ACTIVE", "GLIBC_TUNABLES": ""}) == ["ACTIVE", ""]

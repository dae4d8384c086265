"""flaxvision.host_memory: the huge-page tunable for compute commands, and freed memory returned after compiles."""

import os
import sys

import jax
import jax.numpy as jnp
import pytest

from flaxvision import cli, host_memory

supported = pytest.mark.skipif(host_memory.environment({}) is None, reason="needs Linux, glibc >= 2.35 and THP")


@supported
def test_environment_adds_the_tunable_and_keeps_others():
    added = host_memory.environment({})
    assert added is not None and added["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    env = host_memory.environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "HOME": "/h"})
    assert env == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1", "HOME": "/h"}
    assert host_memory.environment({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None  # the user's choice wins
    assert host_memory.environment({"FLAXVISION_HUGE_PAGES": "0"}) is None


@supported
def test_compute_commands_restart_with_the_tunable(monkeypatch):
    calls = []
    monkeypatch.setattr(os, "execve", lambda path, argv, env: calls.append((path, argv, env)))
    monkeypatch.setattr(sys, "orig_argv", ["/venv/bin/python", "/venv/bin/flaxvision", "bench", "train", "--bogus"])
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv("FLAXVISION_HUGE_PAGES", raising=False)
    host_memory.restart_with_huge_pages()
    assert calls == [(sys.executable, [sys.executable, "/venv/bin/flaxvision", "bench", "train", "--bogus"],
                      {**os.environ, "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"})]  # fmt: skip


def test_only_compute_commands_run_from_the_command_line_restart(monkeypatch):
    restarts = []
    monkeypatch.setattr(host_memory, "restart_with_huge_pages", lambda: restarts.append(True))
    monkeypatch.setattr(sys, "argv", ["flaxvision", "models", "vit_tiny*"])
    assert cli.main() == 0
    assert restarts == []
    assert cli.main(["models", "vit_tiny*"]) == 0  # called from Python: never
    monkeypatch.setattr(sys, "argv", ["flaxvision", "bench", "train", "--steps", "0"])
    assert cli.main() == 2  # the restart comes first, then the command runs (and rejects --steps 0)
    assert restarts == [True]


def test_memory_is_trimmed_after_each_compilation(monkeypatch):
    host_memory.trim_after_compiles()
    host_memory.trim_after_compiles()  # idempotent: one listener
    trims, compiles = [], []
    monkeypatch.setattr(host_memory, "release_free_memory", lambda: trims.append(True))
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration_secs, **kw: compiles.append(event) if event.endswith("backend_compile_duration") else None
    )
    jax.jit(lambda x: jnp.sin(x) * 3.25 + 0.125)(jnp.arange(7.0)).block_until_ready()
    assert len(compiles) >= 1 and len(trims) == len(compiles)  # once per compilation, however often registered

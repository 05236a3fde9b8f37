"""The public surface: ``__all__`` and the module agree, and the contract's names exist."""

from __future__ import annotations

import subprocess
import sys
import types

import bgtasks

CONTRACT = {
    "Runtime",
    "wait_until",
    "background",
    "current_task",
    "Limits",
    "TaskHandle",
    "TaskRecord",
    "TaskStatus",
    "BeforeUnloadEvent",
    "UnhandledRejectionEvent",
    "UnloadReason",
    "BgTasksError",
    "LimitExceeded",
    "WallClockLimitExceeded",
    "CPULimitExceeded",
    "MemoryLimitExceeded",
    "RegistryFull",
    "RuntimeNotActive",
    "StepRecord",
    "step",
}


def test_all_matches_module() -> None:
    public = {
        name
        for name, value in vars(bgtasks).items()
        if not name.startswith("_")
        and (not isinstance(value, types.ModuleType) or name == "step")
        and name != "annotations"
    }
    assert sorted(bgtasks.__all__) == sorted(public)
    for name in bgtasks.__all__:
        assert hasattr(bgtasks, name), name


def test_contract_names_are_exported() -> None:
    assert set(bgtasks.__all__) >= CONTRACT


def test_exception_tree() -> None:
    for exc in (
        bgtasks.WallClockLimitExceeded,
        bgtasks.CPULimitExceeded,
        bgtasks.MemoryLimitExceeded,
    ):
        assert issubclass(exc, bgtasks.LimitExceeded)
    for exc in (bgtasks.LimitExceeded, bgtasks.RegistryFull, bgtasks.RuntimeNotActive):
        assert issubclass(exc, bgtasks.BgTasksError)


def test_import_bgtasks_imports_no_web_framework() -> None:
    code = (
        "import sys, bgtasks; "
        "bad = [m for m in ('fastapi', 'starlette', 'flask', 'werkzeug') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr

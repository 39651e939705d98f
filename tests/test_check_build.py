"""``python -m genrep_fast.check_build``: the installed extension against the per-op device
contract, and the failures it must report (a missing extension, a CUDA build without an op's CUDA
kernel, an op without a contract entry)."""

from __future__ import annotations

import pytest

from genrep_fast import check_build
from genrep_fast.check_build import DEVICE_CONTRACT, contract_problems
from genrep_fast.cli import main as cli_main

CPU_BUILD = {name: ["CPU"] for name in DEVICE_CONTRACT}
CUDA_BUILD = {name: list(devices) for name, devices in DEVICE_CONTRACT.items()}
CUDA_OPS = [name for name, devices in DEVICE_CONTRACT.items() if "CUDA" in devices]
CPU_ONLY_OPS = [name for name, devices in DEVICE_CONTRACT.items() if "CUDA" not in devices]


def test_installed_build_meets_the_contract(capsys):
    assert check_build.main([]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in DEVICE_CONTRACT) and "ok:" in out


def test_inventory_lists_the_declared_ops_only():
    # The Python custom ops of genrep_fast.posterior share the namespace but are not the
    # extension's: they must not appear.
    inventory = check_build.kernel_inventory(check_build.extension_path())
    assert set(inventory) == set(DEVICE_CONTRACT)
    assert all("CPU" in devices for devices in inventory.values())


def test_cli_subcommand(capsys):
    assert cli_main(["check-build"]) == 0
    assert "ok:" in capsys.readouterr().out


def test_missing_extension_fails(monkeypatch, capsys):
    monkeypatch.setattr(check_build, "extension_path", lambda: None)
    assert check_build.main([]) == 1
    assert "genrep_fast._C is not installed" in capsys.readouterr().err


def test_complete_builds_pass():
    assert contract_problems(CPU_BUILD) == []
    assert contract_problems(CUDA_BUILD) == []
    assert contract_problems(CUDA_BUILD, require_cuda=True) == []


def test_cpu_build_fails_when_cuda_is_required():
    (problem,) = contract_problems(CPU_BUILD, require_cuda=True)
    assert "no op has a CUDA kernel" in problem


@pytest.mark.parametrize("name", CUDA_OPS)
def test_cuda_build_without_an_ops_cuda_kernel_fails(name):
    inventory = dict(CUDA_BUILD, **{name: ["CPU"]})
    (problem,) = contract_problems(inventory)
    assert f"genrep_fast::{name} has no CUDA kernel" in problem


@pytest.mark.parametrize("name", CPU_ONLY_OPS)
def test_cuda_kernel_outside_the_contract_fails(name):
    (problem,) = contract_problems(dict(CUDA_BUILD, **{name: ["CPU", "CUDA"]}))
    assert name in problem and "does not list" in problem


def test_op_without_contract_entry_fails():
    (problem,) = contract_problems(dict(CPU_BUILD, new_op=["CPU"]))
    assert "genrep_fast::new_op" in problem and "no entry in DEVICE_CONTRACT" in problem


def test_op_without_cpu_kernel_fails():
    name = next(iter(DEVICE_CONTRACT))
    (problem,) = contract_problems(dict(CPU_BUILD, **{name: []}))
    assert "no CPU kernel" in problem


def test_stale_build_fails():
    name = next(iter(DEVICE_CONTRACT))
    inventory = {k: v for k, v in CPU_BUILD.items() if k != name}
    (problem,) = contract_problems(inventory)
    assert f"genrep_fast::{name} is in DEVICE_CONTRACT" in problem

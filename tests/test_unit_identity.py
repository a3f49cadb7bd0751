"""scanner.vm.identity: per-VM state is keyed by what a VM is, not the name it reports."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from scanner.vm import SourceKind, VmSource, state_key

UUID = "5a1c0ffe-0000-4000-8000-00000000beef"


def _sock(path: Path) -> Path:
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()
    return path


def test_a_socket_is_keyed_by_its_uuid_or_path_and_its_owner(tmp_path: Path) -> None:
    a, b = _sock(tmp_path / "a.sock"), _sock(tmp_path / "b.sock")
    uid = os.getuid()
    assert state_key(str(a), None) == f"qmp:{a}@uid={uid}"
    # The same QEMU -uuid through either socket: one VM, one state.
    assert state_key(str(a), UUID) == state_key(str(b), UUID) == f"uuid:{UUID}@uid={uid}"
    # Discovered or given: the same key (accept, check and run share the state).
    assert state_key(VmSource(SourceKind.DISCOVER, str(a), owner=uid), None) == \
        state_key(VmSource(SourceKind.QMP, str(a)), None)
    # A relative spelling of the same path: the same key.
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        assert state_key("a.sock", None) == state_key(str(a), None)
    finally:
        os.chdir(cwd)
    # Gone (cannot be stat'ed): the discovered owner, if known.
    gone = VmSource(SourceKind.DISCOVER, str(tmp_path / "gone.sock"), owner=4242)
    assert state_key(gone, UUID) == f"uuid:{UUID}@uid=4242"


def test_names_never_reach_a_key(tmp_path: Path) -> None:
    """Whatever a QEMU calls itself, its key is built from its source: a name that looks
    like a key is not one (keys of other kinds have other prefixes)."""
    a = _sock(tmp_path / "victim")
    keys = {state_key(str(a), None), state_key(str(a), UUID),
            state_key(VmSource(SourceKind.LIBVIRT, "victim"), UUID),
            state_key(VmSource(SourceKind.LIBVIRT, "victim", connect="qemu:///system"), None),
            state_key(f"replay:{tmp_path}", None)}
    assert len(keys) == 5 and "victim" not in keys
    assert state_key(VmSource(SourceKind.LIBVIRT, "victim"), UUID) == f"libvirt:{UUID}"
    assert state_key(f"replay:{tmp_path}", None) == f"replay:{tmp_path}"

"""The command line after the split: switches the configuration file turns on can be
turned off on the command line, the configuration merge reads no argparse internals,
and `kscan --contrib-dir` names the shipped files.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from kscan.shipped import CONTRIB_FILES, contrib_dir
from scanner.commands.config import config_keys, parse_with_config, subparser
from scanner.commands.options import Parser
from scanner.commands.parser import build_parser
from scanner.commands.run_policy import run_config
from tests.kscan_proc import kscan

COMMANDS = Path(__file__).resolve().parent.parent / "scanner" / "commands"


@pytest.mark.parametrize("switch", ["strict", "discover", "libvirt", "verbose", "quiet"])
def test_a_switch_the_file_sets_the_command_line_unsets(tmp_path: Path, switch: str) -> None:
    conf = tmp_path / "k.toml"
    conf.write_text(f'qmp = ["/run/x.sock"]\n{switch} = true\n')
    on = parse_with_config(build_parser, ["run", "--config", str(conf)])
    assert getattr(on, switch) is True
    off = parse_with_config(build_parser, ["run", "--config", str(conf), f"--no-{switch}"])
    assert getattr(off, switch) is False
    # Neither in the file nor on the command line: off.
    none = parse_with_config(build_parser, ["run", "--config", "", "--qmp", "/run/x.sock"])
    assert not getattr(none, switch)


def test_no_strict_reaches_the_run_config(tmp_path: Path) -> None:
    conf = tmp_path / "k.toml"
    conf.write_text(f'qmp = ["/run/x.sock"]\nstrict = true\ndiscover = true\n'
                    f'db = "{tmp_path / "k.db"}"\n')
    cfg = run_config(parse_with_config(build_parser, ["run", "--config", str(conf)]))
    assert cfg.strict is True and cfg.discover is True
    cfg = run_config(parse_with_config(
        build_parser, ["run", "--config", str(conf), "--no-strict", "--no-discover"]))
    assert cfg.strict is False and cfg.discover is False


def test_parser_records_commands_and_options() -> None:
    ap = build_parser()
    assert isinstance(ap, Parser)
    assert {"inspect", "profile", "baseline", "check", "accept", "status", "events",
            "export", "import", "run"} <= set(ap.commands)
    run = subparser(ap, "run")
    keys = config_keys(run)
    assert keys["qmp"].kind == "append" and keys["strict"].kind == "boolean"
    assert "config" not in keys and "check_config" not in keys and "help" not in keys
    # -v/-q reach every command, nested ones included (kscan baseline rm -q).
    for name, sub in ap.commands.items():
        assert {"verbose", "quiet"} <= set(sub.options), name
    assert {"verbose", "quiet"} <= set(ap.commands["baseline"].commands["rm"].options)


def test_commands_read_no_argparse_internals() -> None:
    """The configuration merge and the -v/-q pass use Parser's own records: no
    `parser._actions`, no `argparse._SubParsersAction` and the like."""
    for path in sorted(COMMANDS.glob("*.py")):
        tree = ast.parse(path.read_text())
        private = [f"{path.name}:{node.lineno}: .{node.attr}" for node in ast.walk(tree)
                   if isinstance(node, ast.Attribute) and node.attr.startswith("_")
                   and not node.attr.startswith("__")
                   and (node.attr in {"_actions", "_option_string_actions", "_subparsers"}
                        or (isinstance(node.value, ast.Name) and node.value.id == "argparse"))]
        assert not private, private


def test_contrib_dir_prints_where_the_shipped_files_are() -> None:
    res = kscan("--contrib-dir", timeout=60)
    assert res.returncode == 0, res.stderr
    where = Path(res.stdout.strip())
    assert where == contrib_dir()
    assert all((where / name).is_file() for name in CONTRIB_FILES)
    res = kscan("--help", timeout=60)
    assert "--contrib-dir" in res.stdout


def test_report_text_names_every_change_and_escapes_the_guest(capsys: pytest.CaptureFixture[str]
                                                              ) -> None:
    """`check`'s text (commands.render): verdict, regions, each changed page with its
    symbol and byte ranges, findings; what came from the guest (the VM's name, a symbol)
    cannot move the cursor or start a line of its own."""
    from scanner.check.classify import ByteRange
    from scanner.check.verify import Basis, CheckReport, Finding, PageMismatch, RegionVerdict
    from scanner.commands.render import print_lines, report_lines

    evil = "vm7\x1b[2J\nvm8: clean"
    m = PageMismatch(".text", 5, 0xffffffff81005000, 0x1005000, Basis.GOLDEN,
                     (ByteRange(0x10, 0x15, "0f1f440000", "e8aabbccdd", "nop -> call"),),
                     "capable+0x10\x1b[1m")
    rep = CheckReport(vm=evil, build_id="3b43", release="6.1.0-56-cloud-amd64",
                      boot_profile="q/a", slide=0x1e000000,
                      regions=(RegionVerdict(".text", 4096 * 8, 8, (), (6,), (m,)),
                               RegionVerdict(".rodata", 4096 * 2, 2, (1,), (), ())),
                      findings=(Finding("cr0_wp", "vCPU 0: CR0.WP is clear"),),
                      per_vm_baseline_taken=False)
    lines = report_lines(rep)
    assert "TAMPERED" in lines[0] and "slide 0x1e000000" in lines[0]
    assert any("-> 1 CHANGED" in ln and ".text" in ln and "7 golden-checked" in ln
               and "1 accepted" in ln for ln in lines)
    assert any(".rodata" in ln and "1 per-boot [1]" in ln and ln.endswith("ok")
               for ln in lines)
    assert any("va 0xffffffff81005000 gpa 0x1005000 (golden) capable+0x10" in ln
               for ln in lines)
    assert any("bytes 0x10-0x15: 0f1f440000 -> e8aabbccdd  [nop -> call]" in ln
               for ln in lines)
    assert lines[-1] == "  FINDING cr0_wp: vCPU 0: CR0.WP is clear"
    print_lines(lines)
    out = capsys.readouterr().out
    assert "\x1b" not in out and len(out.splitlines()) == len(lines)
    assert not any(ln.startswith("vm8") for ln in out.splitlines())

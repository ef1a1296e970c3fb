"""The command line's argument handling, in process (argparse fails before any model is loaded): every
command's --help exits 0, and numbers that must be positive are refused naming the flag and the value."""
from __future__ import annotations

import pytest

from fusec.cli import main

HELP = [["dump"], ["demo"], ["models"], ["rdu"], ["explain"], ["check"], ["cache"], ["bench"],
        ["bench", "generate"], ["coe"], ["coe", "bench"]]


def run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("command", HELP, ids=" ".join)
def test_every_command_help_exits_0(command, capsys):
    assert run([*command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: fusec {' '.join(command)}")


def test_bench_help_shows_the_block_to_run_and_the_generation_benchmark(capsys):
    """`fusec bench --help` is the block benchmark's own parser: its usage names the block argument the
    command takes (`llama-block[:PRESET]`, which --preset alone does not say) and points to `bench generate`."""
    assert run(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: fusec bench [llama-block[:PRESET]]"), out
    assert "fusec bench generate --help" in " ".join(out.split())


def test_every_argument_of_every_command_says_what_it_is():
    """`fusec COMMAND --help` is where a newcomer looks: no argument is listed without a line of help."""
    import argparse

    from fusec.cli import build_parser
    bare = [f"{name} {action.option_strings or action.dest}" for name, sub in build_parser().commands.items()
            for action in sub._actions if not isinstance(action, argparse._HelpAction) and not action.help]
    assert not bare, f"arguments without help: {bare}"


def test_coe_without_an_action_names_the_actions(capsys):
    assert run(["coe"]) == 2
    assert "bench" in capsys.readouterr().err


@pytest.mark.parametrize("argv, flag, value", [
    (["rdu", "llama-block", "--seq-len", "0"], "--seq-len", "0"),
    (["rdu", "llama-block", "--layers", "0"], "--layers", "0"),
    (["rdu", "llama-block", "--tp", "-2"], "--tp", "-2"),
    (["rdu", "llama-block", "--decode", "--past", "-1"], "--past", "-1"),
    (["rdu", "llama-block", "--layers", "two"], "--layers", "'two'"),
    (["dump", "llama-block", "--seq-len", "-3"], "--seq-len", "-3"),
    (["explain", "llama-block", "--seq-len", "0"], "--seq-len", "0"),
    (["check", "llama-block", "--seq-len", "0"], "--seq-len", "0"),
    (["check", "llama-block", "--tol", "-1"], "--tol", "-1"),
    (["check", "llama-block", "--tol", "nan"], "--tol", "nan"),
    (["bench", "llama-block:tiny", "--repeat", "0"], "--repeat", "0"),
    (["bench", "generate", "tiny", "--new-tokens", "0"], "--new-tokens", "0"),
    (["coe", "bench", "--experts", "0"], "--experts", "0")])
def test_numbers_out_of_range_are_argument_errors_naming_the_flag_and_value(argv, flag, value, capsys):
    assert run(argv) == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and f"given {value}" in err, err

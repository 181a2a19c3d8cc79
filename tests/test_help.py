"""Every option of every command says what it does and, where it takes a value, its default;
``rhbatch --help`` lists the exit codes."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from pipeline.cli import cli


def commands() -> list[tuple[str, click.Command]]:
    ctx = click.Context(cli)
    found = [("rhbatch", cli)]
    for name in cli.list_commands(ctx):  # sim too: it is loaded when asked for
        command = cli.get_command(ctx, name)
        assert command is not None, name
        found.append((f"rhbatch {name}", command))
    return found


OPTIONS = [(name, option) for name, command in commands() for option in command.params
           if isinstance(option, click.Option)]


def test_every_command_is_covered():
    names = {name for name, _ in commands()}
    assert {"rhbatch validate", "rhbatch run", "rhbatch retry", "rhbatch sweep",
            "rhbatch sim", "rhbatch demo"} <= names
    assert len(OPTIONS) > 60


@pytest.mark.parametrize(("command", "option"), OPTIONS,
                         ids=[f"{c}:{o.opts[-1]}" for c, o in OPTIONS])
def test_every_option_has_help_naming_its_default(command: str, option: click.Option):
    flag = "/".join(option.opts)
    assert option.help and option.help.strip(), f"{command} {flag} has no help text"
    if option.is_flag or option.required or option.hidden:
        return  # a flag is off unless given; a required option has no default
    assert option.show_default or "default" in option.help.lower(), (
        f"{command} {flag}: say what happens without it, e.g. (default: 5)")


def test_help_lists_the_exit_codes():
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    assert (
        "  Exit codes:\n"
        "    0  every row succeeded\n"
        "    1  some rows failed or are unknown\n"
        "    2  bad input or usage\n"
        "    3  stopped: credentials, balance, budget, interrupt, outage; resumable\n"
    ) in result.output


def test_every_command_help_renders():
    for name, _ in commands():
        args = name.split()[1:] + ["--help"]
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, (name, result.output)
        assert "Usage: " in result.output

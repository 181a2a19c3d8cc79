"""``rhbatch sim``: run the simulator in the foreground until Ctrl-C."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.errors import ConfigError

DEFAULT_PORT = 8765
DEFAULT_HOST = "127.0.0.1"


class BadInput(click.ClickException):
    """A bad config, option or address: "Error: ..." on stderr and exit code 2 (bad input or usage)."""

    exit_code = 2


@click.command("sim")
@click.option("--port", type=int, default=DEFAULT_PORT, show_default=True, help="TCP port (0 = any free).")
@click.option("--host", default=DEFAULT_HOST, show_default=True, help="Address to listen on.")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Simulator config (YAML or JSON) (default: none: any well-formed 32-character "
                   "key is accepted as a NORMAL account with concurrency 1).")
@click.option("--time-scale", type=float,
              help="Simulated seconds per real second (default: the config's, else 1).")
@click.option("--seed", type=int, help="Seed for every random draw (default: the config's, else 0).")
def sim_command(port: int, host: str, config_path: Path | None, time_scale: float | None,
                seed: int | None) -> None:
    """Run a local RunningHub simulator (faithful API, switchable faults)."""
    from pipeline.sim import SimConfig, Simulator

    try:
        config = SimConfig.from_file(config_path) if config_path else SimConfig(open_accounts=True)
        if time_scale is not None:
            config.time_scale = time_scale
        if seed is not None:
            config.seed = seed
        config.validate()
        simulator = Simulator(config)
    except ConfigError as exc:
        raise BadInput(str(exc)) from None

    def ready(url: str) -> None:
        click.echo(f"RunningHub simulator listening on {url}")

    try:
        simulator.serve_forever(host, port, ready=ready)
    except OSError as exc:
        raise BadInput(f"cannot listen on {host}:{port}: {exc.strerror or exc}: pass another --port "
                       "or --host") from None

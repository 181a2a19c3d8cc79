"""``python -m pipeline.sim``: the same as ``rhbatch sim``."""

from pipeline.sim.cli import sim_command

if __name__ == "__main__":
    sim_command(prog_name="python -m pipeline.sim")

"""The `gem3d` command line. Sub-commands are imported on first use so that
`gem3d --help` stays fast and a command's heavy imports (torch) load only when needed.

The thread pools are sized (gem3d.threads) while the options are parsed, before a sub-command's
module (numpy) or torch loads."""
from __future__ import annotations

import importlib

import click

from gem3d import threads as threads_lib

# command name -> "module:attribute" of a click command or group
COMMANDS = {
    "phantom": "gem3d.commands.phantom:phantom",
    "dataset": "gem3d.commands.dataset:dataset",
    "edit-mask": "gem3d.commands.edit_mask:edit_mask",
    "generate": "gem3d.commands.generate:generate",
    "worker": "gem3d.commands.generate:worker",
    "serve": "gem3d.commands.serve:serve",
    "enhance": "gem3d.commands.dataset_generation:enhance",
    "harmonise": "gem3d.commands.dataset_generation:harmonize",
    "demo": "gem3d.commands.demo:demo",
    "train": "gem3d.commands.train:train",
    "bundle": "gem3d.commands.bundle:bundle",
    "import-official": "gem3d.commands.official:import_official",
    "evaluate": "gem3d.commands.evaluate:evaluate",
}
ALIASES = {"harmonize": "harmonise"}  # earlier spellings: still accepted, not listed


def _set_threads(ctx, param, value):
    """Group level: always (the default policy when not given). Command level: only when given."""
    from_env = ctx.get_parameter_source(param.name) == click.core.ParameterSource.ENVIRONMENT
    if value is None and ctx.parent is not None:
        return
    try:
        threads_lib.configure(threads_lib.parse(value, threads_lib.ENV if from_env else "--threads"))
    except threads_lib.ThreadsError as err:
        raise click.ClickException(str(err)) from None


def threads_option(envvar=None):
    return click.option("--threads", envvar=envvar, expose_value=False, callback=_set_threads, metavar="N|auto",
                        help="Threads per process (per device for serve); default: the free cores "
                             f"(README, 'Threads'). Environment: {threads_lib.ENV}.")


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        name = ALIASES.get(name, name)
        if name not in COMMANDS:
            return None
        module, attribute = COMMANDS[name].split(":")
        return getattr(importlib.import_module(module), attribute)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="gem3d")
@threads_option(envvar=threads_lib.ENV)
def main():
    """GEM-3D: synthesise 3D medical volumes from a mask and one informed slice."""


if __name__ == "__main__":
    main()

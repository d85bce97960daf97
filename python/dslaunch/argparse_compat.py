"""An ``ArgumentParser`` that can grow dslaunch-only options without changing DeepSpeed's CLI.

argparse accepts unambiguous prefixes of long options (``--num_gpu 2``, ``--e logs``).
Adding an option can turn a prefix that used to be unique into an ambiguous one: with
``--enable_elastic_training`` added, launch.py's ``--e`` would stop meaning
``--enable_each_rank_log``. Options registered with ``add_extension`` therefore only take
part in prefix matching when no DeepSpeed option matches the prefix, so every command line
DeepSpeed accepts parses identically, and every prefix error reads the same.
"""

from __future__ import annotations

import argparse

TYPE_CHECKING = False  # not `typing.TYPE_CHECKING`: importing typing costs the CLI start-up time
if TYPE_CHECKING:
    from typing import Any

__all__ = ['CompatArgumentParser']


class CompatArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` plus ``add_extension`` for options DeepSpeed does not have."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._extension_actions: set[argparse.Action] = set()
        self._adding = False  # inside add_argument: see _get_formatter
        super().__init__(*args, **kwargs)

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        self._adding = True
        try:
            return super().add_argument(*args, **kwargs)
        finally:
            self._adding = False

    def _get_formatter(self) -> argparse.HelpFormatter:  # argparse internal hook
        # add_argument makes a formatter for every option only to check its metavar; a default
        # formatter asks for the terminal's width, which imports shutil (2 ms of every start).
        # The width plays no part in that check; help and usage get the real one.
        if self._adding:  # our parsers use argparse's own formatter classes: all take a width
            return self.formatter_class(prog=self.prog, width=80)  # type: ignore[call-arg]
        return super()._get_formatter()

    def add_extension(self, *names: str, **kwargs: Any) -> argparse.Action:
        """Add an option that must never shadow a DeepSpeed option's abbreviations."""
        action = self.add_argument(*names, **kwargs)
        self._extension_actions.add(action)
        return action

    def add_job_extensions(self) -> None:
        """The dslaunch options the runner and the per-node launcher share (the runner forwards them)."""
        self.add_extension(
            '--grace_period', type=float, default=30.0, help='Seconds between SIGTERM and SIGKILL when tearing ranks down.'
        )
        self.add_extension('--raw_output', action='store_true', help='Do not prefix output lines with the rank.')
        self.add_extension(
            '--console_ranks',
            type=str,
            default=None,
            help='Ranks whose output reaches the console, e.g. 0 or 0,2-3; none: no rank; unset: all.',
        )
        self.add_extension('--report_json', type=str, default=None, help='Write the machine-readable job report here.')
        self.add_extension(
            '--hang_timeout',
            type=float,
            default=0.0,
            help="Report a hang (every rank's last line, state, CPU time and Python stack) when no rank "
            'wrote output for this many seconds (0: off). See docs/observability.md.',
        )
        self.add_extension(
            '--hang_action',
            choices=['stop', 'report'],
            default='stop',
            help='After a hang report: stop the job (exit status 124) or let it go on.',
        )
        self.add_extension(
            '--collapse',
            choices=['auto', 'on', 'off'],
            default='auto',
            help='Print identical lines of several ranks once, as [0-6,8-15]: line (auto: on a terminal).',
        )
        self.add_extension(
            '--collapse_window',
            type=float,
            default=0.25,
            help='Seconds a console line waits for other ranks to print the same (with --collapse).',
        )
        self.add_extension(
            '--status_line',
            choices=['auto', 'off'],
            default='auto',
            help='A live status line (ranks running/exited/failed, elapsed time) below the output on a terminal.',
        )

    def _parse_optional(self, arg_string: str) -> Any:  # argparse internal hook
        # `--report_json=a b` spells a dslaunch option exactly, and argparse would take it before
        # any prefix matching. DeepSpeed, which has no such option, takes a word with a space as a
        # positional (the script, or the previous option's value): so does this parser.
        name, eq, _ = arg_string.partition('=')
        if eq and ' ' in arg_string and self._option_string_actions.get(name) in self._extension_actions:
            return None
        return super()._parse_optional(arg_string)

    def _get_option_tuples(self, option_string: str) -> list[Any]:  # argparse internal hook
        matches = super()._get_option_tuples(option_string)
        native = [m for m in matches if m[0] not in self._extension_actions]
        if native:
            return native
        # Only dslaunch options match. argparse classifies every argument before parsing, the
        # user script's arguments included, and an ambiguous prefix is an error there: DeepSpeed,
        # which knows none of these options, takes such an argument as an unknown option (or, with
        # a space in it, as a positional). So `deepspeed train.py --c cfg` still reaches the
        # script, and `-H '--d=1 x'` is still a value. Only a unique, space-free prefix selects
        # an extension.
        if len(matches) > 1 or ' ' in option_string:
            return []
        return matches


#: The observability options of `add_job_extensions` and their defaults (forwarded only when changed).
OBSERVABILITY_DEFAULTS: dict[str, object] = {
    'hang_timeout': 0.0,
    'hang_action': 'stop',
    'collapse': 'auto',
    'collapse_window': 0.25,
    'status_line': 'auto',
}


def job_extension_flags(args: argparse.Namespace) -> list[str]:
    """The observability options of a runner's `args` as per-node launcher flags, only those set
    to something other than the default (so default commands stay DeepSpeed's)."""
    flags: list[str] = []
    for name, default in OBSERVABILITY_DEFAULTS.items():
        value = getattr(args, name, default)
        if value != default:
            flags.append(f'--{name}={value}')
    return flags

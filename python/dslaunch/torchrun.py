"""`dslaunch-torchrun` (or `python -m dslaunch.torchrun`): a drop-in for `torchrun`
(`python -m torch.distributed.run`).

The torch front end of `dslaunch` is `torch.distributed.launch`'s, which passes `--local-rank=N` to
the script unless `--use-env`; torchrun never passes it. This entry is that front end with
`--use-env` on, so `torchrun ...` becomes `dslaunch-torchrun ...` with nothing else changed.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False  # not `typing.TYPE_CHECKING`: importing typing costs the CLI start-up time
if TYPE_CHECKING:
    from typing import NoReturn


def main() -> NoReturn:
    from dslaunch.cli import main as cli_main

    sys.argv[1:1] = ['--use-env']  # torchrun's workers read LOCAL_RANK from the environment
    cli_main(torch_cli=True)


if __name__ == '__main__':
    main()

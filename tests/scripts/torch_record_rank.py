"""A rank whose entry point is wrapped in torch's `@record`: rank $FAIL_RANK raises, and `@record`
writes the exception to $TORCHELASTIC_ERROR_FILE (what torchrun reads to name the root cause)."""

import os

from torch.distributed.elastic.multiprocessing.errors import record


@record
def main() -> None:
    if os.environ['RANK'] == os.environ.get('FAIL_RANK'):
        raise RuntimeError(f'rank {os.environ["RANK"]} gives up')


if __name__ == '__main__':
    main()

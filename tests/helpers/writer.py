"""A rank that writes a known stream of lines, and the functions that say what it wrote.

    writer.py MODE RANK NLINES

MODE:
  print  Python print() to a block-buffered stdout (flushes cut lines at 8 KiB boundaries) and
         to a line-buffered stderr every 10th line (lines below PIPE_BUF); all newline-terminated.
  raw    one os.write() per line (mixed sizes up to ~60 KB), the last line without a newline,
         then os._exit() at once: nothing may be lost when a rank writes and exits.
The same lines can come from the shell (`sh_command`, a printf loop, stdout and stderr) and from
awk (`awk_command`, stdio-buffered writes that cut lines anywhere, no final newline).
`expected(mode, rank, n)` returns (stdout bytes, stderr bytes) exactly as written.
"""

from __future__ import annotations

import os
import sys


def _size(rank: int, i: int) -> int:
    if i % 97 == 13:
        return 20_000 + (rank * 7919 + i * 131) % 40_000  # beyond PIPE_BUF: split writes
    return (rank * 7919 + i * 104_729) % 1500


def line(rank: int, stream: str, i: int) -> str:
    # stderr lines stay below PIPE_BUF: each is one atomic pipe write, never split by a read, so
    # a test can cut them out of the merged log file and find stdout intact.
    size = _size(rank, i) if stream == 'o' else _size(rank, i) % 1500
    return f'R{rank} {stream} L{i} ' + chr(ord('a') + (rank + i) % 26) * size


def sh_line(rank: int, stream: str, i: int) -> str:
    return f'R{rank} {stream} L{i} ' + 'x' * (i % 50)


def awk_line(rank: int, i: int) -> str:
    return f'R{rank} o L{i} ' + 'y' * ((i * 37) % 300)


def expected(mode: str, rank: int, n: int) -> tuple[bytes, bytes]:
    if mode == 'print':
        out = ''.join(line(rank, 'o', i) + '\n' for i in range(n))
        err = ''.join(line(rank, 'e', i) + '\n' for i in range(0, n, 10))
    elif mode == 'raw':
        out = '\n'.join(line(rank, 'o', i) for i in range(n))
        err = ''
    elif mode == 'sh':
        out = ''.join(sh_line(rank, 'o', i) + '\n' for i in range(n))
        err = ''.join(sh_line(rank, 'e', i) + '\n' for i in range(0, n, 10))
    elif mode == 'awk':
        out = '\n'.join(awk_line(rank, i) for i in range(n))
        err = ''
    else:
        raise ValueError(mode)
    return out.encode(), err.encode()


def sh_command(rank: int, n: int) -> list[str]:
    script = (
        'i=0; pad=""; while [ $i -lt $N ]; do '
        '  printf "R%s o L%s %s\\n" $R $i "$pad"; '
        '  [ $((i % 10)) -eq 0 ] && printf "R%s e L%s %s\\n" $R $i "$pad" >&2; '
        '  i=$((i+1)); pad="${pad}x"; [ $((i % 50)) -eq 0 ] && pad=""; '
        'done'
    )
    return ['/bin/sh', '-c', script.replace('$N', str(n)).replace('$R', str(rank))]


def awk_command(rank: int, n: int) -> list[str]:
    prog = (
        'BEGIN { for (i = 0; i < n; i++) { if (i) printf "\\n"; printf "R%d o L%d ", r, i;'
        ' for (j = 0; j < (i * 37) % 300; j++) printf "y" } }'
    )
    return ['awk', '-v', f'r={rank}', '-v', f'n={n}', prog]


def main() -> None:
    mode, rank, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    if mode == 'print':
        # Explicit buffering: PYTHONUNBUFFERED in the environment must not change what is tested.
        out = open(1, 'w', buffering=8192, closefd=False)  # noqa: SIM115
        err = open(2, 'w', buffering=1, closefd=False)  # noqa: SIM115
        for i in range(n):
            print(line(rank, 'o', i), file=out)
            if i % 10 == 0:
                print(line(rank, 'e', i), file=err)
        out.flush()
    elif mode == 'raw':
        for i in range(n):
            data = (line(rank, 'o', i) + ('\n' if i < n - 1 else '')).encode()
            while data:
                data = data[os.write(1, data) :]
        os._exit(0)
    else:
        raise SystemExit(f'unknown mode {mode}')


if __name__ == '__main__':
    main()

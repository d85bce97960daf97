"""A rank that writes its checksummed lines with print() (Python's own stdout buffering).

Same line format as rankprog.c: "R<rank:04> S<seq:07> <74 filler chars> X<crc32:08x>".
"""

import os
import sys
import zlib

rank = int(os.environ.get('LOCAL_RANK', os.environ.get('RANK', '0')))
lines = int(sys.argv[1])
alpha = 'abcdefghijklmnopqrstuvwxyz' * 4
for seq in range(lines):
    k = (rank + seq) % 26
    body = f'R{rank:04d} S{seq:07d} {alpha[k : k + 74]}'
    print(f'{body} X{zlib.crc32(body.encode()):08x}')

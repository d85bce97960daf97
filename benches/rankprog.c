/* The rank programs of the benchmark, compiled by the harness at bench time. Every launcher
 * runs the same binary, so the rank side costs the same for all of them.
 *
 *   rankprog fail K DELAY_S CODE TSFILE  rank K (by LOCAL_RANK) sleeps DELAY_S, writes its
 *                                        CLOCK_MONOTONIC exit time to TSFILE, exits CODE;
 *                                        every other rank waits for a signal
 *   rankprog tree                        forks a grandchild (same group); both wait for a signal
 *   rankprog sleep S                     sleeps S seconds, exits 0
 *   rankprog write KIND LINES            writes LINES checksummed 100-byte lines to stdout:
 *                                        KIND line: one write(2) per line;
 *                                        KIND stdio: fwrite through a 64 KiB full buffer
 *
 * A line is "R<rank:04> S<seq:07> <74 filler chars> X<crc32:08x>\n" (100 bytes), the CRC-32
 * (zlib's) over the first 89 bytes, so a checker can tell a lost line from a torn one.
 * Every waiting process gives up after 600 s (alarm), so nothing outlives a broken trial long.
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static uint32_t crc_table[256];

static void crc_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[i] = c;
    }
}

static uint32_t crc32(const char *p, size_t n) {
    uint32_t c = 0xFFFFFFFFu;
    while (n--) c = crc_table[(c ^ (uint8_t)*p++) & 0xFF] ^ (c >> 8);
    return c ^ 0xFFFFFFFFu;
}

/* Builds line `seq` of `rank` into out (100 bytes, newline included). */
static void make_line(char *out, int rank, long seq) {
    int n = snprintf(out, 16, "R%04d S%07ld ", rank, seq);
    for (int j = 0; j < 74; j++) out[n + j] = (char)('a' + (rank + seq + j) % 26);
    uint32_t c = crc32(out, 89);
    snprintf(out + 89, 12, " X%08x\n", c);
}

static int local_rank(void) {
    const char *s = getenv("LOCAL_RANK");
    if (!s) s = getenv("RANK");
    return s ? atoi(s) : 0;
}

static void wait_forever(void) {
    alarm(600);
    for (;;) pause();
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: rankprog fail|tree|sleep|write ...\n");
        return 2;
    }
    const char *mode = argv[1];
    if (!strcmp(mode, "fail") && argc >= 6) {
        if (local_rank() != atoi(argv[2])) wait_forever();
        double d = atof(argv[3]);
        struct timespec ts = {(time_t)d, (long)((d - (time_t)d) * 1e9)};
        nanosleep(&ts, NULL);
        struct timespec now;
        clock_gettime(CLOCK_MONOTONIC, &now);
        FILE *f = fopen(argv[5], "w");
        if (f) {
            fprintf(f, "%ld.%09ld\n", (long)now.tv_sec, now.tv_nsec);
            fclose(f);
        }
        _exit(atoi(argv[4]));
    }
    if (!strcmp(mode, "tree")) {
        if (fork() == 0) wait_forever();
        wait_forever();
    }
    if (!strcmp(mode, "sleep") && argc >= 3) {
        double d = atof(argv[2]);
        struct timespec ts = {(time_t)d, (long)((d - (time_t)d) * 1e9)};
        nanosleep(&ts, NULL);
        return 0;
    }
    if (!strcmp(mode, "write") && argc >= 4) {
        crc_init();
        int rank = local_rank();
        long lines = atol(argv[3]);
        char line[112];
        if (!strcmp(argv[2], "line")) {
            for (long s = 0; s < lines; s++) {
                make_line(line, rank, s);
                size_t off = 0;
                while (off < 100) {
                    ssize_t w = write(1, line + off, 100 - off);
                    if (w < 0) return 1;
                    off += (size_t)w;
                }
            }
            return 0;
        }
        if (!strcmp(argv[2], "stdio")) {
            static char vbuf[65536];
            setvbuf(stdout, vbuf, _IOFBF, sizeof vbuf);
            for (long s = 0; s < lines; s++) {
                make_line(line, rank, s);
                fwrite(line, 1, 100, stdout);
            }
            return fflush(stdout) ? 1 : 0;
        }
    }
    fprintf(stderr, "rankprog: bad arguments\n");
    return 2;
}

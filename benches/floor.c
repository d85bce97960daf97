/* The floor: the least a launcher can do, compiled by the harness at bench time.
 *
 *   floor [--mux] [--prefix] N prog [args...]
 *
 * posix_spawnp()s N copies of prog, each in its own process group, with RANK, LOCAL_RANK,
 * WORLD_SIZE and LOCAL_SIZE set; takes SIGCHLD/SIGTERM/SIGINT/SIGHUP through a signalfd and
 * reaps with waitpid(WNOHANG) from one epoll loop. Fail fast: the first rank to exit non-zero
 * (or die by a signal) makes it SIGTERM every other rank's group, reap them all and exit with
 * the failing rank's status (128+N for a signal). A SIGTERM/SIGINT/SIGHUP to the floor is sent
 * to every rank's group; once all are reaped it exits with 128+sig: the kill-and-reap floor.
 *
 * --mux: each rank's stdout+stderr is a pipe; complete lines are reassembled per rank and
 * written to our stdout with a "[rank]: " prefix (--mux alone: no prefix), never interleaving
 * two ranks' lines: the log-multiplexing floor. Without --mux ranks inherit our stdout/stderr.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/signalfd.h>
#include <sys/wait.h>
#include <unistd.h>

extern char **environ;

#define RBUF (256 * 1024)
#define OBUF (256 * 1024)

struct rank {
    pid_t pid;
    int alive;
    int fd;         /* read end of the rank's pipe, -1 once at EOF */
    char *buf;      /* partial line */
    size_t len;
    char prefix[24];
    size_t plen;
};

static char obuf[OBUF];
static size_t olen;

static void die(const char *what) {
    perror(what);
    exit(125);
}

static void oflush(void) {
    size_t off = 0;
    while (off < olen) {
        ssize_t n = write(1, obuf + off, olen - off);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("write");
        }
        off += (size_t)n;
    }
    olen = 0;
}

static void oput(const char *p, size_t n) {
    if (olen + n > OBUF) oflush();
    if (n > OBUF) {
        olen = 0;
        while (n) {
            ssize_t w = write(1, p, n);
            if (w < 0) {
                if (errno == EINTR) continue;
                die("write");
            }
            p += w;
            n -= (size_t)w;
        }
        return;
    }
    memcpy(obuf + olen, p, n);
    olen += n;
}

/* Emits every complete line of r's buffer; at EOF (final) the rest too, newline-terminated. */
static void drain_lines(struct rank *r, int final) {
    size_t start = 0;
    for (;;) {
        char *nl = memchr(r->buf + start, '\n', r->len - start);
        if (!nl) break;
        size_t end = (size_t)(nl - r->buf) + 1;
        oput(r->prefix, r->plen);
        oput(r->buf + start, end - start);
        start = end;
    }
    if ((final || r->len - start == RBUF) && r->len > start) {
        oput(r->prefix, r->plen);
        oput(r->buf + start, r->len - start);
        oput("\n", 1);
        start = r->len;
    }
    if (start) {
        memmove(r->buf, r->buf + start, r->len - start);
        r->len -= start;
    }
}

int main(int argc, char **argv) {
    int mux = 0, prefix = 0, a = 1;
    while (a < argc && strncmp(argv[a], "--", 2) == 0) {
        if (!strcmp(argv[a], "--mux")) mux = 1;
        else if (!strcmp(argv[a], "--prefix")) prefix = 1;
        else {
            fprintf(stderr, "floor: unknown flag %s\n", argv[a]);
            return 2;
        }
        a++;
    }
    if (argc - a < 2) {
        fprintf(stderr, "usage: floor [--mux] [--prefix] N prog [args...]\n");
        return 2;
    }
    int n = atoi(argv[a]);
    char **cargv = argv + a + 1;

    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGCHLD);
    sigaddset(&mask, SIGTERM);
    sigaddset(&mask, SIGINT);
    sigaddset(&mask, SIGHUP);
    if (sigprocmask(SIG_BLOCK, &mask, NULL)) die("sigprocmask");
    int sfd = signalfd(-1, &mask, SFD_CLOEXEC | SFD_NONBLOCK);
    if (sfd < 0) die("signalfd");
    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) die("epoll_create1");
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = (uint64_t)-1};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, sfd, &ev)) die("epoll_ctl");

    /* Environment: ours plus the four rank variables (slots at the end). */
    size_t ne = 0;
    while (environ[ne]) ne++;
    char **env = calloc(ne + 5, sizeof(char *));
    memcpy(env, environ, ne * sizeof(char *));
    char e_rank[32], e_lrank[32], e_ws[32], e_ls[32];
    snprintf(e_ws, sizeof e_ws, "WORLD_SIZE=%d", n);
    snprintf(e_ls, sizeof e_ls, "LOCAL_SIZE=%d", n);
    env[ne] = e_rank;
    env[ne + 1] = e_lrank;
    env[ne + 2] = e_ws;
    env[ne + 3] = e_ls;
    env[ne + 4] = NULL;

    posix_spawnattr_t attr;
    posix_spawnattr_init(&attr);
    sigset_t empty, defs;
    sigemptyset(&empty);
    sigemptyset(&defs);
    sigaddset(&defs, SIGTERM);
    sigaddset(&defs, SIGINT);
    sigaddset(&defs, SIGHUP);
    sigaddset(&defs, SIGCHLD);
    posix_spawnattr_setsigmask(&attr, &empty);
    posix_spawnattr_setsigdefault(&attr, &defs);
    posix_spawnattr_setpgroup(&attr, 0);
    posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETPGROUP | POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF |
                                        POSIX_SPAWN_USEVFORK);

    struct rank *ranks = calloc((size_t)n, sizeof *ranks);
    int live = 0, open_fds = 0;
    for (int i = 0; i < n; i++) {
        struct rank *r = &ranks[i];
        snprintf(e_rank, sizeof e_rank, "RANK=%d", i);
        snprintf(e_lrank, sizeof e_lrank, "LOCAL_RANK=%d", i);
        posix_spawn_file_actions_t fa;
        posix_spawn_file_actions_init(&fa);
        int p[2] = {-1, -1};
        r->fd = -1;
        if (mux) {
            if (pipe2(p, O_CLOEXEC)) die("pipe2");
            posix_spawn_file_actions_adddup2(&fa, p[1], 1);
            posix_spawn_file_actions_adddup2(&fa, p[1], 2);
            r->buf = malloc(RBUF);
            if (prefix) r->plen = (size_t)snprintf(r->prefix, sizeof r->prefix, "[%d]: ", i);
        }
        int rc = posix_spawnp(&r->pid, cargv[0], &fa, &attr, cargv, env);
        posix_spawn_file_actions_destroy(&fa);
        if (rc) {
            errno = rc;
            die(cargv[0]);
        }
        r->alive = 1;
        live++;
        if (mux) {
            close(p[1]);
            fcntl(p[0], F_SETFL, O_NONBLOCK);
            r->fd = p[0];
            open_fds++;
            struct epoll_event rev = {.events = EPOLLIN, .data.u64 = (uint64_t)i};
            if (epoll_ctl(ep, EPOLL_CTL_ADD, p[0], &rev)) die("epoll_ctl");
        }
    }

    int code = 0, stopping = 0;
    struct epoll_event evs[256];
    while (live > 0 || open_fds > 0) {
        int k = epoll_wait(ep, evs, 256, -1);
        if (k < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        for (int e = 0; e < k; e++) {
            if (evs[e].data.u64 == (uint64_t)-1) {
                struct signalfd_siginfo si[32];
                ssize_t got = read(sfd, si, sizeof si);
                int reap = 0, stop = 0;
                for (ssize_t j = 0; j < got / (ssize_t)sizeof si[0]; j++) {
                    if (si[j].ssi_signo == SIGCHLD) reap = 1;
                    else stop = (int)si[j].ssi_signo;
                }
                if (stop) {
                    if (!stopping) code = 128 + stop;
                    stopping = 1;
                    for (int i = 0; i < n; i++)
                        if (ranks[i].alive) killpg(ranks[i].pid, stop);
                }
                if (reap) {
                    int st;
                    pid_t pid;
                    while ((pid = waitpid(-1, &st, WNOHANG)) > 0) {
                        for (int i = 0; i < n; i++) {
                            if (ranks[i].pid != pid || !ranks[i].alive) continue;
                            ranks[i].alive = 0;
                            live--;
                            int failed = WIFSIGNALED(st) || WEXITSTATUS(st) != 0;
                            if (failed && !stopping) {
                                stopping = 1;
                                code = WIFSIGNALED(st) ? 128 + WTERMSIG(st) : WEXITSTATUS(st);
                                for (int j = 0; j < n; j++)
                                    if (ranks[j].alive) killpg(ranks[j].pid, SIGTERM);
                            }
                            /* the group may hold grandchildren: they get the signal too */
                            if (stopping) killpg(pid, SIGTERM);
                            break;
                        }
                    }
                }
                continue;
            }
            struct rank *r = &ranks[evs[e].data.u64];
            for (;;) {
                ssize_t got = read(r->fd, r->buf + r->len, RBUF - r->len);
                if (got > 0) {
                    r->len += (size_t)got;
                    drain_lines(r, 0);
                    continue;
                }
                if (got < 0 && errno == EINTR) continue;
                if (got < 0 && errno == EAGAIN) break;
                drain_lines(r, 1); /* EOF or error */
                epoll_ctl(ep, EPOLL_CTL_DEL, r->fd, NULL);
                close(r->fd);
                r->fd = -1;
                open_fds--;
                break;
            }
        }
        oflush();
    }
    oflush();
    return code;
}

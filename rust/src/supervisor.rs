//! The supervisor: starts every rank, then one thread runs one epoll loop over every rank's
//! stdout, stderr and pidfd. It multiplexes output, reaps exits as they happen, tears the job
//! down on the first failure or a forwarded signal, and publishes a state snapshot that callers
//! read without blocking (status for dashboards and the elastic agent, the report at the end).

use std::collections::{HashMap, HashSet, VecDeque};
use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};

use crate::closer::{self, Closer};
use crate::error::{CoreError, CoreResult};
use crate::logmux::{format_tags, Collapser, Ending, HeldLine, LineSplitter, Sink, HIGH_WATER};
use crate::reap::{self, ExitStatus};
use crate::spawn::{self, SpawnRequest};
use crate::watchdog::Watchdog;
use crate::{signals, tree};

/// The environment variable that tags every process of a job (ranks and their descendants).
pub const RUN_ID_VAR: &str = "DSLAUNCH_RUN_ID";

/// One rank to start.
#[derive(Debug, Clone, Default)]
pub struct RankConfig {
    /// Program and arguments.
    pub argv: Vec<OsString>,
    /// Variables set for this rank on top of the job's base environment.
    pub env: Vec<(OsString, OsString)>,
    /// Working directory (default: the launcher's).
    pub cwd: Option<PathBuf>,
    /// A file that receives the rank's stdout and stderr, merged in the order they were read (the
    /// order the rank wrote them with `Config::merge_stderr`, one pipe for both).
    pub log_file: Option<PathBuf>,
    /// Files for one stream each (torchrun's `stdout.log`/`stderr.log` under `--tee`/`--redirects`),
    /// instead of `log_file`: a stream without one is not logged. Needs separate pipes (no
    /// `Config::merge_stderr`) to tell the streams apart.
    pub stdout_log_file: Option<PathBuf>,
    pub stderr_log_file: Option<PathBuf>,
    /// The label in the console prefix (usually the global rank).
    pub tag: String,
    /// Whether the rank's lines go to the console.
    pub console: bool,
    /// Keep this stream's lines off the console even with `console` (torchrun's `--redirects`).
    /// With `Config::merge_stderr` both streams come as stdout.
    pub quiet_stdout: bool,
    pub quiet_stderr: bool,
    /// This stream's console lines without the prefix, and never collapsed: `[stdout, stderr]`
    /// (torchrun prefixes only the streams it tees). With `Config::merge_stderr` both come as stdout.
    pub bare: [bool; 2],
}

/// How to run the job.
#[derive(Debug, Clone)]
pub struct Config {
    /// The ranks, in rank order.
    pub ranks: Vec<RankConfig>,
    /// The base environment of every rank; `None` inherits the launcher's.
    pub base_env: Option<Vec<(OsString, OsString)>>,
    /// Console prefix template (`{rank}` = index, `{tag}` = the rank's tag, `{{`/`}}` = a brace);
    /// `None` for raw lines.
    pub prefix: Option<String>,
    /// Time between the polite signal and SIGKILL when tearing down.
    pub grace: Duration,
    /// The signals that, received (`Command::Signal`/`Stop`), also end the job; the others are
    /// only passed on. Default `signals::TERMINATING`.
    pub stop_signals: Vec<i32>,
    /// Tear everything down when one rank fails.
    pub fail_fast: bool,
    /// How many of each rank's last stderr lines to keep for the report.
    pub stderr_tail: usize,
    /// Start the orphan guard (`watchdog.rs`).
    pub orphan_guard: bool,
    /// Become a child subreaper so descendants orphaned inside the job stay ours to find.
    pub subreaper: bool,
    /// When every rank has exited, end what they left running in the background.
    pub kill_leftovers: bool,
    /// The job's id, the value of `DSLAUNCH_RUN_ID` in every rank.
    pub run_id: String,
    /// Lines longer than this are written to the console in pieces.
    pub max_line: usize,
    /// Our stdout and stderr (normally 1 and 2).
    pub stdout_fd: RawFd,
    /// See `stdout_fd`.
    pub stderr_fd: RawFd,
    /// Where identical lines of several ranks are printed once behind a rank range.
    pub collapse: CollapseMode,
    /// How long a console line is held for other ranks to write the same.
    pub collapse_window: Duration,
    /// Draw a live status line (ranks running/exited/failed, elapsed time) below the ranks'
    /// output, on the console stream that is a terminal (stderr first); never on a pipe or file.
    pub status_line: bool,
    /// Keep each rank's last output line (`RankInfo::last_line`), for hang reports.
    pub keep_last_line: bool,
    /// Each rank's stderr goes into its stdout pipe: one stream in write order (see
    /// `SpawnRequest::merge_stderr`), shown on our stdout, its tail kept for the report.
    pub merge_stderr: bool,
    /// Per console stream (`[stdout, stderr]`): a file that also gets the prefixed lines holding
    /// any of some needles (torchrun's `--duplicate-stdout-filters`).
    pub console_copies: [Option<ConsoleCopy>; 2],
}

/// A file that gets a copy of each prefixed console line of one stream that holds any of
/// `needles` (an empty needle: every line), prefix included. Bare lines are not copied.
#[derive(Debug, Clone)]
pub struct ConsoleCopy {
    pub path: PathBuf,
    pub needles: Vec<Vec<u8>>,
}

/// Which console streams collapse identical lines of several ranks (see `logmux::Collapser`).
/// Collapsing needs a prefix to show the ranks: with `prefix: None` it is off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CollapseMode {
    /// Never.
    Off,
    /// The streams that are terminals.
    Terminal,
    /// Both, whatever they are (pipes and files included).
    On,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            ranks: Vec::new(),
            base_env: None,
            prefix: Some("[{tag}]: ".into()),
            grace: Duration::from_secs(30),
            stop_signals: signals::TERMINATING.to_vec(),
            fail_fast: true,
            stderr_tail: 20,
            orphan_guard: true,
            subreaper: true,
            kill_leftovers: true,
            run_id: String::new(),
            max_line: 64 * 1024,
            stdout_fd: 1,
            stderr_fd: 2,
            collapse: CollapseMode::Off,
            collapse_window: Duration::from_millis(250),
            status_line: false,
            keep_last_line: false,
            merge_stderr: false,
            console_copies: [None, None],
        }
    }
}

/// What the caller can ask of a running job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// A signal the launcher received: forwarded to every rank's group. The stop signals (SIGINT,
    /// SIGTERM, SIGHUP and SIGQUIT by default: `Config::stop_signals`) also end the job (SIGKILL after the grace period; a second one kills at once).
    /// SIGTSTP (Ctrl-Z) then stops the launcher's own process too, as the shell expects.
    Signal(i32),
    /// A stop asked for from outside, as by a multi-node runner: the same as `Signal(sig)` while
    /// the job runs, but a job already ending (a rank failed, an earlier stop) goes on ending,
    /// its ranks keeping their grace period; only SIGKILL kills at once. SIGTSTP pauses the
    /// ranks but not this process.
    Stop(i32),
    /// Stop the job: `sig` to every rank tree, SIGKILL after `grace` (default: the config's).
    Terminate {
        /// The polite signal.
        sig: i32,
        /// Overrides the configured grace period.
        grace: Option<Duration>,
    },
    /// SIGKILL every rank tree now.
    Kill,
}

/// Bytes the launcher itself prints on the console, in order with the ranks' lines (see
/// `Supervisor::message`).
#[derive(Debug, Clone)]
struct Message {
    stderr: bool,
    text: Vec<u8>,
}

/// A rank as the caller sees it.
#[derive(Debug, Clone)]
pub struct RankInfo {
    /// Its pid (and process group id).
    pub pid: i32,
    /// Its label.
    pub tag: String,
    /// When it was started.
    pub started_at: SystemTime,
    /// When its exit was seen.
    pub ended_at: Option<SystemTime>,
    /// How it ended, once it has.
    pub status: Option<ExitStatus>,
    /// When it last wrote anything.
    pub last_output_at: Option<SystemTime>,
    /// Bytes it wrote (stdout and stderr).
    pub output_bytes: u64,
    /// Lines (segments) it wrote.
    pub output_lines: u64,
    /// Its last stderr lines, oldest first, without line endings.
    pub stderr_tail: VecDeque<Vec<u8>>,
    /// Why its log file stopped being written, if it did.
    pub log_error: Option<String>,
    /// Its last output line (stdout or stderr, ending stripped, at most 1 KiB); kept only with
    /// `Config::keep_last_line`.
    pub last_line: Vec<u8>,
}

/// The job as the caller sees it: a snapshot, updated by the loop after every batch of events.
#[derive(Debug, Clone)]
pub struct JobState {
    /// Every rank, in rank order.
    pub ranks: Vec<RankInfo>,
    /// The root cause: the first rank seen failing before any teardown began.
    pub first_failure: Option<usize>,
    /// The terminating signal that ended the job, if one did.
    pub interrupted_by: Option<i32>,
    /// The caller asked for the stop (terminate/kill).
    pub stopped: bool,
    /// Everything is reaped, output drained, the job is over.
    pub done: bool,
    /// When the job started.
    pub started_at: SystemTime,
    /// When it ended.
    pub ended_at: Option<SystemTime>,
    /// Processes the ranks left behind that were killed at the end (or during teardown).
    pub leftovers_killed: usize,
}

impl JobState {
    /// The shell-convention status of the job: 0 on success; the root-cause rank's code (128+N
    /// for a death by signal N); 128+N for a job ended by signal N; never 0 if anything failed.
    pub fn exit_code(&self) -> i32 {
        if let Some(r) = self.first_failure {
            let code = self.ranks[r].status.map_or(1, ExitStatus::shell_code);
            return if code == 0 { 1 } else { code };
        }
        if let Some(sig) = self.interrupted_by {
            return 128 + sig;
        }
        let failed = self.ranks.iter().filter_map(|r| r.status).find(|s| !s.success());
        match failed {
            Some(s) if s.shell_code() != 0 => s.shell_code(),
            Some(_) => 1,
            None => 0,
        }
    }
}

struct Shared {
    state: Mutex<JobState>,
    commands: Mutex<Vec<Command>>,
    /// Launcher messages for the console; `None` once the console is closed (the job is ending).
    messages: Mutex<Option<Vec<Message>>>,
    /// Ranks that exited since the caller last took them (`take_exits`), in the order seen.
    exits: Mutex<Vec<usize>>,
    /// Readable while `exits` may be non-empty.
    exit_r: OwnedFd,
    exit_w: OwnedFd,
    done_r: OwnedFd,
    done_w: OwnedFd,
}

struct Inner {
    shared: Arc<Shared>,
    waker: Waker,
    thread: Mutex<Option<JoinHandle<()>>>,
    run_id: String,
    pids: Vec<i32>,
    /// The process that started the loop thread: a forked child has no such thread to join.
    owner_pid: u32,
}

/// A running job. Cheap to clone; the last handle dropped while the job still runs kills it.
#[derive(Clone)]
pub struct Supervisor {
    inner: Arc<Inner>,
}

const WAKER: Token = Token(usize::MAX);
const OUT_WRITABLE: Token = Token(usize::MAX - 1);
const ERR_WRITABLE: Token = Token(usize::MAX - 2);
const SIGNALS: Token = Token(usize::MAX - 3);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A job whose ranks run and whose loop is ready, not yet running (`Supervisor::begin`).
struct Begun {
    handle: Supervisor,
    lp: Loop,
    /// Kills the ranks if the loop never gets to run (a thread that cannot start).
    abort: AbortOnError,
}

impl Supervisor {
    /// Starts every rank (in the calling thread) and the loop thread. On a spawn failure the
    /// ranks already started are killed and reaped before the error is returned.
    pub fn start(cfg: Config) -> CoreResult<Supervisor> {
        let Begun {
            handle,
            mut lp,
            mut abort,
        } = Self::begin(cfg)?;
        let thread = std::thread::Builder::new()
            .name("dslaunch-supervisor".into())
            .spawn(move || lp.run())?;
        abort.pids.clear(); // started: the loop owns the ranks now
        *lock(&handle.inner.thread) = Some(thread);
        Ok(handle)
    }

    /// Runs the job on the calling thread, without a loop thread, and returns its final state.
    /// `signals` (a non-blocking signalfd, or any non-blocking fd that yields `signalfd_siginfo`
    /// records) is read by the loop itself: each signal acts as `send(Command::Signal(sig))`.
    /// `started` gets the handle before the loop runs (to queue a message). The native host runs
    /// jobs this way: a signal reaches the ranks, and the job's end the report, without a
    /// hand-off between threads.
    pub fn run_here(cfg: Config, signals: Option<OwnedFd>, started: impl FnOnce(&Supervisor)) -> CoreResult<JobState> {
        let Begun {
            handle,
            mut lp,
            mut abort,
        } = Self::begin(cfg)?;
        if let Some(fd) = signals {
            lp.poll
                .registry()
                .register(&mut SourceFd(&fd.as_raw_fd()), SIGNALS, Interest::READABLE)?;
            lp.signals = Some(fd);
        }
        abort.pids.clear(); // the loop below owns the ranks now
        started(&handle);
        lp.run();
        Ok(handle.state())
    }

    /// Everything of `start` but the loop thread.
    fn begin(cfg: Config) -> CoreResult<Begun> {
        if cfg.run_id.is_empty() {
            return Err(CoreError::InvalidArgument("run_id must not be empty".into()));
        }
        for r in &cfg.ranks {
            if r.argv.is_empty() {
                return Err(CoreError::InvalidArgument("a rank's argv must not be empty".into()));
            }
        }
        let n = cfg.ranks.len();
        spawn::ensure_nofile(4 * n as u64 + 64);
        if cfg.subreaper {
            spawn::become_subreaper();
        }
        let out = Sink::open(cfg.stdout_fd)?;
        let err = Sink::open(cfg.stderr_fd)?;
        let mut logs = Vec::with_capacity(n);
        for r in &cfg.ranks {
            logs.push(RankLogs::open(r)?);
        }
        let [out_copy, err_copy] = cfg.console_copies.clone().map(|c| c.map(CopyFile::open).transpose());
        let copies = [out_copy?, err_copy?];
        let marker = format!("{RUN_ID_VAR}={}", cfg.run_id);
        let guard = if cfg.orphan_guard {
            Some(Watchdog::start(&marker)?)
        } else {
            None
        };
        let poll = Poll::new()?;
        let waker = Waker::new(poll.registry(), WAKER)?;

        let run_id_pair = (OsString::from(RUN_ID_VAR), OsString::from(&cfg.run_id));
        let overrides: Vec<Vec<(OsString, OsString)>> = cfg
            .ranks
            .iter()
            .map(|r| {
                let mut o = r.env.clone();
                o.push(run_id_pair.clone());
                o
            })
            .collect();
        let reqs: Vec<SpawnRequest<'_>> = cfg
            .ranks
            .iter()
            .zip(&overrides)
            .map(|(r, o)| SpawnRequest {
                argv: &r.argv,
                env: cfg.base_env.as_deref(),
                env_overrides: o,
                cwd: r.cwd.as_deref(),
                merge_stderr: cfg.merge_stderr,
            })
            .collect();
        let mut spawned = Vec::with_capacity(n);
        let mut ranks = Vec::with_capacity(n);
        let started_at = SystemTime::now();
        let batch = spawn::spawn_batch(&reqs, |s| {
            ranks.push(RankInfo {
                pid: s.pid,
                tag: cfg.ranks[spawned.len()].tag.clone(),
                started_at: SystemTime::now(),
                ended_at: None,
                status: None,
                last_output_at: None,
                output_bytes: 0,
                output_lines: 0,
                stderr_tail: VecDeque::new(),
                log_error: None,
                last_line: Vec::new(),
            });
            spawned.push(s);
        });
        drop(reqs);
        drop(overrides);
        if let Err(e) = batch {
            abort_spawned(&spawned, marker.as_bytes());
            if let Some(mut g) = guard {
                g.finish();
            }
            return Err(e);
        }

        // FIX (tests/test_core_scale.py::test_running_out_of_fds_fails_cleanly): every rank is
        // running now; if anything below fails (EMFILE on a pipe, a thread that cannot start), the
        // `?` returned with the ranks left running untracked. The guard kills them on that path.
        let abort = AbortOnError {
            pids: ranks.iter().map(|r| r.pid).collect(),
            marker: marker.clone().into_bytes(),
        };
        let (done_r, done_w) =
            rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC | rustix::pipe::PipeFlags::NONBLOCK)
                .map_err(io::Error::from)?;
        let state = JobState {
            ranks: ranks.clone(),
            first_failure: None,
            interrupted_by: None,
            stopped: false,
            done: false,
            started_at,
            ended_at: None,
            leftovers_killed: 0,
        };
        let (exit_r, exit_w) =
            rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC | rustix::pipe::PipeFlags::NONBLOCK)
                .map_err(io::Error::from)?;
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            commands: Mutex::new(Vec::new()),
            messages: Mutex::new(Some(Vec::new())),
            exits: Mutex::new(Vec::new()),
            exit_r,
            exit_w,
            done_r,
            done_w,
        });
        let pids = ranks.iter().map(|r| r.pid).collect();

        let lp = Loop::new(
            poll,
            shared.clone(),
            &cfg,
            marker.into_bytes(),
            spawned,
            ranks,
            logs,
            out,
            err,
            copies,
            guard,
        )?;
        let handle = Supervisor {
            inner: Arc::new(Inner {
                shared,
                waker,
                thread: Mutex::new(None),
                run_id: cfg.run_id,
                pids,
                owner_pid: std::process::id(),
            }),
        };
        Ok(Begun { handle, lp, abort })
    }

    /// The job's id (`DSLAUNCH_RUN_ID` in every rank).
    pub fn run_id(&self) -> &str {
        &self.inner.run_id
    }

    /// The ranks' pids, in rank order.
    pub fn pids(&self) -> &[i32] {
        &self.inner.pids
    }

    /// Asks the loop to do something; returns at once.
    pub fn send(&self, cmd: Command) {
        lock(&self.inner.shared.commands).push(cmd);
        let _ = self.inner.waker.wake();
    }

    /// Prints `text` on the console (stderr or stdout) in order with the ranks' lines: held
    /// collapsed lines are released first and the status line is kept below it. Returns false
    /// when the console is already closed (the job is over or ending): print it yourself then.
    pub fn message(&self, stderr: bool, text: &[u8]) -> bool {
        let mut m = lock(&self.inner.shared.messages);
        let Some(queue) = m.as_mut() else { return false };
        queue.push(Message {
            stderr,
            text: text.to_vec(),
        });
        drop(m);
        let _ = self.inner.waker.wake();
        true
    }

    /// A snapshot of the job now.
    pub fn state(&self) -> JobState {
        lock(&self.inner.shared.state).clone()
    }

    /// Reads the snapshot under the lock without cloning it.
    pub fn with_state<R>(&self, f: impl FnOnce(&JobState) -> R) -> R {
        f(&lock(&self.inner.shared.state))
    }

    /// Whether the job is over.
    pub fn is_done(&self) -> bool {
        lock(&self.inner.shared.state).done
    }

    /// Becomes readable (and stays so) when the job is over: for poll/epoll in callers.
    pub fn done_fd(&self) -> BorrowedFd<'_> {
        self.inner.shared.done_r.as_fd()
    }

    /// Becomes readable when a rank has exited since the last `take_exits` (or the job is over).
    pub fn exit_fd(&self) -> BorrowedFd<'_> {
        self.inner.shared.exit_r.as_fd()
    }

    /// The ranks that exited since the last call, in the order their exits were seen; their
    /// final state is already in `state()`. Never blocks.
    pub fn take_exits(&self) -> Vec<usize> {
        let mut sink = [0u8; 256];
        while matches!(rustix::io::read(&self.inner.shared.exit_r, &mut sink), Ok(n) if n > 0) {}
        std::mem::take(&mut *lock(&self.inner.shared.exits))
    }

    /// Blocks until the job is over or `timeout` passes; returns whether it is over.
    pub fn wait_timeout(&self, timeout: Option<Duration>) -> bool {
        let until = timeout.map(|t| Instant::now() + t);
        loop {
            if self.is_done() {
                self.join();
                return true;
            }
            let left = match until {
                Some(u) => match u.checked_duration_since(Instant::now()) {
                    Some(d) => Some(d),
                    None => return false,
                },
                None => None,
            };
            let mut fds = [rustix::event::PollFd::new(
                &self.inner.shared.done_r,
                rustix::event::PollFlags::IN,
            )];
            let ts = left.and_then(|d| rustix::event::Timespec::try_from(d).ok());
            let _ = rustix::event::poll(&mut fds, ts.as_ref());
        }
    }

    /// Joins the loop thread once the job is done.
    fn join(&self) {
        self.inner.join();
    }
}

impl Inner {
    /// Joins the loop thread, in the process that started it only: in a forked child the thread
    /// does not exist and joining it panics ("threads should not terminate unexpectedly").
    fn join(&self) {
        if let Some(t) = lock(&self.thread).take() {
            if std::process::id() == self.owner_pid {
                let _ = t.join();
            } else {
                std::mem::forget(t);
            }
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if std::process::id() != self.owner_pid {
            // A forked child's copy: the job (and its loop) belong to the parent.
            self.join();
            return;
        }
        if !lock(&self.shared.state).done {
            lock(&self.shared.commands).push(Command::Kill);
            let _ = self.waker.wake();
        }
        self.join();
    }
}

/// Kills and reaps the started ranks (and whatever they started) when `start` fails after the
/// spawn loop: dropped on the `?` path while `pids` is non-empty.
struct AbortOnError {
    pids: Vec<i32>,
    marker: Vec<u8>,
}

impl Drop for AbortOnError {
    fn drop(&mut self) {
        if self.pids.is_empty() {
            return;
        }
        for &pid in &self.pids {
            signals::killpg(pid, libc::SIGKILL);
        }
        for &pid in &self.pids {
            let mut status = 0;
            // SAFETY: waitpid on our own (SIGKILLed, unreaped) child with a valid out-pointer.
            unsafe { libc::waitpid(pid, &mut status, 0) };
        }
        for pid in tree::marked_processes(&self.marker) {
            tree::kill_tree(pid, Duration::ZERO);
            reap::reap_zombie(pid);
        }
    }
}

/// Kills and reaps ranks started before a later spawn failed.
fn abort_spawned(spawned: &[spawn::Spawned], marker: &[u8]) {
    for s in spawned {
        signals::killpg(s.pid, libc::SIGKILL);
    }
    for s in spawned {
        let _ = reap::reap_blocking(&s.pidfd);
    }
    for pid in tree::marked_processes(marker) {
        tree::kill_tree(pid, Duration::ZERO);
        reap::reap_zombie(pid); // kill_tree leaves the root to its owner: here, us (an adopted orphan)
    }
}

struct Stream {
    fd: Option<OwnedFd>,
    splitter: LineSplitter,
    is_stderr: bool,
}

/// An open `ConsoleCopy`. Written a line at a time, unbuffered: the lines are few, and each is
/// whole in the file whenever it is read (as torch's line-buffered copy).
struct CopyFile {
    file: Option<File>,
    needles: Vec<memchr::memmem::Finder<'static>>,
}

impl CopyFile {
    fn open(c: ConsoleCopy) -> Result<CopyFile, CoreError> {
        let file = File::create(&c.path).map_err(|source| CoreError::LogFile { source, path: c.path })?;
        let needles = c
            .needles
            .iter()
            .map(|n| memchr::memmem::Finder::new(n).into_owned())
            .collect();
        Ok(CopyFile {
            file: Some(file),
            needles,
        })
    }

    /// Copies `prefix` + `seg` when `seg` holds a needle; a write error ends the copy.
    fn offer(&mut self, prefix: &[u8], seg: &[u8], ending: Ending) {
        let Some(f) = self.file.as_mut() else { return };
        if !self.needles.iter().any(|n| n.find(seg).is_some()) {
            return;
        }
        let mut line = Vec::with_capacity(prefix.len() + seg.len() + 1);
        line.extend_from_slice(prefix);
        line.extend_from_slice(seg);
        if ending == Ending::Cut {
            line.push(b'\n');
        }
        if f.write_all(&line).is_err() {
            self.file = None;
        }
    }
}

/// A rank's log files, by stream: both entries are the same file (two descriptors of one open
/// file, one offset) for `RankConfig::log_file`, separate files for the per-stream ones.
struct RankLogs([Option<File>; 2]);

impl RankLogs {
    fn open(r: &RankConfig) -> Result<RankLogs, CoreError> {
        let create = |p: &PathBuf| {
            File::create(p).map_err(|source| CoreError::LogFile {
                source,
                path: p.clone(),
            })
        };
        if let Some(p) = &r.log_file {
            if r.stdout_log_file.is_some() || r.stderr_log_file.is_some() {
                return Err(CoreError::InvalidArgument(
                    "log_file holds both streams: give it or the per-stream log files, not both".into(),
                ));
            }
            let f = create(p)?;
            let dup = f.try_clone()?;
            return Ok(RankLogs([Some(f), Some(dup)]));
        }
        Ok(RankLogs([
            r.stdout_log_file.as_ref().map(create).transpose()?,
            r.stderr_log_file.as_ref().map(create).transpose()?,
        ]))
    }
}

struct LiveRank {
    pidfd: Option<OwnedFd>,
    pid: i32,
    console: [bool; 2],
    /// Whether the rank may use the console at all: its streams kept off it for their log files
    /// (`quiet_*`) come back to it when those files fail.
    console_allowed: bool,
    logs: RankLogs,
    info: RankInfo,
    dirty: bool,
}

struct Teardown {
    deadline: Instant,
    escalated: bool,
    rescan_at: Option<Instant>,
    /// The signal the escaped descendants still have to get, and when (see `begin_teardown`).
    sweep: Option<(i32, Instant)>,
    started: Instant,
}

/// The escaped descendants of ranks that still run are looked for once no rank has exited for
/// this long (ranks are still dying of the signal until then) ...
const ESCAPEE_SWEEP_DELAY: Duration = Duration::from_millis(20);
/// ... or this long after the teardown began, at the latest.
const ESCAPEE_SWEEP_MAX_DELAY: Duration = Duration::from_secs(1);

/// A teardown's first signal goes to this many rank groups a loop turn. Each signal wakes a rank
/// that preempts the loop, so one burst to 1,024 groups kept the loop from its events until
/// nearly every rank had died, and their reaping and closing came after, on one core
/// (docs/benchmarks.md). In turns, the loop reaps and closes what died since the last one.
const SIGNAL_TURN: usize = 64;

struct Loop {
    poll: Poll,
    shared: Arc<Shared>,
    marker: Vec<u8>,
    grace: Duration,
    stop_signals: Vec<i32>,
    fail_fast: bool,
    kill_leftovers: bool,
    tail_lines: usize,
    ranks: Vec<LiveRank>,
    streams: Vec<Stream>,
    ready: VecDeque<usize>,
    is_ready: Vec<bool>,
    console: Console,
    keep_last_line: bool,
    /// `Config::merge_stderr`: stdout streams keep the report's tail.
    merged: bool,
    out_watched: bool,
    err_watched: bool,
    alive: usize,
    teardown: Option<Teardown>,
    extras: HashMap<usize, (i32, OwnedFd)>,
    extra_pids: HashSet<i32>,
    next_extra: usize,
    extra_base: usize,
    leftovers_killed: usize,
    swept_clean: bool,
    drain_deadline: Option<Instant>,
    first_failure: Option<usize>,
    interrupted_by: Option<i32>,
    stopped: bool,
    job_dirty: bool,
    new_exits: Vec<usize>,
    buf: Vec<u8>,
    guard: Option<Watchdog>,
    my_pid: i32,
    closer: Closer,
    /// Ranks the teardown's first signal has still to reach (see SIGNAL_TURN), and the signal.
    unsignalled: Vec<usize>,
    unsignalled_sig: i32,
    /// The ranks were sent SIGTSTP (Ctrl-Z) and no SIGCONT since: a teardown must wake them.
    ranks_paused: bool,
    /// The signals to act on, read here (`Supervisor::run_here`).
    signals: Option<OwnedFd>,
}

impl Loop {
    #[allow(clippy::too_many_arguments)]
    fn new(
        poll: Poll,
        shared: Arc<Shared>,
        cfg: &Config,
        marker: Vec<u8>,
        spawned: Vec<spawn::Spawned>,
        infos: Vec<RankInfo>,
        logs: Vec<RankLogs>,
        out: Sink,
        err: Sink,
        copies: [Option<CopyFile>; 2],
        guard: Option<Watchdog>,
    ) -> io::Result<Loop> {
        let n = spawned.len();
        let mut ranks = Vec::with_capacity(n);
        let mut streams = Vec::with_capacity(2 * n);
        for (i, ((s, info), log)) in spawned.into_iter().zip(infos).zip(logs).enumerate() {
            let reg = poll.registry();
            reg.register(&mut SourceFd(&s.stdout.as_raw_fd()), Token(2 * i), Interest::READABLE)?;
            reg.register(
                &mut SourceFd(&s.stderr.as_raw_fd()),
                Token(2 * i + 1),
                Interest::READABLE,
            )?;
            reg.register(
                &mut SourceFd(&s.pidfd.as_raw_fd()),
                Token(2 * n + i),
                Interest::READABLE,
            )?;
            let rc = &cfg.ranks[i];
            streams.push(Stream {
                fd: Some(s.stdout),
                splitter: LineSplitter::new(cfg.max_line),
                is_stderr: false,
            });
            streams.push(Stream {
                fd: Some(s.stderr),
                splitter: LineSplitter::new(cfg.max_line),
                is_stderr: true,
            });
            ranks.push(LiveRank {
                pidfd: Some(s.pidfd),
                pid: s.pid,
                console: [rc.console && !rc.quiet_stdout, rc.console && !rc.quiet_stderr],
                console_allowed: rc.console,
                logs: log,
                info,
                dirty: false,
            });
        }
        Ok(Loop {
            poll,
            shared,
            marker,
            grace: cfg.grace,
            stop_signals: cfg.stop_signals.clone(),
            fail_fast: cfg.fail_fast,
            kill_leftovers: cfg.kill_leftovers,
            tail_lines: cfg.stderr_tail,
            alive: n,
            ranks,
            is_ready: vec![false; 2 * n],
            streams,
            ready: VecDeque::new(),
            console: Console::new(cfg, out, err, copies),
            keep_last_line: cfg.keep_last_line,
            merged: cfg.merge_stderr,
            out_watched: false,
            err_watched: false,
            teardown: None,
            extras: HashMap::new(),
            extra_pids: HashSet::new(),
            next_extra: 3 * n,
            extra_base: 3 * n,
            leftovers_killed: 0,
            swept_clean: false,
            drain_deadline: None,
            first_failure: None,
            interrupted_by: None,
            stopped: false,
            job_dirty: false,
            new_exits: Vec::new(),
            buf: vec![0; 64 * 1024],
            guard,
            my_pid: std::process::id() as i32,
            closer: Closer::new(n >= closer::MIN_RANKS),
            unsignalled: Vec::new(),
            unsignalled_sig: 0,
            ranks_paused: false,
            signals: None,
        })
    }

    fn n(&self) -> usize {
        self.ranks.len()
    }

    fn run(&mut self) {
        let mut events = Events::with_capacity(1024);
        loop {
            let timeout = self.next_timeout();
            match self.poll.poll(&mut events, timeout) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    // epoll itself failed: nothing can be watched any more; end the job safely.
                    self.begin_teardown(libc::SIGKILL, Duration::ZERO);
                    events.clear();
                }
            }
            for ev in events.iter() {
                // A pipe whose writers are all gone and that holds nothing (hang-up without
                // data) is at its EOF: closed without the read that would say so.
                self.dispatch(ev.token(), ev.is_read_closed() && !ev.is_readable());
            }
            self.read_ready();
            self.signal_next_turn();
            self.console.release(Instant::now(), false);
            self.flush_console();
            self.check_deadlines();
            let finished = self.advance();
            self.closer.flush();
            self.publish(false);
            if finished {
                break;
            }
        }
        self.finalize();
    }

    fn next_timeout(&self) -> Option<Duration> {
        let paused = self.console_paused();
        if (!self.ready.is_empty() && !paused) || !self.unsignalled.is_empty() {
            return Some(Duration::ZERO);
        }
        let now = Instant::now();
        let mut next: Option<Instant> = None;
        let mut consider = |t: Option<Instant>| {
            if let Some(t) = t {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        };
        if let Some(t) = &self.teardown {
            consider(if t.escalated { t.rescan_at } else { Some(t.deadline) });
            consider(t.sweep.map(|(_, at)| at));
        }
        consider(self.drain_deadline);
        consider(self.console.next_deadline());
        if self.alive == 0 && self.extras.is_empty() && !self.swept_clean {
            consider(Some(now));
        }
        next.map(|t| t.saturating_duration_since(now))
    }

    fn console_paused(&self) -> bool {
        self.console.out.backlog() > HIGH_WATER || self.console.err.backlog() > HIGH_WATER
    }

    fn dispatch(&mut self, token: Token, drained_eof: bool) {
        let n = self.n();
        match token {
            WAKER => {
                self.run_commands();
                self.print_messages();
            }
            SIGNALS => {
                let got = self
                    .signals
                    .as_ref()
                    .map(|fd| signals::read_all(fd.as_fd()))
                    .unwrap_or_default();
                lock(&self.shared.commands).extend(got.into_iter().map(Command::Signal));
                self.run_commands();
            }
            OUT_WRITABLE | ERR_WRITABLE => {}
            Token(t) if t < 2 * n => {
                if drained_eof && !self.is_ready[t] {
                    if self.streams[t].fd.is_some() {
                        self.close_stream(t);
                    }
                } else if !self.is_ready[t] {
                    self.is_ready[t] = true;
                    self.ready.push_back(t);
                }
            }
            Token(t) if t < 3 * n => self.reap_rank(t - 2 * n),
            Token(t) => self.reap_extra(t),
        }
    }

    fn run_commands(&mut self) {
        let cmds = std::mem::take(&mut *lock(&self.shared.commands));
        for cmd in cmds {
            match cmd {
                Command::Signal(sig) if self.stop_signals.contains(&sig) => {
                    if self.teardown.is_none() {
                        self.interrupt(sig);
                    } else {
                        self.escalate();
                    }
                }
                Command::Stop(sig) if self.stop_signals.contains(&sig) => {
                    if self.teardown.is_none() {
                        self.interrupt(sig);
                    }
                }
                Command::Stop(libc::SIGKILL) => self.begin_teardown(libc::SIGKILL, Duration::ZERO),
                Command::Signal(sig) | Command::Stop(sig) => {
                    match sig {
                        libc::SIGTSTP => self.ranks_paused = true,
                        libc::SIGCONT => self.ranks_paused = false,
                        _ => {}
                    }
                    for r in self.ranks.iter().filter(|r| r.pidfd.is_some()) {
                        signals::killpg(r.pid, sig);
                    }
                    if cmd == Command::Signal(libc::SIGTSTP) {
                        // Ctrl-Z: each rank has its own process group, out of the terminal's reach,
                        // so the job pauses only if the launcher passes the stop on and then stops
                        // itself (the shell waits for that). Stop(SIGTSTP), a multi-node runner's
                        // Ctrl-Z, pauses only the ranks: this process stays up to hear the SIGCONT.
                        signals::kill(self.my_pid, libc::SIGSTOP);
                    }
                }
                Command::Terminate { sig, grace } => {
                    self.stopped = true;
                    self.begin_teardown(sig, grace.unwrap_or(self.grace));
                }
                Command::Kill => {
                    self.stopped = true;
                    if self.teardown.is_none() {
                        self.begin_teardown(libc::SIGKILL, Duration::ZERO);
                    } else {
                        self.escalate();
                    }
                }
            }
            self.job_dirty = true;
        }
    }

    fn print_messages(&mut self) {
        let msgs = lock(&self.shared.messages)
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default();
        for m in msgs {
            self.console.message(m.stderr, &m.text);
        }
    }

    fn read_ready(&mut self) {
        if self.console_paused() {
            return;
        }
        let rounds = self.ready.len();
        for _ in 0..rounds {
            let Some(i) = self.ready.pop_front() else { break };
            let Some(fd) = self.streams[i].fd.as_ref() else {
                self.is_ready[i] = false;
                continue;
            };
            match rustix::io::read(fd, &mut self.buf[..]) {
                Ok(0) => {
                    self.is_ready[i] = false;
                    self.close_stream(i);
                }
                Ok(n) => {
                    self.on_output(i, n);
                    // Edge-triggered epoll: only EAGAIN or EOF proves the pipe is drained (a
                    // short read can leave the EOF of a rank that wrote and exited at once).
                    self.ready.push_back(i);
                }
                Err(e) if e == rustix::io::Errno::AGAIN => self.is_ready[i] = false,
                Err(e) if e == rustix::io::Errno::INTR => self.ready.push_back(i),
                Err(_) => {
                    self.is_ready[i] = false;
                    self.close_stream(i);
                }
            }
            if self.console_paused() {
                break;
            }
        }
    }

    fn on_output(&mut self, stream: usize, len: usize) {
        let r = stream / 2;
        let Loop {
            ranks,
            streams,
            console,
            buf,
            tail_lines,
            keep_last_line,
            merged,
            ..
        } = self;
        let rank = &mut ranks[r];
        let s = &mut streams[stream];
        let data = &buf[..len];
        let now = Instant::now();
        rank.info.last_output_at = Some(SystemTime::now());
        rank.info.output_bytes += len as u64;
        rank.dirty = true;
        let which = usize::from(s.is_stderr);
        if let Some(log) = rank.logs.0[which].as_mut() {
            if let Err(e) = log.write_all(data) {
                // Name the file in the one warning (a full disk is usually one of many).
                let path = std::fs::read_link(format!("/proc/self/fd/{}", log.as_raw_fd()))
                    .map_or_else(|_| "(unknown path)".into(), |p| p.display().to_string());
                rank.info.log_error = Some(e.to_string());
                rank.logs.0 = [None, None]; // one warning: a full disk stops both files
                rank.console = [rank.console_allowed; 2];
                let msg = format!(
                    "dslaunch: rank {} log file {path} write failed ({e}); the file is incomplete, \
                     the rank's output goes on to the console only\n",
                    rank.info.tag
                );
                console.message(true, msg.as_bytes());
            }
        }
        let route = Route::new(
            r,
            s.is_stderr,
            *merged,
            rank.console[which],
            *tail_lines,
            *keep_last_line,
            now,
        );
        s.splitter.feed(data, route_segment(&mut rank.info, console, route));
    }

    fn close_stream(&mut self, stream: usize) {
        let r = stream / 2;
        let Loop {
            ranks,
            streams,
            console,
            tail_lines,
            keep_last_line,
            merged,
            closer,
            ..
        } = self;
        let s = &mut streams[stream];
        // Closing our only descriptor of the pipe takes it out of the epoll set too (no
        // EPOLL_CTL_DEL needed); an event still queued for it finds `fd: None` and is skipped.
        if let Some(fd) = s.fd.take() {
            closer.close(fd);
        }
        let rank = &mut ranks[r];
        let route = Route::new(
            r,
            s.is_stderr,
            *merged,
            rank.console[usize::from(s.is_stderr)],
            *tail_lines,
            *keep_last_line,
            Instant::now(),
        );
        s.splitter.finish(route_segment(&mut rank.info, console, route));
        rank.dirty = true;
    }

    fn flush_console(&mut self) {
        if self.console.status.is_some() {
            let now = Instant::now();
            if self.job_dirty || self.console.status_tick_due(now) {
                let text = self.status_text(now);
                self.console.set_status(text, now);
            }
        }
        let (out_done, err_done) = self.console.flush();
        let reg = self.poll.registry();
        // Watch writability only while a non-blocking console has a backlog.
        let want_out = !out_done && self.console.out.is_nonblocking();
        if want_out != self.out_watched {
            let fd = self.console.out.raw_fd();
            let _ = if want_out {
                reg.register(&mut SourceFd(&fd), OUT_WRITABLE, Interest::WRITABLE)
            } else {
                reg.deregister(&mut SourceFd(&fd))
            };
            self.out_watched = want_out;
        }
        let want_err = !err_done && self.console.err.is_nonblocking();
        if want_err != self.err_watched {
            let fd = self.console.err.raw_fd();
            let _ = if want_err {
                reg.register(&mut SourceFd(&fd), ERR_WRITABLE, Interest::WRITABLE)
            } else {
                reg.deregister(&mut SourceFd(&fd))
            };
            self.err_watched = want_err;
        }
    }

    /// The live status line: how many ranks run, exited, failed, and the time since the start.
    fn status_text(&self, now: Instant) -> String {
        let (mut running, mut exited, mut failed) = (0, 0, 0);
        for r in &self.ranks {
            match r.info.status {
                None => running += 1,
                Some(s) if s.success() => exited += 1,
                Some(_) => failed += 1,
            }
        }
        let secs = now.saturating_duration_since(self.console.started).as_secs();
        let elapsed = if secs >= 3600 {
            format!("{}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60)
        } else {
            format!("{}:{:02}", secs / 60, secs % 60)
        };
        let stopping = if self.teardown.is_some() { " | stopping" } else { "" };
        format!(
            "dslaunch: {} ranks | {running} running, {exited} exited, {failed} failed | {elapsed}{stopping}",
            self.ranks.len()
        )
    }

    fn reap_rank(&mut self, r: usize) {
        let Some(fd) = self.ranks[r].pidfd.as_ref() else { return };
        let status = match reap::try_reap(fd) {
            Ok(Some(s)) => s,
            Ok(None) => return,
            // Someone else reaped our child (a stray waitpid(-1)); the status is lost.
            Err(_) => ExitStatus::Code(-1),
        };
        if let Some(fd) = self.ranks[r].pidfd.take() {
            self.closer.close(fd); // leaves the epoll set as it closes, like a stream
        }
        self.alive -= 1;
        if let Some(t) = self.teardown.as_mut() {
            if let Some((_, at)) = t.sweep.as_mut() {
                // Ranks are still dying of the signal: look for escapees once that stops.
                *at = (Instant::now() + ESCAPEE_SWEEP_DELAY).min(t.started + ESCAPEE_SWEEP_MAX_DELAY);
            }
        }
        let rank = &mut self.ranks[r];
        rank.info.status = Some(status);
        rank.info.ended_at = Some(SystemTime::now());
        rank.dirty = true;
        self.job_dirty = true;
        self.new_exits.push(r);
        if !status.success() && self.teardown.is_none() && self.first_failure.is_none() {
            self.first_failure = Some(r);
            if self.fail_fast {
                self.begin_teardown(libc::SIGTERM, self.grace);
            }
        }
        if self.alive == 0 {
            self.swept_clean = false;
        }
    }

    fn reap_extra(&mut self, token: usize) {
        if let Some((pid, fd)) = self.extras.remove(&token) {
            let _ = self.poll.registry().deregister(&mut SourceFd(&fd.as_raw_fd()));
            if reap::try_reap(&fd).is_err() {
                reap::reap_zombie(pid);
            }
            self.extra_pids.remove(&pid);
            if self.extras.is_empty() {
                self.swept_clean = false; // look again: something may have been re-parented meanwhile
            }
        }
    }

    /// Starts the teardown: `sig` to every live rank group at once, and to every descendant that
    /// left its group; SIGKILL follows at the deadline.
    fn begin_teardown(&mut self, sig: i32, grace: Duration) {
        if self.teardown.is_some() {
            if sig == libc::SIGKILL {
                self.escalate();
            }
            return;
        }
        if sig == libc::SIGKILL || grace.is_zero() {
            self.escalate();
        } else {
            // The rank groups now; the escaped descendants (another group or session) once the
            // ranks stop dying of it (ESCAPEE_SWEEP_DELAY), if some still run. The escapees of
            // ranks killed by then are re-parented to us, where the end-of-job sweep finds them.
            let now = Instant::now();
            self.teardown = Some(Teardown {
                deadline: now + grace,
                escalated: false,
                rescan_at: None,
                sweep: Some((sig, now + ESCAPEE_SWEEP_DELAY)),
                started: now,
            });
            self.signal_groups_in_turns(sig);
        }
        self.job_dirty = true;
    }

    /// The job ends because of signal `sig` (received, or asked for from outside): the cause
    /// unless a rank failed first.
    fn interrupt(&mut self, sig: i32) {
        if self.first_failure.is_none() {
            self.interrupted_by = Some(sig);
        }
        self.begin_teardown(sig, self.grace);
    }

    fn escalate(&mut self) {
        self.unsignalled.clear(); // SIGKILL goes to every group at once
        self.signal_job(libc::SIGKILL);
        if let Some(t) = self.teardown.as_mut() {
            t.escalated = true;
            t.sweep = None;
            t.rescan_at = Some(Instant::now() + Duration::from_millis(100));
        } else {
            self.teardown = Some(Teardown {
                deadline: Instant::now(),
                escalated: true,
                rescan_at: Some(Instant::now() + Duration::from_millis(100)),
                sweep: None,
                started: Instant::now(),
            });
        }
    }

    /// `sig` to every live rank's group and to every descendant that left it.
    fn signal_job(&mut self, sig: i32) {
        self.signal_groups(sig);
        self.signal_escapees(sig);
    }

    fn live_groups(&self) -> HashSet<i32> {
        self.ranks.iter().filter(|r| r.pidfd.is_some()).map(|r| r.pid).collect()
    }

    /// `sig` to the first SIGNAL_TURN live rank groups now, to the others in the next loop turns.
    fn signal_groups_in_turns(&mut self, sig: i32) {
        self.unsignalled = (0..self.n()).rev().filter(|&r| self.ranks[r].pidfd.is_some()).collect();
        self.unsignalled_sig = sig;
        self.signal_next_turn();
    }

    fn signal_next_turn(&mut self) {
        let from = self.unsignalled.len().saturating_sub(SIGNAL_TURN);
        for r in self.unsignalled.split_off(from) {
            // Only a rank not reaped yet: the pid of a reaped one may name someone else's group.
            if self.ranks[r].pidfd.is_some() {
                signals::killpg(self.ranks[r].pid, self.unsignalled_sig);
                if self.ranks_paused {
                    // A stopped process acts on SIGTERM only once continued (as systemd does).
                    signals::killpg(self.ranks[r].pid, libc::SIGCONT);
                }
            }
        }
    }

    fn signal_groups(&mut self, sig: i32) {
        for pgid in self.live_groups() {
            signals::killpg(pgid, sig);
        }
    }

    fn signal_escapees(&mut self, sig: i32) {
        for pid in self.job_escapees(&self.live_groups()) {
            signals::kill(pid, sig);
            self.watch_extra(pid);
        }
        for &pid in &self.extra_pids {
            signals::kill(pid, sig);
        }
    }

    /// Processes of the job outside the live rank groups: descendants that changed group, and
    /// orphans re-parented to us (we are a subreaper) that carry the job's marker or still sit in
    /// a finished rank's group. Zombies among our adopted children are reaped on the way.
    fn job_escapees(&self, live_groups: &HashSet<i32>) -> Vec<i32> {
        if live_groups.is_empty() && reap::any_child_exited() {
            // Every rank is reaped, so nothing in a rank's group is a rank whose exit its pidfd
            // must see: reap the exited descendants re-parented to us by group, without the
            // /proc read per zombie below (which also makes its reaping dearer). No zombie at
            // all (one waitid says so): no call per group.
            for r in &self.ranks {
                reap::reap_group_zombies(r.pid);
            }
        }
        let procs = self.job_procs(live_groups).unwrap_or_else(tree::snapshot);
        let rank_pids: HashSet<i32> = self.ranks.iter().map(|r| r.pid).collect();
        let guard_pid = self.guard.as_ref().map(|g| g.pid() as i32);
        let mut roots: Vec<i32> = live_groups.iter().copied().collect();
        for p in procs
            .iter()
            .filter(|p| p.ppid == self.my_pid && !rank_pids.contains(&p.pid))
        {
            if Some(p.pid) == guard_pid {
                continue;
            }
            let ours = rank_pids.contains(&p.pgrp) || tree::has_marker(p.pid, &self.marker);
            if p.is_dead() {
                if rank_pids.contains(&p.pgrp) {
                    reap::reap_zombie(p.pid);
                }
            } else if ours {
                roots.push(p.pid);
            }
        }
        let desc = tree::descendants(&procs, &roots);
        let alive: HashSet<i32> = procs.iter().filter(|p| !p.is_dead()).map(|p| p.pid).collect();
        let pgrp: HashMap<i32, i32> = procs.iter().map(|p| (p.pid, p.pgrp)).collect();
        roots
            .into_iter()
            .filter(|p| !live_groups.contains(p))
            .chain(desc)
            .filter(|p| alive.contains(p) && !pgrp.get(p).is_some_and(|g| live_groups.contains(g)))
            .collect()
    }

    /// Our children and everything below the live ones, read by walking down the children
    /// files: every process of the job descends from a live rank or, being a subreaper, from us,
    /// so the cost follows the job (little once its ranks are gone), not the machine's process
    /// count. `None` where the kernel has no children files.
    fn job_procs(&self, live_groups: &HashSet<i32>) -> Option<Vec<tree::ProcStat>> {
        let guard_pid = self.guard.as_ref().map(|g| g.pid() as i32);
        let rank_pids: HashSet<i32> = self.ranks.iter().map(|r| r.pid).collect();
        // The ranks need no stat: we know they lead their groups and whether they were reaped.
        // (Reading /proc/<pid> of a child also makes reaping it dearer: its dentries must go.)
        let mut roots: Vec<i32> = live_groups.iter().copied().collect();
        let mut procs = Vec::new();
        for pid in tree::children_of(self.my_pid)? {
            if rank_pids.contains(&pid) || Some(pid) == guard_pid {
                continue;
            }
            if let Some(st) = tree::read_stat(pid) {
                if !st.is_dead() {
                    roots.push(pid);
                }
                procs.push(st);
            }
        }
        procs.extend(tree::walk_descendants(&roots)?);
        Some(procs)
    }

    /// Reaps every rank that has exited whose event is still queued; returns how many. The
    /// loop can lag behind the exits when dying ranks take both cores.
    fn reap_exited(&mut self) -> usize {
        let before = self.alive;
        for r in 0..self.n() {
            self.reap_rank(r);
        }
        before - self.alive
    }

    fn watch_extra(&mut self, pid: i32) {
        if !self.extra_pids.insert(pid) {
            return;
        }
        let Ok(fd) = reap::pidfd_open(pid) else {
            self.extra_pids.remove(&pid);
            return;
        };
        let token = self.next_extra;
        self.next_extra += 1;
        if self
            .poll
            .registry()
            .register(&mut SourceFd(&fd.as_raw_fd()), Token(token), Interest::READABLE)
            .is_ok()
        {
            self.extras.insert(token, (pid, fd));
            self.leftovers_killed += 1;
        } else {
            self.extra_pids.remove(&pid);
        }
        let _ = self.extra_base;
    }

    fn check_deadlines(&mut self) {
        let now = Instant::now();
        if let Some((sig, at)) = self.teardown.as_ref().and_then(|t| t.sweep) {
            // No rank left (`advance` sweeps what they left), or none died for a while: that
            // is, none that the queued events or a direct look (`reap_exited`) show.
            if self.alive == 0 || (now >= at && self.unsignalled.is_empty() && self.reap_exited() == 0) {
                if let Some(t) = self.teardown.as_mut() {
                    t.sweep = None;
                }
                if self.alive > 0 {
                    self.signal_escapees(sig);
                }
            }
        }
        let Some(t) = self.teardown.as_ref() else { return };
        if !t.escalated && now >= t.deadline {
            self.escalate();
        } else if t.escalated && t.rescan_at.is_some_and(|r| now >= r) {
            if self.alive > 0 || !self.extras.is_empty() {
                self.signal_job(libc::SIGKILL);
                if let Some(t) = self.teardown.as_mut() {
                    t.rescan_at = Some(now + Duration::from_millis(100));
                }
            } else if let Some(t) = self.teardown.as_mut() {
                t.rescan_at = None;
            }
        }
    }

    /// Moves the job towards its end; returns true when it is over.
    fn advance(&mut self) -> bool {
        if self.alive > 0 {
            return false;
        }
        if !self.extras.is_empty() {
            return false;
        }
        if !self.swept_clean {
            // Every rank is reaped: whatever of the job still runs was left behind.
            let leftovers = self.job_escapees(&HashSet::new());
            let teardown_active = self.teardown.is_some();
            if leftovers.is_empty() || !(self.kill_leftovers || teardown_active) {
                self.swept_clean = true;
                self.drain_deadline = Some(Instant::now() + Duration::from_millis(500));
            } else {
                let sig = match &self.teardown {
                    Some(t) if t.escalated => libc::SIGKILL,
                    _ => libc::SIGTERM,
                };
                if self.teardown.is_none() {
                    self.teardown = Some(Teardown {
                        deadline: Instant::now() + self.grace,
                        escalated: false,
                        rescan_at: None,
                        sweep: None,
                        started: Instant::now(),
                    });
                }
                for pid in leftovers {
                    signals::kill(pid, sig);
                    self.watch_extra(pid);
                }
                self.job_dirty = true;
                return false;
            }
        }
        let streams_open = self.streams.iter().any(|s| s.fd.is_some());
        if streams_open && self.drain_deadline.is_some_and(|d| Instant::now() < d) {
            return false;
        }
        true
    }

    fn publish(&mut self, done: bool) {
        if !done && !self.job_dirty && !self.ranks.iter().any(|r| r.dirty) {
            return;
        }
        let mut st = lock(&self.shared.state);
        for (i, r) in self.ranks.iter_mut().enumerate() {
            if r.dirty {
                st.ranks[i] = r.info.clone();
                r.dirty = false;
            }
        }
        st.first_failure = self.first_failure;
        st.interrupted_by = self.interrupted_by;
        st.stopped = self.stopped;
        st.leftovers_killed = self.leftovers_killed;
        if done {
            st.done = true;
            st.ended_at = Some(SystemTime::now());
        }
        drop(st);
        self.job_dirty = false;
        // Announce exits only after the state holding them is published.
        if !self.new_exits.is_empty() {
            lock(&self.shared.exits).append(&mut self.new_exits);
            let _ = rustix::io::write(&self.shared.exit_w, b"x");
        }
    }

    fn finalize(&mut self) {
        // Every rank is reaped and nothing of the job is left: the orphan guard has nothing
        // more to guard. It exits while the console and the descriptors are closed below.
        if let Some(g) = self.guard.as_mut() {
            g.stop();
        }
        for i in 0..self.streams.len() {
            if self.streams[i].fd.is_some() {
                // Drain what is buffered before closing (a process outside our reach may still hold it).
                if let Some(fd) = self.streams[i].fd.as_ref() {
                    let mut chunk = Vec::new();
                    let mut f = File::from(fd.try_clone().expect("dup"));
                    let _ = (&mut f).take(1 << 20).read_to_end(&mut chunk);
                    // FIX (tests/test_core_logmux.py::test_nothing_lost_when_the_job_ends_while_the_console_is_paused):
                    // feed all of it, a buffer at a time. Only the first 64 KiB was fed before, so a
                    // pipe holding more (enlarged with F_SETPIPE_SZ, or fed by a leftover writer) lost
                    // the rest of its rank's output when the job ended while a slow console was paused.
                    for piece in chunk.chunks(self.buf.len()) {
                        self.buf[..piece.len()].copy_from_slice(piece);
                        self.on_output(i, piece.len());
                    }
                }
                self.close_stream(i);
            }
        }
        // The console closes: held lines, then the launcher's last messages, no status line.
        self.console.release(Instant::now(), true);
        self.console.erase_status();
        self.console.status = None;
        let msgs = lock(&self.shared.messages).take().unwrap_or_default();
        for m in msgs {
            self.console.message(m.stderr, &m.text);
        }
        self.console.out.flush_all();
        self.console.err.flush_all();
        for r in &mut self.ranks {
            for log in r.logs.0.iter_mut().flatten() {
                let _ = log.flush();
            }
        }
        self.closer.finish(); // a job reported done has closed all its descriptors
        self.publish(true);
        if let Some(mut g) = self.guard.take() {
            g.finish();
        }
        let _ = rustix::io::write(&self.shared.done_w, b"x");
    }
}

/// Where one stream's segments go (see `route_segment`).
#[derive(Clone, Copy)]
struct Route {
    rank: usize,
    stderr: bool,
    console: bool,
    keep_tail: usize,
    keep_last: bool,
    now: Instant,
}

impl Route {
    /// The route of one stream: only stderr keeps a tail (of `tail_lines` lines), or stdout when
    /// it carries stderr too (`merged`).
    fn new(
        rank: usize,
        stderr: bool,
        merged: bool,
        console: bool,
        tail_lines: usize,
        keep_last: bool,
        now: Instant,
    ) -> Self {
        let keep_tail = if stderr || merged { tail_lines } else { 0 };
        Route {
            rank,
            stderr,
            console,
            keep_tail,
            keep_last,
            now,
        }
    }
}

/// Where each segment of a rank's stream goes: counted, to the console (if shown), into the
/// stderr tail (the last `keep_tail` lines; 0 for stdout) and, if kept, the last line.
fn route_segment<'a>(info: &'a mut RankInfo, console: &'a mut Console, route: Route) -> impl FnMut(&[u8], Ending) + 'a {
    move |seg, ending| {
        info.output_lines += 1;
        if route.console {
            console.line(route.rank, route.stderr, seg, ending, route.now);
        }
        if route.keep_tail > 0 {
            push_tail(&mut info.stderr_tail, seg, route.keep_tail);
        }
        if route.keep_last {
            let line = strip_ending(seg);
            if !line.is_empty() {
                info.last_line.clear();
                info.last_line.extend_from_slice(&line[..line.len().min(1024)]);
            }
        }
    }
}

fn strip_ending(seg: &[u8]) -> &[u8] {
    let mut line = seg;
    while let Some((&last, rest)) = line.split_last() {
        if last == b'\n' || last == b'\r' {
            line = rest;
        } else {
            break;
        }
    }
    line
}

/// Erases the status line (cursor to column 0, clear to the end of the line).
const ERASE_LINE: &[u8] = b"\r\x1b[K";

/// The live status line's state.
struct StatusLine {
    /// Drawn on the stderr sink (else stdout).
    on_err: bool,
    /// What is on the screen now, if anything.
    drawn: Option<Vec<u8>>,
    /// What should be.
    want: Vec<u8>,
    next_tick: Instant,
}

/// One piece of a prefix template: text, `{rank}` or `{tag}`.
#[derive(Debug, PartialEq)]
enum Piece {
    Text(String),
    Rank,
    Tag,
}

/// A prefix template's pieces: `{rank}` and `{tag}` are placeholders, `{{` and `}}` a literal
/// brace (so a template can hold the text `{rank}`: torchrun's templates know only `${...}`);
/// any other brace is text.
fn template_pieces(template: &str) -> Vec<Piece> {
    let mut pieces = Vec::new();
    let mut text = String::new();
    let mut rest = template;
    while let Some(i) = rest.find(['{', '}']) {
        text.push_str(&rest[..i]);
        rest = &rest[i..];
        let (piece, len) = if rest.starts_with("{rank}") {
            (Some(Piece::Rank), 6)
        } else if rest.starts_with("{tag}") {
            (Some(Piece::Tag), 5)
        } else if rest.starts_with("{{") || rest.starts_with("}}") {
            text.push_str(&rest[..1]);
            (None, 2)
        } else {
            text.push_str(&rest[..1]);
            (None, 1)
        };
        if let Some(piece) = piece {
            if !text.is_empty() {
                pieces.push(Piece::Text(std::mem::take(&mut text)));
            }
            pieces.push(piece);
        }
        rest = &rest[len..];
    }
    text.push_str(rest);
    if !text.is_empty() {
        pieces.push(Piece::Text(text));
    }
    pieces
}

/// `template` with `rank` and `tag` in their places, in one pass (a tag holding `{rank}` stays as
/// it is).
fn render_prefix(template: &str, rank: &str, tag: &str) -> String {
    let mut out = String::with_capacity(template.len() + tag.len());
    for piece in template_pieces(template) {
        out.push_str(match &piece {
            Piece::Text(t) => t,
            Piece::Rank => rank,
            Piece::Tag => tag,
        });
    }
    out
}

/// The template's text before and after its one `{tag}`, when it has no `{rank}`: the common
/// case, which `Console::write_held` renders without allocating.
fn tag_split(template: &str) -> Option<(Vec<u8>, Vec<u8>)> {
    let pieces = template_pieces(template);
    let at = pieces.iter().position(|p| *p == Piece::Tag)?;
    if pieces.iter().filter(|p| matches!(p, Piece::Tag | Piece::Rank)).count() != 1 {
        return None;
    }
    let text = |ps: &[Piece]| -> Vec<u8> {
        ps.iter()
            .filter_map(|p| match p {
                Piece::Text(t) => Some(t.as_bytes()),
                _ => None,
            })
            .flatten()
            .copied()
            .collect()
    };
    Some((text(&pieces[..at]), text(&pieces[at + 1..])))
}

/// Everything that reaches the console goes through here: the ranks' lines (straight, or held
/// by the collapser), the launcher's messages, and the status line kept below them.
struct Console {
    out: Sink,
    err: Sink,
    /// Each rank's prefix of each stream (`[stdout, stderr]`; empty for a bare stream).
    prefixes: Vec<[Vec<u8>; 2]>,
    template: Option<String>,
    tags: Vec<String>,
    collapser: Option<Collapser>,
    collapse_out: bool,
    collapse_err: bool,
    status: Option<StatusLine>,
    started: Instant,
    /// The prefix template around its one `{tag}` (none with `{rank}` or several `{tag}`s).
    tag_split: Option<(Vec<u8>, Vec<u8>)>,
    /// Every rank's tag as a number, when all are numbers.
    tag_nums: Option<Vec<u64>>,
    scratch_nums: Vec<u64>,
    scratch_prefix: Vec<u8>,
    /// `Config::console_copies`, opened.
    copies: [Option<CopyFile>; 2],
}

impl Console {
    fn new(cfg: &Config, out: Sink, err: Sink, copies: [Option<CopyFile>; 2]) -> Console {
        let prefixes = cfg
            .ranks
            .iter()
            .enumerate()
            .map(|(i, rc)| {
                let prefix: Vec<u8> = cfg
                    .prefix
                    .as_ref()
                    .map(|p| render_prefix(p, &i.to_string(), &rc.tag).into_bytes())
                    .unwrap_or_default();
                let of = |bare: bool| if bare { Vec::new() } else { prefix.clone() };
                [of(rc.bare[0]), of(rc.bare[1])]
            })
            .collect();
        let (collapse_out, collapse_err) = match (cfg.collapse, &cfg.prefix) {
            (_, None) | (CollapseMode::Off, _) => (false, false),
            (CollapseMode::Terminal, _) => (out.is_terminal(), err.is_terminal()),
            (CollapseMode::On, _) => (true, true),
        };
        let collapser = (collapse_out || collapse_err)
            .then(|| Collapser::new(cfg.ranks.len(), cfg.collapse_window, COLLAPSE_MAX_HELD));
        let status = if !cfg.status_line {
            None
        } else if err.is_terminal() || out.is_terminal() {
            Some(StatusLine {
                on_err: err.is_terminal(),
                drawn: None,
                want: Vec::new(),
                next_tick: Instant::now(),
            })
        } else {
            None
        };
        Console {
            out,
            err,
            prefixes,
            template: cfg.prefix.clone(),
            tags: cfg.ranks.iter().map(|r| r.tag.clone()).collect(),
            collapser,
            collapse_out,
            collapse_err,
            status,
            started: Instant::now(),
            tag_split: cfg.prefix.as_deref().and_then(tag_split),
            tag_nums: cfg.ranks.iter().map(|r| r.tag.parse::<u64>().ok()).collect(),
            scratch_nums: Vec::new(),
            scratch_prefix: Vec::new(),
            copies,
        }
    }

    /// One segment of rank `rank`: held by the collapser, or written behind the rank's prefix.
    fn line(&mut self, rank: usize, stderr: bool, seg: &[u8], ending: Ending, now: Instant) {
        let prefix = &self.prefixes[rank][usize::from(stderr)];
        if let (Some(copy), false) = (&mut self.copies[usize::from(stderr)], prefix.is_empty()) {
            copy.offer(prefix, seg, ending); // as the rank wrote it, before any collapsing
        }
        if let Some(c) = self.collapser.as_mut() {
            let on = if stderr { self.collapse_err } else { self.collapse_out };
            // a bare stream has no prefix to name a rank range with
            if on && !prefix.is_empty() && c.push(rank, stderr, seg, ending, now) {
                return;
            }
        }
        self.erase_status();
        let sink = if stderr { &mut self.err } else { &mut self.out };
        sink.push(&self.prefixes[rank][usize::from(stderr)], seg, ending);
    }

    /// Writes the held lines that are due (all of them with `all`), oldest first.
    fn release(&mut self, now: Instant, all: bool) {
        let Some(mut c) = self.collapser.take() else { return };
        if !c.is_empty() {
            c.release(now, all, |held, line| self.write_held(held, line));
        }
        self.collapser = Some(c);
    }

    fn write_held(&mut self, held: &HeldLine, line: &[u8]) {
        self.erase_status();
        if held.n_ranks() > 1 {
            if let (Some((before, after)), Some(nums)) = (&self.tag_split, &self.tag_nums) {
                // The common case (`[{tag}]: `, numeric tags) without allocating.
                self.scratch_nums.clear();
                self.scratch_nums.extend(held.ranks().map(|r| nums[r as usize]));
                self.scratch_nums.sort_unstable();
                self.scratch_nums.dedup();
                let p = &mut self.scratch_prefix;
                p.clear();
                p.extend_from_slice(before);
                write_ranges(p, &self.scratch_nums);
                p.extend_from_slice(after);
                let sink = if held.stderr { &mut self.err } else { &mut self.out };
                sink.push(&self.scratch_prefix, line, held.ending);
                return;
            }
        }
        let prefix = if held.n_ranks() == 1 {
            std::borrow::Cow::Borrowed(&self.prefixes[held.first as usize][usize::from(held.stderr)][..])
        } else {
            let tags = format_tags(held.ranks().map(|r| self.tags[r as usize].as_str()));
            let idx: Vec<String> = held.ranks().map(|r| r.to_string()).collect();
            let template = self.template.as_deref().unwrap_or_default();
            let rank_range = format_tags(idx.iter().map(String::as_str));
            std::borrow::Cow::Owned(render_prefix(template, &rank_range, &tags).into_bytes())
        };
        let sink = if held.stderr { &mut self.err } else { &mut self.out };
        sink.push(&prefix, line, held.ending);
    }

    /// A launcher message: after every held line, above the status line.
    fn message(&mut self, stderr: bool, text: &[u8]) {
        self.release(Instant::now(), true);
        self.erase_status();
        let sink = if stderr { &mut self.err } else { &mut self.out };
        if !sink.at_line_start() {
            sink.push_raw(b"\n");
        }
        sink.push_raw(text);
        if text.last() != Some(&b'\n') {
            sink.push_raw(b"\n");
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let held = self.collapser.as_ref().and_then(Collapser::next_deadline);
        let tick = self.status.as_ref().map(|s| s.next_tick);
        match (held, tick) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn status_tick_due(&self, now: Instant) -> bool {
        self.status.as_ref().is_some_and(|s| now >= s.next_tick)
    }

    fn set_status(&mut self, text: String, now: Instant) {
        let sink = match &self.status {
            Some(st) if st.on_err => &self.err,
            Some(_) => &self.out,
            None => return,
        };
        let width = sink.columns().unwrap_or(80).saturating_sub(1).max(1);
        let Some(st) = self.status.as_mut() else { return };
        st.want.clear();
        st.want.extend_from_slice(&text.as_bytes()[..text.len().min(width)]);
        st.next_tick = now + Duration::from_secs(1);
    }

    /// Takes the status line off the screen before anything else is written there.
    fn erase_status(&mut self) {
        let Some(st) = self.status.as_mut() else { return };
        if st.drawn.take().is_some() {
            let sink = if st.on_err { &mut self.err } else { &mut self.out };
            sink.push_raw(ERASE_LINE);
            sink.mark_line_start();
        }
    }

    /// Writes what the fds take now, the status line's sink first (an erase waiting there must
    /// reach the terminal before the other stream's lines); then (re)draws the status line once
    /// everything else is out. Returns whether stdout and stderr are fully written.
    fn flush(&mut self) -> (bool, bool) {
        let Some(st) = self.status.as_mut() else {
            return (self.out.flush(), self.err.flush());
        };
        let (own, other) = if st.on_err {
            (&mut self.err, &mut self.out)
        } else {
            (&mut self.out, &mut self.err)
        };
        let mut own_done = own.flush();
        let other_done = if own_done { other.flush() } else { other.backlog() == 0 };
        let quiet = own_done && other_done && own.at_line_start() && (!other.is_terminal() || other.at_line_start());
        if quiet && !st.want.is_empty() && st.drawn.as_ref() != Some(&st.want) {
            if st.drawn.is_some() {
                own.push_raw(b"\r");
            }
            own.push_raw(&st.want);
            own.push_raw(b"\x1b[K");
            // push_raw marked the line as unfinished; the status line does not count as output.
            own.mark_line_start();
            st.drawn = Some(st.want.clone());
            own_done = own.flush();
        }
        if st.on_err {
            (other_done, own_done)
        } else {
            (own_done, other_done)
        }
    }
}

/// Appends sorted, distinct numbers as ranges: `0-6,8-15`.
fn write_ranges(out: &mut Vec<u8>, nums: &[u64]) {
    use std::io::Write as _;
    let mut i = 0;
    while i < nums.len() {
        let mut j = i;
        while j + 1 < nums.len() && nums[j + 1] == nums[j] + 1 {
            j += 1;
        }
        if i > 0 {
            out.push(b',');
        }
        let _ = if i == j {
            write!(out, "{}", nums[i])
        } else {
            write!(out, "{}-{}", nums[i], nums[j])
        };
        i = j + 1;
    }
}

/// The most bytes the collapser holds before it releases lines early.
const COLLAPSE_MAX_HELD: usize = 4 << 20;

fn push_tail(tail: &mut VecDeque<Vec<u8>>, seg: &[u8], limit: usize) {
    let line = strip_ending(seg);
    if tail.len() >= limit {
        if let Some(mut old) = tail.pop_front() {
            old.clear();
            old.extend_from_slice(&line[..line.len().min(4096)]);
            tail.push_back(old);
            return;
        }
    }
    tail.push_back(line[..line.len().min(4096)].to_vec());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_templates_render_in_one_pass_with_escaped_braces() {
        assert_eq!(render_prefix("[{tag}]: ", "0", "3"), "[3]: ");
        assert_eq!(render_prefix("{rank}/{tag} ", "1", "9"), "1/9 ");
        // a literal `{rank}` written `{{rank}}`; a tag holding `{rank}` is not substituted again
        assert_eq!(render_prefix("{{rank}}|{tag}|", "0", "5"), "{rank}|5|");
        assert_eq!(render_prefix("<{tag}>", "0", "{rank}"), "<{rank}>");
        // other braces are text
        assert_eq!(render_prefix("{x} {tag} }", "0", "2"), "{x} 2 }");
    }

    #[test]
    fn the_tag_split_is_the_text_around_the_one_tag() {
        assert_eq!(tag_split("[{tag}]: "), Some((b"[".to_vec(), b"]: ".to_vec())));
        assert_eq!(tag_split("{{tag}} {tag}}}"), Some((b"{tag} ".to_vec(), b"}".to_vec())));
        assert_eq!(tag_split("{rank} {tag}"), None);
        assert_eq!(tag_split("{tag}{tag}"), None);
        assert_eq!(tag_split("plain"), None);
    }
}

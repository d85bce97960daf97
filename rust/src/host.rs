//! The native host: runs a planned job in a process without a Python interpreter.
//!
//! `dslaunch` parses and plans in Python, then `exec`s `dslaunch-host` with the plan
//! (`Supervisor.exec_host`, `plan.rs`). The same pid goes on as a small native process that
//! runs the job with this crate's `Supervisor`, passes signals on, prints the report, writes
//! `--report_json` and ends as the Python host would. What that saves is the interpreter on
//! the paths users wait on: its memory, its wake-up to report, and above all its exit, about
//! 1-2 ms of every SIGTERM teardown (docs/benchmarks.md). Jobs that need Python while they run
//! (the hang watchdog, a multi-node runner's channel, elastic restarts, torchrun's error files)
//! keep the Python host.

use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};

use crate::error::{strerror, CoreError};
use crate::plan::{Finish, HostPlan};
use crate::report;
use crate::supervisor::{Command, Supervisor};

/// Runs the job and ends the process as the Python host does (`command_exit.exit_now`).
pub fn run(plan: HostPlan) -> ! {
    let HostPlan { config, finish } = plan;
    let n = config.ranks.len();
    let run_id = config.run_id.clone();
    let tail_of = if config.merge_stderr { "output" } else { "stderr" };
    // Blocked before the supervisor's threads start, so they inherit the mask (the ranks are
    // spawned with an empty one); a signal this process ignores stays ignored (nohup's SIGHUP).
    let forward: Vec<i32> = finish.forward.iter().copied().filter(|&s| !ignored(s)).collect();
    let signals = match signal_fd(&forward) {
        Ok(fd) => fd,
        Err(e) => fail(&finish, &format!("cannot take signals: {e}")),
    };
    let sup = match Supervisor::start(config) {
        Ok(sup) => sup,
        Err(e) => fail(&finish, &start_error(&e, n)),
    };
    if let Some(text) = &finish.start_message {
        sup.message(true, text.as_bytes());
    }
    while !sup.is_done() {
        let done = sup.done_fd();
        let mut fds = [
            rustix::event::PollFd::new(&done, rustix::event::PollFlags::IN),
            rustix::event::PollFd::new(&signals, rustix::event::PollFlags::IN),
        ];
        let _ = rustix::event::poll(&mut fds, None);
        if fds[1].revents().contains(rustix::event::PollFlags::IN) {
            while let Some(sig) = read_signal(signals.as_fd()) {
                sup.send(Command::Signal(sig));
            }
        }
    }
    sup.wait_timeout(None);
    let state = sup.state();
    remove_pid_file(&finish);
    let status = report::job_status(&state);
    let returncode = report::shell(status);
    let mut err = std::io::stderr().lock();
    if !(finish.quiet && returncode == 0) {
        let mut text = report::render(&state, tail_of).join("\n");
        text.push('\n');
        let _ = err.write_all(text.as_bytes());
    }
    if let Some(path) = &finish.report_json {
        let doc = report::to_json(&state, &run_id, &report::hostname(), returncode);
        if let Err(e) = report::write_atomically(path, &doc) {
            let why = e.raw_os_error().map_or_else(|| e.to_string(), strerror);
            let _ = writeln!(err, "dslaunch: cannot write --report_json {}: {why}", path.display());
        }
    }
    drop(err);
    // DeepSpeed's per-node launcher exits 1 after SIGINT and SIGTERM (`command_exit.per_node_launcher`).
    let code = if finish.launcher_status && (status == -libc::SIGINT || status == -libc::SIGTERM) {
        1
    } else {
        status
    };
    exit_now(code)
}

/// One line on stderr (`<prog>: error: ...`) and exit status 1, with nothing started.
fn fail(finish: &Finish, msg: &str) -> ! {
    remove_pid_file(finish);
    let _ = writeln!(std::io::stderr(), "{}: error: {msg}", finish.prog);
    exit_now(1)
}

/// What the Python host says when a rank cannot start (`launch_run.run_plans`).
fn start_error(e: &CoreError, n: usize) -> String {
    let (source, path) = match e {
        CoreError::Spawn { source, path } | CoreError::LogFile { source, path } => (source, Some(path)),
        CoreError::Io(source) => (source, None),
        other => return format!("cannot start a rank: {other}"),
    };
    let errno = source.raw_os_error();
    let why = errno.map_or_else(|| source.to_string(), strerror);
    let what = path.map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
    let mut msg = format!("cannot start a rank: {why}: {what}")
        .trim_end_matches([':', ' '])
        .to_owned();
    if errno == Some(libc::EMFILE) {
        msg += &format!(
            " ({n} ranks need about {} fds: raise the hard limit, ulimit -Hn)",
            3 * n + 64
        );
    }
    msg
}

fn remove_pid_file(finish: &Finish) {
    if let Some(p) = &finish.pid_file {
        let _ = std::fs::remove_file(p);
    }
}

/// Whether this process ignores `sig` (inherited through exec, as nohup's SIGHUP).
fn ignored(sig: i32) -> bool {
    // SAFETY: sigaction with a null new action only reads the current one into `old`.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(sig, std::ptr::null(), &mut old) == 0 && old.sa_sigaction == libc::SIG_IGN
    }
}

fn sigset(signals: &[i32]) -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the set; sigaddset only sets bits in it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &s in signals {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// Blocks `signals` and returns a signalfd that reads them.
fn signal_fd(signals: &[i32]) -> std::io::Result<OwnedFd> {
    let set = sigset(signals);
    // SAFETY: plain libc calls on an initialised set; the new fd is owned by the OwnedFd.
    unsafe {
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

/// The next signal waiting on the signalfd, if any.
fn read_signal(fd: BorrowedFd<'_>) -> Option<i32> {
    let mut info = [0u8; 128]; // one signalfd_siginfo; ssi_signo is its first field
    match rustix::io::read(fd, &mut info) {
        Ok(128) => Some(i32::from_ne_bytes([info[0], info[1], info[2], info[3]])),
        _ => None,
    }
}

/// Ends the process: with `code`, or by signal N for a code -N (a shell then sees that the
/// job was interrupted; bash stops a loop on a child that died of SIGINT).
fn exit_now(code: i32) -> ! {
    let _ = std::io::stdout().flush();
    if code < 0 {
        let sig = -code;
        // SAFETY: resets one signal to its default action, unblocks it and sends it to this
        // process; setrlimit only lowers this process's core size.
        unsafe {
            if sig == libc::SIGQUIT {
                // A stop by Ctrl-\ ends as one by Ctrl-C: no core dump of dslaunch.
                let mut lim: libc::rlimit = std::mem::zeroed();
                libc::getrlimit(libc::RLIMIT_CORE, &mut lim);
                lim.rlim_cur = 0;
                libc::setrlimit(libc::RLIMIT_CORE, &lim);
            }
            libc::signal(sig, libc::SIG_DFL);
            let set = sigset(&[sig]);
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            libc::kill(libc::getpid(), sig);
        }
    }
    // SAFETY: _exit ends the process at once: the job is over and everything is written.
    unsafe { libc::_exit(report::shell(code) & 0xFF) }
}

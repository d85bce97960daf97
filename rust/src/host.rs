//! The native host: runs a planned job in a process without a Python interpreter.
//!
//! `dslaunch` parses and plans in Python, then `exec`s `dslaunch-host` with the plan
//! (`Supervisor.exec_host`, `plan.rs`). The same pid goes on as a small native process that
//! runs the job with this crate's `Supervisor` on its main thread (`run_here`: the loop reads
//! the signals from a signalfd), passes signals on, prints the report, writes
//! `--report_json` and ends as the Python host would. What that saves is the interpreter on
//! the paths users wait on: its memory, its wake-up to report, and above all its exit, about
//! 1-2 ms of every SIGTERM teardown (docs/benchmarks.md). Jobs that need Python while they run
//! (the hang watchdog, a multi-node runner's channel, elastic restarts, torchrun's error files)
//! keep the Python host.

use std::io::Write;

use crate::error::{strerror, CoreError};
use crate::plan::{Finish, HostPlan};
use crate::supervisor::Supervisor;
use crate::{report, signals};

/// Runs the job and ends the process as the Python host does (`command_exit.exit_now`).
pub fn run(plan: HostPlan) -> ! {
    let HostPlan { config, finish } = plan;
    let n = config.ranks.len();
    let run_id = config.run_id.clone();
    let tail_of = if config.merge_stderr { "output" } else { "stderr" };
    // Blocked before any thread starts (the closer of a big job inherits the mask; the ranks are
    // spawned with an empty one); a signal this process ignores stays ignored (nohup's SIGHUP).
    let forward: Vec<i32> = finish.forward.iter().copied().filter(|&s| !ignored(s)).collect();
    let signals = match signals::signal_fd(&forward) {
        Ok(fd) => fd,
        Err(e) => fail(&finish, &format!("cannot take signals: {e}")),
    };
    // No loop thread: the loop runs here, reads the signals itself and returns when the job is over.
    let started = |sup: &Supervisor| {
        if let Some(text) = &finish.start_message {
            sup.message(true, text.as_bytes());
        }
    };
    let state = match Supervisor::run_here(config, Some(signals), started) {
        Ok(state) => state,
        Err(e) => fail(&finish, &start_error(&e, n)),
    };
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
            let set = signals::sigset(&[sig]);
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            libc::kill(libc::getpid(), sig);
        }
    }
    // SAFETY: _exit ends the process at once: the job is over and everything is written.
    unsafe { libc::_exit(report::shell(code) & 0xFF) }
}

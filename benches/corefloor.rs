//! The core floor: dslaunch's Rust core hosted by a native process instead of Python, for the
//! SIGTERM teardown scenario (a reference line beside `pyfloor`, not a launcher).
//!
//!     corefloor N PROG [ARGS...]
//!
//! Starts N ranks of PROG through `Supervisor` with the CLI's defaults (own process groups,
//! pipes and the console multiplexer, the orphan guard, the subreaper and the leftover sweep),
//! waits for SIGTERM, SIGINT or SIGHUP (blocked, read from a signalfd) or the job's end, passes a
//! signal on as `Command::Signal` (what the Python host's handler does), prints one line for the
//! report and ends by the same signal (or with the job's exit code). What it leaves out of
//! `dslaunch` is the Python interpreter: its start, its report and, above all, its exit.
//!
//! Built by the harness: `cargo build --release --example corefloor`.

use std::ffi::OsString;
use std::io::Write;

use _core::supervisor::{Command, Config, RankConfig, Supervisor};
use rustix::event::{poll, PollFd, PollFlags};

fn main() {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let n: usize = args
        .first()
        .and_then(|a| a.to_str()?.parse().ok())
        .expect("usage: corefloor N PROG [ARGS...]");
    let argv = args[1..].to_vec();
    let stops = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];
    // Block before the supervisor's thread starts, so it inherits the mask (ranks get an empty one).
    // SAFETY: plain libc calls on local, initialised sets.
    let sfd = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in stops {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        libc::signalfd(-1, &set, libc::SFD_CLOEXEC)
    };
    assert!(sfd >= 0, "signalfd failed");
    let ranks = (0..n)
        .map(|i| RankConfig {
            argv: argv.clone(),
            env: [("RANK", i), ("LOCAL_RANK", i), ("WORLD_SIZE", n), ("LOCAL_SIZE", n)]
                .iter()
                .map(|(k, v)| (OsString::from(k), OsString::from(v.to_string())))
                .collect(),
            tag: i.to_string(),
            console: true,
            ..RankConfig::default()
        })
        .collect();
    let run_id = format!("{:012x}", std::process::id());
    let sup = Supervisor::start(Config {
        ranks,
        run_id,
        ..Config::default()
    })
    .expect("start");
    let mut stopped_by = None;
    while !sup.is_done() {
        // SAFETY: sfd is the signalfd made above; BorrowedFd lives only for this poll.
        let sig_fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(sfd) };
        let done = sup.done_fd();
        let mut fds = [PollFd::new(&done, PollFlags::IN), PollFd::new(&sig_fd, PollFlags::IN)];
        let _ = poll(&mut fds, None);
        if fds[1].revents().contains(PollFlags::IN) {
            let mut info = [0u8; 128];
            // SAFETY: reads one signalfd_siginfo (128 bytes) into a buffer of that size.
            if unsafe { libc::read(sfd, info.as_mut_ptr().cast(), info.len()) } == 128 {
                let sig = i32::from_ne_bytes([info[0], info[1], info[2], info[3]]);
                stopped_by.get_or_insert(sig);
                sup.send(Command::Signal(sig));
            }
        }
    }
    sup.wait_timeout(None);
    let state = sup.state();
    let mut err = std::io::stderr().lock();
    match stopped_by {
        Some(sig) => {
            let _ = writeln!(err, "corefloor: stopped by signal {sig}");
            drop(err);
            // SAFETY: default action for `sig`, then unblock it: the process ends by that signal.
            unsafe {
                libc::signal(sig, libc::SIG_DFL);
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, sig);
                libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
                libc::kill(libc::getpid(), sig);
            }
            std::process::exit(128 + sig);
        }
        None => {
            let code = state.exit_code();
            let _ = writeln!(err, "corefloor: {n} ranks ended, exit code {code}");
            std::process::exit(code);
        }
    }
}

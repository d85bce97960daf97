//! Sending signals: to one process, or to a whole process group with one syscall (killpg(2)).
//! `ESRCH` (already gone) is never an error here: a supervisor races with exits all the time.
//! Receiving them: a signalfd, read in an event loop (the native host's).

use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd};

/// Signals that, forwarded to the job, also end it: the job is torn down (the signal first,
/// SIGKILL after the grace period), and a second one kills at once. SIGQUIT (Ctrl-\) too, as
/// torchrun: otherwise it would end the launcher by its default action, with no grace for the ranks.
pub const TERMINATING: [i32; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];

/// Sends `sig` to every process in group `pgid`. Returns false if the group no longer exists.
pub fn killpg(pgid: i32, sig: i32) -> bool {
    if pgid <= 1 {
        return false; // never signal "every process" (-1) or init's group by accident
    }
    // SAFETY: killpg takes plain integers; a bad pgid yields ESRCH/EPERM, nothing unsafe.
    unsafe { libc::killpg(pgid, sig) == 0 }
}

/// Sends `sig` to one process. Returns false if it no longer exists.
pub fn kill(pid: i32, sig: i32) -> bool {
    if pid <= 1 {
        return false; // 0, -1 and 1 would hit our group, everyone, or init
    }
    // SAFETY: kill takes plain integers; a stale pid yields ESRCH, nothing unsafe.
    unsafe { libc::kill(pid, sig) == 0 }
}

/// Whether a signal number is one the kernel knows (1..=64 on Linux).
pub fn is_valid(sig: i32) -> bool {
    (1..=64).contains(&sig)
}

/// A signal set holding `signals`.
pub fn sigset(signals: &[i32]) -> libc::sigset_t {
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

/// Blocks `signals` in the calling thread (threads it starts later inherit that) and returns a
/// non-blocking signalfd that reads them.
pub fn signal_fd(signals: &[i32]) -> std::io::Result<OwnedFd> {
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

/// Every signal waiting on a (non-blocking) signalfd, in the order they came.
pub fn read_all(fd: BorrowedFd<'_>) -> Vec<i32> {
    let mut got = Vec::new();
    let mut info = [0u8; 128]; // one signalfd_siginfo; ssi_signo is its first field
    while let Ok(128) = rustix::io::read(fd, &mut info) {
        got.push(i32::from_ne_bytes([info[0], info[1], info[2], info[3]]));
    }
    got
}

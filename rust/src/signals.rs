//! Sending signals: to one process, or to a whole process group with one syscall (killpg(2)).
//! `ESRCH` (already gone) is never an error here: a supervisor races with exits all the time.

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

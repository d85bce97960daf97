//! Reaping by pidfd: a rank's exit is an epoll event, never a sleep loop, and `waitid(P_PIDFD)`
//! reaps exactly that process, so nothing else in the process (Python's `subprocess`) loses a
//! child to us. See pidfd_open(2) and waitid(2).

use std::io;
use std::os::fd::{AsFd, OwnedFd};

use rustix::process::{Pid, PidfdFlags, WaitId, WaitIdOptions};

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// It called exit(code).
    Code(i32),
    /// It was killed by this signal.
    Signal(i32),
}

impl ExitStatus {
    /// True for `exit(0)`.
    pub fn success(self) -> bool {
        self == ExitStatus::Code(0)
    }

    /// The shell convention: the code itself, or 128+N for a death by signal N.
    pub fn shell_code(self) -> i32 {
        match self {
            ExitStatus::Code(c) => c,
            ExitStatus::Signal(s) => 128 + s,
        }
    }

    /// `subprocess.Popen.returncode` convention: the code, or -N for signal N.
    pub fn returncode(self) -> i32 {
        match self {
            ExitStatus::Code(c) => c,
            ExitStatus::Signal(s) => -s,
        }
    }
}

/// Opens a pidfd for `pid`. Race-free for our own unreaped children: the pid cannot be reused
/// before we reap it.
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    let pid = Pid::from_raw(pid).ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    Ok(rustix::process::pidfd_open(pid, PidfdFlags::empty())?)
}

/// Reaps the process behind `pidfd` if it has exited. `Ok(None)`: still running.
/// `Err(ECHILD)`: it is not our child (it can be watched through a pidfd but not reaped).
pub fn try_reap(pidfd: &impl AsFd) -> io::Result<Option<ExitStatus>> {
    let status = rustix::process::waitid(
        WaitId::PidFd(pidfd.as_fd()),
        WaitIdOptions::EXITED | WaitIdOptions::NOHANG,
    )?;
    Ok(status.and_then(|s| {
        if let Some(code) = s.exit_status() {
            Some(ExitStatus::Code(code))
        } else {
            s.terminating_signal().map(ExitStatus::Signal)
        }
    }))
}

/// Blocks until the process behind `pidfd` (our child) exits, and reaps it.
pub fn reap_blocking(pidfd: &impl AsFd) -> io::Result<ExitStatus> {
    loop {
        let status = match rustix::process::waitid(WaitId::PidFd(pidfd.as_fd()), WaitIdOptions::EXITED) {
            Ok(s) => s,
            Err(e) if e == rustix::io::Errno::INTR => continue,
            Err(e) => return Err(e.into()),
        };
        if let Some(s) = status {
            if let Some(code) = s.exit_status() {
                return Ok(ExitStatus::Code(code));
            }
            if let Some(sig) = s.terminating_signal() {
                return Ok(ExitStatus::Signal(sig));
            }
        }
    }
}

/// Reaps `pid` if it is our child and a zombie; never blocks. Returns whether it reaped.
pub fn reap_zombie(pid: i32) -> bool {
    let mut status = 0;
    // SAFETY: waitpid with WNOHANG on a specific pid only touches that child; `status` is a valid out-pointer.
    unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) == pid }
}

/// Reaps every exited child of ours in process group `pgid`; returns how many. One waitid per
/// zombie and one more, with no /proc reads.
pub fn reap_group_zombies(pgid: i32) -> usize {
    let Some(pgid) = Pid::from_raw(pgid) else { return 0 };
    let mut reaped = 0;
    while let Ok(Some(_)) =
        rustix::process::waitid(WaitId::Pgid(Some(pgid)), WaitIdOptions::EXITED | WaitIdOptions::NOHANG)
    {
        reaped += 1;
    }
    reaped
}

/// Whether some child of ours (any thread's) has exited and waits to be reaped; reaps nothing.
/// One call that lets a sweep skip its per-group `reap_group_zombies` when there is no zombie.
pub fn any_child_exited() -> bool {
    matches!(
        rustix::process::waitid(
            WaitId::All,
            WaitIdOptions::EXITED | WaitIdOptions::NOHANG | WaitIdOptions::NOWAIT,
        ),
        Ok(Some(_))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exited_child_is_seen_and_left_to_be_reaped() {
        let mut child = std::process::Command::new("/bin/sh")
            .args(["-c", "exit 7"])
            .spawn()
            .expect("spawn");
        let pid = child.id() as i32;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !crate::tree::read_stat(pid).is_some_and(|s| s.is_dead()) {
            assert!(std::time::Instant::now() < deadline, "the child never exited");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(any_child_exited());
        // Still there to reap, with its status: the look reaped nothing.
        assert_eq!(child.wait().expect("reap").code(), Some(7));
    }
}

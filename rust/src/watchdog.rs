//! The orphan guard: no rank outlives a launcher that was SIGKILLed.
//!
//! Why a separate process: when the launcher is killed with SIGKILL nothing in it runs again,
//! so someone else must clean up. The alternatives cost more: PR_SET_PDEATHSIG must be set in
//! each child (forcing fork+exec instead of posix_spawn on every rank, or an extra exec shim per
//! rank) and it only reaches direct children, not grandchildren; a cgroup needs someone alive to
//! write `cgroup.kill`. So each supervisor starts one tiny `/bin/sh` (about 1 MB) in its own
//! process group, holding the read end of a pipe whose write end only the launcher has
//! (close-on-exec, so ranks never inherit it). When the supervisor finishes it SIGKILLs the
//! guard; EOF on the pipe means the launcher died, and the guard SIGKILLs every process whose
//! environment carries the job's marker (`DSLAUNCH_RUN_ID=<id>`, given to every rank and
//! inherited by their descendants, setsid or not), scanning /proc until none is left.
//! It costs one posix_spawn per job and nothing per rank.

use std::os::fd::{AsRawFd, OwnedFd};
use std::process::{Child, Command, Stdio};

/// The guard's script. `$1` is the marker entry. `read` returns non-zero on EOF (nothing is
/// ever written: a clean end kills the guard); `grep -z` reads the NUL-separated environ
/// files, `-x` matches a whole entry.
///
/// FIX (tests/test_core_orphans.py::test_guard_catches_processes_in_the_middle_of_execve): it
/// used to exit on the first scan that found nothing, but a process inside execve(2) shows an
/// empty environ for a moment, so one caught there escaped (2 in 10 for a rank that re-execs
/// itself). Now only five empty scans in a row, 10 ms apart, end it.
const SCRIPT: &str = r#"
while IFS= read -r line; do :; done
i=0
quiet=0
while [ $i -lt 100 ]; do
  pids=$(grep -lzxF -- "$1" /proc/[0-9]*/environ 2>/dev/null | cut -d/ -f3)
  if [ -n "$pids" ]; then
    kill -9 $pids 2>/dev/null
    quiet=0
  else
    quiet=$((quiet+1))
    [ $quiet -ge 5 ] && exit 0
    sleep 0.01
  fi
  i=$((i+1))
done
"#;

/// A running orphan guard.
pub struct Watchdog {
    child: Child,
    pipe: Option<OwnedFd>,
}

impl Watchdog {
    /// Starts the guard for processes carrying `marker` (`KEY=VALUE`).
    pub fn start(marker: &str) -> std::io::Result<Watchdog> {
        let (read_end, write_end) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
        let child = Command::new("/bin/sh")
            .arg("-c")
            .arg(SCRIPT)
            .arg("dslaunch-orphan-guard")
            .arg(marker)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .stdin(Stdio::from(read_end))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own group: a Ctrl-C to the launcher's terminal group must not kill the guard.
            .process_group(0)
            .spawn()?;
        Ok(Watchdog {
            child,
            pipe: Some(write_end),
        })
    }

    /// The guard's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Ends the guard (the job ended cleanly) without waiting for it: SIGKILL before the pipe
    /// closes, so the guard never sees the EOF; quicker than a line it would have to read (a
    /// shell reads a byte at a time), and this is on the path of every job's end. `finish`
    /// reaps it; the caller does its own last work in between, while the shell exits.
    pub fn stop(&mut self) {
        if let Some(pipe) = self.pipe.take() {
            crate::signals::kill(self.child.id() as i32, libc::SIGKILL);
            drop(pipe);
        }
    }

    /// Ends the guard if `stop` has not, and reaps it.
    pub fn finish(&mut self) {
        self.stop();
        let _ = self.child.wait();
    }

    /// The write end's fd (tests use it to check it is close-on-exec).
    pub fn pipe_fd(&self) -> Option<i32> {
        self.pipe.as_ref().map(|p| p.as_raw_fd())
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // The supervisor loop died: nobody will tear the job down. Close the pipe without
            // killing the guard, which then sees EOF and kills every process of the job.
            drop(self.pipe.take());
            return;
        }
        self.finish();
    }
}

use std::os::unix::process::CommandExt;

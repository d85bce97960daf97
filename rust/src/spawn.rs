//! Starting one rank. `std::process::Command` with an absolute program path, `process_group(0)`
//! and no `pre_exec` stays on glibc's `posix_spawn` (vfork-style) path, so spawning costs the
//! same whether the launcher holds 50 MB or 50 GB. Anything that needs code in the child
//! (PR_SET_PDEATHSIG, say) would force fork+exec; the orphan guard (`watchdog.rs`) exists so
//! that nothing has to.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::error::{CoreError, CoreResult};
use crate::reap;

/// What to start.
pub struct SpawnRequest<'a> {
    /// The argument vector; `argv[0]` is looked up in the rank's PATH unless it holds a `/`.
    pub argv: &'a [OsString],
    /// The complete environment, or `None` to inherit this process's.
    pub env: Option<&'a [(OsString, OsString)]>,
    /// Variables set on top of `env` (or of the inherited environment).
    pub env_overrides: &'a [(OsString, OsString)],
    /// The working directory, or `None` for ours.
    pub cwd: Option<&'a Path>,
}

/// A started rank: its pid (also its process group id), a pidfd, and the read ends of its
/// stdout and stderr pipes (non-blocking).
pub struct Spawned {
    /// Process id; the rank leads its own process group, so this is also the pgid.
    pub pid: i32,
    /// Becomes readable when the rank exits; reaps it with `waitid(P_PIDFD)`.
    pub pidfd: OwnedFd,
    /// Read end of the rank's stdout.
    pub stdout: OwnedFd,
    /// Read end of the rank's stderr.
    pub stderr: OwnedFd,
}

/// Finds `program` the way execvp(3) would, in `path` (a PATH value); returns it unchanged if it
/// holds a slash. Resolving here keeps std on the posix_spawn path, which it leaves when PATH is
/// set and the program is a bare name.
pub fn resolve_program(program: &OsStr, path: Option<&OsStr>) -> io::Result<PathBuf> {
    if program.as_bytes().contains(&b'/') {
        return Ok(PathBuf::from(program));
    }
    if program.is_empty() {
        return Err(io::Error::from_raw_os_error(libc::ENOENT));
    }
    let path = path.map(OsStr::to_owned).unwrap_or_else(|| OsString::from("/usr/local/bin:/usr/bin:/bin"));
    let mut denied = false;
    for dir in std::env::split_paths(&path) {
        let dir = if dir.as_os_str().is_empty() { PathBuf::from(".") } else { dir };
        let candidate = dir.join(program);
        match is_executable_file(&candidate) {
            Ok(true) => return Ok(candidate),
            Ok(false) => {}
            Err(_) => denied = true,
        }
    }
    // Like execvp: EACCES if a match existed but could not be run, else ENOENT.
    Err(io::Error::from_raw_os_error(if denied { libc::EACCES } else { libc::ENOENT }))
}

/// `Ok(true)`: a regular file we may execute; `Ok(false)`: nothing there; `Err`: there but not runnable.
fn is_executable_file(path: &Path) -> io::Result<bool> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => {
            if rustix::fs::access(path, rustix::fs::Access::EXEC_OK).is_ok() {
                Ok(true)
            } else {
                Err(io::Error::from_raw_os_error(libc::EACCES))
            }
        }
        Ok(_) => Ok(false),
        Err(_) => Ok(false),
    }
}

/// The value of PATH the rank will see.
fn rank_path<'a>(req: &'a SpawnRequest<'a>) -> Option<OsString> {
    let find = |vars: &[(OsString, OsString)]| vars.iter().rev().find(|(k, _)| k == "PATH").map(|(_, v)| v.clone());
    if let Some(p) = find(req.env_overrides) {
        return Some(p);
    }
    match req.env {
        Some(env) => find(env),
        None => std::env::var_os("PATH"),
    }
}

/// Starts one rank in its own process group with stdin on /dev/null and piped stdout/stderr.
pub fn spawn(req: &SpawnRequest<'_>) -> CoreResult<Spawned> {
    let Some(argv0) = req.argv.first() else {
        return Err(CoreError::InvalidArgument("argv must not be empty".into()));
    };
    if let Some(cwd) = req.cwd {
        match std::fs::metadata(cwd) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(CoreError::spawn(io::Error::from_raw_os_error(libc::ENOTDIR), cwd)),
            Err(e) => return Err(CoreError::spawn(e, cwd)),
        }
    }
    let program = match req.cwd {
        // A relative path with a slash is relative to the rank's cwd, as with execve after chdir.
        Some(cwd) if argv0.as_bytes().contains(&b'/') && !argv0.as_bytes().starts_with(b"/") => cwd.join(argv0),
        _ => resolve_program(argv0, rank_path(req).as_deref()).map_err(|e| CoreError::spawn(e, argv0))?,
    };
    let mut cmd = Command::new(&program);
    cmd.arg0(argv0).args(&req.argv[1..]);
    if let Some(env) = req.env {
        cmd.env_clear();
        cmd.envs(env.iter().map(|(k, v)| (k, v)));
    }
    cmd.envs(req.env_overrides.iter().map(|(k, v)| (k, v)));
    if let Some(cwd) = req.cwd {
        cmd.current_dir(cwd);
    }
    cmd.process_group(0).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| CoreError::spawn(e, &program))?;
    let pid = child.id() as i32;
    let stdout: OwnedFd = child.stdout.take().expect("piped stdout").into();
    let stderr: OwnedFd = child.stderr.take().expect("piped stderr").into();
    // `child` is dropped without waiting: std neither kills nor reaps on drop; the pidfd reaps.
    let pidfd = reap::pidfd_open(pid)?;
    set_nonblocking(&stdout)?;
    set_nonblocking(&stderr)?;
    Ok(Spawned { pid, pidfd, stdout, stderr })
}

/// Sets O_NONBLOCK on our end of a pipe (never on a shared terminal or file).
pub fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    let flags = rustix::fs::fcntl_getfl(fd)?;
    rustix::fs::fcntl_setfl(fd, flags | rustix::fs::OFlags::NONBLOCK)?;
    let _ = fd.as_raw_fd();
    Ok(())
}

/// Raises the soft RLIMIT_NOFILE to at least `needed` (bounded by the hard limit), so 1,024
/// ranks (two pipes and a pidfd each) fit. It only raises as far as needed, because ranks
/// inherit the limit and some programs loop over every possible descriptor.
pub fn ensure_nofile(needed: u64) {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a valid, initialised struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 || lim.rlim_cur >= needed {
            return;
        }
        lim.rlim_cur = needed.min(lim.rlim_max);
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
}

/// Makes this process a child subreaper (prctl(2) PR_SET_CHILD_SUBREAPER): descendants
/// orphaned by a rank's exit are re-parented to us instead of init, so the tree stays findable.
pub fn become_subreaper() -> bool {
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_finds_programs_in_path_and_keeps_slashes() {
        let sh = resolve_program(OsStr::new("sh"), Some(OsStr::new("/nonexistent:/bin:/usr/bin"))).unwrap();
        assert!(sh.ends_with("sh") && sh.is_absolute());
        assert_eq!(resolve_program(OsStr::new("./x"), None).unwrap(), PathBuf::from("./x"));
        let e = resolve_program(OsStr::new("no-such-program-dslaunch"), Some(OsStr::new("/bin"))).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
        assert_eq!(resolve_program(OsStr::new(""), None).unwrap_err().raw_os_error(), Some(libc::ENOENT));
    }
}

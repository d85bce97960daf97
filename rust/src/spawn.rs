//! Starting one rank. `std::process::Command` with an absolute program path, `process_group(0)`
//! and no `pre_exec` stays on glibc's `posix_spawn` (vfork-style) path, so spawning costs the
//! same whether the launcher holds 50 MB or 50 GB. Anything that needs code in the child
//! (PR_SET_PDEATHSIG, say) would force fork+exec; the orphan guard (`watchdog.rs`) exists so
//! that nothing has to.

use std::collections::BTreeMap;
use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
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
    /// The rank's stderr is its stdout pipe too: one stream, in the order the rank wrote to
    /// either (DeepSpeed's per-rank log files). The stderr pipe is then at its end at once.
    pub merge_stderr: bool,
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
    /// Read end of the rank's stderr (with `merge_stderr`: a pipe nobody writes to).
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
    let path = path
        .map(OsStr::to_owned)
        .unwrap_or_else(|| OsString::from("/usr/local/bin:/usr/bin:/bin"));
    let mut denied = false;
    for dir in std::env::split_paths(&path) {
        let dir = if dir.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            dir
        };
        let candidate = dir.join(program);
        match is_executable_file(&candidate) {
            Ok(true) => return Ok(candidate),
            Ok(false) => {}
            Err(_) => denied = true,
        }
    }
    // Like execvp: EACCES if a match existed but could not be run, else ENOENT.
    Err(io::Error::from_raw_os_error(if denied {
        libc::EACCES
    } else {
        libc::ENOENT
    }))
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
    let (pid, stdout, stderr) = start_rank(req, &mut BaseEnvCache::default())?;
    finish_spawn(pid, stdout, stderr)
}

/// The spawn itself: the rank's pid and the (blocking) read ends of its two pipes.
fn start_rank(req: &SpawnRequest<'_>, envs: &mut BaseEnvCache) -> CoreResult<(i32, OwnedFd, OwnedFd)> {
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
    // FIX (tests/test_core_spawn.py::test_rank_sees_clean_process_state): std's Command resets
    // only SIGPIPE, so a rank inherited every other ignored disposition (SIGXFSZ, which Python
    // ignores, and signals 32/33, which glibc's posix_spawn child sets to SIG_IGN for its own
    // reasons), and it kept every inheritable fd the launcher had (a shell's leaked fds), where
    // `subprocess.Popen` (close_fds, restore_signals) gives a clean child. Calling posix_spawn
    // ourselves adds POSIX_SPAWN_SETSIGDEF (all signals) and closefrom(3) and stays vfork-cheap.
    match posix_spawn_rank(&program, req, envs) {
        Some(result) => result,
        None => spawn_with_std(&program, req), // glibc older than 2.29 with a cwd: no addchdir_np
    }
}

/// The old path through `std::process::Command` (only when glibc cannot chdir in posix_spawn).
fn spawn_with_std(program: &Path, req: &SpawnRequest<'_>) -> CoreResult<(i32, OwnedFd, OwnedFd)> {
    let argv0 = &req.argv[0];
    let mut cmd = Command::new(program);
    cmd.arg0(argv0).args(&req.argv[1..]);
    if let Some(env) = req.env {
        cmd.env_clear();
        cmd.envs(env.iter().map(|(k, v)| (k, v)));
    }
    cmd.envs(req.env_overrides.iter().map(|(k, v)| (k, v)));
    if let Some(cwd) = req.cwd {
        cmd.current_dir(cwd);
    }
    cmd.process_group(0).stdin(Stdio::null());
    let io_err = |e: io::Error| CoreError::spawn(e, program);
    let merged = if req.merge_stderr {
        let ((out_r, out_w), (err_r, _)) = rank_pipe().and_then(|o| rank_pipe().map(|e| (o, e))).map_err(io_err)?;
        let out_w2 = out_w.try_clone().map_err(io_err)?;
        cmd.stdout(Stdio::from(out_w)).stderr(Stdio::from(out_w2));
        Some((out_r, err_r))
    } else {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        None
    };
    let mut child = cmd.spawn().map_err(io_err)?;
    drop(cmd); // our copies of the merged pipe's write end: EOF when the rank's side closes
    let pid = child.id() as i32;
    let (stdout, stderr): (OwnedFd, OwnedFd) = match merged {
        Some(pair) => pair,
        None => (
            child.stdout.take().expect("piped stdout").into(),
            child.stderr.take().expect("piped stderr").into(),
        ),
    };
    // `child` is dropped without waiting: std neither kills nor reaps on drop; the pidfd reaps.
    Ok((pid, stdout, stderr))
}

/// Opens the pidfd and makes our pipe ends non-blocking. If that fails (EMFILE), the child is
/// killed and reaped here: it is not in anyone's list yet, so nobody else would.
fn finish_spawn(pid: i32, stdout: OwnedFd, stderr: OwnedFd) -> CoreResult<Spawned> {
    let setup = || -> io::Result<OwnedFd> {
        set_nonblocking(&stdout)?;
        set_nonblocking(&stderr)?;
        reap::pidfd_open(pid)
    };
    match setup() {
        Ok(pidfd) => Ok(Spawned {
            pid,
            pidfd,
            stdout,
            stderr,
        }),
        Err(e) => {
            kill_and_reap(pid);
            Err(e.into())
        }
    }
}

/// Kills a rank nobody tracks yet (its group: it leads one) and reaps it.
fn kill_and_reap(pid: i32) {
    crate::signals::killpg(pid, libc::SIGKILL);
    let mut status = 0;
    // SAFETY: waitpid on our own just-started child with a valid out-pointer.
    unsafe { libc::waitpid(pid, &mut status, 0) };
}

/// Starts every request in order and hands each started rank to `accept` as soon as it runs;
/// the first error stops the batch and is returned (the ranks already accepted are the
/// caller's to stop).
///
/// Why a thread: posix_spawn copies the caller's whole fd table into the child, which closes
/// it again before the exec (`closefrom`). A launcher holds two pipes and a pidfd per rank, so
/// starting N ranks from it costs O(N²) in the kernel: about a quarter of the launch time of
/// 1,024 no-op ranks (docs/benchmarks.md, D). The spawns run instead in a short-lived thread
/// that unshares its fd table (unshare(2) CLONE_FILES) and keeps only a socket in it: each
/// child copies a handful of fds, and the read ends come back to the shared table over
/// SCM_RIGHTS. Ranks are still this process's children (any thread may wait for them; when
/// the thread ends they pass to another thread of the process). Where unshare is refused (a
/// seccomp profile) the thread spawns from the shared table, which is just slower.
pub fn spawn_batch(reqs: &[SpawnRequest<'_>], accept: impl FnMut(Spawned)) -> CoreResult<()> {
    spawn_batch_with(reqs, accept, None)
}

/// `spawn_batch`, with the socket's send buffer set to `sndbuf` bytes when given (tests).
fn spawn_batch_with(
    reqs: &[SpawnRequest<'_>],
    mut accept: impl FnMut(Spawned),
    sndbuf: Option<usize>,
) -> CoreResult<()> {
    use rustix::net::{socketpair, AddressFamily, SocketFlags, SocketType};
    use std::sync::atomic::{AtomicBool, Ordering};
    if reqs.len() <= 1 {
        // One rank: a thread and a socket would cost more than the fd table.
        for req in reqs {
            accept(spawn(req)?);
        }
        return Ok(());
    }
    let (ours, theirs) =
        socketpair(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None).map_err(io::Error::from)?;
    if let Some(bytes) = sndbuf {
        rustix::net::sockopt::set_socket_send_buffer_size(&theirs, bytes).map_err(io::Error::from)?;
    }
    let stop = AtomicBool::new(false);
    let (tx, rx) = std::sync::mpsc::channel::<Vec<CoreResult<i32>>>();
    std::thread::scope(|scope| -> CoreResult<()> {
        let (theirs, stop) = (&theirs, &stop);
        std::thread::Builder::new()
            .name("dslaunch-spawn".into())
            .spawn_scoped(scope, move || spawner_thread(reqs, theirs, stop, tx))?;
        let mut failure = None;
        for started in rx.into_iter().flatten() {
            let pid = match started {
                Ok(pid) => pid,
                Err(e) => {
                    failure.get_or_insert(e);
                    continue;
                }
            };
            // The message for this pid is already in the socket: sent before the channel.
            let fds = receive_fds(&ours);
            if failure.is_some() {
                kill_and_reap(pid); // started after we asked the thread to stop
                continue;
            }
            let spawned = match fds {
                Ok((out, err)) => finish_spawn(pid, out, err), // kills and reaps on failure
                Err(e) => {
                    kill_and_reap(pid);
                    Err(e)
                }
            };
            match spawned {
                Ok(s) => accept(s),
                Err(e) => {
                    stop.store(true, Ordering::Relaxed);
                    failure = Some(e);
                }
            }
        }
        failure.map_or(Ok(()), Err)
    })
}

/// Ranks handed to the caller's thread at a time. One wake-up per rank kept a third thread
/// runnable beside the spawning thread and the starting ranks: 1,024 no-op ranks started 8-11%
/// slower on a 2-core machine (docs/benchmarks.md, fix 18).
const HANDOFF: usize = 16;

/// Started ranks (or the error that stopped the batch) on their way to the caller's thread,
/// `HANDOFF` at a time. Whatever is pending is handed over when this is dropped, on every way
/// out of the spawning thread: the caller kills and reaps ranks started after a failure.
struct Handoff {
    tx: std::sync::mpsc::Sender<Vec<CoreResult<i32>>>,
    pending: Vec<CoreResult<i32>>,
}

impl Handoff {
    /// Hands over what is pending; false if the caller has gone.
    fn flush(&mut self) -> bool {
        self.pending.is_empty() || self.tx.send(std::mem::take(&mut self.pending)).is_ok()
    }

    /// Queues one outcome; an error, or a full batch, goes over at once.
    fn push(&mut self, outcome: CoreResult<i32>) -> bool {
        let failed = outcome.is_err();
        self.pending.push(outcome);
        if failed || self.pending.len() >= HANDOFF {
            self.flush()
        } else {
            true
        }
    }
}

impl Drop for Handoff {
    fn drop(&mut self) {
        self.flush();
    }
}

/// The spawning thread: a private fd table holding only its socket (and stdio), then each
/// request in turn. Sends every rank's pipe read ends over `sock`, then its pid on `tx`.
fn spawner_thread(
    reqs: &[SpawnRequest<'_>],
    sock: &OwnedFd,
    stop: &std::sync::atomic::AtomicBool,
    tx: std::sync::mpsc::Sender<Vec<CoreResult<i32>>>,
) {
    use rustix::net::SendFlags;
    // SAFETY: from here on this thread only uses fds it opens itself, plus `sock`, whose copy
    // keeps its number in the private table; no fd of this table is handed to another thread
    // except through SCM_RIGHTS, which installs a new one in the receiver's table.
    if unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::FILES) }.is_ok() {
        let keep = sock.as_raw_fd() as libc::c_uint;
        close_range(3, keep.saturating_sub(1));
        close_range(keep + 1, libc::c_uint::MAX);
    }
    let mut envs = BaseEnvCache::default();
    let mut handoff = Handoff {
        tx,
        pending: Vec::with_capacity(HANDOFF),
    };
    for req in reqs {
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let sent = start_rank(req, &mut envs).and_then(|(pid, out, err)| {
            // The caller reads a rank's fds only once it has its pid: never wait on a full
            // socket while pids are pending here, or both threads would wait for each other.
            let mut sent = send_fds(sock, pid, &out, &err, SendFlags::DONTWAIT);
            if matches!(&sent, Err(e) if e.kind() == io::ErrorKind::WouldBlock) && handoff.flush() {
                sent = send_fds(sock, pid, &out, &err, SendFlags::empty());
            }
            sent.map(|()| pid).map_err(|e| {
                kill_and_reap(pid);
                e.into()
            })
        });
        let failed = sent.is_err();
        if !handoff.push(sent) || failed {
            return;
        }
    }
}

/// close_range(2) over [first, last], where first <= last; nothing to do otherwise. Errors
/// (ENOSYS before Linux 5.9) only leave the private table bigger: a slower spawn, not a wrong one.
fn close_range(first: libc::c_uint, last: libc::c_uint) {
    if first <= last {
        // SAFETY: close_range takes plain integers; it closes only this thread's private table.
        unsafe { libc::syscall(libc::SYS_close_range, first, last, 0) };
    }
}

fn send_fds(sock: &OwnedFd, pid: i32, out: &OwnedFd, err: &OwnedFd, flags: rustix::net::SendFlags) -> io::Result<()> {
    use rustix::net::{sendmsg, SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    let fds = [out.as_fd(), err.as_fd()];
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
    let mut cmsg = SendAncillaryBuffer::new(&mut space);
    cmsg.push(SendAncillaryMessage::ScmRights(&fds));
    let pid_bytes = pid.to_ne_bytes();
    sendmsg(
        sock,
        &[io::IoSlice::new(&pid_bytes)],
        &mut cmsg,
        flags | SendFlags::NOSIGNAL,
    )?;
    Ok(())
}

/// Receives one rank's two read ends. Too few fds (EMFILE in this table truncates the message)
/// is EMFILE.
fn receive_fds(sock: &OwnedFd) -> CoreResult<(OwnedFd, OwnedFd)> {
    use rustix::net::{recvmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags};
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
    let mut cmsg = RecvAncillaryBuffer::new(&mut space);
    let mut pid_bytes = [0u8; 4];
    let msg = recvmsg(
        sock,
        &mut [io::IoSliceMut::new(&mut pid_bytes)],
        &mut cmsg,
        RecvFlags::CMSG_CLOEXEC,
    )
    .map_err(io::Error::from)?;
    let mut fds = Vec::with_capacity(2);
    for m in cmsg.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = m {
            fds.extend(rights);
        }
    }
    let truncated = msg.flags.contains(ReturnFlags::CTRUNC);
    match (fds.pop(), fds.pop()) {
        (Some(err), Some(out)) if !truncated => Ok((out, err)),
        _ => Err(io::Error::from_raw_os_error(libc::EMFILE).into()),
    }
}

type AddChdir = unsafe extern "C" fn(*mut libc::posix_spawn_file_actions_t, *const libc::c_char) -> libc::c_int;
type AddClosefrom = unsafe extern "C" fn(*mut libc::posix_spawn_file_actions_t, libc::c_int) -> libc::c_int;

/// Looks up an optional glibc function once (addchdir_np: glibc 2.29, addclosefrom_np: 2.34),
/// so the extension still loads on an older glibc.
fn glibc_fn(name: &std::ffi::CStr, cache: &std::sync::OnceLock<usize>) -> usize {
    // SAFETY: dlsym with RTLD_DEFAULT and a NUL-terminated name; the result is only an address.
    *cache.get_or_init(|| unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) } as usize)
}

fn cstring(s: &OsStr) -> io::Result<CString> {
    nul_free(s.as_bytes().to_vec())
}

/// A C string of `bytes`; EINVAL if they hold a NUL, as execve's own callers report it.
fn nul_free(bytes: Vec<u8>) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// The `KEY=value` strings of the environment a batch's ranks start from, sorted by key, one per
/// key (the last one given wins). Built once per batch: a rank adds only its few overrides.
/// (Building the whole environment again for every rank, a few dozen allocations each, was
/// about 2% of the launch of 1,024 no-op ranks with a 35-variable environment.)
struct BaseEnv {
    entries: Vec<(OsString, CString)>,
}

/// One rank's environment block: a NULL-terminated array of pointers into the base's strings
/// and the rank's own, which it keeps alive.
struct EnvBlock<'a> {
    ptrs: Vec<*mut libc::c_char>,
    _overrides: Vec<CString>,
    _base: std::marker::PhantomData<&'a BaseEnv>,
}

impl EnvBlock<'_> {
    fn as_ptr(&self) -> *const *mut libc::c_char {
        self.ptrs.as_ptr()
    }
}

fn key_value(key: &OsStr, value: &OsStr) -> io::Result<CString> {
    let mut kv = Vec::with_capacity(key.len() + 1 + value.len());
    kv.extend_from_slice(key.as_bytes());
    kv.push(b'=');
    kv.extend_from_slice(value.as_bytes());
    nul_free(kv)
}

impl BaseEnv {
    fn new(env: Option<&[(OsString, OsString)]>) -> io::Result<BaseEnv> {
        let map: BTreeMap<OsString, OsString> = match env {
            Some(e) => e.iter().cloned().collect(),
            None => std::env::vars_os().collect(),
        };
        let entries = map
            .into_iter()
            .map(|(k, v)| key_value(&k, &v).map(|kv| (k, kv)))
            .collect::<io::Result<_>>()?;
        Ok(BaseEnv { entries })
    }

    /// The base with `overrides` applied, in key order, as `execve` takes it.
    fn block(&self, overrides: &[(OsString, OsString)]) -> io::Result<EnvBlock<'_>> {
        let wanted: BTreeMap<&OsStr, &OsStr> = overrides.iter().map(|(k, v)| (k.as_os_str(), v.as_os_str())).collect();
        let mut own = Vec::with_capacity(wanted.len());
        let mut ptrs = Vec::with_capacity(self.entries.len() + wanted.len() + 1);
        let mut base = self.entries.iter().peekable();
        for (key, value) in wanted {
            while let Some((_, kv)) = base.next_if(|(k, _)| k.as_os_str() < key) {
                ptrs.push(kv.as_ptr() as *mut libc::c_char);
            }
            base.next_if(|(k, _)| k.as_os_str() == key); // replaced by the override
            let kv = key_value(key, value)?;
            ptrs.push(kv.as_ptr() as *mut libc::c_char); // the CString's buffer stays put when moved
            own.push(kv);
        }
        ptrs.extend(base.map(|(_, kv)| kv.as_ptr() as *mut libc::c_char));
        ptrs.push(std::ptr::null_mut());
        Ok(EnvBlock {
            ptrs,
            _overrides: own,
            _base: std::marker::PhantomData,
        })
    }
}

/// The base environment of the requests spawned so far: rebuilt only when a request names
/// another one (all of a supervisor's ranks share one).
#[derive(Default)]
struct BaseEnvCache {
    built: Option<(EnvId, BaseEnv)>,
}

/// Which environment a request names: its slice's address and length, or `None` for ours.
type EnvId = Option<(*const (OsString, OsString), usize)>;

impl BaseEnvCache {
    fn get(&mut self, env: Option<&[(OsString, OsString)]>) -> io::Result<&BaseEnv> {
        let id = env.map(|e| (e.as_ptr(), e.len()));
        if !matches!(&self.built, Some((built_for, _)) if *built_for == id) {
            self.built = Some((id, BaseEnv::new(env)?));
        }
        Ok(&self.built.as_ref().expect("just built").1)
    }
}

/// A pipe whose write end is >= 3, so the dup2 file actions onto 0..=2 cannot clobber it.
fn rank_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
    let w = if w.as_raw_fd() < 3 {
        rustix::io::fcntl_dupfd_cloexec(&w, 3)?
    } else {
        w
    };
    Ok((r, w))
}

/// posix_spawn with stdin on /dev/null, stdout/stderr on fresh pipes, its own process group,
/// an empty signal mask, every signal at its default action and every other fd closed.
/// `None` when this glibc cannot honour the cwd inside posix_spawn.
fn posix_spawn_rank(
    program: &Path,
    req: &SpawnRequest<'_>,
    envs: &mut BaseEnvCache,
) -> Option<CoreResult<(i32, OwnedFd, OwnedFd)>> {
    static ADDCHDIR: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    static ADDCLOSEFROM: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let addchdir = glibc_fn(c"posix_spawn_file_actions_addchdir_np", &ADDCHDIR);
    let addclosefrom = glibc_fn(c"posix_spawn_file_actions_addclosefrom_np", &ADDCLOSEFROM);
    if req.cwd.is_some() && addchdir == 0 {
        return None;
    }
    let io_err = |e: io::Error| CoreError::spawn(e, program);
    let build = || -> io::Result<_> {
        // The chdir happens before the exec, so a relative path must not be re-read from there.
        let prog = match req.cwd {
            Some(_) if program.is_relative() => cstring(std::env::current_dir()?.join(program).as_os_str())?,
            _ => cstring(program.as_os_str())?,
        };
        let argv = req.argv.iter().map(|a| cstring(a)).collect::<io::Result<Vec<_>>>()?;
        let cwd = req.cwd.map(|c| cstring(c.as_os_str())).transpose()?;
        Ok((prog, argv, cwd))
    };
    let (prog, argv, cwd) = match build() {
        Ok(b) => b,
        Err(e) => return Some(Err(io_err(e))),
    };
    // The environment: the base (or ours), then the overrides, later keys replacing earlier.
    let envp = match envs.get(req.env).and_then(|base| base.block(req.env_overrides)) {
        Ok(b) => b,
        Err(e) => return Some(Err(io_err(e))),
    };
    let mut argv_p: Vec<*mut libc::c_char> = argv.iter().map(|a| a.as_ptr() as *mut _).collect();
    argv_p.push(std::ptr::null_mut());
    let pipes = rank_pipe().and_then(|o| rank_pipe().map(|e| (o, e)));
    let ((out_r, out_w), (err_r, err_w)) = match pipes {
        Ok(p) => p,
        Err(e) => return Some(Err(io_err(e))),
    };
    let mut pid: libc::pid_t = 0;
    // SAFETY: the attr and file-actions objects are initialised before use and destroyed after;
    // every pointer passed (paths, argv, envp, the NULL-terminated pointer arrays) outlives the
    // posix_spawn call; the function pointers come from dlsym with the glibc signatures.
    let rc = unsafe {
        let mut fa: libc::posix_spawn_file_actions_t = std::mem::zeroed();
        let mut attr: libc::posix_spawnattr_t = std::mem::zeroed();
        libc::posix_spawn_file_actions_init(&mut fa);
        libc::posix_spawnattr_init(&mut attr);
        let mut rc = libc::posix_spawn_file_actions_addopen(&mut fa, 0, c"/dev/null".as_ptr(), libc::O_RDONLY, 0);
        let err_target = if req.merge_stderr { &out_w } else { &err_w };
        for (fd, target) in [(out_w.as_raw_fd(), 1), (err_target.as_raw_fd(), 2)] {
            if rc == 0 {
                rc = libc::posix_spawn_file_actions_adddup2(&mut fa, fd, target);
            }
        }
        if let (0, Some(cwd)) = (rc, cwd.as_ref()) {
            rc = std::mem::transmute::<usize, AddChdir>(addchdir)(&mut fa, cwd.as_ptr());
        }
        if rc == 0 && addclosefrom != 0 {
            rc = std::mem::transmute::<usize, AddClosefrom>(addclosefrom)(&mut fa, 3);
        }
        let mut none: libc::sigset_t = std::mem::zeroed();
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        // Every bit, not sigfillset: glibc's leaves out its internal signals 32 and 33, and its
        // posix_spawn child then sets those to SIG_IGN, which the exec'd rank would inherit.
        std::ptr::write_bytes(&mut all, 0xff, 1);
        let flags = libc::POSIX_SPAWN_SETPGROUP | libc::POSIX_SPAWN_SETSIGMASK | libc::POSIX_SPAWN_SETSIGDEF;
        for step in [
            libc::posix_spawnattr_setflags(&mut attr, flags as libc::c_short),
            libc::posix_spawnattr_setpgroup(&mut attr, 0),
            libc::posix_spawnattr_setsigmask(&mut attr, &none),
            libc::posix_spawnattr_setsigdefault(&mut attr, &all),
        ] {
            if rc == 0 {
                rc = step;
            }
        }
        if rc == 0 {
            rc = libc::posix_spawn(&mut pid, prog.as_ptr(), &fa, &attr, argv_p.as_ptr(), envp.as_ptr());
        }
        libc::posix_spawn_file_actions_destroy(&mut fa);
        libc::posix_spawnattr_destroy(&mut attr);
        rc
    };
    drop((out_w, err_w));
    if rc != 0 {
        return Some(Err(io_err(io::Error::from_raw_os_error(rc))));
    }
    Some(Ok((pid, out_r, err_r)))
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
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
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

    fn vars(pairs: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
        pairs
            .iter()
            .map(|(k, v)| (OsString::from(k), OsString::from(v)))
            .collect()
    }

    /// Everything read from `fd` until its end (a blocking pipe read end).
    fn read_all(fd: OwnedFd) -> String {
        use std::io::Read;
        let mut text = String::new();
        std::fs::File::from(fd).read_to_string(&mut text).expect("read");
        text
    }

    #[test]
    fn merged_stderr_is_one_stream_in_write_order_on_both_spawn_paths() {
        let argv = [
            OsString::from("/bin/sh"),
            OsString::from("-c"),
            OsString::from("echo a; echo b >&2; echo c; echo d >&2"),
        ];
        let req = SpawnRequest {
            argv: &argv,
            env: None,
            env_overrides: &[],
            cwd: None,
            merge_stderr: true,
        };
        let posix =
            posix_spawn_rank(Path::new("/bin/sh"), &req, &mut BaseEnvCache::default()).expect("posix_spawn path");
        for (pid, out, err) in [
            posix.expect("spawned"),
            spawn_with_std(Path::new("/bin/sh"), &req).expect("spawned"),
        ] {
            assert_eq!(read_all(out), "a\nb\nc\nd\n");
            assert_eq!(read_all(err), "", "nothing writes the stderr pipe");
            let mut status = 0;
            // SAFETY: waitpid on our own child with a valid out-pointer.
            assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        }
    }

    fn strings(block: &EnvBlock<'_>) -> Vec<String> {
        let (last, ptrs) = block.ptrs.split_last().unwrap();
        assert!(last.is_null(), "the block ends with a NULL pointer");
        // SAFETY: every other pointer is a live NUL-terminated string owned by the block or its base.
        ptrs.iter()
            .map(|p| unsafe { std::ffi::CStr::from_ptr(*p) }.to_str().unwrap().to_owned())
            .collect()
    }

    #[test]
    fn an_env_block_is_the_base_with_the_overrides_applied_in_key_order() {
        let base = vars(&[("PATH", "/bin"), ("B", "1"), ("Z", "z"), ("B", "2")]);
        let env = BaseEnv::new(Some(&base)).unwrap();
        let overrides = vars(&[
            ("RANK", "3"),
            ("A", "a"),
            ("PATH", "/usr/bin"),
            ("RANK", "4"),
            ("ZZ", ""),
        ]);
        let block = env.block(&overrides).unwrap();
        // Later keys win, in the base and among the overrides; the overrides replace the base's.
        assert_eq!(strings(&block), ["A=a", "B=2", "PATH=/usr/bin", "RANK=4", "Z=z", "ZZ="]);
        assert_eq!(strings(&env.block(&[]).unwrap()), ["B=2", "PATH=/bin", "Z=z"]);
        let nul = vars(&[("BAD", "a\0b")]);
        assert_eq!(env.block(&nul).err().and_then(|e| e.raw_os_error()), Some(libc::EINVAL));
        assert!(BaseEnv::new(Some(&nul)).is_err());
    }

    #[test]
    fn a_full_socket_never_stalls_the_batch() {
        // A send buffer far smaller than HANDOFF messages: the spawning thread finds the socket
        // full with pids still pending and must hand them over before it waits.
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let argv = [OsString::from("/bin/true")];
            let req = SpawnRequest {
                argv: &argv,
                env: None,
                env_overrides: &[],
                cwd: None,
                merge_stderr: false,
            };
            let reqs: Vec<SpawnRequest<'_>> = (0..3 * HANDOFF).map(|_| SpawnRequest { ..req }).collect();
            let mut started = Vec::new();
            let outcome = spawn_batch_with(&reqs, |s| started.push(s), Some(1));
            for s in &started {
                crate::reap::reap_blocking(&s.pidfd).expect("reaped");
            }
            done_tx.send((outcome.is_ok(), started.len())).unwrap();
        });
        // A stalled batch fails the test instead of hanging it (the stuck thread is left behind).
        let got = done_rx.recv_timeout(std::time::Duration::from_secs(60));
        assert_eq!(got.expect("the batch stalled"), (true, 3 * HANDOFF));
    }

    #[test]
    fn the_base_env_cache_builds_once_per_environment() {
        let (one, two) = (vars(&[("X", "1")]), vars(&[("X", "2")]));
        let mut cache = BaseEnvCache::default();
        // A rebuild makes new strings while the old ones are still alive: another address.
        let string_of = |cache: &mut BaseEnvCache, env| cache.get(Some(env)).unwrap().entries[0].1.as_ptr();
        let first = string_of(&mut cache, &one);
        assert_eq!(string_of(&mut cache, &one), first, "not rebuilt for the same slice");
        assert_eq!(strings(&cache.get(Some(&two)).unwrap().block(&[]).unwrap()), ["X=2"]);
        assert_eq!(strings(&cache.get(Some(&one)).unwrap().block(&[]).unwrap()), ["X=1"]);
    }

    #[test]
    fn resolve_finds_programs_in_path_and_keeps_slashes() {
        let sh = resolve_program(OsStr::new("sh"), Some(OsStr::new("/nonexistent:/bin:/usr/bin"))).unwrap();
        assert!(sh.ends_with("sh") && sh.is_absolute());
        assert_eq!(resolve_program(OsStr::new("./x"), None).unwrap(), PathBuf::from("./x"));
        let e = resolve_program(OsStr::new("no-such-program-dslaunch"), Some(OsStr::new("/bin"))).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
        assert_eq!(
            resolve_program(OsStr::new(""), None).unwrap_err().raw_os_error(),
            Some(libc::ENOENT)
        );
    }
}

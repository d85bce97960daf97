//! Real processes through the public Rust API: spawning and reaping, `kill_tree` on a tree with a
//! setsid grandchild, a supervised job writing prefixed lines to a file, fail-fast teardown, and a
//! job run on the calling thread (`run_here`) that its own signalfd ends.
//! Every test tags what it starts with its own `DSLAUNCH_RUN_ID` and ends by checking that
//! nothing carrying it is still alive. No Python is involved.

use std::ffi::OsString;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use _core::reap::{self, ExitStatus};
use _core::spawn::{self, SpawnRequest};
use _core::supervisor::RUN_ID_VAR;
use _core::{tree, Config, RankConfig, Supervisor};

/// A run id no other test (or test run) uses.
fn unique_id(name: &str) -> String {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
    format!("rust-{name}-{}-{nanos}", std::process::id())
}

fn os(s: &str) -> OsString {
    OsString::from(s)
}

fn sh(script: &str) -> Vec<OsString> {
    vec![os("/bin/sh"), os("-c"), os(script)]
}

/// Polls `pred` every 10 ms until it holds or `timeout` passes.
fn wait_until(timeout: Duration, mut pred: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if pred() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn alive(pid: i32) -> bool {
    tree::read_stat(pid).is_some_and(|s| !s.is_dead())
}

/// The house rule: nothing marked with this run id may outlive the test (2 s for stragglers).
fn assert_nothing_left(run_id: &str) {
    let marker = format!("{RUN_ID_VAR}={run_id}");
    let clean = wait_until(Duration::from_secs(2), || {
        tree::marked_processes(marker.as_bytes()).is_empty()
    });
    let left = tree::marked_processes(marker.as_bytes());
    for &pid in &left {
        // SAFETY: kill with plain integers, on processes carrying this test's own marker.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    assert!(clean, "processes of {run_id} outlived the test: {left:?}");
}

fn spawn_tagged(argv: Vec<OsString>, run_id: &str) -> spawn::Spawned {
    let overrides = [(os(RUN_ID_VAR), os(run_id))];
    spawn::spawn(&SpawnRequest {
        argv: &argv,
        env: None,
        env_overrides: &overrides,
        cwd: None,
        merge_stderr: false,
    })
    .expect("spawn")
}

/// Reads a non-blocking pipe until EOF (the writer has exited), waiting with poll(2).
fn read_to_eof(fd: &OwnedFd) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match rustix::io::read(fd, &mut buf) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e == rustix::io::Errno::AGAIN => {
                let mut fds = [rustix::event::PollFd::new(fd, rustix::event::PollFlags::IN)];
                let ts = rustix::event::Timespec::try_from(Duration::from_secs(10)).unwrap();
                assert!(
                    rustix::event::poll(&mut fds, Some(&ts)).unwrap() > 0,
                    "no output within 10 s"
                );
            }
            Err(e) => panic!("read: {e}"),
        }
    }
}

fn temp_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(unique_id(name))
}

#[test]
fn spawn_and_reap_report_exit_codes_and_signals() {
    let id = unique_id("reap");
    let cases: [(&str, ExitStatus, i32, i32); 4] = [
        ("exit 0", ExitStatus::Code(0), 0, 0),
        ("exit 7", ExitStatus::Code(7), 7, 7),
        ("kill -TERM $$", ExitStatus::Signal(libc::SIGTERM), -15, 143),
        ("kill -KILL $$", ExitStatus::Signal(libc::SIGKILL), -9, 137),
    ];
    for (script, want, returncode, shell) in cases {
        let s = spawn_tagged(sh(script), &id);
        let got = reap::reap_blocking(&s.pidfd).expect("reap");
        assert_eq!(got, want, "{script}");
        assert_eq!(
            (got.returncode(), got.shell_code(), got.success()),
            (returncode, shell, returncode == 0)
        );
        assert!(tree::read_stat(s.pid).is_none(), "reaped: no zombie left for {script}");
    }
    assert_nothing_left(&id);
}

#[test]
fn spawned_rank_leads_its_own_group_with_piped_output() {
    let id = unique_id("group");
    let s = spawn_tagged(sh("echo out; echo err >&2; exec sleep 30"), &id);
    let st = tree::read_stat(s.pid).expect("running");
    assert_eq!(st.pgrp, s.pid, "its own process group");
    assert_eq!(st.ppid, std::process::id() as i32);
    assert_eq!(reap::try_reap(&s.pidfd).unwrap(), None, "still running");
    assert!(wait_until(Duration::from_secs(5), || tree::has_marker(
        s.pid,
        format!("{RUN_ID_VAR}={id}").as_bytes()
    )));
    // Kill only once the shell has exec'd `sleep`, i.e. after both echoes ran.
    assert!(wait_until(Duration::from_secs(5), || std::fs::read_to_string(format!(
        "/proc/{}/comm",
        s.pid
    ))
    .is_ok_and(|c| c.trim() == "sleep")));
    _core::signals::killpg(s.pid, libc::SIGKILL);
    assert_eq!(
        reap::reap_blocking(&s.pidfd).unwrap(),
        ExitStatus::Signal(libc::SIGKILL)
    );
    assert_eq!(read_to_eof(&s.stdout), b"out\n");
    assert_eq!(read_to_eof(&s.stderr), b"err\n");
    assert_nothing_left(&id);
}

#[test]
fn missing_program_is_enoent_naming_it() {
    let argv = vec![os("dslaunch-no-such-program-rust")];
    let err = spawn::spawn(&SpawnRequest {
        argv: &argv,
        env: None,
        env_overrides: &[],
        cwd: None,
        merge_stderr: false,
    })
    .err()
    .expect("error");
    match err {
        _core::CoreError::Spawn { source, path } => {
            assert_eq!(source.raw_os_error(), Some(libc::ENOENT));
            assert_eq!(path, PathBuf::from("dslaunch-no-such-program-rust"));
        }
        other => panic!("unexpected error {other:?}"),
    }
}

#[test]
fn kill_tree_kills_a_setsid_grandchild() {
    let id = unique_id("tree");
    // The grandchild calls setsid (util-linux setsid, not a group leader in a non-interactive
    // shell, so it does not fork) and becomes `sleep`; the rank prints its pid and waits.
    let s = spawn_tagged(sh("setsid sleep 60 & echo $!; exec sleep 60"), &id);
    let mut line = Vec::new();
    let mut buf = [0u8; 64];
    while !line.ends_with(b"\n") {
        let mut fds = [rustix::event::PollFd::new(&s.stdout, rustix::event::PollFlags::IN)];
        let ts = rustix::event::Timespec::try_from(Duration::from_secs(10)).unwrap();
        assert!(rustix::event::poll(&mut fds, Some(&ts)).unwrap() > 0, "no pid printed");
        if let Ok(n) = rustix::io::read(&s.stdout, &mut buf) {
            line.extend_from_slice(&buf[..n]);
        }
    }
    let grandchild: i32 = std::str::from_utf8(&line).unwrap().trim().parse().unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || tree::read_stat(grandchild)
            .is_some_and(|st| st.session == grandchild)),
        "the grandchild runs in a session of its own"
    );
    assert_eq!(tree::read_stat(grandchild).unwrap().ppid, s.pid);
    let signalled = tree::kill_tree(s.pid, Duration::from_secs(2));
    assert!(signalled >= 2, "signalled {signalled}");
    // kill_tree leaves the root to its owner (us) to reap, with its real status.
    assert_eq!(
        reap::reap_blocking(&s.pidfd).unwrap(),
        ExitStatus::Signal(libc::SIGTERM)
    );
    assert!(
        wait_until(Duration::from_secs(2), || !alive(grandchild)),
        "the setsid grandchild survived"
    );
    assert_nothing_left(&id);
}

fn null_fd() -> File {
    File::options().write(true).open("/dev/null").unwrap()
}

#[test]
fn supervisor_writes_prefixed_lines_to_a_file() {
    let _serial = serial();
    let id = unique_id("prefix");
    let path = temp_path("console");
    let console = File::create(&path).unwrap();
    let devnull = null_fd();
    let ranks = (0..4)
        .map(|i| RankConfig {
            argv: sh("echo hello from $R; printf 'no newline %s' $R"),
            env: vec![(os("R"), OsString::from(i.to_string()))],
            tag: format!("r{i}"),
            console: true,
            ..Default::default()
        })
        .collect();
    let cfg = Config {
        ranks,
        run_id: id.clone(),
        stdout_fd: console.as_raw_fd(),
        stderr_fd: devnull.as_fd().as_raw_fd(),
        ..Default::default()
    };
    let sup = Supervisor::start(cfg).expect("start");
    assert_eq!(sup.pids().len(), 4);
    assert!(sup.wait_timeout(Some(Duration::from_secs(30))), "job did not end");
    let st = sup.state();
    assert!(st.done);
    assert_eq!(st.exit_code(), 0);
    assert!(st
        .ranks
        .iter()
        .all(|r| r.status == Some(ExitStatus::Code(0)) && r.output_lines == 2));
    drop(console);
    let mut text = String::new();
    File::open(&path).unwrap().read_to_string(&mut text).unwrap();
    std::fs::remove_file(&path).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    lines.sort_unstable();
    let mut want: Vec<String> = (0..4)
        .flat_map(|i| [format!("[r{i}]: hello from {i}"), format!("[r{i}]: no newline {i}")])
        .collect();
    want.sort_unstable();
    assert_eq!(lines, want);
    assert_nothing_left(&id);
}

#[test]
fn supervisor_fails_fast_on_the_first_failure() {
    let _serial = serial();
    let id = unique_id("failfast");
    let devnull = null_fd();
    let mut ranks: Vec<RankConfig> = (0..3)
        .map(|i| RankConfig {
            argv: vec![os("sleep"), os("60")],
            tag: i.to_string(),
            console: true,
            ..Default::default()
        })
        .collect();
    ranks[1].argv = sh("sleep 0.2; exit 3");
    let cfg = Config {
        ranks,
        run_id: id.clone(),
        grace: Duration::from_secs(30),
        stdout_fd: devnull.as_raw_fd(),
        stderr_fd: devnull.as_raw_fd(),
        ..Default::default()
    };
    let t0 = Instant::now();
    let sup = Supervisor::start(cfg).expect("start");
    assert!(sup.wait_timeout(Some(Duration::from_secs(20))), "job did not end");
    let elapsed = t0.elapsed();
    assert!(
        elapsed < Duration::from_secs(5),
        "teardown took {elapsed:?} (grace 30 s)"
    );
    let st = sup.state();
    assert_eq!(st.first_failure, Some(1));
    assert_eq!(st.exit_code(), 3);
    assert_eq!(st.ranks[1].status, Some(ExitStatus::Code(3)));
    for r in [0, 2] {
        assert_eq!(st.ranks[r].status, Some(ExitStatus::Signal(libc::SIGTERM)), "rank {r}");
    }
    assert!(st.interrupted_by.is_none() && !st.stopped);
    assert_nothing_left(&id);
}

/// Tests that start a batch (directly or through `Supervisor::start`) take this, so one test's
/// spawning thread and socket pair are never counted by another.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// How many sockets this process holds now (no other test here opens one).
fn open_sockets() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy().starts_with("socket:"))
        .count()
}

/// Threads of this process with this name.
fn threads_named(name: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.trim_end() == name)
        .count()
}

#[test]
fn spawn_batch_starts_every_rank_with_its_own_pipes_and_leaks_nothing() {
    let _serial = serial();
    let id = unique_id("batch");
    let sockets = open_sockets();
    let argvs: Vec<Vec<OsString>> = (0..40)
        .map(|i| sh(&format!("echo out{i}; echo err{i} >&2; ls /proc/self/fd | wc -l")))
        .collect();
    let overrides = [(os(RUN_ID_VAR), os(&id))];
    let reqs: Vec<SpawnRequest<'_>> = argvs
        .iter()
        .map(|argv| SpawnRequest {
            argv,
            env: None,
            env_overrides: &overrides,
            cwd: None,
            merge_stderr: false,
        })
        .collect();
    let mut started = Vec::new();
    spawn::spawn_batch(&reqs, |s| started.push(s)).expect("batch");
    assert_eq!(started.len(), 40);
    for (i, s) in started.iter().enumerate() {
        assert_eq!(reap::reap_blocking(&s.pidfd).unwrap(), ExitStatus::Code(0));
        // Each rank's own output on its own pipes, in request order; the rank sees only
        // stdin/stdout/stderr (plus the fd `ls` opens on the directory).
        assert_eq!(read_to_eof(&s.stdout), format!("out{i}\n4\n").into_bytes());
        assert_eq!(read_to_eof(&s.stderr), format!("err{i}\n").into_bytes());
    }
    drop(started);
    // The spawning thread and its socket pair are gone once the batch returns.
    assert_eq!(threads_named("dslaunch-spawn"), 0);
    assert_eq!(open_sockets(), sockets);
    assert_nothing_left(&id);
}

#[test]
fn spawn_batch_stops_at_the_first_failure_and_hands_over_what_started() {
    let _serial = serial();
    let id = unique_id("batchfail");
    let good = sh("exec sleep 30");
    let bad = vec![os("dslaunch-no-such-program-batch")];
    let overrides = [(os(RUN_ID_VAR), os(&id))];
    let req = |argv| SpawnRequest {
        argv,
        env: None,
        env_overrides: &overrides,
        cwd: None,
        merge_stderr: false,
    };
    let reqs = vec![req(&good), req(&good), req(&good), req(&bad), req(&good)];
    let mut started = Vec::new();
    let err = spawn::spawn_batch(&reqs, |s| started.push(s)).expect_err("error");
    assert!(
        matches!(&err, _core::CoreError::Spawn { source, .. } if source.raw_os_error() == Some(libc::ENOENT)),
        "{err:?}"
    );
    // The three before the bad one were handed over (the caller stops them); none after it ran.
    assert_eq!(started.len(), 3);
    for s in &started {
        assert!(alive(s.pid));
        _core::signals::killpg(s.pid, libc::SIGKILL);
        reap::reap_blocking(&s.pidfd).unwrap();
    }
    assert_nothing_left(&id);
}

#[test]
fn run_here_runs_the_job_on_the_calling_thread_and_acts_on_its_signals() {
    let _serial = serial();
    let id = unique_id("runhere");
    let devnull = null_fd();
    let ranks = (0..2)
        .map(|i| RankConfig {
            argv: sh("sleep 60 & wait"), // a grandchild too: the teardown takes both
            tag: i.to_string(),
            ..Default::default()
        })
        .collect();
    let cfg = Config {
        ranks,
        run_id: id.clone(),
        stdout_fd: devnull.as_raw_fd(),
        stderr_fd: devnull.as_raw_fd(),
        ..Default::default()
    };
    // SIGTERM blocked in this thread only; another thread directs one at this thread once the
    // ranks run. A signalfd reads the signals pending for the thread that reads it (and for the
    // process), so the job ends by it only if the loop runs on this thread.
    let fd = _core::signals::signal_fd(&[libc::SIGTERM]).expect("signalfd");
    // SAFETY: pthread_self has no preconditions.
    let me = unsafe { libc::pthread_self() } as usize;
    let (tx, rx) = std::sync::mpsc::channel::<usize>();
    let sender = std::thread::spawn(move || {
        let n = rx.recv().expect("the started callback");
        std::thread::sleep(Duration::from_millis(200));
        // SAFETY: `me` is the test thread, blocked in run_here until this signal ends the job.
        unsafe { libc::pthread_kill(me as libc::pthread_t, libc::SIGTERM) };
        n
    });
    let t0 = Instant::now();
    let st = Supervisor::run_here(cfg, Some(fd), |sup| tx.send(sup.pids().len()).unwrap()).expect("run_here");
    assert_eq!(sender.join().unwrap(), 2, "the callback had the started job's handle");
    assert!(
        t0.elapsed() < Duration::from_secs(20),
        "the SIGTERM did not end the job"
    );
    assert!(st.done && st.ended_at.is_some());
    assert_eq!(st.interrupted_by, Some(libc::SIGTERM));
    assert_eq!(st.exit_code(), 128 + libc::SIGTERM);
    assert!(st
        .ranks
        .iter()
        .all(|r| r.status == Some(ExitStatus::Signal(libc::SIGTERM))));
    assert_nothing_left(&id);
}

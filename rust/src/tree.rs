//! Process trees read from `/proc`: who descends from whom, who carries a job's environment
//! marker, and killing a whole tree, including descendants that left the process group
//! (setsid, double fork). Process groups are a convention, not a boundary, so the walk goes by
//! parent links and the marker, never by group alone.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use crate::{reap, signals};

/// The fields of `/proc/<pid>/stat` the supervisor needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    /// Process id.
    pub pid: i32,
    /// Parent process id.
    pub ppid: i32,
    /// Process group id.
    pub pgrp: i32,
    /// Session id.
    pub session: i32,
    /// State letter: `R`, `S`, `D`, `Z` (zombie), `T`, ...
    pub state: u8,
}

impl ProcStat {
    /// A zombie (exited, not yet reaped) or dead entry.
    pub fn is_dead(&self) -> bool {
        matches!(self.state, b'Z' | b'X' | b'x')
    }
}

/// Parses the text of `/proc/<pid>/stat`. The command name sits in parentheses and may itself
/// contain spaces and parentheses, so fields are counted from the last `)`.
pub fn parse_stat(text: &[u8]) -> Option<ProcStat> {
    let open = memchr::memchr(b'(', text)?;
    let close = memchr::memrchr(b')', text)?;
    if close < open {
        return None;
    }
    let pid = std::str::from_utf8(&text[..open]).ok()?.trim().parse().ok()?;
    let rest = std::str::from_utf8(text.get(close + 1..)?).ok()?;
    let mut fields = rest.split_ascii_whitespace();
    let state = *fields.next()?.as_bytes().first()?;
    let ppid = fields.next()?.parse().ok()?;
    let pgrp = fields.next()?.parse().ok()?;
    let session = fields.next()?.parse().ok()?;
    Some(ProcStat {
        pid,
        ppid,
        pgrp,
        session,
        state,
    })
}

/// Reads one process's stat; `None` if it is gone.
pub fn read_stat(pid: i32) -> Option<ProcStat> {
    let mut buf = [0u8; 1024];
    let mut f = fs::File::open(format!("/proc/{pid}/stat")).ok()?;
    let n = f.read(&mut buf).ok()?;
    parse_stat(&buf[..n])
}

/// Every process on the machine, in one pass over `/proc`.
pub fn snapshot() -> Vec<ProcStat> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()))
        .filter_map(read_stat)
        .collect()
}

/// The children of every thread of process `pid` (`/proc/<pid>/task/*/children`: a child hangs
/// below the thread that forked it). `None` if the process is gone or the kernel lacks
/// CONFIG_PROC_CHILDREN.
pub fn children_of(pid: i32) -> Option<Vec<i32>> {
    let mut out = Vec::new();
    let mut buf = Vec::new();
    for task in fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let mut path = task.ok()?.path();
        path.push("children");
        buf.clear();
        // A thread that exits meanwhile has no file any more; its children moved to another.
        if fs::File::open(&path).and_then(|mut f| f.read_to_end(&mut buf)).is_err() {
            if !children_files_exist() {
                return None;
            }
            continue;
        }
        out.extend(
            buf.split(|b| b.is_ascii_whitespace())
                .filter_map(|w| std::str::from_utf8(w).ok()?.parse::<i32>().ok()),
        );
    }
    Some(out)
}

/// Whether this kernel has `/proc/<pid>/task/<tid>/children` (CONFIG_PROC_CHILDREN).
fn children_files_exist() -> bool {
    static EXISTS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *EXISTS.get_or_init(|| fs::metadata("/proc/thread-self/children").is_ok())
}

/// Every descendant of `roots` (roots excluded) with its stat, found by walking down the
/// children files: the cost follows the size of the trees, not the number of processes on the
/// machine. `None` where the kernel has no children files (use `snapshot` and `descendants`).
pub fn walk_descendants(roots: &[i32]) -> Option<Vec<ProcStat>> {
    if !children_files_exist() {
        return None;
    }
    let mut seen: HashSet<i32> = roots.iter().copied().collect();
    let mut stack: Vec<i32> = roots.to_vec();
    let mut out = Vec::new();
    while let Some(pid) = stack.pop() {
        for c in children_of(pid).unwrap_or_default() {
            if seen.insert(c) {
                if let Some(st) = read_stat(c) {
                    out.push(st);
                    stack.push(c);
                }
            }
        }
    }
    Some(out)
}

/// All descendants of `roots` in `procs` (roots excluded), found through parent links.
pub fn descendants(procs: &[ProcStat], roots: &[i32]) -> Vec<i32> {
    let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
    for p in procs {
        children.entry(p.ppid).or_default().push(p.pid);
    }
    let mut seen: HashSet<i32> = roots.iter().copied().collect();
    let mut stack: Vec<i32> = roots.to_vec();
    let mut out = Vec::new();
    while let Some(pid) = stack.pop() {
        for &c in children.get(&pid).map(Vec::as_slice).unwrap_or(&[]) {
            if seen.insert(c) {
                out.push(c);
                stack.push(c);
            }
        }
    }
    out
}

/// Whether `environ` (NUL-separated `KEY=VALUE` entries) holds exactly the entry `marker`.
pub fn environ_has(environ: &[u8], marker: &[u8]) -> bool {
    environ.split(|&b| b == 0).any(|entry| entry == marker)
}

/// Whether process `pid` was started with the environment entry `marker` (e.g.
/// `DSLAUNCH_RUN_ID=<id>`). Zombies and processes we may not read answer false.
pub fn has_marker(pid: i32, marker: &[u8]) -> bool {
    match fs::read(format!("/proc/{pid}/environ")) {
        Ok(env) => environ_has(&env, marker),
        Err(_) => false,
    }
}

/// Every live process on the machine whose environment holds `marker`.
pub fn marked_processes(marker: &[u8]) -> Vec<i32> {
    snapshot()
        .into_iter()
        .filter(|p| !p.is_dead() && has_marker(p.pid, marker))
        .map(|p| p.pid)
        .collect()
}

/// Kills `pid` and all its descendants: SIGTERM to each (and to its group if it leads one), up
/// to `grace` for them to exit, then SIGKILL to whatever is left, re-walking the tree each round
/// so processes forked meanwhile are caught too. Our own children among the descendants are
/// reaped; `pid` itself is not: its owner (a `subprocess.Popen`, say) reaps it and reads its status.
/// Returns how many distinct processes were signalled.
pub fn kill_tree(pid: i32, grace: Duration) -> usize {
    let my_pid = std::process::id() as i32;
    if pid <= 1 || pid == my_pid {
        return 0;
    }
    let mut signalled: HashSet<i32> = HashSet::new();
    let mut watched: Vec<(i32, OwnedFd)> = Vec::new();
    let deadline = Instant::now() + grace;
    let mut sig = libc::SIGTERM;
    loop {
        let procs = snapshot();
        // FIX (tests/test_core_orphans.py::test_kill_tree_follows_reparented_descendants): walk
        // from the processes signalled earlier that have not exited, too. Once `pid` dies of the
        // SIGTERM, its descendants are re-parented (to init or a subreaper) and no longer descend
        // from it, so ones that ignore SIGTERM were never sent the SIGKILL and survived.
        let mut roots = vec![pid];
        roots.extend(watched.iter().map(|(p, _)| *p));
        let mut targets = roots.clone();
        targets.extend(descendants(&procs, &roots));
        let alive: Vec<&ProcStat> = procs
            .iter()
            .filter(|p| targets.contains(&p.pid) && !p.is_dead())
            .collect();
        for p in &alive {
            if p.pgrp == p.pid {
                signals::killpg(p.pgrp, sig);
            }
            signals::kill(p.pid, sig);
            if signalled.insert(p.pid) {
                if let Ok(fd) = reap::pidfd_open(p.pid) {
                    watched.push((p.pid, fd));
                }
            }
        }
        // Reap the zombies that are ours (the launcher may be their subreaper). FIX
        // (tests/test_core_orphans.py::test_kill_tree_kills_setsid_and_regrouped_descendants):
        // never `pid` itself. Reaping it stole the exit from its owner: `Popen.wait()` then got
        // ECHILD and reported returncode 0 for a process that was killed.
        for p in procs
            .iter()
            .filter(|p| p.pid != pid && targets.contains(&p.pid) && p.is_dead() && p.ppid == my_pid)
        {
            reap::reap_zombie(p.pid);
        }
        if alive.is_empty() {
            break;
        }
        if sig == libc::SIGKILL && Instant::now() > deadline + Duration::from_secs(5) {
            break; // unkillable (D state): give up rather than hang the caller
        }
        let until = if sig == libc::SIGKILL {
            Instant::now() + Duration::from_millis(50)
        } else {
            deadline
        };
        wait_for_exits(&mut watched, until, pid);
        if Instant::now() >= deadline {
            sig = libc::SIGKILL;
        }
    }
    signalled.len()
}

/// Waits on the pidfds (no sleep loop) until every watched process has exited or `until`.
/// Exited ones are reaped if they are ours (except `keep`, the caller's) and dropped from the list.
fn wait_for_exits(watched: &mut Vec<(i32, OwnedFd)>, until: Instant, keep: i32) {
    use rustix::event::{poll, PollFd, PollFlags};
    while !watched.is_empty() {
        let now = Instant::now();
        if now >= until {
            return;
        }
        let exited: Vec<bool> = {
            let mut fds: Vec<PollFd<'_>> = watched.iter().map(|(_, fd)| PollFd::new(fd, PollFlags::IN)).collect();
            let timeout = rustix::event::Timespec::try_from(until - now).ok();
            match poll(&mut fds, timeout.as_ref()) {
                Ok(_) => {}
                Err(e) if e == rustix::io::Errno::INTR => continue,
                Err(_) => return,
            }
            fds.iter().map(|f| !f.revents().is_empty()).collect()
        };
        let mut i = 0;
        watched.retain(|(pid, fd)| {
            let gone = exited[i];
            i += 1;
            if gone && *pid != keep && reap::try_reap(fd).is_err() {
                reap::reap_zombie(*pid);
            }
            !gone
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_odd_command_names() {
        let s = parse_stat(b"1234 (my (weird) cmd) S 1 1234 1234 0 -1 4194560").unwrap();
        assert_eq!(
            s,
            ProcStat {
                pid: 1234,
                ppid: 1,
                pgrp: 1234,
                session: 1234,
                state: b'S'
            }
        );
        let z = parse_stat(b"77 (a b) Z 5 6 7 0").unwrap();
        assert!(z.is_dead());
        assert_eq!(z.ppid, 5);
        assert!(parse_stat(b"garbage").is_none());
        assert!(parse_stat(b"12 (x)").is_none());
    }

    #[test]
    fn descendants_follow_parent_links_not_groups() {
        let p = |pid, ppid, pgrp| ProcStat {
            pid,
            ppid,
            pgrp,
            session: pgrp,
            state: b'S',
        };
        // 10 -> 11 -> 12 (12 escaped to its own group), 10 -> 13; 20 is unrelated.
        let procs = [p(10, 1, 10), p(11, 10, 10), p(12, 11, 12), p(13, 10, 10), p(20, 1, 20)];
        let mut d = descendants(&procs, &[10]);
        d.sort_unstable();
        assert_eq!(d, vec![11, 12, 13]);
        assert!(descendants(&procs, &[20]).is_empty());
    }

    #[test]
    fn environ_marker_must_match_a_whole_entry() {
        let env = b"A=1\0DSLAUNCH_RUN_ID=abc\0B=2\0";
        assert!(environ_has(env, b"DSLAUNCH_RUN_ID=abc"));
        assert!(!environ_has(env, b"DSLAUNCH_RUN_ID=ab"));
        assert!(!environ_has(env, b"RUN_ID=abc"));
    }

    #[test]
    fn children_files_find_a_grandchild() {
        let me = std::process::id() as i32;
        let mut child = std::process::Command::new("/bin/sh")
            .args(["-c", "sleep 30 & echo $!; wait"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.as_mut().unwrap()), &mut line).unwrap();
        let grandchild: i32 = line.trim().parse().unwrap();
        let sh = child.id() as i32;
        assert!(children_of(me).unwrap().contains(&sh));
        let found = walk_descendants(&[sh]).unwrap();
        assert!(found.iter().any(|p| p.pid == grandchild && p.ppid == sh), "{found:?}");
        signals::kill(grandchild, libc::SIGKILL);
        child.wait().unwrap();
    }

    #[test]
    fn walk_finds_what_the_whole_proc_scan_finds() {
        // A tree three levels deep with a setsid branch: the walk down the children files (the
        // sweeps' fast path) must see exactly the descendants the /proc scan (the fallback) sees.
        let mut child = std::process::Command::new("/bin/sh")
            .args([
                "-c",
                "sh -c 'sleep 30 & sleep 30 & wait' & setsid sh -c 'sleep 30 & wait' & sleep 30 & echo go; wait",
            ])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.as_mut().unwrap()), &mut line).unwrap();
        let root = child.id() as i32;
        let deadline = Instant::now() + Duration::from_secs(5);
        let (walked, scanned) = loop {
            // Wait until the grandchildren have forked too (6 descendants: 2 sh, 4 sleep).
            let mut walked: Vec<i32> = walk_descendants(&[root]).unwrap().iter().map(|p| p.pid).collect();
            let mut scanned = descendants(&snapshot(), &[root]);
            walked.sort_unstable();
            scanned.sort_unstable();
            if (walked.len() == 6 && walked == scanned) || Instant::now() > deadline {
                break (walked, scanned);
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        for pid in &scanned {
            signals::kill(*pid, libc::SIGKILL);
        }
        signals::kill(root, libc::SIGKILL);
        child.wait().unwrap();
        assert_eq!(walked.len(), 6, "{walked:?}");
        assert_eq!(walked, scanned);
    }

    #[test]
    fn snapshot_sees_this_process() {
        let me = std::process::id() as i32;
        let procs = snapshot();
        let mine = procs.iter().find(|p| p.pid == me).expect("self in /proc");
        assert_eq!(mine.ppid, std::os::unix::process::parent_id() as i32);
    }
}

//! A job's plan as bytes: how the Python front end hands a `Config` (and what to do once the
//! job is over) to the native host (`host.rs`), across an `exec` of `dslaunch-host`.
//!
//! Both ends are this crate, so the format is a private, length-prefixed binary one: every
//! OS string (argv, environment, paths) travels as raw bytes, which JSON could not carry. A
//! header with a version catches a host binary from another build.

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;
use std::time::Duration;

use crate::supervisor::{CollapseMode, Config, ConsoleCopy, RankConfig};

/// The first bytes of every plan.
const MAGIC: &[u8; 8] = b"DSLPLAN\0";
/// Bump on any change to the layout below.
pub const PLAN_VERSION: u32 = 1;

/// What the host does once the job is over, beside running it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Finish {
    /// Signals passed on to the ranks (`Command::Signal`); those this process ignores are left so.
    pub forward: Vec<i32>,
    /// Printed through the console once the ranks run (the job id line).
    pub start_message: Option<String>,
    /// No report for a job that went well.
    pub quiet: bool,
    /// Where to write `--report_json`.
    pub report_json: Option<PathBuf>,
    /// A `--save_pid` file to remove at the end.
    pub pid_file: Option<PathBuf>,
    /// DeepSpeed's per-node launcher: a job stopped by SIGINT or SIGTERM exits 1 instead of
    /// ending by the signal.
    pub launcher_status: bool,
    /// The command's name for an error line (`dslaunch`, `dslaunch.launch`).
    pub prog: String,
}

/// Everything the native host needs.
#[derive(Debug, Clone)]
pub struct HostPlan {
    pub config: Config,
    pub finish: Finish,
}

/// A plan that cannot be read.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PlanError(String);

/// The plan as bytes.
pub fn encode(plan: &HostPlan) -> Vec<u8> {
    let mut w = Writer(Vec::with_capacity(4096));
    w.0.extend_from_slice(MAGIC);
    w.u32(PLAN_VERSION);
    let c = &plan.config;
    w.u32(c.ranks.len() as u32);
    for r in &c.ranks {
        w.os_list(&r.argv);
        w.env(&r.env);
        w.opt_path(r.cwd.as_ref());
        w.opt_path(r.log_file.as_ref());
        w.opt_path(r.stdout_log_file.as_ref());
        w.opt_path(r.stderr_log_file.as_ref());
        w.bytes(r.tag.as_bytes());
        w.bools(&[r.console, r.quiet_stdout, r.quiet_stderr, r.bare[0], r.bare[1]]);
    }
    w.flag(c.base_env.is_some());
    if let Some(env) = &c.base_env {
        w.env(env);
    }
    w.opt_bytes(c.prefix.as_ref().map(String::as_bytes));
    w.duration(c.grace);
    w.ints(&c.stop_signals);
    w.bools(&[c.fail_fast, c.orphan_guard, c.subreaper, c.kill_leftovers]);
    w.u64(c.stderr_tail as u64);
    w.bytes(c.run_id.as_bytes());
    w.u64(c.max_line as u64);
    w.ints(&[c.stdout_fd, c.stderr_fd]);
    w.u32(match c.collapse {
        CollapseMode::Off => 0,
        CollapseMode::Terminal => 1,
        CollapseMode::On => 2,
    });
    w.duration(c.collapse_window);
    w.bools(&[c.status_line, c.keep_last_line, c.merge_stderr]);
    for copy in &c.console_copies {
        w.flag(copy.is_some());
        if let Some(copy) = copy {
            w.bytes(copy.path.as_os_str().as_bytes());
            w.u32(copy.needles.len() as u32);
            for n in &copy.needles {
                w.bytes(n);
            }
        }
    }
    let f = &plan.finish;
    w.ints(&f.forward);
    w.opt_bytes(f.start_message.as_ref().map(String::as_bytes));
    w.bools(&[f.quiet, f.launcher_status]);
    w.opt_path(f.report_json.as_ref());
    w.opt_path(f.pid_file.as_ref());
    w.bytes(f.prog.as_bytes());
    w.0
}

/// Reads a plan made by `encode` of this same build.
pub fn decode(bytes: &[u8]) -> Result<HostPlan, PlanError> {
    let mut r = Reader { buf: bytes, at: 0 };
    if r.take(MAGIC.len())? != MAGIC {
        return Err(PlanError("not a dslaunch plan".into()));
    }
    let version = r.u32()?;
    if version != PLAN_VERSION {
        return Err(PlanError(format!(
            "a plan of version {version}, this host reads version {PLAN_VERSION}: the host is from another build"
        )));
    }
    let n = r.u32()? as usize;
    let mut ranks = Vec::with_capacity(n.min(1 << 16));
    for _ in 0..n {
        let argv = r.os_list()?;
        let env = r.env()?;
        let cwd = r.opt_path()?;
        let log_file = r.opt_path()?;
        let stdout_log_file = r.opt_path()?;
        let stderr_log_file = r.opt_path()?;
        let tag = r.string()?;
        let [console, quiet_stdout, quiet_stderr, bare_out, bare_err] = r.bools()?;
        ranks.push(RankConfig {
            argv,
            env,
            cwd,
            log_file,
            stdout_log_file,
            stderr_log_file,
            tag,
            console,
            quiet_stdout,
            quiet_stderr,
            bare: [bare_out, bare_err],
        });
    }
    let base_env = if r.flag()? { Some(r.env()?) } else { None };
    let prefix = r.opt_string()?;
    let grace = r.duration()?;
    let stop_signals = r.ints()?;
    let [fail_fast, orphan_guard, subreaper, kill_leftovers] = r.bools()?;
    let stderr_tail = r.u64()? as usize;
    let run_id = r.string()?;
    let max_line = r.u64()? as usize;
    let fds = r.ints()?;
    let [stdout_fd, stderr_fd] = fds[..] else {
        return Err(PlanError("a plan without its two console fds".into()));
    };
    let collapse = match r.u32()? {
        0 => CollapseMode::Off,
        1 => CollapseMode::Terminal,
        2 => CollapseMode::On,
        other => return Err(PlanError(format!("no collapse mode {other}"))),
    };
    let collapse_window = r.duration()?;
    let [status_line, keep_last_line, merge_stderr] = r.bools()?;
    let mut console_copies: [Option<ConsoleCopy>; 2] = [None, None];
    for copy in &mut console_copies {
        if r.flag()? {
            let path = PathBuf::from(OsString::from_vec(r.bytes()?.to_vec()));
            let k = r.u32()? as usize;
            let needles = (0..k)
                .map(|_| r.bytes().map(<[u8]>::to_vec))
                .collect::<Result<_, _>>()?;
            *copy = Some(ConsoleCopy { path, needles });
        }
    }
    let forward = r.ints()?;
    let start_message = r.opt_string()?;
    let [quiet, launcher_status] = r.bools()?;
    let report_json = r.opt_path()?;
    let pid_file = r.opt_path()?;
    let prog = r.string()?;
    if r.at != bytes.len() {
        return Err(PlanError("trailing bytes after the plan".into()));
    }
    Ok(HostPlan {
        config: Config {
            ranks,
            base_env,
            prefix,
            grace,
            stop_signals,
            fail_fast,
            stderr_tail,
            orphan_guard,
            subreaper,
            kill_leftovers,
            run_id,
            max_line,
            stdout_fd,
            stderr_fd,
            collapse,
            collapse_window,
            status_line,
            keep_last_line,
            merge_stderr,
            console_copies,
        },
        finish: Finish {
            forward,
            start_message,
            quiet,
            report_json,
            pid_file,
            launcher_status,
            prog,
        },
    })
}

struct Writer(Vec<u8>);

impl Writer {
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn flag(&mut self, v: bool) {
        self.0.push(u8::from(v));
    }
    fn bools(&mut self, vs: &[bool]) {
        vs.iter().for_each(|&v| self.flag(v));
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
    }
    fn opt_bytes(&mut self, b: Option<&[u8]>) {
        self.flag(b.is_some());
        if let Some(b) = b {
            self.bytes(b);
        }
    }
    fn opt_path(&mut self, p: Option<&PathBuf>) {
        self.opt_bytes(p.map(|p| p.as_os_str().as_bytes()));
    }
    fn os_list(&mut self, items: &[OsString]) {
        self.u32(items.len() as u32);
        items.iter().for_each(|s| self.bytes(s.as_bytes()));
    }
    fn env(&mut self, env: &[(OsString, OsString)]) {
        self.u32(env.len() as u32);
        for (k, v) in env {
            self.bytes(k.as_bytes());
            self.bytes(v.as_bytes());
        }
    }
    fn ints(&mut self, vs: &[i32]) {
        self.u32(vs.len() as u32);
        vs.iter().for_each(|&v| self.u32(v as u32));
    }
    fn duration(&mut self, d: Duration) {
        self.u64(d.as_secs());
        self.u32(d.subsec_nanos());
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], PlanError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.buf.len());
        let end = end.ok_or_else(|| PlanError("the plan is cut short".into()))?;
        let out = &self.buf[self.at..end];
        self.at = end;
        Ok(out)
    }
    fn u32(&mut self) -> Result<u32, PlanError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64, PlanError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn flag(&mut self) -> Result<bool, PlanError> {
        match self.take(1)?[0] {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(PlanError(format!("{other} is not a flag"))),
        }
    }
    fn bools<const N: usize>(&mut self) -> Result<[bool; N], PlanError> {
        let mut out = [false; N];
        for v in &mut out {
            *v = self.flag()?;
        }
        Ok(out)
    }
    fn bytes(&mut self) -> Result<&'a [u8], PlanError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn string(&mut self) -> Result<String, PlanError> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| PlanError("a label that is not UTF-8".into()))
    }
    fn opt_string(&mut self) -> Result<Option<String>, PlanError> {
        if self.flag()? {
            self.string().map(Some)
        } else {
            Ok(None)
        }
    }
    fn os(&mut self) -> Result<OsString, PlanError> {
        Ok(OsString::from_vec(self.bytes()?.to_vec()))
    }
    fn opt_path(&mut self) -> Result<Option<PathBuf>, PlanError> {
        if self.flag()? {
            self.os().map(|s| Some(PathBuf::from(s)))
        } else {
            Ok(None)
        }
    }
    fn os_list(&mut self) -> Result<Vec<OsString>, PlanError> {
        let n = self.u32()? as usize;
        (0..n).map(|_| self.os()).collect()
    }
    fn env(&mut self) -> Result<Vec<(OsString, OsString)>, PlanError> {
        let n = self.u32()? as usize;
        (0..n).map(|_| Ok((self.os()?, self.os()?))).collect()
    }
    fn ints(&mut self) -> Result<Vec<i32>, PlanError> {
        let n = self.u32()? as usize;
        (0..n).map(|_| self.u32().map(|v| v as i32)).collect()
    }
    fn duration(&mut self) -> Result<Duration, PlanError> {
        let secs = self.u64()?;
        let nanos = self.u32()?;
        if nanos >= 1_000_000_000 {
            return Err(PlanError("a duration with more than a second of nanoseconds".into()));
        }
        Ok(Duration::new(secs, nanos))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> HostPlan {
        let rank = |i: usize| RankConfig {
            argv: vec![OsString::from("/bin/echo"), OsString::from_vec(vec![b'a', 0xff, b'z'])],
            env: vec![(OsString::from("RANK"), OsString::from(i.to_string()))],
            cwd: (i == 1).then(|| PathBuf::from("/tmp")),
            log_file: Some(PathBuf::from(format!("/tmp/r{i}.log"))),
            tag: i.to_string(),
            console: i != 2,
            bare: [i == 1, false],
            ..RankConfig::default()
        };
        HostPlan {
            config: Config {
                ranks: (0..3).map(rank).collect(),
                base_env: Some(vec![(OsString::from("PATH"), OsString::from("/bin"))]),
                prefix: Some("[{tag}]: ".into()),
                grace: Duration::MAX,
                stop_signals: vec![2, 15],
                run_id: "abc123".into(),
                collapse: CollapseMode::Terminal,
                collapse_window: Duration::from_millis(250),
                merge_stderr: true,
                console_copies: [
                    None,
                    Some(ConsoleCopy {
                        path: PathBuf::from("/tmp/copy"),
                        needles: vec![b"err".to_vec(), Vec::new()],
                    }),
                ],
                ..Config::default()
            },
            finish: Finish {
                forward: vec![2, 15, 20],
                start_message: Some("dslaunch: job abc123".into()),
                quiet: true,
                report_json: Some(PathBuf::from("/tmp/r.json")),
                pid_file: None,
                launcher_status: true,
                prog: "dslaunch.launch".into(),
            },
        }
    }

    #[test]
    fn a_plan_reads_back_as_written() {
        let plan = sample();
        let back = decode(&encode(&plan)).expect("decodes");
        // Config has no PartialEq (its fds and durations are plain data): compare the debug forms.
        assert_eq!(format!("{:?}", back.config), format!("{:?}", plan.config));
        assert_eq!(back.finish, plan.finish);
    }

    #[test]
    fn a_cut_or_foreign_plan_is_an_error_not_a_panic() {
        let bytes = encode(&sample());
        for cut in [0, 7, 12, bytes.len() / 2, bytes.len() - 1] {
            assert!(decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut other = bytes.clone();
        other[8] = 99; // the version
        let err = decode(&other).unwrap_err().to_string();
        assert!(err.contains("another build"), "{err}");
        let mut longer = bytes;
        longer.push(0);
        assert!(decode(&longer).is_err());
    }
}

//! The report of a finished job, for the native host (`host.rs`): the lines printed when the job
//! ends and the `--report_json` document, the same as the Python host's (`dslaunch/report.py`,
//! whose docstrings say what each part means). `tests/test_native_host.py` runs jobs under both
//! hosts and compares what they print and write.
//!
//! Only what a job without the hang watchdog can report is here: a job with it keeps the Python
//! host.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::reap::ExitStatus;
use crate::supervisor::{JobState, RankInfo};

/// Seconds since the epoch, as the Python objects carry them.
pub fn unix_time(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Python's `signal.Signals(num).name`, or `signal N` for a number without one.
pub fn signal_name(num: i32) -> String {
    const NAMES: [&str; 32] = [
        "",
        "SIGHUP",
        "SIGINT",
        "SIGQUIT",
        "SIGILL",
        "SIGTRAP",
        "SIGABRT",
        "SIGBUS",
        "SIGFPE",
        "SIGKILL",
        "SIGUSR1",
        "SIGSEGV",
        "SIGUSR2",
        "SIGPIPE",
        "SIGALRM",
        "SIGTERM",
        "SIGSTKFLT",
        "SIGCHLD",
        "SIGCONT",
        "SIGSTOP",
        "SIGTSTP",
        "SIGTTIN",
        "SIGTTOU",
        "SIGURG",
        "SIGXCPU",
        "SIGXFSZ",
        "SIGVTALRM",
        "SIGPROF",
        "SIGWINCH",
        "SIGIO",
        "SIGPWR",
        "SIGSYS",
    ];
    match num {
        1..=31 => NAMES[num as usize].to_owned(),
        34 => "SIGRTMIN".to_owned(),
        64 => "SIGRTMAX".to_owned(),
        _ => format!("signal {num}"),
    }
}

/// A failed rank's code as the launcher exits with it: the code's low byte, or 256-N after
/// signal N; never 0 (`command_exit.rank_status`).
fn rank_status(returncode: Option<i32>) -> i32 {
    match returncode {
        None => 1,
        Some(rc) => match rc & 0xFF {
            0 => 1,
            code => code,
        },
    }
}

/// The job's status: 0, the root-cause rank's (`rank_status`), or -N when signal N stopped it
/// (`command_exit.job_status`).
pub fn job_status(st: &JobState) -> i32 {
    if let Some(i) = st.first_failure {
        return rank_status(st.ranks[i].status.map(ExitStatus::returncode));
    }
    if let Some(sig) = st.interrupted_by {
        return -sig;
    }
    if st.exit_code() == 0 {
        return 0;
    }
    let failed = st
        .ranks
        .iter()
        .filter_map(|r| r.status.map(ExitStatus::returncode))
        .find(|&rc| rc != 0);
    rank_status(failed)
}

/// `status` as a shell shows it: 128+N for a command ended by signal N.
pub fn shell(status: i32) -> i32 {
    if status < 0 {
        128 - status
    } else {
        status
    }
}

/// How a rank ended, in the terms of `RankResult` and the report: its `subprocess`-style
/// returncode, the signal that killed it, its shell exit status and its state word.
pub struct Outcome {
    pub returncode: Option<i32>,
    pub signal: Option<i32>,
    pub exit_status: Option<i32>,
    pub state: &'static str,
}

/// The `Outcome` of a rank with this exit status (None: still running).
pub fn outcome(status: Option<ExitStatus>) -> Outcome {
    Outcome {
        returncode: status.map(ExitStatus::returncode),
        signal: match status {
            Some(ExitStatus::Signal(n)) => Some(n),
            _ => None,
        },
        exit_status: status.map(ExitStatus::shell_code),
        state: match status {
            None => "running",
            Some(ExitStatus::Code(0)) => "exited",
            Some(ExitStatus::Code(_)) => "failed",
            Some(ExitStatus::Signal(_)) => "killed",
        },
    }
}

fn describe(r: &RankInfo) -> String {
    match r.status {
        None => "still running".to_owned(),
        Some(ExitStatus::Signal(s)) => format!("killed by {}", signal_name(s)),
        Some(ExitStatus::Code(c)) => format!("exit code {c}"),
    }
}

/// A tag as Python's `str.isdigit()` and `int()` read it (ASCII digits: tags are ranks).
fn numeric_tag(tag: &str) -> Option<u64> {
    (!tag.is_empty() && tag.bytes().all(|b| b.is_ascii_digit()))
        .then(|| tag.parse().ok())
        .flatten()
}

/// `[0, 1, 2, 5, 7, 8]` -> `0-2,5,7-8`.
pub fn rank_ranges(ranks: &[u64]) -> String {
    let mut nums = ranks.to_vec();
    nums.sort_unstable();
    nums.dedup();
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < nums.len() {
        let mut j = i;
        while j + 1 < nums.len() && nums[j + 1] == nums[j] + 1 {
            j += 1;
        }
        out.push(if i == j {
            nums[i].to_string()
        } else {
            format!("{}-{}", nums[i], nums[j])
        });
        i = j + 1;
    }
    out.join(",")
}

fn label(tags: &[&str]) -> String {
    let word = if tags.len() > 1 { "ranks " } else { "rank " };
    let numeric: Vec<u64> = tags.iter().filter_map(|t| numeric_tag(t)).collect();
    if numeric.len() == tags.len() {
        format!("{word}{}", rank_ranges(&numeric))
    } else {
        format!("{word}{}", tags.join(","))
    }
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The hint for a script whose argparse rejected the launcher's local-rank argument.
fn local_rank_hint(tail: &[String]) -> Option<String> {
    const ARGS: [(&str, &str); 2] = [
        (
            "--local_rank=",
            "dslaunch passes it, as deepspeed does: add --no_local_rank before the script",
        ),
        (
            "--local-rank=",
            "dslaunch passes it, as torch.distributed.launch does: add --use-env before the script, \
             as a torchrun script needs",
        ),
    ];
    const MARK: &str = "unrecognized arguments:";
    for line in tail {
        let Some(at) = line.find(MARK) else { continue };
        let rest = &line[at + MARK.len()..];
        if let Some((arg, fix)) = ARGS.iter().find(|(arg, _)| rest.contains(arg)) {
            return Some(format!("dslaunch: hint: the script does not take {arg}N; {fix}"));
        }
    }
    None
}

/// The report's lines (without newlines). `tail_of`: "stderr", or "output" when each rank's
/// stderr went into its stdout.
pub fn render(st: &JobState, tail_of: &str) -> Vec<String> {
    let n = st.ranks.len();
    let s = if n != 1 { "s" } else { "" };
    let started = unix_time(st.started_at);
    let wall = st.ended_at.map_or(0.0, |e| unix_time(e) - started);
    let mut lines = Vec::new();
    if st.exit_code() == 0 {
        lines.push(format!("dslaunch: {n} rank{s} finished OK in {wall:.1} s"));
        return with_notes(lines, st);
    }
    let cause = st.first_failure.map(|i| &st.ranks[i]);
    if let Some(c) = cause {
        let ended = c.ended_at.map_or(started, unix_time);
        lines.push(format!(
            "dslaunch: rank {} (pid {}) failed: {} after {:.1} s; the job was torn down",
            c.tag,
            c.pid,
            describe(c),
            ended - unix_time(c.started_at)
        ));
    } else if let Some(sig) = st.interrupted_by {
        lines.push(format!("dslaunch: stopped by {} after {wall:.1} s", signal_name(sig)));
    } else if st.stopped {
        lines.push(format!("dslaunch: stopped after {wall:.1} s"));
    }
    // Ranks grouped by how they ended, in the order each way of ending is first seen.
    let mut groups: Vec<(String, Vec<&str>)> = Vec::new();
    for r in &st.ranks {
        let what = describe(r);
        match groups.iter_mut().find(|(w, _)| *w == what) {
            Some((_, tags)) => tags.push(&r.tag),
            None => groups.push((what, vec![&r.tag])),
        }
    }
    let parts: Vec<String> = groups
        .iter()
        .map(|(what, tags)| format!("{}: {what}", label(tags)))
        .collect();
    lines.push(format!("dslaunch: {}", parts.join("; ")));
    if let Some(c) = cause.filter(|c| !c.stderr_tail.is_empty()) {
        let tail: Vec<String> = c.stderr_tail.iter().map(|l| lossy(l)).collect();
        lines.push(format!("dslaunch: last {tail_of} lines of rank {}:", c.tag));
        lines.extend(tail.iter().cloned());
        lines.extend(local_rank_hint(&tail));
    }
    with_notes(lines, st)
}

/// The leftovers and incomplete-log lines every report ends with.
fn with_notes(mut lines: Vec<String>, st: &JobState) -> Vec<String> {
    if st.leftovers_killed > 0 {
        lines.push(format!(
            "dslaunch: killed {} process(es) the ranks left behind",
            st.leftovers_killed
        ));
    }
    for r in &st.ranks {
        if let Some(e) = &r.log_error {
            lines.push(format!("dslaunch: the log file of rank {} is incomplete: {e}", r.tag));
        }
    }
    lines
}

// ---- --report_json ---------------------------------------------------------------------

/// A JSON value, printed as Python's `json.dump(doc, f, indent=1)` prints the Python host's.
enum Json {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    List(Vec<Json>),
    Object(Vec<(&'static str, Json)>),
}

impl Json {
    fn opt<T>(v: Option<T>, f: impl FnOnce(T) -> Json) -> Json {
        v.map_or(Json::Null, f)
    }

    fn write(&self, out: &mut String, depth: usize) {
        match self {
            Json::Null => out.push_str("null"),
            Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Json::Int(i) => {
                let _ = write!(out, "{i}");
            }
            Json::Float(f) => out.push_str(&py_float(*f)),
            Json::Str(s) => write_str(out, s),
            Json::List(items) if items.is_empty() => out.push_str("[]"),
            Json::Object(items) if items.is_empty() => out.push_str("{}"),
            Json::List(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    out.push_str(if i == 0 { "\n" } else { ",\n" });
                    indent(out, depth + 1);
                    item.write(out, depth + 1);
                }
                out.push('\n');
                indent(out, depth);
                out.push(']');
            }
            Json::Object(items) => {
                out.push('{');
                for (i, (key, value)) in items.iter().enumerate() {
                    out.push_str(if i == 0 { "\n" } else { ",\n" });
                    indent(out, depth + 1);
                    write_str(out, key);
                    out.push_str(": ");
                    value.write(out, depth + 1);
                }
                out.push('\n');
                indent(out, depth);
                out.push('}');
            }
        }
    }
}

fn indent(out: &mut String, depth: usize) {
    out.push_str(&" ".repeat(depth));
}

/// A JSON string as Python's `json` writes it (`ensure_ascii`: everything past ASCII escaped).
fn write_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            ' '..='~' => out.push(c),
            _ => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{u:04x}");
                }
            }
        }
    }
    out.push('"');
}

/// A float as Python's `repr` writes it: the shortest digits that read back, positional for
/// exponents -4..16, else `1e-05` / `1.5e+16`.
pub fn py_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".to_owned();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.to_owned();
    }
    let sci = format!("{f:e}"); // shortest round-trip digits: "-1.2345e-7"
    let (mantissa, exp) = sci.split_once('e').expect("{:e} has an exponent");
    let exp: i32 = exp.parse().expect("an integer exponent");
    let (sign, mantissa) = mantissa.strip_prefix('-').map_or(("", mantissa), |m| ("-", m));
    if !(-4..16).contains(&exp) {
        let esign = if exp < 0 { '-' } else { '+' };
        return format!("{sign}{mantissa}e{esign}{:02}", exp.abs());
    }
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if exp < 0 {
        return format!("{sign}0.{}{digits}", "0".repeat((-exp - 1) as usize));
    }
    let point = exp as usize + 1;
    if digits.len() <= point {
        format!("{sign}{digits}{}.0", "0".repeat(point - digits.len()))
    } else {
        format!("{sign}{}.{}", &digits[..point], &digits[point..])
    }
}

/// Version of the `--report_json` document (`report.REPORT_SCHEMA`).
const REPORT_SCHEMA: &str = "dslaunch.report/1";

fn rank_fields(r: &RankInfo, host: &str) -> Vec<(&'static str, Json)> {
    let Outcome {
        returncode,
        signal,
        exit_status,
        state,
    } = outcome(r.status);
    let int = |v: i32| Json::Int(v.into());
    let time = |t: SystemTime| Json::Float(unix_time(t));
    vec![
        (
            "rank",
            numeric_tag(&r.tag).map_or_else(|| Json::Str(r.tag.clone()), |n| Json::Int(n as i64)),
        ),
        ("host", Json::Str(host.to_owned())),
        ("pid", int(r.pid)),
        ("state", Json::Str(state.to_owned())),
        ("returncode", Json::opt(returncode, int)),
        ("signal", Json::opt(signal, int)),
        ("signal_name", Json::opt(signal, |s| Json::Str(signal_name(s)))),
        ("exit_status", Json::opt(exit_status, int)),
        ("started_at", time(r.started_at)),
        ("ended_at", Json::opt(r.ended_at, time)),
        ("last_output_at", Json::opt(r.last_output_at, time)),
        ("output_bytes", Json::Int(r.output_bytes as i64)),
        ("output_lines", Json::Int(r.output_lines as i64)),
        (
            "stderr_tail",
            Json::List(r.stderr_tail.iter().map(|l| Json::Str(lossy(l))).collect()),
        ),
        (
            "last_line",
            Json::opt((!r.last_line.is_empty()).then(|| lossy(&r.last_line)), Json::Str),
        ),
        ("log_error", Json::opt(r.log_error.clone(), Json::Str)),
        ("restarts", Json::Int(0)),
    ]
}

/// The `--report_json` document (docs/report.md), with `returncode` the launcher's status as a
/// shell shows it.
pub fn to_json(st: &JobState, run_id: &str, host: &str, returncode: i32) -> String {
    let started = unix_time(st.started_at);
    let ended = st.ended_at.map(unix_time);
    let root = if let Some(i) = st.first_failure {
        let mut fields = vec![("kind", Json::Str("rank_failed".into()))];
        fields.extend(rank_fields(&st.ranks[i], host));
        Json::Object(fields)
    } else if let Some(sig) = st.interrupted_by {
        Json::Object(vec![
            ("kind", Json::Str("signal".into())),
            ("signal", Json::Int(sig.into())),
            ("signal_name", Json::Str(signal_name(sig))),
        ])
    } else if st.stopped {
        Json::Object(vec![("kind", Json::Str("stopped".into()))])
    } else {
        Json::Null
    };
    let doc = Json::Object(vec![
        ("schema", Json::Str(REPORT_SCHEMA.into())),
        ("run_id", Json::Str(run_id.to_owned())),
        ("host", Json::Str(host.to_owned())),
        ("started_at", Json::Float(started)),
        ("ended_at", Json::opt(ended, Json::Float)),
        ("wall_time", Json::opt(ended.map(|e| e - started), Json::Float)),
        ("returncode", Json::Int(returncode.into())),
        ("success", Json::Bool(returncode == 0)),
        ("root_cause", root),
        ("leftovers_killed", Json::Int(st.leftovers_killed as i64)),
        (
            "ranks",
            Json::List(st.ranks.iter().map(|r| Json::Object(rank_fields(r, host))).collect()),
        ),
        ("hangs", Json::List(Vec::new())),
    ]);
    let mut out = String::with_capacity(512 + 700 * st.ranks.len());
    doc.write(&mut out, 0);
    out.push('\n');
    out
}

/// Writes `text` to `path` atomically (a reader never sees half a file), through a symlink; a
/// path that is not a regular file (/dev/stdout, a FIFO) is written into, not replaced.
pub fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let path = real_path(path);
    let in_place = path.exists() && !path.is_file();
    let target = if in_place {
        path.clone()
    } else {
        let mut t = path.clone().into_os_string();
        t.push(format!(".tmp{}", std::process::id()));
        PathBuf::from(t)
    };
    std::fs::write(&target, text)?;
    if !in_place {
        std::fs::rename(&target, &path)?;
    }
    Ok(())
}

/// `os.path.realpath`: symlinks resolved where they exist, a dangling one to its target (the
/// report is written through it), the rest of the path kept.
fn real_path(path: &Path) -> PathBuf {
    let mut p = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    for _ in 0..40 {
        // A symlink's target, relative to its directory (an absolute target replaces it all).
        match std::fs::read_link(&p) {
            Ok(target) => p = p.parent().map_or_else(|| target.clone(), |dir| dir.join(&target)),
            Err(_) => break,
        }
    }
    if let Ok(real) = std::fs::canonicalize(&p) {
        return real;
    }
    match (p.parent(), p.file_name()) {
        (Some(dir), Some(name)) => std::fs::canonicalize(dir).map_or_else(|_| p.clone(), |d| d.join(name)),
        _ => p,
    }
}

/// This machine's name, as `socket.gethostname()`.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    if unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } != 0 {
        return String::new();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    lossy(&buf[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_read_as_python_repr_writes_them() {
        for (f, py) in [
            (0.0, "0.0"),
            (1.0, "1.0"),
            (0.1, "0.1"),
            (-2.5, "-2.5"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (1.5e-7, "1.5e-07"),
            (123456.789, "123456.789"),
            (1765050000.123456, "1765050000.123456"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (1.5e16, "1.5e+16"),
            (1e100, "1e+100"),
        ] {
            assert_eq!(py_float(f), py, "{f}");
        }
    }

    #[test]
    fn strings_are_escaped_as_python_json_with_ensure_ascii() {
        let mut out = String::new();
        write_str(&mut out, "a\"b\\c\nd\u{1}é😀\u{fffd}");
        assert_eq!(out, r#""a\"b\\c\nd\u0001\u00e9\ud83d\ude00\ufffd""#);
    }

    #[test]
    fn rank_ranges_and_labels() {
        assert_eq!(rank_ranges(&[0, 1, 2, 5, 7, 8]), "0-2,5,7-8");
        assert_eq!(rank_ranges(&[3, 1, 2, 2]), "1-3");
        assert_eq!(label(&["4"]), "rank 4");
        assert_eq!(label(&["0", "1", "3"]), "ranks 0-1,3");
        assert_eq!(label(&["a", "1"]), "ranks a,1");
    }

    #[test]
    fn signal_names_follow_python() {
        assert_eq!(signal_name(15), "SIGTERM");
        assert_eq!(signal_name(6), "SIGABRT");
        assert_eq!(signal_name(29), "SIGIO");
        assert_eq!(signal_name(34), "SIGRTMIN");
        assert_eq!(signal_name(40), "signal 40");
    }

    #[test]
    fn the_local_rank_hint_names_the_flag() {
        let tail = vec!["error: unrecognized arguments: --local_rank=0".to_owned()];
        assert!(local_rank_hint(&tail).unwrap().contains("--no_local_rank"));
        assert!(local_rank_hint(&["unrecognized arguments: --foo".to_owned()]).is_none());
    }

    #[test]
    fn a_report_is_written_through_a_dangling_symlink() {
        let dir = std::env::temp_dir().join(format!("dslaunch-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let link = dir.join("link.json");
        std::os::unix::fs::symlink("real.json", &link).unwrap();
        write_atomically(&link, "{}\n").unwrap();
        assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
        assert_eq!(std::fs::read_to_string(dir.join("real.json")).unwrap(), "{}\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn statuses_follow_the_command_exit_rules() {
        assert_eq!(rank_status(Some(3)), 3);
        assert_eq!(rank_status(Some(-9)), 247);
        assert_eq!(rank_status(Some(256)), 1);
        assert_eq!(rank_status(None), 1);
        assert_eq!(shell(-15), 143);
        assert_eq!(shell(3), 3);
    }
}

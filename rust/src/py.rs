//! The Python classes of `dslaunch._core`: owned data is extracted first, then the GIL is
//! released around anything that blocks (spawning, waiting).

use std::collections::HashMap;
use std::ffi::OsString;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use crate::error::{CoreError, SupervisorError};
use crate::report::{outcome, unix_time, Outcome};
use crate::supervisor::{CollapseMode, Command, Config, ConsoleCopy, JobState, RankConfig, RankInfo, Supervisor};
use crate::{signals, tree};

/// Any mapping (a dict, `os.environ`) as owned key/value pairs.
fn extract_env(obj: &Bound<'_, PyAny>) -> PyResult<Vec<(OsString, OsString)>> {
    let dict = match obj.cast::<PyDict>() {
        Ok(d) => d.clone(),
        Err(_) => PyDict::from_sequence(&obj.call_method0("items")?)?,
    };
    dict.iter()
        .map(|(k, v)| {
            Ok((
                k.extract::<PathBuf>()?.into_os_string(),
                v.extract::<PathBuf>()?.into_os_string(),
            ))
        })
        .collect()
}

/// `secs` seconds as a Duration: NaN and negatives are 0; more than `MAX_SECS` (inf included) is
/// `MAX_SECS`, still far enough to mean "never" and small enough that `Instant + d` cannot overflow
/// (`Duration::from_secs_f64` panics on inf or > u64::MAX s, `Instant + d` on ~2^63 ns..s).
const MAX_SECS: f64 = 4_294_967_296.0; // 2^32 s, about 136 years
fn secs(secs: f64) -> Duration {
    Duration::from_secs_f64(if secs >= 0.0 { secs.min(MAX_SECS) } else { 0.0 })
}

/// The deadline of a `timeout` (None: no deadline).
fn deadline_of(timeout: Option<f64>) -> Option<Instant> {
    timeout.map(|t| Instant::now() + secs(t))
}

fn new_run_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/uuid")
        .map(|s| s.trim().replace('-', ""))
        .unwrap_or_else(|_| format!("{:x}{:x}", std::process::id(), unix_time(SystemTime::now()).to_bits()))
}

/// `RankSpec(console=...)` and `RankSpec(bare=...)`: a bool (both streams), or one stream
/// (`'stdout'` or `'stderr'`).
#[derive(FromPyObject, IntoPyObject)]
enum ConsoleArg {
    Shown(bool),
    Stream(String),
}

/// One rank to start: its argv, extra environment, working directory, log file and tag.
#[pyclass(module = "dslaunch._core", name = "RankSpec", frozen)]
pub struct PyRankSpec {
    cfg: RankConfig,
}

#[pymethods]
impl PyRankSpec {
    #[new]
    #[pyo3(signature = (argv, *, env=None, cwd=None, log_file=None, tag=None, console=ConsoleArg::Shown(true),
                        stdout_log_file=None, stderr_log_file=None, bare=ConsoleArg::Shown(false)),
           text_signature = "(argv, *, env=None, cwd=None, log_file=None, tag=None, console=True, \
                             stdout_log_file=None, stderr_log_file=None, bare=False)")]
    #[allow(clippy::too_many_arguments)]
    fn new(
        argv: Vec<PathBuf>,
        env: Option<&Bound<'_, PyAny>>,
        cwd: Option<PathBuf>,
        log_file: Option<PathBuf>,
        tag: Option<String>,
        console: ConsoleArg,
        stdout_log_file: Option<PathBuf>,
        stderr_log_file: Option<PathBuf>,
        bare: ConsoleArg,
    ) -> PyResult<Self> {
        if argv.is_empty() {
            return Err(PyValueError::new_err("argv must not be empty"));
        }
        if log_file.is_some() && (stdout_log_file.is_some() || stderr_log_file.is_some()) {
            return Err(PyValueError::new_err(
                "log_file holds both streams: give it or stdout_log_file/stderr_log_file, not both",
            ));
        }
        let (shown, quiet_stdout, quiet_stderr) = match &console {
            ConsoleArg::Shown(b) => (*b, false, false),
            ConsoleArg::Stream(s) if s == "stdout" => (true, false, true),
            ConsoleArg::Stream(s) if s == "stderr" => (true, true, false),
            ConsoleArg::Stream(s) => {
                return Err(PyValueError::new_err(format!(
                    "console must be True, False, 'stdout' or 'stderr', not {s:?}"
                )))
            }
        };
        let bare = match &bare {
            ConsoleArg::Shown(b) => [*b, *b],
            ConsoleArg::Stream(s) if s == "stdout" => [true, false],
            ConsoleArg::Stream(s) if s == "stderr" => [false, true],
            ConsoleArg::Stream(s) => {
                return Err(PyValueError::new_err(format!(
                    "bare must be True, False, 'stdout' or 'stderr', not {s:?}"
                )))
            }
        };
        let env = match env {
            Some(e) => extract_env(e)?,
            None => Vec::new(),
        };
        Ok(PyRankSpec {
            cfg: RankConfig {
                argv: argv.into_iter().map(PathBuf::into_os_string).collect(),
                env,
                cwd,
                log_file,
                stdout_log_file,
                stderr_log_file,
                tag: tag.unwrap_or_default(),
                console: shown,
                quiet_stdout,
                quiet_stderr,
                bare,
            },
        })
    }

    /// The argument vector.
    #[getter]
    fn argv(&self) -> Vec<OsString> {
        self.cfg.argv.clone()
    }

    /// Extra environment variables for this rank.
    #[getter]
    fn env<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (k, v) in &self.cfg.env {
            d.set_item(k, v)?;
        }
        Ok(d)
    }

    /// Working directory, or None.
    #[getter]
    fn cwd(&self) -> Option<OsString> {
        self.cfg.cwd.clone().map(PathBuf::into_os_string)
    }

    /// Per-rank log file, or None.
    #[getter]
    fn log_file(&self) -> Option<OsString> {
        self.cfg.log_file.clone().map(PathBuf::into_os_string)
    }

    /// Label used in the console prefix.
    #[getter]
    fn tag(&self) -> String {
        self.cfg.tag.clone()
    }

    /// Log file of the rank's stdout alone, or None.
    #[getter]
    fn stdout_log_file(&self) -> Option<OsString> {
        self.cfg.stdout_log_file.clone().map(PathBuf::into_os_string)
    }

    /// Log file of the rank's stderr alone, or None.
    #[getter]
    fn stderr_log_file(&self) -> Option<OsString> {
        self.cfg.stderr_log_file.clone().map(PathBuf::into_os_string)
    }

    /// Which of this rank's lines are shown on the console: True, False, 'stdout' or 'stderr'.
    #[getter]
    fn console(&self) -> ConsoleArg {
        let c = &self.cfg;
        match (c.console, c.quiet_stdout, c.quiet_stderr) {
            (true, false, true) => ConsoleArg::Stream("stdout".into()),
            (true, true, false) => ConsoleArg::Stream("stderr".into()),
            (shown, q_out, q_err) => ConsoleArg::Shown(shown && !(q_out && q_err)),
        }
    }

    fn __repr__(&self) -> String {
        format!("RankSpec(argv={:?}, tag={:?})", self.cfg.argv, self.cfg.tag)
    }
}

/// One rank's state: live (from `Supervisor.status()`) or final (in a `Report`).
#[pyclass(module = "dslaunch._core", name = "RankResult", frozen, get_all)]
pub struct PyRankResult {
    rank: usize,
    tag: String,
    pid: i32,
    state: &'static str,
    returncode: Option<i32>,
    signal: Option<i32>,
    exit_status: Option<i32>,
    started_at: f64,
    ended_at: Option<f64>,
    last_output_at: Option<f64>,
    output_bytes: u64,
    output_lines: u64,
    stderr_tail: Vec<String>,
    log_error: Option<String>,
    last_line: Option<String>,
}

impl PyRankResult {
    fn from_info(rank: usize, r: &RankInfo) -> Self {
        let Outcome {
            returncode,
            signal,
            exit_status,
            state,
        } = outcome(r.status);
        PyRankResult {
            rank,
            tag: r.tag.clone(),
            pid: r.pid,
            state,
            returncode,
            signal,
            exit_status,
            started_at: unix_time(r.started_at),
            ended_at: r.ended_at.map(unix_time),
            last_output_at: r.last_output_at.map(unix_time),
            output_bytes: r.output_bytes,
            output_lines: r.output_lines,
            stderr_tail: r
                .stderr_tail
                .iter()
                .map(|l| String::from_utf8_lossy(l).into_owned())
                .collect(),
            log_error: r.log_error.clone(),
            last_line: (!r.last_line.is_empty()).then(|| String::from_utf8_lossy(&r.last_line).into_owned()),
        }
    }
}

#[pymethods]
impl PyRankResult {
    fn __repr__(&self) -> String {
        let rc = self.returncode.map_or_else(|| "None".to_owned(), |c| c.to_string());
        format!(
            "RankResult(rank={}, pid={}, state={:?}, returncode={rc})",
            self.rank, self.pid, self.state
        )
    }
}

/// The outcome of a job.
#[pyclass(module = "dslaunch._core", name = "Report", frozen, get_all)]
pub struct PyReport {
    run_id: String,
    ranks: Vec<Py<PyRankResult>>,
    first_failure: Option<Py<PyRankResult>>,
    interrupted_by: Option<i32>,
    stopped: bool,
    returncode: i32,
    started_at: f64,
    ended_at: Option<f64>,
    leftovers_killed: usize,
}

impl PyReport {
    fn from_state(py: Python<'_>, run_id: &str, st: &JobState) -> PyResult<Self> {
        let ranks: Vec<Py<PyRankResult>> = st
            .ranks
            .iter()
            .enumerate()
            .map(|(i, r)| Py::new(py, PyRankResult::from_info(i, r)))
            .collect::<PyResult<_>>()?;
        let first_failure = st.first_failure.map(|i| ranks[i].clone_ref(py));
        Ok(PyReport {
            run_id: run_id.to_owned(),
            first_failure,
            ranks,
            interrupted_by: st.interrupted_by,
            stopped: st.stopped,
            returncode: st.exit_code(),
            started_at: unix_time(st.started_at),
            ended_at: st.ended_at.map(unix_time),
            leftovers_killed: st.leftovers_killed,
        })
    }
}

#[pymethods]
impl PyReport {
    /// True when every rank exited 0 and nothing stopped the job.
    #[getter]
    fn success(&self) -> bool {
        self.returncode == 0
    }

    /// Seconds from start to end.
    #[getter]
    fn wall_time(&self) -> Option<f64> {
        self.ended_at.map(|e| e - self.started_at)
    }

    fn __repr__(&self) -> String {
        let by = self.interrupted_by.map_or_else(|| "None".to_owned(), |s| s.to_string());
        format!(
            "Report(returncode={}, ranks={}, interrupted_by={by})",
            self.returncode,
            self.ranks.len()
        )
    }
}

/// Calls back into the supervisor from a Python signal handler.
#[pyclass(module = "dslaunch._core", name = "_SignalForwarder", frozen)]
pub struct SignalForwarder {
    owner: Py<PySupervisor>,
}

#[pymethods]
impl SignalForwarder {
    fn __call__(&self, py: Python<'_>, signum: i32, _frame: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
        let owner = self.owner.bind(py).get();
        let handle = owner
            .handle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        match handle {
            Some(sup) if !sup.is_done() => {
                sup.send(Command::Signal(signum));
                Ok(())
            }
            _ => {
                // The job is over: give the signal back to whoever had it before us.
                let previous = owner.previous_handler(py, signum);
                owner.restore_handlers(py);
                let signal = py.import("signal")?;
                match previous {
                    Some(h) if h.bind(py).is_callable() => h.bind(py).call1((signum, _frame)).map(|_| ()),
                    Some(h) if h.bind(py).eq(signal.getattr("SIG_IGN")?)? => Ok(()),
                    _ => signal.call_method1("raise_signal", (signum,)).map(|_| ()),
                }
            }
        }
    }
}

/// Starts, watches, signals and tears down a set of ranks; see `_core.pyi` for the contract.
#[pyclass(module = "dslaunch._core", name = "Supervisor", frozen)]
pub struct PySupervisor {
    config: Mutex<Option<Config>>,
    handle: Mutex<Option<Supervisor>>,
    forward: Vec<i32>,
    saved: Mutex<Vec<(i32, Py<PyAny>)>>,
    wake_r: OwnedFd,
    wake_w: OwnedFd,
    run_id: String,
    n_ranks: usize,
}

impl PySupervisor {
    fn handle(&self) -> PyResult<Supervisor> {
        self.handle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
            .ok_or_else(|| SupervisorError::new_err("the supervisor has not been started"))
    }

    fn previous_handler(&self, py: Python<'_>, signum: i32) -> Option<Py<PyAny>> {
        let saved = self.saved.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        saved.iter().find(|(s, _)| *s == signum).map(|(_, h)| h.clone_ref(py))
    }

    fn restore_handlers(&self, py: Python<'_>) {
        let saved = std::mem::take(&mut *self.saved.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        if saved.is_empty() {
            return;
        }
        if let Ok(signal) = py.import("signal") {
            for (sig, handler) in saved {
                let _ = signal.call_method1("signal", (sig, handler));
            }
        }
    }

    fn report(&self, py: Python<'_>, sup: &Supervisor) -> PyResult<Py<PyReport>> {
        let st = sup.state();
        Py::new(py, PyReport::from_state(py, &self.run_id, &st)?)
    }
}

/// Flushes Python's own buffered output, so the ranks' lines (or the native host's) do not
/// overtake it.
fn flush_python_output(py: Python<'_>) -> PyResult<()> {
    for stream in ["stdout", "stderr"] {
        if let Ok(s) = py.import("sys")?.getattr(stream) {
            let _ = s.call_method0("flush");
        }
    }
    Ok(())
}

/// Whether this is Python's main thread, the only one that may set signal handlers.
fn is_main_thread(py: Python<'_>) -> PyResult<bool> {
    // Importing `threading` only to ask costs a CLI start 1 ms. Without it loaded, no Python
    // thread was started through it, and the interpreter's main thread is the process's first.
    let modules = py.import("sys")?.getattr("modules")?;
    match modules.get_item("threading") {
        Ok(threading) => {
            let current = threading.call_method0("current_thread")?;
            let main = threading.call_method0("main_thread")?;
            Ok(current.is(&main))
        }
        Err(_) => Ok(rustix::thread::gettid() == rustix::process::getpid()),
    }
}

/// `console_copies={'stdout': (path, needles), 'stderr': ...}` as `Config::console_copies`.
fn console_copies_of(given: Option<HashMap<String, (PathBuf, Vec<String>)>>) -> PyResult<[Option<ConsoleCopy>; 2]> {
    let mut copies = [None, None];
    for (stream, (path, needles)) in given.unwrap_or_default() {
        let which = match stream.as_str() {
            "stdout" => 0,
            "stderr" => 1,
            other => {
                return Err(PyValueError::new_err(format!(
                    "console_copies keys are 'stdout' and 'stderr', not {other:?}"
                )))
            }
        };
        let needles = needles.into_iter().map(String::into_bytes).collect();
        copies[which] = Some(ConsoleCopy { path, needles });
    }
    Ok(copies)
}

#[pymethods]
impl PySupervisor {
    #[new]
    #[pyo3(signature = (
        ranks, *, env=None, prefix=Some("[{tag}]: ".to_owned()), console_ranks=None, grace_period=30.0,
        forward_signals=None, stop_signals=None, fail_fast=true, stderr_tail=20, orphan_guard=true, kill_leftovers=true,
        run_id=None, max_line_bytes=65536, stdout_fd=1, stderr_fd=2, collapse="off", collapse_window=0.25,
        status_line=false, keep_last_line=false, merge_stderr=false, console_copies=None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        ranks: Vec<PyRef<'_, PyRankSpec>>,
        env: Option<&Bound<'_, PyAny>>,
        prefix: Option<String>,
        console_ranks: Option<Vec<usize>>,
        grace_period: f64,
        forward_signals: Option<Vec<i32>>,
        stop_signals: Option<Vec<i32>>,
        fail_fast: bool,
        stderr_tail: usize,
        orphan_guard: bool,
        kill_leftovers: bool,
        run_id: Option<String>,
        max_line_bytes: usize,
        stdout_fd: i32,
        stderr_fd: i32,
        collapse: &str,
        collapse_window: f64,
        status_line: bool,
        keep_last_line: bool,
        merge_stderr: bool,
        console_copies: Option<HashMap<String, (PathBuf, Vec<String>)>>,
    ) -> PyResult<Self> {
        let collapse = match collapse {
            "off" => CollapseMode::Off,
            "auto" => CollapseMode::Terminal,
            "on" => CollapseMode::On,
            other => {
                return Err(PyValueError::new_err(format!(
                    "collapse must be 'off', 'auto' or 'on', not {other:?}"
                )))
            }
        };
        if !(collapse_window.is_finite() && (0.0..=3600.0).contains(&collapse_window)) {
            return Err(PyValueError::new_err(
                "collapse_window must be between 0 and 3600 seconds",
            ));
        }
        if grace_period.is_nan() || grace_period < 0.0 {
            // inf (or anything beyond ~136 years) means: never SIGKILL
            return Err(PyValueError::new_err(
                "grace_period must be a non-negative number of seconds",
            ));
        }
        if stdout_fd < 0 || stderr_fd < 0 {
            return Err(PyValueError::new_err(
                "stdout_fd and stderr_fd must be open file descriptors",
            ));
        }
        let forward = forward_signals.unwrap_or_else(|| {
            vec![
                libc::SIGINT,
                libc::SIGTERM,
                libc::SIGHUP,
                libc::SIGQUIT,
                libc::SIGUSR1,
                libc::SIGUSR2,
                libc::SIGTSTP,
                libc::SIGCONT,
            ]
        });
        if let Some(bad) = forward
            .iter()
            .find(|s| !signals::is_valid(**s) || **s == libc::SIGKILL || **s == libc::SIGSTOP)
        {
            return Err(PyValueError::new_err(format!("cannot forward signal {bad}")));
        }
        let stop_signals = stop_signals.unwrap_or_else(|| signals::TERMINATING.to_vec());
        if let Some(bad) = stop_signals.iter().find(|s| {
            !signals::is_valid(**s)
                || [
                    libc::SIGKILL,
                    libc::SIGSTOP,
                    libc::SIGTSTP,
                    libc::SIGCONT,
                    libc::SIGCHLD,
                ]
                .contains(*s)
        }) {
            return Err(PyValueError::new_err(format!("signal {bad} cannot be a stop signal")));
        }
        let mut rank_cfgs: Vec<RankConfig> = ranks.iter().map(|r| r.cfg.clone()).collect();
        for (i, r) in rank_cfgs.iter_mut().enumerate() {
            if r.tag.is_empty() {
                r.tag = i.to_string();
            }
            if let Some(shown) = &console_ranks {
                r.console = r.console && shown.contains(&i);
            }
        }
        let run_id = run_id.unwrap_or_else(new_run_id);
        if run_id.is_empty() || run_id.contains(['\0', '\n']) {
            return Err(PyValueError::new_err("run_id must be a non-empty single-line string"));
        }
        let base_env = match env {
            Some(e) => Some(extract_env(e)?),
            None => None,
        };
        let n_ranks = rank_cfgs.len();
        let config = Config {
            ranks: rank_cfgs,
            base_env,
            prefix,
            grace: secs(grace_period),
            stop_signals,
            fail_fast,
            stderr_tail,
            orphan_guard,
            subreaper: true,
            kill_leftovers,
            run_id: run_id.clone(),
            max_line: max_line_bytes.max(1),
            stdout_fd,
            stderr_fd,
            collapse,
            collapse_window: Duration::from_secs_f64(collapse_window),
            status_line,
            keep_last_line,
            merge_stderr,
            console_copies: console_copies_of(console_copies)?,
        };
        let (wake_r, wake_w) =
            rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC | rustix::pipe::PipeFlags::NONBLOCK)
                .map_err(|e| PyErr::from(CoreError::Io(e.into())))?;
        Ok(PySupervisor {
            config: Mutex::new(Some(config)),
            handle: Mutex::new(None),
            forward,
            saved: Mutex::new(Vec::new()),
            wake_r,
            wake_w,
            run_id,
            n_ranks,
        })
    }

    /// Starts every rank. Raises OSError (FileNotFoundError, PermissionError, ...) if one cannot
    /// be started, after killing those already started.
    fn start(slf: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        let this = slf.get();
        let cfg = this
            .config
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
            .ok_or_else(|| SupervisorError::new_err("the supervisor was already started"))?;
        flush_python_output(py)?;
        let sup = py.detach(|| Supervisor::start(cfg))?;
        *this.handle.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(sup);
        if !this.forward.is_empty() && is_main_thread(py)? {
            let signal = py.import("signal")?;
            let forwarder = Py::new(
                py,
                SignalForwarder {
                    owner: slf.clone().unbind(),
                },
            )?;
            let mut saved = Vec::new();
            let ignored = signal.getattr("SIG_IGN")?;
            for &sig in &this.forward {
                // A signal ignored already stays ignored: nohup's SIGHUP must not stop the job when
                // the terminal closes (DeepSpeed's runner leaves it ignored too).
                if signal.call_method1("getsignal", (sig,))?.is(&ignored) {
                    continue;
                }
                let old = signal.call_method1("signal", (sig, forwarder.clone_ref(py)))?;
                saved.push((sig, old.unbind()));
            }
            *this.saved.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = saved;
        }
        Ok(())
    }

    /// Waits for the job to end (or `timeout` seconds) with the GIL released; signals are
    /// handled while waiting. Returns the report, or None on timeout.
    #[pyo3(signature = (timeout=None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Option<Py<PyReport>>> {
        let sup = self.handle()?;
        let deadline = deadline_of(timeout);
        let main = is_main_thread(py)?;
        let signal = py.import("signal")?;
        let old_wakeup = if main {
            let kwargs = PyDict::new(py);
            kwargs.set_item("warn_on_full_buffer", false)?;
            Some(signal.call_method("set_wakeup_fd", (self.wake_w.as_raw_fd(),), Some(&kwargs))?)
        } else {
            None
        };
        let outcome: PyResult<bool> = loop {
            let wake_r = self.wake_r.as_fd();
            py.detach(|| {
                let step = deadline.map_or(Duration::from_millis(250), |d| {
                    d.saturating_duration_since(Instant::now())
                        .min(Duration::from_millis(250))
                });
                let done_fd = sup.done_fd();
                let mut fds = [
                    rustix::event::PollFd::new(&done_fd, rustix::event::PollFlags::IN),
                    rustix::event::PollFd::new(&wake_r, rustix::event::PollFlags::IN),
                ];
                let ts = rustix::event::Timespec::try_from(step).ok();
                let _ = rustix::event::poll(&mut fds, ts.as_ref());
                let mut sink = [0u8; 64];
                while matches!(rustix::io::read(wake_r, &mut sink), Ok(n) if n > 0) {}
            });
            if let Err(e) = py.check_signals() {
                break Err(e);
            }
            if sup.is_done() {
                break Ok(true);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                break Ok(false);
            }
        };
        if let Some(old) = old_wakeup {
            let _ = signal.call_method1("set_wakeup_fd", (old,));
        }
        match outcome? {
            true => {
                py.detach(|| sup.wait_timeout(None));
                if main {
                    self.restore_handlers(py);
                }
                Ok(Some(self.report(py, &sup)?))
            }
            false => Ok(None),
        }
    }

    /// The report if the job is over, else None; never blocks.
    fn poll(&self, py: Python<'_>) -> PyResult<Option<Py<PyReport>>> {
        let sup = self.handle()?;
        if !sup.is_done() {
            return Ok(None);
        }
        py.detach(|| sup.wait_timeout(None));
        if is_main_thread(py)? {
            self.restore_handlers(py);
        }
        Ok(Some(self.report(py, &sup)?))
    }

    /// Every rank's state now (pid, state, exit status, last output time, ...); never blocks.
    fn status<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let sup = self.handle()?;
        let items: Vec<PyRankResult> = sup.with_state(|st| {
            st.ranks
                .iter()
                .enumerate()
                .map(|(i, r)| PyRankResult::from_info(i, r))
                .collect()
        });
        let objs: Vec<Py<PyRankResult>> = items.into_iter().map(|r| Py::new(py, r)).collect::<PyResult<_>>()?;
        PyList::new(py, objs)
    }

    /// Waits (GIL released) until some rank has exited since the last call, the job is over, or
    /// `timeout` passes; returns the ranks that exited since the last call (possibly none).
    /// For callers that react to each exit as it happens (per-node failure reports, agents).
    #[pyo3(signature = (timeout=None))]
    fn wait_exits<'py>(&self, py: Python<'py>, timeout: Option<f64>) -> PyResult<Bound<'py, PyList>> {
        let sup = self.handle()?;
        let deadline = deadline_of(timeout);
        let exits = loop {
            let ready = py.detach(|| {
                let step = deadline.map_or(Duration::from_millis(250), |d| {
                    d.saturating_duration_since(Instant::now())
                        .min(Duration::from_millis(250))
                });
                let (exit_fd, done_fd) = (sup.exit_fd(), sup.done_fd());
                let mut fds = [
                    rustix::event::PollFd::new(&exit_fd, rustix::event::PollFlags::IN),
                    rustix::event::PollFd::new(&done_fd, rustix::event::PollFlags::IN),
                ];
                let ts = rustix::event::Timespec::try_from(step).ok();
                let _ = rustix::event::poll(&mut fds, ts.as_ref());
                fds.iter().any(|f| !f.revents().is_empty())
            });
            py.check_signals()?;
            let exits = sup.take_exits();
            if !exits.is_empty() || (ready && sup.is_done()) || deadline.is_some_and(|d| Instant::now() >= d) {
                break exits;
            }
        };
        let items: Vec<PyRankResult> = sup.with_state(|st| {
            exits
                .iter()
                .map(|&i| PyRankResult::from_info(i, &st.ranks[i]))
                .collect()
        });
        let objs: Vec<Py<PyRankResult>> = items.into_iter().map(|r| Py::new(py, r)).collect::<PyResult<_>>()?;
        PyList::new(py, objs)
    }

    /// Forwards `signal` to every running rank's process group, as if the launcher had received
    /// it (the stop signals, SIGINT, SIGTERM, SIGHUP and SIGQUIT by default, also end the job).
    fn send_signal(&self, signal: i32) -> PyResult<()> {
        if !signals::is_valid(signal) {
            return Err(PyValueError::new_err(format!("invalid signal {signal}")));
        }
        self.handle()?.send(Command::Signal(signal));
        Ok(())
    }

    /// A stop asked for from outside (a multi-node runner telling this node to stop): the same as
    /// `send_signal(signal)`, except that a job already ending (a rank failed, an earlier stop)
    /// goes on ending with its grace period: only SIGKILL kills at once. SIGTSTP pauses the
    /// ranks without stopping this process (it must hear the SIGCONT). Returns at once.
    fn stop(&self, signal: i32) -> PyResult<()> {
        if !signals::is_valid(signal) {
            return Err(PyValueError::new_err(format!("invalid signal {signal}")));
        }
        self.handle()?.send(Command::Stop(signal));
        Ok(())
    }

    /// Begins stopping the job: `signal` to every rank tree now, SIGKILL after `grace_period`.
    /// Returns at once; `wait()` for the report.
    #[pyo3(signature = (grace_period=None, signal=15))]
    fn terminate(&self, grace_period: Option<f64>, signal: i32) -> PyResult<()> {
        if !signals::is_valid(signal) {
            return Err(PyValueError::new_err(format!("invalid signal {signal}")));
        }
        let grace = grace_period.map(secs);
        self.handle()?.send(Command::Terminate { sig: signal, grace });
        Ok(())
    }

    /// Replaces this process with the native host `host` (`dslaunch-host`), which runs the job
    /// as `start()` and `wait()` would, prints the report (unless `quiet` and the job went well),
    /// writes `report_json`, removes `pid_file` and ends the process with the job's status
    /// (`launcher_status`: DeepSpeed's per-node launcher's, 1 after SIGINT/SIGTERM; `prog`: the
    /// command named in an error line, default `dslaunch`). The
    /// signals passed on are this supervisor's. `shown_argv` follows the host's own arguments
    /// (after `--`), only for `ps` to show what the user ran. Returns only by raising OSError when `host`
    /// cannot be executed: the supervisor is then as before, and `start()` still works.
    #[pyo3(signature = (host, *, start_message=None, quiet=false, report_json=None, pid_file=None,
                        launcher_status=false, prog=None, shown_argv=None))]
    #[allow(clippy::too_many_arguments)]
    fn exec_host(
        &self,
        py: Python<'_>,
        host: PathBuf,
        start_message: Option<String>,
        quiet: bool,
        report_json: Option<PathBuf>,
        pid_file: Option<PathBuf>,
        launcher_status: bool,
        prog: Option<String>,
        shown_argv: Option<Vec<OsString>>,
    ) -> PyResult<()> {
        let config = self
            .config
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
            .ok_or_else(|| SupervisorError::new_err("the supervisor was already started"))?;
        let plan = crate::plan::HostPlan {
            config,
            finish: crate::plan::Finish {
                forward: self.forward.clone(),
                start_message,
                quiet,
                report_json,
                pid_file,
                launcher_status,
                prog: prog.unwrap_or_else(|| "dslaunch".to_owned()),
            },
        };
        let bytes = crate::plan::encode(&plan);
        let io = |e: std::io::Error| PyErr::from(CoreError::Io(e));
        // Inherited by the host (no CLOEXEC), which reads it and closes it before any rank starts.
        let memfd =
            rustix::fs::memfd_create("dslaunch-plan", rustix::fs::MemfdFlags::empty()).map_err(|e| io(e.into()))?;
        let mut file = std::fs::File::from(memfd);
        std::io::Write::write_all(&mut file, &bytes).map_err(io)?;
        std::io::Seek::rewind(&mut file).map_err(io)?;
        flush_python_output(py)?;
        let c = |s: &[u8]| std::ffi::CString::new(s).map_err(|_| PyValueError::new_err("a NUL byte in an argument"));
        let path = c(std::os::unix::ffi::OsStrExt::as_bytes(host.as_os_str()))?;
        let mut args = vec![
            path.clone(),
            c(b"--plan-fd")?,
            c(file.as_raw_fd().to_string().as_bytes())?,
        ];
        if let Some(shown) = shown_argv.filter(|a| !a.is_empty()) {
            args.push(c(b"--")?);
            for a in &shown {
                args.push(c(std::os::unix::ffi::OsStrExt::as_bytes(a.as_os_str()))?);
            }
        }
        let argv: Vec<*const libc::c_char> = args
            .iter()
            .map(|a| a.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect();
        // SAFETY: NUL-terminated strings and a null-terminated argv that outlive the call; execv
        // returns only on failure. The environment is this process's (`os.environ` keeps it).
        unsafe { libc::execv(path.as_ptr(), argv.as_ptr()) };
        let e = std::io::Error::last_os_error();
        drop(file);
        Err(PyErr::from(CoreError::spawn(e, host)))
    }

    /// Prints `text` on the console in order with the ranks' lines (after the lines the
    /// collapser holds, above the status line). Returns False when the console is already
    /// closed (the job is over or ending): print it yourself then.
    #[pyo3(signature = (text, stderr=true))]
    fn console_message(&self, text: &str, stderr: bool) -> PyResult<bool> {
        Ok(self.handle()?.message(stderr, text.as_bytes()))
    }

    /// SIGKILLs every rank tree now. Returns at once.
    fn kill(&self) -> PyResult<()> {
        self.handle()?.send(Command::Kill);
        Ok(())
    }

    /// Starts the ranks and waits for them: `start()` then `wait()`.
    fn run(slf: &Bound<'_, Self>) -> PyResult<Py<PyReport>> {
        Self::start(slf)?;
        let report = slf.get().wait(slf.py(), None)?;
        report.ok_or_else(|| SupervisorError::new_err("wait returned without a report"))
    }

    /// The job's id: the value of DSLAUNCH_RUN_ID in every rank's environment.
    #[getter]
    fn run_id(&self) -> String {
        self.run_id.clone()
    }

    /// The ranks' pids in rank order (empty before start).
    #[getter]
    fn pids(&self) -> Vec<i32> {
        self.handle().map(|s| s.pids().to_vec()).unwrap_or_default()
    }

    /// Whether the job is over.
    #[getter]
    fn done(&self) -> bool {
        self.handle().is_ok_and(|s| s.is_done())
    }

    fn __len__(&self) -> usize {
        self.n_ranks
    }

    fn __enter__(slf: &Bound<'_, Self>) -> PyResult<Py<Self>> {
        if slf.get().handle().is_err() {
            Self::start(slf)?;
        }
        Ok(slf.clone().unbind())
    }

    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, py: Python<'_>, _exc: &Bound<'_, pyo3::types::PyTuple>) -> PyResult<bool> {
        if let Ok(sup) = self.handle() {
            if !sup.is_done() {
                sup.send(Command::Terminate {
                    sig: libc::SIGTERM,
                    grace: None,
                });
            }
            // As `wait()`: signals are handled meanwhile, so a Ctrl-C during the grace period
            // kills at once instead of waiting unseen (and being swallowed afterwards).
            if let Err(e) = self.wait(py, None) {
                sup.send(Command::Kill);
                py.detach(|| sup.wait_timeout(None));
                self.restore_handlers(py);
                return Err(e);
            }
        }
        self.restore_handlers(py);
        Ok(false)
    }
}

/// Kills `pid` and every descendant (in other process groups or sessions too): SIGTERM, then
/// SIGKILL after `grace_period` seconds. Returns how many processes were signalled. The walk
/// follows parent links: a daemon whose middle parent already exited (a finished double fork) is
/// no longer below `pid`; a `Supervisor` finds those (subreaper + job marker).
#[pyfunction]
#[pyo3(signature = (pid, grace_period=5.0))]
fn kill_tree(py: Python<'_>, pid: i32, grace_period: f64) -> PyResult<usize> {
    if pid <= 1 || pid == std::process::id() as i32 {
        return Err(PyValueError::new_err(format!("refusing to kill the tree of pid {pid}")));
    }
    let grace = secs(grace_period);
    Ok(py.detach(|| tree::kill_tree(pid, grace)))
}

/// Pids of every live process whose environment holds `NAME=VALUE` exactly (the job marker).
#[pyfunction]
fn find_marked(py: Python<'_>, marker: String) -> Vec<i32> {
    py.detach(|| tree::marked_processes(marker.as_bytes()))
}

/// Registers the module's contents (called from `lib.rs`).
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyRankSpec>()?;
    m.add_class::<PyRankResult>()?;
    m.add_class::<PyReport>()?;
    m.add_class::<PySupervisor>()?;
    m.add_class::<SignalForwarder>()?;
    m.add_function(wrap_pyfunction!(kill_tree, m)?)?;
    m.add_function(wrap_pyfunction!(find_marked, m)?)?;
    m.add("SupervisorError", m.py().get_type::<SupervisorError>())?;
    m.add("RUN_ID_VAR", crate::supervisor::RUN_ID_VAR)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}

//! The one error type of the core. It is turned into a Python exception in exactly one place
//! (`py.rs`), so the pure-Rust modules never see PyO3.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong in the supervisor core.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// A rank could not be started: the program is missing or not executable, the cwd is missing, ...
    /// Carries the errno and the path it concerns, like `subprocess.Popen`'s `OSError`.
    #[error("{source}: {}", path.display())]
    Spawn {
        /// The OS error (its errno decides the Python exception class).
        source: io::Error,
        /// The program, working directory or log file the error is about.
        path: PathBuf,
    },
    /// A per-rank log file could not be opened.
    #[error("cannot open log file {}: {source}", path.display())]
    LogFile {
        /// The OS error.
        source: io::Error,
        /// The log file.
        path: PathBuf,
    },
    /// The caller passed something unusable (an empty argv, no ranks, a bad option).
    #[error("{0}")]
    InvalidArgument(String),
    /// The supervisor was used in the wrong order (started twice, waited before start).
    #[error("{0}")]
    Misuse(&'static str),
    /// Any other OS error in the supervisor's own machinery (epoll, pipes, /proc).
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl CoreError {
    /// A spawn error about `path`.
    pub fn spawn(source: io::Error, path: impl Into<PathBuf>) -> Self {
        CoreError::Spawn {
            source,
            path: path.into(),
        }
    }
}

/// `strerror(3)` text without Rust's " (os error N)" suffix, as Python's own OSError prints it.
pub fn strerror(errno: i32) -> String {
    // SAFETY: strerror returns a pointer to a NUL-terminated static (or thread-local) string.
    unsafe { std::ffi::CStr::from_ptr(libc::strerror(errno)) }
        .to_string_lossy()
        .into_owned()
}

/// Result alias for the core.
pub type CoreResult<T> = Result<T, CoreError>;

// ---- the single boundary to Python -------------------------------------------------------

use pyo3::exceptions::{PyOSError, PyRuntimeError, PyValueError};
use pyo3::PyErr;

pyo3::create_exception!(
    _core,
    SupervisorError,
    PyRuntimeError,
    "The supervisor was used in the wrong order (started twice, waited on before start)."
);

/// An `OSError(errno, strerror, filename)`; Python picks the subclass (FileNotFoundError,
/// PermissionError, ...) from the errno, exactly as for `subprocess.Popen`.
fn os_error(source: &io::Error, path: Option<&std::path::Path>) -> PyErr {
    match (source.raw_os_error(), path) {
        (Some(errno), Some(p)) => PyOSError::new_err((errno, strerror(errno), p.to_string_lossy().into_owned())),
        (Some(errno), None) => PyOSError::new_err((errno, strerror(errno))),
        (None, _) => PyOSError::new_err(source.to_string()),
    }
}

impl From<CoreError> for PyErr {
    fn from(e: CoreError) -> PyErr {
        match &e {
            CoreError::Spawn { source, path } | CoreError::LogFile { source, path } => os_error(source, Some(path)),
            CoreError::InvalidArgument(m) => PyValueError::new_err(m.clone()),
            CoreError::Misuse(m) => SupervisorError::new_err(*m),
            CoreError::Io(source) => os_error(source, None),
        }
    }
}

//! `dslaunch._core`: the process supervisor behind dslaunch.
//!
//! Only this file, `py.rs` and `error.rs` know PyO3; everything else is plain Rust that
//! `cargo test` reaches through the rlib.

pub mod closer;
pub mod error;
pub mod host;
pub mod logmux;
pub mod plan;
pub mod reap;
pub mod report;
pub mod signals;
pub mod spawn;
pub mod supervisor;
pub mod tree;
pub mod watchdog;

mod py;

pub use error::{CoreError, CoreResult};
pub use supervisor::{Command, Config, JobState, RankConfig, RankInfo, Supervisor};

use pyo3::prelude::*;

/// The `dslaunch._core` extension module.
#[pymodule(gil_used = false)]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    py::register(m)
}

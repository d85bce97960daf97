//! `dslaunch-host --plan-fd N [-- ARGV...]`: the native host (`_core::host`). Not a command for users:
//! `dslaunch` execs it with the plan of a job in fd N (`Supervisor.exec_host`).

use std::io::{Read, Write};
use std::os::fd::FromRawFd;

fn main() {
    // args_os: the user's command line after `--` need not be UTF-8.
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let fd = match args.as_slice() {
        // What follows `--` is the user's command line, there only for `ps` to show.
        [flag, fd, ..] if flag == "--plan-fd" && args.get(2).map_or(true, |a| a == "--") => {
            fd.to_str().and_then(|s| s.parse::<i32>().ok()).filter(|&fd| fd >= 0)
        }
        _ => None,
    };
    let Some(fd) = fd else {
        let _ = writeln!(
            std::io::stderr(),
            "dslaunch-host: run by dslaunch, not by hand (usage: dslaunch-host --plan-fd N [-- ARGV...])"
        );
        std::process::exit(2);
    };
    let mut bytes = Vec::new();
    // SAFETY: the fd was handed to us by exec for exactly this; File closes it after reading,
    // so the ranks never see it.
    let read = unsafe { std::fs::File::from_raw_fd(fd) }.read_to_end(&mut bytes);
    let plan = read
        .map_err(|e| e.to_string())
        .and_then(|_| _core::plan::decode(&bytes).map_err(|e| e.to_string()));
    match plan {
        Ok(plan) => _core::host::run(plan),
        Err(e) => {
            let _ = writeln!(
                std::io::stderr(),
                "dslaunch: error: cannot read the job's plan: {e} (rebuild: make build-dev, or set DSLAUNCH_NATIVE_HOST=0)"
            );
            std::process::exit(1);
        }
    }
}

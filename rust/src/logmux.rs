//! Line-atomic multiplexing of many ranks' output onto one console.
//!
//! Each rank stream feeds a [`LineSplitter`], which cuts bytes into segments ending at `\n`, at a
//! lone `\r` (progress bars redraw in place), or at `max_line` bytes for a line that never ends.
//! A [`Sink`] writes whole segments, each behind its rank's prefix, so no rank's line is ever cut
//! by another's. Bytes are never decoded: invalid UTF-8 passes through untouched.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};

/// How a segment ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// With `\n` (or `\r\n`), included in the segment.
    Newline,
    /// With a lone `\r`, included: the next segment redraws the same terminal line.
    CarriageReturn,
    /// Not at all: a piece of an over-long line, or the unterminated tail at end of stream. The
    /// console adds a `\n` so the next rank's output starts on a line of its own.
    Cut,
}

/// Splits one stream into segments, keeping the unterminated tail between reads.
#[derive(Debug)]
pub struct LineSplitter {
    pending: Vec<u8>,
    max_line: usize,
}

impl LineSplitter {
    /// A splitter that cuts lines longer than `max_line` bytes into pieces.
    pub fn new(max_line: usize) -> Self {
        LineSplitter {
            pending: Vec::new(),
            max_line: max_line.max(1),
        }
    }

    /// Bytes held back waiting for the end of their line.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Feeds `data`; calls `emit` for every complete segment, in order.
    pub fn feed(&mut self, mut data: &[u8], mut emit: impl FnMut(&[u8], Ending)) {
        // A `\r` held from the previous read: decide now whether it was half of `\r\n`.
        if self.pending.last() == Some(&b'\r') && !data.is_empty() {
            if data[0] == b'\n' {
                self.pending.push(b'\n');
                data = &data[1..];
                emit(&self.pending, Ending::Newline);
            } else {
                emit(&self.pending, Ending::CarriageReturn);
            }
            self.pending.clear();
        }
        while !data.is_empty() {
            let Some(i) = memchr::memchr2(b'\n', b'\r', data) else {
                self.hold(data, &mut emit);
                return;
            };
            let (end, ending) = if data[i] == b'\n' {
                (i + 1, Ending::Newline)
            } else if i + 1 == data.len() {
                // A trailing `\r`: the `\n` of a `\r\n` may be in the next read.
                self.hold(data, &mut emit);
                return;
            } else if data[i + 1] == b'\n' {
                (i + 2, Ending::Newline)
            } else {
                (i + 1, Ending::CarriageReturn)
            };
            if self.pending.is_empty() {
                self.emit_bounded(&data[..end], ending, &mut emit);
            } else {
                self.pending.extend_from_slice(&data[..end]);
                let line = std::mem::take(&mut self.pending);
                self.emit_bounded(&line, ending, &mut emit);
                self.pending = line;
                self.pending.clear();
            }
            data = &data[end..];
        }
    }

    /// End of stream: an unterminated tail becomes a final `Cut` segment.
    pub fn finish(&mut self, mut emit: impl FnMut(&[u8], Ending)) {
        if !self.pending.is_empty() {
            let ending = if self.pending.last() == Some(&b'\r') {
                Ending::CarriageReturn
            } else {
                Ending::Cut
            };
            emit(&self.pending, ending);
            self.pending.clear();
        }
        self.pending.shrink_to(0);
    }

    /// Keeps an unterminated piece, emitting `max_line`-sized cuts when it grows too long.
    fn hold(&mut self, mut data: &[u8], emit: &mut impl FnMut(&[u8], Ending)) {
        while self.pending.len() + data.len() >= self.max_line {
            let take = self.max_line - self.pending.len();
            if self.pending.is_empty() {
                emit(&data[..take], Ending::Cut);
            } else {
                self.pending.extend_from_slice(&data[..take]);
                emit(&self.pending, Ending::Cut);
                self.pending.clear();
            }
            data = &data[take..];
        }
        self.pending.extend_from_slice(data);
    }

    /// Emits a complete segment, in `max_line` pieces if it is longer than that.
    fn emit_bounded(&self, mut seg: &[u8], ending: Ending, emit: &mut impl FnMut(&[u8], Ending)) {
        while seg.len() > self.max_line {
            emit(&seg[..self.max_line], Ending::Cut);
            seg = &seg[self.max_line..];
        }
        emit(seg, ending);
    }
}

/// Where console output goes: our stdout or stderr. Output is buffered and written in large
/// writes. For a pipe or terminal the fd is reopened through `/proc/self/fd` to get a file
/// description of our own that can be non-blocking (flags live on the description, so the
/// shell's terminal is never left non-blocking); then a slow reader makes the supervisor stop
/// reading ranks (the ranks block on their pipes) instead of stalling its reaping. A regular
/// file keeps the shared description, so our writes and Python's append at the same offset.
pub struct Sink {
    fd: OwnedFd,
    nonblocking: bool,
    buf: Vec<u8>,
    start: usize,
    broken: bool,
}

/// Above this many buffered bytes the supervisor stops reading rank output until the console catches up.
pub const HIGH_WATER: usize = 8 << 20;

impl Sink {
    /// A sink writing to `fd` (1 or 2).
    pub fn open(fd: RawFd) -> io::Result<Sink> {
        // SAFETY: the caller passes an fd that is open for the lifetime of the process (1 or 2).
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        let stat = rustix::fs::fstat(borrowed)?;
        let kind = rustix::fs::FileType::from_raw_mode(stat.st_mode);
        let reopen = matches!(kind, rustix::fs::FileType::Fifo | rustix::fs::FileType::CharacterDevice);
        if reopen {
            let path = format!("/proc/self/fd/{fd}");
            let flags = rustix::fs::OFlags::WRONLY
                | rustix::fs::OFlags::NONBLOCK
                | rustix::fs::OFlags::CLOEXEC
                | rustix::fs::OFlags::NOCTTY
                | rustix::fs::OFlags::APPEND;
            if let Ok(own) = rustix::fs::open(path.as_str(), flags, rustix::fs::Mode::empty()) {
                return Ok(Sink {
                    fd: own,
                    nonblocking: true,
                    buf: Vec::new(),
                    start: 0,
                    broken: false,
                });
            }
        }
        let dup = rustix::io::fcntl_dupfd_cloexec(borrowed, 3)?;
        Ok(Sink {
            fd: dup,
            nonblocking: false,
            buf: Vec::new(),
            start: 0,
            broken: false,
        })
    }

    /// The fd to watch for writability.
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Whether writes can return EAGAIN (so writability must be watched).
    pub fn is_nonblocking(&self) -> bool {
        self.nonblocking
    }

    /// Buffered, not yet written bytes.
    pub fn backlog(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Appends one segment behind `prefix`, adding a newline to a cut segment.
    pub fn push(&mut self, prefix: &[u8], seg: &[u8], ending: Ending) {
        if self.broken {
            return;
        }
        self.buf.extend_from_slice(prefix);
        self.buf.extend_from_slice(seg);
        if ending == Ending::Cut {
            self.buf.push(b'\n');
        }
    }

    /// Writes as much as the fd takes now. Returns true when everything buffered is written.
    /// A reader that went away (EPIPE) turns the sink off: rank output must not kill the job.
    pub fn flush(&mut self) -> bool {
        while self.start < self.buf.len() && !self.broken {
            match rustix::io::write(&self.fd, &self.buf[self.start..]) {
                Ok(n) => self.start += n,
                Err(e) if e == rustix::io::Errno::INTR => {}
                Err(e) if e == rustix::io::Errno::AGAIN => break,
                Err(_) => self.broken = true,
            }
        }
        if self.start == self.buf.len() || self.broken {
            self.buf.clear();
            if self.buf.capacity() > HIGH_WATER {
                self.buf.shrink_to(1 << 16);
            }
            self.start = 0;
            return true;
        }
        if self.start > (1 << 20) {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        false
    }

    /// Writes everything, waiting for the fd when it is non-blocking and full.
    pub fn flush_all(&mut self) {
        while !self.flush() {
            let mut fds = [rustix::event::PollFd::new(&self.fd, rustix::event::PollFlags::OUT)];
            let _ = rustix::event::poll(&mut fds, None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(chunks: &[&[u8]], max: usize) -> Vec<(Vec<u8>, Ending)> {
        let mut s = LineSplitter::new(max);
        let mut out = Vec::new();
        for c in chunks {
            s.feed(c, |seg, e| out.push((seg.to_vec(), e)));
        }
        s.finish(|seg, e| out.push((seg.to_vec(), e)));
        out
    }

    #[test]
    fn whole_lines_across_reads() {
        let out = split(&[b"hel", b"lo\nwor", b"ld\n"], 100);
        assert_eq!(
            out,
            vec![
                (b"hello\n".to_vec(), Ending::Newline),
                (b"world\n".to_vec(), Ending::Newline)
            ]
        );
    }

    #[test]
    fn crlf_split_between_reads_stays_one_line() {
        let out = split(&[b"a\r", b"\nb\r\n"], 100);
        assert_eq!(
            out,
            vec![
                (b"a\r\n".to_vec(), Ending::Newline),
                (b"b\r\n".to_vec(), Ending::Newline)
            ]
        );
    }

    #[test]
    fn progress_bars_split_at_lone_cr() {
        let out = split(&[b"10%\r20%\r", b"done\n"], 100);
        assert_eq!(
            out,
            vec![
                (b"10%\r".to_vec(), Ending::CarriageReturn),
                (b"20%\r".to_vec(), Ending::CarriageReturn),
                (b"done\n".to_vec(), Ending::Newline)
            ]
        );
    }

    #[test]
    fn long_lines_are_cut_and_nothing_is_lost() {
        let data = [b'x'; 25];
        let out = split(&[&data[..7], &data[7..], b"\n"], 10);
        let joined: Vec<u8> = out.iter().flat_map(|(s, _)| s.clone()).collect();
        assert_eq!(joined.len(), 26);
        assert!(out.iter().all(|(s, _)| s.len() <= 10));
        assert_eq!(out.last().unwrap().1, Ending::Newline);
    }

    #[test]
    fn unterminated_tail_is_flushed_at_eof_and_bytes_pass_unchanged() {
        let out = split(&[b"\xff\xfe bad utf8\nno newline"], 100);
        assert_eq!(out[0].0, b"\xff\xfe bad utf8\n".to_vec());
        assert_eq!(out[1], (b"no newline".to_vec(), Ending::Cut));
    }

    #[test]
    fn sink_prefixes_each_segment_and_terminates_cuts() {
        let mut sink = Sink {
            fd: rustix::fs::open("/dev/null", rustix::fs::OFlags::WRONLY, rustix::fs::Mode::empty()).unwrap(),
            nonblocking: false,
            buf: Vec::new(),
            start: 0,
            broken: false,
        };
        sink.push(b"[0]: ", b"a\n", Ending::Newline);
        sink.push(b"[1]: ", b"bb", Ending::Cut);
        assert_eq!(sink.buf, b"[0]: a\n[1]: bb\n".to_vec());
        assert!(sink.flush());
        assert_eq!(sink.backlog(), 0);
    }
}

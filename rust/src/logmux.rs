//! Line-atomic multiplexing of many ranks' output onto one console.
//!
//! Each rank stream feeds a [`LineSplitter`], which cuts bytes into segments ending at `\n`, at a
//! lone `\r` (progress bars redraw in place), or at `max_line` bytes for a line that never ends.
//! A [`Sink`] writes whole segments, each behind its rank's prefix, so no rank's line is ever cut
//! by another's. Bytes are never decoded: invalid UTF-8 passes through untouched.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

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
                self.emit_bounded(&self.pending, Ending::Newline, &mut emit);
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
            // A `\r` that ends exactly at the limit stays held: whether it is a lone `\r` (a
            // whole segment) or half of `\r\n` is decided by the next byte, as within one read.
            if self.pending.len() + data.len() == self.max_line && data.last() == Some(&b'\r') {
                break;
            }
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
    terminal: bool,
    at_line_start: bool,
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
        // SAFETY: isatty only inspects the fd, which is open (see above).
        let terminal = unsafe { libc::isatty(fd) } == 1;
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
                    terminal,
                    at_line_start: true,
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
            terminal,
            at_line_start: true,
        })
    }

    /// Whether it is a terminal.
    pub fn is_terminal(&self) -> bool {
        self.terminal
    }

    /// Whether the last byte pushed ended a line (a progress bar's `\r` does not).
    pub fn at_line_start(&self) -> bool {
        self.at_line_start
    }

    /// Appends bytes as they are (the status line's escape sequences, launcher messages).
    pub fn push_raw(&mut self, bytes: &[u8]) {
        if self.broken || bytes.is_empty() {
            return;
        }
        self.buf.extend_from_slice(bytes);
        self.at_line_start = bytes.last() == Some(&b'\n');
    }

    /// Declares the cursor at the start of a line (after drawing a status line that the next
    /// write erases first).
    pub fn mark_line_start(&mut self) {
        self.at_line_start = true;
    }

    /// Columns of the terminal, if it is one and says.
    pub fn columns(&self) -> Option<usize> {
        if !self.terminal {
            return None;
        }
        let mut ws: libc::winsize = libc::winsize {
            ws_row: 0,
            ws_col: 0,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCGWINSZ writes one winsize into the valid, writable `ws`.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
        (rc == 0 && ws.ws_col > 0).then_some(usize::from(ws.ws_col))
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
        self.at_line_start = ending != Ending::CarriageReturn;
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

/// A fast hash of a line's bytes (FxHash-style, 8 bytes a step): the collapser's key. Equal
/// hashes are confirmed by comparing the bytes, so collisions cost a group, never a wrong line.
pub fn line_hash(stderr: bool, line: &[u8]) -> u64 {
    const K: u64 = 0x517c_c1b7_2722_0a95;
    let mut h: u64 = u64::from(stderr) ^ (line.len() as u64).wrapping_mul(K);
    let mut chunks = line.chunks_exact(8);
    for c in &mut chunks {
        let w = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        h = (h.rotate_left(5) ^ w).wrapping_mul(K);
    }
    for &b in chunks.remainder() {
        h = (h.rotate_left(5) ^ u64::from(b)).wrapping_mul(K);
    }
    h
}

/// `HashMap` hasher for keys that are hashes already.
#[derive(Default, Clone, Copy)]
pub struct PassThroughHasher(u64);

impl std::hash::Hasher for PassThroughHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type PassThrough = std::hash::BuildHasherDefault<PassThroughHasher>;

/// One console line held by the [`Collapser`], with every rank that wrote it so far.
#[derive(Debug)]
pub struct HeldLine {
    seq: u64,
    deadline: Instant,
    hash: u64,
    joinable: bool,
    /// Moved to the back of the FIFO: this slot prints nothing.
    moved: bool,
    /// Where its bytes start in the collapser's arena (an absolute offset) and how many.
    start: usize,
    len: usize,
    /// Whether it goes to stderr (else stdout).
    pub stderr: bool,
    /// How it ended.
    pub ending: Ending,
    /// The first rank (index) that wrote it.
    pub first: u32,
    /// The ranks that wrote it after the first, in the order they did (no allocation for one).
    pub more: Vec<u32>,
}

impl HeldLine {
    /// How many ranks wrote it.
    pub fn n_ranks(&self) -> usize {
        1 + self.more.len()
    }

    /// The ranks that wrote it, in the order they did.
    pub fn ranks(&self) -> impl Iterator<Item = u32> + '_ {
        std::iter::once(self.first).chain(self.more.iter().copied())
    }
}

/// Collapses identical console lines written by several ranks within a window into one line.
///
/// Every console line of every rank is held for `window` in one FIFO of [`HeldLine`]s, in the
/// order the lines were first seen; a rank writing a line already held joins that entry. The
/// FIFO is released in order, so each rank's lines keep their order: a rank may join an entry
/// only if it is later in the FIFO than every entry the rank is already in. If it is not, but
/// the entry is the newest one of each rank in it, the entry moves to the back of the FIFO
/// (leaving an empty slot) and the rank joins it there: nobody's order changes, and the common
/// "each rank prints its own line, then the same warning" collapses. Otherwise the line starts
/// a new entry behind the rank's others (a rank's held line is always printed before its next,
/// different one). Only whole lines (`\n`) are joinable; progress-bar redraws and cut pieces
/// of over-long lines keep their place in the FIFO, or pass straight through when their rank
/// holds nothing. Held bytes live in one arena (no allocation per line) and are bounded: past
/// the cap the oldest entries are released early.
#[derive(Debug)]
pub struct Collapser {
    window: Duration,
    fifo: VecDeque<HeldLine>,
    head_seq: u64,
    next_seq: u64,
    newest: HashMap<u64, u64, PassThrough>,
    /// Per rank: 1 + the seq of the newest entry holding one of its lines (0: none ever).
    after: Vec<u64>,
    arena: Vec<u8>,
    /// The absolute offset of `arena[0]`.
    arena_base: usize,
    held_bytes: usize,
    max_held_bytes: usize,
}

impl Collapser {
    /// A collapser for `n_ranks` ranks holding lines for `window`, at most `max_held_bytes`.
    pub fn new(n_ranks: usize, window: Duration, max_held_bytes: usize) -> Self {
        Collapser {
            window,
            fifo: VecDeque::new(),
            head_seq: 0,
            next_seq: 0,
            newest: HashMap::default(),
            after: vec![0; n_ranks],
            arena: Vec::new(),
            arena_base: 0,
            held_bytes: 0,
            max_held_bytes: max_held_bytes.max(1),
        }
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.fifo.is_empty()
    }

    /// When the oldest held line is due.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.fifo.front().map(|h| h.deadline)
    }

    fn bytes(&self, h: &HeldLine) -> &[u8] {
        let at = h.start - self.arena_base;
        &self.arena[at..at + h.len]
    }

    /// Takes one segment of rank `rank`. Returns false when it was not held (the caller writes
    /// it now): a segment that cannot be joined, from a rank with nothing held.
    pub fn push(&mut self, rank: usize, stderr: bool, seg: &[u8], ending: Ending, now: Instant) -> bool {
        let joinable = ending == Ending::Newline;
        let holds_some = self.after[rank] > self.head_seq;
        if !joinable && !holds_some {
            return false;
        }
        let hash = if joinable { line_hash(stderr, seg) } else { 0 };
        if joinable {
            if let Some(&seq) = self.newest.get(&hash) {
                if seq >= self.head_seq {
                    let idx = (seq - self.head_seq) as usize;
                    let same = {
                        let held = &self.fifo[idx];
                        held.stderr == stderr && self.bytes(held) == seg
                    };
                    if same {
                        if seq + 1 > self.after[rank] {
                            self.fifo[idx].more.push(rank as u32);
                            self.after[rank] = seq + 1;
                            return true;
                        }
                        if self.movable(idx, rank) {
                            self.move_to_back(idx, rank);
                            return true;
                        }
                    }
                }
            }
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let start = self.arena_base + self.arena.len();
        self.arena.extend_from_slice(seg);
        self.held_bytes += seg.len();
        self.fifo.push_back(HeldLine {
            seq,
            deadline: now + self.window,
            hash,
            joinable,
            moved: false,
            start,
            len: seg.len(),
            stderr,
            ending,
            first: rank as u32,
            more: Vec::new(),
        });
        if joinable {
            self.newest.insert(hash, seq);
        }
        self.after[rank] = seq + 1;
        true
    }

    /// Whether entry `idx` may move to the back for `rank` to join it: the rank is not in it yet,
    /// and it is the newest entry of every rank in it (so no rank's later line would pass it).
    fn movable(&self, idx: usize, rank: usize) -> bool {
        let held = &self.fifo[idx];
        let newest = held.seq + 1;
        held.ranks()
            .all(|q| q as usize != rank && self.after[q as usize] == newest)
    }

    /// Moves entry `idx` to the back of the FIFO (its bytes copied behind the others, its old
    /// slot left empty) and adds `rank` to it.
    fn move_to_back(&mut self, idx: usize, rank: usize) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let start = self.arena_base + self.arena.len();
        let old = &mut self.fifo[idx];
        old.moved = true;
        let (from, len) = (old.start - self.arena_base, old.len);
        old.len = 0;
        let mut more = std::mem::take(&mut old.more);
        more.push(rank as u32);
        let moved = HeldLine {
            seq,
            deadline: old.deadline,
            hash: old.hash,
            joinable: true,
            moved: false,
            start,
            len,
            stderr: old.stderr,
            ending: old.ending,
            first: old.first,
            more,
        };
        self.arena.extend_from_within(from..from + len);
        for q in moved.ranks() {
            self.after[q as usize] = seq + 1;
        }
        self.newest.insert(moved.hash, seq);
        self.fifo.push_back(moved);
    }

    /// Releases, oldest first, every held line that is due at `now` (all of them with `all`),
    /// and older ones while more than the cap is held. `emit` gets the entry and its bytes.
    pub fn release(&mut self, now: Instant, all: bool, mut emit: impl FnMut(&HeldLine, &[u8])) {
        while let Some(front) = self.fifo.front() {
            if !(all || front.deadline <= now || self.held_bytes > self.max_held_bytes) {
                break;
            }
            let Some(held) = self.fifo.pop_front() else { break };
            self.head_seq = held.seq + 1;
            self.held_bytes -= held.len;
            if held.moved {
                continue;
            }
            if held.joinable && self.newest.get(&held.hash) == Some(&held.seq) {
                self.newest.remove(&held.hash);
            }
            emit(&held, self.bytes(&held));
        }
        match self.fifo.front() {
            None => {
                self.arena_base += self.arena.len();
                self.arena.clear();
                if self.arena.capacity() > 2 * self.max_held_bytes {
                    self.arena.shrink_to(self.max_held_bytes);
                }
            }
            Some(front) => {
                let consumed = front.start - self.arena_base;
                if consumed > (1 << 16) && consumed > self.arena.len() / 2 {
                    self.arena.drain(..consumed);
                    self.arena_base += consumed;
                }
            }
        }
    }
}

/// Tags as a compact list: all numeric -> ranges (`0-6,8-15`), else joined with `,`.
pub fn format_tags<'a>(tags: impl IntoIterator<Item = &'a str>) -> String {
    let tags: Vec<&str> = tags.into_iter().collect();
    let nums: Option<Vec<u64>> = tags.iter().map(|t| t.parse::<u64>().ok()).collect();
    let Some(mut nums) = nums else {
        return tags.join(",");
    };
    nums.sort_unstable();
    nums.dedup();
    let mut out = String::new();
    let mut i = 0;
    while i < nums.len() {
        let mut j = i;
        while j + 1 < nums.len() && nums[j + 1] == nums[j] + 1 {
            j += 1;
        }
        if !out.is_empty() {
            out.push(',');
        }
        if i == j {
            out.push_str(&nums[i].to_string());
        } else {
            out.push_str(&format!("{}-{}", nums[i], nums[j]));
        }
        i = j + 1;
    }
    out
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

    fn released(c: &mut Collapser, all: bool, at: Instant) -> Vec<(Vec<u32>, Vec<u8>)> {
        let mut out = Vec::new();
        c.release(at, all, |h, line| out.push((h.ranks().collect(), line.to_vec())));
        out
    }

    #[test]
    fn identical_lines_of_many_ranks_collapse_into_one() {
        let t0 = Instant::now();
        let mut c = Collapser::new(16, Duration::from_millis(100), 1 << 20);
        for r in 0..16 {
            assert!(c.push(r, true, b"warning: x\n", Ending::Newline, t0));
        }
        assert!(
            released(&mut c, false, t0).is_empty(),
            "nothing is due before the window ends"
        );
        let out = released(&mut c, false, t0 + Duration::from_millis(100));
        assert_eq!(out, vec![((0..16).collect::<Vec<u32>>(), b"warning: x\n".to_vec())]);
        assert!(c.is_empty());
    }

    #[test]
    fn a_ranks_lines_are_never_reordered() {
        let t0 = Instant::now();
        let mut c = Collapser::new(2, Duration::from_secs(1), 1 << 20);
        c.push(0, false, b"A\n", Ending::Newline, t0);
        c.push(0, false, b"B\n", Ending::Newline, t0);
        c.push(1, false, b"B\n", Ending::Newline, t0); // joins B
        c.push(1, false, b"A\n", Ending::Newline, t0); // must not join A: that would print it before B
        c.push(0, false, b"B\n", Ending::Newline, t0); // rank 0's second B: a new line, not a join
        let out = released(&mut c, true, t0);
        assert_eq!(
            lines_of(&out, 0),
            vec![b"A\n".to_vec(), b"B\n".to_vec(), b"B\n".to_vec()]
        );
        assert_eq!(lines_of(&out, 1), vec![b"B\n".to_vec(), b"A\n".to_vec()]);
        assert_eq!(out[1], (vec![0, 1], b"B\n".to_vec()));
    }

    /// Rank r's lines as released, in order.
    fn lines_of(out: &[(Vec<u32>, Vec<u8>)], r: u32) -> Vec<Vec<u8>> {
        out.iter()
            .filter(|(rs, _)| rs.contains(&r))
            .map(|(_, l)| l.clone())
            .collect()
    }

    #[test]
    fn a_shared_line_after_each_ranks_own_line_collapses() {
        let t0 = Instant::now();
        let mut c = Collapser::new(3, Duration::from_secs(1), 1 << 20);
        for r in 0..3u32 {
            // rank r's whole output arrives before rank r+1's, as when ranks print in turn
            c.push(
                r as usize,
                false,
                format!("rank {r} ready\n").as_bytes(),
                Ending::Newline,
                t0,
            );
            c.push(r as usize, false, b"W\n", Ending::Newline, t0);
        }
        let out = released(&mut c, true, t0);
        for r in 0..3u32 {
            assert_eq!(
                lines_of(&out, r),
                vec![format!("rank {r} ready\n").into_bytes(), b"W\n".to_vec()]
            );
        }
        assert_eq!(
            out.last(),
            Some(&(vec![0, 1, 2], b"W\n".to_vec())),
            "W printed once: {out:?}"
        );
        assert_eq!(out.len(), 4);
        assert_eq!(c.held_bytes, 0);
    }

    #[test]
    fn a_line_a_rank_repeats_is_printed_for_each_time() {
        let t0 = Instant::now();
        let mut c = Collapser::new(3, Duration::from_secs(1), 1 << 20);
        for r in 0..3u32 {
            for line in [format!("rank {r}\n"), "W\n".into(), "=\n".into(), "W\n".into()] {
                c.push(r as usize, false, line.as_bytes(), Ending::Newline, t0);
            }
        }
        let out = released(&mut c, true, t0);
        for r in 0..3u32 {
            let want: Vec<Vec<u8>> = [format!("rank {r}\n"), "W\n".into(), "=\n".into(), "W\n".into()]
                .into_iter()
                .map(String::into_bytes)
                .collect();
            assert_eq!(lines_of(&out, r), want, "rank {r}: {out:?}");
        }
    }

    #[test]
    fn unjoinable_segments_pass_through_unless_their_rank_holds_lines() {
        let t0 = Instant::now();
        let mut c = Collapser::new(2, Duration::from_secs(1), 1 << 20);
        assert!(!c.push(0, false, b"10%\r", Ending::CarriageReturn, t0));
        assert!(c.push(1, false, b"x\n", Ending::Newline, t0));
        assert!(
            c.push(1, false, b"20%\r", Ending::CarriageReturn, t0),
            "queued behind rank 1's held line"
        );
        let out = released(&mut c, true, t0);
        assert_eq!(out, vec![(vec![1], b"x\n".to_vec()), (vec![1], b"20%\r".to_vec())]);
    }

    #[test]
    fn held_bytes_are_bounded() {
        let t0 = Instant::now();
        let mut c = Collapser::new(1, Duration::from_secs(60), 100);
        for i in 0..50 {
            c.push(0, false, format!("line {i}\n").as_bytes(), Ending::Newline, t0);
        }
        let early = released(&mut c, false, t0);
        assert!(!early.is_empty() && early[0].1 == b"line 0\n");
        assert!(c.held_bytes <= 100);
        let rest = released(&mut c, true, t0);
        assert_eq!(early.len() + rest.len(), 50, "nothing lost");
    }

    #[test]
    fn tags_format_as_ranges() {
        assert_eq!(
            format_tags(["0", "1", "2", "3", "4", "5", "6", "8", "9", "15", "10", "11", "12", "13", "14"]),
            "0-6,8-15"
        );
        assert_eq!(format_tags(["7"]), "7");
        assert_eq!(format_tags(["a", "b"]), "a,b");
    }

    #[test]
    fn sink_prefixes_each_segment_and_terminates_cuts() {
        let mut sink = Sink {
            fd: rustix::fs::open("/dev/null", rustix::fs::OFlags::WRONLY, rustix::fs::Mode::empty()).unwrap(),
            nonblocking: false,
            buf: Vec::new(),
            start: 0,
            broken: false,
            terminal: false,
            at_line_start: true,
        };
        sink.push(b"[0]: ", b"a\n", Ending::Newline);
        sink.push(b"[1]: ", b"bb", Ending::Cut);
        assert_eq!(sink.buf, b"[0]: a\n[1]: bb\n".to_vec());
        assert!(sink.flush());
        assert_eq!(sink.backlog(), 0);
    }
}

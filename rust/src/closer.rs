//! Closing a big job's descriptors on a second thread.
//!
//! Why: when many ranks end at once (a failure or a stop at 1,024 ranks, or 1,024 ranks that
//! finish together), the loop has three descriptors a rank to close (two pipes and a pidfd).
//! Each close frees a file, its dentry and its inode and takes it out of the epoll set: a few
//! microseconds each, and the biggest part of the loop's work after the ranks die (profiled in
//! docs/benchmarks.md). While the ranks die, both cores run their exits and the loop lags behind;
//! after, the loop works alone on one core. Handing the closes to a thread of their own lets
//! the other core do them, at the cost of one thread per big job.
//!
//! The loop hands descriptors over in batches (one wake-up of this thread per loop turn, not
//! per descriptor). At the job's end it closes from the same queue too, the two threads taking
//! chunks, and joins the thread before it reports the job done: a finished job has closed
//! everything, as without the closer.

use std::os::fd::OwnedFd;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

/// Jobs with at least this many ranks close their descriptors on a closer thread; smaller ones
/// close them on the loop, where a thread's start (tens of microseconds) would cost more.
pub const MIN_RANKS: usize = 128;

/// How many descriptors a thread takes from the queue at a time.
const CHUNK: usize = 32;

#[derive(Default)]
struct Queue {
    fds: Vec<OwnedFd>,
    finished: bool,
}

#[derive(Default)]
struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes up to CHUNK descriptors; empty when there are none.
    fn take_chunk(q: &mut Queue) -> Vec<OwnedFd> {
        let at = q.fds.len().saturating_sub(CHUNK);
        q.fds.split_off(at)
    }
}

/// Descriptors to close: on a closer thread if it could be started, else right here.
pub struct Closer {
    pending: Vec<OwnedFd>,
    shared: Option<Arc<Shared>>,
    thread: Option<JoinHandle<()>>,
}

impl Closer {
    /// A closer that uses a thread when `threaded`, else closes in place.
    pub fn new(threaded: bool) -> Closer {
        let mut c = Closer {
            pending: Vec::new(),
            shared: None,
            thread: None,
        };
        if threaded {
            let shared = Arc::new(Shared::default());
            let theirs = shared.clone();
            // No thread (EAGAIN at a thread limit): the descriptors are closed in place.
            if let Ok(t) = std::thread::Builder::new()
                .name("dslaunch-closer".into())
                .spawn(move || close_until_finished(&theirs))
            {
                c.shared = Some(shared);
                c.thread = Some(t);
            }
        }
        c
    }

    /// Whether descriptors are closed on a thread of their own.
    pub fn is_threaded(&self) -> bool {
        self.shared.is_some()
    }

    /// Queues `fd` to be closed after the next `flush` (closes it now without a thread).
    pub fn close(&mut self, fd: OwnedFd) {
        if self.shared.is_some() {
            self.pending.push(fd);
        } else {
            drop(fd);
        }
    }

    /// Hands the queued descriptors to the closer thread.
    pub fn flush(&mut self) {
        let Some(shared) = self.shared.as_ref() else { return };
        if self.pending.is_empty() {
            return;
        }
        shared.lock().fds.append(&mut self.pending);
        shared.wake.notify_one();
    }

    /// Closes everything still queued, sharing the work with the closer thread, and returns
    /// once every descriptor handed over is closed.
    pub fn finish(&mut self) {
        self.flush();
        let Some(shared) = self.shared.take() else { return };
        shared.lock().finished = true;
        shared.wake.notify_one();
        // The caller has nothing else to do: it closes too, so the two cores share the tail.
        loop {
            let chunk = Shared::take_chunk(&mut shared.lock());
            if chunk.is_empty() {
                break;
            }
            drop(chunk);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn close_until_finished(shared: &Shared) {
    let mut q = shared.lock();
    loop {
        let chunk = Shared::take_chunk(&mut q);
        if chunk.is_empty() {
            if q.finished {
                return;
            }
            q = shared.wake.wait(q).unwrap_or_else(std::sync::PoisonError::into_inner);
            continue;
        }
        drop(q);
        drop(chunk); // closes them, without the lock
        q = shared.lock();
    }
}

impl Drop for Closer {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pipes whose read ends go to the closer; the write ends stay here to tell (EPIPE) whether
    /// their read end was closed.
    fn pipes(n: usize) -> (Vec<OwnedFd>, Vec<OwnedFd>) {
        // close-on-exec: a child another test spawns meanwhile must not hold a read end open
        let flags = rustix::pipe::PipeFlags::CLOEXEC;
        (0..n).map(|_| rustix::pipe::pipe_with(flags).expect("pipe")).unzip()
    }

    /// A threaded closer holding the read ends of `n` pipes (not flushed), and their write ends.
    fn holding(n: usize) -> (Closer, Vec<OwnedFd>) {
        let (reads, writes) = pipes(n);
        let mut closer = Closer::new(true);
        for r in reads {
            closer.close(r);
        }
        (closer, writes)
    }

    fn read_end_closed(w: &OwnedFd) -> bool {
        rustix::io::write(w, b"x") == Err(rustix::io::Errno::PIPE)
    }

    #[test]
    fn everything_handed_over_is_closed_when_finish_returns() {
        for threaded in [true, false] {
            let (reads, writes) = pipes(300);
            let mut closer = Closer::new(threaded);
            assert_eq!(closer.is_threaded(), threaded);
            for (i, r) in reads.into_iter().enumerate() {
                closer.close(r);
                if i % 50 == 49 {
                    closer.flush(); // a loop turn
                }
            }
            closer.finish();
            assert!(writes.iter().all(read_end_closed), "threaded={threaded}");
        }
    }

    #[test]
    fn a_flushed_batch_is_closed_while_the_loop_goes_on() {
        let (mut closer, writes) = holding(10);
        assert!(!writes.iter().any(read_end_closed), "closed before the flush");
        closer.flush();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !writes.iter().all(read_end_closed) {
            assert!(
                std::time::Instant::now() < deadline,
                "the closer thread never closed the batch"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    #[test]
    fn dropping_the_closer_closes_what_it_holds() {
        let (closer, writes) = holding(5);
        drop(closer);
        assert!(writes.iter().all(read_end_closed));
    }
}

//! Adaptive polling of the available ring (`--poll-max-us`).
//!
//! A queue worker that runs out of requests does not go to sleep on the
//! kick eventfd at once: it first polls the available ring, with kicks
//! suppressed, for a window. Waking a sleeping thread on another CPU is
//! most of a request's round trip at queue depth 1, and a poll that finds
//! the next request saves it.
//!
//! The window follows QEMU's poll-grow/poll-shrink model. After each wait
//! for the next request, `waited` (poll window plus any sleep) decides:
//! - `waited <= window`: the poll found the request, keep the window;
//! - `window < waited <= max`: a longer poll would have found it, double
//!   the window (from 0 to 4 µs first);
//! - `waited > max`: polling that long would not have helped, halve it.
//!
//! Contention: polling burns a CPU that the guest's vCPU or another
//! server may need, which costs far more than it saves. Each poll window
//! is measured with `getrusage(RUSAGE_THREAD)`: if the worker was switched
//! out involuntarily during the window (`ru_nivcsw` grew: another runnable
//! thread wanted this CPU), or was on a CPU for less than half of a window
//! of 20 µs or more, the host counts as CPU-contended. Polling then stops
//! for a back-off time of 10 ms, doubled on every contended window right
//! after a back-off, up to 1 s, and starts again from a zero window.

use std::io;
use std::time::{Duration, Instant};

/// The first window after a zero one, as in QEMU.
const INITIAL_WINDOW: Duration = Duration::from_micros(4);
/// Windows shorter than this are too short for a CPU-time comparison.
const MIN_MEASURED_WINDOW: Duration = Duration::from_micros(20);
const MIN_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// What the kernel says about the calling thread's CPU use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuSample {
    /// Involuntary context switches so far.
    pub involuntary_switches: u64,
    /// User plus system CPU time so far.
    pub cpu_time: Duration,
}

impl CpuSample {
    /// The calling thread's sample.
    pub fn of_this_thread() -> io::Result<Self> {
        // SAFETY: an all-zero rusage is a valid value for getrusage to
        // overwrite.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: `usage` is a valid, writable rusage for the call.
        if unsafe { libc::getrusage(libc::RUSAGE_THREAD, &raw mut usage) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let time = |t: libc::timeval| {
            Duration::from_secs(u64::try_from(t.tv_sec).unwrap_or(0))
                + Duration::from_micros(u64::try_from(t.tv_usec).unwrap_or(0))
        };
        Ok(CpuSample {
            involuntary_switches: u64::try_from(usage.ru_nivcsw).unwrap_or(0),
            cpu_time: time(usage.ru_utime) + time(usage.ru_stime),
        })
    }
}

/// The polling state of one queue worker.
#[derive(Debug)]
pub struct Poller {
    max: Duration,
    window: Duration,
    /// When the worker ran out of requests, until the next one shows up.
    waiting_since: Option<Instant>,
    /// No polling before this instant: the host was found CPU-contended.
    backoff_until: Option<Instant>,
    /// The next back-off time.
    backoff: Duration,
}

impl Poller {
    /// A poller with windows of at most `max`; zero disables polling.
    pub fn new(max: Duration) -> Self {
        Poller {
            max,
            window: Duration::ZERO,
            waiting_since: None,
            backoff_until: None,
            backoff: MIN_BACKOFF,
        }
    }

    /// The window to poll for now: zero when disabled or backing off.
    pub fn window(&self, now: Instant) -> Duration {
        match self.backoff_until {
            Some(until) if now < until => Duration::ZERO,
            _ => self.window,
        }
    }

    /// The worker ran out of requests at `now`.
    pub fn idle(&mut self, now: Instant) {
        self.waiting_since.get_or_insert(now);
    }

    /// The next request showed up at `now` (found by polling, or a kick
    /// woke the worker).
    pub fn busy(&mut self, now: Instant) {
        let Some(since) = self.waiting_since.take() else {
            return;
        };
        if let Some(until) = self.backoff_until {
            // Backing off: the window stays closed until the first wait
            // that ends after the pause.
            if now >= until {
                self.backoff_until = None;
            }
            return;
        }
        if self.max.is_zero() {
            return;
        }
        let waited = now.saturating_duration_since(since);
        if waited <= self.window {
            // The sweet spot: polling found it.
        } else if waited > self.max {
            self.window /= 2;
            if self.window < INITIAL_WINDOW {
                self.window = Duration::ZERO;
            }
        } else if self.window < self.max {
            self.window = if self.window.is_zero() {
                INITIAL_WINDOW
            } else {
                self.window * 2
            }
            .min(self.max);
        }
    }

    /// A poll window from `start` to `end` ran; `before` and `after` are
    /// the worker's CPU samples around it.
    pub fn window_ran(
        &mut self,
        start: Instant,
        end: Instant,
        before: CpuSample,
        after: CpuSample,
    ) {
        let wall = end.saturating_duration_since(start);
        let cpu = after.cpu_time.saturating_sub(before.cpu_time);
        let switched = after.involuntary_switches > before.involuntary_switches;
        let starved = wall >= MIN_MEASURED_WINDOW && cpu < wall / 2;
        if switched || starved {
            tracing::debug!(
                wall_us = wall.as_micros(),
                cpu_us = cpu.as_micros(),
                switched,
                backoff_ms = self.backoff.as_millis(),
                "CPU contended: polling backs off"
            );
            self.window = Duration::ZERO;
            self.backoff_until = Some(end + self.backoff);
            self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        } else {
            self.backoff = MIN_BACKOFF;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);

    fn sample(switches: u64, cpu_us: u64) -> CpuSample {
        CpuSample {
            involuntary_switches: switches,
            cpu_time: US * cpu_us as u32,
        }
    }

    /// Runs one wait of `waited` and returns the window after it.
    fn wait(p: &mut Poller, t: &mut Instant, waited: Duration) -> Duration {
        p.idle(*t);
        *t += waited;
        p.busy(*t);
        p.window(*t)
    }

    #[test]
    fn window_grows_while_polling_would_find_work_and_shrinks_when_not() {
        let mut p = Poller::new(US * 50);
        let mut t = Instant::now();
        assert_eq!(p.window(t), Duration::ZERO);
        // Requests arrive 30 µs apart: the window grows to cover that.
        let grown: Vec<_> = (0..6).map(|_| wait(&mut p, &mut t, US * 30)).collect();
        assert_eq!(grown, [US * 4, US * 8, US * 16, US * 32, US * 32, US * 32]);
        // Within the window: unchanged. Beyond the maximum: halved to 0.
        assert_eq!(wait(&mut p, &mut t, US * 10), US * 32);
        assert_eq!(wait(&mut p, &mut t, US * 500), US * 16);
        assert_eq!(wait(&mut p, &mut t, US * 500), US * 8);
        assert_eq!(wait(&mut p, &mut t, US * 500), US * 4);
        assert_eq!(wait(&mut p, &mut t, US * 500), Duration::ZERO);
        // Capped by the maximum.
        for _ in 0..10 {
            wait(&mut p, &mut t, US * 45);
        }
        assert_eq!(p.window(t), US * 50);
    }

    #[test]
    fn zero_maximum_never_polls() {
        let mut p = Poller::new(Duration::ZERO);
        let mut t = Instant::now();
        for waited in [1, 3, 30, 3000] {
            assert_eq!(wait(&mut p, &mut t, US * waited), Duration::ZERO);
        }
    }

    #[test]
    fn contention_backs_off_with_growing_pauses() {
        let mut p = Poller::new(US * 50);
        let mut t = Instant::now();
        for _ in 0..4 {
            wait(&mut p, &mut t, US * 20);
        }
        assert_eq!(p.window(t), US * 32);
        // A clean window changes nothing.
        p.window_ran(t, t + US * 32, sample(0, 100), sample(0, 131));
        assert_eq!(p.window(t), US * 32);
        // Switched out involuntarily: no polling for 10 ms.
        p.window_ran(t, t + US * 32, sample(0, 100), sample(1, 131));
        assert_eq!(p.window(t + US * 40), Duration::ZERO);
        assert_eq!(wait(&mut p, &mut t, US * 20), Duration::ZERO);
        t += Duration::from_millis(10);
        // After the pause the window starts again from zero.
        assert_eq!(wait(&mut p, &mut t, US * 20), Duration::ZERO);
        assert_eq!(wait(&mut p, &mut t, US * 20), US * 4);
        // Starved (on a CPU for under half the window): a longer pause.
        let start = t;
        p.window_ran(start, start + US * 40, sample(1, 100), sample(1, 110));
        t = start + Duration::from_millis(19);
        assert_eq!(p.window(t), Duration::ZERO);
        t = start + Duration::from_millis(21);
        wait(&mut p, &mut t, US * 1);
        assert_eq!(wait(&mut p, &mut t, US * 20), US * 4);
    }

    #[test]
    fn this_thread_can_be_sampled() {
        let a = CpuSample::of_this_thread().unwrap();
        let mut x = 0u64;
        for i in 0..1_000_000u64 {
            x = x.wrapping_add(std::hint::black_box(i));
        }
        std::hint::black_box(x);
        let b = CpuSample::of_this_thread().unwrap();
        assert!(b.cpu_time >= a.cpu_time);
        assert!(b.involuntary_switches >= a.involuntary_switches);
    }
}

// SPDX-License-Identifier: Apache-2.0

//! CPU time of the benchmark itself and of the server it drives, over one job, so that
//! a report shows which side the job measured.
//!
//! The client's time is `getrusage(RUSAGE_SELF)` (every thread of this process); the
//! server's is `utime + stime` from `/proc/PID/stat` (every thread of that process).
//! Both are sampled right before the queue threads start and right after they end.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::BenchError;

/// Bytes in a GiB.
const GIB: f64 = (1u64 << 30) as f64;

/// CPU time used so far by this process, all threads.
pub fn own_cpu_time() -> Result<Duration, BenchError> {
    // SAFETY: an all-zero rusage is a valid value for getrusage to overwrite.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid, writable rusage for the duration of the call.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &raw mut usage) } != 0 {
        return Err(BenchError::Io {
            context: "getrusage".into(),
            source: std::io::Error::last_os_error(),
        });
    }
    let time = |t: libc::timeval| {
        Duration::from_secs(u64::try_from(t.tv_sec).unwrap_or(0))
            + Duration::from_micros(u64::try_from(t.tv_usec).unwrap_or(0))
    };
    Ok(time(usage.ru_utime) + time(usage.ru_stime))
}

/// `utime + stime`, in clock ticks, from the text of `/proc/PID/stat`. The command
/// name (field 2) is in parentheses and may hold spaces and parentheses itself, so
/// fields are counted from the last `)`.
pub fn parse_stat_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // After the name: state is field 3, utime field 14, stime field 15.
    let mut fields = rest.split_ascii_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    utime.checked_add(stime)
}

/// CPU time used so far by process `pid`, all threads.
pub fn process_cpu_time(pid: u32) -> Result<Duration, BenchError> {
    let path = PathBuf::from(format!("/proc/{pid}/stat"));
    let text = std::fs::read_to_string(&path).map_err(|source| BenchError::Io {
        context: format!("reading {} (--server-pid)", path.display()),
        source,
    })?;
    let ticks = parse_stat_ticks(&text).ok_or_else(|| {
        BenchError::Invalid(format!("{}: no utime and stime fields", path.display()))
    })?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let per_second = u64::try_from(per_second)
        .ok()
        .filter(|&t| t > 0)
        .unwrap_or(100);
    Ok(Duration::from_secs_f64(ticks as f64 / per_second as f64))
}

/// A sample of both sides at one moment.
#[derive(Clone, Copy, Debug)]
pub struct CpuSample {
    client: Duration,
    server: Option<Duration>,
}

impl CpuSample {
    /// Samples this process and, if given, the server process `server_pid`.
    pub fn take(server_pid: Option<u32>) -> Result<Self, BenchError> {
        Ok(Self {
            client: own_cpu_time()?,
            server: server_pid.map(process_cpu_time).transpose()?,
        })
    }
}

/// CPU time over a job, in total and per unit of work.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CpuReport {
    /// Seconds of CPU this process used (all threads).
    pub client_s: f64,
    /// Seconds of CPU the server used (all threads), if its PID was given.
    pub server_s: Option<f64>,
    /// Requests (reads and writes, flushes not counted) the CPU time paid for.
    pub requests: u64,
    /// Bytes those requests moved.
    pub bytes: u64,
    /// Client CPU seconds per GiB moved.
    pub client_s_per_gib: f64,
    /// Server CPU seconds per GiB moved.
    pub server_s_per_gib: Option<f64>,
    /// Client CPU microseconds per request.
    pub client_us_per_request: f64,
    /// Server CPU microseconds per request.
    pub server_us_per_request: Option<f64>,
    /// Whether the client used more CPU than the server: then the job measured the
    /// load generator at least as much as the server. `None` without a server PID.
    pub client_bound: Option<bool>,
}

/// Whether a job that cost the client `client` and the server `server` of CPU time is
/// bound by the client.
pub fn is_client_bound(client: Duration, server: Duration) -> bool {
    client > server
}

impl CpuReport {
    /// The CPU used between `before` and `after`, for `requests` requests moving
    /// `bytes` bytes.
    pub fn between(before: &CpuSample, after: &CpuSample, requests: u64, bytes: u64) -> Self {
        let client = after.client.saturating_sub(before.client);
        let server = before
            .server
            .zip(after.server)
            .map(|(b, a)| a.saturating_sub(b));
        let per_gib = |d: Duration| {
            if bytes > 0 {
                d.as_secs_f64() / (bytes as f64 / GIB)
            } else {
                0.0
            }
        };
        let per_request = |d: Duration| {
            if requests > 0 {
                d.as_secs_f64() * 1e6 / requests as f64
            } else {
                0.0
            }
        };
        Self {
            client_s: client.as_secs_f64(),
            server_s: server.map(|s| s.as_secs_f64()),
            requests,
            bytes,
            client_s_per_gib: per_gib(client),
            server_s_per_gib: server.map(per_gib),
            client_us_per_request: per_request(client),
            server_us_per_request: server.map(per_request),
            client_bound: server.map(|s| is_client_bound(client, s)),
        }
    }

    /// One line for the text report.
    pub fn line(&self) -> String {
        let mut s = format!(
            "client {:.3} s ({:.3} s/GiB, {:.2} us/request)",
            self.client_s, self.client_s_per_gib, self.client_us_per_request
        );
        if let (Some(server), Some(per_gib), Some(per_req)) = (
            self.server_s,
            self.server_s_per_gib,
            self.server_us_per_request,
        ) {
            s += &format!(", server {server:.3} s ({per_gib:.3} s/GiB, {per_req:.2} us/request)");
        }
        if self.client_bound == Some(true) {
            s += ", client-bound";
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_count_from_the_last_parenthesis() {
        let stat = "4242 (ociblk serve) S 1 4242 4242 0 -1 4194560 1523 0 0 0 \
                    731 262 0 0 20 0 5 0 123456 1000000 500 18446744073709551615";
        assert_eq!(parse_stat_ticks(stat), Some(731 + 262));
        // A name with spaces and parentheses of its own.
        let tricky = "7 (a) b (c)) R 1 7 7 0 -1 0 0 0 0 0 5 6 0 0 20 0 1 0 1 1 1";
        assert_eq!(parse_stat_ticks(tricky), Some(11));
        assert_eq!(parse_stat_ticks("7 (short) R 1 2"), None);
        assert_eq!(parse_stat_ticks("no parenthesis"), None);
        assert_eq!(parse_stat_ticks("7 (x) R 1 7 7 0 -1 0 0 0 0 0 x 6 0"), None);
    }

    #[test]
    fn own_and_proc_cpu_time_agree_in_kind() {
        // Burn a little CPU so that both readings are positive.
        let mut x = 0u64;
        for _ in 0..5_000_000 {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        let own = own_cpu_time().expect("getrusage");
        assert!(own > Duration::ZERO);
        let via_proc = process_cpu_time(std::process::id()).expect("/proc/self/stat");
        // Clock ticks are coarser than getrusage: /proc may only trail it, or lead by
        // what reading the file cost.
        assert!(
            via_proc <= own + Duration::from_millis(20),
            "{via_proc:?} {own:?}"
        );
        assert!(matches!(
            process_cpu_time(u32::MAX),
            Err(BenchError::Io { .. })
        ));
    }

    fn sample(client_ms: u64, server_ms: Option<u64>) -> CpuSample {
        CpuSample {
            client: Duration::from_millis(client_ms),
            server: server_ms.map(Duration::from_millis),
        }
    }

    #[test]
    fn per_unit_figures_and_the_client_bound_mark() {
        // 1 GiB in 262144 requests of 4 KiB: client 0.5 s, server 1.5 s.
        let r = CpuReport::between(
            &sample(100, Some(1000)),
            &sample(600, Some(2500)),
            262_144,
            1 << 30,
        );
        assert!((r.client_s - 0.5).abs() < 1e-9);
        assert_eq!(r.server_s, Some(1.5));
        assert!((r.client_s_per_gib - 0.5).abs() < 1e-9);
        assert!((r.server_s_per_gib.expect("server") - 1.5).abs() < 1e-9);
        assert!((r.client_us_per_request - 0.5e6 / 262_144.0).abs() < 1e-9);
        assert_eq!(r.client_bound, Some(false));
        assert!(!r.line().contains("client-bound"));

        let r = CpuReport::between(&sample(0, Some(0)), &sample(900, Some(300)), 10, 0);
        assert_eq!(r.client_bound, Some(true));
        assert_eq!(r.client_s_per_gib, 0.0);
        assert!(r.line().ends_with("client-bound"));

        let r = CpuReport::between(&sample(0, None), &sample(10, None), 1, 1);
        assert_eq!((r.server_s, r.client_bound), (None, None));
        assert!(is_client_bound(
            Duration::from_millis(2),
            Duration::from_millis(1)
        ));
        assert!(!is_client_bound(
            Duration::from_millis(1),
            Duration::from_millis(1)
        ));
    }
}

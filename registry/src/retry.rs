//! When to try a request again.

use std::time::{Duration, Instant, SystemTime};

/// Longest wait between two attempts when the registry does not say.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The wait before attempt `attempt + 1` (exponential from 100 ms, capped,
/// with up to 25% jitter so that many processes do not retry in step).
pub fn backoff(attempt: u32) -> Duration {
    let base = Duration::from_millis(100)
        .saturating_mul(1u32 << attempt.min(16))
        .min(MAX_BACKOFF);
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    base + base.mul_f64(f64::from(nanos % 250) / 1000.0)
}

/// The wait a `Retry-After` header asks for: delay-seconds or an HTTP date.
pub fn retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(when.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Whether a wait of `wait` from `now` ends before `deadline`. `wait` may
/// come from a server (`Retry-After`), so the sum is checked: a wait too
/// long to add to an `Instant` does not fit.
pub fn fits_before(now: Instant, wait: Duration, deadline: Instant) -> bool {
    now.checked_add(wait).is_some_and(|end| end < deadline)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_480);
        assert_eq!(retry_after(" 3 ", now), Some(Duration::from_secs(3)));
        assert_eq!(
            retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            retry_after("Wed, 21 Oct 2015 07:27:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(retry_after("soon", now), None);
    }

    #[test]
    fn any_wait_a_server_asks_for_is_judged_without_overflow() {
        let now = Instant::now();
        let deadline = now + Duration::from_secs(2);
        let huge = retry_after("18446744073709551615", SystemTime::now()).expect("seconds");
        assert_eq!(huge, Duration::from_secs(u64::MAX));
        assert!(!fits_before(now, huge, deadline));
        assert!(!fits_before(now, Duration::MAX, deadline));
        assert!(!fits_before(now, Duration::from_secs(2), deadline));
        assert!(fits_before(now, Duration::from_secs(1), deadline));
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        assert!(
            backoff(0) >= Duration::from_millis(100) && backoff(0) < Duration::from_millis(130)
        );
        assert!(backoff(3) >= Duration::from_millis(800));
        assert!(backoff(30) <= MAX_BACKOFF + MAX_BACKOFF / 4);
    }
}

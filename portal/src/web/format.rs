//! How the pages write times, durations and sizes: pure functions.
//!
//! A time is shown relative ("3 min ago") with its absolute UTC time in the
//! `title` and its milliseconds in `data-ms`, from which the page's script
//! writes the absolute time in the viewer's own zone.

use crate::deployment::Millis;

/// A moment, as a page shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct When {
    /// Milliseconds since the epoch (`data-ms`).
    pub ms: Millis,
    /// RFC 3339 UTC (`datetime`).
    pub iso: String,
    /// The absolute time, UTC (`title`, until the script sets the viewer's zone).
    pub utc: String,
    /// Relative to the page's render ("3 min ago").
    pub ago: String,
}

impl When {
    /// `ms` seen from `now`.
    pub fn new(ms: Millis, now: Millis) -> Self {
        let (date, h, m, s) = civil(ms);
        Self {
            ms,
            iso: format!("{date}T{h:02}:{m:02}:{s:02}Z"),
            utc: format!("{date} {h:02}:{m:02}:{s:02} UTC"),
            ago: ago(now - ms),
        }
    }
}

/// The UTC date (`YYYY-MM-DD`) and time of day of `ms`.
fn civil(ms: Millis) -> (String, i64, i64, i64) {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (
        format!("{y:04}-{m:02}-{d:02}"),
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
    )
}

/// A time difference in words: `12 s ago`, `3 min ago`, `5 h ago`, `2 d ago`
/// (`in …` for the future).
pub fn ago(diff_ms: Millis) -> String {
    let s = (diff_ms.abs() + 500) / 1000;
    let text = if s < 45 {
        format!("{s} s")
    } else if s < 45 * 60 {
        format!("{} min", (s + 30) / 60)
    } else if s < 36 * 3600 {
        format!("{} h", (s + 1800) / 3600)
    } else {
        format!("{} d", (s + 43_200) / 86_400)
    };
    if diff_ms < 0 {
        format!("in {text}")
    } else {
        format!("{text} ago")
    }
}

/// A duration: `850 ms`, `2.4 s`, `3 min 05 s`, `2 h 03 min`.
pub fn duration(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms} ms")
    } else if ms < 60_000 {
        format!("{:.1} s", ms as f64 / 1000.0)
    } else if ms < 3_600_000 {
        format!("{} min {:02} s", ms / 60_000, ms % 60_000 / 1000)
    } else {
        format!("{} h {:02} min", ms / 3_600_000, ms % 3_600_000 / 60_000)
    }
}

/// A size: `512 B`, `1.5 KiB`, `3.2 MiB`, `1.1 GiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// The first 12 hex digits of an id (commit, image).
pub fn short(id: &impl std::fmt::Display) -> String {
    id.to_string().chars().take(12).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_read_as_people_expect() {
        // 2024-02-29T13:05:09Z, checked with `date -u -d @1709211909`.
        let w = When::new(1_709_211_909_000, 1_709_211_909_000 + 180_000);
        assert_eq!(w.iso, "2024-02-29T13:05:09Z");
        assert_eq!(w.utc, "2024-02-29 13:05:09 UTC");
        assert_eq!(w.ago, "3 min ago");
        assert_eq!(When::new(0, 0).iso, "1970-01-01T00:00:00Z");
        assert_eq!(ago(-5_000), "in 5 s");
        assert_eq!(ago(3 * 3600 * 1000), "3 h ago");
        assert_eq!(ago(3 * 86_400 * 1000), "3 d ago");
    }

    #[test]
    fn durations_and_sizes() {
        assert_eq!(duration(850), "850 ms");
        assert_eq!(duration(2_400), "2.4 s");
        assert_eq!(duration(185_000), "3 min 05 s");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3 * 1024 * 1024 + 200 * 1024), "3.2 MiB");
        assert_eq!(short(&"0123456789abcdef"), "0123456789ab");
    }
}

/// The first millisecond of a day written `YYYY-MM-DD` (UTC), as a date input
/// sends it; `None` for anything else.
pub fn day_start(date: &str) -> Option<Millis> {
    let mut parts = date.splitn(3, '-');
    let (y, m, d) = (parts.next()?, parts.next()?, parts.next()?);
    if y.len() != 4 || m.len() != 2 || d.len() != 2 {
        return None;
    }
    let (y, m, d): (i64, i64, i64) = (y.parse().ok()?, m.parse().ok()?, d.parse().ok()?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400_000)
}

#[cfg(test)]
mod day_tests {
    use super::*;

    #[test]
    fn dates_become_the_start_of_their_day() {
        assert_eq!(day_start("1970-01-01"), Some(0));
        assert_eq!(day_start("2026-12-02"), Some(1_796_169_600_000));
        assert_eq!(day_start("2024-02-29"), Some(1_709_164_800_000));
        for bad in [
            "",
            "2026-13-01",
            "2026-1-01",
            "yesterday",
            "2026-12-02T00:00",
        ] {
            assert_eq!(day_start(bad), None, "{bad}");
        }
    }
}

//! A rate limit as written in the configuration: `"250/min"`, `"10/sec"`,
//! `"1000/hour"`, or a period of its own (`"20/2s"`).

use std::fmt;
use std::time::Duration;

/// The most calls a limit may allow per period, and its longest period:
/// past these a limit is a typo (and the arithmetic stays in `u64`).
const MAX_CALLS: u32 = 1_000_000;
const MAX_PERIOD: Duration = Duration::from_secs(24 * 3600);
const MIN_PERIOD: Duration = Duration::from_millis(10);

/// At most `calls` calls in any window of `period`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Rate {
    pub(crate) calls: u32,
    pub(crate) period: Duration,
}

impl Rate {
    /// Parses `N/unit` (`sec`, `min`, `hour`, and their long and short
    /// spellings) or `N/duration` (`20/2s`). The error says what is wrong,
    /// for a message that names the key.
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        let shape =
            || format!("{text:?} is not a rate: write N/sec, N/min or N/hour, e.g. \"250/min\"");
        let (n, unit) = text.trim().split_once('/').ok_or_else(shape)?;
        let calls: u32 = n.trim().parse().map_err(|_| shape())?;
        if !(1..=MAX_CALLS).contains(&calls) {
            return Err(format!(
                "{text:?}: the number of calls must be between 1 and {MAX_CALLS}"
            ));
        }
        let unit = unit.trim();
        let period = match unit {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            other => humantime::parse_duration(other).map_err(|_| {
                format!("{text:?}: unknown period {other:?}: use sec, min, hour or a duration such as 2s")
            })?,
        };
        if !(MIN_PERIOD..=MAX_PERIOD).contains(&period) {
            return Err(format!(
                "{text:?}: the period must be between {} and {}",
                humantime::format_duration(MIN_PERIOD),
                humantime::format_duration(MAX_PERIOD)
            ));
        }
        Ok(Self { calls, period })
    }
}

/// Written back the way it is read (`check-config`, `/tenants`).
impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.period.as_secs() {
            1 if self.period.subsec_nanos() == 0 => "sec".to_owned(),
            60 if self.period.subsec_nanos() == 0 => "min".to_owned(),
            3600 if self.period.subsec_nanos() == 0 => "hour".to_owned(),
            _ => humantime::format_duration(self.period).to_string(),
        };
        write!(f, "{}/{unit}", self.calls)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_criteo_style_limits_and_writes_them_back() {
        for (text, calls, secs, shown) in [
            ("250/min", 250, 60, "250/min"),
            ("10/sec", 10, 1, "10/sec"),
            ("1000/hour", 1000, 3600, "1000/hour"),
            (" 40 / minute ", 40, 60, "40/min"),
            ("20/2s", 20, 2, "20/2s"),
        ] {
            let r = Rate::parse(text).unwrap();
            assert_eq!((r.calls, r.period), (calls, Duration::from_secs(secs)));
            assert_eq!(r.to_string(), shown);
            assert_eq!(Rate::parse(&r.to_string()).unwrap(), r);
        }
    }

    #[test]
    fn refuses_what_is_not_a_limit() {
        for text in [
            "0/min",
            "10/fortnight",
            "abc",
            "10",
            "-1/min",
            "5/0s",
            "1/1000d",
            "",
        ] {
            assert!(Rate::parse(text).is_err(), "{text:?} was accepted");
        }
    }
}

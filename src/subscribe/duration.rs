//! Durations as the subscribe flags take them: whole numbers with a unit, `s`, `m`, `h`,
//! `d` or `w`, summed in any order (`10s`, `5m`, `1h30m`, `3d`, `2w`, `1d 12h`).
//!
//! A bare number is refused rather than guessed at, and so are months and years, which
//! have no fixed length. Units are case-sensitive: `m` is minutes, `M` would be months.
//! [`format()`] prints the compact form that [`parse`] reads back.

use std::time::Duration;

const MINUTE_SECS: u64 = 60;
const HOUR_SECS: u64 = 60 * MINUTE_SECS;
const DAY_SECS: u64 = 24 * HOUR_SECS;
const WEEK_SECS: u64 = 7 * DAY_SECS;

/// Parses `s` into a duration, or explains in one line why it is not one.
///
/// ```
/// use std::time::Duration;
/// use sqlferry::subscribe::duration::parse;
/// assert_eq!(parse("1h30m"), Ok(Duration::from_secs(5400)));
/// assert!(parse("10").unwrap_err().contains("add a unit"));
/// ```
pub fn parse(s: &str) -> Result<Duration, String> {
    let bad = |why: &str| format!("invalid duration {s:?}: {why}");
    let input = s.trim();
    if input.is_empty() {
        return Err(bad("it is empty; give a number and a unit, e.g. 10m"));
    }
    let mut total: u64 = 0;
    let mut rest = input;
    while !rest.is_empty() {
        let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        if digits == 0 {
            let c = rest.chars().next().expect("rest is not empty");
            return Err(bad(&match c {
                '-' => "durations cannot be negative".to_owned(),
                c if c.is_alphabetic() => format!("expected a number before {c:?}"),
                c => format!("unexpected {c:?}"),
            }));
        }
        let (number, after) = rest.split_at(digits);
        let number: u64 = number.parse().map_err(|_| bad("the number is too large"))?;
        let after = after.trim_start();
        if after.starts_with(['.', ',']) {
            return Err(bad("use whole numbers (1h30m, not 1.5h)"));
        }
        let unit_len = after.len() - after.trim_start_matches(char::is_alphabetic).len();
        let (unit, after) = after.split_at(unit_len);
        let unit_secs = match unit {
            "s" => 1,
            "m" => MINUTE_SECS,
            "h" => HOUR_SECS,
            "d" => DAY_SECS,
            "w" => WEEK_SECS,
            "" => return Err(bad("add a unit: s, m, h, d or w")),
            "M" | "mo" | "mon" | "month" | "months" | "y" | "yr" | "yrs" | "year" | "years" => {
                return Err(bad(
                    "months and years have no fixed length; use days or weeks (30d, 52w)",
                ));
            }
            other => {
                return Err(bad(&format!("unknown unit {other:?}; use s, m, h, d or w")));
            }
        };
        total = number
            .checked_mul(unit_secs)
            .and_then(|part| total.checked_add(part))
            .ok_or_else(|| bad("too large"))?;
        rest = after.trim_start();
    }
    Ok(Duration::from_secs(total))
}

/// The compact form of `d`: `1h30m`, `10s`, `3d`, `2w`, `0s`; weeks only for a whole
/// number of weeks' worth of days (`14d` is `2w`, `10d` stays `10d`). A fraction of a
/// second, which flags never hold, is shown in milliseconds (`1s500ms`).
pub fn format(d: Duration) -> String {
    let secs = d.as_secs();
    let millis = d.subsec_millis();
    if secs == 0 && millis == 0 {
        return "0s".to_owned();
    }
    let days = secs / DAY_SECS;
    let (weeks, days) = if days.is_multiple_of(7) {
        (days / 7, 0)
    } else {
        (0, days)
    };
    let parts = [
        (weeks, "w"),
        (days, "d"),
        (secs % DAY_SECS / HOUR_SECS, "h"),
        (secs % HOUR_SECS / MINUTE_SECS, "m"),
        (secs % MINUTE_SECS, "s"),
        (u64::from(millis), "ms"),
    ];
    parts
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, unit)| format!("{n}{unit}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn single_units() {
        assert_eq!(parse("10s"), Ok(secs(10)));
        assert_eq!(parse("5m"), Ok(secs(300)));
        assert_eq!(parse("1h"), Ok(secs(3600)));
        assert_eq!(parse("3d"), Ok(secs(3 * 86_400)));
        assert_eq!(parse("2w"), Ok(secs(14 * 86_400)));
        assert_eq!(parse("0s"), Ok(secs(0)));
    }

    #[test]
    fn parts_sum_in_any_order_with_optional_spaces() {
        assert_eq!(parse("1h30m"), Ok(secs(5400)));
        assert_eq!(parse("30m1h"), Ok(secs(5400)));
        assert_eq!(parse("1d12h"), Ok(secs(36 * 3600)));
        assert_eq!(parse("1h 30m"), Ok(secs(5400)));
        assert_eq!(
            parse(" 1w 2d 3h 4m 5s "),
            Ok(secs(9 * 86_400 + 3 * 3600 + 245))
        );
        assert_eq!(parse("10 s"), Ok(secs(10)));
        // A unit given twice adds up like any other part.
        assert_eq!(parse("1h1h"), Ok(secs(7200)));
    }

    #[test]
    fn a_bare_number_asks_for_a_unit() {
        let err = parse("10").unwrap_err();
        assert_eq!(err, r#"invalid duration "10": add a unit: s, m, h, d or w"#);
        let err = parse("1h30").unwrap_err();
        assert!(err.contains("add a unit: s, m, h, d or w"), "{err}");
    }

    #[test]
    fn months_and_years_are_refused() {
        for s in [
            "1mo", "2months", "1month", "1M", "1y", "2years", "1year", "3d1y",
        ] {
            let err = parse(s).unwrap_err();
            assert_eq!(
                err,
                format!(
                    "invalid duration {s:?}: months and years have no fixed length; \
                     use days or weeks (30d, 52w)"
                )
            );
        }
    }

    #[test]
    fn unknown_units_empty_and_stray_characters_are_named() {
        assert_eq!(
            parse("5min").unwrap_err(),
            r#"invalid duration "5min": unknown unit "min"; use s, m, h, d or w"#
        );
        assert_eq!(
            parse("").unwrap_err(),
            r#"invalid duration "": it is empty; give a number and a unit, e.g. 10m"#
        );
        assert_eq!(
            parse("  ").unwrap_err(),
            r#"invalid duration "  ": it is empty; give a number and a unit, e.g. 10m"#
        );
        assert_eq!(
            parse("-5m").unwrap_err(),
            r#"invalid duration "-5m": durations cannot be negative"#
        );
        assert_eq!(
            parse("m").unwrap_err(),
            r#"invalid duration "m": expected a number before 'm'"#
        );
        assert_eq!(
            parse("1.5h").unwrap_err(),
            r#"invalid duration "1.5h": use whole numbers (1h30m, not 1.5h)"#
        );
        assert_eq!(
            parse("5m+3s").unwrap_err(),
            r#"invalid duration "5m+3s": unexpected '+'"#
        );
    }

    #[test]
    fn overflow_is_an_error_not_a_wrap() {
        // Fits in u64 as a number, overflows once multiplied by a week.
        let s = format!("{}w", u64::MAX / 1000);
        assert_eq!(
            parse(&s).unwrap_err(),
            format!("invalid duration {s:?}: too large")
        );
        // Overflows while summing.
        let s = format!("{}s1s", u64::MAX);
        assert_eq!(
            parse(&s).unwrap_err(),
            format!("invalid duration {s:?}: too large")
        );
        // Does not fit in u64 at all.
        let s = "99999999999999999999999s";
        assert_eq!(
            parse(s).unwrap_err(),
            format!("invalid duration {s:?}: the number is too large")
        );
        assert_eq!(parse(&format!("{}s", u64::MAX)), Ok(secs(u64::MAX)));
    }

    #[test]
    fn format_is_compact() {
        assert_eq!(format(secs(5400)), "1h30m");
        assert_eq!(format(secs(10)), "10s");
        assert_eq!(format(secs(3 * 86_400)), "3d");
        assert_eq!(format(secs(14 * 86_400)), "2w");
        assert_eq!(format(secs(10 * 86_400)), "10d");
        assert_eq!(format(secs(36 * 3600)), "1d12h");
        assert_eq!(format(secs(0)), "0s");
        assert_eq!(format(secs(86_400 + 1)), "1d1s");
        assert_eq!(format(Duration::from_millis(1500)), "1s500ms");
        assert_eq!(format(Duration::from_millis(200)), "200ms");
    }

    #[test]
    fn format_reads_back() {
        for n in [
            1,
            59,
            60,
            61,
            3599,
            3600,
            86_399,
            86_400,
            7 * 86_400 + 1,
            1 << 40,
        ] {
            assert_eq!(parse(&format(secs(n))), Ok(secs(n)), "{n} seconds");
        }
    }
}

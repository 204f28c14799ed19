//! The small formatting every part of the CLI shares: metric values, timestamps, state names and
//! jobs counted by state.
//!
//! A leaf: it must not use any other module of this crate (tables, watching and reports all use
//! it), and it does no I/O.

use proto::v1;

/// A timestamp in RFC 3339 (UTC), or `-` when unset.
pub fn timestamp(ts: Option<&proto::Timestamp>) -> String {
    match ts {
        // pbjson's Timestamp serialises as an RFC 3339 string.
        Some(ts) => serde_json::to_value(ts)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_else(|| "-".into()),
        None => "-".into(),
    }
}

/// A metric value: integers without a fraction, others with up to 6 significant digits.
pub fn number(value: f64) -> String {
    if value.is_finite() && value == value.trunc() && value.abs() < 1e15 {
        format!("{value:.0}")
    } else if value != 0.0 && (value.abs() >= 1e6 || value.abs() < 1e-3) {
        format!("{value:.5e}")
    } else {
        let s = format!("{value:.6}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// A sweep state's lowercase name (`running`, `partial`, ...); `unspecified` for the wire's zero
/// value.
pub fn sweep_state_name(state: v1::SweepState) -> &'static str {
    proto::SweepState::try_from(state).map_or("unspecified", proto::SweepState::as_str)
}

/// Jobs by state as `3 succeeded, 1 running` (in the order of the states).
pub fn counts_text(counts: &[v1::StateCount]) -> String {
    let mut sorted: Vec<&v1::StateCount> = counts.iter().collect();
    sorted.sort_by_key(|c| c.state);
    let parts: Vec<String> = sorted
        .iter()
        .map(|c| format!("{} {}", c.count, proto::state_name(c.state())))
        .collect();
    if parts.is_empty() {
        "no jobs".into()
    } else {
        parts.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_short_but_keep_their_magnitude() {
        assert_eq!(number(3.0), "3");
        assert_eq!(number(0.5), "0.5");
        assert_eq!(number(1234.5678), "1234.5678");
        assert_eq!(number(0.0001234), "1.23400e-4");
        assert_eq!(number(f64::NAN), "NaN");
    }
}

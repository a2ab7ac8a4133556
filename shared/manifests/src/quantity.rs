//! Kubernetes resource quantities (`100m`, `0.5`, `128Mi`, `1G`, `1e3`) as exact
//! integers: CPU in millicores, memory in bytes.
//!
//! Why not `f64`: quota totals are multiplied and compared, and a float turns
//! `0.1 × 3` into `300.00000000000006m`. The parser keeps the decimal mantissa as
//! an integer and applies the suffix exactly, rounding a fractional result *up*
//! the way the API server does (`0.0001` CPU becomes `1m`, never `0`).
//!
//! Results are capped at `i64::MAX` because that is the range of the API
//! server's own quantity arithmetic (`MilliValue()` for CPU, `Value()` for
//! bytes): anything larger would be accepted here and refused (or wrapped) there.

/// Why a quantity string was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    /// The string is empty.
    #[error("empty quantity")]
    Empty,
    /// A leading `-`: resources cannot be negative.
    #[error("negative quantities are not allowed")]
    Negative,
    /// The number part is not digits with an optional single `.` fraction.
    #[error("expected digits with an optional fraction, e.g. 100m, 0.5, 128Mi")]
    BadNumber,
    /// The suffix is not one Kubernetes knows.
    #[error("unknown suffix: expected n, u, m, k, M, G, T, P, E, Ki..Ei or an exponent")]
    BadSuffix,
    /// The value does not fit Kubernetes' 64-bit quantity range.
    #[error("value out of range (larger than 2^63-1 in the unit used)")]
    Overflow,
}

/// Parses a CPU quantity into millicores (`"0.5"` → 500, `"100m"` → 100, `"2"` → 2000).
pub fn parse_cpu_millis(s: &str) -> Result<u64, QuantityError> {
    parse_scaled(s, 3)
}

/// Parses a memory (or any byte) quantity into bytes (`"128Mi"` → 134217728, `"1G"` → 10^9).
pub fn parse_bytes(s: &str) -> Result<u64, QuantityError> {
    parse_scaled(s, 0)
}

/// Formats millicores the way `kubectl` shows them: whole cores without a
/// suffix (`2000` → `"2"`), anything else in `m` (`1500` → `"1500m"`).
pub fn format_millis(millis: u64) -> String {
    if millis.is_multiple_of(1000) {
        (millis / 1000).to_string()
    } else {
        format!("{millis}m")
    }
}

/// Formats bytes with the largest binary suffix that divides them exactly
/// (`268435456` → `"256Mi"`), or as plain bytes.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [(&str, u32); 6] = [
        ("Ei", 60),
        ("Pi", 50),
        ("Ti", 40),
        ("Gi", 30),
        ("Mi", 20),
        ("Ki", 10),
    ];
    if bytes == 0 {
        return "0".to_string();
    }
    for (suffix, shift) in UNITS {
        let unit = 1u64 << shift;
        if bytes.is_multiple_of(unit) {
            return format!("{}{suffix}", bytes / unit);
        }
    }
    bytes.to_string()
}

/// Parses `s` and returns `ceil(value × 10^scale)`.
fn parse_scaled(s: &str, scale: i64) -> Result<u64, QuantityError> {
    if s.is_empty() {
        return Err(QuantityError::Empty);
    }
    let body = s.strip_prefix('+').unwrap_or(s);
    if body.starts_with('-') {
        return Err(QuantityError::Negative);
    }
    let split = body
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(body.len());
    let (number, suffix) = body.split_at(split);
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    if (int.is_empty() && frac.is_empty()) || frac.contains('.') {
        return Err(QuantityError::BadNumber);
    }
    let (exp10, exp2) = suffix_exponents(suffix)?;

    // The mantissa as one integer, the fraction moved into the power of ten.
    let digits = format!("{int}{frac}");
    let digits = digits.trim_start_matches('0');
    if digits.len() > 38 {
        return Err(QuantityError::Overflow);
    }
    let mantissa: u128 = if digits.is_empty() {
        0
    } else {
        digits.parse().map_err(|_| QuantityError::BadNumber)?
    };
    let frac_len = i64::try_from(frac.len()).map_err(|_| QuantityError::Overflow)?;
    let pow10 = exp10 + scale - frac_len;

    let shifted = mantissa
        .checked_mul(1u128.checked_shl(exp2).ok_or(QuantityError::Overflow)?)
        .ok_or(QuantityError::Overflow)?;
    let value = if pow10 >= 0 {
        let factor = u32::try_from(pow10)
            .ok()
            .and_then(|p| 10u128.checked_pow(p))
            .ok_or(QuantityError::Overflow)?;
        if shifted == 0 {
            0
        } else {
            shifted.checked_mul(factor).ok_or(QuantityError::Overflow)?
        }
    } else {
        match u32::try_from(-pow10)
            .ok()
            .and_then(|p| 10u128.checked_pow(p))
        {
            Some(divisor) => shifted.div_ceil(divisor),
            // Smaller than any representable unit: rounds up to one unit (or stays 0).
            None => u128::from(shifted != 0),
        }
    };
    if value > i64::MAX as u128 {
        return Err(QuantityError::Overflow);
    }
    u64::try_from(value).map_err(|_| QuantityError::Overflow)
}

/// `(power of ten, power of two)` of a quantity suffix.
fn suffix_exponents(suffix: &str) -> Result<(i64, u32), QuantityError> {
    Ok(match suffix {
        "" => (0, 0),
        "n" => (-9, 0),
        "u" => (-6, 0),
        "m" => (-3, 0),
        "k" => (3, 0),
        "M" => (6, 0),
        "G" => (9, 0),
        "T" => (12, 0),
        "P" => (15, 0),
        "E" => (18, 0),
        "Ki" => (0, 10),
        "Mi" => (0, 20),
        "Gi" => (0, 30),
        "Ti" => (0, 40),
        "Pi" => (0, 50),
        "Ei" => (0, 60),
        _ => {
            // Decimal exponent: `e3`, `E-2`, `e+6` (a lone `E` is exa, handled above).
            let exp = suffix
                .strip_prefix(['e', 'E'])
                .ok_or(QuantityError::BadSuffix)?;
            let digits = exp.strip_prefix(['+', '-']).unwrap_or(exp);
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return Err(QuantityError::BadSuffix);
            }
            // Far beyond any 64-bit value either way; bounding it keeps the
            // exponent arithmetic itself from overflowing.
            if digits.len() > 4 {
                return Err(QuantityError::Overflow);
            }
            let n: i64 = digits.parse().map_err(|_| QuantityError::BadSuffix)?;
            (if exp.starts_with('-') { -n } else { n }, 0)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu() {
        for (s, want) in [
            ("100m", 100),
            ("0.5", 500),
            (".5", 500),
            ("5.", 5000),
            ("2", 2000),
            ("+1", 1000),
            ("1500m", 1500),
            ("0.0001", 1), // rounds up, as the API server does
            ("1n", 1),
            ("0", 0),
            ("0.000m", 0),
            ("1e3", 1_000_000),
            ("1E-3", 1),
            ("25e-2", 250),
            ("1k", 1_000_000),
            ("000000000000000000000000000000000000000000001", 1000),
            ("1.0000000000000000000000000000000000000", 1000),
        ] {
            assert_eq!(parse_cpu_millis(s), Ok(want), "{s}");
        }
    }

    #[test]
    fn bytes() {
        for (s, want) in [
            ("128Mi", 128 << 20),
            ("1G", 1_000_000_000),
            ("1Gi", 1 << 30),
            ("1.5Ki", 1536),
            ("0.5Mi", 512 << 10),
            ("100", 100),
            ("1k", 1000),
            ("1M", 1_000_000),
            ("1Ti", 1 << 40),
            ("7Ei", 7 << 60),
            ("100m", 1), // a tenth of a byte rounds up to one byte
            ("1e6", 1_000_000),
        ] {
            assert_eq!(parse_bytes(s), Ok(want), "{s}");
        }
    }

    #[test]
    fn rejects() {
        for (s, err) in [
            ("", QuantityError::Empty),
            ("-1", QuantityError::Negative),
            ("+-1", QuantityError::Negative),
            ("1..2", QuantityError::BadNumber),
            (".", QuantityError::BadNumber),
            ("Mi", QuantityError::BadNumber),
            ("1.2.3", QuantityError::BadNumber),
            ("10 Mi", QuantityError::BadSuffix),
            ("1mi", QuantityError::BadSuffix),
            ("1KB", QuantityError::BadSuffix),
            ("1e", QuantityError::BadSuffix),
            ("1e1.5", QuantityError::BadSuffix),
            ("lots", QuantityError::BadNumber),
            ("8Ei", QuantityError::Overflow), // 2^63 > i64::MAX
            ("10E", QuantityError::Overflow),
            ("99999999999999999999Ei", QuantityError::Overflow),
            ("1e99999", QuantityError::Overflow),
            (
                "123456789012345678901234567890123456789",
                QuantityError::Overflow,
            ),
        ] {
            assert_eq!(parse_bytes(s), Err(err), "{s}");
        }
        // CPU's unit is the millicore, so its ceiling is 1000× lower.
        assert_eq!(
            parse_cpu_millis("9223372036854775807m"),
            Ok(i64::MAX as u64)
        );
        assert_eq!(
            parse_cpu_millis("9223372036854776"),
            Err(QuantityError::Overflow)
        );
        assert_eq!(parse_cpu_millis("1e-99999"), Err(QuantityError::Overflow));
    }

    #[test]
    fn tiny_values_round_up() {
        assert_eq!(
            parse_cpu_millis("0.0000000000000000000000000000000000001"),
            Ok(1)
        );
        assert_eq!(parse_cpu_millis("1e-50"), Ok(1));
        assert_eq!(parse_cpu_millis("0e-50"), Ok(0));
    }

    #[test]
    fn formatting_round_trips() {
        assert_eq!(format_millis(2000), "2");
        assert_eq!(format_millis(1500), "1500m");
        assert_eq!(format_millis(0), "0");
        assert_eq!(format_bytes(256 << 20), "256Mi");
        assert_eq!(format_bytes(3 << 30), "3Gi");
        assert_eq!(format_bytes(1536), "1536");
        assert_eq!(format_bytes(1000), "1000");
        assert_eq!(format_bytes(0), "0");
        for m in [1, 999, 1000, 1001, 123_456_000, i64::MAX as u64] {
            assert_eq!(parse_cpu_millis(&format_millis(m)), Ok(m));
        }
        for b in [1, 1023, 1024, 1536, 5 << 40, i64::MAX as u64] {
            assert_eq!(parse_bytes(&format_bytes(b)), Ok(b));
        }
    }
}

//! Human sizes: `512M`, `10G`, `4096`, `1.5G` are accepted; printed as `256 MiB`. No I/O.

/// Parses a size with an optional K/M/G/T/P suffix (powers of 1024; `B`/`iB` allowed).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, shift) = match t.chars().last() {
        Some(c) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                'P' => 50,
                _ => return Err(format!("bad size '{s}': unknown unit '{c}'")),
            };
            (&t[..t.len() - 1], shift)
        }
        _ => (t, 0),
    };
    if let Ok(n) = num.parse::<u64>() {
        return n
            .checked_mul(1u64 << shift)
            .ok_or_else(|| format!("size '{s}' is too large"));
    }
    match num.parse::<f64>() {
        Ok(f) if f >= 0.0 && f.is_finite() => {
            let v = f * (1u64 << shift) as f64;
            if v > u64::MAX as f64 {
                Err(format!("size '{s}' is too large"))
            } else {
                Ok(v as u64)
            }
        }
        _ => Err(format!(
            "bad size '{s}': expected a number with an optional K/M/G/T suffix"
        )),
    }
}

/// Formats bytes with a binary unit, e.g. `256 MiB`, `1.5 GiB`.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else if (v - v.round()).abs() < 0.05 {
        format!("{:.0} {}", v, UNITS[u])
    } else {
        format!("{:.1} {}", v, UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("10GiB"), Ok(10 << 30));
        assert_eq!(parse_size("1.5k"), Ok(1536));
        assert!(parse_size("12X").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999P").is_err());
    }

    #[test]
    fn prints_units() {
        assert_eq!(human(0), "0 B");
        assert_eq!(human(256 << 20), "256 MiB");
        assert_eq!(human(1536 << 20), "1.5 GiB");
    }
}
